"""Conv4: shapes, equivalent formulations and normalisation modes."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import maml_jax
from maml_jax import models, ops


@pytest.mark.parametrize(
    "kwargs,image,features",
    [
        (dict(filters=64, downsample="stride", head="mean"), (28, 28, 1), 64),
        (dict(filters=32, downsample="maxpool", head="flatten"), (84, 84, 3), 800),
    ],
)
def test_shapes(kwargs, image, features):
    model = models.Conv4(num_classes=5, **kwargs)
    params = model.init(jax.random.key(0), jnp.zeros((2, *image)))["params"]
    assert params["head"]["kernel"].shape == (features, 5)
    assert model.apply({"params": params}, jnp.ones((3, *image))).shape == (3, 5)
    with pytest.raises(ValueError, match=r"expects images \(N, H, W, C\)"):
        model.apply({"params": params}, jnp.ones(image))


@pytest.mark.parametrize("stride,size", [(1, 7), (2, 7), (2, 8), (1, 5)])
def test_im2col_convolution_equals_lax(stride, size):
    kx, kk = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, (2, size, size, 3), jnp.float64)
    kernel = jax.random.normal(kk, (3, 3, 3, 4), jnp.float64)
    np.testing.assert_allclose(
        ops.conv2d(x, kernel, stride=stride, impl="im2col"),
        ops.conv2d(x, kernel, stride=stride, impl="lax"),
        rtol=1e-12,
        atol=1e-12,
    )


@pytest.mark.parametrize("kernel_hw", [(3, 3), (2, 2), (1, 3), (3, 1), (5, 3)])
def test_row_patch_convolution_equals_lax_to_second_order(kernel_hw):
    # Stride 1 with >= 8 input channels takes the row-patch path (one kernel row's
    # taps per patch, all kernel rows in one matmul): values against lax, and
    # gradients to second order against finite differences.
    kx, kk = jax.random.split(jax.random.key(2))
    x = jax.random.normal(kx, (2, 6, 5, 8), jnp.float64)
    kernel = jax.random.normal(kk, (*kernel_hw, 8, 3), jnp.float64)
    np.testing.assert_allclose(
        ops.conv2d(x, kernel, stride=1, impl="im2col"),
        ops.conv2d(x, kernel, stride=1, impl="lax"),
        rtol=1e-12,
        atol=1e-12,
    )
    jax.test_util.check_grads(
        lambda x, k: ops.conv2d(x, k, stride=1, impl="im2col"),
        (x, kernel),
        order=2,
        modes=["rev"],
    )


@pytest.mark.parametrize("k,f", [(9, 4), (18, 4)])
def test_patch_matmul_gradients(k, f):
    # Both branches of the kernel gradient (patches narrower or wider than g), to
    # second order, against finite differences.
    kp, kk = jax.random.split(jax.random.key(6))
    patches = jax.random.normal(kp, (2, 5, k), jnp.float64)
    kernel = jax.random.normal(kk, (k, f), jnp.float64)
    jax.test_util.check_grads(
        lambda p, w: jnp.sum(jnp.tanh(ops.patch_matmul(p, w))),
        (patches, kernel),
        order=2,
        modes=["rev"],
    )


def _reduce_window_max_pool(x):
    return jax.lax.reduce_window(
        x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID"
    )


def _tied_images():
    """Integer-valued images: many windows hold several equal maxima."""
    x = jax.random.randint(jax.random.key(3), (2, 11, 10, 3), 0, 3)
    return x.astype(jnp.float64)


@pytest.mark.parametrize("tied", [False, True])
def test_max_pool_equals_reduce_window_in_value_and_gradient(tied):
    x = _tied_images() if tied else jax.random.normal(jax.random.key(2), (2, 11, 10, 3))
    np.testing.assert_array_equal(ops.max_pool_2x2(x), _reduce_window_max_pool(x))
    # select_and_scatter (reduce_window's transpose) routes each window's cotangent to
    # its first maximal member, as PyTorch's MaxPool2d does; so must the custom vjp.
    g = jax.random.normal(jax.random.key(4), (2, 5, 5, 3), jnp.float64)
    ours = jax.vjp(ops.max_pool_2x2, x)[1](g)[0]
    ref = jax.vjp(_reduce_window_max_pool, x)[1](g)[0]
    np.testing.assert_array_equal(ours, ref)
    if tied:  # each window's cotangent lands exactly once
        np.testing.assert_allclose(ours.sum(), g.sum(), rtol=1e-12)


def test_max_pool_second_order_gradients_and_vmap():
    x = jax.random.normal(jax.random.key(5), (2, 6, 7, 2), jnp.float64)
    jax.test_util.check_grads(
        lambda x: jnp.sum(jnp.sin(ops.max_pool_2x2(x))),
        (x,),
        order=2,
        modes=["rev"],
    )
    batched = jax.vmap(jax.grad(lambda x: jnp.sum(ops.max_pool_2x2(x) ** 2)))
    xs = jnp.stack([x, 2 * x])
    looped = [
        jax.grad(lambda x: jnp.sum(_reduce_window_max_pool(x) ** 2))(v) for v in xs
    ]
    np.testing.assert_allclose(batched(xs), np.stack(looped), rtol=1e-12)


def test_max_pool_propagates_nan_from_any_window_member():
    x = jax.random.normal(jax.random.key(7), (1, 4, 4, 4))
    # Window (0, 0) gets a NaN at member c of channel c; window (1, 1) stays finite.
    for c, (i, j) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        x = x.at[0, i, j, c].set(jnp.nan)
    pooled = ops.max_pool_2x2(x)
    assert bool(jnp.all(jnp.isnan(pooled[0, 0, 0])))
    np.testing.assert_array_equal(pooled[0, 1, 1], _reduce_window_max_pool(x)[0, 1, 1])


def test_max_pool_second_order_follows_the_first_maximum_on_ties():
    # Second-order meta-gradients differentiate the forward: on tied windows its
    # derivative must route like the backward (to the first maximal member), where
    # jnp.maximum's would split ties. Reference: gather that member, with its
    # index taken from stop_gradient(x), and plain autodiff.
    x = _tied_images()
    n, h, w, c = x.shape

    def window_members(x):  # (N, H/2, W/2, C, 4) in row-major window order
        windows = x[:, : h // 2 * 2, : w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2, c)
        return windows.transpose(0, 1, 3, 5, 2, 4).reshape(n, h // 2, w // 2, c, 4)

    first = jnp.argmax(window_members(x), axis=-1)  # the first of equal maxima

    def reference_pool(x):
        members = window_members(x)
        return jnp.take_along_axis(members, first[..., None], axis=-1)[..., 0]

    weights = jax.random.normal(jax.random.key(8), first.shape, jnp.float64)
    grad_of = lambda pool: jax.grad(lambda x: jnp.sum(weights * jnp.sin(pool(x))))
    v = jax.random.normal(jax.random.key(9), x.shape, jnp.float64)
    hvp = lambda pool: jax.grad(lambda x: jnp.vdot(grad_of(pool)(x), v))(x)
    np.testing.assert_allclose(hvp(ops.max_pool_2x2), hvp(reference_pool), rtol=1e-12)
    np.testing.assert_array_equal(ops.max_pool_2x2(x), reference_pool(x))


def _task(key, ways=3, image=(16, 16, 1)):
    kx, kq = jax.random.split(key)
    xs = jax.random.normal(kx, (ways, *image), jnp.float64)
    xq = jax.random.normal(kq, (2 * ways, *image), jnp.float64)
    return maml_jax.Task(
        support=(xs, jnp.arange(ways)), query=(xq, jnp.tile(jnp.arange(ways), 2))
    )


@pytest.mark.parametrize(
    "downsample,filters,image",
    [
        ("stride", 4, (16, 16, 1)),
        ("maxpool", 64, (28, 28, 1)),  # greyscale: the fused first block
        ("maxpool", 8, (16, 16, 3)),
    ],
)
def test_second_order_meta_gradient_is_the_same_for_both_conv_impls(
    downsample, filters, image
):
    # maxpool with >= 8 filters: blocks 2-4 take the row-patch path of "im2col",
    # with 4 plain im2col. The first block (9 or 27 patch columns) takes
    # patch_batch_norm.
    # 64 filters on 28x28 (Omniglot's Conv4) with 2 inner steps once lost max-pool
    # gradients (off by 0.4-0.9): the backward matched x against the pooled output,
    # and XLA had computed the two from separate copies that differed in the last
    # bit. It now routes by an index stored in the forward.
    task = _task(jax.random.key(3), image=image)
    head = "mean" if downsample == "stride" else "flatten"
    grads = {}
    for impl in ("lax", "im2col"):
        model = models.Conv4(
            num_classes=3,
            filters=filters,
            downsample=downsample,
            head=head,
            conv_impl=impl,
        )
        params = model.init(jax.random.key(4), task.support[0])["params"]
        params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
        learner = maml_jax.maml(
            models.classification_loss(model.apply),
            inner_lr=0.4,
            num_inner_steps=2,
            has_aux=True,
        )
        grads[impl] = jax.jit(jax.grad(lambda p, f=learner.meta_loss: f(p, task)[0]))(
            params
        )
    chex.assert_trees_all_close(grads["lax"], grads["im2col"], rtol=1e-9, atol=1e-12)


def test_normalisation_modes():
    x = jax.random.normal(jax.random.key(5), (4, 12, 12, 1))
    outputs = {}
    for norm in ("transductive", "inductive", "none"):
        model = models.Conv4(num_classes=2, filters=4, norm=norm)
        params = model.init(jax.random.key(0), x)["params"]
        full = model.apply({"params": params}, x)
        alone = model.apply({"params": params}, x[:1])
        outputs[norm] = (full, alone)
    # Transductive: example 0's prediction depends on the rest of the batch.
    assert not np.allclose(*[o[0] for o in outputs["transductive"]], atol=1e-4)
    # Inductive and none: it does not.
    for norm in ("inductive", "none"):
        full, alone = outputs[norm]
        np.testing.assert_allclose(full[0], alone[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="norm must be one of"):
        models.Conv4(num_classes=2, norm="batch").init(jax.random.key(0), x)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="'auto' on CPU")
@pytest.mark.parametrize(
    "kwargs,image",
    [
        (dict(), (28, 28, 1)),  # every default: Omniglot's network
        (dict(filters=8, downsample="maxpool", head="flatten"), (16, 16, 3)),
    ],
)
def test_default_conv_impl_is_im2col_on_cpu(kwargs, image):
    # The default "auto" resolves to "im2col" on CPU: the same parameters, and
    # bit for bit the same logits and gradients.
    x = jax.random.normal(jax.random.key(7), (3, *image), jnp.float32)
    labels = jnp.arange(3)
    default = models.Conv4(num_classes=3, **kwargs)
    im2col = models.Conv4(num_classes=3, conv_impl="im2col", **kwargs)
    assert default.conv_impl == "auto"
    params = default.init(jax.random.key(0), x)["params"]
    chex.assert_trees_all_equal(params, im2col.init(jax.random.key(0), x)["params"])
    np.testing.assert_array_equal(
        default.apply({"params": params}, x), im2col.apply({"params": params}, x)
    )

    def grads(model):
        loss = models.classification_loss(model.apply)
        return jax.jit(jax.grad(lambda p: loss(p, (x, labels))[0]))(params)

    chex.assert_trees_all_equal(grads(default), grads(im2col))


def test_resolve_conv_impl_follows_the_default_backend(monkeypatch):
    assert ops.resolve_conv_impl("lax") == "lax"
    assert ops.resolve_conv_impl("im2col") == "im2col"
    for backend, impl in (("cpu", "im2col"), ("gpu", "lax"), ("tpu", "lax")):
        monkeypatch.setattr(jax, "default_backend", lambda b=backend: b)
        assert ops.resolve_conv_impl("auto") == impl


def test_unknown_conv_impl_is_a_clear_error():
    x = jnp.zeros((2, 12, 12, 1))
    message = r"conv_impl must be one of \('auto', 'lax', 'im2col'\); got 'cudnn'"
    with pytest.raises(ValueError, match=message):
        models.Conv4(num_classes=2, filters=4, conv_impl="cudnn").init(
            jax.random.key(0), x
        )
    with pytest.raises(ValueError, match=message):
        ops.conv2d(x, jnp.zeros((3, 3, 1, 4)), stride=1, impl="cudnn")


def test_bfloat16_compute_keeps_float32_params_and_logits():
    x = jax.random.uniform(jax.random.key(6), (4, 28, 28, 1), jnp.float32)
    full = models.Conv4(num_classes=5, conv_impl="im2col")
    mixed = models.Conv4(num_classes=5, conv_impl="im2col", dtype=jnp.bfloat16)
    params = mixed.init(jax.random.key(0), x)["params"]
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    out = mixed.apply({"params": params}, x)
    ref = full.apply({"params": params}, x)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, ref, atol=0.05 * float(jnp.max(jnp.abs(ref))))
    loss = models.classification_loss(mixed.apply)
    grads = jax.jit(jax.grad(lambda p: loss(p, (x, jnp.arange(4)))[0]))(params)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))


def _bf16_round(a):
    return a.astype(jnp.bfloat16).astype(jnp.float32)


@pytest.mark.parametrize(
    "impl,c_in,stride",
    [("im2col", 8, 1), ("im2col", 1, 1), ("im2col", 8, 2), ("lax", 8, 1)],
)
def test_bfloat16_convolution_accumulates_in_float32(impl, c_in, stride):
    # bfloat16 operands, float32 sums: the result is the float32 convolution of
    # the rounded operands (products of bfloat16 values are exact in float32), not
    # a bfloat16-rounded one. Row patches (8 channels) and nine-tap im2col (1).
    kx, kk = jax.random.split(jax.random.key(8))
    x = jax.random.normal(kx, (2, 6, 5, c_in), jnp.float32)
    kernel = jax.random.normal(kk, (3, 3, c_in, 4), jnp.float32)
    out = ops.conv2d(
        x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16), stride=stride, impl=impl
    )
    assert out.dtype == jnp.float32
    ref = ops.conv2d(_bf16_round(x), _bf16_round(kernel), stride=stride, impl="lax")
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("c_in,stride", [(8, 1), (1, 1), (8, 2)])
def test_bfloat16_convolution_gradients_to_second_order(c_in, stride):
    # The custom backward in bfloat16 (the cotangent rounded to bfloat16, sums in
    # float32, gradients returned in the operands' dtype) against the float32
    # gradients of the rounded operands, first and second order.
    kx, kk, kg = jax.random.split(jax.random.key(9), 3)
    x = _bf16_round(jax.random.normal(kx, (2, 6, 5, c_in)))
    kernel = _bf16_round(jax.random.normal(kk, (3, 3, c_in, 4)))
    target = _bf16_round(jax.random.normal(kg, (2, 6 // stride, -(-5 // stride), 4)))

    def loss(x, k, dtype):
        out = ops.conv2d(x.astype(dtype), k.astype(dtype), stride=stride, impl="im2col")
        return jnp.sum((out - target) ** 2)

    def grad_norm(x, k, dtype):  # second order: the gradient of a gradient norm
        gx, gk = jax.grad(loss, argnums=(0, 1))(x, k, dtype)
        return jnp.sum(gx.astype(jnp.float32) ** 2) + jnp.sum(
            gk.astype(jnp.float32) ** 2
        )

    for fn in (loss, grad_norm):
        mixed = jax.jit(jax.grad(fn, argnums=(0, 1)), static_argnums=2)(
            x, kernel, jnp.bfloat16
        )
        ref = jax.grad(fn, argnums=(0, 1))(x, kernel, jnp.float32)
        for m, r in zip(mixed, ref, strict=True):
            assert m.dtype == jnp.float32
            scale = float(jnp.max(jnp.abs(r)))
            np.testing.assert_allclose(m, r, atol=0.015 * scale)


@pytest.mark.parametrize("axes", [(0, 1, 2), (1, 2, 3)])
def test_standardize_matches_autodiff_of_the_formula_to_second_order(axes):
    # The closed-form backward against autodiff of the textbook normalisation,
    # in float64, for the batch-norm and per-example axes.
    def textbook(x):
        mean = x.mean(axis=axes, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=axes, keepdims=True)
        return (x - mean) * jax.lax.rsqrt(var + 1e-5)

    kx, kr = jax.random.split(jax.random.key(5))
    x = 2.0 * jax.random.normal(kx, (3, 4, 5, 6), jnp.float64) + 1.0
    weights = jax.random.normal(kr, x.shape, jnp.float64)
    ours = lambda x: ops.standardize(x, axes, 1e-5)  # noqa: E731
    np.testing.assert_allclose(ours(x), textbook(x), rtol=1e-12, atol=1e-12)

    def gradient_norm(norm):
        grad = jax.grad(lambda x: jnp.sum(jnp.sin(norm(x)) * weights))
        return lambda x: jnp.sum(jnp.square(grad(x)))

    np.testing.assert_allclose(
        jax.grad(gradient_norm(ours))(x),
        jax.grad(gradient_norm(textbook))(x),
        rtol=1e-10,
        atol=1e-12,
    )
    jax.test_util.check_grads(ours, (x,), order=2, modes=["rev"])


def _batch_norm_of_conv(patches, kernel, scale, offset):
    # The textbook composition patch_batch_norm replaces.
    axes = tuple(range(patches.ndim - 1))
    z = patches @ kernel
    mean = z.mean(axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(z - mean), axis=axes, keepdims=True)
    channel = lambda v: v.reshape((1,) * (z.ndim - 1) + (-1,))  # noqa: E731
    return (z - mean) * jax.lax.rsqrt(var + 1e-5) * channel(scale) + channel(offset)


def test_patch_batch_norm_matches_the_textbook_to_second_order():
    keys = jax.random.split(jax.random.key(8), 5)
    patches = jax.random.normal(keys[0], (3, 4, 5, 9), jnp.float64) + 0.5
    kernel = jax.random.normal(keys[1], (9, 6), jnp.float64)
    scale = 1.0 + 0.2 * jax.random.normal(keys[2], (6,), jnp.float64)
    offset = jax.random.normal(keys[3], (6,), jnp.float64)
    weights = jax.random.normal(keys[4], (3, 4, 5, 6), jnp.float64)
    args = (patches, kernel, scale, offset)
    ours = lambda *a: ops.patch_batch_norm(*a, 1e-5)  # noqa: E731
    np.testing.assert_allclose(
        ours(*args), _batch_norm_of_conv(*args), rtol=1e-12, atol=1e-12
    )

    def objective(norm):
        return lambda *a: jnp.sum(jnp.sin(norm(*a)) * weights)

    def kernel_gradient_norm(norm):
        grad = jax.grad(objective(norm), argnums=1)
        return lambda *a: jnp.sum(jnp.square(grad(*a)))

    every = (0, 1, 2, 3)
    for make in (objective, kernel_gradient_norm):
        chex.assert_trees_all_close(
            jax.grad(make(ours), argnums=every)(*args),
            jax.grad(make(_batch_norm_of_conv), argnums=every)(*args),
            rtol=1e-9,
            atol=1e-12,
        )
    jax.test_util.check_grads(objective(ours), args, order=2, modes=["rev"])


def test_patch_batch_norm_float32_statistics_on_omniglot(omniglot_dir, dataset_cache):
    # Real strokes make strongly correlated 3x3 patches (covariance eigenvalues
    # ~100x apart), where a variance from the covariance loses more float32
    # digits than a two-pass one; summing the covariance per image keeps the
    # standardised output's scale within ~1e-6 of float64.
    from maml_jax.datasets.omniglot import load_omniglot

    images = load_omniglot(omniglot_dir, split="background").images
    x = jnp.asarray(images[:75, 0], jnp.float32)  # (75, 28, 28, 1)
    kernel = jax.nn.initializers.lecun_normal()(jax.random.key(0), (3, 3, 1, 64))
    patches = ops.im2col_patches(x, 3, 3, 1)
    ones, zeros = jnp.ones(64, jnp.float32), jnp.zeros(64, jnp.float32)
    out = ops.patch_batch_norm(patches, kernel.reshape(9, 64), ones, zeros, 1e-5)
    # Float64 reference; the outputs are standardised (scale ~1).
    ref = _batch_norm_of_conv(
        patches.astype(jnp.float64),
        kernel.reshape(9, 64).astype(jnp.float64),
        ones.astype(jnp.float64),
        zeros.astype(jnp.float64),
    )
    assert float(jnp.max(jnp.abs(out - ref))) < 2e-5
    std = lambda y: jnp.sqrt(jnp.mean(jnp.square(y), axis=(0, 1, 2)))  # noqa: E731
    np.testing.assert_allclose(std(out.astype(jnp.float64)), std(ref), rtol=3e-6)


def test_patch_batch_norm_gradients_keep_each_input_dtype():
    # float64 images against float32 parameters (x64 on): each cotangent must
    # have its input's dtype, or a scan over meta-steps sees its carry change.
    patches = jax.random.normal(jax.random.key(0), (2, 3, 3, 9), jnp.float64)
    kernel = jax.random.normal(jax.random.key(1), (9, 4), jnp.float32)
    scale, offset = jnp.ones(4, jnp.float32), jnp.zeros(4, jnp.float32)
    grads = jax.grad(
        lambda *a: jnp.sum(jnp.sin(ops.patch_batch_norm(*a, 1e-5))),
        argnums=(0, 1, 2, 3),
    )(patches, kernel, scale, offset)
    assert [g.dtype for g in grads] == [jnp.float64] + [jnp.float32] * 3


def test_pooled_standardize_is_batch_norm_over_the_kept_batch_and_the_example():
    with jax.enable_x64(True):
        ks = jax.random.split(jax.random.key(7), 2)
        kept = 2.0 * jax.random.normal(ks[0], (5, 6, 6, 3), jnp.float64) + 1.0
        x = jax.random.normal(ks[1], (4, 6, 6, 3), jnp.float64)
        mean, var = kept.mean((0, 1, 2)), kept.var((0, 1, 2))
        out = ops.pooled_standardize(x, mean, var, 5.0, 1e-5)
        for i in range(len(x)):
            both = jnp.concatenate([kept, x[i : i + 1]])
            ref = ops.standardize(both, (0, 1, 2), 1e-5)[-1]
            np.testing.assert_allclose(out[i], ref, rtol=1e-10, atol=1e-12)
        # No kept batch: each example by its own moments (instance norm).
        alone = ops.pooled_standardize(x, mean, var, 0.0, 1e-5)
        np.testing.assert_allclose(
            alone, ops.standardize(x, (1, 2), 1e-5), rtol=1e-10, atol=1e-12
        )
        # Differentiable in the kept moments (the meta-gradient flows there).
        f = lambda m, v: ops.pooled_standardize(x, m, v, 5.0, 1e-5).sum() ** 2
        jax.test_util.check_grads(f, (mean, var), order=2, modes=("rev",))


def test_support_norm_keeps_the_batch_moments_and_scores_examples_alone():
    """``norm="support"``: training mode is batch norm and keeps the batch's
    moments and size; inference mode scores each example on its own with them."""
    x = jax.random.normal(jax.random.key(5), (5, 12, 12, 1))
    q = jax.random.normal(jax.random.key(6), (3, 12, 12, 1))
    support = models.Conv4(num_classes=2, filters=4, norm="support")
    transductive = models.Conv4(num_classes=2, filters=4)
    variables = support.init(jax.random.key(0), x)
    params = variables["params"]
    logits, updated = support.apply(variables, x, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(
        logits, transductive.apply({"params": params}, x), rtol=1e-5, atol=1e-5
    )
    stats = updated["batch_stats"]
    assert float(stats["norm0_count"]) == 5.0
    scored = support.apply({"params": params, **updated}, q, train=False)
    alone = support.apply({"params": params, **updated}, q[1:2], train=False)
    np.testing.assert_allclose(scored[1], alone[0], rtol=1e-5, atol=1e-6)
    # The kept moments are differentiable functions of the parameters.
    grads = jax.grad(
        lambda p: support.apply(
            {"params": p, "batch_stats": variables["batch_stats"]},
            x,
            train=True,
            mutable=["batch_stats"],
        )[1]["batch_stats"]["norm1_var"].sum()
    )(params)
    assert float(jnp.abs(grads["conv1_kernel"]).sum()) > 0
