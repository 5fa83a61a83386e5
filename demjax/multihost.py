"""Joining a multi-process (multi-host) job: ``jax.distributed.initialize``.

One process per host (or per group of local devices) runs the same program;
``jax.distributed.initialize`` connects them through a coordinator (process 0's
``host:port``), after which ``jax.devices()`` lists the devices of every process
and the ``agents`` mesh (``demjax.sharding``) spans them all. It must be called
before any JAX computation, which is why ``scripts/run.py`` calls
:func:`initialize` first thing.

Two ways to join:

- explicit: ``coordinator_address``, ``num_processes`` and ``process_id``, all
  three (e.g. two processes on one machine, or hosts of a plain cluster);
- auto (``auto=True``): ``jax.distributed.initialize()`` detects the cluster
  (Cloud TPU pods, SLURM, Open MPI, Kubernetes JobSet...); any of the three values
  given as well overrides the detected one.

On CPU the cross-process collectives use gloo (JAX's default
``jax_cpu_collectives_implementation``).
"""

from __future__ import annotations

from demjax.errors import ConfigError


def _check(coordinator_address, num_processes, process_id, auto: bool) -> None:
    """Validates the flags (before JAX is touched).

    Raises:
      ConfigError: naming the flag and the accepted values.
    """
    if num_processes is not None and (
        isinstance(num_processes, bool)
        or not isinstance(num_processes, int)
        or num_processes < 1
    ):
        raise ConfigError(
            f"--num_processes={num_processes!r} is not valid; accepted: an integer "
            ">= 1 (the number of processes in the job)"
        )
    if process_id is not None:
        bound = "num_processes" if num_processes is None else f"{num_processes}"
        if (
            isinstance(process_id, bool)
            or not isinstance(process_id, int)
            or process_id < 0
            or (num_processes is not None and process_id >= num_processes)
        ):
            raise ConfigError(
                f"--process_id={process_id!r} is not valid; accepted: an integer in "
                f"[0, {bound}) (this process's rank; 0 is the coordinator)"
            )
    if coordinator_address is not None:
        host, sep, port = str(coordinator_address).rpartition(":")
        if not (sep and host and port.isdigit() and 0 < int(port) < 65536):
            raise ConfigError(
                f"--coordinator_address={coordinator_address!r} is not valid; "
                "accepted: HOST:PORT of process 0 (e.g. localhost:12345 or "
                "10.0.0.1:8476), PORT in 1..65535"
            )
    given = [
        name
        for name, v in (
            ("--coordinator_address", coordinator_address),
            ("--num_processes", num_processes),
            ("--process_id", process_id),
        )
        if v is not None
    ]
    if not auto and given and len(given) < 3:
        raise ConfigError(
            f"{', '.join(given)} given alone; accepted: all three of "
            "--coordinator_address, --num_processes and --process_id, or "
            "--distributed to auto-detect the cluster (TPU pod, SLURM, Open MPI)"
        )


def requested(
    coordinator_address=None, num_processes=None, process_id=None, auto=False
) -> bool:
    """Whether these flags ask to join a multi-process job."""
    return bool(auto) or any(
        v is not None for v in (coordinator_address, num_processes, process_id)
    )


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    auto: bool = False,
    timeout_s: int = 300,
) -> bool:
    """Joins the job (``jax.distributed.initialize``) when the flags ask for it.

    Args:
      coordinator_address: ``HOST:PORT`` of process 0 (it listens there).
      num_processes: processes in the job (>= 1).
      process_id: this process's rank in ``[0, num_processes)``.
      auto: let JAX detect the cluster; the values above, if given, override it.
      timeout_s: seconds to wait for every process to join.

    Returns:
      True if it joined a job, False if nothing was requested (a plain
      single-process run; JAX is not touched).

    Raises:
      ConfigError: a bad or incomplete flag (validated before JAX is touched),
        or ``jax.distributed.initialize`` refused (e.g. no cluster detected, or
        JAX already computed something); the message names the flags.
    """
    _check(coordinator_address, num_processes, process_id, auto)
    if not requested(coordinator_address, num_processes, process_id, auto):
        return False
    import jax

    try:
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            initialization_timeout=int(timeout_s),
        )
    except (ValueError, RuntimeError, TypeError) as e:
        what = " ".join(str(e).split())
        how = (
            "run it inside a detected cluster (Cloud TPU pod, SLURM, Open MPI, "
            "Kubernetes) or pass --coordinator_address, --num_processes and "
            "--process_id"
            if auto and coordinator_address is None
            else "check that every process got the same --coordinator_address "
            "and --num_processes and a distinct --process_id, and that process 0 "
            "can listen on that port"
        )
        raise ConfigError(
            f"could not join the multi-process job ({what}); accepted: {how}"
        ) from e
    return True


def is_primary() -> bool:
    """True on process 0, the one that writes metrics and progress (always True
    in a single-process run)."""
    import jax

    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process reaches ``barrier(name)`` (no-op for one)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
