"""maml_jax: gradient-based meta-learning as pure JAX functions."""

from maml_jax.adapters import Model, from_equinox, from_linen, from_nnx
from maml_jax.autotune import BatchingChoice, tune_batching
from maml_jax.core import (
    InnerTrace,
    StateReduction,
    TaskBatching,
    adaptation_curve,
    auto_batching,
    inner_loop,
    mean_state,
    meta_value_and_grad,
    predict,
)
from maml_jax.episodes import EpisodeSpec, sample_episode, sample_episodes
from maml_jax.evaluation import evaluate, summarize_curves
from maml_jax.learners import (
    GRADIENT_LEARNERS,
    LEARNERS,
    MAMLPlusPlusParams,
    MetaSGDParams,
    anil,
    class_prototypes,
    fomaml,
    imaml,
    make_learner,
    maml,
    maml_plus_plus,
    meta_sgd,
    msl_weights,
    protonet,
    prototype_logits,
    reptile,
    reptile_meta_optimizer,
)
from maml_jax.metrics import mean_ci95
from maml_jax.models import MLP, Conv4, classification_loss, regression_loss
from maml_jax.tasks import (
    SinusoidParams,
    sample_sinusoid_params,
    sample_sinusoid_tasks,
    sinusoid,
    sinusoid_tasks,
)
from maml_jax.train import (
    MetaTrainState,
    StopTraining,
    fit,
    meta_train_step,
    scan_train_steps,
    train_step,
)
from maml_jax.types import (
    AdaptFn,
    ApplyFn,
    Aux,
    Batch,
    CurveFn,
    InitFn,
    LossFn,
    MetaLearner,
    MetaLossFn,
    MetaParams,
    ModelState,
    Params,
    PredictFn,
    StatefulLossFn,
    Task,
    TaskBatch,
    stack_tasks,
    unstack_tasks,
)
from maml_jax.update_rules import per_step_sgd, sgd_with_rates

__version__ = "0.2.0"

# Checkpoints need orbax; they are imported on first use so that
# ``import maml_jax`` stays light for users of the core alone.
_LAZY = {
    "Checkpointer": "maml_jax.checkpoint",
    "CorruptCheckpointError": "maml_jax.checkpoint",
    "RestoredCheckpoint": "maml_jax.checkpoint",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    # Types
    "AdaptFn",
    "ApplyFn",
    "Aux",
    "Batch",
    "CurveFn",
    "InitFn",
    "LossFn",
    "MetaLearner",
    "MetaLossFn",
    "MetaParams",
    "ModelState",
    "Params",
    "PredictFn",
    "StateReduction",
    "StatefulLossFn",
    "Task",
    "TaskBatch",
    "TaskBatching",
    "stack_tasks",
    "unstack_tasks",
    # Core: the inner loop and meta-gradients
    "InnerTrace",
    "adaptation_curve",
    "auto_batching",
    "inner_loop",
    "mean_state",
    "meta_value_and_grad",
    "predict",
    # Task batching chosen by measurement (maml_jax.autotune)
    "BatchingChoice",
    "tune_batching",
    # Inner update rules (optax)
    "per_step_sgd",
    "sgd_with_rates",
    # Learners
    "GRADIENT_LEARNERS",
    "LEARNERS",
    "MAMLPlusPlusParams",
    "MetaSGDParams",
    "anil",
    "class_prototypes",
    "fomaml",
    "imaml",
    "make_learner",
    "maml",
    "maml_plus_plus",
    "meta_sgd",
    "msl_weights",
    "protonet",
    "prototype_logits",
    "reptile",
    "reptile_meta_optimizer",
    # Models
    "MLP",
    "Conv4",
    "classification_loss",
    "regression_loss",
    # Model adapters: Flax Linen, Flax NNX, Equinox -> (loss_fn, params, state)
    "Model",
    "from_equinox",
    "from_linen",
    "from_nnx",
    # Tasks and episodes
    "EpisodeSpec",
    "SinusoidParams",
    "sample_episode",
    "sample_episodes",
    "sample_sinusoid_params",
    "sample_sinusoid_tasks",
    "sinusoid",
    "sinusoid_tasks",
    # Training and evaluation
    "MetaTrainState",
    "StopTraining",
    "evaluate",
    "fit",
    "mean_ci95",
    "meta_train_step",
    "scan_train_steps",
    "summarize_curves",
    "train_step",
    # Checkpoints (orbax, imported on first use)
    "Checkpointer",
    "CorruptCheckpointError",
    "RestoredCheckpoint",
]
