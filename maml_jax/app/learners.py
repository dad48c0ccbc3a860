"""Each protocol's learners: the algorithm names and their paper-style settings.

``make_learner`` builds the sinusoid protocol's learner (an MLP's parameters);
``build_learner`` builds a few-shot run's Conv4, its initial parameters, the
learner (``_make_learner``) and the outer optimizer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import optax

import maml_jax
from maml_jax import MetaLearner, models

if TYPE_CHECKING:
    from maml_jax.app.presets import FewShotConfig

# The gradient learners, which the sinusoid protocol runs ...
REGRESSION_ALGORITHMS = (
    "maml",
    "fomaml",
    "anil",
    "reptile",
    "meta_sgd",
    "maml_plus_plus",
    "imaml",
)
# ... plus the metric baseline for few-shot classification (it has no
# regression form).
ALGORITHMS = (*REGRESSION_ALGORITHMS, "protonet")


def _make_learner(config: FewShotConfig, model, loss_fn):
    """The learner for ``config.algorithm``, with the paper-style defaults."""
    common = dict(inner_lr=config.inner_lr, num_inner_steps=config.inner_steps)
    name = config.algorithm
    if name == "maml":
        return maml_jax.maml(loss_fn, has_aux=True, **common)
    if name == "fomaml":
        return maml_jax.fomaml(loss_fn, has_aux=True, **common)
    if name == "anil":  # only the linear head adapts
        return maml_jax.anil(
            loss_fn,
            has_aux=True,
            adapt_mask=lambda p: {k: k == "head" for k in p},
            **common,
        )
    if name == "reptile":
        return maml_jax.reptile(loss_fn, has_aux=True, **common)
    if name == "meta_sgd":
        return maml_jax.meta_sgd(loss_fn, has_aux=True, **common)
    if name == "maml_plus_plus":
        return maml_jax.maml_plus_plus(
            loss_fn, has_aux=True, msl_anneal_steps=max(config.steps // 4, 1), **common
        )
    if name == "imaml":
        return maml_jax.imaml(
            loss_fn, has_aux=True, reg_lambda=2.0, cg_steps=5, **common
        )
    if name == "protonet":
        # build_learner made ``model`` headless: its features are the embedding.
        return maml_jax.protonet(
            lambda p, x: model.apply({"params": p}, x), ways=config.ways
        )
    raise ValueError(f"--algorithm must be one of {', '.join(ALGORITHMS)}.")


def build_learner(config: FewShotConfig, image_shape):
    """Model, initial params, learner and outer optimizer for ``config``."""
    omniglot = config.dataset == "omniglot"
    model = models.Conv4(
        num_classes=None if config.algorithm == "protonet" else config.ways,
        filters=config.filters or (64 if omniglot else 32),
        downsample="stride" if omniglot else "maxpool",
        head="mean" if omniglot else "flatten",
        norm=config.norm,
        conv_impl=config.conv_impl or "lax",
        dtype=None if config.precision == "float32" else jnp.bfloat16,
    )
    # Jitted: one compile instead of op-by-op dispatch (the same values).
    params = jax.jit(model.init)(
        jax.random.key(config.seed), jnp.zeros((2, *image_shape))
    )
    loss_fn = models.classification_loss(model.apply, loss_scale=config.ways)
    learner = _make_learner(config, model, loss_fn)
    tx = optax.adam(config.outer_lr)
    if config.grad_clip:
        tx = optax.chain(optax.clip(config.grad_clip), tx)
    return model, params["params"], learner, tx


def make_learner(args, loss_fn, params) -> MetaLearner:
    """The learner for ``--algorithm`` with the protocol's α and inner steps.

    ANIL adapts only the output layer. iMAML uses its own inner solver settings
    (30 proximal gradient steps at 1e-3 with λ = 100, so that I + H/λ stays
    positive definite on this MLP); its test-time curve is that solver's.
    """
    common = dict(inner_lr=args.inner_lr, num_inner_steps=args.inner_steps)
    if args.algorithm == "imaml":
        return maml_jax.imaml(
            loss_fn, inner_lr=1e-3, num_inner_steps=30, reg_lambda=100.0, cg_steps=5
        )
    if args.algorithm == "anil":
        head = sorted(params)[-1]
        return maml_jax.anil(
            loss_fn, adapt_mask={k: k == head for k in params}, **common
        )
    factory = {
        "maml": maml_jax.maml,
        "fomaml": maml_jax.fomaml,
        "reptile": maml_jax.reptile,
        "meta_sgd": maml_jax.meta_sgd,
        "maml_plus_plus": maml_jax.maml_plus_plus,
    }[args.algorithm]
    return factory(loss_fn, **common)
