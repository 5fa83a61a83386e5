"""Shared by the benchmark scripts: resumable JSON results, environment record,
replica columns (mean +/- std over ``--replicas`` seeds), per-seed statistics and
the two-standard-error noise verdict on differences (independent seeds:
``difference``; the same seeds, paired: ``paired_difference``)."""

from __future__ import annotations

import json
import os
import platform
import sys


def load_results(path: str) -> dict:
    """The stored ``{"runs": {...}}`` of a resumable benchmark (empty if none)."""
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {"runs": {}}


def save_results(path: str, obj: dict) -> None:
    """Writes JSON atomically (a crash never leaves a truncated results file)."""
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


def start_anew(workdir: str, force: bool) -> bool:
    """``overwrite`` for a driver's run in ``workdir``: True with ``--force``
    or when the workdir holds no checkpoint (an earlier invocation stopped
    before its first checkpoint: nothing to resume, its partial files are
    replaced); False resumes from the newest checkpoint."""
    from demjax.checkpoint import has_checkpoint

    return bool(force) or not has_checkpoint(workdir)


def environment() -> dict:
    """Device and versions, printed and stored with every benchmark."""
    import jax

    return {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": len(jax.devices()),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "cpu_model": cpu_model(),
    }


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``) and whether it has AVX-512.

    Machines of the same kind differ (an AVX-512 Xeon runs float32 GEMMs about twice
    as fast as an AVX2 EPYC), so every timing is stored with the CPU it ran on.
    """
    try:
        with open("/proc/cpuinfo") as fh:
            info = fh.read()
    except OSError:
        return platform.processor() or "unknown"
    name = next(
        (ln.split(":", 1)[1].strip() for ln in info.splitlines()
         if ln.startswith("model name")),
        "unknown",
    )  # fmt: skip
    return f"{name} ({'avx512' if 'avx512f' in info else 'no avx512'})"


def add_replicas_flag(parser) -> None:
    """``--replicas=R``: each run is R seeds (``seed`` .. ``seed + R - 1``) in one
    program (``config.num_replicas``); tables report mean +/- std over them."""
    parser.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="seeds per run, in one program (config.num_replicas); tables give "
        "mean +/- std over them",
    )


def add_cpu_devices_flag(parser, extra: str = "") -> None:
    """``--cpu_devices=D``: CPU devices JAX exposes (``scripts/run.py
    --cpu_devices``; read with ``apply_cpu_devices`` before any JAX operation)."""
    parser.add_argument(
        "--cpu_devices",
        type=int,
        default=1,
        help="CPU devices JAX exposes (0 = one per core, as scripts/run.py "
        "--cpu_devices; default 1): with several, each run measures whether its "
        "agents train sharded over them or on one device (metrics equal to float "
        "tolerance)" + extra,
    )


def apply_cpu_devices(args) -> int:
    """Sets ``args.cpu_devices`` (before any JAX operation) and returns the
    device count; exits with the flag's error on a value that is not accepted."""
    if args.cpu_devices == 1:
        return 1
    from demjax import sharding
    from demjax.errors import ConfigError

    try:
        return sharding.set_cpu_devices(args.cpu_devices)
    except ConfigError as e:
        sys.exit(f"error: {e}")


def _entry(summary, metric, which, point="sync"):
    """A run summary's ``points[point][metric][which]`` entry, or None."""
    return (((summary or {}).get("points", {}).get(point, {}) or {}).get(metric) or {}
            ).get(which)  # fmt: skip


def mean_std(summary: dict | None, metric: str, which: str, point: str = "sync"):
    """``"0.812 +/- 0.004"`` of ``metric`` at ``point`` from a run's
    ``replicas.json`` summary (``demjax.run_output.replica_summary``);
    ``which``: ``final`` or ``best`` (each replica's best round); "-" when the
    metric is absent (e.g. no global model)."""
    e = _entry(summary, metric, which, point)
    return "-" if e is None else f"{e['mean']:.3f} +/- {e['std']:.3f}"


def best_rounds(summary: dict | None, metric: str, point: str = "sync") -> str:
    """``"90/90/60"``: the round of each seed's best ``metric`` ("-" if absent)."""
    e = _entry(summary, metric, "best", point)
    return "-" if e is None else "/".join(str(r) for r in e["rounds"])


def difference(summary, reference, metric: str, which: str = "final",
               point: str = "sync") -> str:  # fmt: skip
    """``"+0.175 (beyond noise)"``: mean of ``summary`` minus mean of ``reference``
    (two runs' ``replicas.json`` summaries) at ``which`` (``final``/``best``).

    "beyond noise" when the difference exceeds two standard errors of a difference
    of two means over independent seeds (Welch: ``sqrt(s1^2/n1 + s2^2/n2)``, ``s``
    the seeds' standard deviation, ddof 1), else "within noise"; "-" when either
    run lacks the metric or has a single seed."""
    a = _entry(summary, metric, which, point)
    b = _entry(reference, metric, which, point)
    if a is None or b is None or len(a["values"]) < 2 or len(b["values"]) < 2:
        return "-"
    d = a["mean"] - b["mean"]
    se = (a["std"] ** 2 / len(a["values"]) + b["std"] ** 2 / len(b["values"])) ** 0.5
    verdict = "beyond noise" if abs(d) > 2 * se else "within noise"
    return f"{d:+.3f} ({verdict})"


def mean_curve(records: list[dict], metric: str, point: str = "sync"):
    """``(rounds, values)``: the mean over replicas of ``metric`` per round at
    ``point`` (records without a ``replica`` field: the values themselves)."""
    by_round: dict[int, list[float]] = {}
    for r in records:
        if r["point"] == point and r.get(metric) is not None:
            by_round.setdefault(r["round"], []).append(float(r[metric]))
    rounds = sorted(by_round)
    return rounds, [sum(by_round[t]) / len(by_round[t]) for t in rounds]


def seed_stats(values) -> dict:
    """``{"n", "mean", "std"}`` of one metric's per-seed values (``None`` entries,
    e.g. a metric a run does not measure, are left out); ``std``: sample standard
    deviation (ddof 1), None below 2 values; ``mean`` None without any value."""
    v = [float(x) for x in values if x is not None]
    n = len(v)
    mean = sum(v) / n if n else None
    std = (sum((x - mean) ** 2 for x in v) / (n - 1)) ** 0.5 if n > 1 else None
    return {"n": n, "mean": mean, "std": std}


def format_stats(stats: dict, fmt: str = ".3f") -> str:
    """``"0.341 +/- 0.026"`` (mean +/- std over seeds, both in ``fmt``, the std
    unsigned), the mean alone for one seed, "-" without any value."""
    if stats["mean"] is None:
        return "-"
    if stats["std"] is None:
        return format(stats["mean"], fmt)
    return f"{format(stats['mean'], fmt)} +/- {format(stats['std'], fmt.lstrip('+'))}"


def paired_difference(a, b) -> dict:
    """Paired difference ``a[i] - b[i]`` of two methods' per-seed values on the
    same seeds (index i = one seed; pairs with a ``None`` side are left out).

    Returns ``{"n", "mean", "std", "se", "beyond_noise"}``: ``std`` the sample
    standard deviation (ddof 1) of the n differences, ``se = std / sqrt(n)`` their
    mean's standard error, ``beyond_noise`` whether ``|mean| > 2 se`` (the
    two-standard-error rule of every table here); ``std``, ``se`` and
    ``beyond_noise`` are None below 2 pairs (no noise estimate), ``mean`` None
    without any pair."""
    d = [x - y for x, y in zip(a, b, strict=True) if x is not None and y is not None]
    s = seed_stats(d)
    se = None if s["std"] is None else s["std"] / s["n"] ** 0.5
    beyond = None if se is None else abs(s["mean"]) > 2 * se
    return {"n": s["n"], "mean": s["mean"], "std": s["std"], "se": se,
            "beyond_noise": beyond}  # fmt: skip


def format_paired(diff: dict) -> str:
    """``"+0.028 (2 SE 0.016, beyond noise)"``: the mean paired difference, twice
    its standard error and the verdict; ``"+0.028 (1 seed)"`` without a noise
    estimate; "-" without any pair."""
    if diff["mean"] is None:
        return "-"
    if diff["se"] is None:
        return f"{diff['mean']:+.3f} (1 seed)"
    word = "beyond noise" if diff["beyond_noise"] else "within noise"
    return f"{diff['mean']:+.3f} (2 SE {2 * diff['se']:.3f}, {word})"


def difference_to_single(summary, value: float, metric: str, which: str = "final",
                         point: str = "sync", scale: float = 1.0,
                         digits: int = 3) -> str:  # fmt: skip
    """``"+3.3 (beyond noise)"``: ``scale`` x (mean of ``summary`` minus
    ``value``), ``value`` the figure of ONE run without seeds of its own (e.g. a
    logged reference run), ``digits`` decimals.

    The single run has no spread of its own, so the noise is that of our seeds:
    "beyond noise" when the difference exceeds two standard deviations of the
    seeds (``std``, ddof 1), else "within noise": a rough test that takes the
    single run for one more draw from our seeds' distribution and ignores the
    uncertainty of our mean and std over few seeds; "-" when the run lacks the
    metric or has a single seed."""
    e = _entry(summary, metric, which, point)
    if e is None or len(e["values"]) < 2:
        return "-"
    d = e["mean"] - value
    verdict = "beyond noise" if abs(d) > 2 * e["std"] else "within noise"
    return f"{scale * d:+.{digits}f} ({verdict})"


def top_group_metric(summary, prefix: str = "g_gen_l", point: str = "sync"):
    """The top group level's metric name in a summary (``g_gen_l3``), or None."""
    names = ((summary or {}).get("points", {}).get(point) or {}).keys()
    found = [k for k in names if k.startswith(prefix)]
    return max(found, key=lambda k: int(k[len(prefix) :])) if found else None


def setup_changes(old: dict, new: dict, keys, defaults: dict) -> list[str]:
    """``["replicas=3", ...]``: the stored setup's value of each of ``keys``
    that differs from ``new`` (a field missing from a setup: ``defaults``)."""
    return [
        f"{k}={old.get(k, defaults.get(k))!r}"
        for k in keys
        if old.get(k, defaults.get(k)) != new.get(k, defaults.get(k))
    ]


SEED_SETUP = ("replicas", "num_rounds", "eval_every", "quick")
"""Setup fields that seeded runs stored in one section must share."""


def adopt_replica_setup(results: dict, section: str, config, replicas: int,
                        quick: bool, force: bool) -> None:  # fmt: skip
    """Sets ``results["replica_setup"]`` from a probe ``config`` of the new
    seeded runs, after checking it against the stored one: when ``section``
    already holds runs made with other ``SEED_SETUP`` values the driver exits
    with a one-line error naming them, unless ``force``."""
    setup = {"replicas": replicas, "num_rounds": int(config.num_rounds),
             "eval_every": int(config.eval_every), "quick": quick}  # fmt: skip
    changed = results.get(section) and setup_changes(
        results.get("replica_setup", {}), setup, SEED_SETUP, {"quick": False}
    )
    if changed and not force:
        sys.exit(
            f"error: stored {section} used {', '.join(changed)}; pass the same "
            "flags to add runs, or --force to rerun under the new setup"
        )
    results["replica_setup"] = setup


TRAFFIC_LEGEND = (
    "MB up / down = megabytes (10^6 bytes) all agents sent / received in the "
    "final round (parameters, sketches, prototypes, features or push-sum "
    "messages, as each algorithm communicates; `bytes_up` / `bytes_down` in "
    "`metrics.jsonl`)."
)
"""The table legend of ``traffic_cell``'s column."""


def traffic_cell(final: dict) -> str:
    """``12.7 / 12.7``: megabytes (10^6 bytes) all agents uploaded / downloaded in
    the final round (``bytes_up`` / ``bytes_down`` of its record; with replicas
    the mean over them), ``-`` when not recorded."""
    up, down = final.get("bytes_up"), final.get("bytes_down")
    if up is None or down is None:
        return "-"
    return f"{up / 1e6:,.1f} / {down / 1e6:,.1f}"
