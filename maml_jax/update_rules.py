"""Inner-loop update rules as optax ``GradientTransformation``s.

The inner loop of every gradient-based learner is driven by an optax
transformation and differentiated through, so any optax optimizer (SGD, momentum,
Adam, ...) is a valid inner optimizer. The rules here are the ones whose
hyperparameters are meta-learned: they close over (traced) meta-parameters, so
the meta-gradient reaches the learning rates through the updates.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from maml_jax import _validation
from maml_jax.types import Params


def sgd_with_rates(rates: Any) -> optax.GradientTransformation:
    """SGD with one learning rate per parameter leaf or element: ``u = −α ∘ g``.

    Args:
      rates: a pytree with the structure of the parameters whose leaves are
        scalars or arrays of the parameter's shape (Meta-SGD's per-element
        rates), or one scalar for every leaf.

    Returns:
      A stateless transformation. With a scalar ``α`` its updates equal
      ``optax.sgd(α)``'s bit for bit.

    Examples:
      >>> import jax.numpy as jnp
      >>> tx = sgd_with_rates({"w": jnp.array([0.1, 1.0])})
      >>> updates, _ = tx.update({"w": jnp.ones(2)}, tx.init(None))
      >>> updates["w"].tolist()
      [-0.1, -1.0]
    """

    def update(updates, state, params=None):
        del params
        if _validation.is_scalar(rates):
            return jax.tree.map(lambda g: -rates * g, updates), state
        return jax.tree.map(lambda g, r: -r * g, updates, rates), state

    return optax.GradientTransformation(optax.init_empty_state, update)


class StepCountState(NamedTuple):
    """The number of inner steps taken (an int32 scalar)."""

    count: jax.Array


def per_step_sgd(rates: Any) -> optax.GradientTransformation:
    """SGD whose rate changes with the inner step: ``u_k = −α_{l, min(k, K−1)} g``.

    MAML++'s learned per-layer per-step rates (LSLR): every parameter leaf ``l``
    has rates ``α_{l,0..K−1}``. Steps past the schedule reuse its last rate, so a
    learner trained with ``K`` steps can adapt for longer at test time.

    Args:
      rates: a pytree with the structure of the parameters whose leaves have
        shape ``(K,)``.

    Examples:
      >>> import jax.numpy as jnp
      >>> tx = per_step_sgd({"w": jnp.array([0.5, 0.25])})
      >>> state = tx.init({"w": jnp.zeros(())})
      >>> steps = []
      >>> for _ in range(3):
      ...     u, state = tx.update({"w": jnp.ones(())}, state)
      ...     steps.append(float(u["w"]))
      >>> steps
      [-0.5, -0.25, -0.25]
    """

    def init(params: Params) -> StepCountState:
        del params
        return StepCountState(jnp.zeros((), jnp.int32))

    def update(updates, state, params=None):
        del params

        def scaled(g, r):
            index = jnp.minimum(state.count, r.shape[0] - 1)
            return -jax.lax.dynamic_index_in_dim(r, index, keepdims=False) * g

        updates = jax.tree.map(scaled, updates, rates)
        return updates, StepCountState(optax.safe_increment(state.count))

    return optax.GradientTransformation(init, update)


def inner_optimizer(
    inner_lr: Any, inner_optimizer: optax.GradientTransformation | None
) -> optax.GradientTransformation:
    """The inner optimizer from a factory's ``inner_lr`` or ``inner_optimizer``.

    Exactly one must be given. A scalar ``inner_lr=α`` is ``optax.sgd(α)``; a
    pytree of rates is ``sgd_with_rates``.
    """
    if inner_optimizer is not None:
        if inner_lr is not None:
            raise ValueError(
                "pass either inner_lr (plain SGD, shorthand for "
                "inner_optimizer=optax.sgd(inner_lr)) or inner_optimizer, not both."
            )
        if not isinstance(inner_optimizer, optax.GradientTransformation):
            raise TypeError(
                f"inner_optimizer must be an optax.GradientTransformation (e.g. "
                f"optax.adam(1e-2)); got {type(inner_optimizer).__name__}."
            )
        return inner_optimizer
    if inner_lr is None:
        raise TypeError(
            "the inner loop needs inner_lr (a float, or a pytree of rates matching "
            "params) or inner_optimizer (an optax.GradientTransformation)."
        )
    inner_lr = _validation.check_learning_rate("inner_lr", inner_lr)
    if _validation.is_scalar(inner_lr):
        return optax.sgd(inner_lr)
    return sgd_with_rates(inner_lr)
