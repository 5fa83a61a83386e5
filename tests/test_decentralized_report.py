"""benchmarks/decentralized.py: the replica table and its noise verdicts from
hand-made results, the setup check, and a --quick run as a subprocess."""

import json
import os
import subprocess
import sys

import pytest
from helpers import xla_flags

from demjax.run_output import replica_summary

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks import decentralized as dc  # noqa: E402


def test_values_mean_std_and_difference_hand_computed():
    a, b = [0.80, 0.82, 0.84], [0.79, 0.80, 0.81]
    # mean .82, std (ddof 1) .02
    assert dc.values_mean_std(a) == "0.820 +/- 0.020"
    assert dc.values_mean_std([0.5]) == "0.500 +/- 0.000"
    # .82 - .80 = .02; two standard errors 2 * sqrt(.02^2 / 3 + .01^2 / 3) = .0258
    assert dc.values_difference(a, b) == "+0.020 (within noise)"
    # .82 - .71 = .11 > 2 * sqrt(.02^2 / 3 + .01^2 / 3)
    low = [0.70, 0.71, 0.72]
    assert dc.values_difference(a, low) == "+0.110 (beyond noise)"
    assert dc.values_difference(low, a) == "-0.110 (beyond noise)"
    assert dc.values_difference(a, [0.8]) == "-"


def _run(c_spe, mean_acc, p10_acc):
    """A stored run of 2 evaluated rounds (0, 10) and len(c_spe) seeds: C-SPE of
    seed r at the two rounds is ``c_spe[r]``; C-GEN = C-SPE / 2."""
    recs = [
        {"round": t, "point": "sync", "replica": r, "c_spe": v, "c_gen": v / 2,
         "global_acc": None}
        for r, vals in enumerate(c_spe)
        for t, v in zip((0, 10), vals, strict=True)
    ]  # fmt: skip
    reps = len(c_spe)
    return {
        "final": {"c_spe": sum(v[-1] for v in c_spe) / reps, "c_gen": 0.0},
        "mean_acc": sum(mean_acc) / reps,
        "p10_acc": sum(p10_acc) / reps,
        "acc_replicas": {"mean_acc": mean_acc, "p10_acc": p10_acc},
        "wall_s": 30.0,
        "num_rounds": 11,
        "per_round": recs,
        "replicas": {"seeds": list(range(reps)), **replica_summary(recs, reps)},
    }


def test_replica_report_and_verdicts(tmp_path):
    sgp = _run([[0.5, 0.80], [0.6, 0.82], [0.7, 0.84]], [0.80, 0.82, 0.84],
               [0.60, 0.62, 0.64])  # fmt: skip
    # C-SPE best: seed 0 .85 at round 0, the others at round 10.
    da = _run([[0.85, 0.79], [0.5, 0.80], [0.6, 0.81]], [0.79, 0.80, 0.81],
              [0.70, 0.72, 0.74])  # fmt: skip
    mtl = _run([[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]], [0.5, 0.5, 0.5], [0.4, 0.4, 0.4])
    sgp["final"].update(bytes_up=4.6162e9, bytes_down=4.6162e9)  # 4,616.2 MB
    runs = {"directed/sgp": sgp, "directed/pdbo_da": da, "directed/pdbo_mtl": mtl}
    results = {"runs": runs, "setup": {"network_base": "complete", "replicas": 3}}
    dc.report(results, str(tmp_path), "decentralized_regime")
    md = (tmp_path / "decentralized_regime.md").read_text()
    rows = {x.split(" | ")[1]: x for x in md.splitlines() if x.startswith("| directed")}
    # SGP: mean acc .82 +/- .02, p10 .62 +/- .02, C-SPE final .82 +/- .02 (best
    # = final, round 10 for every seed), C-GEN final .41 +/- .01, the final
    # round's traffic in MB, 30 s / 11 rounds.
    assert rows["SGP"] == (
        "| directed | SGP | 3 | 0.820 +/- 0.020 | 0.620 +/- 0.020 | 0.820 +/- 0.020 "
        "| 0.820 +/- 0.020 | 10/10/10 | 0.410 +/- 0.010 | 4,616.2 / 4,616.2 | 2.73 |"
    )
    # PDBO-DA: C-SPE final .79/.80/.81; best .85 (round 0), .80, .81: mean .82,
    # std sqrt(((.03)^2 + (.02)^2 + (.01)^2) / 2) = .0265.
    assert rows["PDBO-DA"] == (
        "| directed | PDBO-DA | 3 | 0.800 +/- 0.010 | 0.720 +/- 0.020 | "
        "0.800 +/- 0.010 | 0.820 +/- 0.026 | 0/10/10 | 0.400 +/- 0.005 | - | 2.73 |"
    )
    assert "Complete base graph" in md
    # Best PDBO (PDBO-DA, mean .80) against SGP (.82): -.02 within two standard
    # errors (.0258); p10 +.10 beyond (2 * sqrt(.02^2 / 3 * 2) = .0327).
    assert "(PDBO-DA, mean 0.800 +/- 0.010, p10 0.720 +/- 0.020) is level with SGP " \
        "within the noise in mean accuracy" in md  # fmt: skip
    assert "mean accuracy -0.020 (within noise), p10 +0.100 (beyond noise), " \
        "final C-SPE -0.020 (within noise) (3 seeds;" in md  # fmt: skip
    # An SGP far below: PDBO-DA beats it beyond the noise.
    runs["directed/sgp"] = _run([[0.5, 0.70], [0.6, 0.71], [0.7, 0.72]],
                                [0.70, 0.71, 0.72], [0.60, 0.62, 0.64])  # fmt: skip
    dc.report(results, str(tmp_path), "decentralized_regime")
    md = (tmp_path / "decentralized_regime.md").read_text()
    assert "beats SGP beyond the noise in mean accuracy" in md
    assert "mean accuracy +0.090 (beyond noise)" in md
    # ... and far above: SGP is better beyond the noise.
    runs["directed/sgp"] = _run([[0.5, 0.90], [0.6, 0.91], [0.7, 0.92]],
                                [0.90, 0.91, 0.92], [0.60, 0.62, 0.64])  # fmt: skip
    dc.report(results, str(tmp_path), "decentralized_regime")
    md = (tmp_path / "decentralized_regime.md").read_text()
    assert "does not beat SGP (SGP is better beyond the noise)" in md
    assert (tmp_path / "decentralized_regime.png").stat().st_size > 1000


def test_single_seed_report_unchanged(tmp_path):
    """The stored single-seed table: the report rebuilt from its JSON is the
    stored report."""
    with open(os.path.join(REPO, "benchmarks", "results", "decentralized.json")) as f:
        results = json.load(f)
    dc.report(results, str(tmp_path))
    stored = os.path.join(REPO, "benchmarks", "results", "decentralized.md")
    with open(stored) as f:
        assert (tmp_path / "decentralized.md").read_text() == f.read()


def test_setup_mismatch():
    with open(os.path.join(REPO, "benchmarks", "results", "decentralized.json")) as f:
        stored = json.load(f)["setup"]  # recorded with 3 seeds per row
    argv = ["--hidden=64", "--num_rounds=30", "--samples_per_agent=100",
            "--hgp_steps=5"]  # fmt: skip
    three = dc.setup_of(dc.parse_args([*argv, "--replicas=3"]))
    assert dc.setup_mismatch(stored, three) == ""
    one = dc.setup_of(dc.parse_args(argv))
    assert dc.setup_mismatch(stored, one) == "replicas=3"
    paper = dc.parse_args(["--regime=paper"])
    assert (paper.replicas, paper.base, paper.networks) == (3, "complete", "directed")
    assert (paper.hgp_steps, paper.outer_every, paper.val_fraction) == (50, 10, 0.0)
    changed = dc.setup_mismatch(dc.setup_of(paper), three)
    regime = dc.REGIMES["paper"]
    assert changed.startswith(
        f"num_agents={regime['num_agents']}, num_rounds=100, samples_per_agent="
        f"{regime['samples_per_agent']}, network_base='complete', pdbo="
    )


@pytest.mark.slow(seconds=60)
def test_quick_run_and_refused_mismatch(tmp_path):
    """--quick: 2 seeds of SGP, PDBO-DA and FedAvg in the workdir; each seed's
    per-agent accuracies pooled give its own final C-SPE; a rerun with another
    --replicas is refused in one line."""
    env = dict(os.environ, XLA_FLAGS=xla_flags(), PYTHONPATH=REPO)
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "decentralized.py"),
           "--quick", "--only=sgp,pdbo_da,fedavg", "--networks=directed",
           "--quiet", f"--workdir={tmp_path}"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "quick"
    results = json.loads((out / "decentralized.json").read_text())
    assert results["setup"]["replicas"] == 2 and results["setup"]["quick"]
    assert set(results["runs"]) == {"directed/sgp", "directed/pdbo_da", "none/fedavg"}
    for r in results["runs"].values():
        assert len(r["per_agent_acc"]) == 2 and len(r["per_agent_acc"][0]) == 6
        c_spe = r["replicas"]["points"]["sync"]["c_spe"]["final"]["values"]
        assert r["c_spe_check"] == pytest.approx(c_spe, abs=1e-5)
        assert len(r["acc_replicas"]["mean_acc"]) == 2
    md = (out / "decentralized.md").read_text()
    assert "| directed | SGP | 2 |" in md and "(2 seeds;" in md
    proc = subprocess.run([*cmd, "--replicas=1"], capture_output=True, text=True,
                          timeout=120, env=env)  # fmt: skip
    assert proc.returncode == 1
    err = proc.stderr.strip().splitlines()
    assert err[-1].startswith("error: stored runs in ") and "replicas=2" in err[-1]
