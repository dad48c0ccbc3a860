"""The drop-in Flax convolution layers: nn.Conv's parameters, values and
meta-gradients (float64, second order, under vmap and scan)."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import maml_jax
from maml_jax import layers
from maml_jax.layers import nnx as layers_nnx

CASES = [
    dict(kernel_size=(3, 3)),
    dict(kernel_size=(3, 3), strides=2),
    dict(kernel_size=(5, 3), strides=1),
    dict(kernel_size=(1, 1)),
    dict(kernel_size=(3, 3), padding="VALID"),
    dict(kernel_size=(3, 3), strides=(2, 1)),
    dict(kernel_size=(2, 2), strides=2, use_bias=False),
]


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


@pytest.mark.parametrize("impl", ["im2col", "lax"])
@pytest.mark.parametrize("kwargs", CASES)
def test_linen_conv_has_nn_conv_parameters_and_values(kwargs, impl):
    x = jax.random.normal(jax.random.key(1), (2, 9, 8, 3), jnp.float64)
    ours = layers.Conv(features=4, param_dtype=jnp.float64, conv_impl=impl, **kwargs)
    ref = nn.Conv(features=4, param_dtype=jnp.float64, **kwargs)
    params = ours.init(jax.random.key(0), x)
    chex.assert_trees_all_equal(params, ref.init(jax.random.key(0), x))
    chex.assert_trees_all_close(
        ours.apply(params, x), ref.apply(params, x), rtol=1e-12, atol=1e-12
    )


def test_linen_conv_inside_a_model_keeps_nn_conv_names_and_batch_axes():
    class Net(nn.Module):
        conv: type

        @nn.compact
        def __call__(self, x):
            x = nn.relu(self.conv(features=4, kernel_size=(3, 3))(x))
            return self.conv(features=2, kernel_size=(3, 3), strides=2)(x)

    x = jax.random.normal(jax.random.key(1), (2, 3, 8, 8, 1))
    ours, ref = Net(layers.Conv), Net(nn.Conv)
    params = ref.init(jax.random.key(0), x)
    chex.assert_trees_all_equal(params, ours.init(jax.random.key(0), x))
    chex.assert_trees_all_close(ours.apply(params, x), ref.apply(params, x), rtol=1e-5)
    # Unbatched inputs, as nn.Conv takes them.
    chex.assert_trees_all_close(
        ours.apply(params, x[0, 0]), ref.apply(params, x[0, 0]), rtol=1e-5
    )


def test_bad_conv_input_is_a_clear_error():
    layer = layers_nnx.Conv(2, 4, kernel_size=(3, 3), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="takes 2 input channels; the inputs have 3"):
        layer(jnp.ones((1, 8, 8, 3)))
    with pytest.raises(ValueError, match=r"expects inputs \(..., H, W, C\)"):
        layer(jnp.ones((8, 2)))
    with pytest.raises(ValueError, match="kernel_size must be"):
        layers.Conv(features=4, kernel_size=(3, 3, 3)).init(
            jax.random.key(0), jnp.ones((1, 8, 8, 2))
        )


@pytest.mark.parametrize("kwargs", CASES[:3])
def test_nnx_conv_has_nnx_conv_parameters_and_values(kwargs):
    x = jax.random.normal(jax.random.key(1), (2, 9, 8, 3), jnp.float64)
    ours = layers_nnx.Conv(3, 4, param_dtype=jnp.float64, rngs=nnx.Rngs(0), **kwargs)
    ref = nnx.Conv(3, 4, param_dtype=jnp.float64, rngs=nnx.Rngs(0), **kwargs)
    chex.assert_trees_all_equal(ours.kernel[...], ref.kernel[...])
    chex.assert_trees_all_equal(ours.bias[...], ref.bias[...])
    chex.assert_trees_all_close(ours(x), ref(x), rtol=1e-12, atol=1e-12)


class _Cnn(nn.Module):
    conv: type

    @nn.compact
    def __call__(self, x):
        for features, stride in ((6, 1), (6, 2)):
            x = self.conv(features, (3, 3), strides=stride, param_dtype=jnp.float64)(x)
            x = jnp.tanh(x)
        return nn.Dense(3, param_dtype=jnp.float64)(x.mean((1, 2)))


def _tasks(num_tasks=3):
    keys = jax.random.split(jax.random.key(3), 4)
    x = lambda k: jax.random.normal(k, (num_tasks, 6, 8, 8, 2), jnp.float64)
    y = lambda k: jax.random.randint(k, (num_tasks, 6), 0, 3)
    return maml_jax.TaskBatch(
        support=(x(keys[0]), y(keys[1])), query=(x(keys[2]), y(keys[3]))
    )


@pytest.mark.parametrize("batching", ["vmap", "scan"])
def test_second_order_meta_gradients_equal_nn_convs(batching):
    tasks = _tasks()
    grads = {}
    for name, conv in (("ours", layers.Conv), ("flax", nn.Conv)):
        model = _Cnn(conv)
        params = model.init(jax.random.key(0), tasks.support[0][0])["params"]

        def loss_fn(p, batch, model=model):
            logits = model.apply({"params": p}, batch[0])
            return -jnp.mean(
                jnp.take_along_axis(jax.nn.log_softmax(logits), batch[1][:, None], 1)
            )

        learner = maml_jax.maml(loss_fn, inner_lr=0.3, num_inner_steps=2)
        (loss, _), g = maml_jax.meta_value_and_grad(
            learner, params, tasks, batching=batching
        )
        grads[name] = (loss, g)
    chex.assert_trees_all_close(grads["ours"], grads["flax"], rtol=1e-9, atol=1e-12)
