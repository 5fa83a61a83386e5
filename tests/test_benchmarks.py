"""Benchmark scripts' pure parts: report writing and flop counts (no long runs)."""

import importlib.util
import json
import os

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


def test_flops_per_agent_step_hand_computed():
    scaling = load("scaling")
    # MLP 784-100-10, batch 20: 3 (fwd + bwd) x 2 x 20 x (78,400 + 1,000) MACs.
    assert scaling.flops_per_agent_step("mlp", 20) == 3 * 2 * 20 * 79_400
    assert scaling.flops_per_agent_step("mlr", 1) == 3 * 2 * 7_840


def test_continual_report_states_verdicts_and_matrices(tmp_path):
    bench = load("continual")
    run = lambda m, acc: {  # noqa: E731
        "dataset": "fmnist", "method": m, "final_avg_acc": acc, "forgetting": 0.5,
        "acc_matrix": [[0.9, None], [0.2, acc]], "wall_s": 3.0,
        "forward_transfer": {"agent_acc_from_consolidated": [0.9, 0.8],
                             "agent_acc_from_scratch": [0.9, 0.6], "mean_gain": 0.2},
    }  # fmt: skip
    results = {
        "runs": {
            "fmnist/dac": run("dac", 0.42),
            "fmnist/finetune": run("finetune", 0.2),
            "fmnist/average": run("average", 0.48),
            "fmnist/dac_alpha10": run("dac", 0.45),
        },
        "settings": {"set": {"consolidation_steps": 300}},
    }
    bench.report(results, str(tmp_path))
    md = (tmp_path / "continual.md").read_text()
    assert "DAC beats fine-tuning: final average accuracy 0.420 vs 0.200" in md
    assert (
        "DAC does NOT beat model averaging: final average accuracy 0.420 vs 0.480" in md
    )
    assert "`consolidation_steps=300`" in md
    # own-task accuracy from consolidated .85, from scratch .75, gain +.2
    assert "| dac | 0.420 | - | 0.500 | 0.850 | 0.750 | +0.200 | 0.421 |" in md
    assert "| dac_alpha10 | alpha = 10 | 0.450 | +0.030 | - |" in md
    assert "| 1 | 0.200 | 0.420 |" in md
    assert (tmp_path / "continual.png").stat().st_size > 1000


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


def test_robustness_summary_and_report(tmp_path):
    rob = load("robustness")
    cases = rob.cases(quick=False, seeds=3)
    # 5 methods x (1 clean + 6 attacks x 3 fractions) x 3 seeds.
    assert len(cases) == 5 * 19 * 3 == len(set(cases))
    runs = {}
    for seed, (clean, hit) in enumerate([(0.80, 0.40), (0.82, 0.50), (0.78, 0.60)]):
        for attack, fraction, acc in (("none", 0.0, clean), ("ipm", 0.2, hit)):
            runs[rob.run_key("fedavg_mean", attack, fraction, seed)] = {
                "method": "fedavg_mean", "attack": attack, "fraction": fraction,
                "seed": seed, "global_acc": acc, "c_spe": acc, "wall_s": 1.0,
            }  # fmt: skip
    summary = rob.summarize(runs)
    mean, std, n = summary[("fedavg_mean", "ipm", 0.2)]["global_acc"]
    assert (mean, n) == (pytest.approx(0.5), 3)
    assert std == pytest.approx(0.1)  # sample std of .4, .5, .6
    results = {"runs": runs, "date": "2026-01-01", "commit": "abc1234",
               "environment": {"cpu_model": "Test CPU"}}  # fmt: skip
    rob.write_md(results, str(tmp_path / "r.md"), analysis="Holds.")
    md = (tmp_path / "r.md").read_text()
    assert "| fedavg_mean | ipm | 0.800 ± 0.020 | 0.500 ± 0.100 |" in md
    assert "abc1234" in md and "Test CPU" in md and md.rstrip().endswith("Holds.")
