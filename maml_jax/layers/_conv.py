"""The convolution both drop-in layers run: ``ops.conv2d``'s fast path where it
applies, ``lax.conv_general_dilated`` (``nn.Conv``'s own op) otherwise."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from maml_jax import ops


def pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    """``3`` or ``(3, 3)`` -> ``(3, 3)``; anything else is a clear error."""
    if isinstance(value, int):
        return value, value
    value = tuple(value)
    if len(value) != 2 or not all(isinstance(v, int) and v > 0 for v in value):
        raise ValueError(
            f"{name} must be a positive int or two of them for a 2-D convolution; "
            f"got {value!r}."
        )
    return value


def convolve(
    x: jax.Array,
    kernel: jax.Array,
    bias: jax.Array | None,
    *,
    strides: tuple[int, int],
    padding: Any,
    dtype: Any,
    impl: str,
) -> jax.Array:
    """``nn.Conv``'s computation: ``x (..., H, W, C_in)`` with an HWIO kernel.

    ``"SAME"`` padding with equal strides takes ``ops.conv2d`` with the resolved
    ``impl`` (im2col matmuls on CPU); other paddings and unequal strides run
    ``lax.conv_general_dilated`` as ``nn.Conv`` does. Inputs without a batch axis
    and with several are accepted, as by ``nn.Conv``.
    """
    if x.ndim < 3:
        raise ValueError(f"Conv expects inputs (..., H, W, C); got shape {x.shape}.")
    if x.shape[-1] != kernel.shape[2]:
        raise ValueError(
            f"Conv's kernel takes {kernel.shape[2]} input channels; the inputs "
            f"have {x.shape[-1]} (shape {x.shape})."
        )
    dtype = dtype or jnp.result_type(x, kernel)
    batch_shape = x.shape[:-3]
    x = x.reshape(-1, *x.shape[-3:]).astype(dtype)
    kernel = kernel.astype(dtype)
    fast = padding == "SAME" and strides[0] == strides[1]
    if fast:
        y = ops.conv2d(x, kernel, stride=strides[0], impl=impl)
    else:
        y = jax.lax.conv_general_dilated(
            x,
            kernel,
            window_strides=strides,
            padding=padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            preferred_element_type=ops.accumulation_dtype(dtype),
        )
    y = y.astype(dtype)
    if bias is not None:
        y = y + bias.astype(dtype).reshape(1, 1, 1, -1)
    return y.reshape(*batch_shape, *y.shape[1:])
