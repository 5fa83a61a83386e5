"""Benchmark scripts' pure parts: report writing and flop counts (no long runs)."""

import importlib.util
import os

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
    assert (tmp_path / "paper_fmnist.png").stat().st_size > 1000


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
