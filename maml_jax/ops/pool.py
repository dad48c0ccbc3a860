"""2×2 max-pool with a one-pass custom VJP."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _pool_windows(x: jax.Array) -> tuple[jax.Array, ...]:
    """The four members of every 2×2 window of NHWC ``x`` (odd sizes floored), in
    row-major window order, each ``(N, H // 2, W // 2, C)``."""
    n, h, w, c = x.shape
    x = x[:, : h // 2 * 2, : w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2, c)
    return x[:, :, 0, :, 0], x[:, :, 0, :, 1], x[:, :, 1, :, 0], x[:, :, 1, :, 1]


@jax.custom_vjp
def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2×2 max-pool, stride 2, ``VALID`` (odd sizes are floored), of NHWC ``x``.

    The same values as ``reduce_window``, and the same gradient as XLA's
    ``select_and_scatter`` and PyTorch's ``MaxPool2d``: each window's cotangent
    goes to its first maximal member in row-major order, and NaN propagates.
    Written as a running selection over the four window members with a one-pass
    custom backward (a select on the index of that member), because
    ``reduce_window``'s gradient is much slower on XLA:CPU and ``jnp.maximum``'s
    splits ties evenly. Second-order meta-gradients differentiate both passes:
    selects, whose derivatives are selects of the tangents that route ties the
    same way.

    The index is computed with the maximum, from the same values, and kept for
    the backward: routing by comparing ``x`` with the pooled output there instead
    is fragile, since XLA may compute ``x`` twice (once into each fusion that uses
    it) and, with floating-point contraction, the two copies can differ in the
    last bit, so that no member of a window matches and its gradient is lost.

    Args:
      x: ``(N, H, W, C)``.

    Returns:
      ``(N, H // 2, W // 2, C)``.

    Examples:
      >>> import jax.numpy as jnp
      >>> x = jnp.arange(20.0).reshape(1, 4, 5, 1)
      >>> max_pool_2x2(x)[0, :, :, 0].tolist()
      [[6.0, 8.0], [16.0, 18.0]]
    """
    return _max_pool_fwd(x)[0]


def _max_pool_fwd(x: jax.Array) -> tuple[jax.Array, tuple[jax.Array, tuple]]:
    first, *rest = _pool_windows(x)
    pooled = first
    first_max = jnp.zeros(first.shape, jnp.int8)
    for k, member in enumerate(rest, start=1):
        # Strictly greater: on ties the earlier member keeps the gradient. A NaN
        # member takes over and no number replaces it (nothing compares greater
        # than NaN), so NaN propagates as in jnp.maximum.
        takes_over = (member > pooled) | jnp.isnan(member)
        first_max = jnp.where(takes_over, jnp.int8(k), first_max)
        pooled = jnp.where(takes_over, member, pooled)
    # Selected, not jnp.maximum-ed: jnp.maximum's derivative (which second-order
    # meta-gradients take of this forward) splits ties with compares and divides,
    # which XLA:CPU fuses into one slow pass.
    return pooled, (first_max, x.shape)


def _max_pool_bwd(residuals: tuple[jax.Array, tuple], g: jax.Array) -> tuple[jax.Array]:
    first_max, shape = residuals
    n, h, w, c = shape
    # One select over the (N, H/2, 2, W/2, 2, C) view against each member's
    # window position: one loop for XLA:CPU, faster than four selects stacked.
    position = jnp.arange(4, dtype=first_max.dtype).reshape(1, 1, 2, 1, 2, 1)
    window = lambda a: a[:, :, None, :, None, :]
    dx = jnp.where(window(first_max) == position, window(g), jnp.zeros((), g.dtype))
    dx = dx.reshape(n, h // 2 * 2, w // 2 * 2, c)
    return (jnp.pad(dx, ((0, 0), (0, h % 2), (0, w % 2), (0, 0))),)


max_pool_2x2.defvjp(_max_pool_fwd, _max_pool_bwd)
