"""What a learner's own protocol adds to a few-shot run's configuration.

The fields ``FIELDS`` of ``FewShotConfig`` (defaults: the MAML paper's protocol)
let a preset follow another paper: a different inner optimizer (Reptile's Adam
with β1 = 0), outer optimizer and learning-rate schedule (ProtoNets' halving,
MAML++'s cosine, Reptile's linearly annealed SGD), training episodes unlike the
test episodes (ProtoNets' 60-way training), the loss scale, Conv4's downsampling
and head, and the MAML++ / iMAML settings. ``validate`` checks them;
``outer_optimizer`` and ``learner_kwargs`` turn them into the optax
transformation and the learner's keywords.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import optax

if TYPE_CHECKING:
    from maml_jax.app.presets import FewShotConfig

FIELDS = (
    "train_ways",
    "train_shots",
    "train_queries",
    "loss_scale",
    "downsample",
    "head",
    "inner_optimizer",
    "inner_b1",
    "outer_optimizer",
    "outer_schedule",
    "outer_lr_final",
    "outer_decay_every",
    "schedule_steps",
    "msl_anneal_steps",
    "reg_lambda",
    "cg_steps",
    "cg_damping",
)
INNER_OPTIMIZERS = ("sgd", "adam")
OUTER_OPTIMIZERS = ("adam", "sgd")
# constant; cosine / linear: from outer_lr to outer_lr_final over schedule_steps;
# halving: × 0.5 every outer_decay_every steps (staircase).
OUTER_SCHEDULES = ("constant", "cosine", "linear", "halving")
# The learners whose factory takes an inner optax optimizer.
INNER_OPTIMIZER_LEARNERS = ("maml", "fomaml", "anil", "reptile", "imaml")
# iMAML's settings where a preset gives none (the app's earlier defaults).
IMAML_DEFAULTS = dict(reg_lambda=2.0, cg_steps=5, cg_damping=0.0)


def validate(config: FewShotConfig) -> None:
    """Checks the protocol fields (``ValueError`` naming the field)."""
    for name in (
        "train_ways",
        "train_shots",
        "train_queries",
        "outer_decay_every",
        "schedule_steps",
        "msl_anneal_steps",
        "cg_steps",
    ):
        value = getattr(config, name)
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1; got {value}.")
    train_ways = config.train_ways or config.ways
    if train_ways != config.ways and config.algorithm != "protonet":
        raise ValueError(
            f"train_ways ({train_ways}) differs from ways ({config.ways}): only "
            f"protonet, which has no output layer, can train and test with "
            f"different ways."
        )
    for name, choices in (
        ("inner_optimizer", INNER_OPTIMIZERS),
        ("outer_optimizer", OUTER_OPTIMIZERS),
        ("outer_schedule", OUTER_SCHEDULES),
        ("downsample", (None, "stride", "maxpool")),
        ("head", (None, "mean", "flatten")),
    ):
        if getattr(config, name) not in choices:
            raise ValueError(
                f"{name} must be one of {', '.join(map(str, choices))}; got "
                f"{getattr(config, name)!r}."
            )
    if (
        config.inner_optimizer != "sgd"
        and config.algorithm not in INNER_OPTIMIZER_LEARNERS
    ):
        raise ValueError(
            f"inner_optimizer {config.inner_optimizer!r} needs a learner that takes "
            f"an inner optimizer ({', '.join(INNER_OPTIMIZER_LEARNERS)}); "
            f"{config.algorithm} learns or fixes its own update rule."
        )
    if config.outer_schedule == "halving" and config.outer_decay_every is None:
        raise ValueError("outer_schedule 'halving' needs outer_decay_every.")
    for name in ("loss_scale", "reg_lambda"):
        value = getattr(config, name)
        if value is not None and not (np.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a finite number > 0; got {value}.")
    for name in ("outer_lr_final", "cg_damping", "inner_b1"):
        value = getattr(config, name)
        if value is not None and not (np.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0; got {value}.")
    if not config.inner_b1 < 1:
        raise ValueError(f"inner_b1 must be < 1; got {config.inner_b1}.")
    if config.outer_lr_final > config.outer_lr:
        raise ValueError(
            f"outer_lr_final ({config.outer_lr_final}) must not exceed outer_lr "
            f"({config.outer_lr}): the schedules decay."
        )


def outer_learning_rate(config: FewShotConfig) -> Any:
    """The outer learning rate: a float, or an optax schedule of the step."""
    lr = config.outer_lr
    # A run resolves schedule_steps when it starts; before that (a bare config) the
    # run's length stands in.
    length = max(config.schedule_steps or config.steps, 1)
    if config.outer_schedule == "cosine":
        return optax.cosine_decay_schedule(lr, length, alpha=config.outer_lr_final / lr)
    if config.outer_schedule == "linear":
        return optax.linear_schedule(lr, config.outer_lr_final, length)
    if config.outer_schedule == "halving":
        return optax.exponential_decay(
            lr, config.outer_decay_every, decay_rate=0.5, staircase=True
        )
    return lr


def outer_optimizer(config: FewShotConfig) -> optax.GradientTransformation:
    """Adam or SGD at ``outer_learning_rate``, after clipping to ``grad_clip``."""
    lr = outer_learning_rate(config)
    tx = optax.adam(lr) if config.outer_optimizer == "adam" else optax.sgd(lr)
    if config.grad_clip:
        tx = optax.chain(optax.clip(config.grad_clip), tx)
    return tx


def learner_kwargs(config: FewShotConfig, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` (a gradient learner's keywords) with the protocol's settings."""
    kwargs = dict(kwargs)
    if config.inner_optimizer == "adam":
        # optax's Adam at inner_lr replaces the SGD step.
        kwargs.pop("inner_lr", None)
        kwargs["inner_optimizer"] = optax.adam(config.inner_lr, b1=config.inner_b1)
    if config.algorithm == "imaml":
        for name, default in IMAML_DEFAULTS.items():
            value = getattr(config, name)
            kwargs[name] = default if value is None else value
    if config.algorithm == "maml_plus_plus" and config.msl_anneal_steps is not None:
        kwargs["msl_anneal_steps"] = config.msl_anneal_steps
    return kwargs
