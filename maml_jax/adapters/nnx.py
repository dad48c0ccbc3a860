"""Flax NNX: ``nnx.split`` into ``nnx.Param`` (differentiated) and the rest
(``BatchStat``, RNG state), both as plain nested dicts; ``nnx.merge`` inside the
loss. ``flax.nnx`` is imported on first use, to keep ``import maml_jax`` light."""

from __future__ import annotations

from typing import Any

import jax

from maml_jax import _validation
from maml_jax.adapters._model import Loss, Model, check_module, unpack


def from_nnx(module: Any, loss: Loss) -> Model:
    """Turns an NNX module into ``(loss_fn, params, state)``.

    ``nnx.split(module, nnx.Param, ...)`` gives the parameters and the rest
    of the module's state (BatchNorm's ``BatchStat`` running averages, RNG
    streams); both become plain nested dicts of arrays (``nnx.to_pure_dict``),
    which optax and orbax take as they are. The loss rebuilds the module with
    ``nnx.merge`` on every call, so it is pure. Without state besides the
    parameters, ``loss_fn(params, (x, y)) = loss(module(x), y)`` runs the
    module in the mode (``train()``/``eval()``) it was in when split. With
    state, ``loss_fn(params, state, (x, y), *, training) -> (loss, new_state)``:

    - ``training=True`` runs ``module.train()`` (batch statistics; running
      averages updated) and returns the module's state after the call;
    - ``training=False`` runs ``module.eval()`` (running averages used) and
      returns ``state`` unchanged.

    Args:
      module: the NNX module (its current values become ``params``/``state``).
      loss: ``loss(outputs, targets) -> scalar`` or ``-> (scalar, aux)``.

    Returns:
      A ``Model``; ``has_state`` is whether the module holds anything but
      ``nnx.Param`` variables.

    Raises:
      TypeError: if ``module`` is not an NNX module, or a parameter is not a
        floating-point array (the message names its key path).

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> net = nnx.Sequential(
      ...     nnx.Linear(2, 4, rngs=nnx.Rngs(0)), nnx.BatchNorm(4, rngs=nnx.Rngs(0))
      ... )
      >>> model = from_nnx(net, lambda out, y: jnp.mean((out - y) ** 2))
      >>> model.has_state, sorted(model.state["layers"][1])
      (True, ['mean', 'var'])
      >>> batch = (jnp.ones((5, 2)), jnp.zeros((5, 4)))
      >>> loss, new_state = model.loss_fn(
      ...     model.params, model.state, batch, training=False
      ... )
      >>> new_state is model.state
      True
    """
    from flax import nnx

    check_module(module, "flax.nnx", "from_nnx")
    graphdef, param_vars, rest_vars = nnx.split(module, nnx.Param, ...)
    params = nnx.to_pure_dict(param_vars)
    _validation.check_params(params, "from_nnx")
    state = nnx.to_pure_dict(rest_vars)
    where = f"from_nnx({type(module).__name__})"
    # nnx.State and its pure dict flatten to the same leaves in the same
    # (sorted-key) order, so the variables are rebuilt from the dict's leaves.
    to_params = _unflattener(param_vars, params, f"{where}: params")
    to_rest = _unflattener(rest_vars, state, f"{where}: state")

    if not jax.tree.leaves(state):

        def apply_fn(params, inputs):
            return nnx.merge(graphdef, to_params(params), rest_vars)(inputs)

        def loss_fn(params, batch):
            inputs, targets = unpack(batch, where)
            return loss(apply_fn(params, inputs), targets)

        return Model(loss_fn, params, None, apply_fn, has_state=False)

    def run(params, state, inputs, training):
        net = nnx.merge(graphdef, to_params(params), to_rest(state))
        if not training:
            net.eval()
            return net(inputs), state
        net.train()
        outputs = net(inputs)
        _, _, new_rest = nnx.split(net, nnx.Param, ...)
        return outputs, nnx.to_pure_dict(new_rest)

    def stateful_loss_fn(params, state, batch, *, training):
        inputs, targets = unpack(batch, where)
        outputs, new_state = run(params, state, inputs, training)
        return loss(outputs, targets), new_state

    def stateful_apply_fn(params, state, inputs):
        return run(params, state, inputs, False)[0]

    return Model(stateful_loss_fn, params, state, stateful_apply_fn, has_state=True)


def _unflattener(variables: Any, pure: Any, what: str):
    """``pure_dict -> nnx.State`` for dicts structured like ``pure``."""
    variables_def, pure_def = jax.tree.structure(variables), jax.tree.structure(pure)

    def unflatten(tree: Any) -> Any:
        # A dict restored from a checkpoint without a target has str keys
        # ('10' sorts before '2'): refuse it rather than permute the leaves.
        if jax.tree.structure(tree) != pure_def:
            raise ValueError(
                f"{what} does not have the structure the module was split into."
                f"\n  expected: {pure_def}\n  got:      {jax.tree.structure(tree)}"
            )
        return jax.tree.unflatten(variables_def, jax.tree.leaves(tree))

    return unflatten
