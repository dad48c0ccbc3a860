"""Reptile: a first-order meta-learner whose update moves θ toward adapted weights."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from maml_jax import _validation, update_rules
from maml_jax.learners._gradient import InnerProblem, check_flag, gradient_learner
from maml_jax.types import LossFn, MetaLearner, Params


def reptile(
    loss_fn: LossFn,
    *,
    inner_lr: Any = None,
    inner_optimizer: optax.GradientTransformation | None = None,
    num_inner_steps: int,
    first_order: bool = True,
    remat: bool = False,
    has_aux: bool = False,
    has_state: bool = False,
) -> MetaLearner:
    r"""Reptile (Nichol, Achiam & Schulman, 2018).

    Each task adapts ``φ = U^k_S(θ)``: ``k`` steps of the inner optimizer (SGD
    with ``inner_lr``; the paper also uses ``optax.adam(lr, b1=0.0)``) on the
    support loss, in the same inner loop as ``maml``. The meta-loss's gradient
    is exactly ``θ − φ``, so any optax outer optimizer applies the Reptile
    update; with ``optax.sgd(ε)`` it is ``θ ← θ + ε (φ − θ)`` (averaged over
    the task batch), and ``reptile_meta_optimizer`` gives the paper's linearly
    annealed ε. Its value is the query loss after adaptation,
    ``L_Q(φ)``: the meta-loss is ``sg(L_Q(φ)) + s − sg(s)`` with the surrogate
    ``s = ½ ‖θ − sg(φ)‖²`` (``sg``: ``stop_gradient``), so what is logged is a
    loss, not a distance.

    No gradient flows through the inner loop, so memory and time are those of
    ``k`` plain training steps.

    Args:
      loss_fn: ``loss_fn(params, batch) -> loss`` (or ``(loss, aux)``).
      inner_lr: the inner SGD step size ``α > 0`` (or a pytree of rates).
      inner_optimizer: an optax transformation instead of ``inner_lr``.
      num_inner_steps: ``k >= 1``.
      first_order: must stay ``True``: Reptile takes no derivative through the
        inner loop.
      remat: must stay ``False``: there is no backward pass through the inner
        loop to save memory in.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      has_state: whether ``loss_fn`` carries model state: a ``StatefulLossFn``
        ``loss_fn(params, state, batch, *, training) -> (loss, new_state)``.

    Returns:
      A ``MetaLearner``; its ``meta_loss`` aux holds the usual pre/post
      adaptation support and query metrics.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import maml_jax
      >>> loss_fn = lambda w, b: jnp.mean((b[0] @ w - b[1]) ** 2)
      >>> learner = maml_jax.reptile(loss_fn, inner_lr=0.1, num_inner_steps=3)
      >>> x, y = jnp.ones((4, 2)), jnp.ones(4)
      >>> theta = jnp.zeros(2)
      >>> grad = jax.grad(lambda t: learner.meta_loss(t, maml_jax.Task((x, y),
      ...                                             (x, y)))[0])(theta)
      >>> phi = learner.adapt(theta, (x, y))
      >>> bool(jnp.allclose(grad, theta - phi))
      True

    References:
      Nichol, Achiam & Schulman, "On First-Order Meta-Learning Algorithms",
      arXiv:1803.02999, 2018.
    """
    optimizer = update_rules.inner_optimizer(inner_lr, inner_optimizer)
    num_inner_steps = _validation.check_positive_int("num_inner_steps", num_inner_steps)
    if check_flag("first_order", first_order) is not True:
        raise ValueError(
            "reptile's meta-gradient θ − φ takes no derivative through the inner "
            "loop, so there is no second-order Reptile; for a second-order "
            "meta-gradient use maml."
        )
    if check_flag("remat", remat):
        raise ValueError(
            "reptile does not differentiate through its inner loop, so remat has "
            "nothing to recompute: its memory is already that of plain training."
        )

    def init(params: Params) -> Params:
        _validation.check_lr_matches_params("inner_lr", inner_lr, params)
        return params

    def inner_problem(meta_params: Params) -> InnerProblem:
        _validation.check_lr_matches_params("inner_lr", inner_lr, meta_params)
        return InnerProblem(jax.lax.stop_gradient(meta_params), loss_fn, optimizer)

    def surrogate(meta_params, task_params, trace, query_loss, outer_step):
        del trace, outer_step
        phi = jax.lax.stop_gradient(task_params)
        squares = jax.tree.map(
            lambda t, p: jnp.sum(jnp.square(t - p)), meta_params, phi
        )
        s = 0.5 * sum(jax.tree.leaves(squares))
        return jax.lax.stop_gradient(query_loss) + (s - jax.lax.stop_gradient(s))

    return gradient_learner(
        init=init,
        inner_problem=inner_problem,
        num_inner_steps=num_inner_steps,
        first_order=True,
        remat=False,
        has_aux=has_aux,
        has_state=has_state,
        objective=surrogate,
    )


def reptile_meta_optimizer(
    meta_step_size: float, num_steps: int
) -> optax.GradientTransformation:
    """Outer SGD with the step size annealed linearly from ``meta_step_size`` to 0.

    With ``reptile``'s meta-gradient ``θ − φ`` this is the paper's update
    ``θ ← θ + ε_t (φ − θ)``, ``ε_t = ε (1 − t / num_steps)``.
    """
    meta_step_size = _validation.check_learning_rate("meta_step_size", meta_step_size)
    num_steps = _validation.check_positive_int("num_steps", num_steps)
    return optax.sgd(optax.linear_schedule(meta_step_size, 0.0, num_steps))
