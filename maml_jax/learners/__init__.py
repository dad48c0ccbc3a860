"""The learners, one module per algorithm, readable against its paper."""

from maml_jax.learners.imaml import imaml
from maml_jax.learners.maml import anil, fomaml, maml
from maml_jax.learners.maml_plus_plus import (
    MAMLPlusPlusParams,
    maml_plus_plus,
    msl_weights,
)
from maml_jax.learners.meta_sgd import MetaSGDParams, meta_sgd
from maml_jax.learners.protonet import class_prototypes, protonet, prototype_logits
from maml_jax.learners.registry import GRADIENT_LEARNERS, LEARNERS, make_learner
from maml_jax.learners.reptile import reptile, reptile_meta_optimizer

__all__ = [
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
]
