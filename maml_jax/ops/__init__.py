"""XLA kernels with custom VJPs behind ``maml_jax.Conv4``.

Each is plain, differentiable JAX in both passes, so second-order
meta-gradients go through the custom backwards.
"""

from maml_jax.ops.conv import (
    CONV_IMPLS,
    accumulation_dtype,
    conv2d,
    conv_row_patches,
    im2col_patches,
    patch_matmul,
    resolve_conv_impl,
)
from maml_jax.ops.norm import (
    conv_batch_norm,
    patch_batch_norm,
    pooled_standardize,
    standardize,
)
from maml_jax.ops.pool import max_pool_2x2

__all__ = [
    # Convolution (ops/conv.py)
    "CONV_IMPLS",
    "accumulation_dtype",
    "conv2d",
    "conv_row_patches",
    "im2col_patches",
    "patch_matmul",
    "resolve_conv_impl",
    # Normalisation (ops/norm.py)
    "conv_batch_norm",
    "patch_batch_norm",
    "pooled_standardize",
    "standardize",
    # Pooling (ops/pool.py)
    "max_pool_2x2",
]
