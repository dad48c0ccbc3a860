"""``Conv``: a drop-in for ``flax.nnx.Conv`` on the library's fast convolutions.

Imported on its own (``from maml_jax.layers.nnx import Conv``), so that
``import maml_jax`` does not load ``flax.nnx``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from maml_jax.layers._conv import convolve, pair

_KERNEL_INIT = nnx.initializers.lecun_normal()
_BIAS_INIT = nnx.initializers.zeros_init()


class Conv(nnx.Module):
    """A 2-D convolution with ``flax.nnx.Conv``'s parameters and initialisation.

    ``Conv(in_features, out_features, kernel_size, ..., rngs=rngs)`` holds
    ``kernel`` ``(kh, kw, in_features, out_features)`` and ``bias`` as
    ``nnx.Param``, drawn as ``nnx.Conv`` draws them from the same ``rngs``
    (``lecun_normal`` and zeros by default). The computation is that of
    ``maml_jax.layers.Conv`` (``conv_impl``: ``"auto"`` takes im2col matmuls on
    CPU, ``lax`` elsewhere); values equal ``nnx.Conv``'s.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from maml_jax.layers.nnx import Conv
      >>> layer = Conv(1, 4, kernel_size=(3, 3), rngs=nnx.Rngs(0))
      >>> layer(jnp.ones((2, 8, 8, 1))).shape
      (2, 8, 8, 4)
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int | Sequence[int],
        strides: int | Sequence[int] = 1,
        *,
        padding: Any = "SAME",
        use_bias: bool = True,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        kernel_init: Callable[..., jax.Array] = _KERNEL_INIT,
        bias_init: Callable[..., jax.Array] = _BIAS_INIT,
        conv_impl: str = "auto",
        rngs: nnx.Rngs,
    ):
        kh, kw = pair(kernel_size, "kernel_size")
        self.strides = pair(strides, "strides")
        self.padding = padding
        self.dtype = dtype
        self.conv_impl = conv_impl
        shape = (kh, kw, in_features, out_features)
        self.kernel = nnx.Param(kernel_init(rngs.params(), shape, param_dtype))
        self.bias = (
            nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype))
            if use_bias
            else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return convolve(
            x,
            self.kernel[...],
            None if self.bias is None else self.bias[...],
            strides=self.strides,
            padding=self.padding,
            dtype=self.dtype,
            impl=self.conv_impl,
        )
