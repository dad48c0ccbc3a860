"""Exactness and transformation tests for the MAML core."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized
from jax.test_util import check_grads

import maml_jax
from maml_jax import Task, TaskBatch, core
from tests import helpers

ALPHA = 0.05


def _tasks(seed=0, **kwargs):
    return helpers.linear_tasks(jax.random.key(seed), **kwargs)


def _w0(dim=3):
    return jnp.array([0.3, -0.2, 0.5], jnp.float64)[:dim]


# --- exactness against closed forms -------------------------------------------


def test_one_step_meta_gradient_matches_closed_form():
    task = helpers.task_at(_tasks(), 0)
    w = _w0()
    learner = maml_jax.maml(helpers.linear_loss, inner_lr=ALPHA, num_inner_steps=1)
    grad = jax.grad(lambda p: learner.meta_loss(p, task)[0])(w)

    phi = w - ALPHA * helpers.linear_grad(w, task.support)
    h_s = helpers.linear_hessian(task.support)
    expected = (jnp.eye(3) - ALPHA * h_s) @ helpers.linear_grad(phi, task.query)
    np.testing.assert_allclose(grad, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("num_steps", [2, 5])
def test_multi_step_meta_gradient_matches_closed_form(num_steps):
    task = helpers.task_at(_tasks(), 1)
    w = _w0()
    learner = maml_jax.maml(
        helpers.linear_loss, inner_lr=ALPHA, num_inner_steps=num_steps
    )
    grad = jax.grad(lambda p: learner.meta_loss(p, task)[0])(w)

    phi = w
    for _ in range(num_steps):
        phi = phi - ALPHA * helpers.linear_grad(phi, task.support)
    jacobian = jnp.linalg.matrix_power(
        jnp.eye(3) - ALPHA * helpers.linear_hessian(task.support), num_steps
    )
    expected = jacobian.T @ helpers.linear_grad(phi, task.query)
    np.testing.assert_allclose(grad, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("num_steps", [1, 3])
def test_mlp_meta_gradient_matches_finite_differences(num_steps):
    key = jax.random.key(3)
    params = helpers.mlp_params(key)
    kx, ky = jax.random.split(key)
    x = jax.random.uniform(kx, (2, 10, 1), jnp.float64, -2, 2)
    task = Task(support=(x[0], jnp.sin(x[0])), query=(x[1], jnp.sin(x[1])))
    learner = maml_jax.maml(helpers.mlp_loss, inner_lr=0.1, num_inner_steps=num_steps)
    check_grads(
        lambda p: learner.meta_loss(p, task)[0],
        (params,),
        order=1,
        modes=("rev",),
        atol=1e-6,
        rtol=1e-6,
    )


def test_first_order_is_gradient_with_stopped_inner_gradient():
    task = helpers.task_at(_tasks(), 2)
    w = _w0()
    fo = maml_jax.fomaml(helpers.linear_loss, inner_lr=ALPHA, num_inner_steps=2)
    grad_fo = jax.grad(lambda p: fo.meta_loss(p, task)[0])(w)

    def manual(p):
        for _ in range(2):
            g = jax.grad(helpers.linear_loss)(p, task.support)
            p = p - ALPHA * jax.lax.stop_gradient(g)
        return helpers.linear_loss(p, task.query)

    np.testing.assert_allclose(grad_fo, jax.grad(manual)(w), rtol=1e-12)
    # ... which for two steps is the query gradient at the adapted point.
    phi = fo.adapt(w, task.support)
    np.testing.assert_allclose(
        grad_fo, helpers.linear_grad(phi, task.query), rtol=1e-10
    )
    so = maml_jax.maml(helpers.linear_loss, inner_lr=ALPHA, num_inner_steps=2)
    grad_so = jax.grad(lambda p: so.meta_loss(p, task)[0])(w)
    assert float(jnp.max(jnp.abs(grad_so - grad_fo))) > 1e-3


def test_scan_equals_hand_unrolled_loop():
    key = jax.random.key(4)
    params = helpers.mlp_params(key)
    x = jax.random.normal(key, (2, 12, 1), jnp.float64)
    task = Task(support=(x[0], jnp.cos(x[0])), query=(x[1], jnp.cos(x[1])))
    learner = maml_jax.maml(helpers.mlp_loss, inner_lr=0.05, num_inner_steps=4)

    def unrolled(p):
        for _ in range(4):
            g = jax.grad(helpers.mlp_loss)(p, task.support)
            p = jax.tree.map(lambda a, b: a - 0.05 * b, p, g)
        return helpers.mlp_loss(p, task.query)

    loss, grads = jax.value_and_grad(lambda p: learner.meta_loss(p, task)[0])(params)
    ref_loss, ref_grads = jax.value_and_grad(unrolled)(params)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-12)
    chex.assert_trees_all_close(grads, ref_grads, rtol=1e-10, atol=1e-12)


def test_remat_gives_same_gradients():
    tasks = _tasks(num_tasks=3)
    w = _w0()
    kw = dict(inner_lr=ALPHA, num_inner_steps=3)
    plain = maml_jax.maml(helpers.linear_loss, **kw)
    remat = maml_jax.maml(helpers.linear_loss, remat=True, **kw)
    (l1, _), g1 = maml_jax.meta_value_and_grad(plain, w, tasks)
    (l2, _), g2 = maml_jax.meta_value_and_grad(remat, w, tasks)
    np.testing.assert_allclose(l1, l2, rtol=1e-12)
    np.testing.assert_allclose(g1, g2, rtol=1e-12)


def test_pytree_inner_lr_equal_rates_match_scalar_and_per_element_rates_work():
    key = jax.random.key(5)
    params = helpers.mlp_params(key)
    x = jax.random.normal(key, (2, 8, 1), jnp.float64)
    task = Task(support=(x[0], x[0] ** 2), query=(x[1], x[1] ** 2))
    scalar = maml_jax.maml(helpers.mlp_loss, inner_lr=0.1, num_inner_steps=2)
    tree_lr = jax.tree.map(lambda p: 0.1, params)
    tree = maml_jax.maml(helpers.mlp_loss, inner_lr=tree_lr, num_inner_steps=2)
    chex.assert_trees_all_close(
        jax.grad(lambda p: scalar.meta_loss(p, task)[0])(params),
        jax.grad(lambda p: tree.meta_loss(p, task)[0])(params),
        rtol=1e-12,
    )
    # Per-element rates: zero rate on the first layer leaves it unadapted.
    elementwise = jax.tree.map(lambda p: jnp.full_like(p, 0.1), params)
    elementwise[0] = jax.tree.map(jnp.zeros_like, elementwise[0])
    adapted = maml_jax.maml(
        helpers.mlp_loss, inner_lr=elementwise, num_inner_steps=2
    ).adapt(params, task.support)
    chex.assert_trees_all_equal(adapted[0], params[0])
    assert not np.allclose(adapted[1]["w"], params[1]["w"])


# --- aux and adaptation curves -------------------------------------------------


def test_aux_reports_pre_and_post_adaptation_metrics():
    task = helpers.task_at(_tasks(), 0)
    w = _w0()
    learner = maml_jax.maml(helpers.linear_loss, inner_lr=ALPHA, num_inner_steps=2)
    loss, aux = learner.meta_loss(w, task)
    phi = learner.adapt(w, task.support)
    np.testing.assert_allclose(aux["query_loss_post"], loss, rtol=1e-12)
    np.testing.assert_allclose(
        aux["query_loss_pre"], helpers.linear_loss(w, task.query), rtol=1e-12
    )
    np.testing.assert_allclose(
        aux["support_loss_pre"], helpers.linear_loss(w, task.support), rtol=1e-12
    )
    np.testing.assert_allclose(
        aux["support_loss_post"], helpers.linear_loss(phi, task.support), rtol=1e-12
    )
    assert aux["support_loss_post"] < aux["support_loss_pre"]


def test_aux_carries_loss_fn_aux_values():
    key = jax.random.key(6)
    params = helpers.mlp_params(key)
    x = jax.random.normal(key, (2, 8, 1), jnp.float64)
    task = Task(support=(x[0], x[0]), query=(x[1], x[1]))
    learner = maml_jax.maml(
        helpers.mlp_loss_with_aux, inner_lr=0.1, num_inner_steps=1, has_aux=True
    )
    _, aux = learner.meta_loss(params, task)
    phi = learner.adapt(params, task.support)
    np.testing.assert_allclose(
        aux["query_mae_post"], helpers.mlp_loss_with_aux(phi, task.query)[1]["mae"]
    )
    np.testing.assert_allclose(
        aux["query_mae_pre"], helpers.mlp_loss_with_aux(params, task.query)[1]["mae"]
    )


def test_adaptation_curve_matches_adapt_at_every_step():
    task = helpers.task_at(_tasks(), 3)
    w = _w0()
    learner = maml_jax.maml(helpers.linear_loss, inner_lr=ALPHA, num_inner_steps=1)
    curve = learner.adaptation_curve(w, task, 4)
    assert curve["query_loss"].shape == (5,)
    for k in range(1, 5):
        k_step = maml_jax.maml(helpers.linear_loss, inner_lr=ALPHA, num_inner_steps=k)
        np.testing.assert_allclose(
            curve["query_loss"][k], k_step.meta_loss(w, task)[0], rtol=1e-10
        )
    np.testing.assert_allclose(
        curve["query_loss"][0], helpers.linear_loss(w, task.query), rtol=1e-12
    )


# --- task batching --------------------------------------------------------------


def test_vmap_over_tasks_equals_python_loop():
    tasks = _tasks(num_tasks=5)
    w = _w0()
    learner = maml_jax.maml(helpers.linear_loss, inner_lr=ALPHA, num_inner_steps=2)
    (loss, aux), grads = maml_jax.meta_value_and_grad(learner, w, tasks)

    per_task = [
        jax.value_and_grad(lambda p, t=t: learner.meta_loss(p, t)[0])(w)
        for t in (helpers.task_at(tasks, i) for i in range(5))
    ]
    np.testing.assert_allclose(loss, np.mean([l for l, _ in per_task]), rtol=1e-12)
    np.testing.assert_allclose(
        grads, np.mean([g for _, g in per_task], axis=0), rtol=1e-12
    )
    assert aux["query_loss_post"].shape == (5,)


@pytest.mark.parametrize(
    "batching,chunk_size",
    [("scan", None), ("scan", 2), ("unroll", None), ("unroll", 3)],
)
def test_batching_strategies_give_the_same_result(batching, chunk_size):
    tasks = _tasks(num_tasks=6)
    params = helpers.mlp_params(jax.random.key(7), sizes=(3, 5, 1))
    tasks = TaskBatch(
        support=(tasks.support[0], tasks.support[1][..., None]),
        query=(tasks.query[0], tasks.query[1][..., None]),
    )
    learner = maml_jax.maml(helpers.mlp_loss, inner_lr=0.1, num_inner_steps=2)
    (ref_loss, ref_aux), ref_grads = maml_jax.meta_value_and_grad(
        learner, params, tasks
    )
    (loss, aux), grads = maml_jax.meta_value_and_grad(
        learner, params, tasks, batching=batching, chunk_size=chunk_size
    )
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-12)
    chex.assert_trees_all_close(grads, ref_grads, rtol=1e-10, atol=1e-14)
    chex.assert_trees_all_close(aux, ref_aux, rtol=1e-12)


def test_meta_value_and_grad_works_under_vmap_and_grad():
    """Composability: vmap over several initialisations; grad of the meta-loss."""
    tasks = _tasks(num_tasks=3)
    learner = maml_jax.maml(helpers.linear_loss, inner_lr=ALPHA, num_inner_steps=1)
    ws = jnp.stack([_w0(), -_w0()])
    grads = jax.vmap(lambda w: maml_jax.meta_value_and_grad(learner, w, tasks)[1])(ws)
    for i in range(2):
        np.testing.assert_allclose(
            grads[i], maml_jax.meta_value_and_grad(learner, ws[i], tasks)[1], rtol=1e-12
        )
    # Differentiating the batch meta-loss again (third order overall) works too.
    hvp = jax.grad(
        lambda w: jnp.sum(maml_jax.meta_value_and_grad(learner, w, tasks)[1] ** 2)
    )(_w0())
    assert hvp.shape == (3,) and bool(jnp.all(jnp.isfinite(hvp)))


class JitTest(parameterized.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_jit_equals_no_jit(self):
        tasks = _tasks(num_tasks=4)
        learner = maml_jax.maml(helpers.linear_loss, inner_lr=ALPHA, num_inner_steps=3)
        fn = self.variant(functools.partial(maml_jax.meta_value_and_grad, learner))
        (loss, _), grads = fn(_w0(), tasks)
        (ref_loss, _), ref_grads = maml_jax.meta_value_and_grad(learner, _w0(), tasks)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-12)
        np.testing.assert_allclose(grads, ref_grads, rtol=1e-12)


def test_compiled_step_traces_once():
    learner = maml_jax.maml(helpers.linear_loss, inner_lr=ALPHA, num_inner_steps=2)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(w, tasks):
        return maml_jax.meta_value_and_grad(learner, w, tasks)[1]

    for seed in range(3):
        step(_w0(), _tasks(seed))


def test_compile_time_does_not_grow_with_inner_steps():
    """The inner loop is a scan: the HLO has the same size for 1 and 50 steps."""
    tasks = _tasks(num_tasks=2)

    def hlo_size(num_steps):
        learner = maml_jax.maml(
            helpers.mlp_loss, inner_lr=0.1, num_inner_steps=num_steps
        )
        params = helpers.mlp_params(jax.random.key(0), sizes=(3, 4, 1))
        batch = TaskBatch(
            support=(tasks.support[0], tasks.support[1][..., None]),
            query=(tasks.query[0], tasks.query[1][..., None]),
        )
        fn = lambda p: maml_jax.meta_value_and_grad(learner, p, batch)
        return len(jax.jit(fn).lower(params).as_text())

    assert hlo_size(50) <= 1.05 * hlo_size(1)


# --- clear errors on bad input -----------------------------------------------


def _learner(**kwargs):
    kwargs = {"inner_lr": ALPHA, "num_inner_steps": 1, **kwargs}
    return maml_jax.maml(helpers.linear_loss, **kwargs)


def test_support_and_query_structures_must_match():
    tasks = _tasks()
    query = {"x": tasks.query[0], "y": tasks.query[1]}
    bad = TaskBatch(support=tasks.support, query=query)
    with pytest.raises(ValueError, match="same pytree structure"):
        maml_jax.meta_value_and_grad(_learner(), _w0(), bad)
    with pytest.raises(ValueError, match="same pytree structure"):
        _learner().meta_loss(_w0(), helpers.task_at(bad, 0))


def test_missing_task_axis_is_reported():
    single = helpers.task_at(_tasks(), 0)
    mixed = TaskBatch(support=single.support, query=_tasks().query)
    with pytest.raises(ValueError, match="leading task axis"):
        maml_jax.meta_value_and_grad(_learner(), _w0(), mixed)
    scalars = TaskBatch(support=(1.0, 2.0), query=(1.0, 2.0))
    with pytest.raises(ValueError, match="leading task axis"):
        maml_jax.meta_value_and_grad(_learner(), _w0(), scalars)


def test_task_axes_of_different_lengths_are_reported():
    tasks = _tasks(num_tasks=4)
    short = TaskBatch(
        support=tasks.support, query=jax.tree.map(lambda x: x[:3], tasks.query)
    )
    with pytest.raises(ValueError, match="same leading task axis length"):
        maml_jax.meta_value_and_grad(_learner(), _w0(), short)


def test_tasks_must_be_a_task_batch():
    with pytest.raises(TypeError, match="expects a maml_jax.TaskBatch"):
        maml_jax.meta_value_and_grad(_learner(), _w0(), ((1.0,), (2.0,)))
    with pytest.raises(TypeError, match="got a single Task"):
        maml_jax.meta_value_and_grad(_learner(), _w0(), helpers.task_at(_tasks(), 0))


@pytest.mark.parametrize("steps", [0, -1])
def test_num_inner_steps_must_be_positive(steps):
    with pytest.raises(ValueError, match="num_inner_steps must be >= 1"):
        _learner(num_inner_steps=steps)


@pytest.mark.parametrize("steps", [1.5, True, "3"])
def test_num_inner_steps_must_be_an_int(steps):
    with pytest.raises(TypeError, match="num_inner_steps must be an int"):
        _learner(num_inner_steps=steps)


@pytest.mark.parametrize("lr", [0.0, -0.1, float("nan"), float("inf")])
def test_inner_lr_must_be_finite_and_positive(lr):
    with pytest.raises(ValueError, match="inner_lr must be a finite number > 0"):
        _learner(inner_lr=lr)


def test_inner_lr_pytree_must_match_params():
    params = helpers.mlp_params(jax.random.key(0))
    bad_lr = {"w": 0.1}
    learner = maml_jax.maml(helpers.mlp_loss, inner_lr=bad_lr, num_inner_steps=1)
    with pytest.raises(ValueError, match="structure does not match params"):
        learner.init(params)
    x = jnp.ones((4, 1))
    with pytest.raises(ValueError, match="structure does not match params"):
        learner.adapt(params, (x, x))
    wrong_shape = jax.tree.map(lambda p: jnp.ones(p.shape + (2,)), params)
    learner = maml_jax.maml(helpers.mlp_loss, inner_lr=wrong_shape, num_inner_steps=1)
    with pytest.raises(ValueError, match="must be a scalar or match"):
        learner.init(params)


def test_non_scalar_loss_is_reported():
    per_example = lambda w, b: (b[0] @ w - b[1]) ** 2
    learner = maml_jax.maml(per_example, inner_lr=0.1, num_inner_steps=1)
    with pytest.raises(ValueError, match="must return a scalar loss"):
        maml_jax.meta_value_and_grad(learner, _w0(), _tasks())


def test_tuple_loss_without_has_aux_is_reported():
    learner = maml_jax.maml(helpers.mlp_loss_with_aux, inner_lr=0.1, num_inner_steps=1)
    params = helpers.mlp_params(jax.random.key(0))
    x = jnp.ones((1, 4, 1))
    with pytest.raises(TypeError, match="pass has_aux=True"):
        maml_jax.meta_value_and_grad(learner, params, TaskBatch((x, x), (x, x)))


def test_unknown_batching_and_bad_chunk_size_are_reported():
    with pytest.raises(ValueError, match="batching must be one of"):
        maml_jax.meta_value_and_grad(_learner(), _w0(), _tasks(), batching="pmap")
    with pytest.raises(ValueError, match="must divide the number of tasks"):
        maml_jax.meta_value_and_grad(
            _learner(), _w0(), _tasks(num_tasks=4), batching="scan", chunk_size=3
        )


def test_core_inner_loop_with_plain_sgd():
    task = helpers.task_at(_tasks(), 0)
    phi, trace = core.inner_loop(
        helpers.linear_loss,
        _w0(),
        task.support,
        optimizer=optax.sgd(ALPHA),
        num_steps=3,
    )
    losses = trace.support_loss
    assert losses.shape == (3,)
    assert bool(jnp.all(jnp.diff(losses) < 0))
