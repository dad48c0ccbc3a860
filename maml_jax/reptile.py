"""Reptile: a first-order meta-learner whose update moves θ toward adapted weights."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from maml_jax import _validation, core
from maml_jax.types import Batch, LossFn, MetaLearner, Params, Task

InnerOptimizer = Callable[[float], optax.GradientTransformation]


def optax_inner_loop(
    loss_fn: LossFn,
    params: Params,
    support: Batch,
    *,
    optimizer: optax.GradientTransformation,
    num_steps: int,
    has_aux: bool = False,
) -> tuple[Params, jax.Array]:
    """``num_steps`` of an optax optimizer on the support loss (a ``lax.scan``).

    The optimizer state starts fresh for each call (each task).

    Returns:
      ``(adapted_params, support_losses)``, losses of shape ``(num_steps,)``.
    """

    def step(carry, _):
        p, opt_state = carry
        loss, grads = jax.value_and_grad(
            lambda q: core.evaluate_loss(loss_fn, q, support, has_aux=has_aux)[0]
        )(p)
        updates, opt_state = optimizer.update(grads, opt_state, p)
        return (optax.apply_updates(p, updates), opt_state), loss

    (params, _), losses = jax.lax.scan(
        step, (params, optimizer.init(params)), None, length=num_steps
    )
    return params, losses


def reptile(
    loss_fn: LossFn,
    *,
    inner_lr: float,
    num_inner_steps: int,
    inner_optimizer: InnerOptimizer = optax.sgd,
    has_aux: bool = False,
) -> MetaLearner:
    r"""Reptile (Nichol, Achiam & Schulman, 2018).

    Each task adapts ``φ = U^k_S(θ)``: ``k`` steps of an inner optimizer (SGD by
    default; the paper also uses Adam with β₁ = 0) on the support loss. The
    meta-loss is the surrogate ``½ ‖θ − stop_gradient(φ)‖²``, whose gradient is
    exactly ``θ − φ``, so any optax outer optimizer applies the Reptile update;
    with ``optax.sgd(ε)`` it is ``θ ← θ + ε (φ − θ)`` (averaged over the task
    batch), and ``reptile_meta_optimizer`` gives the paper's linearly annealed ε.

    The adapted weights are computed by the inner loop only (no gradient flows
    through it), so memory and time are those of ``k`` plain training steps.

    Args:
      loss_fn: ``loss_fn(params, batch) -> loss`` (or ``(loss, aux)``).
      inner_lr: the inner step size ``α > 0``.
      num_inner_steps: ``k >= 1``.
      inner_optimizer: ``lr -> optax.GradientTransformation`` for the inner loop,
        e.g. ``lambda lr: optax.adam(lr, b1=0.0)``; default ``optax.sgd``.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.

    Returns:
      A ``MetaLearner``; its ``meta_loss`` returns the surrogate loss and the
      usual pre/post-adaptation support and query metrics in aux.

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
    inner_lr = _validation.check_learning_rate("inner_lr", inner_lr)
    num_inner_steps = _validation.check_positive_int("num_inner_steps", num_inner_steps)
    optimizer = inner_optimizer(inner_lr)

    def run_inner(params, support):
        params = jax.lax.stop_gradient(params)
        return optax_inner_loop(
            loss_fn,
            params,
            support,
            optimizer=optimizer,
            num_steps=num_inner_steps,
            has_aux=has_aux,
        )

    def init(params):
        return params

    def adapt(meta_params, support):
        return run_inner(meta_params, support)[0]

    def meta_loss(meta_params, task: Task):
        _validation.check_task(task, "meta_loss")
        task_params, support_losses = run_inner(meta_params, task.support)
        surrogate = 0.5 * sum(
            jnp.sum(jnp.square(t - p))
            for t, p in zip(
                jax.tree.leaves(meta_params), jax.tree.leaves(task_params), strict=True
            )
        )
        aux = core.task_metrics(
            loss_fn, meta_params, task_params, task, support_losses, has_aux=has_aux
        )
        return surrogate, aux

    def adaptation_curve(meta_params, task: Task, num_steps: int):
        _validation.check_task(task, "adaptation_curve")
        num_steps = _validation.check_positive_int("num_steps", num_steps)

        def metrics(p):
            s_loss, _ = core.evaluate_loss(loss_fn, p, task.support, has_aux=has_aux)
            q_loss, q_aux = core.evaluate_loss(loss_fn, p, task.query, has_aux=has_aux)
            return {
                "support_loss": s_loss,
                "query_loss": q_loss,
                **{f"query_{k}": v for k, v in q_aux.items()},
            }

        def step(carry, _):
            p, opt_state = carry
            out = metrics(p)
            grads = jax.grad(
                lambda q: core.evaluate_loss(loss_fn, q, task.support, has_aux=has_aux)[
                    0
                ]
            )(p)
            updates, opt_state = optimizer.update(grads, opt_state, p)
            return (optax.apply_updates(p, updates), opt_state), out

        (final, _), history = jax.lax.scan(
            step, (meta_params, optimizer.init(meta_params)), None, length=num_steps
        )
        last = metrics(final)
        return jax.tree.map(lambda h, x: jnp.concatenate([h, x[None]]), history, last)

    return MetaLearner(init, adapt, meta_loss, adaptation_curve)


def reptile_meta_optimizer(
    meta_step_size: float, num_steps: int
) -> optax.GradientTransformation:
    """Outer SGD with the step size annealed linearly from ``meta_step_size`` to 0.

    With ``reptile``'s surrogate gradient ``θ − φ`` this is the paper's update
    ``θ ← θ + ε_t (φ − θ)``, ``ε_t = ε (1 − t / num_steps)``.
    """
    meta_step_size = _validation.check_learning_rate("meta_step_size", meta_step_size)
    num_steps = _validation.check_positive_int("num_steps", num_steps)
    return optax.sgd(optax.linear_schedule(meta_step_size, 0.0, num_steps))
