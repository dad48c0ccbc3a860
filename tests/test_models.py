"""Tests for the bundled Flax models and the loss adapters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import maml_jax


def test_mlp_shapes():
    model = maml_jax.MLP(hidden_sizes=(40, 40), output_size=3)
    params = model.init(jax.random.key(0), jnp.zeros((1, 2)))["params"]
    assert params["Dense_0"]["kernel"].shape == (2, 40)
    assert params["Dense_2"]["kernel"].shape == (40, 3)
    assert model.apply({"params": params}, jnp.ones((7, 2))).shape == (7, 3)


def test_regression_loss_is_mse_and_rejects_mismatched_targets():
    model = maml_jax.MLP(hidden_sizes=(4,))
    params = model.init(jax.random.key(0), jnp.zeros((1, 1)))["params"]
    loss_fn = maml_jax.regression_loss(model.apply)
    x, y = jnp.linspace(-1, 1, 6)[:, None], jnp.ones((6, 1))
    pred = model.apply({"params": params}, x)
    np.testing.assert_allclose(loss_fn(params, (x, y)), jnp.mean((pred - y) ** 2))
    with pytest.raises(ValueError, match="targets have shape"):
        loss_fn(params, (x, jnp.ones((6,))))
    with pytest.raises(TypeError, match="expected a batch"):
        loss_fn(params, x)


def test_classification_loss_scales_and_reports_accuracy():
    apply_fn = lambda variables, x: x @ variables["params"]
    w = jnp.eye(3)
    x = jnp.array([[2.0, 0, 0], [0, 2.0, 0], [0, 0, 2.0], [2.0, 0, 0]])
    labels = jnp.array([0, 1, 2, 1])
    loss, aux = maml_jax.classification_loss(apply_fn)(w, (x, labels))
    scaled, _ = maml_jax.classification_loss(apply_fn, loss_scale=5.0)(w, (x, labels))
    np.testing.assert_allclose(aux["accuracy"], 0.75)
    np.testing.assert_allclose(scaled, 5.0 * loss, rtol=1e-6)
    logp = jax.nn.log_softmax(x)
    np.testing.assert_allclose(loss, -jnp.mean(logp[jnp.arange(4), labels]), rtol=1e-6)
    with pytest.raises(ValueError, match="integer labels"):
        maml_jax.classification_loss(apply_fn)(w, (x, labels[:2]))


def test_core_meta_learns_with_flax_mlp_under_jit():
    model = maml_jax.MLP(hidden_sizes=(8,))
    params = model.init(jax.random.key(0), jnp.zeros((1, 1)))["params"]
    learner = maml_jax.maml(
        maml_jax.regression_loss(model.apply), inner_lr=0.01, num_inner_steps=2
    )
    tasks = maml_jax.sample_sinusoid_tasks(jax.random.key(1), 3, 5, 5)
    (loss, aux), grads = jax.jit(
        lambda p, t: maml_jax.meta_value_and_grad(learner, p, t)
    )(params, tasks)
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    assert aux["query_loss_post"].shape == (3,)
