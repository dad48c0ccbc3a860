"""Tests for ``Task`` / ``TaskBatch``: building batches and telling the two apart."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import maml_jax
from maml_jax import Task, TaskBatch
from tests import helpers


def _learner():
    return maml_jax.maml(helpers.linear_loss, inner_lr=0.1, num_inner_steps=1)


def test_stack_and_unstack_tasks_round_trip():
    batch = helpers.linear_tasks(jax.random.key(0), num_tasks=3)
    tasks = maml_jax.unstack_tasks(batch)
    assert len(tasks) == 3 and all(type(t) is Task for t in tasks)
    assert tasks[1].support[0].shape == (6, 3)
    chex.assert_trees_all_equal(tasks[2], helpers.task_at(batch, 2))
    restacked = maml_jax.stack_tasks(tasks)
    assert type(restacked) is TaskBatch
    chex.assert_trees_all_equal(restacked, batch)


def test_stack_tasks_of_one_task_gives_the_same_meta_loss_as_the_task():
    task = helpers.task_at(helpers.linear_tasks(jax.random.key(1)), 0)
    batch = maml_jax.stack_tasks([task])
    assert batch.query[0].shape == (1, 8, 3)
    (loss, _), grads = maml_jax.meta_value_and_grad(_learner(), jnp.ones(3), batch)
    ref_loss, ref_grads = jax.value_and_grad(
        lambda w: _learner().meta_loss(w, task)[0]
    )(jnp.ones(3))
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-12)
    np.testing.assert_allclose(grads, ref_grads, rtol=1e-12)


def test_stack_tasks_rejects_no_tasks_and_batches():
    batch = helpers.linear_tasks(jax.random.key(0))
    with pytest.raises(ValueError, match="at least one Task"):
        maml_jax.stack_tasks([])
    with pytest.raises(TypeError, match="item 1 is a TaskBatch"):
        maml_jax.stack_tasks([helpers.task_at(batch, 0), batch])
    with pytest.raises(TypeError, match="takes a maml_jax.TaskBatch; got Task"):
        maml_jax.unstack_tasks(helpers.task_at(batch, 0))


def test_task_batch_works_under_jit_and_vmap():
    learner, w = _learner(), jnp.ones(3)
    batches = [helpers.linear_tasks(jax.random.key(i), num_tasks=2) for i in (2, 3)]
    # Under jit: a TaskBatch argument, and stack_tasks / unstack_tasks traced.
    restack = jax.jit(lambda b: maml_jax.stack_tasks(maml_jax.unstack_tasks(b)))
    assert type(restack(batches[0])) is TaskBatch
    chex.assert_trees_all_equal(restack(batches[0]), batches[0])
    step = jax.jit(lambda w, b: maml_jax.meta_value_and_grad(learner, w, b)[1])
    expected = [maml_jax.meta_value_and_grad(learner, w, b)[1] for b in batches]
    np.testing.assert_allclose(step(w, batches[0]), expected[0], rtol=1e-12)
    # Under vmap over a leading axis of batches: vmap keeps the TaskBatch type.
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *batches)
    assert type(stacked) is TaskBatch
    grads = jax.vmap(lambda b: maml_jax.meta_value_and_grad(learner, w, b)[1])(stacked)
    np.testing.assert_allclose(grads, np.stack(expected), rtol=1e-12)


def test_a_single_task_is_refused_where_a_batch_is_expected():
    # The case: one task without a task axis used to run silently as ten
    # one-example tasks (loss 0.706).
    x = jnp.linspace(-1.0, 1.0, 10)[:, None]
    task = Task(support=(x, x[:, 0]), query=(x, x[:, 0]))
    learner, w = _learner(), jnp.zeros(1)
    single = "got a single Task; pass a TaskBatch.*stack_tasks\\(\\[task\\]\\)"
    with pytest.raises(TypeError, match=f"meta_value_and_grad {single}"):
        maml_jax.meta_value_and_grad(learner, w, task)
    with pytest.raises(TypeError, match=f"evaluate {single}"):
        maml_jax.evaluate(learner, w, task, num_steps=1)
    with pytest.raises(TypeError, match=f"auto_batching {single}"):
        maml_jax.auto_batching(task)
    # Batched, the same task runs.
    (loss, _), _ = maml_jax.meta_value_and_grad(
        learner, w, maml_jax.stack_tasks([task])
    )
    assert loss.shape == ()


def test_a_batch_is_refused_where_one_task_is_expected():
    batch = helpers.linear_tasks(jax.random.key(0))
    learner = _learner()
    match = "meta_loss takes one maml_jax.Task and got a TaskBatch.*unstack_tasks"
    with pytest.raises(TypeError, match=match):
        learner.meta_loss(jnp.zeros(3), batch)
    with pytest.raises(TypeError, match="adaptation_curve takes one maml_jax.Task"):
        learner.adaptation_curve(jnp.zeros(3), batch, 1)


def test_samplers_return_task_batches():
    sines = maml_jax.sample_sinusoid_tasks(jax.random.key(0), 3, 2, 2)
    params = maml_jax.sample_sinusoid_params(jax.random.key(0), 3)
    data = jnp.zeros((6, 4, 8, 8, 1))
    spec = maml_jax.EpisodeSpec(2, 1, 1)
    episodes = maml_jax.sample_episodes(jax.random.key(0), data, spec, 3)
    assert type(sines) is TaskBatch
    assert type(maml_jax.sinusoid_tasks(jax.random.key(0), params, 2, 2)) is TaskBatch
    assert type(episodes) is TaskBatch
    assert type(maml_jax.sample_episode(jax.random.key(0), data, spec)) is Task
