"""benchmarks/roofline.py: loop-trip-count correction of XLA's cost analysis."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from benchmarks import roofline  # noqa: E402


def test_loop_bodies_are_weighted_by_trip_count():
    def f(x, w):
        def step(c, _):
            return jax.lax.fori_loop(0, 3, lambda i, d: jnp.tanh(d @ w), c), None

        return jax.lax.scan(step, x, None, length=10)[0]

    x = jax.ShapeDtypeStruct((64, 128), jnp.float32)
    w = jax.ShapeDtypeStruct((128, 128), jnp.float32)
    cost = roofline.weighted_cost(jax.jit(f).lower(x, w).compile())
    matmul = 2 * 64 * 128 * 128  # one iteration
    assert cost.raw_flops == pytest.approx(matmul, rel=1e-3)  # XLA: body once
    assert cost.dot_flops == 30 * matmul
    assert cost.flops == pytest.approx(30 * matmul, rel=1e-3)
    assert cost.transcendentals == 30 * 64 * 128
    assert (cost.loops, cost.unknown_trip_loops) == (2, 0)


def test_local_phase_flops_match_hand_count():
    """6 agents of an MLP 256-64-10 in blocks of 2, 128 samples each, batch 64,
    2 epochs: 3 blocks x 2 agents x 4 SGD steps x 64 samples."""
    from configs import default

    c = default.get_config()
    c.model, c.hidden, c.algorithm, c.num_devices = "mlp", (64,), "demlearn", 1
    c.batch_size, c.local_epochs, c.local_buckets = 64, 2, 1
    a = 6
    s = roofline.Setup(
        model="mlp", num_agents=a, config=c,
        n_train=np.full((a,), 128, np.int32), n_test=np.full((a,), 2, np.int32),
        pooled_test=12, eval_samples=12, input_shape=(16, 16, 1),
    )  # fmt: skip
    progs, sim = roofline.lower_phases(s, block=2, only={"local"})
    cost = roofline.weighted_cost(progs["local"][0])
    # Per sample: forward 2 x (256*64 + 64*10) MACs, weight gradients the same,
    # input gradient of the second layer 2 x 64*10 (none for the input layer).
    per_sample = 2 * 17_024 + 2 * 17_024 + 2 * 640
    hand = 3 * 2 * 4 * 64 * per_sample
    assert roofline.train_flops_per_sample([256 * 64, 64 * 10]) == per_sample
    assert roofline.analytic_flops(s, sim, "local", 17_098) == hand
    assert cost.dot_flops == hand  # every matmul of every step of every block
    # XLA adds the elementwise work (ReLU, softmax, SGD and proximal updates:
    # ~3% at this batch).
    assert hand <= cost.flops <= 1.05 * hand
    assert cost.raw_flops < hand / 6  # uncorrected: about one step of one block


def test_roofline_seconds_takes_the_slower_bound():
    dev = roofline.Device("d", matmul=100.0, matmul_highest=10.0, vector=1.0,
                          bandwidth=50.0, memory=1.0, notes="")  # fmt: skip
    cost = roofline.Cost(
        flops=1_010.0, transcendentals=0.0, bytes=100.0, dot_flops=1_000.0,
        dot_flops_highest=0.0, raw_flops=0.0, raw_bytes=0.0, loops=0,
        unknown_trip_loops=0,
    )  # fmt: skip
    assert roofline.roofline_seconds(cost, dev) == (20.0, "compute")  # 10 + 10
    cost.bytes = 5_000.0
    assert roofline.roofline_seconds(cost, dev) == (100.0, "memory")


def test_cnn4_layer_macs_by_hand():
    # conv 32@5x5 on 28x28x1, conv 64@5x5 on 14x14x32, dense 7*7*64 -> 512 -> 10.
    macs = roofline.layer_macs("cnn4", (28, 28, 1), 10)
    assert macs == [627_200, 10_035_200, 1_605_632, 5_120]


def test_round_flops_fedavg_matches_hand_count_and_pdbo_pays_for_its_hvps(capsys):
    """``benchmarks/round_flops.py --quick``: FedAvg's local phase is the hand
    count of its matmuls (plus a few percent of elementwise work), and PDBO's
    round, ten full-batch Hessian-vector products of three learners, costs
    tens of FedAvg rounds."""
    from benchmarks import round_flops

    recs = round_flops.main(["--quick", "--model=mlp", "--algorithms=fedavg,pdbo"])
    fedavg, pdbo = recs
    assert [r["algorithm"] for r in recs] == ["fedavg", "pdbo"]
    # MLP 64-100-10 on the 8x8 digits, by hand (not roofline.layer_macs).
    per_sample = 2 * 7_400 + 2 * 7_400 + 2 * 1_000
    hand = per_sample * fedavg["epoch_slots"] / 1e9
    assert fedavg["analytic_train_gflops"] == pytest.approx(hand, rel=1e-3)
    assert hand <= fedavg["phases_gflops"]["local_phase"] <= 1.15 * hand
    assert pdbo["vs_fedavg"] > 20
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["algorithm"] for x in lines] == ["fedavg", "pdbo"]
    assert all(x["cpu_model"] for x in lines)
