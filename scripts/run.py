"""The main job: run one simulation from an ml_collections config.

    python scripts/run.py                                   # DemLearn on digits
    python scripts/run.py --config=configs/fmnist_paper.py --config.num_rounds=5
    python scripts/run.py --config.algorithm=fedavg --config.num_agents=200

Bad input prints one line naming the field and the accepted values, exit code 2.
"""

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # so config files can `from configs import default`

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    os.path.join(REPO, "configs", "default.py"),
    "Run config file.",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
    "workdir",
    None,
    "Output directory (default: runs/<algorithm>_<dataset>_seed<seed>).",
)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # hide JAX's backend-probing INFO lines
    from demjax.errors import ConfigError
    from demjax.train import format_table, run

    config = _CONFIG.value
    workdir = _WORKDIR.value or os.path.join(
        "runs", f"{config.algorithm}_{config.dataset}_seed{config.seed}"
    )
    try:
        result = run(config, workdir)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    final = [result["final"]["local"], result["final"]["sync"]]
    print(
        f"\n{config.algorithm} on {config.dataset}: {config.num_agents} agents, "
        f"{config.num_rounds} rounds, {result['wall_s']:.1f} s; workdir {workdir}"
    )
    if result["eval_samples"]:
        print(f"(C-GEN on an evaluation subsample of {result['eval_samples']} samples)")
    print(format_table(final))


if __name__ == "__main__":
    app.run(main)
