"""The main job: run one simulation from an ml_collections config.

    python scripts/run.py                                   # DemLearn on digits
    python scripts/run.py --config=configs/fmnist_paper.py --config.num_rounds=5
    python scripts/run.py --config.algorithm=fedavg --config.num_agents=200
    python scripts/run.py --config=configs/continual_digits.py   # continual learning

A config with ``scenario = "continual"`` runs distributed continual learning
(``demjax.continual``); any other config runs the simulation of ``demjax.train``.

Multi-process (multi-host) jobs: run the same command once per process, joined
by ``jax.distributed.initialize`` before any JAX computation (``demjax.multihost``):

    python scripts/run.py --coordinator_address=localhost:12345 \
        --num_processes=2 --process_id=0 ...     # and --process_id=1 in another
    python scripts/run.py --distributed ...      # TPU pod / SLURM: auto-detected

Bad input prints one line naming the field and the accepted values, exit code 2.
"""

import logging as pylogging
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # so config files can `from configs import default`

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402


def _unknown_field(e: Exception) -> None:
    from configs import default

    fields = ", ".join(sorted(default.get_config().keys()))
    print(f"error: unknown config field {e}; accepted: {fields}", file=sys.stderr)
    sys.exit(2)


try:  # config_flags applies --config.FIELD overrides while defining the flag
    _CONFIG = config_flags.DEFINE_config_file(
        "config",
        os.path.join(REPO, "configs", "default.py"),
        "Run config file.",
        lock_config=True,
    )
except (AttributeError, KeyError) as err:
    _unknown_field(err)
_OVERWRITE = flags.DEFINE_bool(
    "overwrite",
    False,
    "Replace results already in --workdir (default: resume from its last checkpoint "
    "when the config matches, refuse otherwise).",
)
_QUIET = flags.DEFINE_bool("quiet", False, "No progress bar (config.progress=False).")
_TENSORBOARD = flags.DEFINE_bool(
    "tensorboard", False, "Also write TensorBoard events (config.tensorboard=True)."
)
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed",
    False,
    "Join a multi-process job with jax.distributed.initialize(), detecting the "
    "cluster (Cloud TPU pod, SLURM, Open MPI, Kubernetes); --coordinator_address, "
    "--num_processes and --process_id, if given, override what is detected.",
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address",
    None,
    "HOST:PORT of process 0 of a multi-process job (give --num_processes and "
    "--process_id too, the same address on every process).",
)
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Processes in the multi-process job (>= 1)."
)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id",
    None,
    "This process's rank in [0, num_processes); 0 writes the results.",
)
_CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices",
    0,
    "CPU devices JAX exposes (0 = one per core). With several and "
    "config.num_devices=0 (auto), the run times its local training on one "
    "device and sharded over all of them (each device training its own agents "
    "on its own core) and keeps the faster; runs too short to time anything "
    "use one device. Sharded, floating-point sums over agents run in "
    "another order, so results differ from one device in the last bits. "
    "1 = one device. The default applies to a single-process run without a "
    "forced host device count (XLA_FLAGS).",
)
_WORKDIR = flags.DEFINE_string(
    "workdir",
    None,
    "Output directory (default: runs/<algorithm>_<dataset>_seed<seed>).",
)


def main(argv):
    del argv
    from demjax import multihost
    from demjax.errors import ConfigError
    from demjax.run_output import cli_log_filter

    # demjax's INFO messages and everyone's warnings; not the INFO chatter of JAX
    # and orbax (selected by logger name: demjax's modules log to "demjax.*").
    logging.set_verbosity(logging.INFO)
    pylogging.getLogger("demjax").setLevel(pylogging.INFO)
    logging.get_absl_handler().addFilter(cli_log_filter)

    try:  # before any JAX computation
        # The default (one device per core) is for a single-process run: a
        # multi-process job or a forced host device count (XLA_FLAGS) keeps its
        # devices unless --cpu_devices is given.
        multi = _DISTRIBUTED.value or _COORDINATOR.value or _NUM_PROCESSES.value
        forced = "xla_force_host_platform_device_count" in os.environ.get(
            "XLA_FLAGS", ""
        )
        explicit = flags.FLAGS["cpu_devices"].present
        if _CPU_DEVICES.value != 1 and (explicit or not (multi or forced)):
            from demjax import sharding

            sharding.set_cpu_devices(_CPU_DEVICES.value)
        joined = multihost.initialize(
            _COORDINATOR.value,
            _NUM_PROCESSES.value,
            _PROCESS_ID.value,
            auto=_DISTRIBUTED.value,
        )
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    from demjax.run_output import Interrupted, format_table
    from demjax.train import run

    config = _CONFIG.value
    with config.unlocked():  # both scenarios' configs have the two fields
        if _QUIET.value:
            config.progress = False
        if _TENSORBOARD.value:
            config.tensorboard = True
    if config.get("scenario") == "continual":
        if joined:
            print(
                "error: scenario='continual' runs in one process only; accepted: "
                "no --distributed / --coordinator_address / --num_processes / "
                "--process_id",
                file=sys.stderr,
            )
            sys.exit(2)
        _run_continual(config)
        return
    workdir = _WORKDIR.value or os.path.join(
        "runs", f"{config.algorithm}_{config.dataset}_seed{config.seed}"
    )
    try:
        result = run(config, workdir, overwrite=_OVERWRITE.value)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as e:
        print(str(e), file=sys.stderr)
        sys.exit(130)
    if not multihost.is_primary():  # process 0 reports
        return
    final = [result["final"][p] for p in ("local", "sync") if p in result["final"]]
    print(
        f"\n{config.algorithm} on {config.dataset}: {config.num_agents} agents, "
        f"{config.num_rounds} rounds, {result['wall_s']:.1f} s; workdir {workdir}"
    )
    if result["eval_samples"]:
        print(f"(C-GEN on an evaluation subsample of {result['eval_samples']} samples)")
    print(format_table(final))


def _run_continual(config) -> None:
    """Distributed continual learning (``demjax.continual.run``)."""
    from demjax.continual.run import run as run_continual
    from demjax.errors import ConfigError

    workdir = _WORKDIR.value or os.path.join(
        "runs", f"continual_{config.method}_{config.dataset}_seed{config.seed}"
    )
    try:
        out = run_continual(config, workdir, overwrite=_OVERWRITE.value)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(
        f"\ncontinual {config.method} on Split {config.dataset}: "
        f"{len(out['tasks'])} tasks, {out['wall_s']:.1f} s; workdir {workdir}"
    )
    print("accuracy matrix (row i: after task i; column j: task j):")
    for i, row in enumerate(out["acc_matrix"]):
        cells = " ".join("  -  " if v is None else f"{v:.3f}" for v in row)
        print(f"  {i}: {cells}")
    print(f"final average accuracy {out['final_avg_acc']:.4f}", end="")
    if out["forgetting"] is not None:
        print(f", forgetting {out['forgetting']:.4f}", end="")
    print()
    ft = out["forward_transfer"]
    if ft:
        a = " ".join(f"{v:.3f}" for v in ft["agent_acc_from_consolidated"])
        b = " ".join(f"{v:.3f}" for v in ft["agent_acc_from_scratch"])
        print(f"agents' own-task accuracy from consolidated: {a}; from scratch: {b}")


_HELP_FLAGS = ("help", "helpshort", "helpfull", "helpxml", "h", "?")


def _asks_help(argv) -> bool:
    args = argv[1 : argv.index("--")] if "--" in argv else argv[1:]
    return any(a.lstrip("-").split("=")[0] in _HELP_FLAGS for a in args if a[:1] == "-")


def _one_line(e: BaseException) -> str:
    """``e``'s message cut to one line: its first and last non-empty lines."""
    lines = [s.strip() for s in str(e).splitlines() if s.strip()] or [repr(e)]
    return lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"


def _config_path(argv) -> str:
    """The ``--config`` file named on the command line (the default otherwise)."""
    path = os.path.join(REPO, "configs", "default.py")
    for i, a in enumerate(argv[1:], 1):
        if a in ("--config", "-config") and i + 1 < len(argv):
            path = argv[i + 1]
        elif a.startswith(("--config=", "-config=")):
            path = a.split("=", 1)[1]
    return path.split(":", 1)[0]


def _config_file_error(e: BaseException, argv) -> None:
    path = _config_path(argv)
    cause = e
    while cause.__cause__ is not None:  # ml_collections wraps the first failure
        cause = cause.__cause__
    if isinstance(cause, SyntaxError):
        why = f"SyntaxError at line {cause.lineno}: {cause.msg}"
    elif isinstance(cause, FileNotFoundError) or "No such file" in str(cause):
        why = "no such file"
    elif isinstance(cause, flags.Error):  # get_config() raised: its last line
        why = [s for s in str(cause).splitlines() if s.strip()][-1].strip()
    else:
        why = f"{type(cause).__name__}: {_one_line(cause)}"
    print(
        f"error: --config={path!r} could not be loaded ({why}); accepted: a Python "
        "file defining get_config(), e.g. configs/default.py",
        file=sys.stderr,
    )
    sys.exit(2)


def parse_flags(argv):
    """absl flag parsing with bad input reported in one line, exit status 2;
    ``--help`` (and ``--helpfull``, ...) prints the flags and exits with 0."""
    try:
        rest = flags.FLAGS(argv)
    except SystemExit as e:
        if e.code == 1 and _asks_help(argv):  # absl's help flags exit with 1
            sys.exit(0)
        raise
    except (AttributeError, KeyError) as e:  # --config.<unknown field>
        _unknown_field(e)
    except flags.Error as e:
        if "config file" in str(e):  # get_config() raised a TypeError/ValueError
            _config_file_error(e, argv)
        print(f"error: {_one_line(e)}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:  # the config file itself: e.g. a SyntaxError
        _config_file_error(e, argv)
    try:  # ml_collections defers a missing file's error to the first access
        _CONFIG.value.keys()
    except Exception as e:
        _config_file_error(e, argv)
    return rest


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
