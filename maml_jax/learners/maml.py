"""MAML, first-order MAML and ANIL: learned initialisations, any inner optimizer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

from maml_jax import _validation, update_rules
from maml_jax.learners._gradient import InnerProblem, check_flag, gradient_learner
from maml_jax.types import LossFn, MetaLearner, Params


def maml(
    loss_fn: LossFn,
    *,
    inner_lr: Any = None,
    inner_optimizer: optax.GradientTransformation | None = None,
    num_inner_steps: int,
    first_order: bool = False,
    remat: bool = False,
    has_aux: bool = False,
    has_state: bool = False,
    per_step_norm: bool = False,
    query_training: bool = True,
    query_state: str = "start",
) -> MetaLearner:
    r"""Model-Agnostic Meta-Learning (MAML).

    For a task with support set ``S`` and query set ``Q``, the inner loop runs
    ``K`` steps of an optax optimizer on ``L_S`` from ``φ_0 = θ`` (with
    ``inner_lr=α``: ``φ_{k+1} = φ_k − α ∇_φ L_S(φ_k)``) and the meta-loss is
    ``L_Q(φ_K)``. Its gradient with respect to ``θ`` is exact and second order,
    through the updates and the optimizer's state (for SGD:
    ``Π_k (I − α H_S(φ_k)) ∇L_Q(φ_K)``); with ``first_order=True`` the Hessian
    terms are dropped.

    Args:
      loss_fn: ``loss_fn(params, batch) -> loss`` (or ``(loss, aux)`` with
        ``has_aux=True``; aux values such as accuracy are reported before and
        after adaptation).
      inner_lr: ``α``: a positive scalar (shorthand for
        ``inner_optimizer=optax.sgd(α)``, identical results), or a pytree
        matching ``params`` with a scalar or parameter-shaped rate per leaf.
      inner_optimizer: any ``optax.GradientTransformation`` (e.g.
        ``optax.adam(1e-2)``, ``optax.sgd(0.1, momentum=0.9)``), differentiated
        through. Give this or ``inner_lr``. Differentiating through Adam needs
        ``eps_root > 0`` (e.g. ``optax.adam(1e-2, eps_root=1e-12)``) when an
        inner gradient can be exactly zero (ReLU networks): the derivative of
        ``sqrt(v)`` at ``v = 0`` is infinite and the meta-gradient becomes NaN.
      num_inner_steps: ``K >= 1``, the trained number of inner steps (``adapt``
        and ``adaptation_curve`` take others). The inner loop is a
        ``lax.scan``: compile time does not grow with ``K``.
      first_order: stop the gradient through the inner gradients (FOMAML).
      remat: recompute each inner step in the backward pass (``jax.checkpoint``)
        instead of storing its activations: peak memory no longer grows with
        the activations of every step, for ~one extra forward/backward per step.
      has_aux: whether ``loss_fn`` returns ``(loss, aux_dict)``.
      has_state: whether ``loss_fn`` carries model state: a ``StatefulLossFn``
        ``loss_fn(params, state, batch, *, training) -> (loss, new_state)``.
      per_step_norm: also pass the inner step to the stateful loss,
        ``loss_fn(..., training, step)``: ``step=k`` for the support pass of
        step ``k`` and the query pass after ``k`` steps, for one set of
        batch-norm statistics and weights per step
        (``Conv4(norm="running", per_step_norm=K + 1)``, MAML++'s BNRS/BNWB).
      query_training: with model state, meta-train the query pass in training
        mode (batch statistics, the default) or, if ``False``, in inference
        mode (the running averages the task started from), as ``evaluate``
        scores queries: training and evaluation then normalise the query set
        the same way.
      query_state: the model state inference-mode query passes use:
        ``"start"`` (the running averages the task started from) or
        ``"support"`` (the state a training-mode support pass at the same
        parameters leaves). With ``Conv4(norm="running", momentum=0.0)`` and
        ``query_training=False``, ``"support"`` normalises each query example
        with the adapted model's support-set statistics (non-transductive, as
        TaskNorm's support moments; Bronskill et al., ICML 2020).

    Returns:
      A ``MetaLearner``; ``init`` is the identity (the meta-parameters are the
      initialisation ``θ``).

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
    optimizer = update_rules.inner_optimizer(inner_lr, inner_optimizer)
    num_inner_steps = _validation.check_positive_int("num_inner_steps", num_inner_steps)
    if check_flag("per_step_norm", per_step_norm) and not has_state:
        raise ValueError(
            "per_step_norm gives the model one set of running statistics per inner "
            "step: it needs a stateful loss (has_state=True)."
        )

    def init(params: Params) -> Params:
        _validation.check_lr_matches_params("inner_lr", inner_lr, params)
        return params

    def inner_problem(meta_params: Params) -> InnerProblem:
        _validation.check_lr_matches_params("inner_lr", inner_lr, meta_params)
        return InnerProblem(meta_params, loss_fn, optimizer)

    return gradient_learner(
        init=init,
        inner_problem=inner_problem,
        num_inner_steps=num_inner_steps,
        first_order=check_flag("first_order", first_order),
        remat=check_flag("remat", remat),
        has_aux=has_aux,
        has_state=has_state,
        pass_inner_step=per_step_norm,
        query_training=query_training,
        query_state=query_state,
    )


def fomaml(
    loss_fn: LossFn,
    *,
    inner_lr: Any = None,
    inner_optimizer: optax.GradientTransformation | None = None,
    num_inner_steps: int,
    first_order: bool = True,
    remat: bool = False,
    has_aux: bool = False,
    has_state: bool = False,
    per_step_norm: bool = False,
    query_training: bool = True,
    query_state: str = "start",
) -> MetaLearner:
    """First-order MAML: ``maml(..., first_order=True)``.

    The meta-gradient is ``∇L_Q(φ_K)`` evaluated at the adapted parameters, with
    no second-order terms, so memory and time are those of plain training.
    ``first_order`` is accepted for a uniform signature and must stay ``True``.

    References:
      Finn, Abbeel & Levine, ICML 2017 (Section 5.2, first-order approximation).
    """
    if first_order is not True:
        raise ValueError(
            "fomaml is first-order by definition; for the second-order "
            "meta-gradient use maml(..., first_order=False)."
        )
    return maml(
        loss_fn,
        inner_lr=inner_lr,
        inner_optimizer=inner_optimizer,
        num_inner_steps=num_inner_steps,
        first_order=True,
        remat=remat,
        has_aux=has_aux,
        has_state=has_state,
        per_step_norm=per_step_norm,
        query_training=query_training,
        query_state=query_state,
    )


AdaptMask = Any
"""A pytree of bools matching params (or a prefix of it), or ``params -> such``."""


def anil(
    loss_fn: LossFn,
    *,
    inner_lr: Any = None,
    inner_optimizer: optax.GradientTransformation | None = None,
    num_inner_steps: int,
    adapt_mask: AdaptMask | Callable[[Params], AdaptMask],
    first_order: bool = False,
    remat: bool = False,
    has_aux: bool = False,
    has_state: bool = False,
) -> MetaLearner:
    r"""Almost No Inner Loop (ANIL): MAML where only some parameters adapt.

    Parameters are split by ``adapt_mask`` into adapted ones ``θ_h`` (usually the
    head) and frozen ones ``θ_b`` (the body). The inner loop runs the inner
    optimizer on ``L_S(θ_b, ·)`` from ``φ_0 = θ_h`` while ``θ_b`` stays fixed;
    the meta-loss is ``L_Q(θ_b, φ_K)`` and the outer gradient reaches both
    ``θ_b`` (directly and through the inner loop) and ``θ_h``. Only the adapted
    parameters are differentiated in the inner loop, so it costs a fraction of
    MAML's.

    Args:
      loss_fn: ``loss_fn(params, batch) -> loss`` (or ``(loss, aux)``).
      inner_lr: ``α``: a scalar, or a pytree of rates matching ``params`` (only
        the adapted leaves' rates are used).
      inner_optimizer: an optax transformation instead of ``inner_lr``; it sees
        the adapted part only: ``params`` with frozen leaves replaced by
        ``None``.
      num_inner_steps: ``K >= 1``.
      adapt_mask: a pytree of bools with the structure of ``params`` (``True``:
        adapted in the inner loop), or a function ``params -> mask``, like
        ``optax.masked``.
      first_order: drop second-order terms (stop the inner gradients).
      remat: ``jax.checkpoint`` each inner step.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      has_state: whether ``loss_fn`` carries model state: a ``StatefulLossFn``
        ``loss_fn(params, state, batch, *, training) -> (loss, new_state)``.

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
    update_rules.inner_optimizer(inner_lr, inner_optimizer)  # validates
    num_inner_steps = _validation.check_positive_int("num_inner_steps", num_inner_steps)

    def flags(params) -> list[bool]:
        mask = adapt_mask(params) if callable(adapt_mask) else adapt_mask
        try:
            leaves = jax.tree.leaves(jax.tree.broadcast(mask, params))
        except (ValueError, TypeError) as error:
            raise ValueError(
                f"adapt_mask must have the structure of params (one bool per "
                f"parameter leaf, or a prefix of it): {error}"
            ) from None
        flags = [bool(f) for f in leaves]
        if not any(flags):
            raise ValueError("adapt_mask selects no parameter to adapt.")
        return flags

    def partition(tree, flags):
        """``(adapted, frozen)``: ``tree`` with the other part's leaves as ``None``."""
        leaves, treedef = jax.tree.flatten(tree)
        pick = lambda keep: treedef.unflatten(
            [x if f == keep else None for x, f in zip(leaves, flags, strict=True)]
        )
        return pick(True), pick(False)

    def combine(treedef, adapted, frozen, flags):
        a, b = iter(jax.tree.leaves(adapted)), iter(jax.tree.leaves(frozen))
        return treedef.unflatten([next(a) if f else next(b) for f in flags])

    def init(params: Params) -> Params:
        _validation.check_lr_matches_params("inner_lr", inner_lr, params)
        flags(params)
        return params

    def inner_problem(meta_params: Params) -> InnerProblem:
        _validation.check_lr_matches_params("inner_lr", inner_lr, meta_params)
        f = flags(meta_params)
        treedef = jax.tree.structure(meta_params)
        adapted, frozen = partition(meta_params, f)
        rates = inner_lr
        if inner_lr is not None and not _validation.is_scalar(inner_lr):
            rates = partition(inner_lr, f)[0]
        to_model = lambda a: combine(treedef, a, frozen, f)
        return InnerProblem(
            start=adapted,
            loss_fn=lambda a, *args, **kwargs: loss_fn(to_model(a), *args, **kwargs),
            optimizer=update_rules.inner_optimizer(rates, inner_optimizer),
            to_model=to_model,
        )

    return gradient_learner(
        init=init,
        inner_problem=inner_problem,
        num_inner_steps=num_inner_steps,
        first_order=check_flag("first_order", first_order),
        remat=check_flag("remat", remat),
        has_aux=has_aux,
        has_state=has_state,
    )
