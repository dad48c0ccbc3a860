"""Pure building blocks of gradient-based meta-learning: the one inner loop.

Nothing here knows about Flax, datasets or outer optimizers: every function
takes a ``loss_fn(params, batch)`` and pytrees, and works under ``jit``, ``vmap``
and ``grad``. Nothing is jitted here; the caller decides.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from maml_jax import _validation, _varying
from maml_jax.types import (
    Aux,
    Batch,
    LossFn,
    MetaLearner,
    MetaParams,
    ModelState,
    Params,
    Task,
    TaskBatch,
)


class InnerTrace(NamedTuple):
    """What the inner loop records at each of its ``K`` steps.

    Attributes:
      support_loss: ``(K,)``: the support loss before each step.
      observed: ``observe(φ_{k+1})`` (``observe(φ_{k+1}, s_{k+1})`` with
        model state) after each step, stacked along a leading axis of length
        ``K``; ``None`` when nothing is observed.
      state: the model state after the ``K`` support passes (``None`` for
        stateless losses).
    """

    support_loss: jax.Array
    observed: Any = None
    state: ModelState = None


def inner_loop(
    loss_fn: LossFn,
    params: Params,
    support: Batch,
    *,
    optimizer: optax.GradientTransformation,
    num_steps: int,
    first_order: bool = False,
    remat: bool = False,
    has_aux: bool = False,
    observe: Callable[..., Any] | None = None,
    state: ModelState = None,
    has_state: bool = False,
    training: bool = True,
    pass_inner_step: bool = False,
) -> tuple[Params, InnerTrace]:
    """Runs ``num_steps`` of an optax optimizer on the support loss (``lax.scan``).

    ``φ_0 = θ``, ``s_0 = optimizer.init(θ)``, and for ``k < K``
    ``u_k, s_{k+1} = optimizer.update(∇L_S(φ_k), s_k, φ_k)``,
    ``φ_{k+1} = φ_k + u_k``. Nothing is stopped: differentiating the result with
    respect to ``θ`` gives the exact second-order meta-gradient through the
    updates *and* the optimizer's state (Adam's moments, momentum), and through
    any traced value the optimizer closes over (learned rates). The scan keeps
    compile time independent of ``K``.

    Args:
      loss_fn: ``loss_fn(params, batch) -> loss`` (or ``(loss, aux)``).
      params: the starting point ``θ``.
      support: the support batch of one task.
      optimizer: the inner optimizer; its state starts fresh for every call.
        ``optax.sgd(α)`` is MAML's ``φ − α ∇L_S(φ)``.
      num_steps: ``K >= 1`` (static).
      first_order: apply ``stop_gradient`` to each inner gradient (FOMAML): the
        meta-gradient then ignores the Hessian terms.
      remat: wrap each inner step in ``jax.checkpoint``: the backward pass
        recomputes a step's activations instead of storing them, about one
        extra forward/backward per step for memory that no longer holds every
        step's activations.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      observe: optional ``φ -> pytree`` (``(φ, s, k) -> pytree`` with model
        state, ``k`` the steps taken) evaluated after every step (MAML++'s
        per-step query losses, adaptation curves).
      state: the model state ``s_0`` when ``has_state=True``; each support pass
        returns the next, ``s_{k+1}``, which is not differentiated.
      has_state: whether ``loss_fn`` is a ``StatefulLossFn``.
      training: passed to a stateful ``loss_fn`` (static).
      pass_inner_step: also pass ``step=k`` (a traced int) to a stateful
        ``loss_fn`` at inner step ``k``: for per-step batch-norm statistics and
        weights (MAML++'s BNRS / BNWB, ``Conv4(per_step_norm=...)``).

    Returns:
      ``(φ_K, trace)``; see ``InnerTrace``.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> loss_fn = lambda w, b: jnp.mean((b[0] @ w - b[1]) ** 2)
      >>> x, y = jnp.ones((4, 1)), jnp.ones(4)
      >>> phi, trace = inner_loop(loss_fn, jnp.zeros(1), (x, y),
      ...                         optimizer=optax.sgd(0.25), num_steps=2)
      >>> phi.tolist(), trace.support_loss.tolist()
      ([0.75], [1.0, 0.25])
    """
    num_steps = _validation.check_positive_int("num_steps", num_steps)

    if pass_inner_step and not has_state:
        raise ValueError("pass_inner_step needs a stateful loss (has_state=True).")

    def support_loss(p, s, k):
        loss, _, s = call_loss(
            loss_fn,
            p,
            support,
            has_aux=has_aux,
            state=s,
            has_state=has_state,
            training=training,
            step=k if pass_inner_step else None,
        )
        return loss, s

    def step(carry, k):
        p, opt_state, s = carry
        (loss, s), grads = jax.value_and_grad(support_loss, has_aux=True)(p, s, k)
        if first_order:
            grads = jax.lax.stop_gradient(grads)
        updates, opt_state = optimizer.update(grads, opt_state, p)
        p = optax.apply_updates(p, updates)
        if observe is None:
            observed = None
        else:
            observed = observe(p, s, k + 1) if has_state else observe(p)
        return (p, opt_state, s), (loss, observed)

    if remat:
        step = jax.checkpoint(step)
    # Under shard_map: each device descends its own support loss, and optimizer
    # or model state that depends on the support keeps one type in the scan
    # carry (see _varying).
    carry = _varying.like_data((params, optimizer.init(params), state), support)
    # Stateless loops scan over nothing, so their programs carry no counter.
    ks = jnp.arange(num_steps) if has_state else None
    (params, _, state), (losses, observed) = jax.lax.scan(
        step, carry, ks, length=num_steps
    )
    return params, InnerTrace(losses, observed, state)


def adaptation_curve(
    loss_fn: LossFn,
    params: Params,
    task: Task,
    *,
    optimizer: optax.GradientTransformation,
    num_steps: int,
    has_aux: bool = False,
    state: ModelState = None,
    has_state: bool = False,
    pass_inner_step: bool = False,
    query_state: str = "start",
) -> Aux:
    """Support and query metrics after ``0, 1, ..., num_steps`` inner steps.

    The same ``inner_loop`` as training, observing the metrics after each step.
    Used for evaluation: nothing here is meant to be differentiated. With a
    stateful loss the support passes run as in meta-training (``training=True``:
    the support set's batch statistics, as the inner loop was meta-trained to
    descend) and the query set is evaluated in inference mode at ``state`` (the
    running averages), so each query prediction depends on that example and
    the support set only. The state is not updated. ``query_state="support"``
    evaluates the query set at the state the support pass at the same
    parameters leaves instead (e.g. the support set's batch statistics).

    Returns:
      A dict of arrays of shape ``(num_steps + 1,)``: ``support_loss``,
      ``query_loss`` and ``query_<key>`` for every key of ``loss_fn``'s aux.
    """
    _validation.check_task(task, "adaptation_curve")
    num_steps = _validation.check_positive_int("num_steps", num_steps)

    evaluate = functools.partial(
        call_loss,
        loss_fn,
        has_aux=has_aux,
        state=state,
        has_state=has_state,
        training=False,
    )

    def metrics(p, _state=None, k=0):
        step = k if pass_inner_step else None
        s_loss, _, s_new = evaluate(p, task.support, step=step, training=True)
        q_state = s_new if query_state == "support" else state
        q_loss, q_aux, _ = evaluate(p, task.query, step=step, state=q_state)
        return {
            "support_loss": s_loss,
            "query_loss": q_loss,
            **{f"query_{k}": v for k, v in q_aux.items()},
        }

    _, trace = inner_loop(
        loss_fn,
        params,
        task.support,
        optimizer=optimizer,
        num_steps=num_steps,
        has_aux=has_aux,
        observe=metrics,
        state=state,
        has_state=has_state,
        training=True,
        pass_inner_step=pass_inner_step,
    )
    return jax.tree.map(
        lambda first, rest: jnp.concatenate([first[None], rest]),
        metrics(params),
        trace.observed,
    )


def loss_and_aux(
    loss_fn: LossFn, params: Params, batch: Batch, *, has_aux: bool = False
) -> tuple[jax.Array, Aux]:
    """Calls ``loss_fn`` and returns ``(loss, aux)`` with ``aux = {}`` if it has none.

    Raises a clear error if the loss is not a floating-point scalar.
    """
    return _validation.split_loss_output(
        loss_fn(params, batch), has_aux, "loss_fn(params, batch)"
    )


def call_loss(
    loss_fn: Callable[..., Any],
    params: Params,
    batch: Batch,
    *,
    has_aux: bool = False,
    state: ModelState = None,
    has_state: bool = False,
    training: bool = True,
    step: Any = None,
    stop_state_gradient: bool = True,
) -> tuple[jax.Array, Aux, ModelState]:
    """Calls a plain or stateful ``loss_fn`` and returns ``(loss, aux, new_state)``.

    A plain ``loss_fn(params, batch)`` leaves ``state`` as it is; a stateful one
    is called as ``loss_fn(params, state, batch, training=training)`` and its
    new state is returned under ``stop_gradient`` (unless
    ``stop_state_gradient=False``). ``step`` (the inner step, when not ``None``)
    is passed on as ``step=step``.
    """
    if not has_state:
        loss, aux = loss_and_aux(loss_fn, params, batch, has_aux=has_aux)
        return loss, aux, state
    kwargs = {} if step is None else {"step": step}
    out = loss_fn(params, state, batch, training=training, **kwargs)
    where = "loss_fn(params, state, batch, training=...)"
    if not (isinstance(out, tuple) and len(out) == 2):
        raise TypeError(
            f"{where} with has_state=True must return (loss, new_state) (or "
            f"((loss, aux), new_state) with has_aux=True); got "
            f"{type(out).__name__}."
        )
    out, new_state = out
    loss, aux = _validation.split_loss_output(out, has_aux, where)
    _validation.check_state_structure(state, new_state, where)
    if stop_state_gradient:
        new_state = jax.lax.stop_gradient(new_state)
    return loss, aux, new_state


def task_metrics(
    loss_fn: Callable[..., Any],
    params: Params,
    task_params: Params,
    task: Task,
    support_loss_pre: jax.Array,
    *,
    has_aux: bool = False,
    query_post: tuple[jax.Array, Aux] | None = None,
    state: ModelState = None,
    has_state: bool = False,
    post_step: Any = None,
) -> Aux:
    """Per-task diagnostics before and after adaptation (no gradient flows).

    Args:
      params, task_params: the parameters before and after adaptation.
      support_loss_pre: the support loss at ``params`` (the inner loop's first).
      query_post: ``(loss, aux)`` of ``loss_fn`` at ``task_params`` on the query
        set if the caller already has it (the meta-loss), reused instead of a
        second forward pass.
      state, has_state: the model state the task started from, for a stateful
        ``loss_fn`` (called in training mode; its new state is discarded).
      post_step: for a loss that takes the inner step (``pass_inner_step``),
        the step count after adaptation; before it, ``0`` is passed.

    Returns:
      ``support_loss_pre/post``, ``query_loss_pre/post`` and
      ``query_<key>_pre/post`` for every key of ``loss_fn``'s aux.
    """
    before = jax.lax.stop_gradient(params)
    after = jax.lax.stop_gradient(task_params)
    evaluate = functools.partial(
        call_loss, loss_fn, has_aux=has_aux, state=state, has_state=has_state
    )
    pre_step = None if post_step is None else 0
    q_pre, q_aux_pre, _ = evaluate(before, task.query, step=pre_step)
    if query_post is None:
        query_post = evaluate(after, task.query, step=post_step)[:2]
    q_post, q_aux_post = jax.lax.stop_gradient(query_post)
    s_post, _, _ = evaluate(after, task.support, step=post_step)
    aux = {
        "support_loss_pre": jax.lax.stop_gradient(support_loss_pre),
        "support_loss_post": s_post,
        "query_loss_pre": q_pre,
        "query_loss_post": q_post,
    }
    aux.update({f"query_{k}_pre": v for k, v in q_aux_pre.items()})
    aux.update({f"query_{k}_post": v for k, v in q_aux_post.items()})
    return aux


TaskBatching = Literal["auto", "vmap", "scan", "unroll"]
TASK_BATCHING = ("auto", "vmap", "scan", "unroll")

# The "auto" rule's chunk bounds on CPU: at most 4 tasks and about 160 examples
# a chunk, so one chunk's activations stay in cache-sized matmuls.
_CPU_MAX_CHUNK_SIZE = 4
_CPU_CHUNK_EXAMPLES = 160


def auto_batching(tasks: TaskBatch) -> tuple[str, int | None]:
    """The task batching ``"auto"`` resolves to, and its chunk size.

    On XLA:CPU with one device, tasks whose inputs are images (a leaf of rank
    >= 4 per task: examples × H × W × C) are scanned in small vmapped chunks:
    vmapped per-task convolutions become grouped convolutions, which XLA:CPU
    runs far below its plain-convolution speed. Everything else (MLPs, any
    accelerator, several devices, where the task axis may be sharded) is
    vmapped.
    """
    num_tasks = _validation.check_task_batch(tasks, "auto_batching")
    leaves = jax.tree.leaves(tasks)
    images = any(jnp.ndim(x) >= 5 for x in leaves)
    if jax.default_backend() != "cpu" or jax.device_count() > 1 or not images:
        return "vmap", None
    examples = sum(jnp.shape(x)[1] for x in jax.tree.leaves(tasks.support)[:1])
    examples += sum(jnp.shape(x)[1] for x in jax.tree.leaves(tasks.query)[:1])
    return "scan", cpu_chunk_size(num_tasks, examples)


def cpu_chunk_size(num_tasks: int, examples_per_task: int) -> int:
    """Tasks per ``scan`` chunk on CPU: the largest divisor of ``num_tasks`` up to
    ``min(4, 160 // examples_per_task)`` (at least 1).
    """
    limit = min(_CPU_MAX_CHUNK_SIZE, max(1, _CPU_CHUNK_EXAMPLES // examples_per_task))
    return max(d for d in range(1, limit + 1) if num_tasks % d == 0)


StateReduction = Callable[[ModelState], ModelState]
"""``per_task_states -> state``: combines the new model states of ``T`` tasks
(leaves with a leading task axis ``T``) into one."""


def mean_state(per_task_states: ModelState) -> ModelState:
    """The task-mean of every floating-point state leaf; other leaves (counters)
    take the first task's value.

    For exponential moving averages (BatchNorm running statistics) the mean of
    the tasks' updated averages is the average updated with the mean of their
    batch statistics, since the update is linear.
    """
    return jax.tree.map(
        lambda x: x.mean(0) if jnp.issubdtype(x.dtype, jnp.inexact) else x[0],
        per_task_states,
    )


def meta_value_and_grad(
    learner: MetaLearner,
    meta_params: MetaParams,
    tasks: TaskBatch,
    *,
    batching: TaskBatching = "auto",
    chunk_size: int | None = None,
    outer_step: Any = None,
    state: ModelState = None,
    state_reduction: StateReduction = mean_state,
) -> tuple[tuple[jax.Array, Any], MetaParams]:
    """The meta-loss and meta-gradient averaged over a batch of tasks.

    ``loss = (1/T) Σ_i meta_loss(meta_params, task_i)`` and its gradient with
    respect to ``meta_params``. How the ``T`` tasks are batched changes speed and
    memory but not the result (up to float rounding):

    * ``"auto"`` (default): the fastest of the below for the backend at hand
      (see ``auto_batching``); ``chunk_size`` overrides its chunk.
    * ``"vmap"``: all tasks at once with ``jax.vmap``; the fastest for small
      models and on accelerators. On XLA:CPU vmapped per-task convolutions become
      slow grouped convolutions.
    * ``"scan"``: ``lax.scan`` over chunks of ``chunk_size`` tasks (default 1),
      each chunk vmapped; per-chunk gradients are summed, so only one chunk's
      activations are alive at a time (learn2learn's memory profile).
    * ``"unroll"``: a Python loop over chunks inside the trace: every chunk gets
      its own plain (non-grouped) ops. Compile time grows with ``T / chunk_size``.

    Args:
      learner: a ``MetaLearner`` (e.g. from ``maml``).
      meta_params: the meta-parameters.
      tasks: a ``TaskBatch`` whose leaves have a leading task axis of length
        ``T`` (one ``Task`` is refused: ``stack_tasks([task])`` batches it).
      batching: ``"auto"``, ``"vmap"``, ``"scan"`` or ``"unroll"``.
      chunk_size: tasks per chunk for ``"scan"`` / ``"unroll"``; must divide
        ``T``. Ignored by ``"vmap"``.
      outer_step: the training progress passed to ``learner.meta_loss``.
      state: the model state every task starts from, for a learner built with
        ``has_state=True``.
      state_reduction: combines the tasks' new model states (leading axis
        ``T``) into one; default ``mean_state``.

    Returns:
      ``((loss, aux), grads)``: the mean meta-loss, per-task aux (leading axis
      ``T``) and the mean meta-gradient (structure of ``meta_params``). With
      model state, ``((loss, (aux, new_state)), grads)``, like ``jax``'s
      ``has_aux``.
    """
    num_tasks = _validation.check_task_batch(tasks, "meta_value_and_grad")
    _validation.check_params(meta_params, "meta_value_and_grad: meta_params")
    if batching not in TASK_BATCHING:
        raise ValueError(f"batching must be one of {TASK_BATCHING}; got {batching!r}.")
    if batching == "auto":
        batching, auto_chunk = auto_batching(tasks)
        chunk_size = auto_chunk if chunk_size is None else chunk_size
    # Under shard_map: per-device mean gradients, which the caller's pmean over
    # the task axis averages, rather than their sum (see _varying).
    meta_params = _varying.like_data(meta_params, tasks)
    has_state = learner.has_state
    # vmap and scan slice a TaskBatch into TaskBatches; learners take a Task.
    if has_state:

        def meta_loss(mp, task):
            loss, (aux, new_state) = learner.meta_loss(
                mp, Task(*task), state=state, outer_step=outer_step
            )
            return loss, {"aux": aux, "state": new_state}

    else:
        if state is not None:
            raise ValueError(
                "meta_value_and_grad got a model state, but the learner was built "
                "without has_state=True, so its loss takes none."
            )

        def meta_loss(mp, task):
            loss, aux = learner.meta_loss(mp, Task(*task), outer_step=outer_step)
            return loss, {"aux": aux, "state": None}

    # Per-task gradients summed explicitly (see _sum_over_tasks), not the
    # gradient of a vmapped sum, whose transpose XLA:CPU runs as a slow reduction.
    task_value_and_grad = jax.vmap(
        jax.value_and_grad(meta_loss, has_aux=True), in_axes=(None, 0)
    )

    def chunk_grad(mp, task_chunk):
        (losses, aux), grads = task_value_and_grad(mp, task_chunk)
        return (_sum_over_tasks(losses), aux), jax.tree.map(_sum_over_tasks, grads)

    def result(loss_sum, aux, grad_sum):
        loss = loss_sum / num_tasks
        grads = jax.tree.map(lambda g: g / num_tasks, grad_sum)
        if not has_state:
            return (loss, aux["aux"]), grads
        return (loss, (aux["aux"], state_reduction(aux["state"]))), grads

    if batching == "vmap":
        (loss, aux), grads = chunk_grad(meta_params, tasks)
        return result(loss, aux, grads)

    chunk = (
        1
        if chunk_size is None
        else _validation.check_positive_int("chunk_size", chunk_size)
    )
    if num_tasks % chunk:
        raise ValueError(
            f"chunk_size={chunk} must divide the number of tasks ({num_tasks})."
        )
    num_chunks = num_tasks // chunk
    chunks = jax.tree.map(lambda x: x.reshape(num_chunks, chunk, *x.shape[1:]), tasks)

    if batching == "scan":

        def body(grad_sum, task_chunk):
            (loss, aux), grads = chunk_grad(meta_params, task_chunk)
            return _tree_add(grad_sum, grads), (loss, aux)

        zeros = jax.tree.map(jnp.zeros_like, meta_params)
        grad_sum, (losses, aux) = jax.lax.scan(body, zeros, chunks)
    else:
        grad_sum, losses, auxes = None, [], []
        for i in range(num_chunks):
            (loss, aux), grads = chunk_grad(
                meta_params, jax.tree.map(lambda x, i=i: x[i], chunks)
            )
            grad_sum = grads if grad_sum is None else _tree_add(grad_sum, grads)
            losses.append(loss)
            auxes.append(aux)
        losses = jnp.stack(losses)
        aux = jax.tree.map(lambda *xs: jnp.stack(xs), *auxes)

    aux = jax.tree.map(lambda x: x.reshape(num_tasks, *x.shape[2:]), aux)
    return result(jnp.sum(losses), aux, grad_sum)


def _sum_over_tasks(x: jax.Array) -> jax.Array:
    """``x.sum(0)`` for ``(T, ...)`` ``x``, as a product with a vector of ones.

    XLA:CPU runs a sum over a leading axis as a slow reduction, far below the
    speed of a matrix-vector product over the same data. ``HIGHEST`` precision
    keeps it a full-precision sum on accelerators (no TF32 or bfloat16 passes).
    """
    if not jnp.issubdtype(x.dtype, jnp.inexact):
        return x.sum(0)
    ones = jnp.ones((x.shape[0],), x.dtype)
    rows = x.reshape(x.shape[0], -1)
    total = jnp.dot(ones, rows, precision=jax.lax.Precision.HIGHEST)
    return total.reshape(x.shape[1:])


def _tree_add(a: Any, b: Any) -> Any:
    return jax.tree.map(jnp.add, a, b)


def predict(
    learner: MetaLearner,
    meta_params: MetaParams,
    support: Batch,
    inputs: Any,
    *,
    apply_fn: Callable[..., Any] | None = None,
    num_steps: int | None = None,
    state: ModelState = None,
) -> Any:
    """Predictions on ``inputs`` of a learner adapted to one task's ``support``.

    Gradient-based learners adapt (``learner.adapt``, ``num_steps`` inner
    steps, default the trained number) and run the model:
    ``apply_fn(adapted_params, inputs)``, or for a learner with model state
    ``apply_fn(adapted_params, state, inputs)``: adapted on the support set as
    in meta-training, predicting in inference mode with ``state``. Learners
    with a classifier of their own (ProtoNets: negative distances to the
    support's class prototypes) use it, and ``apply_fn`` is not needed.

    Examples:
      >>> import jax.numpy as jnp
      >>> import maml_jax
      >>> apply_fn = lambda w, x: x @ w
      >>> loss_fn = lambda w, b: jnp.mean((apply_fn(w, b[0]) - b[1]) ** 2)
      >>> learner = maml_jax.maml(loss_fn, inner_lr=0.25, num_inner_steps=1)
      >>> support = (jnp.ones((4, 1)), jnp.ones(4))
      >>> maml_jax.predict(learner, jnp.zeros(1), support, jnp.ones((1, 1)),
      ...                  apply_fn=apply_fn).tolist()
      [0.5]
    """
    kwargs = {"state": state} if learner.has_state else {}
    if learner.predict is not None:
        return learner.predict(
            meta_params, support, inputs, num_steps=num_steps, **kwargs
        )
    if apply_fn is None:
        raise TypeError(
            "predict needs apply_fn(params, inputs) -> outputs, the model's forward "
            "pass, to run the adapted parameters of a gradient-based learner."
        )
    if not learner.has_state:
        return apply_fn(
            learner.adapt(meta_params, support, num_steps=num_steps), inputs
        )
    params, new_state = learner.adapt(
        meta_params, support, num_steps=num_steps, **kwargs
    )
    if learner.query_state == "support":
        state = new_state
    return apply_fn(params, state, inputs)
