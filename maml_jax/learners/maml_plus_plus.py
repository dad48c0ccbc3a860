"""MAML++ (Antoniou, Edwards & Storkey, 2019), each technique switchable."""

from __future__ import annotations

from typing import Any, NamedTuple

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


class MAMLPlusPlusParams(NamedTuple):
    """MAML++'s meta-parameters with LSLR: the initialisation and per-step rates.

    Attributes:
      params: the initialisation ``θ``.
      inner_lr: a pytree with the structure of ``params`` whose leaves have
        shape ``(K,)``: the rate of that parameter leaf at each inner step.
    """

    params: Params
    inner_lr: Params


def msl_weights(
    outer_step: jax.Array, num_inner_steps: int, *, anneal_steps: int
) -> jax.Array:
    """MAML++'s annealed per-step weights of the multi-step loss.

    All ``K`` steps start at weight ``1/K``; over ``anneal_steps`` outer steps the
    non-final weights decay linearly to ``0.03/K`` and the final one grows (to
    ``1 − (K−1)·0.03/K``); from ``anneal_steps`` on, only the final step counts.
    (The reference code anneals per epoch; ``anneal_steps`` is the number of
    outer steps in its ``multi_step_loss_num_epochs`` epochs.)

    Returns:
      Weights of shape ``(K,)`` that sum to 1.
    """
    k = num_inner_steps
    progress = jnp.asarray(outer_step, jnp.float32) / anneal_steps
    decay = progress / k
    floor = 0.03 / k
    non_final = jnp.maximum(1.0 / k - decay, floor) * jnp.ones((k - 1,))
    final = jnp.minimum(1.0 / k + decay * (k - 1), 1.0 - (k - 1) * floor)
    annealing = jnp.concatenate([non_final, final[None]])
    final_only = jax.nn.one_hot(k - 1, k)
    return jnp.where(progress < 1.0, annealing, final_only)


def maml_plus_plus(
    loss_fn: LossFn,
    *,
    inner_lr: float,
    inner_optimizer: optax.GradientTransformation | None = None,
    num_inner_steps: int,
    learn_inner_lr: bool = True,
    multi_step_loss: bool = True,
    msl_anneal_steps: int = 15 * 500,
    step_weights: jax.Array | None = None,
    first_order: bool = False,
    remat: bool = False,
    has_aux: bool = False,
    has_state: bool = False,
    per_step_norm: bool = False,
) -> MetaLearner:
    r"""MAML++ (Antoniou, Edwards & Storkey, 2019), each technique switchable.

    * **LSLR** (``learn_inner_lr``): per-layer, per-step learning rates: every
      parameter leaf ``l`` has rates ``α_{l,0..K−1}``, meta-learned; the
      meta-parameters are ``MAMLPlusPlusParams(θ, α)`` and the update rule is
      ``update_rules.per_step_sgd(α)``. Adapting for more than ``K`` steps
      (``adapt(..., num_steps=...)``, evaluation) reuses the last step's rate.
    * **MSL** (``multi_step_loss``): the meta-loss is ``Σ_k w_k L_Q(φ_k)`` over the
      ``K`` inner steps with MAML++'s annealed weights (``msl_weights``) at the
      ``outer_step`` passed to ``meta_loss`` (the train step passes its step
      count; ``None`` means 0, the start of the schedule). Fixed
      ``step_weights`` (shape ``(K,)``) replace the schedule.
    * **Derivative-order annealing**: build this learner with
      ``first_order=True`` for the first epochs, then continue the same state
      with the second-order learner (``state.replace(learner=...)``): two
      compiled functions, not a traced condition.
    * **Cosine annealing** of the outer learning rate: use
      ``optax.cosine_decay_schedule`` in the outer optimizer.
    * **Per-step batch norm** (``per_step_norm``; BNRS and BNWB): the stateful
      loss also receives the inner step, ``loss_fn(params, state, batch, *,
      training, step)``: ``step=k`` for the support pass of step ``k`` and for
      the query pass after ``k`` steps, so the model keeps one set of running
      statistics and of norm weights per step
      (``Conv4(norm="running", per_step_norm=K + 1)``; the weights are
      meta-parameters with a leading step axis). Evaluation passes the step
      too; steps past the trained ones reuse the model's last set.

    Args:
      loss_fn: ``loss_fn(params, batch) -> loss`` (or ``(loss, aux)``).
      inner_lr: initial (or, without LSLR, fixed) inner learning rate.
      inner_optimizer: not accepted with LSLR (the update rule is learned);
        without LSLR, an optax transformation instead of ``inner_lr``.
      num_inner_steps: ``K >= 1``.
      learn_inner_lr: enable LSLR.
      multi_step_loss: enable MSL.
      msl_anneal_steps: outer steps over which the MSL weights anneal.
      step_weights: fixed MSL weights instead of the schedule.
      first_order: stop the inner gradients.
      remat: ``jax.checkpoint`` each inner step.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      has_state: whether ``loss_fn`` carries model state: a ``StatefulLossFn``
        ``loss_fn(params, state, batch, *, training) -> (loss, new_state)``.
      per_step_norm: pass the inner step to the stateful loss (see above);
        needs ``has_state=True``.

    References:
      Antoniou, Edwards & Storkey, "How to train your MAML", ICLR 2019.
    """
    learn_inner_lr = check_flag("learn_inner_lr", learn_inner_lr)
    multi_step_loss = check_flag("multi_step_loss", multi_step_loss)
    if learn_inner_lr:
        reject_inner_optimizer(
            "maml_plus_plus with learn_inner_lr=True", inner_optimizer
        )
        inner_lr = check_scalar_lr(inner_lr)
        fixed_optimizer = None
    else:
        fixed_optimizer = update_rules.inner_optimizer(inner_lr, inner_optimizer)
    k = _validation.check_positive_int("num_inner_steps", num_inner_steps)
    if per_step_norm and not has_state:
        raise ValueError(
            "per_step_norm gives the model one set of running statistics per inner "
            "step: it needs a stateful loss (has_state=True)."
        )
    msl_anneal_steps = _validation.check_positive_int(
        "msl_anneal_steps", msl_anneal_steps
    )
    if step_weights is not None and jnp.shape(step_weights) != (k,):
        raise ValueError(
            f"step_weights must have shape (num_inner_steps,) = ({k},); got "
            f"{jnp.shape(step_weights)}."
        )

    def init(params: Params) -> Any:
        if not learn_inner_lr:
            return params
        rates = jax.tree.map(lambda p: jnp.full((k,), inner_lr, p.dtype), params)
        return MAMLPlusPlusParams(params, rates)

    def inner_problem(meta_params: Any) -> InnerProblem:
        if not learn_inner_lr:
            return InnerProblem(meta_params, loss_fn, fixed_optimizer)
        check_meta_params(meta_params, MAMLPlusPlusParams, "maml_plus_plus")
        rates = update_rules.per_step_sgd(meta_params.inner_lr)
        return InnerProblem(meta_params.params, loss_fn, rates)

    def multi_step(meta_params, task_params, trace, query_loss, outer_step):
        del meta_params, task_params, query_loss
        if step_weights is not None:
            weights = jnp.asarray(step_weights)
        else:
            step = 0 if outer_step is None else outer_step
            weights = msl_weights(step, k, anneal_steps=msl_anneal_steps)
        query_losses = trace.observed[0]
        return jnp.sum(weights.astype(query_losses.dtype) * query_losses)

    return gradient_learner(
        init=init,
        inner_problem=inner_problem,
        num_inner_steps=k,
        first_order=check_flag("first_order", first_order),
        remat=check_flag("remat", remat),
        has_aux=has_aux,
        has_state=has_state,
        pass_inner_step=check_flag("per_step_norm", per_step_norm),
        objective=multi_step if multi_step_loss else None,
        observe_query=multi_step_loss,
    )
