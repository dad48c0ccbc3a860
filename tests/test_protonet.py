"""Exactness, transformation, training and input-checking tests for ProtoNets."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.test_util import check_grads

import maml_jax
from maml_jax import Task, TaskBatch, class_prototypes, protonet, prototype_logits
from tests import helpers

WAYS, SHOTS, QUERIES, DIM, EMBED = 4, 3, 5, 6, 5


def linear_embed(w, x):
    return x @ w


def _w(seed=0, dim=DIM, embed=EMBED):
    return jax.random.normal(jax.random.key(seed), (dim, embed), jnp.float64)


@functools.partial(
    jax.jit, static_argnames=("num_tasks", "ways", "shots", "queries", "dim", "signal")
)
def cluster_tasks(
    key, num_tasks, *, ways=WAYS, shots=SHOTS, queries=QUERIES, dim=DIM, signal=3
):
    """Gaussian-cluster N-way tasks, sampled on device (jit/vmap-friendly).

    Each task draws ``ways`` class centres that are non-zero only in the first
    ``signal`` coordinates; points are centre plus noise that is small there and
    large in the other (nuisance) coordinates, so a good embedding keeps the
    signal coordinates and discards the rest. Labels are 0..ways-1, grouped by
    class, as ``sample_episodes`` lays them out.
    """
    noise_scale = jnp.where(jnp.arange(dim) < signal, 0.3, 2.0)
    signal_mask = (jnp.arange(dim) < signal).astype(jnp.float64)

    def one(k):
        kc, ks, kq = jax.random.split(k, 3)
        centres = jax.random.normal(kc, (ways, dim), jnp.float64) * signal_mask[None]

        def points(k, n):
            noise = jax.random.normal(k, (ways, n, dim), jnp.float64)
            x = centres[:, None, :] + noise * noise_scale[None, None, :]
            labels = jnp.broadcast_to(jnp.arange(ways)[:, None], (ways, n))
            return x.reshape(ways * n, dim), labels.reshape(ways * n)

        return Task(support=points(ks, shots), query=points(kq, queries))

    return TaskBatch(*jax.vmap(one)(jax.random.split(key, num_tasks)))


def _tasks(seed=0):
    """Three default-shaped tasks (one compiled sampler shared by most tests)."""
    return cluster_tasks(jax.random.key(seed), 3)


def _task(seed=0):
    return helpers.task_at(_tasks(seed), 0)


def _log_softmax(logits):
    logits = logits - logits.max(axis=1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))


def _reference(emb_s, y_s, emb_q, y_q, ways, distance="sqeuclidean", scale=1.0):
    """Prototypes, query loss and query accuracy by Python loops in NumPy."""
    emb_s, emb_q = np.asarray(emb_s), np.asarray(emb_q)
    protos = np.zeros((ways, emb_s.shape[1]))
    for k in range(ways):
        members = [emb_s[i] for i in range(len(y_s)) if int(y_s[i]) == k]
        if members:
            protos[k] = sum(members) / len(members)
    logits = np.zeros((len(y_q), ways))
    for i in range(len(y_q)):
        for k in range(ways):
            z, c = emb_q[i], protos[k]
            if distance == "sqeuclidean":
                d = float(np.sum((z - c) ** 2))
            else:
                d = 1.0 - float(z @ c / (np.linalg.norm(z) * np.linalg.norm(c)))
            logits[i, k] = -scale * d
    log_p = _log_softmax(logits)
    loss = -np.mean([log_p[i, int(y_q[i])] for i in range(len(y_q))])
    accuracy = np.mean(np.argmax(logits, axis=1) == np.asarray(y_q))
    return protos, loss, accuracy


# --- exactness against hand computations ------------------------------------------


def test_prototypes_equal_class_means_with_shuffled_support():
    task = _task(seed=1)
    x, y = task.support
    perm = jax.random.permutation(jax.random.key(2), x.shape[0])
    x, y = x[perm], y[perm]
    w = _w()
    learner = protonet(linear_embed, ways=WAYS)
    assert learner.adapt(w, (x, y)) is w
    protos = class_prototypes(x @ w, y, WAYS)

    expected, _, _ = _reference(x @ w, y, x[:1] @ w, y[:1], WAYS)
    assert protos.shape == (WAYS, EMBED) and protos.dtype == jnp.float64
    np.testing.assert_allclose(protos, expected, rtol=0, atol=1e-12)
    # predict classifies by negative squared distances to those prototypes.
    logits = maml_jax.predict(learner, w, (x, y), x[:3])
    distances = ((np.asarray(x[:3] @ w)[:, None] - expected[None]) ** 2).sum(-1)
    np.testing.assert_allclose(logits, -distances, rtol=1e-12, atol=1e-12)


def test_prototypes_with_unbalanced_shots_and_an_empty_class():
    emb = jax.random.normal(jax.random.key(3), (7, 4), jnp.float64)
    labels = jnp.array([2, 0, 2, 2, 0, 1, 2])
    protos = class_prototypes(emb, labels, 4)
    expected, _, _ = _reference(emb, labels, emb[:1], labels[:1], 4)
    np.testing.assert_allclose(protos, expected, rtol=0, atol=1e-12)
    # Class 3 has no support example: its prototype is zero, not NaN.
    np.testing.assert_array_equal(protos[3], np.zeros(4))


def test_empty_class_keeps_loss_and_gradient_finite():
    task = _task(seed=4)
    learner = protonet(linear_embed, ways=WAYS + 1)  # class WAYS never appears
    (loss, _), grads = jax.jit(jax.value_and_grad(learner.meta_loss, has_aux=True))(
        _w(), task
    )
    assert np.isfinite(loss) and np.all(np.isfinite(grads))


@pytest.mark.parametrize(
    "distance,scale", [("sqeuclidean", 1.0), ("cosine", 1.0), ("cosine", 10.0)]
)
def test_loss_and_aux_match_hand_computation(distance, scale):
    task = _task(seed=5)
    w = _w(seed=6)
    learner = protonet(linear_embed, ways=WAYS, distance=distance, scale=scale)
    loss, aux = learner.meta_loss(w, task)

    (xs, ys), (xq, yq) = task.support, task.query
    _, q_loss, q_acc = _reference(xs @ w, ys, xq @ w, yq, WAYS, distance, scale)
    _, s_loss, _ = _reference(xs @ w, ys, xs @ w, ys, WAYS, distance, scale)
    np.testing.assert_allclose(loss, q_loss, rtol=1e-12)
    expected_aux = {
        "support_loss": s_loss,
        "query_loss": q_loss,
        "query_accuracy": q_acc,
    }
    assert set(aux) == {f"{k}_{s}" for k in expected_aux for s in ("pre", "post")}
    for name, value in expected_aux.items():
        # No inner step: the metrics before and after adaptation are the same.
        np.testing.assert_allclose(aux[f"{name}_pre"], value, rtol=1e-12)
        np.testing.assert_allclose(aux[f"{name}_post"], value, rtol=1e-12)


def test_accuracy_on_a_separable_toy_case():
    support = (jnp.array([[0.0, 0.0], [0.0, 2.0], [5.0, 0.0], [5.0, 2.0]]),)
    support += (jnp.array([0, 0, 1, 1]),)
    xq = jnp.array([[0.5, 1.0], [4.5, 1.0], [1.0, 0.0], [6.0, 3.0]])
    learner = protonet(linear_embed, ways=2)
    w = jnp.eye(2)
    _, aux = learner.meta_loss(w, Task(support, (xq, jnp.array([0, 1, 0, 1]))))
    assert float(aux["query_accuracy_post"]) == 1.0
    # Swapping the labels of two query points halves the accuracy.
    _, aux = learner.meta_loss(w, Task(support, (xq, jnp.array([1, 0, 0, 1]))))
    assert float(aux["query_accuracy_post"]) == 0.5


def test_cosine_logits_ignore_embedding_scale_and_zero_vectors():
    emb = jax.random.normal(jax.random.key(7), (5, 3), jnp.float64)
    protos = jax.random.normal(jax.random.key(8), (4, 3), jnp.float64)
    logits = prototype_logits(emb, protos, "cosine")
    np.testing.assert_allclose(
        prototype_logits(3.0 * emb, 0.5 * protos, "cosine"), logits, rtol=1e-12
    )
    assert bool(jnp.all((logits >= -2 - 1e-12) & (logits <= 1e-12)))
    zero = prototype_logits(emb, jnp.zeros((1, 3)), "cosine")
    np.testing.assert_array_equal(zero, -np.ones((5, 1)))


def test_float32_stays_float32():
    task = jax.tree.map(
        lambda a: a.astype(jnp.float32) if a.dtype == jnp.float64 else a, _task()
    )
    loss, aux = protonet(linear_embed, ways=WAYS).meta_loss(
        _w().astype(jnp.float32), task
    )
    assert loss.dtype == jnp.float32


@pytest.mark.parametrize("distance", ["sqeuclidean", "cosine"])
def test_meta_gradient_matches_finite_differences(distance):
    task = _task(seed=9)
    learner = protonet(linear_embed, ways=WAYS, distance=distance)
    check_grads(
        lambda w: learner.meta_loss(w, task)[0],
        (_w(seed=10),),
        order=1,
        modes=("rev",),
        atol=1e-6,
        rtol=1e-6,
    )


# --- the shared machinery: meta_value_and_grad, jit, evaluate, train loop ----------


def test_vmap_over_tasks_equals_python_loop():
    tasks = _tasks(seed=11)
    w = _w()
    learner = protonet(linear_embed, ways=WAYS)
    (loss, aux), grads = maml_jax.meta_value_and_grad(learner, w, tasks)

    one_task = jax.jit(jax.value_and_grad(lambda p, t: learner.meta_loss(p, t)[0]))
    per_task = [one_task(w, helpers.task_at(tasks, i)) for i in range(3)]
    np.testing.assert_allclose(loss, np.mean([v for v, _ in per_task]), rtol=1e-12)
    np.testing.assert_allclose(
        grads, np.mean([g for _, g in per_task], axis=0), rtol=1e-12, atol=1e-14
    )
    assert aux["query_accuracy_post"].shape == (3,)


def test_jit_equals_no_jit_and_traces_once():
    learner = protonet(linear_embed, ways=WAYS)
    hash(learner)  # usable as a static argument

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(w, tasks):
        return maml_jax.meta_value_and_grad(learner, w, tasks)

    for seed in range(2):
        tasks = _tasks(seed)
        (loss, _), grads = step(_w(), tasks)
        (ref_loss, _), ref_grads = maml_jax.meta_value_and_grad(learner, _w(), tasks)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-12)
        np.testing.assert_allclose(grads, ref_grads, rtol=1e-10, atol=1e-14)


def test_adaptation_curve_is_constant_and_evaluate_works():
    tasks = _tasks(seed=12)
    learner = protonet(linear_embed, ways=WAYS)
    curves = maml_jax.evaluate(learner, _w(), tasks, num_steps=4, batch_size=2)
    assert set(curves) == {"support_loss", "query_loss", "query_accuracy"}
    for i in range(3):
        _, aux = learner.meta_loss(_w(), helpers.task_at(tasks, i))
        for name, values in curves.items():
            assert values.shape == (3, 5)
            np.testing.assert_allclose(values[i], aux[f"{name}_post"], rtol=1e-12)


def test_meta_loss_decreases_on_gaussian_clusters():
    model = maml_jax.MLP(hidden_sizes=(16,), output_size=8)
    params = model.init(jax.random.key(0), jnp.zeros((1, DIM)))["params"]

    def embed_fn(p, x):
        return model.apply({"params": p}, x)

    learner = protonet(embed_fn, ways=5)
    state = maml_jax.MetaTrainState.create(
        params=params, learner=learner, tx=optax.adam(1e-2)
    )
    sampler = functools.partial(cluster_tasks, num_tasks=8, ways=5, shots=2)
    run = jax.jit(maml_jax.scan_train_steps, static_argnums=(2, 3))
    state, metrics = run(state, jax.random.key(1), sampler, 50)

    loss, acc = metrics["loss"], metrics["query_accuracy_post"]
    assert loss.shape == (50,) and bool(jnp.all(jnp.isfinite(loss)))
    # Noisy per-batch losses: compare means of the first and last ten steps.
    # Seeds 0-2 give ratios 0.12-0.22 and accuracy gains 0.36-0.40.
    assert loss[-10:].mean() < 0.5 * loss[:10].mean()
    assert acc[-10:].mean() > acc[:10].mean() + 0.2


class _Flatten(nn.Module):
    """A tiny image embedding: flatten, then one dense layer."""

    features: int = 16

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.features)(x.reshape(x.shape[0], -1))


def test_smoke_on_image_episodes():
    model = _Flatten()
    data = jax.random.uniform(jax.random.key(0), (8, 6, 28, 28, 1), jnp.float32)
    spec = maml_jax.EpisodeSpec(ways=5, shots=1, queries=2)
    sample = jax.jit(maml_jax.sample_episodes, static_argnums=(2, 3))
    tasks = sample(jax.random.key(1), data, spec, 2)
    params = model.init(jax.random.key(2), data[0])["params"]
    learner = protonet(lambda p, x: model.apply({"params": p}, x), ways=spec.ways)
    state = maml_jax.MetaTrainState.create(
        params=params, learner=learner, tx=optax.adam(1e-3)
    )
    state, metrics = maml_jax.meta_train_step(state, tasks)
    assert int(state.step) == 1
    assert np.isfinite(float(metrics["loss"]))
    assert 0.0 <= float(metrics["query_accuracy_post"]) <= 1.0


# --- clear errors on bad input ----------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"ways": 0}, ValueError, "ways must be >= 1"),
        ({"ways": 2.0}, TypeError, "ways must be an int"),
        ({"ways": True}, TypeError, "ways must be an int"),
        ({"ways": 2, "distance": "l1"}, ValueError, "distance must be one of"),
        ({"ways": 2, "scale": 0.0}, ValueError, "scale must be a finite"),
        ({"ways": 2, "scale": float("inf")}, ValueError, "scale must be a finite"),
        ({"ways": 2, "scale": jnp.ones(())}, TypeError, "scale must be a Python"),
    ],
)
def test_bad_constructor_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        protonet(linear_embed, **kwargs)


def test_embed_fn_must_be_callable():
    with pytest.raises(TypeError, match="embed_fn must be a function"):
        protonet(None, ways=2)
    with pytest.raises(TypeError, match="ways"):
        protonet(linear_embed)  # ways is required


def _replace(task, part, index, value):
    batch = list(getattr(task, part))
    batch[index] = value
    return task._replace(**{part: tuple(batch)})


def test_bad_tasks_are_reported():
    learner = protonet(linear_embed, ways=WAYS)
    task, w = _task(), _w()
    (xs, ys), (xq, yq) = task.support, task.query
    cases = [
        (_replace(task, "query", 1, yq.astype(jnp.float64)), TypeError, "integers"),
        (_replace(task, "support", 1, jax.nn.one_hot(ys, WAYS)), TypeError, "argmax"),
        (_replace(task, "support", 1, ys[:, None]), ValueError, r"\(num_examples,\)"),
        (_replace(task, "support", 1, ys[:-1]), ValueError, "one row per label"),
        (_replace(task, "query", 0, xq[:, :-1]), ValueError, "support and query"),
        (Task(support=xs, query=xq), TypeError, "pair"),
        ((xs, ys), TypeError, "maml_jax.Task"),
        (Task(support=(xs, ys), query=[xq, yq]), ValueError, "pytree structure"),
    ]
    for bad, error, match in cases:
        with pytest.raises(error, match=match):
            learner.meta_loss(w, bad)
    with pytest.raises(ValueError, match="num_steps must be >= 1"):
        learner.adaptation_curve(w, task, 0)
    with pytest.raises(TypeError, match="integers"):
        learner.adapt(w, (xs, ys.astype(jnp.float32)))


def test_task_axis_left_on_a_single_task_call_is_reported():
    tasks = _tasks()
    learner = protonet(linear_embed, ways=WAYS)
    with pytest.raises(TypeError, match="got a TaskBatch.*meta_value_and_grad"):
        learner.meta_loss(_w(), tasks)
    # A Task built with the task axis left on is caught by its shapes.
    with pytest.raises(ValueError, match="meta_value_and_grad"):
        learner.meta_loss(_w(), Task(*tasks))


def test_embed_fn_with_wrong_output_rank_is_reported():
    learner = protonet(lambda w, x: jnp.sum(x @ w, axis=1), ways=WAYS)
    with pytest.raises(ValueError, match=r"\(num_examples, dim\)"):
        learner.meta_loss(_w(), _task())
    learner = protonet(lambda w, x: (x @ w > 0).astype(jnp.int32), ways=WAYS)
    with pytest.raises(TypeError, match="floating-point"):
        learner.meta_loss(_w(), _task())
