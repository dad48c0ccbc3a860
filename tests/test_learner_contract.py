"""One contract every learner passes (like optax's common tests).

Each row builds a learner, its initial parameters and a small task family suited
to it; every test runs over every row.
"""

import functools
import inspect

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import maml_jax
from maml_jax import train

NUM_TASKS = 4


def _sinusoid_setup():
    model = maml_jax.MLP(hidden_sizes=(16, 16))
    params = model.init(jax.random.key(0), jnp.zeros((1, 1)))["params"]
    loss_fn = maml_jax.regression_loss(model.apply)
    sampler = lambda key: maml_jax.sample_sinusoid_tasks(key, NUM_TASKS, 10, 10)
    return loss_fn, params, sampler


def _clusters_setup():
    """Gaussian-cluster 3-way tasks in R^4 and a linear+tanh embedding."""
    ways, shots, queries, dim = 3, 5, 5, 4

    def sample_task(key):
        k_centres, k_noise = jax.random.split(key)
        centres = 3.0 * jax.random.normal(k_centres, (ways, dim))
        noise = jax.random.normal(k_noise, (ways, shots + queries, dim))
        points = centres[:, None, :] + noise
        labels = jnp.broadcast_to(jnp.arange(ways)[:, None], (ways, shots + queries))
        flat = lambda a, lo, hi: a[:, lo:hi].reshape(-1, *a.shape[2:])
        return maml_jax.Task(
            support=(flat(points, 0, shots), flat(labels, 0, shots)),
            query=(flat(points, shots, None), flat(labels, shots, None)),
        )

    sampler = lambda key: maml_jax.TaskBatch(
        *jax.vmap(sample_task)(jax.random.split(key, NUM_TASKS))
    )
    params = {"w": 0.3 * jax.random.normal(jax.random.key(0), (dim, 8))}
    embed = lambda p, x: jnp.tanh(x @ p["w"])
    return embed, params, sampler


def _row(factory, setup=_sinusoid_setup, **kwargs):
    def build():
        loss_fn, params, sampler = setup()
        return factory(loss_fn, **kwargs), params, sampler

    build.setup, build.kwargs = setup, kwargs
    return build


def _head_only(params):
    return {name: name == "Dense_2" for name in params}


LEARNERS = {
    "maml": _row(maml_jax.maml, inner_lr=0.01, num_inner_steps=2),
    "maml_remat": _row(maml_jax.maml, inner_lr=0.01, num_inner_steps=2, remat=True),
    "fomaml": _row(maml_jax.fomaml, inner_lr=0.01, num_inner_steps=2),
    "anil": _row(
        maml_jax.anil, inner_lr=0.01, num_inner_steps=2, adapt_mask=_head_only
    ),
    # eps_root > 0: Adam's sqrt(v) has an infinite derivative where an inner
    # gradient is exactly zero (a dead ReLU's weights), see maml's docstring.
    "maml_adam": _row(
        maml_jax.maml,
        inner_optimizer=optax.adam(1e-2, eps_root=1e-12),
        num_inner_steps=2,
    ),
    "reptile": _row(maml_jax.reptile, inner_lr=0.01, num_inner_steps=3),
    "meta_sgd": _row(maml_jax.meta_sgd, inner_lr=0.01),
    "maml_plus_plus": _row(
        maml_jax.maml_plus_plus, inner_lr=0.01, num_inner_steps=2, msl_anneal_steps=20
    ),
}
LEARNERS["imaml"] = _row(  # λ large enough that I + H/λ stays positive definite
    maml_jax.imaml, inner_lr=1e-3, num_inner_steps=30, reg_lambda=100.0, cg_steps=5
)
LEARNERS["protonet"] = _row(maml_jax.protonet, setup=_clusters_setup, ways=3)

NAMES = sorted(LEARNERS)


@functools.cache
def _built(name):
    return LEARNERS[name]()


def _tasks(name, seed=0):
    return _built(name)[2](jax.random.key(seed))


@pytest.mark.parametrize("name", NAMES)
def test_meta_gradient_matches_meta_params_and_is_finite(name):
    learner, params, _ = _built(name)
    meta_params = learner.init(params)
    fn = jax.jit(lambda mp, t: maml_jax.meta_value_and_grad(learner, mp, t))
    (loss, aux), grads = fn(meta_params, _tasks(name))
    assert jax.tree.structure(grads) == jax.tree.structure(meta_params)
    chex.assert_trees_all_equal_shapes(grads, meta_params)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    assert jnp.shape(loss) == () and bool(jnp.isfinite(loss))
    for key in ("query_loss_pre", "query_loss_post", "support_loss_pre"):
        assert aux[key].shape == (NUM_TASKS,)


@pytest.mark.parametrize("name", NAMES)
def test_jit_equals_no_jit(name):
    learner, params, _ = _built(name)
    meta_params = learner.init(params)
    tasks = _tasks(name)
    fn = lambda mp, t: maml_jax.meta_value_and_grad(learner, mp, t)
    (loss, _), grads = fn(meta_params, tasks)
    (jit_loss, _), jit_grads = jax.jit(fn)(meta_params, tasks)
    np.testing.assert_allclose(loss, jit_loss, rtol=1e-5)
    chex.assert_trees_all_close(grads, jit_grads, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_vmap_over_tasks_equals_loop(name):
    learner, params, _ = _built(name)
    meta_params = learner.init(params)
    tasks = _tasks(name)
    (loss, _), grads = jax.jit(
        lambda mp, t: maml_jax.meta_value_and_grad(learner, mp, t)
    )(meta_params, tasks)
    one = jax.jit(jax.value_and_grad(lambda mp, t: learner.meta_loss(mp, t)[0]))
    per_task = [one(meta_params, task) for task in maml_jax.unstack_tasks(tasks)]
    np.testing.assert_allclose(loss, np.mean([l for l, _ in per_task]), rtol=1e-5)
    mean_grads = jax.tree.map(lambda *g: sum(g) / NUM_TASKS, *[g for _, g in per_task])
    chex.assert_trees_all_close(grads, mean_grads, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_jitted_train_step_traces_once(name):
    learner, params, sampler = _built(name)
    state = maml_jax.MetaTrainState.create(
        params=params, learner=learner, tx=optax.adam(1e-3)
    )
    chex.clear_trace_counter()
    step = jax.jit(chex.assert_max_traces(train.train_step, n=1), donate_argnums=0)
    for seed in range(3):
        state, metrics = step(state, sampler(jax.random.key(seed)))
    assert int(state.step) == 3 and bool(jnp.isfinite(metrics["loss"]))


@pytest.mark.parametrize("name", NAMES)
def test_query_loss_after_adaptation_decreases(name):
    learner, params, sampler = _built(name)
    state = maml_jax.MetaTrainState.create(
        params=params, learner=learner, tx=optax.adam(1e-2)
    )
    test_tasks = jax.vmap(sampler)(jax.random.split(jax.random.key(99), 8))
    test_tasks = jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), test_tasks)

    def query_loss(state):
        curves = maml_jax.evaluate(learner, state.meta_params, test_tasks, num_steps=2)
        return curves["query_loss"][:, -1].mean()

    before = query_loss(state)
    state = maml_jax.fit(
        state,
        sampler,
        key=jax.random.key(1),
        num_steps=400,
        steps_per_call=400,
        progress=False,
    )
    after = query_loss(state)
    assert after < 0.8 * before, (before, after)


@pytest.mark.parametrize("name", NAMES)
def test_adaptation_curve_shapes(name):
    learner, params, _ = _built(name)
    task = maml_jax.unstack_tasks(_tasks(name))[0]
    curve = jax.jit(learner.adaptation_curve, static_argnums=2)(
        learner.init(params), task, 3
    )
    assert curve["query_loss"].shape == (4,) and curve["support_loss"].shape == (4,)


TRAINED_STEPS = {
    name: row.kwargs.get("num_inner_steps", 1) for name, row in LEARNERS.items()
}


def _loss_fn(name):
    return LEARNERS[name].setup()[0]


@pytest.mark.parametrize("name", NAMES)
def test_adapt_returns_model_params_below_at_and_above_the_trained_steps(name):
    """adapt(num_steps=K) gives the structure given to init, and its query loss
    is the adaptation curve's at step K (ProtoNets: the parameters, unchanged)."""
    learner, params, _ = _built(name)
    meta_params = learner.init(params)
    task = maml_jax.unstack_tasks(_tasks(name))[0]
    trained = TRAINED_STEPS[name]
    max_steps = trained + 3
    curve = jax.jit(learner.adaptation_curve, static_argnums=2)(
        meta_params, task, max_steps
    )
    for k in sorted({1, trained, max_steps}):
        adapt = jax.jit(functools.partial(learner.adapt, num_steps=k))
        adapted = adapt(meta_params, task.support)
        chex.assert_trees_all_equal_shapes_and_dtypes(adapted, params)
        if name == "protonet":
            chex.assert_trees_all_equal(adapted, params)
            continue
        query_loss = _loss_fn(name)(adapted, task.query)
        np.testing.assert_allclose(query_loss, curve["query_loss"][k], rtol=1e-6)
    default = learner.adapt(meta_params, task.support)
    chex.assert_trees_all_close(
        default, learner.adapt(meta_params, task.support, num_steps=trained)
    )


@pytest.mark.parametrize("name", NAMES)
def test_predict_runs_the_adapted_learner(name):
    learner, params, _ = _built(name)
    meta_params = learner.init(params)
    task = maml_jax.unstack_tasks(_tasks(name))[0]
    inputs = task.query[0]
    if name == "protonet":
        logits = maml_jax.predict(learner, meta_params, task.support, inputs)
        assert logits.shape == (inputs.shape[0], 3)
        return
    apply_fn = lambda p, x: maml_jax.MLP(hidden_sizes=(16, 16)).apply({"params": p}, x)
    outputs = maml_jax.predict(
        learner, meta_params, task.support, inputs, apply_fn=apply_fn, num_steps=2
    )
    adapted = learner.adapt(meta_params, task.support, num_steps=2)
    np.testing.assert_allclose(outputs, apply_fn(adapted, inputs), rtol=1e-12)
    with pytest.raises(TypeError, match="apply_fn"):
        maml_jax.predict(learner, meta_params, task.support, inputs)


@pytest.mark.parametrize("name", NAMES)
def test_meta_loss_takes_the_outer_step(name):
    learner, params, _ = _built(name)
    meta_params = learner.init(params)
    task = maml_jax.unstack_tasks(_tasks(name))[0]
    loss_0, _ = learner.meta_loss(meta_params, task, outer_step=jnp.int32(0))
    loss_late, _ = learner.meta_loss(meta_params, task, outer_step=jnp.int32(10**6))
    if name == "maml_plus_plus":  # the multi-step loss anneals to the last step
        assert not np.allclose(loss_0, loss_late)
    else:
        np.testing.assert_allclose(loss_0, loss_late, rtol=1e-12)


def test_every_gradient_factory_takes_the_same_keywords():
    shared = {"inner_lr", "inner_optimizer", "num_inner_steps", "first_order"}
    shared |= {"remat", "has_aux"}
    for name in maml_jax.GRADIENT_LEARNERS:
        signature = inspect.signature(maml_jax.LEARNERS[name])
        first = next(iter(signature.parameters.values()))
        assert first.name == "loss_fn", name
        assert shared <= set(signature.parameters), (
            name,
            shared - set(signature.parameters),
        )


@pytest.mark.parametrize(
    ("factory", "kwargs", "match"),
    [
        (maml_jax.reptile, {"first_order": False}, "no second-order Reptile"),
        (maml_jax.reptile, {"remat": True}, "nothing to recompute"),
        (maml_jax.imaml, {"first_order": True, "reg_lambda": 1.0}, "implicit"),
        (maml_jax.imaml, {"remat": True, "reg_lambda": 1.0}, "does not grow"),
        (maml_jax.fomaml, {"first_order": False}, "first-order by definition"),
        (maml_jax.meta_sgd, {"inner_optimizer": optax.sgd(0.1)}, "learns its inner"),
        (maml_jax.maml_plus_plus, {"inner_optimizer": optax.sgd(0.1)}, "learns its"),
    ],
)
def test_options_a_learner_cannot_honour_say_why(factory, kwargs, match):
    loss_fn = _sinusoid_setup()[0]
    with pytest.raises(ValueError, match=match):
        factory(loss_fn, inner_lr=0.1, num_inner_steps=2, **kwargs)


def test_anil_takes_a_rate_pytree():
    loss_fn, params, sampler = _sinusoid_setup()
    task = maml_jax.unstack_tasks(sampler(jax.random.key(0)))[0]
    rates = jax.tree.map(lambda _: 0.01, params)
    by_tree = maml_jax.anil(
        loss_fn, inner_lr=rates, num_inner_steps=2, adapt_mask=_head_only
    )
    by_scalar = maml_jax.anil(
        loss_fn, inner_lr=0.01, num_inner_steps=2, adapt_mask=_head_only
    )
    grad = lambda l: jax.grad(lambda p: l.meta_loss(p, task)[0])(params)
    chex.assert_trees_all_close(grad(by_tree), grad(by_scalar), rtol=1e-12)
    # Only the head's rates are used: a different body rate changes nothing,
    # a different head rate does.
    rates["Dense_0"] = jax.tree.map(lambda _: 5.0, rates["Dense_0"])
    body_changed = maml_jax.anil(
        loss_fn, inner_lr=rates, num_inner_steps=2, adapt_mask=_head_only
    )
    chex.assert_trees_all_close(grad(body_changed), grad(by_scalar), rtol=1e-12)
    rates["Dense_2"] = jax.tree.map(lambda _: 0.02, rates["Dense_2"])
    head_changed = maml_jax.anil(
        loss_fn, inner_lr=rates, num_inner_steps=2, adapt_mask=_head_only
    )
    adapted = head_changed.adapt(params, task.support)
    assert not np.allclose(adapted["Dense_2"]["kernel"], params["Dense_2"]["kernel"])
    chex.assert_trees_all_equal(adapted["Dense_0"], params["Dense_0"])


def test_learner_registry_builds_every_learner():
    loss_fn, params, _ = _sinusoid_setup()
    for name in maml_jax.GRADIENT_LEARNERS:
        extra = {"reg_lambda": 100.0} if name == "imaml" else {}
        if name == "anil":
            extra = {"adapt_mask": _head_only}
        learner = maml_jax.make_learner(
            name, loss_fn, inner_lr=0.01, num_inner_steps=2, **extra
        )
        assert isinstance(learner, maml_jax.MetaLearner)
    with pytest.raises(ValueError, match="unknown learner"):
        maml_jax.make_learner("mamal", loss_fn)
