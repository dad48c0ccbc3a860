"""Factories that return a ``MetaLearner``: MAML and first-order MAML."""

from __future__ import annotations

from typing import Any

from maml_jax import _validation, core
from maml_jax.types import Batch, LossFn, MetaLearner, Params, Task


def maml(
    loss_fn: LossFn,
    *,
    inner_lr: Any,
    num_inner_steps: int,
    first_order: bool = False,
    remat: bool = False,
    has_aux: bool = False,
) -> MetaLearner:
    r"""Model-Agnostic Meta-Learning (MAML).

    For a task with support set ``S`` and query set ``Q``, the inner loop runs
    ``φ_0 = θ``, ``φ_{k+1} = φ_k − α ∇_φ L_S(φ_k)`` for ``k < K`` and the
    meta-loss is ``L_Q(φ_K)``. Its gradient with respect to ``θ`` (second order,
    through the inner loop) is ``Π_k (I − α H_S(φ_k)) ∇L_Q(φ_K)``; with
    ``first_order=True`` the Hessian terms are dropped and it is ``∇L_Q(φ_K)``.

    Args:
      loss_fn: ``loss_fn(params, batch) -> loss`` (or ``(loss, aux)`` with
        ``has_aux=True``; aux values such as accuracy are reported before and
        after adaptation).
      inner_lr: ``α``: a positive scalar, or a pytree matching ``params`` with a
        scalar or parameter-shaped leaf per parameter.
      num_inner_steps: ``K >= 1``, the inner steps used in ``adapt`` and
        ``meta_loss``. The inner loop is a ``lax.scan``: compile time does not
        grow with ``K``.
      first_order: stop the gradient through the inner gradients (FOMAML).
      remat: recompute each inner step in the backward pass (``jax.checkpoint``)
        instead of storing its activations: peak memory no longer grows with
        the activations of every step, for ~one extra forward/backward per step.
      has_aux: whether ``loss_fn`` returns ``(loss, aux_dict)``.

    Returns:
      A ``MetaLearner`` with ``init`` (identity: the meta-parameters are the
      initialisation ``θ``), ``adapt``, ``meta_loss`` and ``adaptation_curve``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import maml_jax
      >>> def loss_fn(w, batch):
      ...     x, y = batch
      ...     return jnp.mean((x @ w - y) ** 2)
      >>> learner = maml_jax.maml(loss_fn, inner_lr=0.1, num_inner_steps=1)
      >>> x = jnp.ones((4, 2)); y = jnp.ones((4,))
      >>> task = maml_jax.Task(support=(x, y), query=(x, y))
      >>> loss, aux = learner.meta_loss(jnp.zeros(2), task)
      >>> round(float(loss), 4)  # w after one step = 0.2 * [1, 1]; (0.4 - 1)^2
      0.36

    References:
      Finn, Abbeel & Levine, "Model-Agnostic Meta-Learning for Fast Adaptation of
      Deep Networks", ICML 2017.
    """
    inner_lr = _validation.check_learning_rate("inner_lr", inner_lr)
    num_inner_steps = _validation.check_positive_int("num_inner_steps", num_inner_steps)

    def init(params: Params) -> Params:
        _validation.check_lr_matches_params("inner_lr", inner_lr, params)
        return params

    def run_inner(params: Params, support: Batch):
        _validation.check_lr_matches_params("inner_lr", inner_lr, params)
        return core.inner_loop(
            loss_fn,
            params,
            support,
            inner_lr=inner_lr,
            num_steps=num_inner_steps,
            first_order=first_order,
            remat=remat,
            has_aux=has_aux,
        )

    def adapt(meta_params: Params, support: Batch) -> Params:
        return run_inner(meta_params, support)[0]

    def meta_loss(meta_params: Params, task: Task):
        _validation.check_task(task, "meta_loss")
        task_params, support_losses = run_inner(meta_params, task.support)
        loss, _ = core.evaluate_loss(loss_fn, task_params, task.query, has_aux=has_aux)
        aux = core.task_metrics(
            loss_fn, meta_params, task_params, task, support_losses, has_aux=has_aux
        )
        return loss, aux

    def adaptation_curve(meta_params: Params, task: Task, num_steps: int):
        _validation.check_lr_matches_params("inner_lr", inner_lr, meta_params)
        return core.adaptation_curve(
            loss_fn,
            meta_params,
            task,
            inner_lr=inner_lr,
            num_steps=num_steps,
            has_aux=has_aux,
        )

    return MetaLearner(init, adapt, meta_loss, adaptation_curve)


def fomaml(
    loss_fn: LossFn,
    *,
    inner_lr: Any,
    num_inner_steps: int,
    remat: bool = False,
    has_aux: bool = False,
) -> MetaLearner:
    """First-order MAML: ``maml(..., first_order=True)``.

    The meta-gradient is ``∇L_Q(φ_K)`` evaluated at the adapted parameters, with
    no second-order terms, so memory and time are those of plain training.

    References:
      Finn, Abbeel & Levine, ICML 2017 (Section 5.2, first-order approximation).
    """
    return maml(
        loss_fn,
        inner_lr=inner_lr,
        num_inner_steps=num_inner_steps,
        first_order=True,
        remat=remat,
        has_aux=has_aux,
    )
