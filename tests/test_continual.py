"""Distributed continual learning (issue 9): DAC's logit routing and mean-centring,
the projected latent distillation, the proxy-only data path of consolidation, the
baselines, config errors and the ``scripts/run.py`` entry point."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import demjax.continual.consolidate as cons
import demjax.continual.run as crun
from demjax.config import validate
from demjax.continual.config import get_config
from demjax.continual.proxy import ProxySource, make_proxy
from demjax.continual.scenario import build_scenario
from demjax.errors import ConfigError
from demjax.models import init_params, make_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(**overrides):
    """Split digits, 3 tasks, a small MLP, a few steps: seconds per run."""
    c = get_config()
    c.dataset = "digits"
    c.num_tasks = 3
    c.agents_per_task = 2
    c.test_per_class = 20
    c.hidden = (32,)
    c.local_epochs = 1
    c.consolidation_steps = 20
    c.proxy_batch = 32
    c.proxy = "noise"  # compiles faster than crops; the CLI test runs crops
    c.progress = False
    for k, v in overrides.items():
        c[k] = v
    return c


# --- logit distillation: mean-centring and class-subset routing ---------------


def test_logit_targets_and_loss_hand_computed():
    old = np.array([1, 1, 0, 0, 0], bool)  # classes of earlier tasks
    new = np.array([0, 0, 1, 1, 0], bool)  # this task's classes; class 4 unseen
    z_prev = jnp.array([[1.0, 3.0, 50.0, -50.0, 9.0]])
    # Two agents; their old-class and unseen logits must not matter.
    z_agents = jnp.array([[[40.0, 0.0, 2.0, 6.0, 7.0]], [[0.0, -9.0, 1.0, 2.0, 3.0]]])
    target = cons.logit_targets(z_prev, z_agents, jnp.array(old), jnp.array(new))
    # old: [1, 3] - 2 = [-1, 1]; new: mean([2, 6] - 4, [1, 2] - 1.5) = [-1.25, 1.25].
    np.testing.assert_allclose(target, [[-1.0, 1.0, -1.25, 1.25, 0.0]], atol=1e-6)
    # Shifting a teacher's logits by a constant does not move its targets.
    shifted = cons.logit_targets(
        z_prev + 100.0, z_agents - 7.0, jnp.array(old), jnp.array(new)
    )
    np.testing.assert_allclose(shifted, target, atol=1e-5)
    # Student [2, 0 | 1, 1 | -3]. As published (DMC's L_dd) the raw student logits
    # regress on the targets: errors 3, -1, 2.25, -0.25 over the 4 active
    # classes, 9 + 1 + 5.0625 + 0.0625 = 15.125; the unseen logit is ignored.
    z_s = jnp.array([[2.0, 0.0, 1.0, 1.0, -3.0]])
    o, n = jnp.array(old), jnp.array(new)
    assert float(cons.logit_loss(z_s, target, o, n)) == pytest.approx(15.125 / 4)
    # Adding 5 to the old-class logits moves the raw loss: 8^2 + 4^2 + 5.125.
    z_s2 = z_s.at[0, 4].set(1e3).at[0, :2].add(5.0)
    assert float(cons.logit_loss(z_s2, target, o, n, "raw")) == pytest.approx(
        85.125 / 4
    )
    # The "centred" ablation centres the student per subset: [1, -1 | 0, 0],
    # squared errors 4 + 4 + 1.5625 + 1.5625; blind to the +5 offset.
    for z in (z_s, z_s2):
        loss = cons.logit_loss(z, target, o, n, "centred")
        assert float(loss) == pytest.approx(11.125 / 4, rel=1e-6)
    # First task: no old classes, so the previous model contributes nothing.
    first = cons.logit_targets(z_prev, z_agents, jnp.zeros(5, bool), jnp.array(new))
    np.testing.assert_allclose(first, [[0.0, 0.0, -1.25, 1.25, 0.0]], atol=1e-6)


def _logit_loss_numpy(z_s, target, old, new, student_logits):
    """Loop reference: mean over rows and active classes of the squared error."""
    total, count = 0.0, 0
    for row, t in zip(z_s, target, strict=True):
        for k in range(len(row)):
            if not (old[k] or new[k]):
                continue
            v = row[k]
            if student_logits == "centred":
                subset = old if old[k] else new
                v -= sum(row[j] for j in range(len(row)) if subset[j]) / subset.sum()
            total += (v - t[k]) ** 2
            count += 1
    return total / count


@pytest.mark.parametrize("student_logits", ["raw", "centred"])
def test_logit_loss_matches_numpy_loop(student_logits):
    rng = np.random.default_rng(0)
    old = np.array([1, 0, 1, 0, 0, 0], bool)
    new = np.array([0, 1, 0, 1, 1, 0], bool)
    z_s = rng.normal(size=(4, 6)) * 3
    z_prev, z_agents = rng.normal(size=(4, 6)), rng.normal(size=(3, 4, 6))
    target = cons.logit_targets(z_prev, z_agents, jnp.array(old), jnp.array(new))
    got = cons.logit_loss(
        jnp.asarray(z_s, jnp.float32), target, jnp.array(old), jnp.array(new),
        student_logits,
    )  # fmt: skip
    want = _logit_loss_numpy(z_s, np.asarray(target), old, new, student_logits)
    assert float(got) == pytest.approx(want, rel=1e-5)


def _tiny_models(num_classes=5, agents=2, hidden=(16,)):
    model = make_model("mlp", num_classes, hidden)
    keys = jax.random.split(jax.random.PRNGKey(3), agents + 1)
    prev = init_params(keys[0], model, (8, 8, 1))
    agent_list = [init_params(k, model, (8, 8, 1)) for k in keys[1:]]
    stacked = jax.tree.map(lambda *p: jnp.stack(p), *agent_list)
    return model, prev, stacked


OLD = np.array([1, 1, 0, 0, 0], bool)  # classes of earlier tasks
NEW = np.array([0, 0, 1, 1, 0], bool)  # this task's classes; class 4 unseen


@pytest.fixture(scope="module")
def consolidated():
    """One compiled consolidation (noise proxy, 60 steps), run for a later task
    (previous model is a teacher) and for the first task (it is not)."""
    model, prev, agents = _tiny_models()
    consolidator = cons.Consolidator(
        model, steps=60, batch=32, lr=1e-2, alpha=1.0, student_init="previous"
    )
    proxy = ProxySource("noise", (8, 8, 1))
    key = jax.random.PRNGKey(1)
    later = consolidator(key, prev, agents, OLD, NEW, True, proxy)
    first = consolidator(key, prev, agents, np.zeros(5, bool), NEW, False, proxy)
    return model, prev, agents, proxy, later, first


def test_consolidation_leaves_unseen_class_weights_untouched(consolidated):
    """Routing through the whole consolidation: classes of no task so far get no
    gradient, so the student's output column of class 4 stays as initialized
    (``student_init="previous"``) while the seen classes' columns move."""
    _, prev, _, _, (student, _, h_logit, _), _ = consolidated
    k0, k1 = prev["Dense_1"]["kernel"], student["Dense_1"]["kernel"]
    np.testing.assert_array_equal(k1[:, 4], k0[:, 4])
    assert float(student["Dense_1"]["bias"][4]) == float(prev["Dense_1"]["bias"][4])
    assert (np.abs(np.asarray(k1[:, :4] - k0[:, :4])).max(axis=0) > 0).all()
    assert np.mean(h_logit[-5:]) < 0.5 * np.mean(h_logit[:5])


# --- projected latent distillation ---------------------------------------------


def test_pld_loss_hand_computed():
    proj = cons.Projectors(
        kernel=jnp.stack([jnp.eye(2), 2.0 * jnp.eye(2)]), bias=jnp.zeros((2, 2))
    )
    h_s = jnp.array([[1.0, 2.0]])
    h_t = jnp.array([[[1.0, 1.0]], [[0.0, 0.0]]])
    # teacher 0: ([1, 2] - [1, 1])^2 -> mean 0.5; teacher 1: [2, 4]^2 -> mean 10.
    loss, per = cons.pld_loss(proj, h_s, h_t, jnp.array([1.0, 1.0]))
    np.testing.assert_allclose(per, [0.5, 10.0], rtol=1e-6)
    assert float(loss) == pytest.approx(5.25)
    loss, _ = cons.pld_loss(proj, h_s, h_t, jnp.array([0.0, 1.0]))
    assert float(loss) == pytest.approx(10.0)


def test_projectors_are_trained_and_first_task_prev_projector_is_not(consolidated):
    model, prev, agents, proxy, later, first = consolidated
    student, proj, _, h_pld = later
    h_pld = np.asarray(h_pld)
    assert h_pld.shape == (60,)
    assert h_pld[-5:].mean() < 0.9 * h_pld[:5].mean()
    # On a fresh proxy batch, with the trained student's features, every trained
    # projector beats the identity it started from: the projectors learned.
    x = proxy.sample(jax.random.PRNGKey(99), 64)
    fwd = lambda p: model.apply({"params": p}, x, return_features=True)[1]  # noqa: E731
    h_s = fwd(student)
    h_t = jnp.concatenate([fwd(prev)[None], jax.vmap(fwd)(agents)])
    ident = cons.init_projectors(None, 3, h_s.shape[-1], h_s.shape[-1], "identity")
    _, per_trained = cons.pld_loss(proj, h_s, h_t, jnp.ones(3))
    _, per_ident = cons.pld_loss(ident, h_s, h_t, jnp.ones(3))
    assert np.all(np.asarray(per_trained) < 0.9 * np.asarray(per_ident))
    # First task: the previous model is no teacher (weight 0), so its projector
    # receives no gradient and stays the identity; the agents' ones move.
    proj0 = first[1]
    np.testing.assert_array_equal(proj0.kernel[0], ident.kernel[0])
    assert not np.allclose(proj0.kernel[1], ident.kernel[1])


# --- consolidation never receives agent data -----------------------------------


def test_every_consolidation_forward_pass_gets_proxy_samples(monkeypatch):
    """Instruments the pipeline: while the real consolidation call is traced, every
    input of every model forward pass must be an array that ProxySource.sample
    just returned (checked by object identity, no convention)."""
    produced, seen = [], []
    real_sample, real_fwd = ProxySource.sample, cons.Consolidator._fwd

    def sample(self, key, batch, bank=None):
        out = real_sample(self, key, batch, bank)
        produced.append(out)
        return out

    def fwd(self, params, x):
        seen.append(any(x is p for p in produced))
        return real_fwd(self, params, x)

    monkeypatch.setattr(ProxySource, "sample", sample)
    monkeypatch.setattr(cons.Consolidator, "_fwd", fwd)
    model, prev, agents = _tiny_models()
    consolidator = cons.Consolidator(model, steps=2, batch=8, lr=1e-3, alpha=1.0)
    proxy = ProxySource("noise", (8, 8, 1))
    # Traced only (the jitted consolidation is staged out, not compiled).
    jax.make_jaxpr(
        lambda p, a: consolidator(jax.random.PRNGKey(0), p, a, OLD, NEW, True, proxy)
    )(prev, agents)
    # Student, previous model and (vmapped) agents in the step, plus the shape probe.
    assert len(seen) >= 4 and all(seen), seen
    # The instrument does catch a forward pass on other data.
    consolidator._fwd(prev, jnp.zeros((2, 8, 8, 1)))
    assert seen[-1] is False
    with pytest.raises(TypeError, match="ProxySource"):
        consolidator(jax.random.PRNGKey(0), prev, agents, OLD, NEW, True, np.ones(3))


TINY_FLAGS = [
    "--config=" + os.path.join(REPO, "configs", "continual_digits.py"),
    "--config.num_tasks=2", "--config.test_per_class=20", "--config.hidden=(32,)",
    "--config.local_epochs=1", "--config.consolidation_steps=20",
    "--config.proxy_batch=32", "--config.proxy=noise",
]  # fmt: skip
"""``tiny(num_tasks=2)`` as ``scripts/run.py`` flags on configs/continual_digits.py:
a DAC run in its own process, the CLI's output and the clean reference of the
poisoning test."""


def _poisoned_run(config, workdir, monkeypatch):
    """``crun.run`` where every task's agent data in the scenario are NaN inputs
    and label -1 from the moment the scenario is built; only the agents' trainer
    is handed the clean data (swapped in inside it). Anything else that read agent
    data - consolidation, a proxy built from them - would see the poison."""
    clean, calls = {}, []
    real_make_scenario, real_make_trainer = crun.make_scenario, crun.make_trainer

    def make_scenario(cfg):
        s = real_make_scenario(cfg)
        for t in range(s.num_tasks):
            d = s.agent_data(t)
            clean[t] = (d.x.copy(), d.y.copy())
            d.x[...] = np.nan
            d.y[...] = -1
        return s

    def make_trainer(*args, **kwargs):
        train = real_make_trainer(*args, **kwargs)

        def trainer_with_clean_data(key, params, x, y, n, mask):
            cx, cy = clean[len(calls)]
            calls.append(bool(np.isnan(x).all() and (np.asarray(y) == -1).all()))
            reps = x.shape[0] // cx.shape[0]  # 2 with forward transfer
            x, y = np.concatenate([cx] * reps), np.concatenate([cy] * reps)
            return train(key, params, x, y, n, mask)

        return trainer_with_clean_data

    monkeypatch.setattr(crun, "make_scenario", make_scenario)
    monkeypatch.setattr(crun, "make_trainer", make_trainer)
    out = crun.run(config, workdir)
    monkeypatch.undo()
    return out, calls


@pytest.mark.cli(continual=TINY_FLAGS)
def test_consolidated_model_is_unaffected_by_poisoned_agent_data(
    cli, tmp_path, monkeypatch
):
    """DAC end to end: with the agent data poisoned everywhere but inside the
    agents' trainer, every consolidation (losses, accuracies) equals the clean
    run's (the CLI run, same config, another process), so nothing but the agents'
    own training read agent data."""
    proc = cli["continual"]
    assert proc.returncode == 0, proc.stderr
    clean = [
        json.loads(x) for x in (proc.workdir / "metrics.jsonl").read_text().splitlines()
    ]
    dirty, calls = _poisoned_run(tiny(num_tasks=2), str(tmp_path), monkeypatch)
    assert calls == [True, True]  # the trainer was handed the poisoned arrays
    assert len(clean) == len(dirty["records"]) == 2
    for a, b in zip(clean, dirty["records"], strict=True):
        for key in ("acc", "avg_acc", "loss_logit", "loss_pld", "agent_acc"):
            np.testing.assert_allclose(b[key], a[key], rtol=0, atol=2e-6)
        assert b["loss_logit"][1] > 0  # consolidation really ran
    # Forward transfer was measured: agents from the consolidated model and from
    # scratch, each task.
    ft = dirty["forward_transfer"]
    assert len(ft["agent_acc_from_consolidated"]) == 2
    assert len(ft["agent_acc_from_scratch"]) == 2


# --- scenario, metrics, baselines ------------------------------------------------


def test_split_scenario_tasks_agents_and_test_sets_are_disjoint():
    n = 600
    x = np.arange(n, dtype=np.float32).reshape(n, 1, 1, 1)  # pixel = sample id
    y = np.repeat(np.arange(6), 100).astype(np.int32)
    s = build_scenario(
        x, y, 6, num_tasks=3, classes_per_task=2, agents_per_task=3,
        test_per_class=10, samples_per_agent=50,
    )  # fmt: skip
    assert s.tasks == ((0, 1), (2, 3), (4, 5))
    ids = []
    for t, classes in enumerate(s.tasks):
        d = s.agent_data(t)
        assert d.x.shape[:2] == (3, 50) and list(d.n) == [50, 50, 50]
        for a in range(3):
            assert set(d.y[a, : d.n[a]]) <= set(classes)
            ids += list(d.x[a, : d.n[a]].ravel().astype(int))
        xt, yt = s.test_data(t)
        assert len(yt) == 20 and set(yt) == set(classes)
        ids += list(xt.ravel().astype(int))
    assert len(ids) == len(set(ids))  # no sample in two agents or in train and test
    assert np.all(y[ids] == np.concatenate(
        [np.r_[s.agent_data(t).y[:, :50].ravel(), s.test_data(t)[1]]
         for t in range(3)]))  # fmt: skip


def test_forgetting_and_average_hand_computed():
    nan = np.nan
    r = np.array([[0.9, nan, nan], [0.5, 0.8, nan], [0.3, 0.6, 0.7]])
    # task 0: max(.9, .5) - .3 = .6; task 1: .8 - .6 = .2.
    assert crun.forgetting(r) == pytest.approx(0.4)
    assert crun.forgetting(r[:1, :1]) is None
    prev = {"w": jnp.array([1.0])}
    agents = {"w": jnp.array([[3.0], [5.0]])}
    avg = cons.average_params(prev, agents, jnp.float32(2.0))
    assert float(avg["w"][0]) == pytest.approx((2 * 1 + 3 + 5) / 4)


@pytest.mark.parametrize("method", ["average", "finetune", "joint"])
def test_baselines_run(method, tmp_path):
    out = crun.run(tiny(method=method, num_tasks=2), str(tmp_path))
    r = out["acc_matrix"]
    assert len(r) == 2 and r[0][1] is None
    assert 0.0 <= out["final_avg_acc"] <= 1.0
    if method == "joint":
        assert r[0][0] is None and out["forgetting"] is None
        assert len(out["records"]) == 1
    else:
        assert r[0][0] is not None and out["forgetting"] is not None
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["final_avg_acc"] == out["final_avg_acc"]
    # Task-aware accuracy (argmax within the task's classes, a subset of the seen
    # classes holding the true one) can only be >= the class-incremental one.
    for row, row_task in zip(r, summary["task_aware_acc_matrix"], strict=True):
        for v, w in zip(row, row_task, strict=True):
            assert (v is None) == (w is None)
            assert v is None or w >= v
    assert summary["task_aware_final_avg_acc"] >= out["final_avg_acc"] - 1e-6


# --- run outputs: the shared run writer ------------------------------------------


def _tb_scalars(workdir) -> dict:
    """``tag -> [(step, value)]`` of the TensorBoard event files, read with
    tensorboardX's protobufs from the TFRecord framing (length u64, CRC u32,
    payload, CRC u32): no TensorFlow import."""
    import glob
    import struct

    from tensorboardX.proto import event_pb2

    out = {}
    for path in sorted(glob.glob(str(workdir / "tensorboard" / "events.out.*"))):
        data, pos = open(path, "rb").read(), 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + n])
            pos += 12 + n + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def test_run_writes_through_the_shared_run_writer(tmp_path, monkeypatch):
    """A continual run's records go through ``run_output.RunWriter``: each
    task's record is on disk (flushed) when the writer returns, while the run
    holds the workdir lock; metrics.csv, timing.jsonl and the TensorBoard series
    hold the same numbers; the lock is released at the end, and a finished run
    is not overwritten without ``overwrite``."""
    import csv

    from demjax import run_output

    work = tmp_path / "run"
    seen = []
    real = run_output.RunWriter.metrics

    def metrics(self, record):
        real(self, record)
        lines = (work / "metrics.jsonl").read_text().splitlines()  # another handle
        seen.append((json.loads(lines[-1]), len(lines), (work / ".lock").read_text()))

    monkeypatch.setattr(run_output.RunWriter, "metrics", metrics)
    config = tiny(method="average", num_tasks=2, tensorboard=True)
    out = crun.run(config, str(work))
    records = out["records"]
    assert [(r, n) for r, n, _ in seen] == [(records[0], 1), (records[1], 2)]
    for _, _, lock in seen:  # held by this process during the run
        assert json.loads(lock)["pid"] == os.getpid()
    assert (work / ".lock").read_text() == ""  # released
    jsonl = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    assert jsonl == records and [r["task"] for r in records] == [0, 1]
    with open(work / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    for row, rec in zip(rows, records, strict=True):
        assert float(row["avg_acc"]) == rec["avg_acc"]
        assert json.loads(row["acc"]) == rec["acc"]  # lists as JSON text
    timing = [json.loads(x) for x in (work / "timing.jsonl").read_text().splitlines()]
    assert [t["task"] for t in timing] == [0, 1]
    for t, rec in zip(timing, records, strict=True):
        assert t["wall_s"] == rec["wall_s"]
        assert 0 < t["train_s"] and 0 <= t["consolidate_s"]
        assert t["train_s"] + t["consolidate_s"] <= t["wall_s"] + 0.01
    tb = _tb_scalars(work)
    for tag, want in (
        ("avg_acc", [(0, records[0]["avg_acc"]), (1, records[1]["avg_acc"])]),
        ("acc/0", [(0, records[0]["acc"][0]), (1, records[1]["acc"][0])]),
        ("acc/1", [(1, records[1]["acc"][1])]),
        ("agent_acc/1", [(0, records[0]["agent_acc"][1]),
                         (1, records[1]["agent_acc"][1])]),
    ):  # fmt: skip
        assert [s for s, _ in tb[tag]] == [s for s, _ in want], tag
        np.testing.assert_allclose([v for _, v in tb[tag]], [v for _, v in want],
                                   rtol=1e-6)  # fmt: skip
    before = (work / "metrics.jsonl").read_bytes()
    with pytest.raises(ConfigError, match=r"already holds a continual run.*overwr"):
        crun.run(config, str(work))
    assert (work / "metrics.jsonl").read_bytes() == before
    assert (work / ".lock").read_text() == ""


_HOLD_LOCK = """
import fcntl, json, os, socket, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                         "since": "then"}).encode())
print("locked", flush=True)
sys.stdin.readline()
"""
"""Holds a workdir's lock the way ``run_output.lock_workdir`` does, until stdin
gets a line: another run in progress."""


def test_a_second_run_on_a_locked_workdir_is_refused(tmp_path):
    import subprocess
    import sys

    work = tmp_path / "run"
    work.mkdir()
    (work / "metrics.jsonl").write_text("{}\n")  # the other run's
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(work / ".lock")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        for overwrite in (False, True):
            with pytest.raises(ConfigError) as err:
                crun.run(tiny(num_tasks=2), str(work), overwrite=overwrite)
            msg = str(err.value)
            assert f"in use by process {holder.pid} " in msg and "\n" not in msg
        assert (work / "metrics.jsonl").read_text() == "{}\n"
    finally:
        holder.communicate("\n", timeout=60)
    assert holder.returncode == 0


# --- config errors -----------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("method", "ewc", r"method='ewc' is not valid; accepted: dac, logit, "
         r"finetune, average, joint"),
        ("proxy", "gan", r"proxy='gan' is not valid; accepted: crops, noise, dataset"),
        ("student_init", "x", r"student_init='x' is not valid; accepted: previous, "
         r"agents, average"),
        ("alpha", -1.0, r"alpha=-1\.0 is not valid; accepted: a finite number "
         r"in \[0\.0"),
        ("alpha", float("inf"), r"alpha=inf is not valid; accepted: a finite"),
        ("consolidation_lr", float("nan"), r"consolidation_lr=nan is not valid"),
        ("num_tasks", 0, r"num_tasks=0 is not valid; accepted: an integer >= 1"),
        ("crop_min_scale", 0.0, r"crop_min_scale=0\.0 is not valid; accepted"),
        ("hidden", (), r"hidden=\(\) is not valid; accepted: a non-empty tuple"),
        ("proxy_noise", "pink", r"proxy_noise='pink' is not valid; accepted: "
         r"uniform, gaussian"),
        ("dataset", "svhn", r"dataset='svhn' is not valid; accepted: digits, "),
        ("student_logits", "softmax", r"student_logits='softmax' is not valid; "
         r"accepted: raw, centred"),
        ("init", "xavier", r"init='xavier' is not valid; accepted: flax, torch"),
    ],
)  # fmt: skip
def test_bad_field_names_field_and_accepted_values(field, value, match):
    c = tiny()
    c[field] = value
    with pytest.raises(ConfigError, match=match):
        validate(c)


def test_public_functions_name_their_arguments():
    """Raw-argument errors of the public functions are ``ValueError``s naming the
    argument, not config errors (the config was checked once, by validate)."""
    model = make_model("mlp", 10, (8,), "patches")
    cases = [
        (lambda: ProxySource("gan", (8, 8, 1)),
         r"^kind='gan' is not valid; accepted: crops, noise, dataset$"),
        (lambda: ProxySource("noise", (8, 8, 1), jitter=1.0), r"^jitter=1\.0 is not"),
        (lambda: cons.Consolidator(model, steps=0, batch=8, lr=1e-3, alpha=1.0),
         r"^steps=0 is not valid; accepted: an integer >= 1$"),
        (lambda: cons.Consolidator(model, steps=1, batch=8, lr=1e-3, alpha=1.0,
                                   student_init="mean"),
         r"^student_init='mean' is not valid; accepted: previous, agents, average$"),
    ]  # fmt: skip
    for call, match in cases:
        with pytest.raises(ValueError, match=match) as err:
            call()
        assert not isinstance(err.value, ConfigError)


def test_bad_combinations_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"num_tasks=6 x classes_per_task=2 exceeds"):
        crun.run(tiny(num_tasks=6), str(tmp_path / "a"))
    c = tiny(proxy="dataset", proxy_dataset="digits")
    for check in (lambda: validate(c), lambda: make_proxy(c, (8, 8, 1))):
        with pytest.raises(ConfigError, match=r"proxy_dataset='digits' is the scen"):
            check()
    c = tiny(proxy="dataset", proxy_dataset="imagenet")
    with pytest.raises(
        ConfigError, match=r"proxy_dataset='imagenet' is not valid; accepted: digits"
    ):
        validate(c)


# --- entry point ---------------------------------------------------------------------


@pytest.mark.cli(
    continual=TINY_FLAGS, continual_bad=[TINY_FLAGS[0], "--config.method=ewc"]
)
def test_scripts_run_continual_config(cli):
    ok, bad = cli["continual"], cli["continual_bad"]
    assert ok.returncode == 0, ok.stderr
    assert "continual dac on Split digits: 2 tasks" in ok.stdout
    assert "final average accuracy" in ok.stdout
    summary = json.loads((ok.workdir / "summary.json").read_text())
    assert len(summary["acc_matrix"]) == 2 and summary["method"] == "dac"
    cfg = json.loads((ok.workdir / "config.json").read_text())
    assert cfg["consolidation_steps"] == 20 and cfg["scenario"] == "continual"
    assert bad.returncode == 2
    assert "error: method='ewc' is not valid; accepted: dac, logit" in bad.stderr


def test_crop_proxy_samples_are_standardized_crops_of_one_image():
    proxy = make_proxy(tiny(proxy="crops"), (8, 8, 1))
    assert proxy.bank.shape[0] == 1 and proxy.bank.shape[-1] == 3  # one RGB image
    x = np.asarray(jax.jit(proxy.sample, static_argnums=1)(jax.random.PRNGKey(0), 16))
    assert x.shape == (16, 8, 8, 1) and np.isfinite(x).all()
    assert abs(x.mean()) < 1e-4 and abs(x.std() - 1.0) < 1e-2
    assert np.std(x.reshape(16, -1).mean(axis=1)) > 0.05  # crops differ
