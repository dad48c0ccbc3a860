"""Flax Linen: ``module.apply`` with ``params`` differentiated and the other
variable collections (``batch_stats``) carried as model state."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.core
import flax.linen as nn

from maml_jax import _validation
from maml_jax.adapters._model import Loss, Model, check_module, unpack


def from_linen(
    module: nn.Module,
    variables: Any,
    loss: Loss,
    *,
    mutable: Sequence[str] = ("batch_stats",),
    train_kwarg: str | None = "train",
) -> Model:
    """Turns a Linen module and its variables into ``(loss_fn, params, state)``.

    ``params = variables["params"]``; ``state`` is every other collection, or
    ``None`` if there is none. A stateless model gets
    ``loss_fn(params, (x, y)) = loss(module.apply({"params": params}, x), y)``
    (no ``train_kwarg`` is passed). A stateful one gets
    ``loss_fn(params, state, (x, y), *, training) -> (loss, new_state)``:

    - ``training=True`` calls ``module.apply({"params": params, **state}, x,
      train=True, mutable=mutable)``, so BatchNorm normalises with the batch's
      statistics, and returns ``state`` with the ``mutable`` collections
      replaced by their updated values;
    - ``training=False`` calls it with ``train=False`` and nothing mutable
      (running averages used) and returns ``state`` unchanged.

    Args:
      module: the Linen module.
      variables: what ``module.init`` returned; must hold ``"params"``.
      loss: ``loss(outputs, targets) -> scalar`` or ``-> (scalar, aux)``.
      mutable: the collections training mode updates.
      train_kwarg: the keyword argument of ``module.__call__`` that is ``True``
        in training and ``False`` in inference; ``None`` if it takes none.

    Returns:
      A ``Model``; its ``has_state`` is whether ``variables`` holds
      collections besides ``"params"``.

    Raises:
      TypeError: if ``variables`` has no ``"params"``, or a parameter is not a
        floating-point array (the message names its key path).

    Examples:
      >>> import jax, jax.numpy as jnp, flax.linen as nn
      >>> class Net(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x, train):
      ...         x = nn.BatchNorm(use_running_average=not train)(nn.Dense(4)(x))
      ...         return nn.Dense(1)(x)
      >>> net, x = Net(), jnp.ones((5, 2))
      >>> variables = net.init(jax.random.key(0), x, train=False)
      >>> mse = lambda out, y: jnp.mean((out - y) ** 2)
      >>> model = from_linen(net, variables, mse)
      >>> model.has_state, list(model.state)
      (True, ['batch_stats'])
      >>> loss, new_state = model.loss_fn(
      ...     model.params, model.state, (x, jnp.zeros((5, 1))), training=True
      ... )
      >>> loss.shape, jax.tree.structure(new_state) == jax.tree.structure(model.state)
      ((), True)
    """
    check_module(module, "flax.linen", "from_linen")
    is_dict = isinstance(variables, dict | flax.core.FrozenDict)
    if not is_dict or "params" not in variables:
        raise TypeError(
            f"from_linen expects the variables module.init returns: a dict with "
            f"a 'params' collection (and e.g. 'batch_stats'); got "
            f"{_describe(variables)}. Pass module.init(key, x) itself, not "
            f"variables['params']."
        )
    variables = flax.core.unfreeze(variables)
    params = variables.pop("params")
    _validation.check_params(params, "from_linen")
    state = variables or None
    where = f"from_linen({type(module).__name__})"

    if state is None:

        def apply_fn(params, inputs):
            return module.apply({"params": params}, inputs)

        def loss_fn(params, batch):
            inputs, targets = unpack(batch, where)
            return loss(apply_fn(params, inputs), targets)

        return Model(loss_fn, params, None, apply_fn, has_state=False)

    mutable = list(mutable)

    def run(params, state, inputs, training):
        kwargs = {} if train_kwarg is None else {train_kwarg: training}
        variables = {"params": params, **state}
        if not (training and mutable):
            return module.apply(variables, inputs, **kwargs), state
        outputs, updates = module.apply(variables, inputs, mutable=mutable, **kwargs)
        return outputs, {**state, **flax.core.unfreeze(updates)}

    def stateful_loss_fn(params, state, batch, *, training):
        inputs, targets = unpack(batch, where)
        outputs, new_state = run(params, state, inputs, training)
        return loss(outputs, targets), new_state

    def stateful_apply_fn(params, state, inputs):
        return run(params, state, inputs, False)[0]

    return Model(stateful_loss_fn, params, state, stateful_apply_fn, has_state=True)


def _describe(x: Any) -> str:
    if isinstance(x, dict | flax.core.FrozenDict):
        return f"a dict with keys {sorted(map(str, x))}"
    return type(x).__name__
