"""Meta-SGD: MAML with a learned learning rate for every parameter element."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from maml_jax import _validation, update_rules
from maml_jax.learners._gradient import (
    InnerProblem,
    check_flag,
    check_meta_params,
    check_scalar_lr,
    gradient_learner,
    reject_inner_optimizer,
)
from maml_jax.types import LossFn, MetaLearner, Params


class MetaSGDParams(NamedTuple):
    """Meta-SGD's meta-parameters: the initialisation and its per-element rates.

    Attributes:
      params: the initialisation ``θ``.
      inner_lr: ``α``, a pytree with the structure and shapes of ``params``.
    """

    params: Params
    inner_lr: Params


def meta_sgd(
    loss_fn: LossFn,
    *,
    inner_lr: float,
    inner_optimizer: optax.GradientTransformation | None = None,
    num_inner_steps: int = 1,
    first_order: bool = False,
    remat: bool = False,
    has_aux: bool = False,
    has_state: bool = False,
) -> MetaLearner:
    r"""Meta-SGD: MAML with a learned learning rate for every parameter element.

    ``φ_{k+1} = φ_k − α ∘ ∇L_S(φ_k)``, where ``α`` has the shape of ``θ`` and is
    meta-learned with it: the meta-parameters are ``MetaSGDParams(θ, α)`` and
    the meta-gradient covers both. The update rule is
    ``update_rules.sgd_with_rates(α)``, driven by the same inner loop as
    ``maml``.

    Args:
      loss_fn: ``loss_fn(params, batch) -> loss`` (or ``(loss, aux)``).
      inner_lr: the initial value of every element of ``α``.
      inner_optimizer: not accepted: Meta-SGD's update rule is the learned one.
      num_inner_steps: inner steps (the paper uses 1).
      first_order: stop the inner gradients (the learned rates still get a
        gradient through ``α ∘ g``).
      remat: ``jax.checkpoint`` each inner step.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      has_state: whether ``loss_fn`` carries model state: a ``StatefulLossFn``
        ``loss_fn(params, state, batch, *, training) -> (loss, new_state)``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import maml_jax
      >>> loss_fn = lambda w, b: jnp.mean((b[0] @ w - b[1]) ** 2)
      >>> learner = maml_jax.meta_sgd(loss_fn, inner_lr=0.1)
      >>> meta_params = learner.init(jnp.zeros(2))
      >>> meta_params.inner_lr.tolist()
      [0.1, 0.1]

    References:
      Li, Zhou, Chen & Li, "Meta-SGD: Learning to Learn Quickly for Few-Shot
      Learning", arXiv:1707.09835, 2017.
    """
    reject_inner_optimizer("meta_sgd", inner_optimizer)
    inner_lr = check_scalar_lr(inner_lr)
    num_inner_steps = _validation.check_positive_int("num_inner_steps", num_inner_steps)

    def init(params: Params) -> MetaSGDParams:
        rates = jax.tree.map(
            lambda p: jnp.full(jnp.shape(p), inner_lr, p.dtype), params
        )
        return MetaSGDParams(params, rates)

    def inner_problem(meta_params: MetaSGDParams) -> InnerProblem:
        check_meta_params(meta_params, MetaSGDParams, "meta_sgd")
        rates = update_rules.sgd_with_rates(meta_params.inner_lr)
        return InnerProblem(meta_params.params, loss_fn, rates)

    return gradient_learner(
        init=init,
        inner_problem=inner_problem,
        num_inner_steps=num_inner_steps,
        first_order=check_flag("first_order", first_order),
        remat=check_flag("remat", remat),
        has_aux=has_aux,
        has_state=has_state,
    )
