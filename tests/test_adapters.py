"""Model adapters (Flax Linen, Flax NNX, Equinox) against each framework's own
computation, inside the ``maml`` learner, and the parameter checks' messages."""

import sys

import chex
import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

import maml_jax
from maml_jax import _validation

F64 = jnp.float64
TOL = dict(rtol=1e-10, atol=1e-12)  # float64, same operations in the same order


def mse(outputs, targets):
    return jnp.mean((outputs - targets) ** 2)


@pytest.fixture
def batch(key):
    kx, ky = jax.random.split(key)
    return jax.random.normal(kx, (6, 2), F64), jax.random.normal(ky, (6, 1), F64)


def _tasks():
    # float64: the tests run with x64 enabled (conftest).
    return maml_jax.sample_sinusoid_tasks(jax.random.key(3), 3, 5, 7)


# ---------------------------------------------------------------- Flax Linen


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = jnp.tanh(nn.Dense(8, param_dtype=F64)(x))
        return nn.Dense(1, param_dtype=F64)(x)


class LinenBN(nn.Module):
    @nn.compact
    def __call__(self, x, train):
        x = nn.Dense(4, param_dtype=F64)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.8, param_dtype=F64)(
            x
        )
        return nn.Dense(1, param_dtype=F64)(jnp.tanh(x))


def test_linen_stateless_loss_and_grad_equal_the_modules(key, batch):
    net = LinenMLP()
    variables = net.init(key, batch[0])
    model = maml_jax.from_linen(net, variables, mse)
    assert not model.has_state and model.state is None
    own = lambda p: mse(net.apply({"params": p}, batch[0]), batch[1])
    chex.assert_trees_all_close(model.loss_fn(model.params, batch), own(model.params))
    chex.assert_trees_all_close(
        jax.grad(model.loss_fn)(model.params, batch), jax.grad(own)(model.params), **TOL
    )
    chex.assert_trees_all_close(
        model.apply_fn(model.params, batch[0]), net.apply(variables, batch[0])
    )


def test_linen_batch_norm_training_updates_stats_as_flax_does(key, batch):
    net = LinenBN()
    variables = net.init(key, batch[0], train=False)
    model = maml_jax.from_linen(net, variables, mse)
    assert model.has_state and set(model.state) == {"batch_stats"}

    def own(params):
        out, updates = net.apply(
            {"params": params, **model.state},
            batch[0],
            train=True,
            mutable=["batch_stats"],
        )
        return mse(out, batch[1]), updates

    (loss, new_state), grads = jax.value_and_grad(model.loss_fn, has_aux=True)(
        model.params, model.state, batch, training=True
    )
    (own_loss, own_state), own_grads = jax.value_and_grad(own, has_aux=True)(
        model.params
    )
    chex.assert_trees_all_close(loss, own_loss, **TOL)
    chex.assert_trees_all_close(grads, own_grads, **TOL)
    chex.assert_trees_all_close(new_state, own_state, **TOL)
    chex.assert_trees_all_equal_structs(new_state, model.state)
    # The running averages moved (momentum 0.8 towards the batch's statistics).
    mean = variables["batch_stats"]["BatchNorm_0"]["mean"]
    assert not jnp.allclose(new_state["batch_stats"]["BatchNorm_0"]["mean"], mean)


def test_linen_batch_norm_inference_uses_running_averages(key, batch):
    net = LinenBN()
    variables = net.init(key, batch[0], train=False)
    model = maml_jax.from_linen(net, variables, mse)
    # Moved running averages, so that batch and running statistics differ.
    _, state = model.loss_fn(model.params, model.state, batch, training=True)
    loss, same = model.loss_fn(model.params, state, batch, training=False)
    assert same is state
    own = net.apply({"params": model.params, **state}, batch[0], train=False)
    chex.assert_trees_all_close(loss, mse(own, batch[1]), **TOL)
    chex.assert_trees_all_close(model.apply_fn(model.params, state, batch[0]), own)
    train_loss, _ = model.loss_fn(model.params, state, batch, training=True)
    assert not jnp.allclose(loss, train_loss)


def test_loss_aux_passes_through_and_frozen_variables_work(key, batch):
    import flax.core

    net = LinenBN()
    variables = flax.core.freeze(net.init(key, batch[0], train=False))
    loss = lambda out, y: (mse(out, y), {"mae": jnp.mean(jnp.abs(out - y))})
    model = maml_jax.from_linen(net, variables, loss)
    (value, aux), new_state = model.loss_fn(
        model.params, model.state, batch, training=True
    )
    assert value.shape == () and set(aux) == {"mae"}
    # Plain dicts in and out, so that new_state can be a lax.scan carry.
    assert type(model.state) is dict and type(new_state["batch_stats"]) is dict
    chex.assert_trees_all_equal_structs(new_state, model.state)


def test_linen_variables_must_hold_params(key, batch):
    net = LinenMLP()
    variables = net.init(key, batch[0])
    with pytest.raises(TypeError, match=r"not variables\['params'\]"):
        maml_jax.from_linen(net, variables["params"], mse)


# ---------------------------------------------------------------- Flax NNX


class NNXMLP(nnx.Module):
    def __init__(self, rngs):
        self.hidden = nnx.Linear(1, 8, param_dtype=F64, rngs=rngs)
        self.out = nnx.Linear(8, 1, param_dtype=F64, rngs=rngs)

    def __call__(self, x):
        return self.out(jnp.tanh(self.hidden(x)))


class NNXBN(nnx.Module):
    def __init__(self, rngs):
        # A list, so that some keys are ints, and many layers, so that '10'
        # would sort before '2' were they strings.
        self.layers = nnx.List(
            [nnx.Linear(2, 4, param_dtype=F64, rngs=rngs)]
            + [nnx.Linear(4, 4, param_dtype=F64, rngs=rngs) for _ in range(10)]
        )
        self.norm = nnx.BatchNorm(4, momentum=0.8, param_dtype=F64, rngs=rngs)
        # flax 0.12 makes the running statistics float32 whatever the dtypes.
        self.norm.mean = nnx.BatchStat(jnp.zeros(4, F64))
        self.norm.var = nnx.BatchStat(jnp.ones(4, F64))
        self.head = nnx.Linear(4, 1, param_dtype=F64, rngs=rngs)

    def __call__(self, x):
        for layer in self.layers:
            x = jnp.tanh(layer(x))
        return self.head(self.norm(x))


def _pure(tree):
    return nnx.to_pure_dict(tree)


def test_nnx_stateless_loss_and_grad_equal_the_modules(batch):
    net = NNXMLP(nnx.Rngs(0))
    x, y = batch[0][:, :1], batch[1]
    model = maml_jax.from_nnx(net, mse)
    assert not model.has_state and model.state is None
    own_grads = nnx.grad(lambda m: mse(m(x), y))(net)
    chex.assert_trees_all_close(model.loss_fn(model.params, (x, y)), mse(net(x), y))
    chex.assert_trees_all_close(
        jax.grad(model.loss_fn)(model.params, (x, y)), _pure(own_grads), **TOL
    )
    chex.assert_trees_all_close(model.apply_fn(model.params, x), net(x))


def test_nnx_params_and_state_are_plain_dicts_of_arrays():
    model = maml_jax.from_nnx(NNXBN(nnx.Rngs(0)), mse)
    for tree in (model.params, model.state):
        for leaf in jax.tree.leaves(tree, is_leaf=lambda x: not isinstance(x, dict)):
            assert isinstance(leaf, jax.Array)
    assert sorted(model.state["norm"]) == ["mean", "var"]
    assert sorted(model.params["layers"]) == list(range(11))


def test_nnx_batch_norm_training_updates_stats_as_nnx_does(batch):
    net = NNXBN(nnx.Rngs(0))
    model = maml_jax.from_nnx(net, mse)
    (loss, new_state), grads = jax.value_and_grad(model.loss_fn, has_aux=True)(
        model.params, model.state, batch, training=True
    )
    # NNX's own train-mode call, on copies (it updates the statistics in place).
    own = nnx.clone(net)
    own.train()
    own_loss = mse(own(batch[0]), batch[1])
    own_grad_net = nnx.clone(net)
    own_grad_net.train()
    own_grads = nnx.grad(lambda m: mse(m(batch[0]), batch[1]))(own_grad_net)
    chex.assert_trees_all_close(loss, own_loss, **TOL)
    chex.assert_trees_all_close(grads, _pure(own_grads), **TOL)
    chex.assert_trees_all_close(new_state, _pure(nnx.state(own, nnx.BatchStat)), **TOL)
    chex.assert_trees_all_equal_structs(new_state, model.state)
    assert not jnp.allclose(new_state["norm"]["mean"], model.state["norm"]["mean"])
    # The user's module is untouched.
    chex.assert_trees_all_equal(_pure(nnx.state(net, nnx.BatchStat)), model.state)


def test_nnx_batch_norm_inference_uses_running_averages(batch):
    net = NNXBN(nnx.Rngs(0))
    model = maml_jax.from_nnx(net, mse)
    _, state = model.loss_fn(model.params, model.state, batch, training=True)
    loss, same = model.loss_fn(model.params, state, batch, training=False)
    assert same is state
    own = nnx.clone(net)
    stats = nnx.state(own, nnx.BatchStat)
    nnx.replace_by_pure_dict(stats, state)
    nnx.update(own, stats)
    own.eval()
    chex.assert_trees_all_close(loss, mse(own(batch[0]), batch[1]), **TOL)
    chex.assert_trees_all_close(
        model.apply_fn(model.params, state, batch[0]), own(batch[0]), **TOL
    )
    train_loss, _ = model.loss_fn(model.params, state, batch, training=True)
    assert not jnp.allclose(loss, train_loss)


def test_nnx_refuses_params_of_another_structure(batch):
    model = maml_jax.from_nnx(NNXBN(nnx.Rngs(0)), mse)
    # What a checkpoint restored without a target gives: str keys.
    layers = {str(k): v for k, v in model.params["layers"].items()}
    as_str = {**model.params, "layers": layers}
    with pytest.raises(ValueError, match="structure the module was split into"):
        model.loss_fn(as_str, model.state, batch, training=True)


# ---------------------------------------------------------------- Equinox


class EqxBN(eqx.Module):
    first: eqx.nn.Linear
    norm: eqx.nn.BatchNorm
    head: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.first = eqx.nn.Linear(2, 4, key=k1, dtype=F64)
        self.norm = eqx.nn.BatchNorm(4, "batch", momentum=0.8, mode="batch", dtype=F64)
        self.head = eqx.nn.Linear(4, 1, key=k2, dtype=F64)

    def __call__(self, x, state):
        x, state = self.norm(jnp.tanh(self.first(x)), state)
        return self.head(x), state


def _eqx_mlp():
    key = jax.random.key(0)
    return eqx.nn.MLP(1, 1, 8, 1, activation=jnp.tanh, key=key, dtype=F64)


def test_equinox_stateless_loss_and_grad_equal_the_models(batch):
    mlp = _eqx_mlp()
    x, y = batch[0][:, :1], batch[1]
    model = maml_jax.from_equinox(mlp, mse)
    assert not model.has_state and model.state is None
    own = lambda m: mse(jax.vmap(m)(x), y)
    chex.assert_trees_all_close(model.loss_fn(model.params, (x, y)), own(mlp))
    chex.assert_trees_all_close(
        jax.grad(model.loss_fn)(model.params, (x, y)), eqx.filter_grad(own)(mlp), **TOL
    )
    chex.assert_trees_all_close(model.apply_fn(model.params, x), jax.vmap(mlp)(x))


def _eqx_own(net, state, x):
    return jax.vmap(net, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(
        x, state
    )


def test_equinox_batch_norm_training_updates_stats_as_equinox_does(batch):
    net, state = eqx.nn.make_with_state(EqxBN)(jax.random.key(0))
    model = maml_jax.from_equinox(net, mse, state=state)
    assert model.has_state and model.state is state
    (loss, new_state), grads = jax.value_and_grad(model.loss_fn, has_aux=True)(
        model.params, model.state, batch, training=True
    )

    def own(m):
        out, own_state = _eqx_own(m, state, batch[0])
        return mse(out, batch[1]), own_state

    (own_loss, own_state), own_grads = eqx.filter_value_and_grad(own, has_aux=True)(net)
    chex.assert_trees_all_close(loss, own_loss, **TOL)
    chex.assert_trees_all_close(grads, own_grads, **TOL)
    chex.assert_trees_all_close(new_state, own_state, **TOL)
    chex.assert_trees_all_equal_structs(new_state, state)
    moved = [
        not jnp.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(state), strict=True)
    ]
    assert any(moved)


def test_equinox_batch_norm_inference_uses_running_averages(batch):
    net, state = eqx.nn.make_with_state(EqxBN)(jax.random.key(0))
    model = maml_jax.from_equinox(net, mse, state=state)
    _, state = model.loss_fn(model.params, state, batch, training=True)
    loss, same = model.loss_fn(model.params, state, batch, training=False)
    assert same is state
    own, _ = _eqx_own(eqx.nn.inference_mode(net), state, batch[0])
    chex.assert_trees_all_close(loss, mse(own, batch[1]), **TOL)
    chex.assert_trees_all_close(model.apply_fn(model.params, state, batch[0]), own)
    train_loss, _ = model.loss_fn(model.params, state, batch, training=True)
    assert not jnp.allclose(loss, train_loss)


def test_equinox_is_imported_lazily_with_a_clear_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "equinox", None)  # "not installed"
    with pytest.raises(ImportError, match=r"pip install maml_jax\[equinox\]"):
        maml_jax.from_equinox(object(), mse)


def test_equinox_make_with_state_pair_is_a_clear_error():
    pair = eqx.nn.make_with_state(EqxBN)(jax.random.key(0))
    with pytest.raises(TypeError, match="state=state"):
        maml_jax.from_equinox(pair, mse)


# ------------------------------------------- stateless adapters inside maml
# The networks use tanh, so that MAML's second-order term is not zero.


def _linen_pure(p, x):
    h = jnp.tanh(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"][None])
    return h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"][None]


def _nnx_pure(p, x):
    h = jnp.tanh(x @ p["hidden"]["kernel"] + p["hidden"]["bias"][None])
    return h @ p["out"]["kernel"] + p["out"]["bias"][None]


def _eqx_pure(p, x):
    first, second = p.layers
    h = jnp.tanh(x @ first.weight.T + first.bias[None])
    return h @ second.weight.T + second.bias[None]


def _linen_model():
    net = LinenMLP()
    return maml_jax.from_linen(net, net.init(jax.random.key(0), jnp.zeros((1, 1))), mse)


ADAPTED = {
    "linen": (_linen_model, _linen_pure),
    "nnx": (lambda: maml_jax.from_nnx(NNXMLP(nnx.Rngs(0)), mse), _nnx_pure),
    "equinox": (lambda: maml_jax.from_equinox(_eqx_mlp(), mse), _eqx_pure),
}


@pytest.mark.parametrize("name", sorted(ADAPTED))
def test_stateless_adapter_in_maml_equals_a_pure_function(name):
    make_model, pure_apply = ADAPTED[name]
    model = make_model()
    pure_loss = lambda p, b: mse(pure_apply(p, b[0]), b[1])
    tasks = _tasks()

    def meta(loss_fn):
        learner = maml_jax.maml(loss_fn, inner_lr=0.1, num_inner_steps=2)
        step = jax.jit(
            lambda mp, t: maml_jax.meta_value_and_grad(learner, mp, t, batching="vmap")
        )
        return step(learner.init(model.params), tasks)

    (loss, _), grads = meta(model.loss_fn)
    (ref_loss, _), ref_grads = meta(pure_loss)
    chex.assert_trees_all_close(loss, ref_loss, **TOL)
    chex.assert_trees_all_close(grads, ref_grads, **TOL)
    # And an outer optimizer takes the gradient as it is.
    opt = optax.adam(1e-2)
    optax.apply_updates(model.params, opt.update(grads, opt.init(model.params))[0])


@pytest.mark.parametrize("name", ["nnx", "equinox"])
def test_params_checkpoint_round_trip(name, tmp_path):
    from maml_jax.checkpoint import Checkpointer

    # NNX params have int keys (nnx.List); Equinox params are the model's own
    # pytree with None leaves. Both restore exactly against a template.
    if name == "nnx":
        params = maml_jax.from_nnx(NNXBN(nnx.Rngs(0)), mse).params
    else:
        params = maml_jax.from_equinox(_eqx_mlp(), mse).params
    learner = maml_jax.maml(mse, inner_lr=0.1, num_inner_steps=1)
    state = maml_jax.MetaTrainState.create(
        params=params, learner=learner, tx=optax.adam(1e-3)
    )
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(state)
        restored = ckpt.restore(state).state
    chex.assert_trees_all_equal(restored.meta_params, state.meta_params)
    chex.assert_trees_all_equal(restored.opt_state, state.opt_state)


# ---------------------------------------------------------------- validation


def _message(params):
    with pytest.raises(TypeError) as info:
        _validation.check_params(params, "maml.init")
    return str(info.value)


def test_int_leaf_is_named_by_its_key_path():
    params = {"conv": {"kernel": jnp.zeros((3, 3), jnp.int32), "bias": jnp.zeros(3)}}
    message = _message(params)
    assert message.startswith("maml.init: params['conv']['kernel'] is an int32 array;")
    assert "floating-point" in message


@pytest.mark.parametrize(
    "params, expected",
    [
        ({"w": jnp.zeros(2), "act": "relu"}, "params['act'] is a Python str ('relu')"),
        ([jnp.zeros(2), 3], "params[1] is a Python int (3)"),
        ({"k": jax.random.key(0)}, "params['k'] is a key<fry> array"),
        ({"mask": jnp.ones(2, bool)}, "params['mask'] is a bool array"),
    ],
)
def test_non_float_leaves_are_named(params, expected):
    assert expected in _message(params)


def test_float_leaves_pass():
    _validation.check_params(
        {"a": jnp.zeros(2, jnp.float32), "b": 0.5, "c": jnp.zeros(1, jnp.bfloat16)},
        "maml.init",
    )
    _validation.check_params(maml_jax.from_equinox(_eqx_mlp(), mse).params, "x")


def test_whole_equinox_module_names_from_equinox():
    message = _message(_eqx_mlp())
    assert "params.activation is a function" in message
    assert "equinox.Module (MLP)" in message
    assert "maml_jax.from_equinox(model, loss)" in message
    nested = _message({"net": _eqx_mlp()})
    assert "params['net'].activation" in nested and "from_equinox" in nested


def test_whole_linen_module_names_from_linen():
    message = _message(LinenMLP())
    assert "params is a flax.linen.Module (LinenMLP)" in message
    assert "maml_jax.from_linen(module, variables, loss)" in message


def test_whole_nnx_module_names_from_nnx():
    # NNX modules are pytrees of arrays: they must not slip through as params.
    message = _message({"body": NNXMLP(nnx.Rngs(0))})
    assert "params['body'] is a flax.nnx.Module (NNXMLP)" in message
    assert "maml_jax.from_nnx(module, loss)" in message


def test_adapters_check_their_params_and_modules(key, batch):
    class IntParam(nn.Module):
        @nn.compact
        def __call__(self, x):
            return x * self.param("scale", lambda k: jnp.ones((), jnp.int32))

    net = IntParam()
    with pytest.raises(TypeError, match=r"from_linen: params\['scale'\] is an int32"):
        maml_jax.from_linen(net, net.init(key, batch[0]), mse)
    with pytest.raises(TypeError, match=r"use maml_jax\.from_nnx"):
        maml_jax.from_linen(NNXMLP(nnx.Rngs(0)), {"params": {}}, mse)
    with pytest.raises(TypeError, match=r"use maml_jax\.from_linen"):
        maml_jax.from_nnx(LinenMLP(), mse)
    with pytest.raises(TypeError, match=r"use maml_jax\.from_equinox"):
        maml_jax.from_nnx(_eqx_mlp(), mse)
    with pytest.raises(TypeError, match="not the class"):
        maml_jax.from_nnx(NNXMLP, mse)
