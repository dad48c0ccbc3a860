"""Flax models and adapters that turn ``model.apply`` into a ``loss_fn``."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from maml_jax.types import Aux, Batch, LossFn, Params

ApplyFn = Callable[..., jax.Array]


class MLP(nn.Module):
    """A fully connected ReLU network (the MAML paper's sinusoid regressor: 40-40).

    Attributes:
      hidden_sizes: widths of the hidden layers.
      output_size: width of the output layer.

    Inputs of shape ``(num_examples, in_features)`` give outputs of shape
    ``(num_examples, output_size)``.
    """

    hidden_sizes: Sequence[int] = (40, 40)
    output_size: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for width in self.hidden_sizes:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(self.output_size)(x)


def _apply(apply_fn: ApplyFn, params: Params, inputs: jax.Array) -> jax.Array:
    return apply_fn({"params": params}, inputs)


def regression_loss(apply_fn: ApplyFn) -> LossFn:
    """Mean squared error ``loss_fn(params, (inputs, targets))`` for ``apply_fn``.

    Args:
      apply_fn: a Flax ``model.apply``, called as ``apply_fn({'params': p}, x)``.

    Returns:
      ``loss_fn(params, batch) -> mse``, with ``batch = (inputs, targets)`` and
      predictions of the shape of ``targets``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> model = MLP(hidden_sizes=(8,))
      >>> x = jnp.zeros((5, 1))
      >>> params = model.init(jax.random.key(0), x)["params"]
      >>> loss_fn = regression_loss(model.apply)
      >>> loss_fn(params, (x, jnp.zeros((5, 1)))).shape
      ()
    """

    def loss_fn(params: Params, batch: Batch) -> jax.Array:
        inputs, targets = _unpack(batch)
        predictions = _apply(apply_fn, params, inputs)
        if predictions.shape != jnp.shape(targets):
            raise ValueError(
                f"regression_loss: predictions have shape {predictions.shape} but "
                f"targets have shape {jnp.shape(targets)}. A single task's batch is "
                f"(inputs, targets) with a leading example axis; a batch of tasks "
                f"goes through meta_value_and_grad, which strips the task axis."
            )
        return jnp.mean((predictions - targets) ** 2)

    return loss_fn


def classification_loss(apply_fn: ApplyFn, *, loss_scale: float = 1.0) -> LossFn:
    """Softmax cross-entropy ``loss_fn(params, (inputs, labels)) -> (loss, aux)``.

    ``loss = loss_scale · mean_i CE(logits_i, labels_i)`` and
    ``aux = {'accuracy': mean_i [argmax logits_i == labels_i]}``; use it with
    ``has_aux=True``. ``loss_scale`` reproduces conventions such as the original
    MAML code's summed-over-examples loss divided by K (``loss_scale = ways``).

    Args:
      apply_fn: a Flax ``model.apply`` returning logits ``(num_examples, ways)``.
      loss_scale: a constant multiplying the mean cross-entropy.
    """

    def loss_fn(params: Params, batch: Batch) -> tuple[jax.Array, Aux]:
        inputs, labels = _unpack(batch)
        logits = _apply(apply_fn, params, inputs)
        if logits.ndim != 2 or jnp.shape(labels) != logits.shape[:1]:
            raise ValueError(
                f"classification_loss: expected logits (num_examples, ways) and "
                f"integer labels (num_examples,); got logits {logits.shape} and "
                f"labels {jnp.shape(labels)}."
            )
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == labels)
        return loss_scale * jnp.mean(ce), {"accuracy": accuracy}

    return loss_fn


def _unpack(batch: Any) -> tuple[Any, Any]:
    if not (isinstance(batch, tuple | list) and len(batch) == 2):
        raise TypeError(
            f"expected a batch (inputs, targets); got {type(batch).__name__}."
        )
    return batch[0], batch[1]


def conv2d(x: jax.Array, kernel: jax.Array, *, stride: int, impl: str) -> jax.Array:
    """A 3×3 ``SAME`` convolution of NHWC ``x`` with an HWIO ``kernel``.

    Args:
      x: ``(N, H, W, C_in)``.
      kernel: ``(3, 3, C_in, C_out)``.
      stride: 1 or 2.
      impl: ``"lax"`` (``lax.conv_general_dilated``) or ``"im2col"`` (the nine
        shifted, strided slices concatenated and one matmul). Both give the same
        values; under ``vmap`` over tasks with per-task kernels, ``"lax"`` becomes
        a grouped convolution, which XLA:CPU runs slowly, while ``"im2col"``
        becomes a batched matmul.

    Returns:
      ``(N, ceil(H / stride), ceil(W / stride), C_out)``, accumulated and returned
      in ``accumulation_dtype`` of the inputs' dtype (float32 for bfloat16 inputs:
      mixed precision runs on bfloat16 matmul units, where there are any, without
      rounding the sums to bfloat16).
    """
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
    if impl != "im2col":
        raise ValueError(f"conv impl must be 'lax' or 'im2col'; got {impl!r}.")
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


def accumulation_dtype(dtype: Any) -> jnp.dtype:
    """The dtype convolutions accumulate in: at least float32 (bfloat16 → float32)."""
    return jnp.promote_types(dtype, jnp.float32)


def _matmul(a: jax.Array, b: jax.Array, spec: str) -> jax.Array:
    """``einsum(spec, a, b)`` accumulated in ``accumulation_dtype``."""
    dtype = accumulation_dtype(jnp.result_type(a, b))
    return jnp.einsum(spec, a, b, preferred_element_type=dtype)


# Below this many input channels (the first layer of a greyscale network) the
# nine-column patches are narrower than the output and plain im2col is faster.
_ROW_PATCH_MIN_CHANNELS = 8

# Up to this many patch columns (3×3 greyscale: 9, RGB: 27) Conv4 computes batch
# norm from the patches' covariance (patch_batch_norm).
_PATCH_NORM_MAX_COLUMNS = 32


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
    """
    return _conv_row_patches_fwd(x, kernel)[0]


def _row_patches(x: jax.Array, kw: int) -> jax.Array:
    """``(N, H, W, kw·C)``: the ``kw`` horizontal taps of ``x``."""
    n, h, w, c = x.shape
    # Each tap is its own pad of x, stacked on a new axis: XLA:CPU fuses that
    # into one loop, where slices of one padded copy fed an unfused concatenate
    # (4x slower on the 14x14 layer).
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
    bfloat16 kernel gradient builds its patches transposed (measured 32 → 14 ms
    on the 14×14 Omniglot layer). In float32 the row-major form is faster (24 ms
    against 32).
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
    # one fusion of 50 ms per Omniglot meta-step.
    return pooled, (first_max, x.shape)


def _max_pool_bwd(residuals: tuple[jax.Array, tuple], g: jax.Array) -> tuple[jax.Array]:
    first_max, shape = residuals
    n, h, w, c = shape
    # One select over the (N, H/2, 2, W/2, 2, C) view against each member's
    # window position, one loop for XLA:CPU (four selects stacked measured 1.07
    # against 0.87 ms on the 28x28x64 layer).
    position = jnp.arange(4, dtype=first_max.dtype).reshape(1, 1, 2, 1, 2, 1)
    window = lambda a: a[:, :, None, :, None, :]
    dx = jnp.where(window(first_max) == position, window(g), jnp.zeros((), g.dtype))
    dx = dx.reshape(n, h // 2 * 2, w // 2 * 2, c)
    return (jnp.pad(dx, ((0, 0), (0, h % 2), (0, w % 2), (0, 0))),)


max_pool_2x2.defvjp(_max_pool_fwd, _max_pool_bwd)


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
    two-pass one when the patches are strongly correlated (natural images);
    summing ``C`` per image (leading axis) keeps the output's scale within
    ~1e-6 of float64 on Omniglot (against ~2e-6 for one long sum).

    Args:
      patches: ``(N, ..., T)`` (e.g. ``im2col_patches``), float32 or wider.
      kernel: ``(T, F)``.
      scale, offset: ``(F,)``.
      eps: added to the variance.

    Returns:
      ``(N, ..., F)`` in the patches' dtype.
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
    # of this forward: autodiff's transposes the (M, 64) output gradient (measured
    # 27 ms per Omniglot meta-step) where the (M, T + 1) patches are narrower.
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


NORMS = ("transductive", "inductive", "none")


class Conv4(nn.Module):
    """The four-block convolutional network of the MAML paper (Finn et al., 2017).

    Each block: 3×3 convolution (``filters`` channels) → normalisation → ReLU →
    downsampling (stride-2 convolution for Omniglot, 2×2 max-pool for
    mini-ImageNet); then a linear head on the mean over space (Omniglot) or the
    flattened features (mini-ImageNet).

    Normalisation (``norm``), always without running averages, so the model is
    a pure function of ``(params, inputs)``:

    * ``"transductive"`` (default; what the original MAML code and learn2learn's
      examples do): batch norm with the statistics of the current batch, at train
      and test time. Predictions for one query example depend on the other query
      examples of the same batch.
    * ``"inductive"``: each example is normalised by its own statistics over
      (H, W, C) with a per-channel scale and offset, so a prediction depends on
      that example alone.
    * ``"none"``.

    Attributes:
      num_classes: width of the output (the ``ways``), or ``None`` to return the
        features (``(N, filters)`` with ``head="mean"``, ``(N, h·w·filters)`` with
        ``head="flatten"``): an embedding for ``protonet``.
      filters: channels of every block (64 Omniglot, 32 mini-ImageNet).
      downsample: ``"stride"`` or ``"maxpool"``.
      head: ``"mean"`` (global average over space) or ``"flatten"``.
      norm: see above.
      norm_scale: learn a per-channel scale in the norm (the original code learns
        only the offset).
      conv_impl: ``"lax"`` or ``"im2col"`` (see ``conv2d``; same values). With
        ``"im2col"`` and batch statistics, a block with narrow patches (the
        first, on greyscale or RGB images) computes its convolution and batch
        norm together as ``patch_batch_norm`` (its bias, which cancels, gets a
        zero gradient).
      param_dtype: dtype of the parameters (float32, also under ``jax_enable_x64``).
      dtype: compute dtype of the convolutions and the head (e.g. ``jnp.bfloat16``
        for mixed precision: parameters stay ``param_dtype``, normalisation
        statistics and the logits are computed in float32); ``None``: as inputs.

    Inputs ``(N, H, W, C)`` give logits ``(N, num_classes)``.
    """

    num_classes: int | None
    filters: int = 64
    downsample: str = "stride"
    head: str = "mean"
    norm: str = "transductive"
    norm_scale: bool = True
    conv_impl: str = "lax"
    eps: float = 1e-5
    param_dtype: Any = jnp.float32
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim != 4:
            raise ValueError(
                f"Conv4 expects images (N, H, W, C); got shape {x.shape}. A task "
                f"batch goes through meta_value_and_grad, which strips the task axis."
            )
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}; got {self.norm!r}.")
        if self.downsample not in ("stride", "maxpool"):
            raise ValueError("downsample must be 'stride' or 'maxpool'.")
        stride = 2 if self.downsample == "stride" else 1
        for block in range(4):
            kernel = self.param(
                f"conv{block}_kernel",
                nn.initializers.lecun_normal(),
                (3, 3, x.shape[-1], self.filters),
                self.param_dtype,
            )
            bias = self.param(
                f"conv{block}_bias",
                nn.initializers.zeros,
                (self.filters,),
                self.param_dtype,
            )
            if self.dtype is not None:
                x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
            if self._normalizes_patches(kernel.shape):
                # Batch norm from the patches' covariance (see patch_batch_norm);
                # the bias cancels in the normalisation.
                dtype = accumulation_dtype(jnp.result_type(x, kernel))
                kh, kw = kernel.shape[:2]
                patches = im2col_patches(x.astype(dtype), kh, kw, stride)
                scale, offset = self._norm_params(block)
                x = patch_batch_norm(
                    patches,
                    kernel.astype(dtype).reshape(-1, self.filters),
                    jnp.ones_like(offset) if scale is None else scale,
                    offset,
                    self.eps,
                )
            else:
                x = conv2d(x, kernel, stride=stride, impl=self.conv_impl)
                x = x.astype(jnp.promote_types(x.dtype, jnp.float32)) + _channels(bias)
                x = self._normalize(x, block)
            x = nn.relu(x)
            if self.downsample == "maxpool":
                x = max_pool_2x2(x)
        x = x.mean(axis=(1, 2)) if self.head == "mean" else x.reshape(x.shape[0], -1)
        if self.num_classes is None:
            return x
        logits = nn.Dense(
            self.num_classes,
            name="head",
            param_dtype=self.param_dtype,
            dtype=self.dtype,
        )(x)
        return logits.astype(jnp.promote_types(logits.dtype, jnp.float32))

    def _normalizes_patches(self, kernel_shape: tuple[int, ...]) -> bool:
        """Whether a block takes the ``patch_batch_norm`` path: im2col, batch
        statistics and narrow patches (at most ``_PATCH_NORM_MAX_COLUMNS``)."""
        kh, kw, c_in, _ = kernel_shape
        return (
            self.conv_impl == "im2col"
            and self.norm == "transductive"
            and kh * kw * c_in <= _PATCH_NORM_MAX_COLUMNS
        )

    def _norm_params(self, block: int) -> tuple[jax.Array | None, jax.Array]:
        """The block's normalisation ``(scale or None, offset)``, ``(filters,)``."""
        scale = None
        if self.norm_scale:
            scale = self.param(
                f"norm{block}_scale",
                nn.initializers.ones,
                (self.filters,),
                self.param_dtype,
            )
        offset = self.param(
            f"norm{block}_offset",
            nn.initializers.zeros,
            (self.filters,),
            self.param_dtype,
        )
        return scale, offset

    def _normalize(self, x: jax.Array, block: int) -> jax.Array:
        if self.norm == "none":
            return x
        axes = (0, 1, 2) if self.norm == "transductive" else (1, 2, 3)
        x = standardize(x, axes, self.eps)
        scale, offset = self._norm_params(block)
        if scale is not None:
            x = x * _channels(scale)
        return x + _channels(offset)


def _channels(v: jax.Array) -> jax.Array:
    """Reshapes a per-channel vector to broadcast against NHWC activations."""
    return v.reshape(1, 1, 1, -1)
