"""Benchmark scripts' pure parts: report writing and flop counts (no long runs)."""

import importlib.util
import json
import os

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name):
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(REPO, "benchmarks", f"{name}.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_paper_report_table_and_plot(tmp_path):
    paper = load("paper_fmnist")
    rec = lambda r, p, g: {  # noqa: E731
        "round": r, "point": p, "c_spe": 0.9, "c_gen": 0.5, "g_gen_l1": 0.6,
        "g_gen_l3": 0.7, "global_acc": g,
    }  # fmt: skip
    results = {
        "runs": {
            "fedavg": {
                "final": rec(1, "sync", 0.75),
                "final_local": rec(1, "local", 0.75),
                "wall_s": 12.0,
                "num_rounds": 2,
                "per_round": [rec(0, "sync", 0.5), rec(1, "sync", 0.75)],
            }
        }
    }
    paper.report(results, str(tmp_path))
    md = (tmp_path / "paper_fmnist.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| fedavg"))
    # C-SPE/C-GEN sync and local, top-level G-GEN (l3), Global, the reference.
    assert "| 0.900 | 0.500 | 0.900 | 0.500 | 0.700 | 0.750 |" in row
    assert "0.988 / 0.463 / 0.781" in row
    # Best evaluated sync round: Global .75 at round 1 (C-SPE, C-GEN tie: round 0).
    assert "| fedavg | 2 | 0.900 (0) | 0.500 (0) | 0.750 (1) |" in md
    assert (tmp_path / "paper_fmnist.png").stat().st_size > 1000


def test_paper_partial_run_from_workdir(tmp_path):
    """A stopped run's workdir: records up to the last sync round, its rounds and
    the sum of their round times, marked partial (shown as stopped)."""
    paper = load("paper_fmnist")
    rec = lambda r, p, g: {"round": r, "point": p, "c_spe": 0.9, "c_gen": g,  # noqa: E731
                           "global_acc": g}  # fmt: skip
    lines = [rec(0, "local", 0.1), rec(0, "sync", 0.2), rec(5, "local", 0.3),
             rec(5, "sync", 0.4), rec(10, "local", 0.5)]  # fmt: skip
    (tmp_path / "metrics.jsonl").write_text("".join(
        paper.json.dumps(r) + "\n" for r in lines))  # fmt: skip
    timing = [{"round": -1}] + [{"round": r, "round_s": 2.0} for r in range(11)]
    (tmp_path / "timing.jsonl").write_text("".join(
        paper.json.dumps(t) + "\n" for t in timing))  # fmt: skip
    run = paper.partial_run("demlearn_p", str(tmp_path), 5)
    assert run["num_rounds"] == 6 and run["partial"]
    assert run["final"]["c_gen"] == 0.4 and run["final_local"]["c_gen"] == 0.3
    assert run["wall_s"] == 12.0 and len(run["per_round"]) == 4
    paper.report({"runs": {"demlearn_p": run}}, str(tmp_path))
    md = (tmp_path / "paper_fmnist.md").read_text()
    assert "| demlearn_p | 6 (stopped) | 0.900 (0) | 0.400 (5) | 0.400 (5) |" in md


def test_paper_partial_seeded_run_from_workdir(tmp_path):
    """A stopped ``--replicas`` run: means and the replica summary over the
    stored rounds (hand-computed), seeds from its config, shown as stopped in the
    seeds table; a workdir whose records disagree with ``replicas`` is refused."""
    paper = load("paper_fmnist")
    rec = lambda r, p, q, v: {"round": r, "point": p, "replica": q, "c_spe": v,  # noqa: E731
                              "c_gen": v / 2, "global_acc": v / 2}  # fmt: skip
    lines = [rec(r, p, q, v) for r, vals in ((0, (0.6, 0.8)), (5, (0.2, 0.4)))
             for p in ("local", "sync") for q, v in enumerate(vals)]  # fmt: skip
    lines.append(rec(10, "local", 0, 0.1))  # round 10 never reached sync
    (tmp_path / "metrics.jsonl").write_text("".join(
        paper.json.dumps(r) + "\n" for r in lines))  # fmt: skip
    (tmp_path / "timing.jsonl").write_text("".join(
        paper.json.dumps({"round": r, "round_s": 3.0}) + "\n" for r in range(11)))
    (tmp_path / "config.json").write_text('{"seed": 7, "replicate_split": false}')
    run = paper.partial_run("demlearn_p_amplify", str(tmp_path), 5, replicas=2)
    assert run["partial"] and run["num_rounds"] == 6 and run["wall_s"] == 18.0
    assert run["final"]["c_spe"] == pytest.approx(0.3)  # mean of .2, .4 at round 5
    s = run["replicas"]
    assert s["seeds"] == [7, 8]
    best = s["points"]["sync"]["c_spe"]["best"]
    assert best["values"] == pytest.approx([0.6, 0.8]) and best["rounds"] == [0, 0]
    assert s["points"]["sync"]["c_spe"]["final"]["std"] == pytest.approx(
        np.std([0.2, 0.4], ddof=1), abs=1e-6)  # fmt: skip
    md_lines = paper.replica_table({"demlearn_p_amplify": run})
    row = next(x for x in md_lines if x.startswith("| demlearn_p_amplify"))
    assert row.startswith("| demlearn_p_amplify | 2 | 6 (stopped) | 0.300 +/- 0.141 |")
    with pytest.raises(ValueError, match="replica field"):
        paper.partial_run("demlearn_p_amplify", str(tmp_path), 5, replicas=1)


def test_flops_per_agent_step_hand_computed():
    scaling = load("scaling")
    # MLP 784-100-10, batch 20: 3 (fwd + bwd) x 2 x 20 x (78,400 + 1,000) MACs.
    assert scaling.flops_per_agent_step("mlp", 20) == 3 * 2 * 20 * 79_400
    assert scaling.flops_per_agent_step("mlr", 1) == 3 * 2 * 7_840


def test_paired_difference_and_seed_stats_hand_computed():
    common = load("common")
    # .40 .44 .48 vs .20 .25 .21: differences .20 .19 .27, mean .22, sample std
    # sqrt(((-.02)^2 + (-.03)^2 + .05^2) / 2) = sqrt(.0019) = .043589,
    # se = .043589 / sqrt(3) = .025166; .22 > 2 se = .050332: beyond noise.
    d = common.paired_difference([0.40, 0.44, 0.48], [0.20, 0.25, 0.21])
    assert d["n"] == 3 and d["mean"] == pytest.approx(0.22)
    assert d["std"] == pytest.approx(0.0019**0.5)
    assert d["se"] == pytest.approx(0.0019**0.5 / 3**0.5)
    assert d["beyond_noise"] is True
    assert common.format_paired(d) == "+0.220 (2 SE 0.050, beyond noise)"
    # Differences +.05, -.03, +.01: mean .01, std .04, se .023094 > .005: within.
    d = common.paired_difference([0.50, 0.40, 0.30], [0.45, 0.43, 0.29])
    assert d["mean"] == pytest.approx(0.01) and d["std"] == pytest.approx(0.04)
    assert d["beyond_noise"] is False
    assert common.format_paired(d) == "+0.010 (2 SE 0.046, within noise)"
    # A pair with a missing side is left out; one pair: no noise estimate.
    d = common.paired_difference([0.5, None], [0.3, 0.1])
    assert (d["n"], d["se"], d["beyond_noise"]) == (1, None, None)
    assert common.format_paired(d) == "+0.200 (1 seed)"
    st = common.seed_stats([0.3, None, 0.5, 0.4])
    assert (st["n"], st["mean"], st["std"]) == (3, pytest.approx(0.4),
                                                pytest.approx(0.1))  # fmt: skip
    assert common.format_stats(st) == "0.400 +/- 0.100"
    assert common.format_stats(common.seed_stats([0.37])) == "0.370"
    assert common.format_stats(common.seed_stats([None])) == "-"
    assert common.format_stats(common.seed_stats([100.0, 120.0]), ".0f") == (
        "110 +/- 14"
    )


def _continual_run(method, seed, acc, rows=None, ft=True):
    """A stored continual run of 2 tasks: ``rows`` the average accuracy after
    each task (the records), ``acc`` the final one."""
    rows = rows or [0.9, acc]
    return {
        "dataset": "fmnist", "method": method, "seed": seed,
        "overrides": {"method": method}, "set": {"consolidation_steps": 300},
        "final_avg_acc": acc, "forgetting": 0.5, "task_aware_final_avg_acc": 0.99,
        "acc_matrix": [[rows[0], None], [0.2, 2 * acc - 0.2]], "wall_s": 3.0 + seed,
        "records": [{"task": t, "avg_acc": v} for t, v in enumerate(rows)],
        "forward_transfer": None if not ft else {
            "agent_acc_from_consolidated": [0.9, 0.8],
            "agent_acc_from_scratch": [0.9, 0.6], "mean_gain": 0.2},
    }  # fmt: skip


def test_continual_report_over_seeds_with_paired_verdicts(tmp_path):
    bench = load("continual")
    runs = {}
    # DAC .42/.44/.46, fine-tuning .20/.25/.21 (differences .22/.19/.25: mean .22,
    # std .03, 2 SE .034641: beats, beyond noise); averaging .48/.40/.52
    # (differences -.06/+.04/-.06: mean -.026667, std .057735, 2 SE .066667:
    # level, within noise); logit-only .30/.31/.32 (differences .12/.13/.14:
    # mean .13, std .01, 2 SE .011547: beats, beyond noise).
    for seed, (dac, ft, avg, logit) in enumerate(
        [(0.42, 0.20, 0.48, 0.30), (0.44, 0.25, 0.40, 0.31), (0.46, 0.21, 0.52, 0.32)]
    ):
        # DAC's best average accuracy: .95 after task 0 on seeds 0, 2; on seed 1
        # the final .44 is above the .40 after task 0.
        rows = [0.40, 0.44] if seed == 1 else [0.95, dac]
        for m, acc, r in (("dac", dac, rows), ("finetune", ft, None),
                          ("average", avg, None), ("logit", logit, None)):  # fmt: skip
            runs.setdefault(f"fmnist/{m}", {})[str(seed)] = _continual_run(
                m, seed, acc, r, ft=m != "finetune")  # fmt: skip
    runs["fmnist/dac_alpha10"] = {
        str(s): {**_continual_run("dac", s, a, ft=False),
                 "overrides": bench.RUNS["fmnist/dac_alpha10"][1]}
        for s, a in ((0, 0.45), (1, 0.47))
    }  # fmt: skip
    results = {"runs": runs, "settings": {"set": {"consolidation_steps": 300}}}
    summary = bench.report(results, str(tmp_path))
    md = (tmp_path / "continual.md").read_text()
    s = summary["fmnist/dac"]
    assert s["seeds"] == [0, 1, 2]
    assert s["per_seed"]["final_avg_acc"] == [0.42, 0.44, 0.46]
    assert s["per_seed"]["best_avg_acc"] == [0.95, 0.44, 0.95]
    assert s["per_seed"]["best_after_task"] == [0, 1, 0]
    assert s["stats"]["final_avg_acc"]["mean"] == pytest.approx(0.44)
    assert s["stats"]["final_avg_acc"]["std"] == pytest.approx(0.02)
    # best: mean .78, std sqrt((.17^2 * 2 + .34^2) / 2) = .294449
    assert s["stats"]["best_avg_acc"]["std"] == pytest.approx(0.294449, abs=1e-6)
    assert s["stats"]["forward_transfer"]["mean"] == pytest.approx(0.2)
    assert s["stats"]["wall_s"]["mean"] == pytest.approx(4.0)
    assert summary["fmnist/finetune"]["stats"]["forward_transfer"]["n"] == 0
    # own-task accuracy from consolidated .85, from scratch .75, gain +.2, each
    # the same on every seed (std 0); wall 3, 4, 5 s.
    assert (
        "| dac | 3 | 0.440 +/- 0.020 | 0.780 +/- 0.294 (after 0/1/0) "
        "| 0.990 +/- 0.000 | 0.500 +/- 0.000 | 0.850 +/- 0.000 | 0.750 +/- 0.000 "
        "| +0.200 +/- 0.000 | 0.421 | 4 +/- 1 |"
    ) in md
    assert "| finetune | 3 | 0.220 +/- 0.026 |" in md
    assert (
        "- On Split Fashion-MNIST, DAC beats fine-tuning, beyond the noise: final "
        "average accuracy 0.440 +/- 0.020 vs 0.220 +/- 0.026 (seeds 0-2), paired "
        "difference +0.220, two standard errors 0.035." in md
    )
    assert (
        "- On Split Fashion-MNIST, DAC and model averaging are level, within the "
        "noise: final average accuracy 0.440 +/- 0.020 vs 0.467 +/- 0.061 "
        "(seeds 0-2), paired difference -0.027, two standard errors 0.067." in md
    )
    assert (
        "DAC beats logit-only distillation, beyond the noise: final average "
        "accuracy 0.440 +/- 0.020 vs 0.310 +/- 0.010 (seeds 0-2), paired difference "
        "+0.130, two standard errors 0.012." in md
    )
    assert "`consolidation_steps=300`" in md
    # alpha 10 on seeds 0-1 vs DAC there: differences .03, .03 (std 0: beyond).
    assert (
        "| dac_alpha10 | alpha = 10 | 2 | 0.460 +/- 0.014 | +0.030 (2 SE 0.000, "
        "beyond noise) |" in md
    )
    # Mean accuracy matrix of DAC: row 1 = .2 and 2 * mean(acc) - .2 = .68.
    assert "**fmnist/dac** (seeds 0-2)" in md and "| 1 | 0.200 | 0.680 |" in md
    assert (tmp_path / "continual.png").stat().st_size > 1000


def test_continual_verdict_does_not_beat_and_one_seed():
    bench = load("continual")
    runs = {"digits/dac": {}, "digits/average": {}, "digits/finetune": {}}
    for seed, (dac, avg) in enumerate([(0.30, 0.50), (0.35, 0.49), (0.32, 0.55)]):
        runs["digits/dac"][str(seed)] = _continual_run("dac", seed, dac)
        runs["digits/average"][str(seed)] = _continual_run("average", seed, avg)
    runs["digits/finetune"]["1"] = _continual_run("finetune", 1, 0.2, ft=False)
    out = bench.verdict(bench.summarize(runs), "digits")
    # Differences -.20, -.14, -.23: mean -.19, std .045826, 2 SE .052915.
    assert out == [
        "- On Split digits, DAC vs fine-tuning: final average accuracy 0.350 vs "
        "0.200 (seed 1), paired difference +0.150; one seed, no noise verdict.",
        "- On Split digits, DAC does NOT beat model averaging, beyond the noise: "
        "final average accuracy 0.323 +/- 0.025 vs 0.513 +/- 0.032 (seeds 0-2), "
        "paired difference -0.190, two standard errors 0.053.",
    ]


def test_continual_stored_runs_per_seed_and_settings_check():
    bench = load("continual")
    extra = {"consolidation_steps": 400, "proxy_batch": 64}
    old = {"method": "dac", "overrides": {"method": "dac"}, "set": extra,
           "final_avg_acc": 0.37}  # fmt: skip
    results = bench.migrate({"runs": {
        "fmnist/dac": old,  # no seed field: seed 0
        "fmnist/dac_centred_student_seed1": {
            **old, "overrides": {"method": "dac", "student_logits": "centred",
                                 "seed": 1, "forward_transfer": False}},
        # other settings than fmnist/dac (forward transfer off): not reported
        "fmnist/dac_seed2": {**old, "overrides": {"method": "dac", "seed": 2,
                                                   "forward_transfer": False}},
    }})  # fmt: skip
    runs = results["runs"]
    assert sorted(runs) == ["fmnist/dac", "fmnist/dac_centred_student"]
    assert runs["fmnist/dac"]["0"]["seed"] == 0
    assert (
        runs["fmnist/dac_centred_student"]["1"]["overrides"]
        == (bench.RUNS["fmnist/dac_centred_student"][1])
    )
    assert list(results["unreported"]) == ["fmnist/dac_seed2"]
    assert bench.migrate(results)["runs"] == runs  # idempotent
    assert bench.mismatch(runs["fmnist/dac"]["0"], "fmnist/dac", extra) is None
    assert bench.mismatch(runs["fmnist/dac"]["0"], "fmnist/dac", {}) == (
        "--set {'consolidation_steps': 400, 'proxy_batch': 64} (current: {})"
    )
    assert "overrides" in bench.mismatch(runs["fmnist/dac"]["0"],
                                         "fmnist/logit", extra)  # fmt: skip


@pytest.mark.slow(seconds=45)  # a subprocess: 3 driver calls, 2 seeds
def test_continual_quick_driver_end_to_end(tmp_path):
    """``--quick`` as a subprocess: Split digits, 2 tasks, 2 seeds, into the
    workdir; a second call reuses every stored run; a stored run with other
    settings is refused in one line."""
    import subprocess
    import sys

    script = os.path.join(REPO, "benchmarks", "continual.py")
    cmd = [sys.executable, script, "--quick", f"--workdir={tmp_path}",
           "--only=digits/dac,digits/average,digits/finetune"]  # fmt: skip
    stored = os.path.join(REPO, "benchmarks", "results", "continual.json")
    mtime = os.path.getmtime(stored) if os.path.exists(stored) else None
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    results = json.loads((tmp_path / "continual.json").read_text())
    assert sorted(results["runs"]["digits/dac"]) == ["0", "1"]
    assert results["settings"]["set"]["num_tasks"] == 2
    s = results["summary"]["digits/dac"]
    assert s["seeds"] == [0, 1] and len(s["per_seed"]["final_avg_acc"]) == 2
    assert s["stats"]["final_avg_acc"]["n"] == 2
    md = (tmp_path / "continual.md").read_text()
    assert "| dac | 2 |" in md and "(seeds 0-1)" in md
    assert (os.path.getmtime(stored) if os.path.exists(stored) else None) == mtime
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "digits/dac seed 1: stored" in again.stderr
    refused = subprocess.run(cmd + ["--set=consolidation_steps=6"],
                             capture_output=True, text=True, timeout=120)  # fmt: skip
    assert refused.returncode != 0
    msg = refused.stderr.strip().splitlines()
    assert len(msg) == 1 and msg[0].startswith("error: stored run digits/dac seed 0")


def test_baselines_tiny_run_records_every_implementation(tmp_path):
    """A tiny MLP run end to end (an explicit plan, the per-agent JAX loop and, when
    torch is installed, the 1-thread PyTorch loop): one record each, the ratios
    against the references, the stored entry and its Markdown table."""
    import importlib.util
    import json

    bench = load("baselines")
    out = tmp_path / "baselines.json"
    has_torch = importlib.util.find_spec("torch") is not None
    bench.main([
        "--model=mlp", "--agents=3", "--steps=2", "--batch=2", "--samples=2",
        "--plans=sequential", "--repeats=1", "--torch_threads=1",
        f"--out={out}",
    ] + ([] if has_torch else ["--no_torch"]))  # fmt: skip
    entry = json.loads(out.read_text())["runs"]["mlp/3"]
    names = [r["impl"] for r in entry["records"]]
    assert names[:2] == ["demjax:sequential", "jax_per_agent_loop"]
    assert len(names) == 2 + has_torch
    assert all(n.startswith("torch_sequential") for n in names[2:])
    assert entry["workload"]["agent_steps"] == 3 * 2
    assert entry["workload"]["local_epochs"] == 2
    for r in entry["records"]:
        assert r["agent_steps_per_s"] > 0 and r["cpu_model"]
        rate = r["agent_steps"] / r["best_s"]  # best_s is rounded
        assert abs(r["agent_steps_per_s"] - rate) <= 0.02 * rate
    loop = next(r for r in entry["records"] if r["impl"] == "jax_per_agent_loop")
    assert loop["over_jax_loop"] == 1.0
    assert len(entry["load_avg_1min"]) == 2
    assert entry["outside_load"] is None or 0.0 <= entry["outside_load"] <= 1.0
    md = (tmp_path / "baselines.md").read_text()
    assert "## mlp, 3 agents" in md and "| jax_per_agent_loop |" in md
    assert "load average" in md
    if entry["outside_load"] is not None:
        assert "of the machine's CPU time during them" in md


def test_baselines_report_marks_the_timings_at_scale(tmp_path):
    """The stored Xeon results' search tables: exactly the records timed at
    scale carry the marker, with their population and steps."""
    import json

    bench = load("baselines")
    path = os.path.join(REPO, "benchmarks", "results", "baselines_xeon.json")
    with open(path) as f:
        results = json.load(f)
    scaled = [t for e in results["runs"].values() if e.get("auto")
              for t in e["auto"].get("table", []) if t.get("at_scale")]  # fmt: skip
    assert scaled, "the stored MLP 1,000 / 10,000 searches timed finalists at scale"
    bench.report(results, str(tmp_path / "b.md"))
    md = (tmp_path / "b.md").read_text()
    rows = [line for line in md.splitlines() if "*at scale* |" in line]
    assert len(rows) == len(scaled)
    # the report orders the workloads newest first: compare as multisets
    cells = sorted(row.split(" | ")[0] + f" | {row.split(' | ')[3]} | "
                   f"{row.split(' | ')[4]}" for row in rows)  # fmt: skip
    want = sorted(f"| {t['plan']} *at scale* | {t['agents']} | {t['steps']}"
                  for t in scaled)  # fmt: skip
    assert cells == want


def test_baselines_torch_cnn_matches_the_flax_cnn():
    """The PyTorch CNN has the paper CNN's layers and parameter count."""
    torch = __import__("pytest").importorskip("torch")
    import math

    import jax

    from demjax import models

    bench = load("baselines")
    net = bench.torch_models("cnn", 10)
    flax_params = jax.eval_shape(
        lambda k: models.init_params(k, models.make_model("cnn", 10), (28, 28, 1)),
        jax.random.PRNGKey(0),
    )
    n_flax = sum(math.prod(v.shape) for v in jax.tree.leaves(flax_params))
    assert sum(p.numel() for p in net.parameters()) == n_flax == 834_922
    assert net(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert bench.effective_block(0, 10, 4) == 4  # all, capped by memory
    assert bench.effective_block(16, 10, 10) == 0  # a block of all agents
    assert bench.effective_block(1, 10, 4) == 1


def test_tuning_grid_choice_and_a_validation_run(tmp_path):
    tune = load("tune")
    # Every combination, in grid order.
    got = tune.points({"lr": (0.1, 0.2), "ditto.lam": (1.0, 2.0)})
    assert got == [
        {"lr": 0.1, "ditto.lam": 1.0},
        {"lr": 0.1, "ditto.lam": 2.0},
        {"lr": 0.2, "ditto.lam": 1.0},
        {"lr": 0.2, "ditto.lam": 2.0},
    ]
    # Highest mean final validation C-SPE; the first point on ties.
    scored = [{"val_c_spe": v} for v in (0.5, 0.7, 0.7, 0.6)]
    assert tune.choose(scored) is scored[1]
    from configs import default

    c = default.get_config()
    tune.apply(c, {"lr": 0.2, "ditto.lam": 2.0})
    assert (c.lr, c.ditto.lam) == (0.2, 2.0)
    with pytest.raises(KeyError, match="ditto.nope"):
        tune.apply(c, {"ditto.nope": 1.0})
    # One grid point, two seeds (replicas of one run), end to end: scores come from the validation rows.
    tune.GRIDS["fedavg"] = {"lr": (0.05,)}
    tune.main([
        "--only=fedavg", "--splits=pathological", "--dataset=digits",
        "--num_agents=4", "--model=mlp", "--num_rounds=1", "--eval_every=1",
        "--seeds=2", f"--out_dir={tmp_path}", "--quiet",
    ])  # fmt: skip
    results = json.loads((tmp_path / "tuning.json").read_text())
    chosen = results["chosen"]["pathological/fedavg"]
    assert chosen["params"] == {"lr": 0.05} and 0.0 <= chosen["val_c_spe"] <= 1.0
    per_seed = chosen["val_c_spe_per_seed"]
    assert len(per_seed) == 2 and chosen["val_c_spe"] == pytest.approx(
        sum(per_seed) / 2
    )
    assert results["setup"]["val_fraction"] == 0.2
    assert "| pathological | fedavg | lr=0.05 |" in (tmp_path / "tuning.md").read_text()
    # A one-value axis has no edge; the smallest / largest value of a longer one does.
    assert "| 1 | - |" in (tmp_path / "tuning.md").read_text()
    # A grown grid runs only its new point, and every save (a killed run keeps the
    # last one) still holds the stored point that the loop has not reached yet.
    saves, real_save = [], tune.save_results

    def save(path, res):
        saves.append([dict(e) for e in res["points"]["pathological/fedavg"]])
        real_save(path, res)

    tune.save_results = save
    tune.GRIDS["fedavg"] = {"lr": (0.02, 0.05)}
    tune.main([
        "--only=fedavg", "--splits=pathological", "--dataset=digits",
        "--num_agents=4", "--model=mlp", "--num_rounds=1", "--eval_every=1",
        "--seeds=2", f"--out_dir={tmp_path}", "--quiet",
    ])  # fmt: skip
    assert [e["params"]["lr"] for e in saves[0]] == [0.02, 0.05]
    assert saves[0][1] == results["points"]["pathological/fedavg"][0]
    grown = json.loads((tmp_path / "tuning.json").read_text())
    assert len(grown["points"]["pathological/fedavg"]) == 2
    # --lr_grid replaces the learning-rate axis of every grid that has one.
    tune.main([
        "--only=fedavg", "--splits=pathological", "--dataset=digits",
        "--num_agents=4", "--model=mlp", "--num_rounds=1", "--eval_every=1",
        "--seeds=2", f"--out_dir={tmp_path}", "--quiet", "--lr_grid=0.05,0.3",
    ])  # fmt: skip
    wide = json.loads((tmp_path / "tuning.json").read_text())
    assert wide["grids"]["fedavg"] == {"lr": [0.05, 0.3]}
    assert [e["params"]["lr"] for e in wide["points"]["pathological/fedavg"]] == [
        0.05,
        0.3,
    ]
    stored = grown["points"]["pathological/fedavg"][1]
    assert wide["points"]["pathological/fedavg"][0] == stored  # not run again
    ditto = tune.grid_of("ditto", (0.01,))
    assert ditto == {"lr": (0.01,), "ditto.lam": tune.GRIDS["ditto"]["ditto.lam"]}
    assert tune.GRIDS["ditto"]["lr"] == tune.LR_GRID  # not changed by the override
    assert "lr" not in tune.grid_of("perfedavg", (0.01,))
    assert tune.parse_lr_grid("") == () and tune.parse_lr_grid("0.1, 1") == (0.1, 1.0)
    for bad in ("0", "-0.1", "x", "nan", "0.1,inf"):
        with pytest.raises(ValueError, match=r"--lr_grid=.* accepted: a comma list"):
            tune.parse_lr_grid(bad)
    with pytest.raises(SystemExit, match=r"error: --lr_grid='0' is not valid"):
        tune.main(["--only=fedavg", "--lr_grid=0", f"--out_dir={tmp_path}"])
    grid = {"lr": (0.1, 0.02, 0.05), "ditto.lam": (1.0,), "x": (1, 2)}
    assert tune.at_edge(grid, {"lr": 0.05, "ditto.lam": 1.0, "x": 2}) == ["x=max"]
    assert tune.at_edge(grid, {"lr": 0.02, "x": 1}) == ["lr=min", "x=min"]
    assert tune.at_edge(grid, {"lr": 0.1}) == ["lr=max"]


def test_robustness_summary_and_report(tmp_path):
    rob = load("robustness")
    cases = rob.cases(quick=False, seeds=3)
    # 5 methods x (1 clean + 6 attacks x 3 fractions) x 3 seeds.
    assert len(cases) == 5 * 19 * 3 == len(set(cases))
    runs = {}
    for seed, (clean, hit) in enumerate([(0.80, 0.40), (0.82, 0.50), (0.78, 0.60)]):
        for attack, fraction, acc in (("none", 0.0, clean), ("ipm", 0.2, hit)):
            # Per-round curve: the attacked runs peak at round 1 (0.70, 0.72,
            # 0.74 for seeds 0, 1, 2; seed 1 ties at rounds 1 and 2), the clean
            # ones end at their best.
            curve = ([0.30, 0.70 + 0.02 * seed, 0.72 if seed == 1 else 0.65, acc]
                     if attack == "ipm" else [0.30, 0.50, 0.60, acc])  # fmt: skip
            runs[rob.run_key("fedavg_mean", attack, fraction, seed)] = {
                "method": "fedavg_mean", "attack": attack, "fraction": fraction,
                "seed": seed, "global_acc": acc, "c_spe": acc, "wall_s": 1.0,
                "curve": {"round": [0, 1, 2, 3], "global_acc": curve, "c_spe": curve},
            }  # fmt: skip
    summary = rob.summarize(runs)
    mean, std, n = summary[("fedavg_mean", "ipm", 0.2)]["global_acc"]
    assert (mean, n) == (pytest.approx(0.5), 3)
    assert std == pytest.approx(0.1)  # sample std of .4, .5, .6
    mean, std, n, rounds = summary[("fedavg_mean", "ipm", 0.2)]["global_acc_best"]
    assert (mean, std, n) == (pytest.approx(0.72), pytest.approx(0.02), 3)
    assert rounds == [1, 1, 1]  # the first of seed 1's two equal bests
    assert summary[("fedavg_mean", "none", 0.0)]["global_acc_best"][3] == [3, 3, 3]
    results = {"runs": runs, "date": "2026-01-01", "commit": "abc1234",
               "environment": {"cpu_model": "Test CPU"}}  # fmt: skip
    rob.write_md(results, str(tmp_path / "r.md"), analysis="Holds.")
    md = (tmp_path / "r.md").read_text()
    assert "| fedavg_mean | ipm | 0.800 ± 0.020 | 0.500 ± 0.100 |" in md
    assert "| fedavg_mean | ipm | 0.800 ± 0.020 (3/3/3) | 0.720 ± 0.020 (1/1/1) |" in md
    assert "abc1234" in md and "Test CPU" in md and md.rstrip().endswith("Holds.")
    # Runs stored without curves: final tables only, no best table.
    for r in runs.values():
        del r["curve"]
    rob.write_md(results, str(tmp_path / "r2.md"))
    md2 = (tmp_path / "r2.md").read_text()
    assert "0.500 ± 0.100 |" in md2 and "Best round" not in md2


def test_robustness_force_does_not_skip_the_runs_it_replaces(tmp_path):
    """With --force the stored robustness.json holds the runs being replaced:
    only this invocation's part files count as done."""
    rob = load("robustness")
    (tmp_path / "robustness.json").write_text(json.dumps({"runs": {"a": {}}}))
    (tmp_path / "robustness.part0.json").write_text(json.dumps({"runs": {"b": {}}}))
    assert set(rob.stored_runs(str(tmp_path), force=False)) == {"a", "b"}
    assert set(rob.stored_runs(str(tmp_path), force=True)) == {"b"}


def replica_run_summary(curves: dict) -> dict:
    """``(summary, records)``: a ``replicas.json`` summary and its records from
    hand-made curves ``{point: {metric: [[value per round] per seed]}}`` (seeds
    0 .. R-1, rounds 0 .. T-1)."""
    from demjax.run_output import replica_summary

    first = next(iter(next(iter(curves.values())).values()))
    reps, rounds = len(first), len(first[0])
    recs = [
        {"round": t, "point": p, "replica": q,
         **{m: v[q][t] for m, v in metrics.items()}}
        for p, metrics in curves.items() for q in range(reps) for t in range(rounds)
    ]  # fmt: skip
    return {"seeds": list(range(reps)), **replica_summary(recs, reps)}, recs


def test_paper_replica_table_mean_std_best_and_reference_noise(tmp_path):
    """paper_fmnist --replicas: mean +/- std of the final and best rounds at both
    points, the seeds' best rounds, and the mean's difference to the logged
    reference run against two standard deviations of the seeds."""
    paper = load("paper_fmnist")
    sync = [[0.80, 0.82], [0.84, 0.83], [0.78, 0.81]]  # 3 seeds x 2 rounds
    summary, recs = replica_run_summary({
        "sync": {"c_spe": sync, "c_gen": sync, "global_acc": sync},
        "local": {"c_spe": [[0.95, 0.98], [0.96, 0.99], [0.99, 0.97]],
                  "c_gen": [[0.40, 0.50], [0.45, 0.51], [0.47, 0.49]],
                  "global_acc": sync},
    })  # fmt: skip
    dem, dem_recs = replica_run_summary({
        p: {"c_spe": sync, "c_gen": sync, "g_gen_l1": sync,
            "g_gen_l3": [[0.5, 0.6]] * 3, "global_acc": sync}
        for p in ("sync", "local")
    })  # fmt: skip
    single = {"final": {"round": 1, "point": "sync", "c_spe": 0.9, "c_gen": 0.5,
                        "global_acc": 0.75},
              "final_local": {"round": 1, "point": "local", "c_spe": 0.9,
                              "c_gen": 0.5, "global_acc": 0.75},
              "wall_s": 12.0, "num_rounds": 2,
              "per_round": [{"round": 1, "point": "sync", "c_spe": 0.9,
                             "c_gen": 0.5, "global_acc": 0.75}]}  # fmt: skip
    entry = lambda s, r: {"final": {}, "final_local": {}, "wall_s": 12.0,  # noqa: E731
                          "num_rounds": 2, "per_round": r, "replicas": s}  # fmt: skip
    results = {"runs": {"fedavg": single},
               "replica_runs": {"fedavg": entry(summary, recs),
                                "demlearn": entry(dem, dem_recs)}}  # fmt: skip
    paper.report(results, str(tmp_path))
    md = (tmp_path / "paper_fmnist.md").read_text()
    # The single-seed tables are unchanged.
    assert "| fedavg | 2 | 0.900 | 0.500 | 0.900 | 0.500 | - | 0.750 |" in md
    rows = [x for x in md.splitlines() if x.startswith("| fedavg | 3 |")]
    # sync: finals .82/.83/.81 -> .820 +/- .010; bests .82 (round 1), .84 (0),
    # .81 (1) -> .8233 +/- .0153. local C-SPE finals .98/.99/.97 -> .980 +/- .010,
    # bests .98 (1), .99 (1), .99 (0) -> .9867 +/- .0058; local C-GEN .50/.51/.49
    # -> .500 +/- .010 (all at round 1). Against the reference .988 / .463 / .781
    # (C-SPE, C-GEN at `local`, Global at `sync`): -0.8 within 2 x .010, +3.7 and
    # +3.9 beyond it.
    assert rows == [
        "| fedavg | 3 | 2 | 0.820 +/- 0.010 | 0.823 +/- 0.015 (1/0/1) | "
        "0.820 +/- 0.010 | 0.823 +/- 0.015 (1/0/1) | 0.980 +/- 0.010 | "
        "0.987 +/- 0.006 (1/1/0) | 0.500 +/- 0.010 | 0.500 +/- 0.010 (1/1/1) | - | "
        "0.820 +/- 0.010 | 0.823 +/- 0.015 (1/0/1) | 0.988 / 0.463 / 0.781 | "
        "-0.8 (within noise) / +3.7 (beyond noise) / +3.9 (beyond noise) | 12 |"
    ]
    row = next(x for x in md.splitlines() if x.startswith("| demlearn | 3 |"))
    # The top group level (l3, not l1) and no reference.
    assert row.endswith("| 0.600 +/- 0.000 | 0.820 +/- 0.010 | "
                        "0.823 +/- 0.015 (1/0/1) | - | - | 12 |")  # fmt: skip
    assert "two standard deviations of our seeds" in md
    assert (tmp_path / "paper_fmnist.png").stat().st_size > 1000


def test_paper_replicas_refused_when_mixed_or_timed(tmp_path):
    """Runs with seeds are stored apart from the single-seed runs, all of one
    setup (else refused without --force); --timing stays single-seed."""
    paper = load("paper_fmnist")
    with pytest.raises(SystemExit, match="single-seed"):
        paper.main(["--timing", "--replicas=2", f"--workdir={tmp_path}"])
    quick = tmp_path / "quick"
    quick.mkdir()
    (quick / "paper_fmnist.json").write_text(json.dumps({
        "runs": {}, "replica_runs": {"fedavg": {}},
        "replica_setup": {"replicas": 2, "num_rounds": 2, "eval_every": 1,
                          "quick": True},
    }))  # fmt: skip
    with pytest.raises(SystemExit, match="stored replica_runs used replicas=2"):
        paper.main(["--quick", "--replicas=3", f"--workdir={tmp_path}"])


def test_ablations_replica_table_difference_to_base(tmp_path):
    """ablations_fmnist --replicas: each row's final and best C-SPE / C-GEN /
    Global as mean +/- std over the seeds, and its final minus the base row's
    with the two-standard-error verdict; the single-seed rows as before."""
    abl = load("ablations_fmnist")
    c_spe = [[0.5, 0.7], [0.9, 0.8]]  # 2 seeds x 2 rounds
    base, _ = replica_run_summary({"sync": {
        "c_spe": c_spe, "c_gen": [[v / 2 for v in s] for s in c_spe],
        "global_acc": c_spe,
    }})  # fmt: skip
    other, _ = replica_run_summary({"sync": {
        "c_spe": [[0.5, 0.5], [0.5, 0.52]], "c_gen": [[0.25, 0.25], [0.25, 0.26]],
        "global_acc": [[0.6, 0.7], [0.6, 0.78]],
    }})  # fmt: skip
    row = lambda o, s, n=2: {"overrides": o, "num_rounds": n, "final": {},  # noqa: E731
                             "wall_s": 3.0, "per_round": [], "replicas": s}  # fmt: skip
    results = {
        "rows": {"base": {"overrides": {}, "num_rounds": 100, "wall_s": 318.5,
                          "final": {"c_spe": 0.957, "c_gen": 0.73,
                                    "global_acc": 0.8}}},
        "replica_rows": {"base": row({}, base), "alpha_0.5": row({"alpha": 0.5}, other),
                         "tau_5": row({"tau": 5}, other, n=4)},
    }  # fmt: skip
    abl.write_md(results, str(tmp_path / "a.md"))
    md = (tmp_path / "a.md").read_text().splitlines()
    assert "| base | {} | 100 | 0.957 | 0.730 | 0.800 | 318 |" in md
    # Base finals .7/.8 -> .750 +/- .071, bests .7 (round 1) and .9 (0) -> .800
    # +/- .141; C-GEN half of them.
    assert (
        "| base | {} | 2 | 2 | 0.750 +/- 0.071 | 0.800 +/- 0.141 (1/0) | "
        "0.375 +/- 0.035 | 0.400 +/- 0.071 (1/0) | 0.750 +/- 0.071 | "
        "0.800 +/- 0.141 (1/0) | - | - | - | 3 |"
    ) in md
    # C-SPE .51 - .75 = -.24 > 2 sqrt(.0707^2/2 + .0141^2/2) = .102; C-GEN .255 -
    # .375 = -.12 > 2 sqrt(.0354^2/2 + .0071^2/2) = .051; Global .74 - .75 =
    # -.01 < 2 sqrt(.0707^2/2 + .0566^2/2) = .128.
    assert (
        '| alpha_0.5 | {"alpha": 0.5} | 2 | 2 | 0.510 +/- 0.014 | '
        "0.510 +/- 0.014 (0/1) | 0.255 +/- 0.007 | 0.255 +/- 0.007 (0/1) | "
        "0.740 +/- 0.057 | 0.740 +/- 0.057 (1/1) | -0.240 (beyond noise) | "
        "-0.120 (beyond noise) | -0.010 (within noise) | 3 |"
    ) in md
    # Other rounds than the base row: no difference.
    tau = next(x for x in md if x.startswith("| tau_5 |"))
    assert tau.endswith("| - | - | - | 3 |")


def test_difference_to_single_run():
    from benchmarks.common import difference_to_single

    s, _ = replica_run_summary({"sync": {"c_spe": [[0.80], [0.82], [0.84]]}})
    # mean .82, std .02: .77 is 5 points off (> 2 std = .04), .81 one point.
    assert difference_to_single(s, 0.77, "c_spe") == "+0.050 (beyond noise)"
    assert difference_to_single(s, 0.81, "c_spe", scale=100, digits=1) == (
        "+1.0 (within noise)"
    )
    assert difference_to_single(s, 0.8, "c_gen") == "-"
    one, _ = replica_run_summary({"sync": {"c_spe": [[0.80]]}})
    assert difference_to_single(one, 0.5, "c_spe") == "-"


@pytest.mark.slow(seconds=45)  # a subprocess: 2 runs of 2 seeds, 2 rounds
@pytest.mark.parametrize(
    "script, only, row",
    [("paper_fmnist", "demlearn_p,fedavg", "| fedavg | 2 | 2 |"),
     ("ablations_fmnist", "base,alpha_0.5", '| alpha_0.5 | {"alpha": 0.5} | 2 | 2 |')],
)  # fmt: skip
def test_quick_replicas_smoke(tmp_path, script, only, row):
    """``--quick --replicas=2``: two runs of 2 seeds end to end in under a minute
    of CPU time, results in WORKDIR/quick (never benchmarks/results)."""
    import resource
    import subprocess
    import sys
    import time

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", f"{script}.py"), "--quick",
         "--replicas=2", f"--only={only}", f"--workdir={tmp_path}"],
        capture_output=True, text=True, timeout=600,
        env=dict(os.environ, PYTHONPATH=REPO),
    )  # fmt: skip
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # CPU seconds (wall seconds depend on other jobs on the cores).
    assert cpu < 60, f"{cpu:.0f} s of CPU time ({wall:.0f} s wall)"
    stored = json.loads((tmp_path / "quick" / f"{script}.json").read_text())
    section = stored["replica_runs" if script == "paper_fmnist" else "replica_rows"]
    assert sorted(section) == sorted(only.split(","))
    assert all(len(r["replicas"]["seeds"]) == 2 for r in section.values())
    assert stored["replica_setup"]["quick"] is True
    md = (tmp_path / "quick" / f"{script}.md").read_text()
    assert any(x.startswith(row) for x in md.splitlines()), md


def test_personalized_tables_show_the_final_rounds_traffic(tmp_path):
    """MB up / down of the final round (bytes / 10^6) in both table kinds, '-'
    for a run stored without traffic."""
    cp = load("compare_personalized")
    assert cp.traffic_cell({"bytes_up": 6360800.0, "bytes_down": 133069600.0}) == (
        "6.4 / 133.1"
    )
    assert cp.traffic_cell({"bytes_up": None, "bytes_down": 1.0}) == "-"
    assert cp.traffic_cell({}) == "-"
    rec = {"round": 0, "point": "sync", "c_spe": 0.9, "c_gen": 0.5, "global_acc": None}
    run = {"final": dict(rec, bytes_up=2.5e6, bytes_down=5e6), "per_round": [rec],
           "wall_s": 2.0, "num_rounds": 1}  # fmt: skip
    cp.report({"runs": {"pathological/ditto": run}}, str(tmp_path))
    md = (tmp_path / "compare_personalized.md").read_text()
    assert "| ditto | 0.900 | 0.500 | - | 2.5 / 5.0 | 2.00 | 1 |" in md, md
    seeds = {"seeds": [0, 1], "points": {"sync": {
        m: {"final": {"mean": 0.9, "std": 0.01, "values": [0.89, 0.91]},
            "best": {"mean": 0.9, "std": 0.01, "values": [0.89, 0.91],
                     "rounds": [0, 0]}}
        for m in ("c_spe", "c_gen", "global_acc")}}}  # fmt: skip
    run["replicas"] = seeds
    cp.report({"runs": {"pathological/ditto": run}}, str(tmp_path))
    row = next(x for x in (tmp_path / "compare_personalized.md").read_text()
               .splitlines() if x.startswith("| ditto |"))  # fmt: skip
    assert row.endswith("| 2.5 / 5.0 | 2.00 | 1 |"), row


def test_baselines_report_shows_each_run_of_a_resumed_search(tmp_path):
    """With ``--search_runs`` the report lists each consecutive run's choice
    (source, search time, cut or not) and marks the records an earlier run
    timed as *earlier run*."""
    import copy
    import json

    bench = load("baselines")
    path = os.path.join(REPO, "benchmarks", "results", "baselines_xeon.json")
    with open(path) as f:
        entry = copy.deepcopy(json.load(f)["runs"]["mlp/100"])
    entry["auto"]["runs"] = [
        {"plan": "all", "block_size": 0, "conv_impl": "patches",
         "matmul_impl": "xla", "source": "measured", "search_s": 3.31,
         "complete": False},
        {"plan": "block:8", "block_size": 8, "conv_impl": "patches",
         "matmul_impl": "wgrad_t", "source": "resumed", "search_s": 3.5,
         "complete": True},
        {"plan": "block:8", "block_size": 8, "conv_impl": "patches",
         "matmul_impl": "wgrad_t", "source": "cache", "search_s": None,
         "complete": None},
    ]  # fmt: skip
    for t in entry["auto"]["table"]:
        t.pop("resumed", None)
    entry["auto"]["table"][0]["resumed"] = True
    bench.report({"runs": {"mlp/100": entry}}, str(tmp_path / "b.md"))
    md = (tmp_path / "b.md").read_text()
    assert (
        "run 1 `all` (measured, 3.3 s, cut by the budget); run 2 `block:8` / "
        "`wgrad_t` (resumed, 3.5 s); run 3 `block:8` / `wgrad_t` (cache)."
    ) in md
    first = entry["auto"]["table"][0]
    assert f"| {first['plan']} *earlier run* |" in md
    assert md.count("*earlier run* |") == 1


@pytest.mark.slow(seconds=8)  # one 2-round smoke run of the driver
def test_driver_starts_a_run_stopped_before_its_first_checkpoint_anew(tmp_path):
    """A row whose earlier invocation stopped before its first checkpoint left
    results without a checkpoint: the driver starts it anew (nothing to
    resume) instead of refusing; with a checkpoint it resumes."""
    from benchmarks.common import start_anew

    cp = load("compare_personalized")
    dead = tmp_path / "quick" / "pathological" / "fedavg"
    dead.mkdir(parents=True)
    (dead / "metrics.jsonl").write_text('{"round": 0, "point": "sync"}\n')
    (dead / "config.json").write_text("{}")
    assert start_anew(str(dead), force=False)
    cp.main(["--quick", "--only=fedavg", "--splits=pathological",
             f"--workdir={tmp_path}"])  # fmt: skip
    stored = json.loads((tmp_path / "quick" / "compare_personalized.json").read_text())
    assert stored["runs"]["pathological/fedavg"]["num_rounds"] == 2
    lines = (dead / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["round"] for x in lines][-1] == 1  # the new run's
    (dead / "checkpoints" / "1").mkdir(parents=True)
    assert not start_anew(str(dead), force=False) and start_anew(str(dead), True)


def test_drivers_cpu_devices_flag(tmp_path):
    """``--cpu_devices`` of the comparison drivers: a bad count is refused
    naming the flag before any run; ``compare_personalized`` with 2 CPU devices
    (a subprocess: the count is fixed when JAX starts) records the count with
    each run."""
    import subprocess
    import sys

    for script in ("compare_personalized", "tune", "paper_fmnist", "ablations_fmnist",
                   "continual", "decentralized"):  # fmt: skip
        argv = ["--cpu_devices=-1", f"--out_dir={tmp_path}"]
        if script != "tune":
            argv.append(f"--workdir={tmp_path}")
        with pytest.raises(SystemExit, match=r"--cpu_devices=-1 is not valid"):
            load(script).main(argv)
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "compare_personalized.py"),
         "--quick", "--cpu_devices=2", "--only=fedavg", "--splits=pathological",
         f"--workdir={tmp_path}"],
        capture_output=True, text=True, timeout=600,
        env=dict(os.environ, PYTHONPATH=REPO),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    stored = json.loads((tmp_path / "quick" / "compare_personalized.json").read_text())
    assert stored["runs"]["pathological/fedavg"]["cpu_devices"] == 2


def test_eval_devices_smoke(tmp_path):
    """``benchmarks/eval_devices.py``: one JSON line per k with both timings on
    two CPU devices (a subprocess: the device count is fixed when JAX starts);
    one device is refused naming the flag."""
    import subprocess
    import sys

    script = os.path.join(REPO, "benchmarks", "eval_devices.py")
    with pytest.raises(SystemExit, match=r"--cpu_devices=1 is not valid"):
        load("eval_devices").main(["--cpu_devices=1"])
    proc = subprocess.run(
        [sys.executable, script, "--model=mlr", "--agents=4", "--samples=500",
         "--ks=1,2", "--repeats=1"],
        capture_output=True, text=True, timeout=600,
        env=dict(os.environ, PYTHONPATH=REPO),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    assert [r["k"] for r in lines] == [1, 2]
    for r in lines:
        assert r["devices"] == 2 and r["one_device_s"] > 0 and r["devices_s"] > 0
        assert r["ratio"] == pytest.approx(r["one_device_s"] / r["devices_s"], rel=0.02)
