"""maml_jax: gradient-based meta-learning as pure JAX functions."""

from maml_jax.algorithms import anil, fomaml, maml
from maml_jax.core import (
    adaptation_curve,
    adapted_query_loss,
    as_task_batch,
    batch_meta_loss,
    evaluate_loss,
    inner_loop,
    meta_value_and_grad,
    sgd_update,
    task_metrics,
)
from maml_jax.episodes import EpisodeSpec, sample_episode, sample_episodes
from maml_jax.implicit import imaml
from maml_jax.meta_sgd import maml_plus_plus, meta_sgd, msl_weights
from maml_jax.metrics import mean_ci95
from maml_jax.models import MLP, Conv4, classification_loss, regression_loss
from maml_jax.protonets import class_prototypes, protonet, prototype_logits
from maml_jax.reptile import reptile, reptile_meta_optimizer
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
    evaluate,
    fit,
    meta_train_step,
    scan_train_steps,
    summarize_curves,
    train_step,
)
from maml_jax.types import Batch, MetaLearner, MetaParams, Params, Task

__version__ = "0.1.0"

# Imported on first use (PEP 562), so that ``import maml_jax`` does not load orbax.
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
    "adapted_query_loss",
    "imaml",
    "StopTraining",
    "class_prototypes",
    "protonet",
    "prototype_logits",
    "anil",
    "maml_plus_plus",
    "meta_sgd",
    "msl_weights",
    "reptile",
    "reptile_meta_optimizer",
    "Checkpointer",
    "Conv4",
    "CorruptCheckpointError",
    "EpisodeSpec",
    "RestoredCheckpoint",
    "sample_episode",
    "sample_episodes",
    "MLP",
    "Batch",
    "MetaLearner",
    "MetaParams",
    "MetaTrainState",
    "Params",
    "SinusoidParams",
    "Task",
    "adaptation_curve",
    "as_task_batch",
    "batch_meta_loss",
    "classification_loss",
    "evaluate",
    "evaluate_loss",
    "fit",
    "fomaml",
    "inner_loop",
    "maml",
    "mean_ci95",
    "meta_train_step",
    "meta_value_and_grad",
    "regression_loss",
    "sample_sinusoid_params",
    "sample_sinusoid_tasks",
    "scan_train_steps",
    "sgd_update",
    "sinusoid",
    "sinusoid_tasks",
    "summarize_curves",
    "task_metrics",
    "train_step",
]
