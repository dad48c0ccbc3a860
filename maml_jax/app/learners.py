"""Each protocol's learners: the algorithm names and their paper-style settings.

``make_learner`` builds the sinusoid protocol's learner (an MLP's parameters);
``build_learner`` builds a few-shot run's Conv4, its initial parameters, the
learner (``_make_learner``) and the outer optimizer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

import maml_jax
from maml_jax import MetaLearner, models
from maml_jax.app import protocol

if TYPE_CHECKING:
    from maml_jax.app.presets import FewShotConfig

# The gradient learners, which the sinusoid protocol runs, plus the metric
# baseline for few-shot classification (it has no regression form).
REGRESSION_ALGORITHMS = maml_jax.GRADIENT_LEARNERS
ALGORITHMS = tuple(maml_jax.LEARNERS)

# Conv4's norms as the CLI offers them: "running-query" and "per-step" are its
# running norm with the query pass meta-trained on the running averages, or
# with one set of statistics and norm weights per inner step (MAML++'s BNRS/BNWB);
# "support" normalises each query image with the adapted model's support-set
# moments (TaskNorm's context moments), in meta-training and at test.
NORMS = (
    "transductive",
    "running",
    "running-query",
    "per-step",
    "support",
    "inductive",
    "none",
)
STATEFUL_NORMS = ("running", "running-query", "per-step", "support")
QUERY_INFERENCE_NORMS = ("running-query", "support")
_MODEL_NORM = {"running-query": "running", "per-step": "running"}
PER_STEP_NORM_ALGORITHMS = ("maml", "fomaml", "maml_plus_plus")
RUNNING_QUERY_ALGORITHMS = ("maml", "fomaml")

# Each protocol's settings beyond the shared inner_lr / num_inner_steps.
_FEW_SHOT_EXTRA = {
    # Rajeswaran et al.'s code (github.com/aravindr93/imaml_dev), README's
    # Omniglot command: --lam 2.0 --cg_steps 5.
    "imaml": dict(reg_lambda=2.0, cg_steps=5),
}

# iMAML on the sinusoids. The authors published no sinusoid setting (imaml_dev
# has a SinusoidDataset and a 40-40 MLP but no script or values for them), and
# their Omniglot values (λ = 2, α = 0.1, 16 steps) are for a cross-entropy loss
# on a batch-normalised Conv4, and learn far less on these MSE tasks. The
# values below are chosen here instead; see benchmarks/CHANGELOG.md (2026-11-30).
SINUSOID_IMAML = dict(
    # 1/λ = 0.01 is MAML's α (Finn et al., 2017), so φ* is about one MAML step;
    # λ > −λ_min(H_S) at initialisation, so I + H_S/λ is positive definite.
    reg_lambda=100.0,
    # α(λ + λ_max(H_S)) < 2 at initialisation; where meta-training sharpens
    # the support loss past 2/α − λ, the inner solve halves the step.
    inner_lr=1e-3,
    # (1 − αλ)^30 ≈ 0.04: the proximal solve converges along flat directions.
    num_inner_steps=30,
    # imaml_dev: --cg_steps 5 in the README's Omniglot command (and the default).
    cg_steps=5,
)


def _make_learner(config: FewShotConfig, model, loss_fn):
    """The learner for ``config.algorithm``, with the paper-style defaults."""
    name = config.algorithm
    stateful = config.norm in STATEFUL_NORMS
    if name == "protonet":
        # build_learner made ``model`` headless: its features are the embedding.
        if stateful:
            embed = lambda p, s, x, *, training: models.apply_with_state(
                model.apply, p, s, x, training
            )
        else:
            embed = lambda p, x: model.apply({"params": p}, x)
        return maml_jax.make_learner(
            name, embed, ways=config.ways, **({"has_state": True} if stateful else {})
        )
    kwargs = dict(
        inner_lr=config.inner_lr,
        num_inner_steps=config.inner_steps,
        has_aux=True,
        **_FEW_SHOT_EXTRA.get(name, {}),
    )
    if stateful:
        kwargs["has_state"] = True
    if config.norm == "per-step":
        kwargs["per_step_norm"] = True
    if config.norm in QUERY_INFERENCE_NORMS:
        kwargs["query_training"] = False
    if config.norm == "support":
        kwargs["query_state"] = "support"
    if name == "anil":  # only the linear head adapts
        kwargs["adapt_mask"] = lambda p: {k: k == "head" for k in p}
    if name == "maml_plus_plus":
        kwargs["msl_anneal_steps"] = max(config.steps // 4, 1)
    kwargs = protocol.learner_kwargs(config, kwargs)  # a preset's own protocol
    return maml_jax.make_learner(name, loss_fn, **kwargs)


def _per_step_norm(config: FewShotConfig) -> int:
    """``--norm per-step`` keeps one set of statistics per inner step (BNRS/BNWB):
    ``K + 1``, the query pass after the last step included."""
    return config.inner_steps + 1 if config.norm == "per-step" else 0


def build_learner(config: FewShotConfig, image_shape):
    """Model, initial params, learner, outer optimizer and initial model state
    (``None`` unless ``--norm running``) for ``config``."""
    omniglot = config.dataset == "omniglot"
    model = models.Conv4(
        num_classes=None if config.algorithm == "protonet" else config.ways,
        filters=config.filters or (64 if omniglot else 32),
        downsample=config.downsample or ("stride" if omniglot else "maxpool"),
        head=config.head or ("mean" if omniglot else "flatten"),
        norm=_MODEL_NORM.get(config.norm, config.norm),
        conv_impl=config.conv_impl or "auto",
        dtype=None if config.precision == "float32" else jnp.bfloat16,
        per_step_norm=_per_step_norm(config),
    )
    # Jitted: one compile instead of op-by-op dispatch (the same values).
    variables = jax.jit(model.init)(
        jax.random.key(config.seed), jnp.zeros((2, *image_shape))
    )
    params = variables.pop("params")
    model_state = variables or None
    loss_fn = models.classification_loss(
        model.apply,
        loss_scale=config.loss_scale or config.ways,
        stateful=model_state is not None,
    )
    learner = _make_learner(config, model, loss_fn)
    tx = protocol.outer_optimizer(config)
    return model, params, learner, tx, model_state


def make_learner(args, loss_fn, params) -> MetaLearner:
    """The learner for ``--algorithm`` with the protocol's α and inner steps.

    ANIL adapts only the output layer. iMAML uses its own inner solver settings
    (``SINUSOID_IMAML``); its test-time curve is that solver's.
    """
    kwargs = dict(inner_lr=args.inner_lr, num_inner_steps=args.inner_steps)
    if args.algorithm == "imaml":
        kwargs = dict(SINUSOID_IMAML)
    if args.algorithm == "anil":
        head = sorted(params)[-1]
        kwargs["adapt_mask"] = {k: k == head for k in params}
    return maml_jax.make_learner(args.algorithm, loss_fn, **kwargs)
