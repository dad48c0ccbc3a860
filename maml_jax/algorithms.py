"""Factories that return a ``MetaLearner``: MAML, first-order MAML and ANIL."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

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
        return core.adapted_query_loss(
            loss_fn, meta_params, task_params, task, support_losses, has_aux=has_aux
        )

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


AdaptMask = Any
"""A pytree of bools matching params, or ``params -> such a pytree``."""


def anil(
    loss_fn: LossFn,
    *,
    inner_lr: float,
    num_inner_steps: int,
    adapt_mask: AdaptMask | Callable[[Params], AdaptMask],
    first_order: bool = False,
    remat: bool = False,
    has_aux: bool = False,
) -> MetaLearner:
    r"""Almost No Inner Loop (ANIL): MAML where only some parameters adapt.

    Parameters are split by ``adapt_mask`` into adapted ones ``θ_h`` (usually the
    head) and frozen ones ``θ_b`` (the body). The inner loop runs
    ``φ_{k+1} = φ_k − α ∇_φ L_S(θ_b, φ_k)`` from ``φ_0 = θ_h`` while ``θ_b`` stays
    fixed; the meta-loss is ``L_Q(θ_b, φ_K)`` and the outer gradient reaches
    both ``θ_b`` (directly and through the inner loop) and ``θ_h``. Only the
    adapted parameters are differentiated in the inner loop, so the inner loop
    costs a fraction of MAML's.

    Args:
      loss_fn: ``loss_fn(params, batch) -> loss`` (or ``(loss, aux)``).
      inner_lr: ``α > 0``.
      num_inner_steps: ``K >= 1``.
      adapt_mask: a pytree of bools with the structure of ``params`` (``True``:
        adapted in the inner loop), or a function ``params -> mask``, like
        ``optax.masked``.
      first_order: drop second-order terms (stop the inner gradients).
      remat: ``jax.checkpoint`` each inner step.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.

    Returns:
      A ``MetaLearner`` whose meta-parameters are the full ``params``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import maml_jax
      >>> def loss_fn(p, batch):
      ...     x, y = batch
      ...     return jnp.mean((jnp.tanh(x @ p["body"]) @ p["head"] - y) ** 2)
      >>> params = {"body": jnp.ones((2, 3)), "head": jnp.zeros(3)}
      >>> learner = maml_jax.anil(loss_fn, inner_lr=0.1, num_inner_steps=2,
      ...                         adapt_mask={"body": False, "head": True})
      >>> adapted = learner.adapt(params, (jnp.ones((4, 2)), jnp.ones(4)))
      >>> bool(jnp.all(adapted["body"] == params["body"]))
      True

    References:
      Raghu, Raghu, Bengio & Vinyals, "Rapid Learning or Feature Reuse? Towards
      Understanding the Effectiveness of MAML", ICLR 2020.
    """
    inner_lr = _validation.check_learning_rate("inner_lr", inner_lr)
    num_inner_steps = _validation.check_positive_int("num_inner_steps", num_inner_steps)

    def split(params):
        mask = adapt_mask(params) if callable(adapt_mask) else adapt_mask
        leaves, treedef = jax.tree.flatten(params)
        try:
            flags = jax.tree.leaves(jax.tree.broadcast(mask, params))
        except (ValueError, TypeError) as error:
            raise ValueError(
                f"adapt_mask must have the structure of params (one bool per "
                f"parameter leaf, or a prefix of it): {error}"
            ) from None
        flags = [bool(f) for f in flags]
        if not any(flags):
            raise ValueError("adapt_mask selects no parameter to adapt.")
        adapted = [leaf for leaf, f in zip(leaves, flags, strict=True) if f]
        frozen = [leaf for leaf, f in zip(leaves, flags, strict=True) if not f]

        def merge(adapted_leaves, frozen_leaves):
            a, b = iter(adapted_leaves), iter(frozen_leaves)
            return treedef.unflatten([next(a) if f else next(b) for f in flags])

        return adapted, frozen, merge

    def run_inner(params, support):
        adapted, frozen, merge = split(params)
        inner_loss = lambda a, batch: loss_fn(merge(a, frozen), batch)
        adapted, losses = core.inner_loop(
            inner_loss,
            adapted,
            support,
            inner_lr=inner_lr,
            num_steps=num_inner_steps,
            first_order=first_order,
            remat=remat,
            has_aux=has_aux,
        )
        return merge(adapted, frozen), losses

    def init(params):
        split(params)
        return params

    def adapt(meta_params, support):
        return run_inner(meta_params, support)[0]

    def meta_loss(meta_params, task: Task):
        _validation.check_task(task, "meta_loss")
        task_params, support_losses = run_inner(meta_params, task.support)
        return core.adapted_query_loss(
            loss_fn, meta_params, task_params, task, support_losses, has_aux=has_aux
        )

    def adaptation_curve(meta_params, task: Task, num_steps: int):
        adapted, frozen, merge = split(meta_params)
        inner_loss = lambda a, batch: loss_fn(merge(a, frozen), batch)
        return core.adaptation_curve(
            inner_loss,
            adapted,
            task,
            inner_lr=inner_lr,
            num_steps=num_steps,
            has_aux=has_aux,
        )

    return MetaLearner(init, adapt, meta_loss, adaptation_curve)
