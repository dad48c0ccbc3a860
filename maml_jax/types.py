"""Types shared across maml_jax: pytree aliases, `Task` and `MetaLearner`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import jax

Params = Any
"""A pytree of arrays: the parameters a ``loss_fn`` is evaluated at."""

MetaParams = Any
"""A pytree of meta-parameters (MAML: the initialisation; Meta-SGD: params and lrs)."""

Batch = Any
"""Any pytree of arrays a ``loss_fn`` understands, e.g. ``(inputs, targets)``."""

Aux = dict[str, jax.Array]
"""Diagnostics returned beside a loss: a flat dict of arrays."""


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


class InitFn(Protocol):
    def __call__(self, params: Params) -> MetaParams: ...


class AdaptFn(Protocol):
    def __call__(self, meta_params: MetaParams, support: Batch) -> Params: ...


class MetaLossFn(Protocol):
    def __call__(
        self, meta_params: MetaParams, task: Task
    ) -> tuple[jax.Array, Aux]: ...


class CurveFn(Protocol):
    def __call__(self, meta_params: MetaParams, task: Task, num_steps: int) -> Aux: ...


class MetaLearner(NamedTuple):
    """A meta-learning algorithm as a tuple of pure functions (optax style).

    Attributes:
      init: ``params -> meta_params``.
      adapt: ``(meta_params, support) -> task_params`` for one task.
      meta_loss: ``(meta_params, task) -> (loss, aux)`` for one task; its gradient
        with respect to ``meta_params`` is the algorithm's meta-gradient.
      adaptation_curve: ``(meta_params, task, num_steps) -> aux`` whose leaves
        have shape ``(num_steps + 1,)``: query (and support) metrics after
        ``0..num_steps`` inner steps, for evaluation. ``num_steps`` is static.
      at_step: optional ``outer_step -> MetaLearner``: the learner to use at a
        given (traced) outer step, for algorithms whose meta-loss is annealed
        during training (MAML++'s multi-step loss). ``None`` when the learner
        does not change; the train step calls it when present.
    """

    init: InitFn
    adapt: AdaptFn
    meta_loss: MetaLossFn
    adaptation_curve: CurveFn
    at_step: Callable[[jax.Array], MetaLearner] | None = None
