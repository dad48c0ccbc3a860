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


def check_state_structure(state: Any, new_state: Any, where: str) -> None:
    """Checks a stateful loss returned a state shaped like the one it was given:
    the inner loop carries it, so structure, shapes and dtypes must not change.
    """
    old, new = jax.tree.structure(state), jax.tree.structure(new_state)
    if old != new:
        raise TypeError(
            f"{where} returned a new_state whose structure differs from the state "
            f"it was given: {new} vs {old}. Return every state collection, updated "
            f"or not (in inference mode return the state unchanged)."
        )
    for (path, a), b in zip(
        jax.tree_util.tree_flatten_with_path(state)[0],
        jax.tree.leaves(new_state),
        strict=True,
    ):
        if jnp.shape(a) != jnp.shape(b) or jnp.result_type(a) != jnp.result_type(b):
            raise TypeError(
                f"{where} changed the state leaf state{jax.tree_util.keystr(path)} "
                f"from {jnp.result_type(a)}{list(jnp.shape(a))} to "
                f"{jnp.result_type(b)}{list(jnp.shape(b))}; state leaves must keep "
                f"their shape and dtype."
            )


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


# Which adapter splits a model of each framework into (loss_fn, params, state).
ADAPTERS = {
    "flax.linen": "maml_jax.from_linen(module, variables, loss)",
    "flax.nnx": "maml_jax.from_nnx(module, loss)",
    "equinox": "maml_jax.from_equinox(model, loss)",
}


def check_params(params: Any, where: str) -> None:
    """Checks that every leaf of ``params`` is a floating-point array.

    A whole Flax (Linen or NNX) module, an Equinox module with non-array leaves
    (e.g. its activation functions), an integer, boolean, key or string leaf is
    a ``TypeError`` that names the leaf's key path and, for a framework's
    module, the adapter that splits it. Shapes and dtypes only: works on
    tracers.

    Args:
      params: the pytree to be differentiated (meta-learned).
      where: the caller, put at the start of the message (e.g. ``"maml.init"``).

    Raises:
      TypeError: at the first leaf (in flattening order) that is not a
        floating-point array.

    Examples:
      >>> import jax.numpy as jnp
      >>> check_params({"w": jnp.zeros(2), "b": 0.5}, "maml.init")
      >>> check_params({"conv": {"kernel": jnp.zeros(2, jnp.int32)}}, "maml.init")
      Traceback (most recent call last):
      ...
      TypeError: maml.init: params['conv']['kernel'] is an int32 array; ...
    """
    # NNX modules are pytrees of their arrays, so flattening would hide them;
    # stop at any Flax module and report it as one leaf.
    leaves, _ = jax.tree_util.tree_flatten_with_path(
        params, is_leaf=lambda x: framework_of(x) in ("flax.linen", "flax.nnx")
    )
    for path, leaf in leaves:
        name = "params" + jax.tree_util.keystr(path)
        framework = framework_of(leaf)
        if framework is not None:
            raise TypeError(
                f"{where}: {name} is a {framework}.Module "
                f"({type(leaf).__name__}), not a pytree of arrays; split it "
                f"into (loss_fn, params, state) with {ADAPTERS[framework]}."
            )
        problem = _leaf_problem(leaf)
        if problem is None:
            continue
        message = (
            f"{where}: {name} is {problem}; meta-parameters must be "
            f"floating-point arrays (jax.grad differentiates only those)."
        )
        module = _enclosing_equinox_module(params, path)
        if module is not None:
            message += (
                f" It belongs to an equinox.Module ({type(module).__name__}); "
                f"split the model with "
                f"{ADAPTERS['equinox']}, which keeps only its floating-point "
                f"arrays as params."
            )
        else:
            message += (
                " Cast it (e.g. jnp.asarray(x, jnp.float32)), or if it is not "
                "learned, keep it out of params: close over it in loss_fn, or "
                "pass it as model state."
            )
        raise TypeError(message)


def _leaf_problem(leaf: Any) -> str | None:
    """``None`` for a floating-point array or Python float, else what it is."""
    if isinstance(leaf, float):
        return None
    dtype = getattr(leaf, "dtype", None)
    if dtype is None or not hasattr(leaf, "shape"):
        if isinstance(leaf, (bool, int, str)):
            return f"a Python {type(leaf).__name__} ({leaf!r:.40})"
        if callable(leaf):
            return f"a function or callable ({type(leaf).__name__}), not an array"
        return f"a {type(leaf).__name__}, not an array"
    if jnp.issubdtype(dtype, jnp.floating):
        return None
    article = "an" if str(dtype).startswith("int") else "a"
    return f"{article} {dtype} array"


def framework_of(x: Any) -> str | None:
    """The framework whose ``Module`` ``x`` is: read from the class's module name,
    so that neither Flax nor Equinox need be imported."""
    for cls in type(x).__mro__:
        if cls.__name__ == "Module":
            for framework in ADAPTERS:
                if cls.__module__.startswith(framework + "."):
                    return framework
    return None


def _enclosing_equinox_module(params: Any, path: tuple[Any, ...]) -> Any:
    """The outermost Equinox module holding the leaf at ``path``, or ``None``."""
    outer, _ = jax.tree_util.tree_flatten_with_path(
        params, is_leaf=lambda x: framework_of(x) == "equinox"
    )
    for prefix, node in outer:
        if framework_of(node) == "equinox" and path[: len(prefix)] == prefix:
            return node
    return None


def is_scalar(x: Any) -> bool:
    """Whether ``x`` is a Python number or a 0-d array (not a pytree of rates)."""
    return isinstance(x, numbers.Real) or (hasattr(x, "shape") and x.shape == ())


def _paths(tree: Any) -> list[str]:
    return [
        jax.tree_util.keystr(path)
        for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]
    ]
