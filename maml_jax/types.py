"""Types shared across maml_jax: pytree aliases, ``Task`` and ``MetaLearner``."""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

import jax

Params = Any
"""A pytree of arrays: the parameters a ``loss_fn`` is evaluated at."""

MetaParams = Any
"""A pytree of meta-parameters (MAML: the initialisation; Meta-SGD: and rates)."""

Batch = Any
"""Any pytree of arrays a ``loss_fn`` understands, e.g. ``(inputs, targets)``."""

Aux = dict[str, jax.Array]
"""Diagnostics returned beside a loss: a flat dict of arrays."""

ModelState = Any
"""A pytree of model state that is not differentiated (BatchNorm running
statistics); ``None`` for stateless models."""


class Task(NamedTuple):
    """One few-shot task, or a batch of tasks when every leaf has a leading task axis.

    Attributes:
      support: the batch the inner loop adapts on (the "K shots").
      query: the batch the adapted parameters are evaluated on.
    """

    support: Batch
    query: Batch


class LossFn(Protocol):
    """``loss_fn(params, batch) -> loss``, or ``(loss, aux)`` with ``has_aux=True``."""

    def __call__(self, params: Params, batch: Batch) -> Any: ...


class StatefulLossFn(Protocol):
    """``loss_fn(params, state, batch, *, training) -> (loss, new_state)``.

    With ``has_aux=True`` it returns ``((loss, aux), new_state)``. ``training``
    is a static bool: ``True`` in meta-training (e.g. batch statistics, running
    averages updated in ``new_state``), ``False`` in evaluation and prediction
    (e.g. running averages used; ``new_state`` is ignored). Learners built with
    ``has_state=True`` take such a loss; no gradient flows through ``state``.
    """

    def __call__(
        self, params: Params, state: ModelState, batch: Batch, *, training: bool
    ) -> Any: ...


class ApplyFn(Protocol):
    """``apply_fn(params, inputs) -> outputs``: the model's forward pass."""

    def __call__(self, params: Params, inputs: Any) -> Any: ...


class InitFn(Protocol):
    """``init(params) -> meta_params``."""

    def __call__(self, params: Params) -> MetaParams: ...


class AdaptFn(Protocol):
    """``adapt(meta_params, support, *, num_steps=None) -> params``.

    Returns the adapted model parameters (the structure given to ``init``) of one
    task; ``num_steps=None`` runs the learner's trained number of inner steps.
    A learner with model state takes ``state=`` (and ``training``: the support
    passes' mode, default ``True`` as in meta-training) and returns
    ``(params, new_state)``.
    """

    def __call__(
        self, meta_params: MetaParams, support: Batch, *, num_steps: int | None = None
    ) -> Params: ...


class MetaLossFn(Protocol):
    """``meta_loss(meta_params, task, *, outer_step=None) -> (loss, aux)``.

    ``outer_step`` is the training progress (the number of meta-updates taken, a
    traced int), for learners whose meta-loss changes during training (MAML++'s
    annealed multi-step loss); the others ignore it. A learner with model
    state takes ``state=`` and returns ``(loss, (aux, new_state))``.
    """

    def __call__(
        self, meta_params: MetaParams, task: Task, *, outer_step: Any = None
    ) -> tuple[jax.Array, Aux]: ...


class CurveFn(Protocol):
    """``adaptation_curve(meta_params, task, num_steps) -> aux`` (leaves ``(K+1,)``).

    A learner with model state takes ``state=``: support passes as in
    meta-training, the query set in inference mode.
    """

    def __call__(self, meta_params: MetaParams, task: Task, num_steps: int) -> Aux: ...


class PredictFn(Protocol):
    """``predict(meta_params, support, inputs, *, num_steps=None) -> outputs``."""

    def __call__(
        self,
        meta_params: MetaParams,
        support: Batch,
        inputs: Any,
        *,
        num_steps: int | None = None,
    ) -> Any: ...


class MetaLearner(NamedTuple):
    """A meta-learning algorithm as a tuple of pure functions (optax style).

    Attributes:
      init: ``params -> meta_params``.
      adapt: ``(meta_params, support, *, num_steps=None) -> params``: the adapted
        model parameters of one task, with the structure given to ``init``.
      meta_loss: ``(meta_params, task, *, outer_step=None) -> (loss, aux)`` for
        one task; its gradient with respect to ``meta_params`` is the
        algorithm's meta-gradient.
      adaptation_curve: ``(meta_params, task, num_steps) -> aux`` whose leaves
        have shape ``(num_steps + 1,)``: query (and support) metrics after
        ``0..num_steps`` inner steps, for evaluation. ``num_steps`` is static.
      predict: ``None`` for learners whose adapted parameters are a model's
        parameters (predict with ``maml_jax.predict`` and the model's
        ``apply_fn``); otherwise the learner's own classifier (ProtoNets:
        negative distances to the support's class prototypes).
      has_state: whether the learner's loss carries model state
        (``StatefulLossFn``): its functions then take ``state=`` and
        ``adapt`` / ``meta_loss`` also return the new state.
    """

    init: InitFn
    adapt: AdaptFn
    meta_loss: MetaLossFn
    adaptation_curve: CurveFn
    predict: PredictFn | None = None
    has_state: bool = False
