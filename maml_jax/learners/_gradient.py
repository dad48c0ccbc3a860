"""The shared skeleton of the gradient-based learners.

Each learner says what its inner problem is (where the inner loop starts, which
loss it descends, with which optax update rule, and how the adapted part maps
back to the model's parameters); ``gradient_learner`` turns that into the
``MetaLearner`` contract, so ``adapt``, ``meta_loss`` and ``adaptation_curve``
run the same ``core.inner_loop`` for every learner.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import optax

from maml_jax import _validation, core
from maml_jax.types import Aux, Batch, LossFn, MetaLearner, MetaParams, Params, Task


class InnerProblem(NamedTuple):
    """One task's inner problem, built from the meta-parameters.

    Attributes:
      start: where the inner loop starts (the adapted part of the parameters).
      loss_fn: the loss of that part on a batch.
      optimizer: the inner update rule (may close over traced meta-parameters).
      to_model: maps the adapted part to the model's full parameters.
    """

    start: Params
    loss_fn: LossFn
    optimizer: optax.GradientTransformation
    to_model: Callable[[Params], Params] = lambda p: p


Objective = Callable[..., jax.Array]
"""``(meta_params, task_params, trace, query_loss, outer_step) -> meta-loss``."""


def gradient_learner(
    *,
    init: Callable[[Params], MetaParams],
    inner_problem: Callable[[MetaParams], InnerProblem],
    num_inner_steps: int,
    first_order: bool,
    remat: bool,
    has_aux: bool,
    has_state: bool = False,
    pass_inner_step: bool = False,
    query_training: bool = True,
    query_state: str = "start",
    objective: Objective | None = None,
    observe_query: bool = False,
) -> MetaLearner:
    """A ``MetaLearner`` whose tasks adapt by ``core.inner_loop``.

    Args:
      init: ``params -> meta_params``.
      inner_problem: ``meta_params -> InnerProblem``.
      num_inner_steps: the trained number of inner steps ``K``.
      first_order, remat, has_aux, has_state, pass_inner_step: as in
        ``core.inner_loop``; with ``pass_inner_step`` the query pass after
        ``k`` steps gets ``step=k``.
      query_training: with model state, run the meta-training query pass in
        training mode (batch statistics; the default) or, if ``False``, in
        inference mode at the task's starting state (the running averages), as
        evaluation scores the query set; the state then moves with the support
        passes only.
      objective: replaces the meta-loss ``L_Q(φ_K)`` (MAML++'s multi-step loss,
        Reptile's surrogate); called with the meta-parameters, the adapted
        part, the inner trace, ``L_Q(φ_K)`` and the outer step.
      observe_query: record the query ``(loss, aux)`` after every inner step in
        ``trace.observed`` (for ``objective``).

    With model state, each task threads it through its ``K`` support passes and
    then its query pass (all in training mode); ``meta_loss`` returns the state
    after the query pass. ``adapt`` runs the support passes in training mode
    too (``training=False`` for inference mode) and returns the state they
    leave; ``adaptation_curve`` evaluates the query set in inference mode.
    """
    has_state = check_flag("has_state", has_state)
    if query_state not in QUERY_STATES:
        raise ValueError(
            f"query_state must be one of {QUERY_STATES}; got {query_state!r}."
        )
    if query_state == "support" and not has_state:
        raise ValueError("query_state='support' needs has_state=True.")
    if not check_flag("query_training", query_training):
        if not has_state:
            raise ValueError("query_training=False needs has_state=True.")
        if pass_inner_step:
            raise ValueError(
                "query_training=False with per-step norms would score the query "
                "with statistics no support pass updates."
            )

    def steps(num_steps: int | None) -> int:
        if num_steps is None:
            return num_inner_steps
        return _validation.check_positive_int("num_steps", num_steps)

    def check_state(state: Any, where: str) -> dict[str, Any]:
        if has_state:
            if state is None:
                raise ValueError(
                    f"{where}: the learner was built with has_state=True, so it "
                    f"needs the model state: pass state=... (e.g. the model's "
                    f"batch_stats, or train_state.model_state)."
                )
            return {"state": state, "has_state": True}
        if state is not None:
            raise ValueError(
                f"{where} got a model state, but the learner was built without "
                f"has_state=True, so its loss takes none."
            )
        return {}

    def inference_state(problem, params, support, state, step=None):
        """The state an inference-mode query pass at ``params`` runs at."""
        if query_state == "start":
            return state
        return core.call_loss(
            problem.loss_fn,
            params,
            support,
            has_aux=has_aux,
            state=state,
            has_state=True,
            training=True,
            step=step if pass_inner_step else None,
            stop_state_gradient=False,
        )[2]

    def run(meta_params, support, num_steps, query=None, *, state=None, training=True):
        problem = inner_problem(meta_params)
        observe = None
        if query is not None:

            def observe(p, s=state, k=None):
                if not query_training:
                    s = inference_state(problem, p, support, state, k)
                return core.call_loss(
                    problem.loss_fn,
                    p,
                    query,
                    has_aux=has_aux,
                    state=s,
                    has_state=has_state,
                    training=training and query_training,
                    step=k if pass_inner_step else None,
                )

        phi, trace = core.inner_loop(
            problem.loss_fn,
            problem.start,
            support,
            optimizer=problem.optimizer,
            num_steps=num_steps,
            first_order=first_order,
            remat=remat,
            has_aux=has_aux,
            observe=observe,
            state=state,
            has_state=has_state,
            training=training,
            pass_inner_step=pass_inner_step,
        )
        return problem, phi, trace

    def adapt(
        meta_params: MetaParams,
        support: Batch,
        *,
        num_steps: int | None = None,
        state: Any = None,
        training: bool = True,
    ) -> Any:
        _validation.check_examples(support, "adapt: support")
        stateful = check_state(state, "adapt")
        problem, phi, trace = run(
            meta_params,
            support,
            steps(num_steps),
            state=state,
            training=check_flag("training", training),
        )
        if not stateful:
            return problem.to_model(phi)
        if query_state == "support":
            return problem.to_model(phi), inference_state(
                problem, phi, support, state, steps(num_steps)
            )
        return problem.to_model(phi), trace.state

    def meta_loss(
        meta_params: MetaParams,
        task: Task,
        *,
        outer_step: Any = None,
        state: Any = None,
    ) -> tuple[jax.Array, Any]:
        _validation.check_task(task, "meta_loss")
        stateful = check_state(state, "meta_loss")
        query = task.query if observe_query else None
        problem, phi, trace = run(
            meta_params, task.support, num_inner_steps, query, state=state
        )
        if observe_query:
            *query_post, query_state = jax.tree.map(lambda x: x[-1], trace.observed)
        else:
            *query_post, query_state = core.call_loss(
                problem.loss_fn,
                phi,
                task.query,
                has_aux=has_aux,
                state=(
                    trace.state
                    if query_training
                    else inference_state(
                        problem, phi, task.support, state, num_inner_steps
                    )
                ),
                has_state=has_state,
                training=query_training,
                step=num_inner_steps if pass_inner_step else None,
            )
        if not query_training:
            query_state = trace.state
        aux = core.task_metrics(
            problem.loss_fn,
            problem.start,
            phi,
            task,
            trace.support_loss[0],
            has_aux=has_aux,
            query_post=tuple(query_post),
            post_step=num_inner_steps if pass_inner_step else None,
            **stateful,
        )
        loss = query_post[0]
        if objective is not None:
            loss = objective(meta_params, phi, trace, loss, outer_step)
        if not stateful:
            return loss, aux
        return loss, (aux, query_state)

    def adaptation_curve(
        meta_params: MetaParams, task: Task, num_steps: int, *, state: Any = None
    ) -> Aux:
        stateful = check_state(state, "adaptation_curve")
        problem = inner_problem(meta_params)
        return core.adaptation_curve(
            problem.loss_fn,
            problem.start,
            task,
            optimizer=problem.optimizer,
            num_steps=num_steps,
            has_aux=has_aux,
            pass_inner_step=pass_inner_step,
            query_state=query_state,
            **stateful,
        )

    def checked_init(params: Params) -> MetaParams:
        _validation.check_params(params, "init")
        return init(params)

    return MetaLearner(
        checked_init,
        adapt,
        meta_loss,
        adaptation_curve,
        has_state=has_state,
        query_state=query_state,
    )


QUERY_STATES = ("start", "support")


def check_flag(name: str, value: Any) -> bool:
    """Returns ``value`` if it is a bool (a static option), else a ``TypeError``."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False; got {value!r}.")
    return value


def reject_inner_optimizer(name: str, inner_optimizer: Any) -> None:
    if inner_optimizer is not None:
        raise ValueError(
            f"{name} learns its inner update rule (its rates are meta-parameters), "
            f"so it takes no inner_optimizer; set the initial rate with inner_lr."
        )


def check_scalar_lr(inner_lr: Any) -> float:
    inner_lr = _validation.check_learning_rate("inner_lr", inner_lr)
    if not _validation.is_scalar(inner_lr):
        raise TypeError(
            f"inner_lr is the initial value of the learned rates: a number; got "
            f"{type(inner_lr).__name__}."
        )
    return inner_lr


def check_meta_params(meta_params: Any, kind: type, name: str) -> None:
    if not isinstance(meta_params, kind):
        raise TypeError(
            f"{name}'s meta-parameters are a maml_jax.{kind.__name__}(params, "
            f"inner_lr); got {type(meta_params).__name__}. Build them with "
            f"learner.init(params)."
        )
