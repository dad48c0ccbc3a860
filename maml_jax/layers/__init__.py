"""Drop-in Flax layers on the library's fast convolutions.

``maml_jax.layers.Conv`` replaces ``flax.linen.Conv`` and
``maml_jax.layers.nnx.Conv`` replaces ``flax.nnx.Conv`` (imported on its own,
to keep ``import maml_jax`` from loading ``flax.nnx``): the same parameters and
initialisation, im2col matmuls on CPU and ``lax`` convolutions elsewhere.
"""

from maml_jax.layers.linen import Conv

__all__ = ["Conv"]
