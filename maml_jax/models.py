"""Flax models and adapters that turn ``model.apply`` into a ``loss_fn``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from maml_jax.types import Aux, Batch, LossFn, Params

ApplyFn = Callable[..., jax.Array]


class MLP(nn.Module):
    """A fully connected ReLU network (the MAML paper's sinusoid regressor: 40-40).

    Attributes:
      hidden_sizes: widths of the hidden layers.
      output_size: width of the output layer.

    Inputs of shape ``(num_examples, in_features)`` give outputs of shape
    ``(num_examples, output_size)``.
    """

    hidden_sizes: Sequence[int] = (40, 40)
    output_size: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for width in self.hidden_sizes:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(self.output_size)(x)


def _apply(apply_fn: ApplyFn, params: Params, inputs: jax.Array) -> jax.Array:
    return apply_fn({"params": params}, inputs)


def regression_loss(apply_fn: ApplyFn) -> LossFn:
    """Mean squared error ``loss_fn(params, (inputs, targets))`` for ``apply_fn``.

    Args:
      apply_fn: a Flax ``model.apply``, called as ``apply_fn({'params': p}, x)``.

    Returns:
      ``loss_fn(params, batch) -> mse``, with ``batch = (inputs, targets)`` and
      predictions of the shape of ``targets``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> model = MLP(hidden_sizes=(8,))
      >>> x = jnp.zeros((5, 1))
      >>> params = model.init(jax.random.key(0), x)["params"]
      >>> loss_fn = regression_loss(model.apply)
      >>> loss_fn(params, (x, jnp.zeros((5, 1)))).shape
      ()
    """

    def loss_fn(params: Params, batch: Batch) -> jax.Array:
        inputs, targets = _unpack(batch)
        predictions = _apply(apply_fn, params, inputs)
        if predictions.shape != jnp.shape(targets):
            raise ValueError(
                f"regression_loss: predictions have shape {predictions.shape} but "
                f"targets have shape {jnp.shape(targets)}. A single task's batch is "
                f"(inputs, targets) with a leading example axis; a batch of tasks "
                f"goes through meta_value_and_grad, which strips the task axis."
            )
        return jnp.mean((predictions - targets) ** 2)

    return loss_fn


def classification_loss(apply_fn: ApplyFn, *, loss_scale: float = 1.0) -> LossFn:
    """Softmax cross-entropy ``loss_fn(params, (inputs, labels)) -> (loss, aux)``.

    ``loss = loss_scale · mean_i CE(logits_i, labels_i)`` and
    ``aux = {'accuracy': mean_i [argmax logits_i == labels_i]}``; use it with
    ``has_aux=True``. ``loss_scale`` reproduces conventions such as the original
    MAML code's summed-over-examples loss divided by K (``loss_scale = ways``).

    Args:
      apply_fn: a Flax ``model.apply`` returning logits ``(num_examples, ways)``.
      loss_scale: a constant multiplying the mean cross-entropy.
    """

    def loss_fn(params: Params, batch: Batch) -> tuple[jax.Array, Aux]:
        inputs, labels = _unpack(batch)
        logits = _apply(apply_fn, params, inputs)
        if logits.ndim != 2 or jnp.shape(labels) != logits.shape[:1]:
            raise ValueError(
                f"classification_loss: expected logits (num_examples, ways) and "
                f"integer labels (num_examples,); got logits {logits.shape} and "
                f"labels {jnp.shape(labels)}."
            )
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == labels)
        return loss_scale * jnp.mean(ce), {"accuracy": accuracy}

    return loss_fn


def _unpack(batch: Any) -> tuple[Any, Any]:
    if not (isinstance(batch, tuple | list) and len(batch) == 2):
        raise TypeError(
            f"expected a batch (inputs, targets); got {type(batch).__name__}."
        )
    return batch[0], batch[1]
