"""iMAML: a proximal inner solve differentiated by the implicit function theorem.

The map ``θ → φ*(θ)`` is a ``jax.custom_vjp``: its forward pass runs the inner
optimizer on the proximal support objective (``core.inner_loop``, never
differentiated; a step that would increase that objective is halved instead),
and its backward pass solves ``(I + H_S(φ*)/λ) v = g`` by conjugate gradient on
forward-over-reverse Hessian-vector products. Memory therefore does not depend
on the number of inner steps, and no Hessian is ever materialised.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from maml_jax import _validation, core, update_rules
from maml_jax.types import Aux, Batch, LossFn, MetaLearner, Params, Task


def imaml(
    loss_fn: LossFn,
    *,
    inner_lr: Any = None,
    inner_optimizer: optax.GradientTransformation | None = None,
    num_inner_steps: int,
    reg_lambda: float,
    cg_steps: int = 10,
    cg_damping: float = 0.0,
    first_order: bool = False,
    remat: bool = False,
    has_aux: bool = False,
) -> MetaLearner:
    r"""Implicit MAML (iMAML): meta-gradients through the proximal inner solution.

    For a task with support set ``S`` and query set ``Q``, the adapted
    parameters approximately solve the proximal problem

    ``φ*(θ) = argmin_φ  L_S(φ) + (λ/2) ‖φ − θ‖²``

    by ``K`` steps of the inner optimizer from ``φ_0 = θ`` (with ``inner_lr=α``:
    ``φ_{k+1} = φ_k − α (∇L_S(φ_k) + λ (φ_k − θ))``), safeguarded so that no
    step increases the proximal objective (below). The meta-loss is
    ``L_Q(φ*)``. Stationarity, ``∇L_S(φ*) + λ (φ* − θ) = 0``, gives by the
    implicit function theorem ``dφ*/dθ = (I + H_S(φ*)/λ)^{-1}`` (symmetric), so

    ``dL_Q/dθ = (I + H_S(φ*)/λ)^{-1} ∇L_Q(φ*)``,

    with ``H_S`` the Hessian of the support loss at ``φ*``. The backward pass
    solves this system with ``cg_steps`` iterations of conjugate gradient from
    zero, each needing one Hessian-vector product (forward-over-reverse:
    ``jax.linearize`` of ``jax.grad``); with ``cg_damping = δ`` the operator is
    ``I + (H_S + δI)/λ``. The inner iterates are not differentiated: only
    ``φ*`` and the support batch are kept for the backward pass, so memory does
    not grow with ``K``. The formula is exact when the inner problem is solved
    exactly; with finite ``K`` it is the iMAML approximation. It holds for any
    inner optimizer that reaches the proximal problem's stationary point.

    The theory assumes the proximal objective is strongly convex near ``φ*``
    (``λ + δ > −λ_min(H_S)``), which makes the system positive definite. If CG
    meets a direction of non-positive curvature it stops there (truncated CG,
    as in Newton–CG), returning ``∇L_Q(φ*)`` if that happens at the first
    iteration, rather than diverging.

    The implicit meta-gradient assumes the inner solve converged and cannot see
    how hard that was, and at ``φ*`` the support gradient along a direction of
    curvature ``h`` is a fraction ``λ/(λ + h)`` of its value at ``θ`` (for a
    quadratic support loss), so meta-training can sharpen the support loss
    without bound. Gradient descent with a fixed ``α`` is stable only while
    ``α (λ + λ_max(H_S)) < 2``, so a fixed step can be outgrown (on the MAML
    sinusoids within a few thousand meta-steps, after which the inner solve
    diverged; benchmarks/CHANGELOG.md, 2026-11-30). The inner solve therefore
    never takes a step that would increase ``L_S(φ) + (λ/2) ‖φ − θ‖²`` (beyond
    rounding): it halves the step (the inner optimizer's update) instead, for
    the rest of that task's solve. Until a step is rejected the solve is the
    plain optimizer's, bit for bit; the check costs one more support-loss
    evaluation per step.

    Args:
      loss_fn: ``loss_fn(params, batch) -> loss`` (or ``(loss, aux)`` with
        ``has_aux=True``; aux values are reported before and after adaptation).
      inner_lr: ``α``: a positive scalar, or a pytree matching ``params`` with a
        scalar or parameter-shaped leaf per parameter. Gradient descent on the
        proximal objective converges for ``α < 2 / (‖H_S‖ + λ)``; beyond that
        the safeguard halves it per task. It is a constant of the learner, not
        differentiated.
      inner_optimizer: an optax transformation instead of ``inner_lr``.
      num_inner_steps: ``K >= 1``, the inner steps used in ``adapt`` and
        ``meta_loss``. The inner loop is a ``lax.scan``: compile time does not
        grow with ``K``, and neither does the memory of the meta-gradient.
      reg_lambda: ``λ > 0``, the strength of the proximal term pulling ``φ``
        towards ``θ``. Larger ``λ`` keeps ``φ*`` closer to ``θ`` and makes the
        linear system better conditioned. Choose it on the scale of ``H_S``:
        for the MAML sinusoids (MSE, amplitudes up to 5) ``H_S`` starts with
        eigenvalues from about −100 to a few hundred, so ``λ ≈ 100`` with
        ``α ≈ 1e-3``; for cross-entropy losses values of order 1 are typical.
      cg_steps: conjugate-gradient iterations (fixed count, ``>= 1``); ``n``
        iterations solve an ``n``-parameter system exactly in exact arithmetic.
      cg_damping: ``δ >= 0`` added to the Hessian in the backward solve; use it
        when ``I + H_S/λ`` is not positive definite (non-convex support loss).
      first_order: must stay ``False``: the implicit meta-gradient never
        differentiates the inner loop, so there are no second-order inner terms
        to drop; fewer ``cg_steps`` is iMAML's way to trade accuracy for cost.
      remat: must stay ``False``: the backward pass keeps only ``φ*``, so memory
        already does not grow with ``K``.
      has_aux: whether ``loss_fn`` returns ``(loss, aux_dict)``.

    Returns:
      A ``MetaLearner`` with ``init`` (identity: the meta-parameters are
      ``θ``), ``adapt`` (returns ``φ*``, differentiable in reverse mode only:
      it is a ``jax.custom_vjp``), ``meta_loss`` (aux keys as in ``maml``) and
      ``adaptation_curve`` (plain, unregularised support and query losses along
      the proximal inner solve).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import maml_jax
      >>> def loss_fn(w, batch):
      ...     x, y = batch
      ...     return jnp.mean((x @ w - y) ** 2)
      >>> learner = maml_jax.imaml(
      ...     loss_fn, inner_lr=0.1, num_inner_steps=100, reg_lambda=2.0
      ... )
      >>> x = jnp.ones((4, 1)); y = jnp.ones((4,))
      >>> task = maml_jax.Task(support=(x, y), query=(x, y))
      >>> # L_S(w) = (w - 1)^2, so φ* = argmin (w - 1)^2 + w^2 = 0.5 at θ = 0.
      >>> loss, grad = jax.value_and_grad(
      ...     lambda w: learner.meta_loss(w, task)[0]
      ... )(jnp.zeros(1))
      >>> round(float(loss), 4)  # (0.5 - 1)^2
      0.25
      >>> # (1 + H/λ)^{-1} ∇L_Q(φ*) = (1 + 2/2)^{-1} · 2 (0.5 - 1)
      >>> [round(float(g), 4) for g in grad]
      [-0.5]

    References:
      Rajeswaran, Finn, Kakade & Levine, "Meta-Learning with Implicit
      Gradients", NeurIPS 2019.
    """
    optimizer = update_rules.inner_optimizer(inner_lr, inner_optimizer)
    num_inner_steps = _validation.check_positive_int("num_inner_steps", num_inner_steps)
    reg_lambda = _check_real("reg_lambda", reg_lambda, allow_zero=False)
    cg_steps = _validation.check_positive_int("cg_steps", cg_steps)
    cg_damping = _check_real("cg_damping", cg_damping, allow_zero=True)
    if first_order is not False:
        raise ValueError(
            "imaml's meta-gradient is implicit: it never differentiates the inner "
            "loop, so first_order has no second-order terms to drop. Lower "
            "cg_steps to trade accuracy for cost."
        )
    if remat is not False:
        raise ValueError(
            "imaml keeps only the adapted parameters for its backward pass, so its "
            "memory does not grow with num_inner_steps and remat has nothing to "
            "recompute."
        )
    solves: dict[int, Callable[[Params, Batch], Params]] = {}

    def solve(theta: Params, support: Batch, num_steps: int) -> Params:
        if num_steps not in solves:
            solves[num_steps] = _implicit_proximal_solve(
                loss_fn,
                optimizer=optimizer,
                num_steps=num_steps,
                reg_lambda=reg_lambda,
                cg_steps=cg_steps,
                cg_damping=cg_damping,
                has_aux=has_aux,
            )
        return solves[num_steps](theta, support)

    def init(params: Params) -> Params:
        _validation.check_lr_matches_params("inner_lr", inner_lr, params)
        return params

    def adapt(
        meta_params: Params, support: Batch, *, num_steps: int | None = None
    ) -> Params:
        _validation.check_lr_matches_params("inner_lr", inner_lr, meta_params)
        _validation.check_examples(support, "adapt: support")
        if num_steps is None:
            num_steps = num_inner_steps
        num_steps = _validation.check_positive_int("num_steps", num_steps)
        return solve(meta_params, support, num_steps)

    def meta_loss(
        meta_params: Params, task: Task, *, outer_step: Any = None
    ) -> tuple[jax.Array, Aux]:
        del outer_step
        _validation.check_task(task, "meta_loss")
        task_params = adapt(meta_params, task.support)
        # The inner solve keeps no per-step losses (memory independent of K).
        support_pre, _ = core.loss_and_aux(
            loss_fn, meta_params, task.support, has_aux=has_aux
        )
        query_post = core.loss_and_aux(
            loss_fn, task_params, task.query, has_aux=has_aux
        )
        aux = core.task_metrics(
            loss_fn,
            meta_params,
            task_params,
            task,
            support_pre,
            has_aux=has_aux,
            query_post=query_post,
        )
        return query_post[0], aux

    def adaptation_curve(meta_params: Params, task: Task, num_steps: int) -> Aux:
        _validation.check_lr_matches_params("inner_lr", inner_lr, meta_params)
        objective = _proximal_objective(
            loss_fn, meta_params, task.support, reg_lambda, has_aux
        )
        return core.adaptation_curve(
            _proximal_loss(loss_fn, meta_params, reg_lambda, has_aux),
            meta_params,
            task,
            optimizer=_monotone(optimizer, objective),
            num_steps=num_steps,
            has_aux=has_aux,
        )

    return MetaLearner(init, adapt, meta_loss, adaptation_curve)


def _implicit_proximal_solve(
    loss_fn: LossFn,
    *,
    optimizer: optax.GradientTransformation,
    num_steps: int,
    reg_lambda: float,
    cg_steps: int,
    cg_damping: float,
    has_aux: bool,
) -> Callable[[Params, Batch], Params]:
    """``(θ, support) -> φ*(θ)`` as a ``custom_vjp`` with the implicit gradient."""

    def support_grad(params: Params, support: Batch) -> Params:
        return jax.grad(
            lambda p: core.loss_and_aux(loss_fn, p, support, has_aux=has_aux)[0]
        )(params)

    def inner_solve(theta: Params, support: Batch) -> Params:
        proximal = _proximal_loss(loss_fn, theta, reg_lambda, has_aux)
        phi, _ = core.inner_loop(
            proximal,
            theta,
            support,
            optimizer=_monotone(
                optimizer,
                _proximal_objective(loss_fn, theta, support, reg_lambda, has_aux),
            ),
            num_steps=num_steps,
            has_aux=has_aux,
        )
        return phi

    @jax.custom_vjp
    def solve(theta: Params, support: Batch) -> Params:
        return inner_solve(theta, support)

    def solve_fwd(theta: Params, support: Batch):
        phi = inner_solve(theta, support)
        return phi, (phi, support)

    def solve_bwd(residuals, g: Params):
        phi, support = residuals
        # Forward-over-reverse: linearize ∇L_S at φ* once, then each CG step
        # costs one Jacobian-vector product of the gradient (an HVP).
        _, hvp = jax.linearize(lambda p: support_grad(p, support), phi)

        def matvec(v: Params) -> Params:  # (I + (H_S + δI)/λ) v
            return jax.tree.map(
                lambda v_, hv: v_ + (hv + cg_damping * v_) / reg_lambda, v, hvp(v)
            )

        # The support batch is data: its cotangent is zero (None).
        return _conjugate_gradient(matvec, g, num_steps=cg_steps), None

    solve.defvjp(solve_fwd, solve_bwd)
    return solve


def _conjugate_gradient(
    matvec: Callable[[Params], Params], b: Params, *, num_steps: int
) -> Params:
    """Solves ``A x = b`` (``A`` symmetric) by truncated CG from ``x = 0``.

    Exactly ``num_steps`` iterations in a ``lax.scan``, so it jits and vmaps with
    a fixed cost. For positive definite ``A`` this is plain CG. Once a search
    direction has ``pᵀAp <= 0`` (zero: the residual is already zero; negative:
    ``A`` is indefinite) the iterate is frozen, as in Newton–CG (Nocedal &
    Wright, Algorithm 7.1); if that happens at the first iteration the result
    is ``b`` itself.
    """
    zeros = jax.tree.map(jnp.zeros_like, b)
    rs = _tree_vdot(b, b)

    def step(carry, k):
        x, r, p, rs, stopped = carry
        ap = matvec(p)
        p_ap = _tree_vdot(p, ap)
        stop_now = jnp.logical_and(jnp.logical_not(stopped), p_ap <= 0)
        stopped = jnp.logical_or(stopped, p_ap <= 0)
        alpha = jnp.where(stopped, 0, rs / jnp.where(stopped, 1, p_ap))
        x = _tree_axpy(alpha, p, x)
        # Negative curvature before any progress: fall back to x = b.
        x = _tree_where(jnp.logical_and(stop_now, k == 0), b, x)
        r = _tree_axpy(-alpha, ap, r)
        rs_new = _tree_vdot(r, r)
        beta = jnp.where(stopped, 0, rs_new / jnp.where(stopped, 1, rs))
        p = _tree_axpy(beta, p, r)
        return (x, r, p, rs_new, stopped), None

    init = (zeros, b, b, rs, jnp.zeros((), bool))
    (x, *_), _ = jax.lax.scan(step, init, jnp.arange(num_steps))
    return x


class _MonotoneState(NamedTuple):
    inner: Any  # the wrapped optimizer's state
    scale: jax.Array  # s: the factor on its updates, halved at each rejected step
    value: jax.Array  # the objective at the current iterate


def _monotone(
    optimizer: optax.GradientTransformation, objective: Callable[[Params], jax.Array]
) -> optax.GradientTransformation:
    """``optimizer`` with step halving: it never increases ``objective``.

    The update is ``s·u`` with ``u`` the wrapped optimizer's (``s = 1`` at first).
    If ``objective`` at ``φ + s·u`` exceeds its value ``f`` at ``φ`` by more than
    ``√ε·|f|`` (rounding, ``ε`` the dtype's epsilon), or is NaN, the step is not
    taken, the wrapped optimizer's state is left as it was, and ``s`` halves for
    the rest of the solve, so the next step retries half as far. Until a step is
    rejected the updates are the wrapped optimizer's, bit for bit. Costs one more
    evaluation of the objective per step.
    """

    def init(params: Params) -> _MonotoneState:
        return _MonotoneState(optimizer.init(params), jnp.ones(()), objective(params))

    def update(grads: Params, state: _MonotoneState, params: Params):
        updates, inner = optimizer.update(grads, state.inner, params)
        updates = jax.tree.map(lambda u: jnp.asarray(state.scale, u.dtype) * u, updates)
        value = objective(optax.apply_updates(params, updates))
        # Near the solution both values agree to rounding, which is no increase.
        slack = jnp.sqrt(jnp.finfo(value.dtype).eps) * jnp.abs(state.value)
        accept = value <= state.value + slack  # False for NaN
        zeros = jax.tree.map(jnp.zeros_like, updates)
        return _tree_where(accept, updates, zeros), _MonotoneState(
            _tree_where(accept, inner, state.inner),
            jnp.where(accept, state.scale, state.scale / 2),
            jnp.where(accept, value, state.value),
        )

    return optax.GradientTransformation(init, update)


def _proximal_objective(
    loss_fn: LossFn, theta: Params, support: Batch, reg_lambda: float, has_aux: bool
) -> Callable[[Params], jax.Array]:
    """``φ -> L_S(φ) + (λ/2) ‖φ − θ‖²``, the value the inner solve minimises."""

    def objective(params: Params) -> jax.Array:
        value, _ = core.loss_and_aux(loss_fn, params, support, has_aux=has_aux)
        sq = jax.tree.map(lambda p, t: jnp.sum((p - t) ** 2), params, theta)
        return value + 0.5 * reg_lambda * sum(jax.tree.leaves(sq))

    return objective


def _proximal_loss(
    loss_fn: LossFn, theta: Params, reg_lambda: float, has_aux: bool
) -> LossFn:
    """A loss whose value is ``L(φ)`` but whose gradient is the proximal one.

    The penalty ``q = (λ/2)‖φ − θ‖²`` enters as ``q − stop_gradient(q)``: zero in
    value, ``λ (φ − θ)`` in gradient. Gradient descent on it is the proximal
    inner solve, while the losses it reports are the plain task losses.
    """

    def loss(params: Params, batch: Batch) -> Any:
        value, aux = core.loss_and_aux(loss_fn, params, batch, has_aux=has_aux)
        sq = jax.tree.map(lambda p, t: jnp.sum((p - t) ** 2), params, theta)
        penalty = 0.5 * reg_lambda * sum(jax.tree.leaves(sq))
        value = value + (penalty - jax.lax.stop_gradient(penalty))
        return (value, aux) if has_aux else value

    return loss


def _tree_vdot(a: Params, b: Params) -> jax.Array:
    # Elementwise products, not jnp.vdot: no reduced-precision matmul passes.
    return sum(
        jnp.sum(x * y)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def _tree_axpy(a: jax.Array, x: Params, y: Params) -> Params:
    """``a·x + y`` leafwise, keeping each leaf's dtype."""
    return jax.tree.map(lambda x_, y_: jnp.asarray(a, y_.dtype) * x_ + y_, x, y)


def _tree_where(cond: jax.Array, x: Params, y: Params) -> Params:
    return jax.tree.map(lambda x_, y_: jnp.where(cond, x_, y_), x, y)


def _check_real(name: str, value: Any, *, allow_zero: bool) -> float:
    """Returns ``value`` as a float if it is finite and > 0 (>= 0 if allowed)."""
    bound = ">= 0" if allow_zero else "> 0"
    is_scalar_array = hasattr(value, "shape") and jnp.shape(value) == ()
    if isinstance(value, bool) or not (
        isinstance(value, numbers.Real) or is_scalar_array
    ):
        raise TypeError(f"{name} must be a finite number {bound}; got {value!r}.")
    try:
        value = float(value)
    except jax.errors.ConcretizationTypeError:
        raise TypeError(
            f"{name} must be a concrete number {bound} (a constant of the learner, "
            f"not a traced value); got {value!r}."
        ) from None
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be a finite number {bound}; got {value!r}.")
    return value
