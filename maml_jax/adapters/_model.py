"""``Model``, what every adapter returns, and the batch convention they share."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from maml_jax import _validation
from maml_jax.types import ModelState, Params

Loss = Callable[[Any, Any], Any]
"""``loss(outputs, targets) -> loss`` or ``-> (loss, aux)``: the user's loss on
the model's outputs, passed through unchanged (give ``has_aux`` to the learner)."""


class Model(NamedTuple):
    """A model split into the pieces the learners take.

    Attributes:
      loss_fn: ``loss_fn(params, batch)`` for a model without mutable state,
        else a ``StatefulLossFn``: ``loss_fn(params, state, batch, *, training)
        -> (loss, new_state)``. ``batch`` is ``(inputs, targets)``; the loss is
        whatever ``loss(outputs, targets)`` returns (a scalar, or
        ``(scalar, aux)`` for learners built with ``has_aux=True``).
      params: the differentiated parameters, a pytree of floating-point arrays
        (nested dicts for Flax; the model's own pytree, non-parameter leaves
        ``None``, for Equinox).
      state: the model state that is not differentiated (BatchNorm running
        statistics), or ``None`` for a stateless model.
      apply_fn: the forward pass in inference mode: ``apply_fn(params, inputs)``,
        or ``apply_fn(params, state, inputs)`` when ``has_state`` (running
        averages used, state not updated), e.g. for ``maml_jax.predict``.
      has_state: whether ``loss_fn`` takes ``state``; pass it to the learner.
    """

    loss_fn: Callable[..., Any]
    params: Params
    state: ModelState
    apply_fn: Callable[..., Any]
    has_state: bool


def unpack(batch: Any, where: str) -> tuple[Any, Any]:
    """Splits a batch into ``(inputs, targets)``."""
    if not (isinstance(batch, tuple | list) and len(batch) == 2):
        raise TypeError(
            f"{where}: the loss_fn expects a batch (inputs, targets); "
            f"got {type(batch).__name__}."
        )
    return batch[0], batch[1]


def check_module(model: Any, framework: str, where: str) -> None:
    """Checks that ``model`` is an instance of ``framework``'s ``Module``; a
    module of another framework is told the adapter to use instead."""
    if isinstance(model, type):
        raise TypeError(
            f"{where} expects a module instance (e.g. Net(...)), not the class "
            f"{model.__name__}."
        )
    found = _validation.framework_of(model)
    if found == framework:
        return
    message = f"{where} expects a {framework}.Module; got {type(model).__name__}"
    if found is not None:
        message += f", a {found}.Module: use {_validation.ADAPTERS[found]}"
    raise TypeError(message + ".")
