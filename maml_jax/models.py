"""Flax models (MLP, Conv4) and adapters that turn ``model.apply`` into a
``loss_fn``; Conv4's convolution, normalisation and pooling kernels live in
``maml_jax.ops``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from maml_jax import ops
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


def classification_loss(
    apply_fn: ApplyFn, *, loss_scale: float = 1.0, stateful: bool = False
) -> Callable[..., Any]:
    """Softmax cross-entropy ``loss_fn(params, (inputs, labels)) -> (loss, aux)``.

    ``loss = loss_scale · mean_i CE(logits_i, labels_i)`` and
    ``aux = {'accuracy': mean_i [argmax logits_i == labels_i]}``; use it with
    ``has_aux=True``. ``loss_scale`` reproduces conventions such as the original
    MAML code's summed-over-examples loss divided by K (``loss_scale = ways``).

    Args:
      apply_fn: a Flax ``model.apply`` returning logits ``(num_examples, ways)``.
      loss_scale: a constant multiplying the mean cross-entropy.
      stateful: return the ``StatefulLossFn`` of a model with mutable
        collections (``Conv4(norm="running")``): ``loss_fn(params, state,
        batch, *, training) -> ((loss, aux), new_state)`` with ``state`` the
        non-``params`` variables (``{"batch_stats": ...}``), applied with
        ``train=training`` and, in training, those collections mutable. Use it
        with ``has_aux=True, has_state=True``.
    """

    def loss_and_accuracy(logits, labels) -> tuple[jax.Array, Aux]:
        if logits.ndim != 2 or jnp.shape(labels) != logits.shape[:1]:
            raise ValueError(
                f"classification_loss: expected logits (num_examples, ways) and "
                f"integer labels (num_examples,); got logits {logits.shape} and "
                f"labels {jnp.shape(labels)}."
            )
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == labels)
        return loss_scale * jnp.mean(ce), {"accuracy": accuracy}

    def loss_fn(params: Params, batch: Batch) -> tuple[jax.Array, Aux]:
        inputs, labels = _unpack(batch)
        return loss_and_accuracy(_apply(apply_fn, params, inputs), labels)

    def stateful_loss_fn(
        params: Params, state: Any, batch: Batch, *, training: bool, step: Any = None
    ):
        inputs, labels = _unpack(batch)
        logits, state = apply_with_state(
            apply_fn, params, state, inputs, training, step=step
        )
        return loss_and_accuracy(logits, labels), state

    return stateful_loss_fn if stateful else loss_fn


def apply_with_state(
    apply_fn: ApplyFn,
    params: Params,
    state: Any,
    inputs: Any,
    training: bool,
    *,
    step: Any = None,
) -> tuple[Any, Any]:
    """``apply_fn`` of a Linen model with mutable collections: ``(outputs, state)``.

    ``state`` holds the non-``params`` collections (``{"batch_stats": ...}``).
    In training they are mutable and come back updated; in inference
    (``train=False``) they are read and returned unchanged. ``step`` (the inner
    step, for ``Conv4(per_step_norm=...)``) is passed on when not ``None``.
    """
    variables = {"params": params, **state}
    kwargs = {} if step is None else {"step": step}
    if not training:
        return apply_fn(variables, inputs, train=False, **kwargs), state
    outputs, updates = apply_fn(
        variables, inputs, train=True, mutable=list(state), **kwargs
    )
    return outputs, {**state, **updates}


def _unpack(batch: Any) -> tuple[Any, Any]:
    if not (isinstance(batch, tuple | list) and len(batch) == 2):
        raise TypeError(
            f"expected a batch (inputs, targets); got {type(batch).__name__}."
        )
    return batch[0], batch[1]


NORMS = ("transductive", "running", "support", "inductive", "none")

# Up to this many patch columns (3×3 greyscale: 9, RGB: 27) a block with batch
# statistics and im2col convolutions computes its convolution and batch norm
# together, from the patches' covariance (ops.conv_batch_norm).
_PATCH_NORM_MAX_COLUMNS = 32


class Conv4(nn.Module):
    """The four-block convolutional network of the MAML paper (Finn et al., 2017).

    Each block: 3×3 convolution (``filters`` channels) → normalisation → ReLU →
    downsampling (stride-2 convolution for Omniglot, 2×2 max-pool for
    mini-ImageNet); then a linear head on the mean over space (Omniglot) or the
    flattened features (mini-ImageNet).

    Normalisation (``norm``):

    * ``"transductive"`` (default; what the original MAML code and learn2learn's
      examples do): batch norm with the statistics of the current batch, at train
      and test time. Predictions for one query example depend on the other query
      examples of the same batch.
    * ``"running"``: batch norm with running averages, the usual inductive
      setting: ``model.apply(variables, x, train=True, mutable=["batch_stats"])``
      normalises with the batch's statistics and updates the running mean and
      (biased) variance in the ``batch_stats`` collection (``r ← m·r + (1−m)·b``,
      ``m = momentum``); ``train=False`` normalises with the running averages, so
      a prediction depends on its own example alone. Use it through a stateful
      loss (``maml_jax.from_linen``) and a learner built with ``has_state=True``.
    * ``"support"``: batch norm for non-transductive evaluation. ``train=True``
      normalises with the batch's statistics and returns them (differentiable)
      and the batch size in ``batch_stats``; ``train=False`` normalises each
      example with the moments of that batch and the example together (its own
      spatial moments weighted ``1/(n+1)``: TaskNorm-I with ``α = n/(n+1)``,
      Bronskill et al., ICML 2020). With a learner built with
      ``query_state="support"`` and ``query_training=False`` the batch is the
      support set at the adapted parameters, so a query prediction depends on
      that example and the support set only, in meta-training and at test.
    * ``"inductive"``: each example is normalised by its own statistics over
      (H, W, C) with a per-channel scale and offset, so a prediction depends on
      that example alone.
    * ``"none"``.

    The other norms keep no state: the model is a pure function of
    ``(params, inputs)`` and ``train`` is ignored.

    Attributes:
      num_classes: width of the output (the ``ways``), or ``None`` to return the
        features (``(N, filters)`` with ``head="mean"``, ``(N, h·w·filters)`` with
        ``head="flatten"``): an embedding for ``protonet``.
      filters: channels of every block (64 Omniglot, 32 mini-ImageNet).
      downsample: ``"stride"`` or ``"maxpool"``.
      head: ``"mean"`` (global average over space) or ``"flatten"``.
      norm: see above.
      norm_scale: learn a per-channel scale in the norm (the original code learns
        only the offset).
      conv_impl: ``"auto"`` (default), ``"lax"`` or ``"im2col"`` (see
        ``ops.conv2d``; same values). ``"auto"`` is resolved when the model is
        traced, by ``ops.resolve_conv_impl``: ``"im2col"`` on CPU, ``"lax"`` on
        other backends. With ``"im2col"`` and batch statistics, a block with
        narrow patches (the first, on greyscale or RGB images) computes its
        convolution and batch norm together as ``ops.conv_batch_norm`` (its
        bias, which cancels, gets a zero gradient).
      eps: added to the variance in the normalisation.
      momentum: the running averages' decay with ``norm="running"`` (0.9: the
        0.1 of PyTorch's convention, as in MAML++).
      per_step_norm: ``S > 0`` gives every block ``S`` sets of running
        statistics and of norm scale/offset, one per inner step (MAML++'s BNRS
        and BNWB; ``S = K + 1`` for ``K`` inner steps): ``__call__``'s ``step``
        picks set ``min(step, S − 1)`` (``None``: the last, the adapted
        model's). Needs ``norm="running"``; pair it with
        ``maml_plus_plus(..., has_state=True, per_step_norm=True)``, which
        passes the inner step to the loss.
      param_dtype: dtype of the parameters (float32, also under ``jax_enable_x64``).
      dtype: compute dtype of the convolutions and the head (e.g. ``jnp.bfloat16``
        for mixed precision: parameters stay ``param_dtype``, normalisation
        statistics and the logits are computed in float32); ``None``: as inputs.

    Inputs ``(N, H, W, C)`` give logits ``(N, num_classes)``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> model = Conv4(num_classes=5, filters=8)
      >>> x = jnp.zeros((2, 28, 28, 1))
      >>> params = model.init(jax.random.key(0), x)["params"]
      >>> model.apply({"params": params}, x).shape
      (2, 5)
    """

    num_classes: int | None
    filters: int = 64
    downsample: str = "stride"
    head: str = "mean"
    norm: str = "transductive"
    norm_scale: bool = True
    conv_impl: str = "auto"
    eps: float = 1e-5
    momentum: float = 0.9
    per_step_norm: int = 0
    param_dtype: Any = jnp.float32
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True, step: Any = None) -> jax.Array:
        self._check(x)
        conv_impl = ops.resolve_conv_impl(self.conv_impl)
        slot = None
        if self.per_step_norm:
            last = self.per_step_norm - 1
            slot = last if step is None else jnp.minimum(step, last)
        for block in range(4):
            x = self._conv_and_norm(x, block, conv_impl, train, slot)
            x = nn.relu(x)
            if self.downsample == "maxpool":  # "stride": the convolution strided
                x = ops.max_pool_2x2(x)
        x = x.mean(axis=(1, 2)) if self.head == "mean" else x.reshape(x.shape[0], -1)
        if self.num_classes is None:
            return x
        logits = nn.Dense(
            self.num_classes,
            name="head",
            param_dtype=self.param_dtype,
            dtype=self.dtype,
        )(x)
        return logits.astype(jnp.promote_types(logits.dtype, jnp.float32))

    def _check(self, x: jax.Array) -> None:
        if x.ndim != 4:
            raise ValueError(
                f"Conv4 expects images (N, H, W, C); got shape {x.shape}. A task "
                f"batch goes through meta_value_and_grad, which strips the task axis."
            )
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}; got {self.norm!r}.")
        if self.downsample not in ("stride", "maxpool"):
            raise ValueError("downsample must be 'stride' or 'maxpool'.")
        if self.per_step_norm and self.norm != "running":
            raise ValueError(
                "per_step_norm keeps per-step running statistics: it needs "
                "norm='running'."
            )

    def _conv_and_norm(
        self, x: jax.Array, block: int, conv_impl: str, train: bool, slot: Any
    ) -> jax.Array:
        """A block's 3×3 convolution (stride 2 when it downsamples) and its
        normalisation."""
        stride = 2 if self.downsample == "stride" else 1
        kernel = self.param(
            f"conv{block}_kernel",
            nn.initializers.lecun_normal(),
            (3, 3, x.shape[-1], self.filters),
            self.param_dtype,
        )
        bias = self.param(
            f"conv{block}_bias",
            nn.initializers.zeros,
            (self.filters,),
            self.param_dtype,
        )
        if self.dtype is not None:
            x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        if self._normalizes_patches(conv_impl, kernel.shape):
            # One op from the patches' covariance; the bias cancels in the
            # normalisation.
            scale, offset = self._norm_params(block)
            return ops.conv_batch_norm(
                x, kernel, scale, offset, stride=stride, eps=self.eps
            )
        x = ops.conv2d(x, kernel, stride=stride, impl=conv_impl)
        x = x.astype(jnp.promote_types(x.dtype, jnp.float32)) + _channels(bias)
        return self._normalize(x, block, train, slot)

    def _normalizes_patches(
        self, conv_impl: str, kernel_shape: tuple[int, ...]
    ) -> bool:
        """Whether a block takes the ``ops.conv_batch_norm`` path: im2col, batch
        statistics and narrow patches (at most ``_PATCH_NORM_MAX_COLUMNS``)."""
        kh, kw, c_in, _ = kernel_shape
        return (
            conv_impl == "im2col"
            and self.norm == "transductive"
            and kh * kw * c_in <= _PATCH_NORM_MAX_COLUMNS
        )

    def _norm_params(
        self, block: int, slot: Any = None
    ) -> tuple[jax.Array | None, jax.Array]:
        """The block's normalisation ``(scale or None, offset)``, ``(filters,)``
        (with ``per_step_norm``, the row ``slot`` of ``(S, filters)`` ones)."""
        shape = (self.filters,)
        if self.per_step_norm:
            shape = (self.per_step_norm, self.filters)
        pick = (lambda v: v) if slot is None else (lambda v: v[slot])
        scale = None
        if self.norm_scale:
            scale = pick(
                self.param(
                    f"norm{block}_scale", nn.initializers.ones, shape, self.param_dtype
                )
            )
        offset = pick(
            self.param(
                f"norm{block}_offset", nn.initializers.zeros, shape, self.param_dtype
            )
        )
        return scale, offset

    def _normalize(self, x: jax.Array, block: int, train: bool, slot: Any) -> jax.Array:
        if self.norm == "none":
            return x
        if self.norm == "running":
            x = self._running_standardize(x, block, train, slot)
        elif self.norm == "support":
            x = self._support_standardize(x, block, train)
        else:
            axes = (0, 1, 2) if self.norm == "transductive" else (1, 2, 3)
            x = ops.standardize(x, axes, self.eps)
        scale, offset = self._norm_params(block, slot)
        if scale is not None:
            x = x * _channels(scale)
        return x + _channels(offset)

    def _support_standardize(self, x: jax.Array, block: int, train: bool) -> jax.Array:
        """``norm="support"``: batch statistics in training mode (kept, with the
        batch size, differentiable); in inference mode each example's moments
        pooled with the kept ones."""
        c, f32 = (self.filters,), jnp.float32
        mean = self.variable("batch_stats", f"norm{block}_mean", jnp.zeros, c, f32)
        var = self.variable("batch_stats", f"norm{block}_var", jnp.ones, c, f32)
        count = self.variable("batch_stats", f"norm{block}_count", jnp.zeros, (), f32)
        if train:
            if not self.is_initializing():
                # Differentiable: the query pass is differentiated through them,
                # as through batch statistics.
                mean.value, var.value = x.mean((0, 1, 2)), x.var((0, 1, 2))
                count.value = jnp.asarray(x.shape[0], jnp.float32)
            return ops.standardize(x, (0, 1, 2), self.eps)
        return ops.pooled_standardize(x, mean.value, var.value, count.value, self.eps)

    def _running_standardize(
        self, x: jax.Array, block: int, train: bool, slot: Any
    ) -> jax.Array:
        """Batch norm's standardisation with running averages (``norm="running"``;
        with ``per_step_norm``, the averages of row ``slot``)."""
        shape, dtype = (self.filters,), jnp.float32
        if self.per_step_norm:
            shape = (self.per_step_norm, self.filters)
        mean = self.variable(
            "batch_stats", f"norm{block}_mean", jnp.zeros, shape, dtype
        )
        var = self.variable("batch_stats", f"norm{block}_var", jnp.ones, shape, dtype)
        get = (lambda v: v.value) if slot is None else (lambda v: v.value[slot])
        if not train:
            return (x - _channels(get(mean))) * jax.lax.rsqrt(
                _channels(get(var)) + self.eps
            )
        if not self.is_initializing():
            # Like flax.linen.BatchNorm: init leaves the averages at (0, 1).
            batch = jax.lax.stop_gradient(x)
            m = self.momentum
            new_mean = m * get(mean) + (1 - m) * batch.mean((0, 1, 2))
            new_var = m * get(var) + (1 - m) * batch.var((0, 1, 2))
            if slot is None:
                mean.value, var.value = new_mean, new_var
            else:
                mean.value = mean.value.at[slot].set(new_mean)
                var.value = var.value.at[slot].set(new_var)
        return ops.standardize(x, (0, 1, 2), self.eps)


def _channels(v: jax.Array) -> jax.Array:
    """Reshapes a per-channel vector to broadcast against NHWC activations."""
    return v.reshape(1, 1, 1, -1)
