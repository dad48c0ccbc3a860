"""Evaluation: adaptation curves on fixed test tasks, summarised with 95% CIs."""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import numpy as np

from maml_jax import _validation
from maml_jax.metrics import mean_ci95
from maml_jax.types import MetaLearner, MetaParams, ModelState, Task, TaskBatch


def evaluate(
    learner: MetaLearner,
    meta_params: MetaParams,
    tasks: TaskBatch,
    *,
    num_steps: int,
    batch_size: int | None = None,
    state: ModelState = None,
) -> dict[str, np.ndarray]:
    """Adaptation curves on a fixed set of test tasks (runs jitted, on device).

    Args:
      learner: the learner whose ``adaptation_curve`` is evaluated.
      meta_params: meta-parameters to adapt from.
      tasks: a ``TaskBatch`` of test tasks (leading task axis of length ``T``).
      num_steps: inner steps at test time (the curve covers ``0..num_steps``).
      batch_size: tasks evaluated at once (bounds memory); default all.
      state: the model state (e.g. ``train_state.model_state``) of a learner
        built with ``has_state=True``; the support passes run as in meta-training
        (batch statistics) and the query set in inference mode (e.g.
        BatchNorm with its running averages) on support and query sets.

    Returns:
      Per-task arrays of shape ``(T, num_steps + 1)`` for each metric (e.g.
      ``query_loss``, ``query_accuracy``), as NumPy arrays.
    """
    num_tasks = _validation.check_task_batch(tasks, "evaluate")
    num_steps = _validation.check_positive_int("num_steps", num_steps)
    batch_size = num_tasks if batch_size is None else min(batch_size, num_tasks)
    if learner.has_state and state is None:
        raise ValueError(
            "The learner was built with has_state=True: pass the model state to "
            "evaluate (state=train_state.model_state)."
        )
    if not learner.has_state and state is not None:
        raise ValueError(
            "evaluate got a model state, but the learner was built without "
            "has_state=True, so its loss takes none."
        )
    curves = _evaluate_jit(learner, meta_params, tasks, num_steps, batch_size, state)
    return {k: np.asarray(v) for k, v in curves.items()}


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _evaluate_jit(learner, meta_params, tasks, num_steps, batch_size, state):
    kwargs = {"state": state} if learner.has_state else {}
    curve = functools.partial(learner.adaptation_curve, num_steps=num_steps, **kwargs)
    # lax.map hands each task over as a TaskBatch slice; the learner takes a Task.
    return jax.lax.map(
        lambda task: curve(meta_params, Task(*task)), tasks, batch_size=batch_size
    )


def summarize_curves(curves: Mapping[str, np.ndarray]) -> dict[str, list[float]]:
    """``{metric: per-step mean}`` and ``{metric_ci95: per-step half-width}``."""
    summary = {}
    for name, values in curves.items():
        mean, ci = mean_ci95(values, axis=0)
        summary[name] = mean.tolist()
        summary[f"{name}_ci95"] = ci.tolist()
    return summary
