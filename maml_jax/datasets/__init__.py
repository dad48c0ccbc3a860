"""Real few-shot datasets as in-memory arrays ``(num_classes, num_examples, ...)``.

Each loader turns the canonical files a user supplies into validated, cached
float32 arrays that the episode samplers in :mod:`maml_jax.tasks` consume.
Algorithms never import this package. Errors are :class:`DatasetError` (a
``ValueError``); a missing file raises :class:`DatasetNotFoundError` (also a
``FileNotFoundError``).
"""

from maml_jax.datasets._common import (
    DatasetError,
    DatasetNotFoundError,
    default_cache_dir,
)
from maml_jax.datasets.miniimagenet import (
    MINIIMAGENET_SPLITS,
    MiniImageNetSplit,
    load_miniimagenet,
)
from maml_jax.datasets.omniglot import (
    SPLIT_NAMES,
    OmniglotSplit,
    load_omniglot,
    omniglot_class_names,
    omniglot_classes,
)

OMNIGLOT_SPLIT_NAMES = SPLIT_NAMES

__all__ = [
    "MINIIMAGENET_SPLITS",
    "OMNIGLOT_SPLIT_NAMES",
    "DatasetError",
    "DatasetNotFoundError",
    "MiniImageNetSplit",
    "OmniglotSplit",
    "default_cache_dir",
    "load_miniimagenet",
    "load_omniglot",
    "omniglot_class_names",
    "omniglot_classes",
]
