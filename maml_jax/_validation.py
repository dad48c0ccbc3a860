"""Trace-time checks that turn common mistakes into clear errors.

All checks run on shapes and tree structures only, so they cost nothing at run
time and work under ``jit``, ``vmap`` and ``grad``.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp

from maml_jax.types import Aux, Task, TaskBatch


def check_positive_int(name: str, value: Any) -> int:
    """Returns ``value`` if it is an ``int >= 1``, else raises a ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= 1; got {value!r}.")
    if value < 1:
        raise ValueError(f"{name} must be >= 1; got {value}.")
    return int(value)


def check_learning_rate(name: str, value: Any) -> Any:
    """Checks a scalar or pytree learning rate; Python scalars must be finite, > 0."""
    if isinstance(value, bool):
        raise TypeError(
            f"{name} must be a number or a pytree of arrays; got {value!r}."
        )
    if isinstance(value, numbers.Real):
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a finite number > 0; got {value!r}.")
    elif value is None:
        raise TypeError(f"{name} is required (a float or a pytree matching params).")
    return value


def check_lr_matches_params(name: str, lr: Any, params: Any) -> None:
    """Checks that a pytree learning rate has the structure of ``params``.

    Each leaf must be a scalar or have the shape of the matching parameter.
    """
    if lr is None or is_scalar(lr):
        return
    lr_def, params_def = jax.tree.structure(lr), jax.tree.structure(params)
    if lr_def != params_def:
        raise ValueError(
            f"{name} is a pytree whose structure does not match params.\n"
            f"  {name}: {lr_def}\n  params: {params_def}\n"
            f"Pass a scalar, or a pytree with one leaf per parameter "
            f"(e.g. jax.tree.map(lambda p: 0.01, params))."
        )
    for path, leaf_lr, leaf_p in zip(
        _paths(params), jax.tree.leaves(lr), jax.tree.leaves(params), strict=True
    ):
        shape = jnp.shape(leaf_lr)
        if shape not in ((), jnp.shape(leaf_p)):
            raise ValueError(
                f"{name} leaf at {path} has shape {shape}; it must be a scalar or "
                f"match the parameter's shape {jnp.shape(leaf_p)}."
            )


def split_loss_output(out: Any, has_aux: bool, where: str) -> tuple[jax.Array, Aux]:
    """Splits ``loss_fn``'s output into ``(loss, aux)``; checks the loss is a scalar."""
    if has_aux:
        if not (isinstance(out, tuple) and len(out) == 2):
            raise TypeError(
                f"loss_fn was declared with has_aux=True, so it must return "
                f"(loss, aux); got {type(out).__name__} in {where}."
            )
        loss, aux = out
        if not isinstance(aux, dict):
            raise TypeError(
                f"loss_fn's aux must be a dict of arrays (e.g. {{'accuracy': acc}}); "
                f"got {type(aux).__name__} in {where}."
            )
    else:
        if isinstance(out, tuple):
            raise TypeError(
                f"loss_fn returned a tuple in {where}; if it returns (loss, aux), "
                f"pass has_aux=True."
            )
        loss, aux = out, {}
    if jnp.shape(loss) != ():
        raise ValueError(
            f"loss_fn must return a scalar loss; got shape {jnp.shape(loss)} in "
            f"{where}. Reduce it (e.g. jnp.mean) inside loss_fn. If you passed a "
            f"batch of tasks to a per-task function, use meta_value_and_grad."
        )
    if not jnp.issubdtype(jnp.result_type(loss), jnp.floating):
        raise TypeError(f"loss_fn must return a floating-point loss; got {loss.dtype}.")
    return loss, aux


def check_task(task: Any, where: str) -> None:
    """Checks one task: a ``Task`` whose support and query trees match and hold
    at least one example each (the leading axis of every leaf is the example axis).
    """
    _check_task_structure(task, where)
    check_examples(task.support, f"{where}: task.support")
    check_examples(task.query, f"{where}: task.query")


def check_examples(batch: Any, where: str, *, axis: int = 0) -> None:
    """Checks that no leaf of a support or query batch has an empty example axis.

    ``axis`` is the example axis: 0 for one task's batch, 1 under a task axis.
    Leaves with no such axis (per-task scalars) are not examples and pass.
    """
    for path, leaf in zip(_paths(batch), jax.tree.leaves(batch), strict=True):
        shape = jnp.shape(leaf)
        if len(shape) > axis and shape[axis] == 0:
            raise ValueError(
                f"{where}{path} has shape {shape}: its example axis (axis {axis}) "
                f"is empty. A support or query set needs at least one example; "
                f"with none, adaptation would silently do nothing."
            )


def _check_task_structure(task: Any, where: str) -> None:
    if isinstance(task, TaskBatch):
        raise TypeError(
            f"{where} takes one maml_jax.Task and got a TaskBatch (a batch of "
            f"tasks). Pass one task, e.g. maml_jax.unstack_tasks(batch)[i], or "
            f"use meta_value_and_grad / evaluate for the whole batch."
        )
    if not isinstance(task, Task):
        raise TypeError(
            f"{where} expects a maml_jax.Task(support, query); "
            f"got {type(task).__name__}."
        )
    _check_support_and_query(task, where)


def _check_support_and_query(task: Any, where: str) -> None:
    s_def, q_def = jax.tree.structure(task.support), jax.tree.structure(task.query)
    if s_def != q_def:
        raise ValueError(
            f"{where}: task.support and task.query must have the same pytree "
            f"structure.\n  support: {s_def}\n  query:   {q_def}"
        )
    if not jax.tree.leaves(task.support):
        raise ValueError(f"{where}: task.support has no arrays.")


def check_task_batch(tasks: Any, where: str) -> int:
    """Checks a ``TaskBatch`` and returns the number of tasks (the leading axis).

    The batch needs at least one task, and each task at least one support and
    one query example (axis 1 of every leaf that has one).
    """
    if isinstance(tasks, Task):
        raise TypeError(
            f"{where} got a single Task; pass a TaskBatch whose leaves have a "
            f"leading task axis: maml_jax.stack_tasks([task]) or "
            f"maml_jax.TaskBatch(support=..., query=...)."
        )
    if not isinstance(tasks, TaskBatch):
        raise TypeError(
            f"{where} expects a maml_jax.TaskBatch(support, query) whose leaves "
            f"have a leading task axis; got {type(tasks).__name__}."
        )
    _check_support_and_query(tasks, where)
    sizes = {}
    for part in ("support", "query"):
        tree = getattr(tasks, part)
        for path, leaf in zip(_paths(tree), jax.tree.leaves(tree), strict=True):
            shape = jnp.shape(leaf)
            if not shape:
                raise ValueError(
                    f"{where}: task.{part}{path} is a scalar, but tasks need a "
                    f"leading task axis: shape (num_tasks, ...). For a single task "
                    f"use maml_jax.stack_tasks([task])."
                )
            sizes[f"{part}{path}"] = shape[0]
    if len(set(sizes.values())) != 1:
        listing = ", ".join(f"{k}: {v}" for k, v in sizes.items())
        raise ValueError(
            f"{where}: every leaf of the task batch must have the same leading task "
            f"axis length; got {listing}. Did a leaf lose its task axis?"
        )
    num_tasks = next(iter(sizes.values()))
    if num_tasks == 0:
        raise ValueError(
            f"{where}: a batch of tasks needs at least one task; the leading task "
            f"axis of every leaf has length 0."
        )
    check_examples(tasks.support, f"{where}: task.support", axis=1)
    check_examples(tasks.query, f"{where}: task.query", axis=1)
    return num_tasks


def is_scalar(x: Any) -> bool:
    """Whether ``x`` is a Python number or a 0-d array (not a pytree of rates)."""
    return isinstance(x, numbers.Real) or (hasattr(x, "shape") and x.shape == ())


def _paths(tree: Any) -> list[str]:
    return [
        jax.tree_util.keystr(path)
        for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]
    ]
