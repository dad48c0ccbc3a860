"""One contract every learner passes (like optax's common tests).

Each row builds a learner, its initial parameters and a small task family suited
to it; every test runs over every row.
"""

import functools

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

    sampler = lambda key: jax.vmap(sample_task)(jax.random.split(key, NUM_TASKS))
    params = {"w": 0.3 * jax.random.normal(jax.random.key(0), (dim, 8))}
    embed = lambda p, x: jnp.tanh(x @ p["w"])
    return embed, params, sampler


def _row(factory, setup=_sinusoid_setup, **kwargs):
    def build():
        loss_fn, params, sampler = setup()
        return factory(loss_fn, **kwargs), params, sampler

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
    per_task = [
        one(meta_params, jax.tree.map(lambda x, i=i: x[i], tasks))
        for i in range(NUM_TASKS)
    ]
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
    task = jax.tree.map(lambda x: x[0], _tasks(name))
    curve = jax.jit(learner.adaptation_curve, static_argnums=2)(
        learner.init(params), task, 3
    )
    assert curve["query_loss"].shape == (4,) and curve["support_loss"].shape == (4,)
