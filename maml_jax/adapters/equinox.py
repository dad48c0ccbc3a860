"""Equinox: ``eqx.partition`` into parameters and the static rest,
``eqx.combine`` inside the loss; optional ``eqx.nn.State`` (BatchNorm).
Equinox is an optional extra (``pip install maml_jax[equinox]``), imported on
first use."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import jax

from maml_jax import _validation
from maml_jax.adapters._model import Loss, Model, check_module, unpack


def from_equinox(
    model: Any,
    loss: Loss,
    *,
    state: Any = None,
    filter: Callable[[Any], bool] | None = None,
    vmap: bool = True,
    axis_name: Hashable = "batch",
) -> Model:
    """Turns an Equinox model into ``(loss_fn, params, state)``.

    ``params, static = eqx.partition(model, filter)``: ``params`` is the model's
    own pytree with the floating-point arrays kept and every other leaf
    ``None``; the loss runs ``eqx.combine(params, static)``. Equinox layers
    take one example, so by default the model is mapped over the inputs'
    leading axis with ``jax.vmap(..., axis_name=axis_name)``.

    Without ``state``: ``loss_fn(params, (x, y)) = loss(model(x), y)``, the
    model run as it is (set ``inference`` flags yourself). With the
    ``eqx.nn.State`` of ``eqx.nn.make_with_state`` (models called as
    ``model(x, state) -> (output, state)``, e.g. with ``eqx.nn.BatchNorm``):
    ``loss_fn(params, state, (x, y), *, training) -> (loss, new_state)``, where
    ``training`` sets ``eqx.nn.inference_mode(model, not training)``; in
    inference ``state`` is returned unchanged. Layers that need a ``key``
    (``eqx.nn.Dropout`` in training) are not supported.

    Args:
      model: the Equinox model.
      loss: ``loss(outputs, targets) -> scalar`` or ``-> (scalar, aux)``.
      state: the ``eqx.nn.State`` of a stateful model, else ``None``.
      filter: which leaves are parameters; default ``eqx.is_inexact_array``.
      vmap: map the model over the leading axis of the inputs (and give that
        axis ``axis_name``, which ``eqx.nn.BatchNorm`` reduces over); ``False``
        if the model takes a whole batch.
      axis_name: the name of the mapped axis.

    Returns:
      A ``Model``; ``has_state`` is whether ``state`` was given.

    Raises:
      ImportError: if Equinox is not installed.
      TypeError: if ``model`` is not an Equinox module, or a leaf selected as
        a parameter is not a floating-point array.

    Examples:
      >>> import jax, jax.numpy as jnp, equinox as eqx
      >>> mlp = eqx.nn.MLP(1, 1, width_size=8, depth=2, key=jax.random.key(0))
      >>> model = from_equinox(mlp, lambda out, y: jnp.mean((out - y) ** 2))
      >>> x = jnp.linspace(-1.0, 1.0, 5)[:, None]
      >>> model.loss_fn(model.params, (x, jnp.sin(x))).shape
      ()
      >>> model.apply_fn(model.params, x).shape
      (5, 1)
    """
    eqx = _import_equinox()
    if isinstance(model, tuple) and len(model) == 2:
        if isinstance(model[1], eqx.nn.State):
            raise TypeError(
                "from_equinox got the (model, state) pair of "
                "eqx.nn.make_with_state; pass from_equinox(model, loss, state=state)."
            )
    check_module(model, "equinox", "from_equinox")
    if state is not None and not isinstance(state, eqx.nn.State):
        raise TypeError(
            f"from_equinox: state must be the eqx.nn.State of "
            f"eqx.nn.make_with_state; got {type(state).__name__}."
        )
    params, static = eqx.partition(
        model, eqx.is_inexact_array if filter is None else filter
    )
    _validation.check_params(params, "from_equinox")
    where = f"from_equinox({type(model).__name__})"

    if state is None:

        def apply_fn(params, inputs):
            net = eqx.combine(params, static)
            return jax.vmap(net, axis_name=axis_name)(inputs) if vmap else net(inputs)

        def loss_fn(params, batch):
            inputs, targets = unpack(batch, where)
            return loss(apply_fn(params, inputs), targets)

        return Model(loss_fn, params, None, apply_fn, has_state=False)

    def run(params, state, inputs, training):
        net = eqx.nn.inference_mode(eqx.combine(params, static), value=not training)
        if vmap:
            # The state is shared by the batch: in unmapped, out unmapped.
            net = jax.vmap(
                net, axis_name=axis_name, in_axes=(0, None), out_axes=(0, None)
            )
        outputs, new_state = net(inputs, state)
        return outputs, (new_state if training else state)

    def stateful_loss_fn(params, state, batch, *, training):
        inputs, targets = unpack(batch, where)
        outputs, new_state = run(params, state, inputs, training)
        return loss(outputs, targets), new_state

    def stateful_apply_fn(params, state, inputs):
        return run(params, state, inputs, False)[0]

    return Model(stateful_loss_fn, params, state, stateful_apply_fn, has_state=True)


def _import_equinox():
    try:
        import equinox
    except ImportError as e:
        raise ImportError(
            "from_equinox needs Equinox, an optional dependency of maml_jax: "
            "pip install maml_jax[equinox]"
        ) from e
    return equinox
