"""Write the per-agent split a run used to a split file (JSON or NPZ).

    python scripts/export_split.py --workdir=runs/demlearn_digits_seed0 --out=s.json
    python scripts/export_split.py --config=configs/fmnist_paper.py --out=s.npz

With ``--workdir`` the split is rebuilt from the run's ``config.json`` and checked
against its dataset card (``data.json``: the same per-agent data, to the sample);
with ``--config`` (and ``--config.FIELD=VALUE`` overrides) it is the split that
config would use. The file gives pool indices (``"index": "pool"``: the data set's
train split followed by its test split) and the agent names; rerun it with
``--config.partition=file --config.partition_file=FILE`` (same dataset and
``num_agents``; see docs/data.md). A bad input prints one line, exit code 2.
"""

import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # so config files can `from configs import default`

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

# Config fields that decide the data (the rest of config.json is not needed).
DATA_FIELDS = (
    "dataset", "data_dir", "download", "partition", "partition_file", "seed",
    "labels_per_agent", "dirichlet_alpha", "samples_per_agent", "standardize",
    "standardize_mean", "standardize_std", "num_agents",
)  # fmt: skip

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Run config file (instead of --workdir).", lock_config=False
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "A run's workdir: export the split its config.json used."
)
_OUT = flags.DEFINE_string("out", None, "Output split file (.json or .npz).")


def _fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def _config_from_workdir(workdir: str):
    import ml_collections

    path = os.path.join(workdir, "config.json")
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        _fail(f"--workdir={workdir!r}: cannot read {path} ({type(e).__name__})")
    if not isinstance(saved, dict):
        _fail(f"--workdir={workdir!r}: {path} is not a JSON object")
    from configs import default

    base = default.get_config()
    c = ml_collections.ConfigDict({k: base[k] for k in DATA_FIELDS})
    with c.ignore_type():
        for k in DATA_FIELDS:
            if k in saved:
                c[k] = saved[k]
    return c


def main(argv) -> None:
    del argv
    from demjax import data
    from demjax.errors import ConfigError

    if not _OUT.value:
        _fail("--out is required; accepted: a .json or .npz path")
    if (_WORKDIR.value is None) == (_CONFIG.value is None):
        _fail("give one of --workdir (a run's split) or --config (a config's split)")
    config = _config_from_workdir(_WORKDIR.value) if _WORKDIR.value else _CONFIG.value
    if config.partition == "arrays":
        _fail(
            "partition='arrays' runs take their data from Python; accepted: save "
            "the arrays given to demjax.data.partition_from_arrays"
        )
    try:
        split = data.make_split(config)
    except ConfigError as e:
        _fail(str(e))
    if _WORKDIR.value:
        card_path = os.path.join(_WORKDIR.value, data.card.CARD_FILE)
        if os.path.exists(card_path):
            with open(card_path) as f:
                want = json.load(f).get("partition_sha256")
            got = data.card.partition_digest(split.partition)
            if want and want != got:
                _fail(
                    f"the data rebuilt from {_WORKDIR.value}/config.json differ from "
                    f"the run's ({card_path}: partition_sha256 {want[:12]}..., "
                    f"rebuilt {got[:12]}...); the data files changed?"
                )
    try:
        data.write_split_file(
            _OUT.value,
            split.names,
            [tr for tr, _ in split.indices],
            [te for _, te in split.indices],
            index="pool",
            dataset=config.dataset,
        )
    except (ConfigError, OSError) as e:
        _fail(f"--out={_OUT.value!r}: {e}")
    print(
        f"wrote {_OUT.value}: {split.num_agents} agents of dataset={config.dataset} "
        f"(partition={config.partition}); rerun with --config.partition=file "
        f"--config.partition_file={_OUT.value} --config.num_agents={split.num_agents}"
    )


if __name__ == "__main__":
    try:
        flags.FLAGS(sys.argv)
    except flags.Error as e:
        _fail(str(e))
    except (AttributeError, KeyError) as e:
        _fail(f"unknown config field {e}")
    app.run(main)
