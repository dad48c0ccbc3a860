"""Tests for the on-device sinusoid task family."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import maml_jax


def test_sinusoid_tasks_shapes_ranges_and_targets():
    tasks = maml_jax.sample_sinusoid_tasks(jax.random.key(0), 1000, 10, 7)
    (xs, ys), (xq, yq) = tasks.support, tasks.query
    assert xs.shape == ys.shape == (1000, 10, 1)
    assert xq.shape == yq.shape == (1000, 7, 1)
    assert float(xs.min()) >= -5 and float(xs.max()) <= 5
    sines = maml_jax.sample_sinusoid_params(jax.random.key(0), 1000)
    assert 0.1 <= float(sines.amplitude.min()) and float(sines.amplitude.max()) <= 5
    assert 0 <= float(sines.phase.min()) and float(sines.phase.max()) <= np.pi
    # Support and query points of a task lie on one sinusoid with |y| <= A.
    amplitude = np.abs(np.concatenate([ys, yq], axis=1)).max(axis=(1, 2))
    assert np.all(amplitude <= 5.0 + 1e-6)


def test_sinusoid_follows_the_formula():
    sines = maml_jax.SinusoidParams(jnp.array([2.0, 0.5]), jnp.array([0.3, 1.0]))
    x = jnp.linspace(-5, 5, 11)[None, :, None].repeat(2, axis=0)
    y = maml_jax.sinusoid(sines, x)
    np.testing.assert_allclose(y[0, :, 0], 2.0 * np.sin(x[0, :, 0] - 0.3), rtol=1e-6)
    np.testing.assert_allclose(y[1, :, 0], 0.5 * np.sin(x[1, :, 0] - 1.0), rtol=1e-6)


def test_sampling_is_deterministic_and_works_inside_jit():
    sample = jax.jit(lambda k: maml_jax.sample_sinusoid_tasks(k, 4, 5, 5))
    a, b = sample(jax.random.key(3)), sample(jax.random.key(3))
    c = sample(jax.random.key(4))
    np.testing.assert_array_equal(a.support[0], b.support[0])
    assert not np.allclose(a.support[0], c.support[0])
    eager = maml_jax.sample_sinusoid_tasks(jax.random.key(3), 4, 5, 5)
    np.testing.assert_allclose(a.query[1], eager.query[1], rtol=1e-6)


@pytest.mark.parametrize("bad", [0, -2])
def test_bad_sizes_are_reported(bad):
    with pytest.raises(ValueError, match="num_support must be >= 1"):
        maml_jax.sample_sinusoid_tasks(jax.random.key(0), 4, bad, 5)
    with pytest.raises(ValueError, match="num_tasks must be >= 1"):
        maml_jax.sample_sinusoid_tasks(jax.random.key(0), bad, 5, 5)
