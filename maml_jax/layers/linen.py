"""``Conv``: a drop-in for ``flax.linen.Conv`` on the library's fast convolutions."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from maml_jax.layers._conv import convolve, pair


class Conv(nn.Module):
    """A 2-D convolution with ``flax.linen.Conv``'s parameters and initialisation.

    The same ``kernel`` ``(kh, kw, C_in, features)`` and ``bias`` ``(features,)``
    parameters, drawn the same way (``lecun_normal`` and zeros by default), so a
    model switches by changing its import, and checkpoints carry over. With
    ``"SAME"`` padding and equal strides it runs ``ops.conv2d`` with
    ``conv_impl`` (``"auto"``: im2col matmuls on CPU, where per-task kernels
    under ``vmap`` become batched matmuls instead of the grouped convolutions
    XLA:CPU runs slowly, and ``lax`` elsewhere); other paddings and strides run
    ``lax.conv_general_dilated`` as ``nn.Conv`` does. Values equal ``nn.Conv``'s
    in every case.

    Attributes:
      features: output channels.
      kernel_size: ``(kh, kw)`` or one int for both.
      strides: an int or ``(sh, sw)``.
      padding: ``"SAME"``, ``"VALID"`` or explicit ``((lo, hi), (lo, hi))``.
      use_bias: whether to add a bias.
      dtype: the computation's dtype (``None``: that of inputs and parameters).
      param_dtype: the parameters' dtype.
      kernel_init, bias_init: as ``nn.Conv``'s.
      conv_impl: ``"auto"``, ``"im2col"`` or ``"lax"`` (``ops.conv2d``).

    Inputs ``(..., H, W, C_in)`` (any number of batch axes, or none) give
    ``(..., H', W', features)``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from maml_jax.layers import Conv
      >>> layer = Conv(features=4, kernel_size=(3, 3))
      >>> x = jnp.ones((2, 8, 8, 1))
      >>> params = layer.init(jax.random.key(0), x)["params"]
      >>> layer.apply({"params": params}, x).shape
      (2, 8, 8, 4)
    """

    features: int
    kernel_size: int | Sequence[int]
    strides: int | Sequence[int] = 1
    padding: Any = "SAME"
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Callable[..., jax.Array] = nn.initializers.lecun_normal()
    bias_init: Callable[..., jax.Array] = nn.initializers.zeros_init()
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kh, kw = pair(self.kernel_size, "kernel_size")
        kernel = self.param(
            "kernel",
            self.kernel_init,
            (kh, kw, x.shape[-1], self.features),
            self.param_dtype,
        )
        bias = None
        if self.use_bias:
            bias = self.param(
                "bias", self.bias_init, (self.features,), self.param_dtype
            )
        return convolve(
            x,
            kernel,
            bias,
            strides=pair(self.strides, "strides"),
            padding=self.padding,
            dtype=self.dtype,
            impl=self.conv_impl,
        )
