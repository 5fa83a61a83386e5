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
    }
