"""Timing of one compiled meta-train step, shared by the benchmark scripts."""

from __future__ import annotations

import time
from typing import Any, NamedTuple

import jax
import numpy as np

from maml_jax import train


class StepTiming(NamedTuple):
    """``compile_s``; ``times`` (seconds per step after one warm-up step); ``temp_mb``
    (the compiled step's temporary memory, if XLA reports it)."""

    compile_s: float
    times: np.ndarray
    temp_mb: float | None


def time_sampled_step(
    state: Any, sampler, repeats: int, steps_per_call: int = 1
) -> StepTiming:
    """Compiles on-device-sampled meta-train steps and times ``repeats`` calls.

    Each call runs ``steps_per_call`` meta-steps in one ``lax.scan`` (as ``fit``
    does); ``times`` are per meta-step (call time / ``steps_per_call``).
    """
    step = jax.jit(
        lambda s, k: train.scan_train_steps(s, k, sampler, steps_per_call),
        donate_argnums=0,
    )
    t0 = time.perf_counter()
    compiled = step.lower(state, jax.random.key(0)).compile()
    compile_s = time.perf_counter() - t0
    memory = compiled.memory_analysis()
    temp_mb = getattr(memory, "temp_size_in_bytes", 0) / 2**20 if memory else None
    state, metrics = compiled(state, jax.random.key(0))
    jax.block_until_ready(metrics)
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        state, metrics = compiled(state, jax.random.key(i + 1))
        jax.block_until_ready(metrics)
        times.append((time.perf_counter() - t0) / steps_per_call)
    return StepTiming(compile_s, np.asarray(times), temp_mb)


def median_call_seconds(call, repeats: int) -> float:
    """Median wall seconds of ``call(key)`` over ``repeats`` fresh PRNG keys, after
    one warm-up call (which compiles a jitted ``call``); blocks on each result."""
    jax.block_until_ready(call(jax.random.key(0)))
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(call(jax.random.key(i + 1)))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))
