"""Adapters: a Flax Linen, Flax NNX or Equinox model -> ``(loss_fn, params, state)``.

One module per framework; Flax NNX and Equinox are imported on first use.
"""

from maml_jax.adapters._model import Model
from maml_jax.adapters.equinox import from_equinox
from maml_jax.adapters.linen import from_linen
from maml_jax.adapters.nnx import from_nnx

__all__ = ["Model", "from_equinox", "from_linen", "from_nnx"]
