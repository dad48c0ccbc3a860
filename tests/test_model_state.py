"""Model state (BatchNorm running statistics) through the learner contract.

The reference throughout is a hand-unrolled inner loop written here, in float64,
with the state threaded by hand: every support pass and the query pass update
the running averages; no gradient flows through them.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import maml_jax
from maml_jax import core

MOMENTUM = 0.9
ALPHA = 0.05
K = 2


def init_params(key, width=8, dtype=jnp.float64):
    k1, k2 = jax.random.split(key)
    return {
        "w1": jax.random.normal(k1, (1, width), dtype),
        "b1": jnp.zeros(width, dtype),
        "gamma": jnp.ones(width, dtype),
        "beta": jnp.zeros(width, dtype),
        "w2": jax.random.normal(k2, (width, 1), dtype) / width**0.5,
        "b2": jnp.zeros(1, dtype),
    }


def init_state(width=8, dtype=jnp.float64):
    return {"mean": jnp.zeros(width, dtype), "var": jnp.ones(width, dtype)}


def forward(p, s, x, training):
    """An MLP with batch norm; returns ``(outputs, new_state)``."""
    h = x @ p["w1"] + p["b1"][None]
    if training:
        mu, var = h.mean(0), h.var(0)
        new = {
            "mean": MOMENTUM * s["mean"] + (1 - MOMENTUM) * jax.lax.stop_gradient(mu),
            "var": MOMENTUM * s["var"] + (1 - MOMENTUM) * jax.lax.stop_gradient(var),
        }
    else:
        mu, var, new = s["mean"], s["var"], s
    scale = jax.lax.rsqrt(var + 1e-5) * p["gamma"]
    h = (h - mu[None]) * scale[None] + p["beta"][None]
    return (jax.nn.relu(h) @ p["w2"])[:, 0] + p["b2"], new


def stateful_loss(p, s, batch, *, training):
    x, y = batch
    out, new = forward(p, s, x, training)
    return jnp.mean((out - y) ** 2), new


def stateful_loss_with_aux(p, s, batch, *, training):
    loss, new = stateful_loss(p, s, batch, training=training)
    return (loss, {"mae": jnp.sqrt(loss)}), new


def make_tasks(key, num_tasks=4, shots=5, queries=7, dtype=jnp.float64):
    ks = jax.random.split(key, 4)
    amp = jax.random.uniform(ks[0], (num_tasks, 1, 1), dtype, 0.5, 2.0)
    xs = jax.random.uniform(ks[1], (num_tasks, shots, 1), dtype, -3, 3)
    xq = jax.random.uniform(ks[2], (num_tasks, queries, 1), dtype, -3, 3)
    return maml_jax.TaskBatch(
        support=(xs, (amp * jnp.sin(xs))[..., 0]),
        query=(xq, (amp * jnp.sin(xq))[..., 0]),
    )


def one_task(tasks, i=0):
    return maml_jax.Task(*jax.tree.map(lambda x: x[i], tasks))


def reference_meta_loss(
    theta, state, task, *, num_steps=K, training=True, query_training=None
):
    """Hand-unrolled second-order MAML with the state threaded by hand.

    ``query_training=False`` evaluates the query set in inference mode at the
    given ``state`` (the evaluation protocol).
    """
    phi, s = theta, state
    for _ in range(num_steps):
        grads, s_next = jax.grad(
            lambda p, s=s: stateful_loss(p, s, task.support, training=training),
            has_aux=True,
        )(phi)
        phi = jax.tree.map(lambda p, g: p - ALPHA * g, phi, grads)
        s = jax.lax.stop_gradient(s_next)
    if query_training is False:
        s = state
    query_training = training if query_training is None else query_training
    loss, s = stateful_loss(phi, s, task.query, training=query_training)
    return loss, (phi, s)


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


def setup(num_tasks=4):
    theta = init_params(jax.random.key(0))
    tasks = make_tasks(jax.random.key(1), num_tasks)
    return theta, init_state(), tasks


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_meta_loss_threads_state_and_matches_hand_unrolled_loop(jit):
    theta, state, tasks = setup()
    task = one_task(tasks)
    learner = maml_jax.maml(
        stateful_loss, inner_lr=ALPHA, num_inner_steps=K, has_state=True
    )

    def value_and_grad(theta, state):
        return jax.value_and_grad(
            lambda t: learner.meta_loss(t, task, state=state), has_aux=True
        )(theta)

    if jit:
        value_and_grad = jax.jit(value_and_grad)

    (loss, (aux, new_state)), grads = value_and_grad(theta, state)
    (ref_loss, (_, ref_state)), ref_grads = jax.value_and_grad(
        lambda t: reference_meta_loss(t, state, task), has_aux=True
    )(theta)
    chex.assert_trees_all_close(loss, ref_loss, rtol=1e-12)
    chex.assert_trees_all_close(new_state, ref_state, rtol=1e-12)
    chex.assert_trees_all_close(grads, ref_grads, rtol=1e-10, atol=1e-12)
    # The state moved: three passes (2 support, 1 query) in training mode.
    assert not np.allclose(new_state["mean"], state["mean"])
    assert set(aux) >= {"support_loss_pre", "query_loss_post"}


def test_meta_gradient_matches_finite_differences():
    theta, state, tasks = setup()
    task = one_task(tasks)
    learner = maml_jax.maml(
        stateful_loss, inner_lr=ALPHA, num_inner_steps=K, has_state=True
    )
    f = lambda w2: learner.meta_loss({**theta, "w2": w2}, task, state=state)[0]
    jax.test_util.check_grads(f, (theta["w2"],), order=1, modes=("rev",))


@pytest.mark.parametrize("batching", ["vmap", "scan", "unroll"])
def test_meta_value_and_grad_reduces_states_by_task_mean(batching):
    theta, state, tasks = setup()
    learner = maml_jax.maml(
        stateful_loss, inner_lr=ALPHA, num_inner_steps=K, has_state=True
    )
    (loss, (aux, new_state)), grads = core.meta_value_and_grad(
        learner, theta, tasks, state=state, batching=batching, chunk_size=2
    )
    per_task = [
        jax.value_and_grad(reference_meta_loss, has_aux=True)(
            theta, state, one_task(tasks, i)
        )
        for i in range(4)
    ]
    ref_loss = np.mean([l for (l, _), _ in per_task])
    ref_state = jax.tree.map(lambda *s: sum(s) / 4, *[s for (_, (_, s)), _ in per_task])
    ref_grads = jax.tree.map(lambda *g: sum(g) / 4, *[g for _, g in per_task])
    chex.assert_trees_all_close(loss, ref_loss, rtol=1e-12)
    chex.assert_trees_all_close(new_state, ref_state, rtol=1e-12)
    chex.assert_trees_all_close(grads, ref_grads, rtol=1e-10, atol=1e-12)
    assert aux["query_loss_post"].shape == (4,)


def test_custom_state_reduction():
    theta, state, tasks = setup()
    learner = maml_jax.maml(
        stateful_loss, inner_lr=ALPHA, num_inner_steps=K, has_state=True
    )
    first = lambda states: jax.tree.map(lambda x: x[0], states)
    (_, (_, new_state)), _ = core.meta_value_and_grad(
        learner, theta, tasks, state=state, state_reduction=first, batching="vmap"
    )
    _, (_, ref_state) = reference_meta_loss(theta, state, one_task(tasks, 0))
    chex.assert_trees_all_close(new_state, ref_state, rtol=1e-12)


def _stateless_view(loss_fn):
    """A stateful loss that ignores and returns its state unchanged."""
    return lambda p, s, batch, *, training: (loss_fn(p, batch), s)


def _plain_loss(p, batch):
    return stateful_loss(p, init_state(), batch, training=False)[0]


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("maml", {}),
        ("fomaml", {}),
        ("anil", {"adapt_mask": lambda p: {k: k in ("w2", "b2") for k in p}}),
        ("meta_sgd", {}),
        ("maml_plus_plus", {}),
        ("reptile", {}),
    ],
)
def test_stateful_form_of_a_stateless_loss_equals_the_stateless_learner(name, kwargs):
    theta, _, tasks = setup()
    factory = getattr(maml_jax, name)
    common = {"inner_lr": ALPHA, "num_inner_steps": K, **kwargs}
    plain = factory(_plain_loss, **common)
    stateful = factory(_stateless_view(_plain_loss), has_state=True, **common)
    assert stateful.has_state and not plain.has_state
    mp = plain.init(theta)
    (loss, aux), grads = core.meta_value_and_grad(plain, mp, tasks, batching="vmap")
    dummy = {"count": jnp.zeros(())}
    (s_loss, (s_aux, new_state)), s_grads = core.meta_value_and_grad(
        stateful, mp, tasks, state=dummy, batching="vmap"
    )
    chex.assert_trees_all_equal(new_state, dummy)
    chex.assert_trees_all_close(
        (loss, aux, grads), (s_loss, s_aux, s_grads), rtol=1e-12
    )


def test_adapt_runs_support_passes_as_in_training_and_predict_in_inference_mode():
    theta, state, tasks = setup()
    task = one_task(tasks)
    state = {"mean": jnp.full(8, 0.3), "var": jnp.full(8, 2.0)}
    learner = maml_jax.maml(
        stateful_loss, inner_lr=ALPHA, num_inner_steps=K, has_state=True
    )
    params, moved = learner.adapt(theta, task.support, state=state)
    _, (ref_params, _) = reference_meta_loss(theta, state, task)
    chex.assert_trees_all_close(params, ref_params, rtol=1e-12, atol=1e-14)
    assert not np.allclose(moved["mean"], state["mean"])
    # training=False: inference mode throughout, the state unchanged.
    params, same = learner.adapt(theta, task.support, state=state, training=False)
    _, (ref_params_inf, _) = reference_meta_loss(theta, state, task, training=False)
    chex.assert_trees_all_close(params, ref_params_inf, rtol=1e-12, atol=1e-14)
    chex.assert_trees_all_equal(same, state)
    apply_fn = lambda p, s, x: forward(p, s, x, False)[0]
    out = maml_jax.predict(
        learner, theta, task.support, task.query[0], apply_fn=apply_fn, state=state
    )
    chex.assert_trees_all_close(out, apply_fn(ref_params, state, task.query[0]))


def test_evaluate_adapts_on_support_statistics_and_scores_queries_in_inference():
    theta, _, tasks = setup()
    state = {"mean": jnp.full(8, 0.3), "var": jnp.full(8, 2.0)}
    learner = maml_jax.maml(
        stateful_loss_with_aux,
        inner_lr=ALPHA,
        num_inner_steps=K,
        has_state=True,
        has_aux=True,
    )
    curves = maml_jax.evaluate(learner, theta, tasks, num_steps=K, state=state)
    for i in range(4):
        task = one_task(tasks, i)
        ref_loss, _ = reference_meta_loss(theta, state, task, query_training=False)
        np.testing.assert_allclose(curves["query_loss"][i, -1], ref_loss, rtol=1e-12)
        pre = stateful_loss(theta, state, task.query, training=False)[0]
        np.testing.assert_allclose(curves["query_loss"][i, 0], pre, rtol=1e-12)
    assert curves["query_mae"].shape == (4, K + 1)


def _sampler(dtype=jnp.float64):
    def sample(key):
        return make_tasks(key, 4, dtype=dtype)

    return sample


def test_fit_updates_model_state_and_resume_is_bit_identical(tmp_path):
    theta, state, _ = setup()
    learner = maml_jax.maml(
        stateful_loss, inner_lr=ALPHA, num_inner_steps=K, has_state=True
    )
    make = lambda: maml_jax.MetaTrainState.create(
        params=theta, learner=learner, tx=optax.adam(1e-3), model_state=state
    )
    key = jax.random.key(7)
    straight = maml_jax.fit(make(), _sampler(), key=key, num_steps=6)
    assert not np.allclose(straight.model_state["mean"], state["mean"])

    half = maml_jax.fit(make(), _sampler(), key=key, num_steps=3)
    with maml_jax.Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(half)
        restored, _, _ = ckpt.restore(make())
    chex.assert_trees_all_equal(restored.model_state, half.model_state)
    resumed = maml_jax.fit(restored, _sampler(), key=key, num_steps=6)
    chex.assert_trees_all_equal(
        (resumed.meta_params, resumed.model_state, resumed.opt_state),
        (straight.meta_params, straight.model_state, straight.opt_state),
    )


def test_skipped_step_keeps_the_model_state():
    theta, state, tasks = setup()
    learner = maml_jax.maml(
        stateful_loss, inner_lr=ALPHA, num_inner_steps=K, has_state=True
    )
    train_state = maml_jax.MetaTrainState.create(
        params=theta, learner=learner, tx=optax.sgd(1e-3), model_state=state
    )
    bad = tasks._replace(query=(tasks.query[0], tasks.query[1] * jnp.nan))
    new, metrics = maml_jax.train_step(train_state, bad, nonfinite="skip")
    assert bool(metrics["skipped"])
    chex.assert_trees_all_equal(new.model_state, state)


def test_missing_or_unexpected_state_is_a_clear_error():
    theta, state, tasks = setup()
    task = one_task(tasks)
    stateful = maml_jax.maml(
        stateful_loss, inner_lr=ALPHA, num_inner_steps=K, has_state=True
    )
    plain = maml_jax.maml(_plain_loss, inner_lr=ALPHA, num_inner_steps=K)
    with pytest.raises(ValueError, match="has_state=True.*state="):
        stateful.meta_loss(theta, task)
    with pytest.raises(ValueError, match="without has_state=True"):
        plain.meta_loss(theta, task, state=state)
    with pytest.raises(ValueError, match="without has_state=True"):
        core.meta_value_and_grad(plain, theta, tasks, state=state)
    with pytest.raises(ValueError, match="model_state=state"):
        maml_jax.MetaTrainState.create(params=theta, learner=stateful, tx=optax.sgd(1))
    with pytest.raises(ValueError, match="state=train_state.model_state"):
        maml_jax.evaluate(stateful, theta, tasks, num_steps=1)


def test_a_loss_that_changes_the_state_structure_is_a_clear_error():
    theta, state, tasks = setup()
    bad = lambda p, s, b, *, training: (
        stateful_loss(p, s, b, training=training)[0],
        {},
    )
    learner = maml_jax.maml(bad, inner_lr=ALPHA, num_inner_steps=K, has_state=True)
    with pytest.raises(TypeError, match="structure differs"):
        learner.meta_loss(theta, one_task(tasks), state=state)
    grows = lambda p, s, b, *, training: (
        stateful_loss(p, s, b, training=training)[0],
        {"mean": s["mean"][None], "var": s["var"]},
    )
    learner = maml_jax.maml(grows, inner_lr=ALPHA, num_inner_steps=K, has_state=True)
    with pytest.raises(TypeError, match=r"state\['mean'\]"):
        learner.meta_loss(theta, one_task(tasks), state=state)
    no_tuple = lambda p, s, b, *, training: stateful_loss(p, s, b, training=training)[0]
    learner = maml_jax.maml(no_tuple, inner_lr=ALPHA, num_inner_steps=K, has_state=True)
    with pytest.raises(TypeError, match=r"\(loss, new_state\)"):
        learner.meta_loss(theta, one_task(tasks), state=state)


def test_vmap_of_meta_loss_equals_a_loop_over_tasks():
    theta, state, tasks = setup()
    learner = maml_jax.maml(
        stateful_loss, inner_lr=ALPHA, num_inner_steps=K, has_state=True
    )
    meta_loss = functools.partial(learner.meta_loss, state=state)
    batched = jax.vmap(
        lambda t, task: meta_loss(t, maml_jax.Task(*task)), in_axes=(None, 0)
    )(theta, tasks)
    looped = [meta_loss(theta, one_task(tasks, i)) for i in range(4)]
    chex.assert_trees_all_close(
        batched, jax.tree.map(lambda *x: jnp.stack(x), *looped), rtol=1e-12
    )


def _embed(p, s, x, *, training):
    out, new = forward({**p, "w2": p["w2"], "b2": p["b2"]}, s, x, training)
    h = x @ p["w1"] + p["b1"][None]
    mu, var = (h.mean(0), h.var(0)) if training else (s["mean"], s["var"])
    h = (h - mu[None]) * (jax.lax.rsqrt(var + 1e-5) * p["gamma"])[None]
    del out
    return jax.nn.relu(h + p["beta"][None]), new


def test_protonet_threads_state_through_support_and_query():
    theta, state, _ = setup()
    ways, shots = 2, 3
    x = jax.random.normal(jax.random.key(3), (2, ways * shots, 1), jnp.float64)
    labels = jnp.tile(jnp.arange(ways), shots)
    tasks = maml_jax.TaskBatch(
        support=(x, jnp.stack([labels, labels])),
        query=(x * 1.1, jnp.stack([labels] * 2)),
    )
    learner = maml_jax.protonet(_embed, ways=ways, has_state=True)
    task = one_task(tasks)
    loss, (aux, new_state) = learner.meta_loss(theta, task, state=state)
    _, s1 = _embed(theta, state, task.support[0], training=True)
    _, s2 = _embed(theta, s1, task.query[0], training=True)
    chex.assert_trees_all_close(new_state, s2, rtol=1e-12)
    plain = maml_jax.protonet(
        lambda p, x: _embed(p, state, x, training=True)[0], ways=ways
    )
    chex.assert_trees_all_close(loss, plain.meta_loss(theta, task)[0], rtol=1e-12)
    (_, (_, reduced)), _ = core.meta_value_and_grad(
        learner, theta, tasks, state=state, batching="vmap"
    )
    assert reduced["mean"].shape == (8,)
    logits = maml_jax.predict(learner, theta, task.support, task.query[0], state=state)
    assert logits.shape == (ways * shots, ways)
    with pytest.raises(ValueError, match="has_state=True"):
        learner.meta_loss(theta, task)


def test_non_float_params_name_their_key_path_at_init_and_in_meta_value_and_grad():
    theta, _, tasks = setup()
    learner = maml_jax.maml(_plain_loss, inner_lr=ALPHA, num_inner_steps=K)
    bad = {**theta, "b2": jnp.zeros(1, jnp.int32)}
    with pytest.raises(TypeError, match=r"params\['b2'\]"):
        learner.init(bad)
    with pytest.raises(TypeError, match=r"params\['b2'\]"):
        core.meta_value_and_grad(learner, bad, tasks)
    with pytest.raises(TypeError, match=r"params\['b2'\]"):
        maml_jax.protonet(lambda p, x: x, ways=2).init(bad)


def _per_step_setup(k=2):
    model = maml_jax.Conv4(
        num_classes=3, filters=4, norm="running", per_step_norm=k + 1, conv_impl="lax"
    )
    key = jax.random.key(5)
    x = jax.random.normal(key, (2, 6, 12, 12, 1), jnp.float32)
    labels = jnp.tile(jnp.arange(3), 2)
    tasks = maml_jax.TaskBatch(
        support=(x, jnp.stack([labels, labels])),
        query=(x[:, ::-1] * 0.7, jnp.stack([labels, labels])),
    )
    variables = model.init(jax.random.key(6), x[0])
    params = variables.pop("params")
    return model, params, dict(variables), tasks


def test_per_step_norm_threads_one_set_of_statistics_per_inner_step():
    k, alpha = 2, 0.1
    model, params, state, tasks = _per_step_setup(k)
    loss_fn = maml_jax.classification_loss(model.apply, stateful=True)
    learner = maml_jax.maml_plus_plus(
        loss_fn,
        inner_lr=alpha,
        num_inner_steps=k,
        learn_inner_lr=False,
        multi_step_loss=False,
        has_aux=True,
        has_state=True,
        per_step_norm=True,
    )
    task = one_task(tasks)
    loss, (_, new_state) = learner.meta_loss(params, task, state=state)

    phi, s = params, state
    for step in range(k):
        grads, s = jax.grad(
            lambda p, s=s, step=step: (lambda out: (out[0][0], out[1]))(
                loss_fn(p, s, task.support, training=True, step=step)
            ),
            has_aux=True,
        )(phi)
        phi = jax.tree.map(lambda p, g: p - alpha * g, phi, grads)
    (ref_loss, _), ref_state = loss_fn(phi, s, task.query, training=True, step=k)
    chex.assert_trees_all_close(loss, ref_loss, rtol=1e-5)
    chex.assert_trees_all_close(new_state, ref_state, rtol=1e-5, atol=1e-7)
    # Every step's slot moved, each by its own pass.
    means = new_state["batch_stats"]["norm0_mean"]
    assert means.shape == (k + 1, 4)
    assert all(not np.allclose(means[i], 0.0) for i in range(k + 1))
    assert params["norm0_offset"].shape == (k + 1, 4)

    # Evaluation: inference mode, the curve's point after j steps uses slot j.
    curve = learner.adaptation_curve(params, task, k, state=new_state)
    (pre, _), _ = loss_fn(params, new_state, task.query, training=False, step=0)
    np.testing.assert_allclose(curve["query_loss"][0], pre, rtol=1e-5)
    with pytest.raises(ValueError, match="has_state=True"):
        maml_jax.maml_plus_plus(
            loss_fn, inner_lr=0.1, num_inner_steps=1, per_step_norm=True
        )


def test_query_training_false_scores_the_query_as_evaluation_does():
    theta, state, tasks = setup()
    task = one_task(tasks)
    state = {"mean": jnp.full(8, 0.3), "var": jnp.full(8, 2.0)}
    learner = maml_jax.maml(
        stateful_loss,
        inner_lr=ALPHA,
        num_inner_steps=K,
        has_state=True,
        query_training=False,
    )
    (loss, (_, new_state)), grads = jax.value_and_grad(
        lambda t: learner.meta_loss(t, task, state=state), has_aux=True
    )(theta)
    (ref_loss, _), ref_grads = jax.value_and_grad(
        lambda t: reference_meta_loss(t, state, task, query_training=False),
        has_aux=True,
    )(theta)
    chex.assert_trees_all_close(loss, ref_loss, rtol=1e-12)
    chex.assert_trees_all_close(grads, ref_grads, rtol=1e-10, atol=1e-12)
    # The state moved with the support passes only.
    _, (_, after_support) = reference_meta_loss(theta, state, task)
    assert not np.allclose(new_state["mean"], state["mean"])
    assert not np.allclose(new_state["mean"], after_support["mean"])
    with pytest.raises(ValueError, match="has_state=True"):
        maml_jax.maml(
            stateful_loss, inner_lr=0.1, num_inner_steps=1, query_training=False
        )


def support_norm_loss(p, s, batch, *, training):
    """Batch norm whose state is the last training-mode batch's moments, left
    differentiable (as ``Conv4(norm="support")``)."""
    x, y = batch
    h = x @ p["w1"] + p["b1"][None]
    if training:
        s = {"mean": h.mean(0), "var": h.var(0)}
    scale = jax.lax.rsqrt(s["var"] + 1e-5) * p["gamma"]
    h = (h - s["mean"][None]) * scale[None] + p["beta"][None]
    out = (jax.nn.relu(h) @ p["w2"])[:, 0] + p["b2"]
    return jnp.mean((out - y) ** 2), s


def support_moments(p, x):
    """The support set's moments at ``p`` (written independently)."""
    h = x @ p["w1"] + p["b1"][None]
    return {"mean": h.mean(0), "var": h.var(0)}


def test_query_state_support_normalises_the_query_with_the_adapted_support_moments():
    """meta-training, evaluate and predict score the query set in inference
    mode at the moments of the support set at the adapted parameters; the
    meta-gradient flows through those moments (checked against a hand-unrolled
    loop and finite differences)."""
    theta, state, tasks = setup()
    task = one_task(tasks)
    learner = maml_jax.maml(
        support_norm_loss,
        inner_lr=ALPHA,
        num_inner_steps=K,
        has_state=True,
        query_training=False,
        query_state="support",
    )

    def inner_step(p, t):
        g = jax.grad(lambda q: support_norm_loss(q, state, t.support, training=True)[0])
        return jax.tree.map(lambda a, b: a - ALPHA * b, p, g(p))

    def reference(t):
        phi = t
        for _ in range(K):
            phi = inner_step(phi, task)
        moments = support_moments(phi, task.support[0])
        return support_norm_loss(phi, moments, task.query, training=False)[0]

    (loss, _), grads = jax.value_and_grad(
        lambda t: learner.meta_loss(t, task, state=state), has_aux=True
    )(theta)
    ref_loss, ref_grads = jax.value_and_grad(reference)(theta)
    chex.assert_trees_all_close(loss, ref_loss, rtol=1e-12)
    chex.assert_trees_all_close(grads, ref_grads, rtol=1e-10, atol=1e-12)
    # The gradient through the moments is there: stopping it changes the result.
    stopped = jax.grad(
        lambda t: support_norm_loss(
            inner_step(inner_step(t, task), task),
            jax.lax.stop_gradient(
                support_moments(inner_step(inner_step(t, task), task), task.support[0])
            ),
            task.query,
            training=False,
        )[0]
    )(theta)
    assert not np.allclose(stopped["w1"], ref_grads["w1"])
    f = lambda w1: learner.meta_loss({**theta, "w1": w1}, task, state=state)[0]
    jax.test_util.check_grads(f, (theta["w1"],), order=1, modes=("rev",))

    # adapt returns the moments at the adapted parameters; predict uses them.
    phi, moments = learner.adapt(theta, task.support, state=state)
    chex.assert_trees_all_close(
        moments, support_moments(phi, task.support[0]), rtol=1e-12
    )
    apply_fn = lambda p, s, x: support_norm_loss(
        p, s, (x, jnp.zeros(len(x))), training=False
    )[0]
    out = maml_jax.predict(
        learner, theta, task.support, task.query[0], apply_fn=apply_fn, state=state
    )
    chex.assert_trees_all_close(out, apply_fn(phi, moments, task.query[0]))

    # evaluate: after k steps, the support moments at φ_k.
    curves = maml_jax.evaluate(learner, theta, tasks, num_steps=K, state=state)
    for i in range(2):
        t_i, phi_k = one_task(tasks, i), theta
        for k in range(K + 1):
            m = support_moments(phi_k, t_i.support[0])
            q = support_norm_loss(phi_k, m, t_i.query, training=False)[0]
            np.testing.assert_allclose(curves["query_loss"][i, k], q, rtol=1e-10)
            phi_k = inner_step(phi_k, t_i)


def test_query_state_is_checked():
    with pytest.raises(ValueError, match="query_state must be one of"):
        maml_jax.maml(
            stateful_loss,
            inner_lr=0.1,
            num_inner_steps=1,
            has_state=True,
            query_state="query",
        )
    with pytest.raises(ValueError, match="query_state='support' needs has_state"):
        maml_jax.maml(
            stateful_loss, inner_lr=0.1, num_inner_steps=1, query_state="support"
        )
