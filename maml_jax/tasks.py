"""Task families sampled on device from a PRNG key (jit- and vmap-friendly)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from maml_jax import _validation
from maml_jax.types import TaskBatch

AMPLITUDE_RANGE = (0.1, 5.0)
PHASE_RANGE = (0.0, jnp.pi)
INPUT_RANGE = (-5.0, 5.0)


class SinusoidParams(NamedTuple):
    """Amplitudes and phases of a batch of sinusoids ``y = A sin(x − φ)``.

    Attributes:
      amplitude: shape ``(num_tasks,)``.
      phase: shape ``(num_tasks,)``.
    """

    amplitude: jax.Array
    phase: jax.Array


def sample_sinusoid_params(key: jax.Array, num_tasks: int) -> SinusoidParams:
    """Samples ``A ~ U[0.1, 5]`` and ``φ ~ U[0, π]`` (the MAML paper's ranges)."""
    num_tasks = _validation.check_positive_int("num_tasks", num_tasks)
    key_a, key_p = jax.random.split(key)
    amplitude = jax.random.uniform(
        key_a, (num_tasks,), minval=AMPLITUDE_RANGE[0], maxval=AMPLITUDE_RANGE[1]
    )
    phase = jax.random.uniform(
        key_p, (num_tasks,), minval=PHASE_RANGE[0], maxval=PHASE_RANGE[1]
    )
    return SinusoidParams(amplitude, phase)


def sinusoid(params: SinusoidParams, x: jax.Array) -> jax.Array:
    """Evaluates each task's sinusoid: ``x`` of shape ``(num_tasks, n, 1)``."""
    return params.amplitude[:, None, None] * jnp.sin(x - params.phase[:, None, None])


def sinusoid_tasks(
    key: jax.Array, params: SinusoidParams, num_support: int, num_query: int
) -> TaskBatch:
    """Draws support and query inputs ``x ~ U[−5, 5]`` for given sinusoids.

    Returns:
      A ``TaskBatch`` whose support and query are ``(x, y)`` with shapes
      ``(num_tasks, num_support, 1)`` and ``(num_tasks, num_query, 1)``.
    """
    num_support = _validation.check_positive_int("num_support", num_support)
    num_query = _validation.check_positive_int("num_query", num_query)
    num_tasks = params.amplitude.shape[0]
    x = jax.random.uniform(
        key,
        (num_tasks, num_support + num_query, 1),
        minval=INPUT_RANGE[0],
        maxval=INPUT_RANGE[1],
    )
    y = sinusoid(params, x)
    split = lambda a: (a[:, :num_support], a[:, num_support:])
    (xs, xq), (ys, yq) = split(x), split(y)
    return TaskBatch(support=(xs, ys), query=(xq, yq))


def sample_sinusoid_tasks(
    key: jax.Array, num_tasks: int, num_support: int, num_query: int
) -> TaskBatch:
    """Samples a batch of sinusoid regression tasks (Finn et al. 2017, Sec. 5.1).

    Returns:
      A ``TaskBatch`` whose support and query are ``(x, y)`` with shapes
      ``(num_tasks, num_support, 1)`` and ``(num_tasks, num_query, 1)``.

    Examples:
      >>> import jax
      >>> tasks = sample_sinusoid_tasks(jax.random.key(0), 25, 10, 10)
      >>> tasks.support[0].shape, tasks.query[1].shape
      ((25, 10, 1), (25, 10, 1))
    """
    num_tasks = _validation.check_positive_int("num_tasks", num_tasks)
    num_support = _validation.check_positive_int("num_support", num_support)
    num_query = _validation.check_positive_int("num_query", num_query)
    # One uniform draw for amplitudes, phases and inputs: each draw is a rolled
    # threefry loop on CPU, and three of them weigh on a meta-step this small.
    u = jax.random.uniform(key, (num_tasks, 2 + num_support + num_query))
    scale = lambda v, bounds: bounds[0] + (bounds[1] - bounds[0]) * v
    params = SinusoidParams(
        amplitude=scale(u[:, 0], AMPLITUDE_RANGE), phase=scale(u[:, 1], PHASE_RANGE)
    )
    x = scale(u[:, 2:, None], INPUT_RANGE)
    y = sinusoid(params, x)
    split = lambda a: (a[:, :num_support], a[:, num_support:])
    (xs, xq), (ys, yq) = split(x), split(y)
    return TaskBatch(support=(xs, ys), query=(xq, yq))
