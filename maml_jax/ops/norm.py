"""Normalisation with closed-form custom VJPs: ``standardize`` and batch norm
computed from a convolution's patches (``patch_batch_norm``); and
``pooled_standardize``, each example normalised together with a kept batch's
moments."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from maml_jax.ops.conv import accumulation_dtype, im2col_patches, patch_matmul


def pooled_standardize(
    x: jax.Array, mean: jax.Array, var: jax.Array, count: jax.Array, eps: float
) -> jax.Array:
    """Each example standardised with the moments of a kept batch and itself.

    The moments are those of the kept batch's ``count`` examples and the
    example pooled over all their positions (the kept batch weighs
    ``α = count / (count + 1)``): batch norm over the kept batch plus this one
    example, so the output for an example depends on it and the kept moments
    only (TaskNorm-I with ``α = n/(n+1)``; Bronskill et al., ICML 2020).
    Plain JAX, differentiable in every argument.

    Args:
      x: ``(N, H, W, C)``.
      mean, var: ``(C,)``: the kept batch's per-channel mean and (biased)
        variance over its examples and positions.
      count: the kept batch's number of examples (a scalar; 0: each example
        is standardised by its own moments).
      eps: added to the variance.

    Returns:
      An array of the shape of ``x``.

    Examples:
      >>> import jax.numpy as jnp
      >>> x = jnp.array([3.0]).reshape(1, 1, 1, 1)
      >>> y = pooled_standardize(x, jnp.array([1.0]), jnp.array([0.0]), 1.0, 0.0)
      >>> y.ravel().tolist()  # the moments of (1, 3): mean 2, variance 1
      [1.0]
    """
    alpha = count / (count + 1)
    mu_x, var_x = x.mean((1, 2), keepdims=True), x.var((1, 2), keepdims=True)
    mu_s, var_s = mean.reshape(1, 1, 1, -1), var.reshape(1, 1, 1, -1)
    mu = alpha * mu_s + (1 - alpha) * mu_x
    pooled = alpha * (var_s + (mu_s - mu) ** 2) + (1 - alpha) * (
        var_x + (mu_x - mu) ** 2
    )
    return (x - mu) * jax.lax.rsqrt(pooled + eps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def standardize(x: jax.Array, axes: tuple[int, ...], eps: float) -> jax.Array:
    """``(x − mean) / sqrt(var + eps)`` with the statistics taken over ``axes``.

    The normalisation of batch norm (``axes`` all but the channel axis) and of
    per-example norms. Its gradient is the closed form
    ``dx = (g − mean(g) − y · mean(g · y)) / sqrt(var + eps)`` (``y`` the
    output), two reductions and one elementwise pass where autodiff of the
    forward takes several passes over the activation; the backward is plain,
    differentiable JAX, so second-order meta-gradients go through it.

    Args:
      x: any shape.
      axes: the axes the mean and the (biased) variance are taken over.
      eps: added to the variance.

    Returns:
      An array of the shape of ``x``.

    Examples:
      >>> import jax.numpy as jnp
      >>> y = standardize(jnp.array([[1.0, 3.0], [5.0, 7.0]]), (0,), 0.0)
      >>> y.tolist()
      [[-1.0, -1.0], [1.0, 1.0]]
    """
    return _standardize_fwd(x, axes, eps)[0]


def _standardize_fwd(
    x: jax.Array, axes: tuple[int, ...], eps: float
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    centered = x - x.mean(axis=axes, keepdims=True)
    inv_std = jax.lax.rsqrt(
        jnp.mean(jnp.square(centered), axis=axes, keepdims=True) + eps
    )
    y = centered * inv_std
    return y, (y, inv_std)


def _standardize_bwd(
    axes: tuple[int, ...],
    eps: float,
    residuals: tuple[jax.Array, jax.Array],
    g: jax.Array,
) -> tuple[jax.Array]:
    del eps
    y, inv_std = residuals
    g_mean = g.mean(axis=axes, keepdims=True)
    gy_mean = jnp.mean(g * y, axis=axes, keepdims=True)
    return (inv_std * (g - g_mean - y * gy_mean),)


standardize.defvjp(_standardize_fwd, _standardize_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def patch_batch_norm(
    patches: jax.Array,
    kernel: jax.Array,
    scale: jax.Array,
    offset: jax.Array,
    eps: float,
) -> jax.Array:
    """Batch norm of a convolution given as patches: ``scale · standardize(patches
    @ kernel) + offset``, statistics over all axes but the last.

    For narrow patches (a greyscale or RGB first layer: 9 or 27 columns against
    64 output channels) the convolution's output is many times larger than its
    input, and batch norm's passes over it (statistics, normalisation, and three
    more in the backward) cost far more than the matmul. The output is linear in
    the patches, so its per-channel variance is the quadratic form
    ``kᵀ C k`` of the patches' covariance ``C`` (``T × T``), and the normalised
    output is one matmul of the centred patches with the kernel scaled by
    ``scale / std``: no pass over the output before it is written. The backward
    needs only ``[P̄, 1]ᵀ g`` (one matmul over the output gradient) and ``C``
    (kernel and affine gradients in closed form, standard batch-norm algebra);
    the patches' gradient, when needed, is one more matmul. The backward is
    plain, differentiable JAX, so second-order meta-gradients go through it.

    A bias added to the convolution's output cancels in the normalisation and
    is not an argument. A variance from ``C`` loses more float32 digits than a
    two-pass one when the patches are strongly correlated (natural images), so
    ``C`` is summed per image (leading axis) first: shorter float32 sums than
    one long sum over every row.

    Args:
      patches: ``(N, ..., T)`` (e.g. ``im2col_patches``), float32 or wider.
      kernel: ``(T, F)``.
      scale, offset: ``(F,)``.
      eps: added to the variance.

    Returns:
      ``(N, ..., F)`` in the patches' dtype.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> patches = jax.random.normal(jax.random.key(0), (4, 5, 5, 9))
      >>> kernel = jax.random.normal(jax.random.key(1), (9, 3))
      >>> y = patch_batch_norm(patches, kernel, jnp.ones(3), jnp.zeros(3), 1e-5)
      >>> y.shape, bool(jnp.allclose(y.mean(axis=(0, 1, 2)), 0.0, atol=1e-5))
      ((4, 5, 5, 3), True)
    """
    return _patch_batch_norm_fwd(patches, kernel, scale, offset, eps)[0]


def _patch_covariance(centred: jax.Array) -> jax.Array:
    """``(T, T)`` mean of ``p̄ p̄ᵀ`` over the rows of ``centred`` ``(N, ..., T)``,
    summed per leading index first (shorter float32 sums)."""
    n, t = centred.shape[0], centred.shape[-1]
    rows = centred.reshape(n, -1, t)
    per_image = jnp.einsum("nmt,nms->nts", rows, rows)
    return per_image.sum(0) / (rows.shape[0] * rows.shape[1])


def _patch_batch_norm_fwd(patches, kernel, scale, offset, eps):
    axes = tuple(range(patches.ndim - 1))
    centred = patches - patches.mean(axis=axes, keepdims=True)
    cov = _patch_covariance(centred)
    inv_std = jax.lax.rsqrt(jnp.sum(kernel * (cov @ kernel), axis=0) + eps)
    normalized_kernel = kernel * inv_std[None]
    # The offset rides on a column of ones, which also gives sum(g) in the
    # backward's one matmul.
    ones = jnp.ones((*centred.shape[:-1], 1), centred.dtype)
    augmented = jnp.concatenate([centred, ones], axis=-1)
    weights = jnp.concatenate([normalized_kernel * scale[None], offset[None]], axis=0)
    # patch_matmul for its kernel gradient, which second-order meta-gradients take
    # of this forward: autodiff's transposes the (M, F) output gradient where the
    # (M, T + 1) patches are narrower.
    out = patch_matmul(augmented, weights.astype(augmented.dtype))
    # Zero-size arrays carry the inputs' dtypes to the backward: the cotangents
    # must match them (float32 parameters against float64 images under x64).
    likes = tuple(jnp.zeros((0,), a.dtype) for a in (patches, kernel, scale, offset))
    return out, (augmented, cov, normalized_kernel, inv_std, scale, likes)


def _patch_batch_norm_bwd(eps, residuals, g):
    del eps
    augmented, cov, normalized_kernel, inv_std, scale, likes = residuals
    t = augmented.shape[-1] - 1
    rows = augmented.reshape(-1, t + 1)
    count = rows.shape[0]
    moments = jnp.einsum("mf,mt->ft", g.reshape(count, -1), rows).T
    g_sum, g_patch = moments[t], moments[:t]
    # d_scale = sum(g · u), u the standardised output P̄ k / std.
    d_scale = jnp.sum(normalized_kernel * g_patch, axis=0)
    d_kernel = inv_std[None] * (
        g_patch * scale[None] - (cov @ normalized_kernel) * (d_scale * scale)[None]
    )
    # d_z = (g_u − mean(g_u) − u · mean(g_u u)) / std with g_u = g · scale;
    # d_patches = d_z kᵀ.
    per_channel = lambda v: v.reshape((1,) * (g.ndim - 1) + (-1,))
    u = jnp.einsum("...t,tf->...f", augmented[..., :t], normalized_kernel)
    d_z = per_channel(scale) * (g - per_channel(g_sum / count)) - u * per_channel(
        scale * d_scale / count
    )
    d_patches = jnp.einsum("...f,tf->...t", d_z, normalized_kernel)
    grads = (d_patches, d_kernel, d_scale, g_sum)
    return tuple(d.astype(like.dtype) for d, like in zip(grads, likes, strict=True))


patch_batch_norm.defvjp(_patch_batch_norm_fwd, _patch_batch_norm_bwd)


def conv_batch_norm(
    x: jax.Array,
    kernel: jax.Array,
    scale: jax.Array | None,
    offset: jax.Array,
    *,
    stride: int,
    eps: float,
) -> jax.Array:
    """Batch norm of a ``SAME`` convolution, as ``patch_batch_norm`` of its im2col
    patches.

    ``scale · standardize(conv(x, kernel)) + offset`` with the statistics over
    (N, H, W), computed without a pass over the convolution's output before it
    is written; worth it where the patches are narrow (see ``patch_batch_norm``).
    The patches and the matmul are in ``accumulation_dtype`` of the inputs.

    Args:
      x: ``(N, H, W, C)``.
      kernel: ``(kh, kw, C, F)``.
      scale: ``(F,)``, or ``None`` for no scale (ones).
      offset: ``(F,)``.
      stride: the convolution's stride.
      eps: added to the variance.

    Returns:
      ``(N, ceil(H / stride), ceil(W / stride), F)``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> x = jax.random.normal(jax.random.key(0), (2, 6, 6, 1))
      >>> kernel = jax.random.normal(jax.random.key(1), (3, 3, 1, 4))
      >>> conv_batch_norm(x, kernel, None, jnp.zeros(4), stride=2, eps=1e-5).shape
      (2, 3, 3, 4)
    """
    dtype = accumulation_dtype(jnp.result_type(x, kernel))
    kh, kw = kernel.shape[:2]
    patches = im2col_patches(x.astype(dtype), kh, kw, stride)
    return patch_batch_norm(
        patches,
        kernel.astype(dtype).reshape(-1, kernel.shape[-1]),
        jnp.ones_like(offset) if scale is None else scale,
        offset,
        eps,
    )
