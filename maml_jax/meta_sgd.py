"""Learners whose inner learning rates are meta-learned: Meta-SGD and MAML++."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from maml_jax import _validation, core
from maml_jax.types import LossFn, MetaLearner, Task

PARAMS, INNER_LR = "params", "inner_lr"


def meta_sgd(
    loss_fn: LossFn,
    *,
    inner_lr: float,
    num_inner_steps: int = 1,
    first_order: bool = False,
    remat: bool = False,
    has_aux: bool = False,
) -> MetaLearner:
    r"""Meta-SGD: MAML with a learned learning rate for every parameter element.

    ``φ = θ − α ∘ ∇L_S(θ)`` (repeated ``num_inner_steps`` times), where ``α`` has
    the shape of ``θ`` and is meta-learned with it: the meta-parameters are
    ``{"params": θ, "inner_lr": α}`` and the meta-gradient covers both.

    Args:
      loss_fn: ``loss_fn(params, batch) -> loss`` (or ``(loss, aux)``).
      inner_lr: the initial value of every element of ``α``.
      num_inner_steps: inner steps (the paper uses 1).
      first_order: stop the inner gradients (the learned rates still get a
        gradient through ``α ∘ g``).
      remat: ``jax.checkpoint`` each inner step.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import maml_jax
      >>> loss_fn = lambda w, b: jnp.mean((b[0] @ w - b[1]) ** 2)
      >>> learner = maml_jax.meta_sgd(loss_fn, inner_lr=0.1)
      >>> meta_params = learner.init(jnp.zeros(2))
      >>> meta_params["inner_lr"].tolist()
      [0.1, 0.1]

    References:
      Li, Zhou, Chen & Li, "Meta-SGD: Learning to Learn Quickly for Few-Shot
      Learning", arXiv:1707.09835, 2017.
    """
    inner_lr = _validation.check_learning_rate("inner_lr", inner_lr)
    num_inner_steps = _validation.check_positive_int("num_inner_steps", num_inner_steps)

    def init(params):
        lrs = jax.tree.map(lambda p: jnp.full(jnp.shape(p), inner_lr, p.dtype), params)
        return {PARAMS: params, INNER_LR: lrs}

    def run_inner(meta_params, support):
        _check_meta_params(meta_params)
        return core.inner_loop(
            loss_fn,
            meta_params[PARAMS],
            support,
            inner_lr=meta_params[INNER_LR],
            num_steps=num_inner_steps,
            first_order=first_order,
            remat=remat,
            has_aux=has_aux,
        )

    return _learner(loss_fn, init, run_inner, has_aux=has_aux)


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
    num_inner_steps: int,
    learn_inner_lr: bool = True,
    multi_step_loss: bool = True,
    msl_anneal_steps: int = 15 * 500,
    step_weights: jax.Array | None = None,
    first_order: bool = False,
    remat: bool = False,
    has_aux: bool = False,
) -> MetaLearner:
    r"""MAML++ (Antoniou, Edwards & Storkey, 2019), each technique switchable.

    * **LSLR** (``learn_inner_lr``): per-layer, per-step learning rates: every
      parameter leaf ``l`` has rates ``α_{l,0..K−1}``, meta-learned; the
      meta-parameters are ``{"params": θ, "inner_lr": α}``.
    * **MSL** (``multi_step_loss``): the meta-loss is ``Σ_k w_k L_Q(φ_k)`` over the
      ``K`` inner steps with MAML++'s annealed weights (``msl_weights``); the
      train step passes the outer step through ``MetaLearner.at_step``. Fixed
      ``step_weights`` (shape ``(K,)``) replace the schedule.
    * **Derivative-order annealing**: build this learner with
      ``first_order=True`` for the first epochs, then continue the same state
      with the second-order learner (``state.replace(learner=...)``): two
      compiled functions, not a traced condition.
    * **Cosine annealing** of the outer learning rate: use
      ``optax.cosine_decay_schedule`` in the outer optimizer.
    * Batch-norm: ``maml_jax.Conv4`` always normalises with the current batch's
      statistics and keeps no running averages, so MAML++'s per-step running
      statistics (and the reference code's bugs around them) do not arise;
      per-step batch-norm weights are not implemented.

    Args:
      loss_fn: ``loss_fn(params, batch) -> loss`` (or ``(loss, aux)``).
      inner_lr: initial (or, without LSLR, fixed) inner learning rate.
      num_inner_steps: ``K >= 1``.
      learn_inner_lr: enable LSLR.
      multi_step_loss: enable MSL.
      msl_anneal_steps: outer steps over which the MSL weights anneal.
      step_weights: fixed MSL weights instead of the schedule.
      first_order: stop the inner gradients.
      remat: ``jax.checkpoint`` each inner step.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.

    References:
      Antoniou, Edwards & Storkey, "How to train your MAML", ICLR 2019.
    """
    inner_lr = _validation.check_learning_rate("inner_lr", inner_lr)
    k = _validation.check_positive_int("num_inner_steps", num_inner_steps)
    msl_anneal_steps = _validation.check_positive_int(
        "msl_anneal_steps", msl_anneal_steps
    )
    if step_weights is not None and jnp.shape(step_weights) != (k,):
        raise ValueError(
            f"step_weights must have shape (num_inner_steps,) = ({k},); got "
            f"{jnp.shape(step_weights)}."
        )

    def init(params):
        if not learn_inner_lr:
            return params
        lrs = jax.tree.map(lambda p: jnp.full((k,), inner_lr, p.dtype), params)
        return {PARAMS: params, INNER_LR: lrs}

    def split(meta_params):
        if learn_inner_lr:
            _check_meta_params(meta_params)
            return meta_params[PARAMS], meta_params[INNER_LR], True
        return meta_params, inner_lr, False

    def run_inner(meta_params, support):
        params, lrs, per_step = split(meta_params)
        return core.inner_loop(
            loss_fn,
            params,
            support,
            inner_lr=lrs,
            num_steps=k,
            first_order=first_order,
            remat=remat,
            has_aux=has_aux,
            per_step_lr=per_step,
        )

    def build(weights):
        if not multi_step_loss:
            return _learner(
                loss_fn,
                init,
                run_inner,
                has_aux=has_aux,
                per_step_lr=learn_inner_lr,
                split=split,
            )

        def trajectory(meta_params, task):
            """Support loss before and query loss after each inner step, (K,) each."""
            params, lrs, per_step = split(meta_params)

            def step(p, lr):
                s_loss, grads = jax.value_and_grad(
                    lambda q: core.evaluate_loss(
                        loss_fn, q, task.support, has_aux=has_aux
                    )[0]
                )(p)
                if first_order:
                    grads = jax.lax.stop_gradient(grads)
                p = core.sgd_update(p, grads, lr)
                q_loss, _ = core.evaluate_loss(loss_fn, p, task.query, has_aux=has_aux)
                return p, (s_loss, q_loss)

            if remat:
                step = jax.checkpoint(step)
            xs = lrs if per_step else None
            fn = step if per_step else (lambda p, _: step(p, lrs))
            return jax.lax.scan(fn, params, xs, length=k)

        def meta_loss(meta_params, task: Task):
            _validation.check_task(task, "meta_loss")
            final, (support_losses, query_losses) = trajectory(meta_params, task)
            aux = core.task_metrics(
                loss_fn,
                split(meta_params)[0],
                final,
                task,
                support_losses,
                has_aux=has_aux,
            )
            return jnp.sum(weights * query_losses), aux

        return _learner(
            loss_fn,
            init,
            run_inner,
            has_aux=has_aux,
            per_step_lr=learn_inner_lr,
            split=split,
            meta_loss=meta_loss,
        )

    if not multi_step_loss or step_weights is not None:
        return build(None if step_weights is None else jnp.asarray(step_weights))
    base = build(msl_weights(0, k, anneal_steps=msl_anneal_steps))
    return base._replace(
        at_step=lambda step: build(msl_weights(step, k, anneal_steps=msl_anneal_steps))
    )


def _learner(
    loss_fn, init, run_inner, *, has_aux, per_step_lr=False, split=None, meta_loss=None
) -> MetaLearner:
    """Assembles a MetaLearner whose meta-parameters are ``{"params", "inner_lr"}``."""
    if split is None:
        split = lambda mp: (mp[PARAMS], mp[INNER_LR], False)

    def adapt(meta_params, support):
        return run_inner(meta_params, support)[0]

    def default_meta_loss(meta_params, task: Task):
        _validation.check_task(task, "meta_loss")
        task_params, support_losses = run_inner(meta_params, task.support)
        return core.adapted_query_loss(
            loss_fn,
            split(meta_params)[0],
            task_params,
            task,
            support_losses,
            has_aux=has_aux,
        )

    def adaptation_curve(meta_params, task: Task, num_steps: int):
        params, lrs, per_step = split(meta_params)
        return core.adaptation_curve(
            loss_fn,
            params,
            task,
            inner_lr=lrs,
            num_steps=num_steps,
            has_aux=has_aux,
            per_step_lr=per_step,
        )

    return MetaLearner(init, adapt, meta_loss or default_meta_loss, adaptation_curve)


def _check_meta_params(meta_params) -> None:
    if not (isinstance(meta_params, dict) and set(meta_params) == {PARAMS, INNER_LR}):
        raise TypeError(
            "this learner's meta-parameters are {'params': ..., 'inner_lr': ...}; "
            "build them with learner.init(params)."
        )
