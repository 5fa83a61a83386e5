"""Shared by the benchmark scripts: resumable JSON results, environment record."""

from __future__ import annotations

import json
import os
import platform


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
