"""The inner loop driven by optax: exact second-order meta-gradients through any
inner optimizer's updates and state, against hand-written float64 references."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.test_util import check_grads

import maml_jax
from tests import helpers

LR, STEPS, NUM_TASKS = 0.05, 3, 3


def _tasks(seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    x = jax.random.uniform(k1, (NUM_TASKS, 2, 10, 1), jnp.float64, -2, 2)
    phase = jax.random.uniform(k2, (NUM_TASKS, 1, 1, 1), jnp.float64, 0, 3)
    y = jnp.sin(x + phase)
    return maml_jax.TaskBatch(support=(x[:, 0], y[:, 0]), query=(x[:, 1], y[:, 1]))


def _params(seed=0):
    return helpers.mlp_params(jax.random.key(seed), sizes=(1, 6, 6, 1))


# Hand-written update rules (not optax): (state, g, t) -> (update, state), t >= 1.
def _sgd_rule():
    return lambda p: None, lambda s, g, t: (-LR * g, s)


def _momentum_rule(beta=0.9):
    def update(m, g, t):
        m = g + beta * m  # optax.trace: m_t = g_t + β m_{t-1}
        return -LR * m, m

    return jnp.zeros_like, update


def _adam_rule(b1=0.9, b2=0.999, eps=1e-8):
    def update(state, g, t):
        m, v = state
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g**2
        m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
        return -LR * m_hat / (jnp.sqrt(v_hat) + eps), (m, v)

    return lambda p: (jnp.zeros_like(p), jnp.zeros_like(p)), update


RULES = {
    "sgd": (optax.sgd(LR), _sgd_rule),
    "momentum": (optax.sgd(LR, momentum=0.9), _momentum_rule),
    "adam": (optax.adam(LR), _adam_rule),
}


def _reference_meta_loss(params, tasks, rule):
    """Mean query loss after STEPS hand-unrolled inner steps, task by task."""
    init, update = rule()
    total = 0.0
    for i in range(NUM_TASKS):
        task = helpers.task_at(tasks, i)
        leaves, treedef = jax.tree.flatten(params)
        states = [init(p) for p in leaves]
        for t in range(1, STEPS + 1):
            phi = treedef.unflatten(leaves)
            grads = jax.tree.leaves(jax.grad(helpers.mlp_loss)(phi, task.support))
            steps = [update(s, g, t) for s, g in zip(states, grads, strict=True)]
            leaves = [p + u for p, (u, _) in zip(leaves, steps, strict=True)]
            states = [s for _, s in steps]
        total = total + helpers.mlp_loss(treedef.unflatten(leaves), task.query)
    return total / NUM_TASKS


@pytest.mark.parametrize("name", sorted(RULES))
def test_second_order_meta_gradient_matches_hand_unrolled_reference(name):
    optimizer, rule = RULES[name]
    params, tasks = _params(), _tasks()
    learner = maml_jax.maml(
        helpers.mlp_loss, inner_optimizer=optimizer, num_inner_steps=STEPS
    )
    (loss, _), grads = jax.jit(
        lambda p, t: maml_jax.meta_value_and_grad(learner, p, t, batching="vmap")
    )(params, tasks)
    ref_loss, ref_grads = jax.value_and_grad(_reference_meta_loss)(params, tasks, rule)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-8)
    chex.assert_trees_all_close(grads, ref_grads, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("name", ["momentum", "adam"])
def test_meta_gradient_through_optimizer_state_matches_finite_differences(name):
    optimizer, _ = RULES[name]
    learner = maml_jax.maml(
        helpers.mlp_loss, inner_optimizer=optimizer, num_inner_steps=STEPS
    )
    task = helpers.task_at(_tasks(1), 0)
    check_grads(
        lambda p: learner.meta_loss(p, task)[0],
        (_params(1),),
        order=1,
        modes=("rev",),
        atol=1e-6,
        rtol=1e-6,
    )


def test_first_order_drops_only_the_hessian_terms_with_adam():
    """FOMAML with Adam: the gradient is ∂L_Q/∂φ_K carried through the update's
    dependence on θ alone (φ_K = θ + Σ u_k with the u_k held fixed)."""
    params, tasks = _params(2), _tasks(2)
    task = helpers.task_at(tasks, 0)
    learner = maml_jax.maml(
        helpers.mlp_loss,
        inner_optimizer=optax.adam(LR),
        num_inner_steps=STEPS,
        first_order=True,
    )
    grads = jax.grad(lambda p: learner.meta_loss(p, task)[0])(params)
    phi = learner.adapt(params, task.support)
    chex.assert_trees_all_close(
        grads, jax.grad(helpers.mlp_loss)(phi, task.query), rtol=1e-10
    )


def test_inner_lr_is_exactly_optax_sgd():
    params, tasks = _params(3), _tasks(3)
    by_lr = maml_jax.maml(helpers.mlp_loss, inner_lr=LR, num_inner_steps=STEPS)
    by_optax = maml_jax.maml(
        helpers.mlp_loss, inner_optimizer=optax.sgd(LR), num_inner_steps=STEPS
    )
    results = [
        jax.jit(lambda p, t, l=l: maml_jax.meta_value_and_grad(l, p, t))(params, tasks)
        for l in (by_lr, by_optax)
    ]
    chex.assert_trees_all_equal(results[0], results[1])
    # And both are the textbook φ − α∇L_S(φ) loop, to float64 rounding.
    ref_loss, ref_grads = jax.value_and_grad(_reference_meta_loss)(
        params, tasks, _sgd_rule
    )
    (loss, _), grads = results[0]
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-12)
    chex.assert_trees_all_close(grads, ref_grads, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize(
    "factory", [maml_jax.maml, maml_jax.fomaml, maml_jax.reptile, maml_jax.imaml]
)
def test_inner_optimizer_reaches_every_gradient_learner(factory):
    """Adam with b1 = 0 (Reptile's paper setting) drives each learner's adapt."""
    extra = {"reg_lambda": 1.0} if factory is maml_jax.imaml else {}
    tx = optax.adam(LR, b1=0.0)
    learner = factory(
        helpers.mlp_loss, inner_optimizer=tx, num_inner_steps=STEPS, **extra
    )
    task = helpers.task_at(_tasks(4), 0)
    phi = learner.adapt(_params(4), task.support)
    if factory is maml_jax.imaml:
        return  # a proximal objective: checked in test_imaml
    expected, state = _params(4), tx.init(_params(4))
    for _ in range(STEPS):
        g = jax.grad(helpers.mlp_loss)(expected, task.support)
        updates, state = tx.update(g, state, expected)
        expected = optax.apply_updates(expected, updates)
    chex.assert_trees_all_close(phi, expected, rtol=1e-12)


def test_both_inner_lr_and_inner_optimizer_is_an_error():
    with pytest.raises(ValueError, match="either inner_lr"):
        maml_jax.maml(
            helpers.mlp_loss,
            inner_lr=0.1,
            inner_optimizer=optax.sgd(0.1),
            num_inner_steps=1,
        )
    with pytest.raises(TypeError, match="needs inner_lr"):
        maml_jax.maml(helpers.mlp_loss, num_inner_steps=1)
    with pytest.raises(TypeError, match="GradientTransformation"):
        maml_jax.maml(helpers.mlp_loss, inner_optimizer=optax.sgd, num_inner_steps=1)


def test_per_step_rates_reuse_the_last_rate_past_the_schedule():
    rates = {"w": jnp.array([0.3, 0.2])}
    tx = maml_jax.per_step_sgd(rates)
    state = tx.init({"w": jnp.zeros(())})
    got = []
    for _ in range(4):
        u, state = tx.update({"w": jnp.ones(())}, state)
        got.append(float(u["w"]))
    assert got == [-0.3, -0.2, -0.2, -0.2]
