"""A Flax train state, a jitted meta-train step, evaluation and a thin ``fit`` loop."""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from maml_jax import _fit_log, _validation, autotune, core
from maml_jax.types import Aux, MetaLearner, MetaParams, ModelState, Params, TaskBatch

TaskSampler = Callable[[jax.Array], TaskBatch]
"""``key -> TaskBatch``; traced inside the jitted step (on-device sampling)."""

NONFINITE = ("raise", "skip")
"""What ``fit`` does with a step whose meta-loss or meta-gradient is not finite."""


class StopTraining(Exception):
    """Raised by a ``fit`` callback to end training after the current chunk."""


class MetaTrainState(struct.PyTreeNode):
    """Meta-training state in the style of ``flax.training.train_state.TrainState``.

    Attributes:
      step: number of meta-steps taken (an int32 scalar array), skipped ones
        included.
      meta_params: the meta-parameters being learned.
      opt_state: the outer optimizer's state.
      skipped_steps: how many of those steps were skipped because their
        meta-loss or meta-gradient was not finite (``nonfinite="skip"``); an
        int32 scalar array, so it is checkpointed and survives a resume.
      learner: the ``MetaLearner`` (static).
      tx: the outer ``optax`` optimizer (static).
      model_state: the model state (BatchNorm running statistics) of a learner
        built with ``has_state=True``; ``None`` otherwise. Every train step
        replaces it with ``state_reduction`` of the tasks' new states (not a
        gradient update); it is checkpointed with the rest.
      state_reduction: combines the tasks' new model states (static; default
        ``core.mean_state``).
      batching: how tasks are batched in ``core.meta_value_and_grad`` (static).
      chunk_size: tasks per chunk for ``"scan"``/``"unroll"`` batching (static).
    """

    step: jax.Array
    meta_params: MetaParams
    opt_state: optax.OptState
    skipped_steps: jax.Array
    learner: MetaLearner = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)
    model_state: ModelState = None
    state_reduction: core.StateReduction = struct.field(
        pytree_node=False, default=core.mean_state
    )
    batching: str = struct.field(pytree_node=False, default="auto")
    chunk_size: int | None = struct.field(pytree_node=False, default=None)

    @classmethod
    def create(
        cls,
        *,
        params: Params,
        learner: MetaLearner,
        tx: optax.GradientTransformation,
        batching: core.TaskBatching = "auto",
        chunk_size: int | None = None,
        model_state: ModelState = None,
        state_reduction: core.StateReduction = core.mean_state,
    ) -> MetaTrainState:
        """Builds the state: ``meta_params = learner.init(params)``, step 0.

        The meta-parameters (and ``model_state``) are copied, so donating the
        state to ``meta_train_step`` or ``fit`` never invalidates the caller's
        ``params``. ``model_state`` is required for a learner built with
        ``has_state=True`` and refused otherwise.
        """
        if batching not in core.TASK_BATCHING:
            raise ValueError(
                f"batching must be one of {core.TASK_BATCHING}; got {batching!r}."
            )
        if chunk_size is not None:
            _validation.check_positive_int("chunk_size", chunk_size)
        if learner.has_state and model_state is None:
            raise ValueError(
                "The learner was built with has_state=True: pass its initial "
                "model state, MetaTrainState.create(..., model_state=state)."
            )
        if not learner.has_state and model_state is not None:
            raise ValueError(
                "model_state was given, but the learner was built without "
                "has_state=True, so its loss takes none."
            )
        meta_params = jax.tree.map(jnp.array, learner.init(params))
        return cls(
            step=jnp.zeros((), jnp.int32),
            meta_params=meta_params,
            opt_state=tx.init(meta_params),
            skipped_steps=jnp.zeros((), jnp.int32),
            learner=learner,
            tx=tx,
            model_state=jax.tree.map(jnp.array, model_state),
            state_reduction=state_reduction,
            batching=batching,
            chunk_size=chunk_size,
        )

    def apply_gradients(self, *, grads: MetaParams) -> MetaTrainState:
        """Applies one outer optimizer update and increments ``step``."""
        updates, opt_state = self.tx.update(grads, self.opt_state, self.meta_params)
        return self.replace(
            step=self.step + 1,
            meta_params=optax.apply_updates(self.meta_params, updates),
            opt_state=opt_state,
        )


def train_step(
    state: MetaTrainState,
    tasks: TaskBatch,
    *,
    nonfinite: str = "raise",
    pre_adaptation_query: bool = False,
) -> tuple[MetaTrainState, Aux]:
    """One meta-update on a batch of tasks (not jitted; see ``meta_train_step``).

    Args:
      state: the current state.
      tasks: a ``TaskBatch``.
      nonfinite: ``"raise"`` applies every update (``fit`` then stops at a
        non-finite step); ``"skip"``: if the meta-loss or the meta-gradient's
        norm is not finite (NaN or ±inf), ``meta_params`` and ``opt_state`` are
        kept bit for bit, ``step`` still advances (the next step samples new
        tasks) and ``skipped_steps`` is incremented.
      pre_adaptation_query: also report the learner's query metrics before
        adaptation (``query_loss_pre``, ``query_<key>_pre``). They cost one more
        forward pass over every query set, which the meta-gradient does not
        need, so by default they are dropped and XLA removes that pass. The
        update is the same either way.

    Returns:
      ``(new_state, metrics)`` with scalar metrics: ``loss``, ``grad_norm`` and
      the task-mean of every per-task aux value kept (support losses before and
      after adaptation, query metrics after, and before if asked);
      with ``nonfinite="skip"`` also ``skipped`` (a bool, this step's verdict).
    """
    _check_nonfinite(nonfinite)
    stateful = state.learner.has_state
    (loss, aux), grads = core.meta_value_and_grad(
        state.learner,
        state.meta_params,
        tasks,
        batching=state.batching,
        chunk_size=state.chunk_size,
        outer_step=state.step,
        **(
            {"state": state.model_state, "state_reduction": state.state_reduction}
            if stateful
            else {}
        ),
    )
    if stateful:
        aux, model_state = aux
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
    if not pre_adaptation_query:
        aux = {k: v for k, v in aux.items() if not _is_pre_adaptation_query(k)}
    metrics.update({k: jnp.mean(v) for k, v in aux.items()})
    new_state = state.apply_gradients(grads=grads)
    if stateful:
        new_state = new_state.replace(model_state=model_state)
    if nonfinite == "skip":
        # A select inside the jitted step (no host round trip). Not
        # ``optax.apply_if_finite``: that checks only the gradients, keeps its
        # counter in the optimizer state (so the caller must wrap ``tx``) and
        # applies the update after ``max_consecutive_errors`` bad steps.
        finite = jnp.isfinite(loss) & jnp.isfinite(metrics["grad_norm"])
        meta_params, opt_state, model_state = optax.tree.where(
            finite,
            (new_state.meta_params, new_state.opt_state, new_state.model_state),
            (state.meta_params, state.opt_state, state.model_state),
        )
        new_state = new_state.replace(
            meta_params=meta_params,
            opt_state=opt_state,
            model_state=model_state,
            skipped_steps=state.skipped_steps + (~finite).astype(jnp.int32),
        )
        metrics["skipped"] = ~finite
    return new_state, metrics


def _is_pre_adaptation_query(name: str) -> bool:
    return name.startswith("query_") and name.endswith("_pre")


meta_train_step = jax.jit(
    train_step,
    donate_argnums=0,
    static_argnames=("nonfinite", "pre_adaptation_query"),
)
meta_train_step.__doc__ = """Jitted ``train_step``; the state is donated (in place).

Do not reuse the ``state`` passed in: its buffers are given to the new state.
``nonfinite`` (``"raise"`` or ``"skip"``) and ``pre_adaptation_query`` are static.
"""


PRESAMPLE_MAX_BYTES = 16 * 2**20
"""``scan_train_steps`` samples all its steps' tasks before its loop when they fit."""

PRESAMPLE_MIN_STEPS = 64
"""``fit`` presamples when this many task batches fit in ``PRESAMPLE_MAX_BYTES``.

The choice is made once per run from the batch size alone, never per chunk:
presampled and in-loop sampled steps compile to different programs, whose
results may differ in the last bits, so a per-chunk choice would make the
results depend on the chunking."""


def scan_train_steps(
    state: MetaTrainState,
    key: jax.Array,
    sample_tasks: TaskSampler,
    num_steps: int,
    *,
    nonfinite: str = "raise",
    pre_adaptation_query: bool = False,
    presample: bool | None = None,
    active_steps: int | jax.Array | None = None,
) -> tuple[MetaTrainState, Aux]:
    """``num_steps`` meta-updates in one compiled loop, sampling tasks on device.

    Step ``s`` (the global ``state.step``) draws its tasks from
    ``jax.random.fold_in(key, s)``, so a run is identical whether it is split
    into one call or many, and resuming from a saved state continues exactly:
    bit for bit as long as every call takes the same ``presample`` (the loop's
    length is hidden from XLA, so every length compiles the same step; see
    ``_scan``). ``nonfinite`` and ``pre_adaptation_query`` are passed to
    ``train_step``.

    ``presample=True`` draws every step's tasks before the loop, with the
    sampler ``vmap``-ed over the steps' keys: the same tasks, bit for bit, but
    one PRNG call for the whole chunk instead of one per step (on CPU each
    threefry call is a rolled loop, a large share of a small model's step). It
    holds ``num_steps`` batches at once, so the default
    (``None``) presamples only when they fit in ``PRESAMPLE_MAX_BYTES``; pass
    ``False`` for a sampler that cannot be ``vmap``-ed.

    ``active_steps`` (a traced int, ``0..num_steps``; default ``num_steps``) runs
    only the first ``active_steps`` steps: the loop stops there, so the state is
    exactly that after ``active_steps`` steps (parameters, optimizer state,
    ``step``, ``skipped_steps``) and the metric rows of the steps not run are
    zeros. One compiled program thus serves every chunk length up to
    ``num_steps`` (``fit`` runs all its chunks so). Presampling still draws
    ``num_steps`` batches.

    Returns:
      ``(new_state, metrics)`` with every metric stacked to shape ``(num_steps,)``.
    """

    def step(state, tasks):
        return train_step(
            state,
            tasks,
            nonfinite=nonfinite,
            pre_adaptation_query=pre_adaptation_query,
        )

    step_key = lambda s: jax.random.fold_in(key, s)
    if presample is None:
        presample = num_steps * _batch_bytes(sample_tasks, key) <= PRESAMPLE_MAX_BYTES
    if presample:
        keys = jax.vmap(step_key)(state.step + jnp.arange(num_steps))
        xs = jax.vmap(sample_tasks)(keys)
        return _scan(step, state, xs, num_steps, active_steps)
    body = lambda state, _: step(state, sample_tasks(step_key(state.step)))
    return _scan(body, state, None, num_steps, active_steps)


def _scan(f, init, xs, length: int, trips: int | jax.Array | None = None):
    """``lax.scan(f, init, xs, length=length)`` in a loop XLA cannot see the length of.

    XLA compiles a loop whose trip count it knows according to that count (a
    one-trip loop, for one, is inlined into the surrounding program), and the
    step's float results can then differ in the last bits from one length to
    another. The trip count here is hidden behind an optimization barrier, so
    every length runs the same loop body and a run is bit-identical however it
    is split into calls. ``trips`` (default ``length``, at most ``length``)
    stops the loop early: the outputs of the iterations not run stay zeros.
    """
    trips = length if trips is None else jnp.minimum(trips, length)
    trips = jax.lax.optimization_barrier(jnp.asarray(trips, jnp.int32))
    x_at = lambda i: jax.tree.map(lambda x: x[i], xs)
    x_shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), xs)
    _, y_shapes = jax.eval_shape(f, init, x_shapes)
    ys = jax.tree.map(lambda y: jnp.zeros((length, *y.shape), y.dtype), y_shapes)

    def body(i, carry):
        carry, ys = carry
        carry, y = f(carry, x_at(i))
        return carry, jax.tree.map(lambda buf, v: buf.at[i].set(v), ys, y)

    return jax.lax.fori_loop(0, trips, body, (init, ys))


def _batch_bytes(sample_tasks: TaskSampler, key: jax.Array) -> int:
    shapes = jax.eval_shape(sample_tasks, key)
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes))


def fit(
    state: MetaTrainState,
    sample_tasks: TaskSampler,
    *,
    key: jax.Array,
    num_steps: int,
    steps_per_call: int = 100,
    eval_fn: Callable[[MetaTrainState], Mapping[str, float]] | None = None,
    eval_every: int = 0,
    stop_every: Sequence[int] = (),
    metrics_path: str | os.PathLike | None = None,
    progress: bool = True,
    callbacks: tuple[Callable[[MetaTrainState, dict[str, Any]], None], ...] = (),
    nonfinite: str = "raise",
    pre_adaptation_query: bool = False,
    autotune: bool | None = None,
) -> MetaTrainState:
    """Meta-trains until ``state.step == num_steps``.

    Training runs in chunks: each host call runs a chunk of steps in one jitted
    loop with tasks sampled on device (``scan_train_steps``), so Python
    dispatch costs one call per chunk. After each chunk the chunk-mean metrics
    are logged: to the progress bar (loss, query accuracy if the loss reports
    one, tasks/s), to ``metrics_path`` as one JSON object per line, and to
    ``callbacks(state, record)``. ``eval_fn(state)`` runs at every step that is a
    multiple of ``eval_every`` and at ``num_steps``, whatever step training
    started from.

    Chunks end where something is due: at every multiple of ``eval_every``
    (with an ``eval_fn``) and of each period in ``stop_every`` (e.g. a
    checkpoint period, so that a callback sees the state there), and at
    ``num_steps``; a chunk is at most ``steps_per_call`` steps long. The
    length of the chunk starting at step ``s`` is thus ``min(steps_per_call,
    next due step − s)``, a function of ``s`` alone, so a run resumed from any
    step a chunk ended on runs the same chunks as an uninterrupted one. The
    results do not depend on the chunking at all: step ``s`` draws its tasks
    from ``fold_in(key, s)`` and every chunk runs the same step program, so any
    ``steps_per_call`` gives the same parameters, bit for bit (tested on CPU);
    it trades host round trips against how soon callbacks (and a stop) come.
    Small task batches (see ``PRESAMPLE_MIN_STEPS``) are sampled for a whole
    chunk before its loop; the longest chunk is then also bounded by
    ``PRESAMPLE_MAX_BYTES`` of tasks.

    Compilation: every chunk of a ``fit`` call runs one compiled program, made
    for the longest chunk the call can run (``steps_per_call``, bounded by the
    steps left and the shortest period); a shorter chunk (the last one, one cut
    at a period) runs it with its trailing steps not run (see ``active_steps``
    in ``scan_train_steps``). The program is reused by later calls with equal
    static inputs and recompiled when any changes: the sampler (a new function
    object is a new program, even with the same code: build it once; equal
    ``functools.partial`` objects of one function with equal hashable
    arguments count as the same), the shapes or dtypes of the state or the
    sampled tasks, the learner, ``tx``, ``batching``, ``chunk_size``,
    ``nonfinite``, ``pre_adaptation_query``, and the program length (a new
    ``steps_per_call`` or shortest period, or fewer steps left than those).

    Task batching: a state with ``batching="auto"`` and no ``chunk_size`` whose
    tasks ``core.auto_batching`` would scan in chunks (image tasks on one CPU
    device) gets its chunk size measured first (``autotune.tune_batching`` on
    one sampled batch; cached per machine and program, so only the first run of
    a program pays for it); the returned state holds the choice. ``autotune=False``
    (or ``$MAML_JAX_AUTOTUNE=0``) keeps ``"auto"``, i.e. the rule's chunk size.

    A step is non-finite when its meta-loss or the norm of its meta-gradient is
    NaN or ±inf. With ``nonfinite="raise"`` the chunk holding one raises
    ``FloatingPointError`` naming the first such step and quantity, before any
    callback sees the chunk's state (so no checkpoint of it is written). With
    ``"skip"`` such steps leave the parameters and optimizer state unchanged
    (see ``train_step``) and training goes on; the record then averages only the
    applied steps and holds ``skipped_steps``, the run's total
    (``state.skipped_steps``), also shown on the progress bar.

    Args:
      state: the starting state; training continues from ``state.step``.
      sample_tasks: ``key -> TaskBatch``, traced into the step (a static
        argument of the compiled chunk: see "Compilation" above).
      key: the run's PRNG key; step ``s`` uses ``fold_in(key, s)``.
      num_steps: total number of meta-updates (not the number still to run).
      steps_per_call: the most meta-steps per host call (performance only).
      eval_fn: optional periodic evaluation returning scalar metrics.
      eval_every: evaluate at every multiple of this step (0: only at the end).
      stop_every: periods in steps; a chunk also ends at every multiple of each.
      metrics_path: JSON-lines file, appended to.
      progress: show a tqdm progress bar.
      callbacks: called after every chunk with the state and the logged record;
        a callback may raise ``StopTraining`` to end training there.
      nonfinite: ``"raise"`` (stop) or ``"skip"`` (skip the update and count it).
      pre_adaptation_query: also log the query metrics before adaptation (see
        ``train_step``; one more forward pass over every query set per step).
      autotune: measure the chunk size of an ``"auto"`` state (see above);
        default: on unless ``$MAML_JAX_AUTOTUNE`` is ``0``.

    Returns:
      The final state.

    Raises:
      FloatingPointError: with ``nonfinite="raise"``, at a non-finite step.

    Examples:
      >>> import jax, optax, maml_jax
      >>> model = maml_jax.MLP(hidden_sizes=(8,))
      >>> params = model.init(jax.random.key(0), jax.numpy.zeros((1, 1)))["params"]
      >>> learner = maml_jax.maml(
      ...     maml_jax.regression_loss(model.apply), inner_lr=0.01, num_inner_steps=1
      ... )
      >>> state = maml_jax.MetaTrainState.create(
      ...     params=params, learner=learner, tx=optax.adam(1e-3)
      ... )
      >>> sampler = lambda k: maml_jax.sample_sinusoid_tasks(k, 4, 5, 5)
      >>> ends = []
      >>> state = maml_jax.fit(
      ...     state, sampler, key=jax.random.key(1), num_steps=6, steps_per_call=4,
      ...     stop_every=(3,), progress=False,
      ...     callbacks=(lambda s, record: ends.append(record["step"]),),
      ... )
      >>> ends  # chunks of at most 4 steps that end on multiples of 3
      [3, 6]
    """
    num_steps = int(num_steps)
    if num_steps < 0:
        raise ValueError(f"num_steps must be >= 0; got {num_steps}.")
    steps_per_call = _validation.check_positive_int("steps_per_call", steps_per_call)
    if eval_every < 0:
        raise ValueError(f"eval_every must be >= 0; got {eval_every}.")
    periods = tuple(_validation.check_positive_int("stop_every", p) for p in stop_every)
    if eval_fn is not None and eval_every:
        periods += (int(eval_every),)
    _check_nonfinite(nonfinite)
    num_tasks = _num_tasks(sample_tasks, key)
    if state.batching == "auto" and state.chunk_size is None:
        state = _with_tuned_batching(state, sample_tasks, key, autotune)
    batch_bytes = max(1, _batch_bytes(sample_tasks, key))
    presample = batch_bytes * PRESAMPLE_MIN_STEPS <= PRESAMPLE_MAX_BYTES
    max_chunk = steps_per_call
    if presample:
        max_chunk = min(max_chunk, PRESAMPLE_MAX_BYTES // batch_bytes)
    # No chunk is longer than this (a chunk ends at every period); shorter
    # chunks run the same program with fewer active steps.
    program_length = min(max_chunk, max(1, num_steps - int(state.step)), *periods)
    sampler = _StaticSampler(sample_tasks)
    log = open(metrics_path, "a") if metrics_path is not None else None  # noqa: SIM115
    bar = _fit_log.progress_bar(progress, int(state.step), num_steps)
    try:
        while int(state.step) < num_steps:
            start = int(state.step)
            chunk = _chunk_length(start, num_steps, max_chunk, periods)
            t0 = time.perf_counter()
            state, metrics = _scan_train_steps_jit(
                state,
                key,
                sampler,
                program_length,
                nonfinite,
                bool(pre_adaptation_query),
                presample,
                np.int32(chunk),
            )
            metrics = {k: v[:chunk] for k, v in jax.device_get(metrics).items()}
            seconds = time.perf_counter() - t0
            step = int(state.step)
            if nonfinite == "raise":
                _fit_log.raise_if_nonfinite(metrics, start)
                applied = np.ones(chunk, bool)
            else:
                applied = ~np.asarray(metrics.pop("skipped"), bool)
            record: dict[str, Any] = {"step": step, **_fit_log.means(metrics, applied)}
            if nonfinite == "skip":
                record["skipped_steps"] = int(state.skipped_steps)
            record["tasks_per_s"] = chunk * num_tasks / seconds
            due = step == num_steps or (eval_every and step % eval_every == 0)
            if eval_fn is not None and due:
                record.update(
                    {f"eval/{k}": float(v) for k, v in eval_fn(state).items()}
                )
            _fit_log.write(log, record)
            if bar is not None:
                bar.update(chunk)
                bar.set_postfix(_fit_log.bar_fields(record))
            for callback in callbacks:
                callback(state, record)
    except StopTraining:
        pass
    finally:
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()
    return state


def _chunk_length(
    start: int, num_steps: int, max_chunk: int, periods: tuple[int, ...]
) -> int:
    """Steps from ``start`` to the next due step (a multiple of a period, or the
    end), at most ``max_chunk``: a function of the step number only."""
    end = min(num_steps, start + max_chunk)
    for period in periods:
        end = min(end, (start // period + 1) * period)
    return end - start


def _check_nonfinite(nonfinite: str) -> None:
    if nonfinite not in NONFINITE:
        raise ValueError(
            f"nonfinite must be one of {', '.join(map(repr, NONFINITE))}; "
            f"got {nonfinite!r}."
        )


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5, 6), donate_argnums=0)
def _scan_train_steps_jit(
    state,
    key,
    sample_tasks,
    num_steps,
    nonfinite,
    pre_adaptation_query,
    presample,
    active_steps,
):
    return scan_train_steps(
        state,
        key,
        sample_tasks,
        num_steps,
        nonfinite=nonfinite,
        pre_adaptation_query=pre_adaptation_query,
        presample=presample,
        active_steps=active_steps,
    )


class _StaticSampler:
    """``fit``'s sampler as the compiled chunk's static argument (jit compares
    static arguments with ``==`` to find a compiled program).

    Equal ``functools.partial`` objects (the same function; arguments of equal
    types and values, all hashable) are equal and share a program; any other
    sampler is compared by identity, as jit compares functions. Closures are
    never compared by code: the values they capture can change unseen.
    """

    def __init__(self, fn: TaskSampler):
        self.fn = fn
        self._key: Any = fn
        if type(fn) is functools.partial:
            args = tuple((type(a), a) for a in fn.args)
            kwargs = tuple(sorted((k, type(v), v) for k, v in fn.keywords.items()))
            try:
                hash((args, kwargs))
                self._key = (fn.func, args, kwargs)
            except TypeError:  # an array argument: compare by identity
                pass

    def __call__(self, key: jax.Array) -> TaskBatch:
        return self.fn(key)

    def __hash__(self) -> int:
        return hash(self._key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _StaticSampler) and self._key == other._key


def _with_tuned_batching(
    state: MetaTrainState,
    sample_tasks: TaskSampler,
    key: jax.Array,
    enabled: bool | None,
) -> MetaTrainState:
    """``state`` with the measured batching, or unchanged where nothing is
    measured (another backend, several devices, MLP tasks, measurement off)."""
    if enabled is None:
        enabled = autotune.enabled_by_env()
    if (
        not enabled
        or core.auto_batching(jax.eval_shape(sample_tasks, key))[0] != "scan"
    ):
        return state
    choice = autotune.tune_batching(
        state.learner,
        state.meta_params,
        sample_tasks(key),
        state=state.model_state,
        outer_step=state.step,
        enabled=enabled,
    )
    if choice.source == "rule":
        return state
    return state.replace(batching=choice.batching, chunk_size=choice.chunk_size)


def _num_tasks(sample_tasks: TaskSampler, key: jax.Array) -> int:
    shapes = jax.eval_shape(sample_tasks, key)
    return _validation.check_task_batch(shapes, "fit: sample_tasks(key)")
