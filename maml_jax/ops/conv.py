"""3×3 ``SAME`` convolutions: ``lax.conv`` or im2col matmuls with custom VJPs.

Under ``vmap`` over tasks with per-task kernels, ``lax.conv_general_dilated``
becomes a grouped convolution, which XLA:CPU runs slowly; written as matmuls of
patches, the same convolution becomes a batched matmul. ``conv2d`` offers both
formulations (same values), and ``resolve_conv_impl`` picks one per backend.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

CONV_IMPLS = ("auto", "lax", "im2col")

# Below this many input channels (the first layer of a greyscale network) the
# nine-column patches are narrower than the output and plain im2col is faster.
_ROW_PATCH_MIN_CHANNELS = 8


def resolve_conv_impl(impl: str) -> str:
    """The convolution formulation ``impl`` stands for on the default backend.

    ``"auto"`` resolves to ``"im2col"`` when ``jax.default_backend()`` is
    ``"cpu"`` (per-task kernels under ``vmap`` then run as batched matmuls
    rather than as the grouped convolutions XLA:CPU runs slowly) and to
    ``"lax"`` on any other backend; ``"lax"`` and ``"im2col"`` are returned
    unchanged. Call it at trace time: the answer follows the default backend, so
    a function placed on another backend should name its formulation.

    Args:
      impl: one of ``CONV_IMPLS``: ``"auto"``, ``"lax"`` or ``"im2col"``.

    Returns:
      ``"lax"`` or ``"im2col"``.

    Raises:
      ValueError: for any other ``impl``.

    Examples:
      >>> resolve_conv_impl("lax")
      'lax'
      >>> resolve_conv_impl("auto") in ("lax", "im2col")
      True
    """
    if impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl must be one of {CONV_IMPLS}; got {impl!r}.")
    if impl == "auto":
        return "im2col" if jax.default_backend() == "cpu" else "lax"
    return impl


def accumulation_dtype(dtype: Any) -> jnp.dtype:
    """The dtype convolutions accumulate in: at least float32 (bfloat16 → float32).

    Examples:
      >>> import jax.numpy as jnp
      >>> accumulation_dtype(jnp.bfloat16)
      dtype('float32')
    """
    return jnp.promote_types(dtype, jnp.float32)


def _matmul(a: jax.Array, b: jax.Array, spec: str) -> jax.Array:
    """``einsum(spec, a, b)`` accumulated in ``accumulation_dtype``."""
    dtype = accumulation_dtype(jnp.result_type(a, b))
    return jnp.einsum(spec, a, b, preferred_element_type=dtype)


def conv2d(x: jax.Array, kernel: jax.Array, *, stride: int, impl: str) -> jax.Array:
    """A 3×3 ``SAME`` convolution of NHWC ``x`` with an HWIO ``kernel``.

    Args:
      x: ``(N, H, W, C_in)``.
      kernel: ``(3, 3, C_in, C_out)``.
      stride: 1 or 2.
      impl: ``"lax"`` (``lax.conv_general_dilated``), ``"im2col"`` (the nine
        shifted, strided slices concatenated and one matmul; at stride 1 with at
        least 8 input channels, ``conv_row_patches``) or ``"auto"`` (see
        ``resolve_conv_impl``). All give the same values; under ``vmap`` over
        tasks with per-task kernels, ``"lax"`` becomes a grouped convolution,
        which XLA:CPU runs slowly, while ``"im2col"`` becomes a batched matmul.

    Returns:
      ``(N, ceil(H / stride), ceil(W / stride), C_out)``, accumulated and returned
      in ``accumulation_dtype`` of the inputs' dtype (float32 for bfloat16 inputs:
      mixed precision runs on bfloat16 matmul units, where there are any, without
      rounding the sums to bfloat16).

    Examples:
      >>> import jax.numpy as jnp
      >>> x, kernel = jnp.ones((1, 5, 5, 2)), jnp.ones((3, 3, 2, 4))
      >>> conv2d(x, kernel, stride=2, impl="im2col").shape
      (1, 3, 3, 4)
      >>> bool(jnp.all(conv2d(x, kernel, stride=1, impl="lax")[0, 2, 2] == 18.0))
      True
    """
    impl = resolve_conv_impl(impl)
    dtype = jnp.result_type(x, kernel)
    x, kernel = x.astype(dtype), kernel.astype(dtype)
    if impl == "lax":
        return jax.lax.conv_general_dilated(
            x,
            kernel,
            window_strides=(stride, stride),
            padding="SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            preferred_element_type=accumulation_dtype(dtype),
        )
    kh, kw, c_in, c_out = kernel.shape
    if stride == 1 and c_in >= _ROW_PATCH_MIN_CHANNELS and kh % 2 and kw % 2:
        return conv_row_patches(x, kernel)
    # The patches' gradient is summed back onto x (pads of strided slices); in
    # bfloat16 XLA:CPU converts every element of every slice, which made that
    # sum slower than the rest of the convolution. Slicing a float32 copy keeps
    # that sum in float32; patch_matmul rounds the patches to bfloat16.
    patches = im2col_patches(x.astype(accumulation_dtype(dtype)), kh, kw, stride)
    return patch_matmul(patches, kernel.reshape(kh * kw * c_in, c_out))


def im2col_patches(x: jax.Array, kh: int, kw: int, stride: int) -> jax.Array:
    """The ``SAME``-padded ``kh × kw`` patches of NHWC ``x``, taps outermost.

    Returns:
      ``(N, ceil(H / stride), ceil(W / stride), kh·kw·C)``; column
      ``(i·kw + j)·C + c`` is channel ``c`` of tap ``(i, j)``, matching an HWIO
      kernel reshaped to ``(kh·kw·C, F)``.

    Examples:
      >>> import jax.numpy as jnp
      >>> im2col_patches(jnp.ones((2, 7, 7, 3)), 3, 3, 2).shape
      (2, 4, 4, 27)
    """
    n, h, w, _ = x.shape
    h_out, w_out = -(-h // stride), -(-w // stride)
    # SAME padding as lax: total pad = max((out - 1) * stride + k - in, 0).
    pad_h = max((h_out - 1) * stride + kh - h, 0)
    pad_w = max((w_out - 1) * stride + kw - w, 0)
    x = jnp.pad(
        x,
        (
            (0, 0),
            (pad_h // 2, pad_h - pad_h // 2),
            (pad_w // 2, pad_w - pad_w // 2),
            (0, 0),
        ),
    )
    return jnp.concatenate(
        [
            x[
                :,
                i : i + (h_out - 1) * stride + 1 : stride,
                j : j + (w_out - 1) * stride + 1 : stride,
            ]
            for i in range(kh)
            for j in range(kw)
        ],
        axis=-1,
    )


@jax.custom_vjp
def conv_row_patches(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Stride-1 ``SAME`` convolution (odd kernel sizes) from one kernel row's patches.

    The patches hold only the ``kw`` horizontal taps, ``(N, H, W, kw·C)`` (a
    third of im2col's nine taps for 3×3), and one matmul multiplies them by all
    ``kh`` kernel rows at once, giving ``(N, H, W, kh, F)``; output row ``r`` is
    then the sum over kernel rows ``i`` of that product at row ``r + i − kh // 2``
    (zero outside the image), shifted slices XLA fuses into the sum. It does
    im2col's FLOPs but moves about a third of its memory, which is what bounds a
    convolution of per-task kernels on XLA:CPU.

    Its custom backward builds one array, the output gradient shifted by each
    kernel row ``(N, H, W, kh·F)``, and uses it twice: the kernel gradient is one
    matmul of it with the patches, and the input gradient one matmul of it with
    the kernel back to the patches' shape followed by a sum of the ``kw`` taps
    moved back to their columns (slices XLA fuses into the sum), so no patches of
    the output gradient are built. The backward is plain, differentiable JAX, so
    second-order meta-gradients go through it.

    Args:
      x: ``(N, H, W, C)``.
      kernel: ``(kh, kw, C, F)`` with ``kh`` and ``kw`` odd.

    Returns:
      ``(N, H, W, F)``.

    Examples:
      >>> import jax.numpy as jnp
      >>> conv_row_patches(jnp.ones((1, 4, 4, 8)), jnp.ones((3, 3, 8, 2))).shape
      (1, 4, 4, 2)
    """
    return _conv_row_patches_fwd(x, kernel)[0]


def _row_patches(x: jax.Array, kw: int) -> jax.Array:
    """``(N, H, W, kw·C)``: the ``kw`` horizontal taps of ``x``."""
    n, h, w, c = x.shape
    # Each tap is its own pad of x, stacked on a new axis: XLA:CPU fuses that
    # into one loop, where slices of one padded copy fed a slower, unfused
    # concatenate.
    taps = _row_taps(x, kw)
    return jnp.stack(taps, axis=3).reshape(n, h, w, kw * c)


def _row_taps(x: jax.Array, kw: int) -> list[jax.Array]:
    """The ``kw`` horizontal taps, each ``(N, H, W, C)``: ``x`` shifted by
    ``j − kw // 2`` columns, zero-filled."""
    return [_shift(x, 2, kw // 2 - j) for j in range(kw)]


def _shift(x: jax.Array, axis: int, offset: int) -> jax.Array:
    """``y[..., k, ...] = x[..., k − offset, ...]`` along ``axis``, zero where that
    index falls outside ``x`` (one ``lax.pad``, which XLA fuses)."""
    config = [(0, 0, 0)] * x.ndim
    config[axis] = (offset, -offset, 0)
    return jax.lax.pad(x, jnp.zeros((), x.dtype), config)


def _by_kernel_row(kernel: jax.Array) -> jax.Array:
    """``(kh, kw, C, F)`` → ``(kw·C, kh·F)``: (kw, C) rows against (kh, F) columns,
    so that one matmul with the row patches applies every kernel row."""
    kh, kw, c_in, c_out = kernel.shape
    return kernel.transpose(1, 2, 0, 3).reshape(kw * c_in, kh * c_out)


def _conv_row_patches_fwd(
    x: jax.Array, kernel: jax.Array
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    kh, kw, c_in, c_out = kernel.shape
    n, h, w, _ = x.shape
    patches = _row_patches(x, kw)
    products = patch_matmul(patches, _by_kernel_row(kernel).astype(patches.dtype))
    products = products.reshape(n, h, w, kh, c_out)
    # Kernel row i meets output row r at input row r + i - kh // 2.
    out = sum(_shift(products[:, :, :, i], 1, kh // 2 - i) for i in range(kh))
    # bfloat16: keep x and rebuild the patches channel-major in the backward (see
    # there); float32: keep the patches.
    return out, (x if _channel_major_kernel_grad(x.dtype) else patches, kernel)


def _channel_major_kernel_grad(dtype: Any) -> bool:
    """Whether the kernel gradient contracts channel-major patches ``(kw·C, M)``.

    XLA:CPU runs a bfloat16 matmul on the bfloat16 units (AMX, via YNNPACK) only
    when the long contracted axis is the minor axis of the left operand; given
    ``(M, kw·C)`` patches it converts both operands to float32 instead, so the
    bfloat16 kernel gradient builds its patches transposed. In float32 the
    row-major form is the faster one.
    """
    return jnp.dtype(dtype).itemsize < 4


def _conv_row_patches_bwd(
    residuals: tuple[jax.Array, jax.Array], g: jax.Array
) -> tuple[jax.Array, jax.Array]:
    x_or_patches, kernel = residuals
    dtype = x_or_patches.dtype
    kh, kw, c_in, c_out = kernel.shape
    n, h, w, _ = g.shape
    g = g.astype(dtype)
    # The products' cotangent: input row r' meets kernel row i at output row
    # r' - i + kh // 2, so it is g shifted by each kernel row, (N·H·W, kh·F).
    shifted = jnp.stack([_shift(g, 1, i - kh // 2) for i in range(kh)], axis=3)
    shifted = shifted.reshape(-1, kh * c_out)
    # Input gradient: back to the patches with one matmul, then each horizontal
    # tap moved back to its column and summed (the transpose of building the
    # patches). It reuses `shifted`, where another convolution of g would build
    # a second set of patches.
    d_patches = _matmul(shifted, _by_kernel_row(kernel).astype(dtype), "mf,kf->mk")
    d_patches = d_patches.reshape(n, h, w, kw, c_in)
    d_x = sum(_shift(d_patches[:, :, :, j], 2, j - kw // 2) for j in range(kw))
    if _channel_major_kernel_grad(dtype):
        taps = _row_taps(x_or_patches, kw)
        by_channel = jnp.stack([t.transpose(3, 0, 1, 2) for t in taps])
        d_by_kernel_row = _matmul(
            by_channel.reshape(kw * c_in, -1), shifted, "km,mf->kf"
        )
    else:
        patches = x_or_patches.reshape(-1, kw * c_in)
        d_by_kernel_row = _matmul(patches, shifted, "mk,mf->kf")
    d_kernel = d_by_kernel_row.reshape(kw, c_in, kh, c_out).transpose(2, 0, 1, 3)
    return d_x.astype(dtype), d_kernel.astype(kernel.dtype)


conv_row_patches.defvjp(_conv_row_patches_fwd, _conv_row_patches_bwd)


@jax.custom_vjp
def patch_matmul(patches: jax.Array, kernel: jax.Array) -> jax.Array:
    """``patches @ kernel`` for im2col patches ``(..., K)`` and a kernel ``(K, F)``.

    Its gradient is the usual one, ``(g @ kernelᵀ, patchesᵀ g)``, with the kernel
    gradient written so that XLA transposes the narrower of ``patches`` and ``g``:
    left to itself, XLA:CPU transposes the activation gradient ``g`` even where the
    patches are far narrower (the first layer's nine columns against 64), an extra
    pass over the largest tensor of the network. The backward is itself plain,
    differentiable JAX, so second-order meta-gradients go through it.

    The matmuls run in the kernel's dtype (``patches`` are rounded to it, so
    float32 patches against a bfloat16 kernel multiply in bfloat16), and sum and
    return in ``accumulation_dtype`` of it (float32 for bfloat16); the patches'
    gradient is returned in the patches' own dtype.

    Examples:
      >>> import jax.numpy as jnp
      >>> out = patch_matmul(jnp.ones((2, 5, 5, 9)), jnp.ones((9, 4), jnp.bfloat16))
      >>> out.shape, out.dtype
      ((2, 5, 5, 4), dtype('float32'))
    """
    return _patch_matmul_fwd(patches, kernel)[0]


def _patch_matmul_fwd(patches, kernel):
    rounded = patches.astype(kernel.dtype)
    # A zero-size array carries the patches' dtype to the backward.
    like = jnp.zeros((0,), patches.dtype)
    return _matmul(rounded, kernel, "...k,kf->...f"), (rounded, kernel, like)


def _patch_matmul_bwd(residuals, g):
    patches, kernel, like = residuals
    g = g.astype(kernel.dtype)
    rows = patches.reshape(-1, patches.shape[-1])
    grads = g.reshape(-1, g.shape[-1])
    if rows.shape[1] <= grads.shape[1]:
        d_kernel = _matmul(grads, rows, "mf,mk->fk").T
    else:
        d_kernel = _matmul(rows, grads, "mk,mf->kf")
    d_patches = _matmul(g, kernel, "...f,kf->...k")
    return d_patches.astype(like.dtype), d_kernel.astype(kernel.dtype)


patch_matmul.defvjp(_patch_matmul_fwd, _patch_matmul_bwd)
