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

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # so config files can `from configs import default`

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

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


def main(argv) -> None:
    del argv
    from demjax.data.split import export_split
    from demjax.errors import ConfigError

    if not _OUT.value:
        _fail("--out is required; accepted: a .json or .npz path")
    if (_WORKDIR.value is None) == (_CONFIG.value is None):
        _fail("give one of --workdir (a run's split) or --config (a config's split)")
    try:
        split = export_split(_OUT.value, config=_CONFIG.value, workdir=_WORKDIR.value)
    except ConfigError as e:
        _fail(str(e))
    except OSError as e:
        _fail(f"--out={_OUT.value!r}: {type(e).__name__}: {e}")
    dataset = split.info["dataset"]
    print(
        f"wrote {_OUT.value}: {split.num_agents} agents of dataset={dataset} "
        f"(partition={split.info['partition']}); rerun with "
        f"--config.partition=file --config.partition_file={_OUT.value} "
        f"--config.num_agents={split.num_agents}"
    )


def parse_flags(argv):
    """absl flag parsing with bad input reported in one line, exit status 2."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        _fail(str(e))
    except (AttributeError, KeyError) as e:  # --config.<unknown field>
        _fail(f"unknown config field {e}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
