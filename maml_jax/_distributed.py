"""Joining a multi-process JAX run and telling the processes apart.

:func:`initialize_distributed` connects this process to the others (arguments or
environment variables, else JAX's cluster detection); :func:`is_primary` says
which process writes logs and metrics files. Both are re-exported by
:mod:`maml_jax.sharding`, whose module docstring shows how a multi-host run
fits together.
"""

from __future__ import annotations

import os

import jax

__all__ = [
    "ENV_COORDINATOR",
    "ENV_NUM_PROCESSES",
    "ENV_PROCESS_ID",
    "initialize_distributed",
    "is_primary",
]

ENV_COORDINATOR = ("MAML_JAX_COORDINATOR", "JAX_COORDINATOR_ADDRESS")
"""Environment variables read (in order) for the coordinator's ``host:port``."""
ENV_NUM_PROCESSES = ("MAML_JAX_NUM_PROCESSES", "JAX_NUM_PROCESSES")
"""Environment variables read (in order) for the number of processes."""
ENV_PROCESS_ID = ("MAML_JAX_PROCESS_ID", "JAX_PROCESS_ID")
"""Environment variables read (in order) for this process's id (0-based)."""


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    initialization_timeout: int = 300,
) -> None:
    """Joins this process to a multi-process JAX run (CPU collectives: gloo).

    Call it at the start of every process, before any other JAX call. Each
    argument left ``None`` is read from the environment, first variable set wins:

    - ``coordinator_address`` (``host:port`` of process 0's coordinator):
      ``MAML_JAX_COORDINATOR``, then ``JAX_COORDINATOR_ADDRESS``;
    - ``num_processes``: ``MAML_JAX_NUM_PROCESSES``, then ``JAX_NUM_PROCESSES``;
    - ``process_id`` (0-based): ``MAML_JAX_PROCESS_ID``, then ``JAX_PROCESS_ID``.

    If all three are then known, ``jax.distributed.initialize`` is called with
    them and cluster auto-detection off. If none is, JAX's own detection runs
    (Slurm, Open MPI, Cloud TPU, Kubernetes). A partial set is an error.
    Cross-process collectives on CPU use gloo over TCP
    (``jax_cpu_collectives_implementation="gloo"``); GPUs and TPUs use their
    own. Each process sees its local devices via ``jax.local_devices()`` and
    all of them via ``jax.devices()``. Calling it again once initialized does
    nothing.

    Args:
      coordinator_address: ``host:port`` every process can reach.
      num_processes: total number of processes.
      process_id: this process's id in ``[0, num_processes)``.
      initialization_timeout: seconds to wait for every process to connect.
    """
    if jax.distributed.is_initialized():
        return
    address = coordinator_address or _env(ENV_COORDINATOR)
    count = num_processes if num_processes is not None else _env(ENV_NUM_PROCESSES)
    index = process_id if process_id is not None else _env(ENV_PROCESS_ID)
    given = [v is not None for v in (address, count, index)]
    if not any(given):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(initialization_timeout=initialization_timeout)
        return
    if not all(given):
        missing = [
            names[0]
            for names, ok in zip(
                (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID), given, strict=True
            )
            if not ok
        ]
        raise ValueError(
            f"initialize_distributed needs the coordinator address, the number of "
            f"processes and this process's id; missing: {', '.join(missing)} "
            f"(pass them as arguments or set these environment variables)."
        )
    count, index = int(count), int(index)
    if count < 1 or not 0 <= index < count:
        raise ValueError(
            f"process_id must be in [0, num_processes); got process_id={index}, "
            f"num_processes={count}."
        )
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=address,
        num_processes=count,
        process_id=index,
        cluster_detection_method="deactivate",
        initialization_timeout=initialization_timeout,
    )


def _env(names: tuple[str, ...]) -> str | None:
    for name in names:
        value = os.environ.get(name)
        if value:
            return value
    return None


def is_primary() -> bool:
    """Whether this is process 0, the one that writes logs, metrics and plots."""
    return jax.process_index() == 0
