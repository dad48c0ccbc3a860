"""Exactness of Reptile, ANIL, Meta-SGD and MAML++ against independent computations."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.test_util import check_grads

import maml_jax
from maml_jax import Task
from tests import helpers


def _mlp_task(seed=0):
    key = jax.random.key(seed)
    x = jax.random.uniform(key, (2, 10, 1), jnp.float64, -2, 2)
    return Task(support=(x[0], jnp.sin(x[0])), query=(x[1], jnp.sin(x[1])))


def _params(seed=0):
    return helpers.mlp_params(jax.random.key(seed))


# --- Reptile ------------------------------------------------------------------


@pytest.mark.parametrize("inner", ["sgd", "adam"])
def test_reptile_gradient_is_theta_minus_hand_run_phi(inner):
    task, params = _mlp_task(), _params()
    make = optax.sgd if inner == "sgd" else (lambda lr: optax.adam(lr, b1=0.0))
    learner = maml_jax.reptile(
        helpers.mlp_loss, inner_optimizer=make(0.05), num_inner_steps=4
    )
    grads = jax.grad(lambda p: learner.meta_loss(p, task)[0])(params)

    phi, opt = params, make(0.05)
    opt_state = opt.init(phi)
    for _ in range(4):
        g = jax.grad(helpers.mlp_loss)(phi, task.support)
        updates, opt_state = opt.update(g, opt_state, phi)
        phi = optax.apply_updates(phi, updates)
    chex.assert_trees_all_close(
        grads, jax.tree.map(jnp.subtract, params, phi), rtol=1e-10, atol=1e-12
    )


def test_reptile_sgd_outer_step_moves_toward_adapted_weights():
    tasks = helpers.linear_tasks(jax.random.key(1), num_tasks=3)
    w = jnp.array([0.3, -0.2, 0.5])
    learner = maml_jax.reptile(helpers.linear_loss, inner_lr=0.1, num_inner_steps=3)
    state = maml_jax.MetaTrainState.create(
        params=w, learner=learner, tx=maml_jax.reptile_meta_optimizer(0.5, 10)
    )
    new, _ = maml_jax.train_step(state, tasks)
    phis = [learner.adapt(w, helpers.task_at(tasks, i).support) for i in range(3)]
    expected = w + 0.5 * (jnp.mean(jnp.stack(phis), axis=0) - w)
    np.testing.assert_allclose(new.meta_params, expected, rtol=1e-10)


# --- ANIL ---------------------------------------------------------------------


def test_anil_leaves_body_unchanged_and_matches_zero_lr_maml():
    task, params = _mlp_task(1), _params(1)
    mask = [{"w": False, "b": False}, {"w": False, "b": False}, {"w": True, "b": True}]
    learner = maml_jax.anil(
        helpers.mlp_loss, inner_lr=0.1, num_inner_steps=3, adapt_mask=mask
    )
    adapted = learner.adapt(params, task.support)
    chex.assert_trees_all_equal(adapted[:2], params[:2])
    assert not np.allclose(adapted[2]["w"], params[2]["w"])
    # The outer gradient (body included) equals MAML's with a zero inner rate
    # on the body: an independent route to the same maths.
    lr_tree = [jax.tree.map(lambda _: 0.0, layer) for layer in params[:2]]
    lr_tree.append(jax.tree.map(lambda _: 0.1, params[2]))
    reference = maml_jax.maml(helpers.mlp_loss, inner_lr=lr_tree, num_inner_steps=3)
    chex.assert_trees_all_close(
        jax.grad(lambda p: learner.meta_loss(p, task)[0])(params),
        jax.grad(lambda p: reference.meta_loss(p, task)[0])(params),
        rtol=1e-10,
        atol=1e-13,
    )


def test_anil_mask_as_prefix_or_function_and_bad_mask():
    task, params = _mlp_task(), _params()
    by_prefix = maml_jax.anil(
        helpers.mlp_loss,
        inner_lr=0.1,
        num_inner_steps=1,
        adapt_mask=[False, False, True],
    )
    by_fn = maml_jax.anil(
        helpers.mlp_loss,
        inner_lr=0.1,
        num_inner_steps=1,
        adapt_mask=lambda p: [False] * (len(p) - 1) + [True],
    )
    chex.assert_trees_all_close(
        by_prefix.adapt(params, task.support), by_fn.adapt(params, task.support)
    )
    nothing = maml_jax.anil(
        helpers.mlp_loss,
        inner_lr=0.1,
        num_inner_steps=1,
        adapt_mask=[False, False, False],
    )
    with pytest.raises(ValueError, match="selects no parameter"):
        nothing.init(params)
    wrong = maml_jax.anil(
        helpers.mlp_loss, inner_lr=0.1, num_inner_steps=1, adapt_mask={"head": True}
    )
    with pytest.raises(ValueError, match="structure of params"):
        wrong.init(params)


# --- Meta-SGD -----------------------------------------------------------------


def test_meta_sgd_learning_rate_gradient_matches_finite_differences():
    task, params = _mlp_task(2), _params(2)
    learner = maml_jax.meta_sgd(helpers.mlp_loss, inner_lr=0.1, num_inner_steps=2)
    meta_params = learner.init(params)
    meta_params = meta_params._replace(
        inner_lr=jax.tree.map(
            lambda lr: (
                lr * jax.random.uniform(jax.random.key(3), lr.shape, lr.dtype, 0.5, 1.5)
            ),
            meta_params.inner_lr,
        )
    )
    loss_of_lrs = lambda lrs: learner.meta_loss(
        maml_jax.MetaSGDParams(params, lrs), task
    )[0]
    check_grads(
        loss_of_lrs,
        (meta_params.inner_lr,),
        order=1,
        modes=("rev",),
        atol=1e-6,
        rtol=1e-6,
    )
    grads = jax.grad(lambda mp: learner.meta_loss(mp, task)[0])(meta_params)
    assert isinstance(grads, maml_jax.MetaSGDParams)


def test_meta_sgd_with_initial_rates_is_maml_for_the_params():
    task, params = _mlp_task(3), _params(3)
    learner = maml_jax.meta_sgd(helpers.mlp_loss, inner_lr=0.1, num_inner_steps=2)
    maml = maml_jax.maml(helpers.mlp_loss, inner_lr=0.1, num_inner_steps=2)
    grads = jax.grad(lambda mp: learner.meta_loss(mp, task)[0])(learner.init(params))
    chex.assert_trees_all_close(
        grads.params,
        jax.grad(lambda p: maml.meta_loss(p, task)[0])(params),
        rtol=1e-12,
    )
    with pytest.raises(TypeError, match="learner.init"):
        learner.meta_loss(params, task)


# --- MAML++ -------------------------------------------------------------------


def test_lslr_with_equal_rates_and_final_step_msl_reproduce_maml():
    task, params = _mlp_task(4), _params(4)
    maml = maml_jax.maml(helpers.mlp_loss, inner_lr=0.1, num_inner_steps=3)
    maml_loss, maml_grads = jax.value_and_grad(lambda p: maml.meta_loss(p, task)[0])(
        params
    )
    for kwargs in (
        dict(learn_inner_lr=True, multi_step_loss=False),
        dict(learn_inner_lr=False, step_weights=jnp.array([0.0, 0.0, 1.0])),
        dict(learn_inner_lr=True, step_weights=jnp.array([0.0, 0.0, 1.0])),
    ):
        learner = maml_jax.maml_plus_plus(
            helpers.mlp_loss, inner_lr=0.1, num_inner_steps=3, **kwargs
        )
        meta_params = learner.init(params)
        loss, grads = jax.value_and_grad(
            lambda mp, f=learner.meta_loss: f(mp, task)[0]
        )(meta_params)
        if kwargs["learn_inner_lr"]:
            grads = grads.params
            assert meta_params.inner_lr[0]["w"].shape == (3,)
        np.testing.assert_allclose(loss, maml_loss, rtol=1e-12)
        chex.assert_trees_all_close(grads, maml_grads, rtol=1e-10, atol=1e-13)


def test_msl_is_the_weighted_sum_of_per_step_query_losses():
    task, params = _mlp_task(5), _params(5)
    weights = jnp.array([0.2, 0.3, 0.5])
    learner = maml_jax.maml_plus_plus(
        helpers.mlp_loss,
        inner_lr=0.1,
        num_inner_steps=3,
        learn_inner_lr=False,
        step_weights=weights,
    )
    per_step = [
        maml_jax.maml(helpers.mlp_loss, inner_lr=0.1, num_inner_steps=k).meta_loss(
            params, task
        )[0]
        for k in (1, 2, 3)
    ]
    np.testing.assert_allclose(
        learner.meta_loss(params, task)[0],
        jnp.dot(weights, jnp.stack(per_step)),
        rtol=1e-12,
    )


def test_msl_weights_anneal_as_in_the_paper():
    w0 = maml_jax.msl_weights(0, 5, anneal_steps=100)
    np.testing.assert_allclose(w0, np.full(5, 0.2), rtol=1e-6)
    for step in (0, 30, 60, 99, 100, 500):
        w = maml_jax.msl_weights(step, 5, anneal_steps=100)
        np.testing.assert_allclose(float(jnp.sum(w)), 1.0, rtol=1e-5)
    w_mid = maml_jax.msl_weights(50, 5, anneal_steps=100)
    assert float(w_mid[-1]) > 0.2 > float(w_mid[0])
    np.testing.assert_array_equal(
        maml_jax.msl_weights(100, 5, anneal_steps=100), [0, 0, 0, 0, 1]
    )


def test_train_step_uses_the_annealed_weights_of_the_current_step():
    tasks = maml_jax.sample_sinusoid_tasks(jax.random.key(0), 3, 5, 5)
    model = maml_jax.MLP(hidden_sizes=(8,))
    params = model.init(jax.random.key(0), jnp.zeros((1, 1)))["params"]
    loss_fn = maml_jax.regression_loss(model.apply)
    learner = maml_jax.maml_plus_plus(
        loss_fn, inner_lr=0.01, num_inner_steps=3, msl_anneal_steps=10
    )
    state = maml_jax.MetaTrainState.create(
        params=params, learner=learner, tx=optax.sgd(1.0)
    )
    state = state.replace(step=jnp.asarray(4, jnp.int32))
    _, metrics = maml_jax.train_step(state, tasks)
    weights = maml_jax.msl_weights(4, 3, anneal_steps=10)
    fixed = maml_jax.maml_plus_plus(
        loss_fn, inner_lr=0.01, num_inner_steps=3, step_weights=weights
    )
    (loss, _), _ = maml_jax.meta_value_and_grad(fixed, state.meta_params, tasks)
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-6)


def test_derivative_order_annealing_switches_compiled_functions():
    tasks = maml_jax.sample_sinusoid_tasks(jax.random.key(0), 3, 5, 5)
    model = maml_jax.MLP(hidden_sizes=(8,))
    params = model.init(jax.random.key(0), jnp.zeros((1, 1)))["params"]
    loss_fn = maml_jax.regression_loss(model.apply)
    kwargs = dict(inner_lr=0.01, num_inner_steps=2, multi_step_loss=False)
    first = maml_jax.maml_plus_plus(loss_fn, first_order=True, **kwargs)
    second = maml_jax.maml_plus_plus(loss_fn, **kwargs)
    state = maml_jax.MetaTrainState.create(
        params=params, learner=first, tx=optax.adam(1e-3)
    )
    state, _ = maml_jax.meta_train_step(state, tasks)
    state, m = maml_jax.meta_train_step(state.replace(learner=second), tasks)
    (loss, _), _ = maml_jax.meta_value_and_grad(second, state.meta_params, tasks)
    assert int(state.step) == 2 and np.isfinite(float(m["loss"]))
    assert maml_jax.meta_train_step._cache_size() >= 2
