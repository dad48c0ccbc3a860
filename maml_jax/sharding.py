"""Data parallelism over tasks: one meta-step sharded across devices and hosts.

A meta-batch of ``T`` tasks is split along its leading (task) axis over a 1-D
device mesh; the train state (meta-parameters, optimizer state, step) is
replicated. Inside the jitted step nothing changes: ``train.train_step`` calls
``core.meta_value_and_grad``, whose mean over the task axis is, once the tasks
are sharded, a sum of per-device partial sums that XLA's SPMD partitioner turns
into an all-reduce. Each device therefore runs the inner loops of its ``T / n``
tasks, one all-reduce averages the meta-gradients (and scalar metrics), and
every device applies the same optimizer update to its replica. The results are
those of the single-device step up to float rounding (the sum is regrouped).

Two entry points mirror ``train.py``:

- ``make_sharded_train_step(mesh)``: ``(state, tasks) -> (state, metrics)``, the
  sharded ``meta_train_step`` for task batches built on the host.
- ``make_sharded_scan_train_steps(mesh, sample_tasks, num_steps)``:
  ``(state, key) -> (state, metrics)``, the sharded ``scan_train_steps``, tasks
  sampled on device.

``shard_sampler(sample_tasks, mesh)`` is the sampler the latter uses; with a
replicated state it also makes ``train.fit`` run sharded.

Multi-host: call ``initialize_distributed()`` first in every process; then
``task_mesh()`` spans every process's devices, ``replicate`` puts the same
state on all of them, ``shard_tasks`` turns each process's tasks into one
global array (or the sharded scan samples each device's tasks on the device),
and ``is_primary()`` says which process writes logs and metrics files.
Checkpoints are collective: every process calls ``Checkpointer.save`` and
``restore`` on the same directory (a shared filesystem), and orbax writes each
replicated array once; calling it from process 0 alone would wait forever on
the others.

The meta-batch must divide by the number of devices; otherwise a ``ValueError``
names both numbers (tasks are never dropped or padded silently).

Only ``batching="vmap"`` is split across devices (``"auto"``, the default of
``MetaTrainState``, resolves to it when there is more than one device):
``"scan"``/``"unroll"`` chunking loops over the task axis, which XLA cannot
partition (every device would gather and process all tasks), so the sharded
steps refuse it with a ``ValueError`` when the mesh has more than one device.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from maml_jax import _validation, train
from maml_jax._distributed import (
    ENV_COORDINATOR,
    ENV_NUM_PROCESSES,
    ENV_PROCESS_ID,
    initialize_distributed,
    is_primary,
)
from maml_jax.train import MetaTrainState, TaskSampler
from maml_jax.types import Aux, TaskBatch

__all__ = [
    "ENV_COORDINATOR",
    "ENV_NUM_PROCESSES",
    "ENV_PROCESS_ID",
    "ShardedTrainStep",
    "TASK_AXIS",
    "initialize_distributed",
    "is_primary",
    "local_task_slice",
    "make_sharded_scan_train_steps",
    "make_sharded_train_step",
    "replicate",
    "shard_sampler",
    "shard_tasks",
    "task_mesh",
    "task_sharding",
]

TASK_AXIS = "tasks"
"""The default name of the mesh axis the task axis is split over."""


def task_mesh(
    devices: Any | None = None, axis_name: str = TASK_AXIS
) -> jax.sharding.Mesh:
    """A 1-D mesh over ``devices`` (default: every device of every process).

    Args:
      devices: a sequence of devices; default ``jax.devices()``, which after
        ``initialize_distributed`` lists the devices of all processes.
      axis_name: the mesh axis name the task axis is sharded over.

    Returns:
      ``Mesh(devices, (axis_name,))``.

    Examples:
      >>> import jax
      >>> mesh = task_mesh(jax.devices()[:1])
      >>> mesh.axis_names, mesh.size
      (('tasks',), 1)
    """
    devices = jax.devices() if devices is None else list(devices)
    if not devices:
        raise ValueError("task_mesh needs at least one device; got none.")
    return Mesh(np.asarray(devices, dtype=object), (axis_name,))


def task_sharding(mesh: Mesh) -> NamedSharding:
    """``NamedSharding(mesh, P(axis))``: leading (task) axis split over the mesh."""
    return NamedSharding(mesh, P(_task_axis(mesh)))


def _replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _task_axis(mesh: Mesh) -> str:
    names = mesh.axis_names
    if len(names) == 1:
        return names[0]
    if TASK_AXIS in names:
        return TASK_AXIS
    raise ValueError(
        f"cannot tell which axis of the mesh {dict(mesh.shape)} holds the tasks: "
        f"use a 1-D mesh (task_mesh) or name one axis {TASK_AXIS!r}."
    )


def _num_shards(mesh: Mesh) -> int:
    return mesh.shape[_task_axis(mesh)]


def _check_divisible(num_tasks: int, mesh: Mesh) -> int:
    """Returns tasks per device; a ``ValueError`` naming both numbers otherwise."""
    devices = _num_shards(mesh)
    if num_tasks % devices:
        larger = math.ceil(num_tasks / devices) * devices
        raise ValueError(
            f"the meta-batch of {num_tasks} tasks cannot be split evenly over "
            f"{devices} devices (mesh axis {_task_axis(mesh)!r}): {num_tasks} is "
            f"not a multiple of {devices}. Use a meta-batch that is a multiple "
            f"of {devices} (e.g. {larger}) or a mesh whose size divides "
            f"{num_tasks}."
        )
    return num_tasks // devices


def _check_batching(state: MetaTrainState, mesh: Mesh) -> None:
    if state.batching not in ("vmap", "auto") and _num_shards(mesh) > 1:
        raise ValueError(
            f"sharded meta-steps need MetaTrainState(batching='vmap'); got "
            f"batching={state.batching!r}, which loops over the task axis, so "
            f"XLA would gather every task on every one of the "
            f"{_num_shards(mesh)} devices instead of splitting them."
        )


def _leading_dim(tasks: TaskBatch, where: str) -> int:
    return _validation.check_task_batch(tasks, where)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places every array leaf of ``tree`` on every device of ``mesh`` (``P()``).

    Use it once on a fresh ``MetaTrainState`` (and on a PRNG key or dataset that
    a sampler reads) before the sharded steps. With several processes every
    process must pass the same values (``jax.device_put`` checks this).
    """
    sharding = _replicated(mesh)

    def put(x):
        if isinstance(x, jax.Array):
            if x.sharding == sharding:
                return x
            if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
                # Typed PRNG keys: place the raw key data, then re-wrap it.
                data = put(jax.random.key_data(x))
                return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
            if jax.process_count() > 1 and x.is_fully_addressable:
                x = np.asarray(x)  # a host value, identical on every process
        return jax.device_put(x, sharding)

    return jax.tree.map(put, tree)


def shard_tasks(
    tasks: TaskBatch, mesh: Mesh, *, process_local: bool = False
) -> TaskBatch:
    """Makes ``tasks`` one global array per leaf, task axis split over ``mesh``.

    Args:
      tasks: a ``TaskBatch`` (NumPy or JAX arrays) with a leading task axis.
      mesh: the task mesh.
      process_local: with several processes, ``False`` means ``tasks`` is the
        whole meta-batch, identical in every process, and each process keeps the
        slice its devices hold; ``True`` means ``tasks`` is only this process's
        share (``local_task_slice`` of the global batch), and the global batch
        is the concatenation over processes in process order. With one process
        both are ``jax.device_put(tasks, task_sharding(mesh))``.

    Returns:
      ``tasks``, still a ``TaskBatch``, as ``jax.Array`` leaves with sharding
      ``task_sharding(mesh)``; each device holds ``meta_batch / mesh.size``
      tasks. Leaves already so sharded are returned as they are.

    Raises:
      ValueError: if the (global) meta-batch does not divide by the mesh size.
    """
    sharding = task_sharding(mesh)
    num_tasks = _leading_dim(tasks, "shard_tasks")
    if process_local:
        num_tasks *= jax.process_count()
    _check_divisible(num_tasks, mesh)

    def put(x):
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        shape = None if process_local else np.shape(x)
        return jax.make_array_from_process_local_data(sharding, x, shape)

    return jax.tree.map(put, tasks)


def local_task_slice(mesh: Mesh, num_tasks: int) -> slice:
    """The global task indices held by this process's devices (a contiguous range).

    A data loader in process ``p`` needs to produce only ``tasks[slice]`` and
    pass it to ``shard_tasks(..., process_local=True)``.
    """
    _check_divisible(num_tasks, mesh)
    indices = task_sharding(mesh).addressable_devices_indices_map((num_tasks,))
    starts = sorted({index[0].start or 0 for index in indices.values()})
    stops = sorted(
        {num_tasks if i[0].stop is None else i[0].stop for i in indices.values()}
    )
    lo, hi = starts[0], stops[-1]
    if (hi - lo) * jax.process_count() != num_tasks:
        raise ValueError(
            f"this process's devices do not hold a contiguous range of the "
            f"{num_tasks} tasks on mesh {mesh}; build the mesh with each "
            f"process's devices next to each other (as task_mesh() does)."
        )
    return slice(lo, hi)


@dataclasses.dataclass(frozen=True)
class ShardedTrainStep:
    """The sharded meta-train step returned by ``make_sharded_train_step``.

    Calling it checks the meta-batch against the mesh (a clear ``ValueError``),
    places host tasks with ``shard_tasks`` and runs ``jitted``.

    Attributes:
      mesh: the task mesh.
      jitted: ``jax.jit(train.train_step, in_shardings=(P(), P(axis)),
        out_shardings=P())``, e.g. for ``.lower(...)`` or ``._cache_size()``.
    """

    mesh: Mesh
    jitted: Callable[[MetaTrainState, TaskBatch], tuple[MetaTrainState, Aux]]

    def __call__(
        self, state: MetaTrainState, tasks: TaskBatch
    ) -> tuple[MetaTrainState, Aux]:
        _check_batching(state, self.mesh)
        return self.jitted(state, shard_tasks(tasks, self.mesh))


def make_sharded_train_step(mesh: Mesh, *, donate: bool = True) -> ShardedTrainStep:
    """The jitted ``train_step`` with tasks split over ``mesh``, state replicated.

    ``in_shardings = (P(), P("tasks"))``, ``out_shardings = P()``: the state and
    metrics are replicated, the task axis of every task leaf is split into
    ``mesh.size`` contiguous blocks. The gradient mean in
    ``core.meta_value_and_grad`` becomes an all-reduce inserted by XLA; the
    update is computed identically on every device. One compilation serves
    every call with the same shapes.

    Args:
      mesh: the task mesh (``task_mesh()``).
      donate: donate the input state (update in place; do not reuse it).

    Returns:
      A ``ShardedTrainStep``: ``step(state, tasks) -> (state, metrics)``.
      Pass ``replicate(state, mesh)`` the first time (required with several
      processes; with one, jit would otherwise copy the state).

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> import maml_jax
      >>> model = maml_jax.MLP((8,))
      >>> params = model.init(jax.random.key(0), jnp.zeros((1, 1)))["params"]
      >>> learner = maml_jax.maml(
      ...     maml_jax.regression_loss(model.apply), inner_lr=0.01, num_inner_steps=1
      ... )
      >>> mesh = task_mesh()
      >>> state = replicate(
      ...     maml_jax.MetaTrainState.create(
      ...         params=params, learner=learner, tx=optax.adam(1e-3)
      ...     ),
      ...     mesh,
      ... )
      >>> step = make_sharded_train_step(mesh)
      >>> tasks = maml_jax.sample_sinusoid_tasks(jax.random.key(1), 4 * mesh.size, 5, 5)
      >>> state, metrics = step(state, tasks)
      >>> int(state.step), bool(metrics["loss"] > 0)
      (1, True)
    """
    replicated = _replicated(mesh)
    jitted = jax.jit(
        train.train_step,
        in_shardings=(replicated, task_sharding(mesh)),
        out_shardings=(replicated, replicated),
        donate_argnums=(0,) if donate else (),
    )
    return ShardedTrainStep(mesh=mesh, jitted=jitted)


def make_sharded_scan_train_steps(
    mesh: Mesh,
    sample_tasks: TaskSampler,
    num_steps: int,
    *,
    donate: bool = True,
) -> Callable[[MetaTrainState, jax.Array], tuple[MetaTrainState, Aux]]:
    """The jitted ``scan_train_steps`` with on-device sampling split over ``mesh``.

    How sampling is distributed: step ``s`` samples the *whole* meta-batch from
    ``fold_in(key, s)`` exactly as ``train.scan_train_steps`` does, and the
    sample is constrained right away with ``with_sharding_constraint(tasks,
    P("tasks"))``. With JAX's partitionable threefry PRNG (the default) the SPMD
    partitioner propagates that sharding back through the sampler, so each
    device generates only its own ``T / n`` tasks (random bits, data gathers and
    all): no device, and no host, ever holds the full batch. Because the random
    bits do not depend on the partitioning, the tasks are bit-identical to the
    unsharded run's, and the result equals ``train.scan_train_steps`` with the
    same key up to float rounding of the gradient all-reduce. (A ``shard_map``
    sampler with per-device keys ``fold_in(step_key, device)`` would draw
    different tasks for every device count; this way a run is reproducible
    across device counts.)

    Arrays the sampler closes over (e.g. an Omniglot class array) are constants
    of the compiled program, replicated on every device.

    Args:
      mesh: the task mesh.
      sample_tasks: ``key -> TaskBatch``, traced into the step.
      num_steps: meta-steps per call (static). Build the function once and
        reuse it: each call of this factory is a new jitted function (a new
        compile).
      donate: donate the input state.

    Returns:
      ``run(state, key) -> (state, metrics)`` (jitted) with metrics stacked to
      ``(num_steps,)``, state and metrics replicated. Pass a state from
      ``replicate`` and a key from ``replicate(key, mesh)`` with several
      processes.

    Raises:
      ValueError: at the first call, if the sampler's meta-batch does not divide
        by the mesh size.
    """
    num_steps = _validation.check_positive_int("num_steps", num_steps)
    replicated = _replicated(mesh)
    sampler = shard_sampler(sample_tasks, mesh)

    def run(state: MetaTrainState, key: jax.Array):
        _check_batching(state, mesh)
        return train.scan_train_steps(state, key, sampler, num_steps)

    return jax.jit(
        run,
        in_shardings=(replicated, replicated),
        out_shardings=(replicated, replicated),
        donate_argnums=(0,) if donate else (),
    )


def shard_sampler(sample_tasks: TaskSampler, mesh: Mesh) -> TaskSampler:
    """Wraps a ``key -> TaskBatch`` sampler so its output is split over ``mesh``.

    The wrapped sampler calls ``sample_tasks(key)`` and applies
    ``jax.lax.with_sharding_constraint(tasks, task_sharding(mesh))`` (see
    ``make_sharded_scan_train_steps`` for what that does to sampling). It also
    makes ``train.fit`` run sharded, with one or several processes:
    ``fit(replicate(state, mesh), shard_sampler(sampler, mesh), ...)`` follows
    the shardings of its replicated state and of the constraint. With several
    processes pass ``metrics_path`` and ``progress=True`` on ``is_primary()``
    only. Build the wrapper once: each new one is a new static argument of
    ``fit``'s jitted step, hence a compile.

    Raises:
      ValueError: when traced, if the meta-batch does not divide by the mesh
        size.
    """
    sharding = task_sharding(mesh)

    def sharded_sampler(key: jax.Array) -> TaskBatch:
        tasks = sample_tasks(key)
        _check_divisible(_leading_dim(tasks, "sample_tasks(key)"), mesh)
        return jax.lax.with_sharding_constraint(tasks, sharding)

    return sharded_sampler
