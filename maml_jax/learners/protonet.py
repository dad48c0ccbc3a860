"""Prototypical Networks: a metric-based learner behind the ``MetaLearner`` contract.

ProtoNets take no inner gradient step: a task is "adapted to" by averaging the
support embeddings of each class into a prototype, and a query example is
classified by a softmax over its negative distances to the prototypes. Sharing
``Task``, ``MetaLearner`` and its aux keys with ``maml`` lets ProtoNets use the
same train loop, ``evaluate`` and benchmarks as the gradient-based learners.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Literal, Protocol

import jax
import jax.numpy as jnp
import optax

from maml_jax import _validation
from maml_jax.types import Aux, Batch, MetaLearner, Params, Task

Distance = Literal["sqeuclidean", "cosine"]
DISTANCES = ("sqeuclidean", "cosine")
_COSINE_EPS = 1e-16  # floor on squared norms (norms below 1e-8 count as 1e-8).


class EmbedFn(Protocol):
    """``embed_fn(params, inputs) -> embeddings`` of shape ``(num_examples, dim)``."""

    def __call__(self, params: Params, inputs: Any) -> jax.Array: ...


def class_prototypes(embeddings: jax.Array, labels: jax.Array, ways: int) -> jax.Array:
    r"""Class means of the embeddings: ``c_k = (1/|S_k|) Σ_{i: y_i = k} f(x_i)``.

    Computed as a one-hot matmul, so it works under ``jit``, ``vmap`` and
    ``grad`` and allows any number of examples per class (unbalanced shots). A
    class with no example (``|S_k| = 0``) gets the zero vector: the sum is
    divided by ``max(|S_k|, 1)``, so nothing becomes NaN. Labels outside
    ``[0, ways)`` are not checked (their values are traced) and are ignored.

    Args:
      embeddings: ``(n, d)`` floating-point embeddings ``f(x_i)``.
      labels: ``(n,)`` integer labels ``y_i`` in ``[0, ways)``.
      ways: the number of classes ``N`` (static).

    Returns:
      The prototypes, ``(ways, d)``, in the dtype of ``embeddings``.

    Examples:
      >>> import jax.numpy as jnp
      >>> emb = jnp.array([[0.0, 0.0], [4.0, 0.0], [0.0, 2.0], [4.0, 2.0]])
      >>> class_prototypes(emb, jnp.array([0, 1, 0, 1]), 3).tolist()
      [[0.0, 1.0], [4.0, 1.0], [0.0, 0.0]]
    """
    one_hot = jax.nn.one_hot(labels, ways, dtype=embeddings.dtype)  # (n, ways)
    counts = jnp.sum(one_hot, axis=0)
    return (one_hot.T @ embeddings) / jnp.maximum(counts, 1)[:, None]


def prototype_logits(
    embeddings: jax.Array, prototypes: jax.Array, distance: Distance = "sqeuclidean"
) -> jax.Array:
    r"""Negative distances ``logits_{ik} = −d(f(x_i), c_k)``.

    ``"sqeuclidean"``: ``d(z, c) = ‖z − c‖²`` (the paper's choice, which makes
    the classifier linear in ``z``). ``"cosine"``: ``d(z, c) = 1 − z·c /
    (max(‖z‖, ε) max(‖c‖, ε))`` with ``ε = 1e-8``, so a zero vector is at
    cosine 0 to everything.

    Args:
      embeddings: ``(n, d)``.
      prototypes: ``(ways, d)``.
      distance: ``"sqeuclidean"`` or ``"cosine"``.

    Returns:
      ``(n, ways)`` logits.

    Examples:
      >>> import jax.numpy as jnp
      >>> z = jnp.array([[1.0, 1.0]]); c = jnp.array([[0.0, 1.0], [4.0, 1.0]])
      >>> prototype_logits(z, c).tolist()
      [[-1.0, -9.0]]
    """
    if distance == "sqeuclidean":
        diff = embeddings[:, None, :] - prototypes[None, :, :]
        return -jnp.sum(jnp.square(diff), axis=-1)
    if distance == "cosine":
        return _unit(embeddings) @ _unit(prototypes).T - 1
    raise ValueError(f"distance must be one of {DISTANCES}; got {distance!r}.")


def protonet(
    embed_fn: EmbedFn,
    *,
    ways: int,
    distance: Distance = "sqeuclidean",
    scale: float = 1.0,
    has_state: bool = False,
) -> MetaLearner:
    r"""Prototypical Networks (ProtoNets) as a ``MetaLearner``.

    With embedding ``f_θ = embed_fn(θ, ·)`` and a support set ``S`` whose
    examples of class ``k`` form ``S_k``, the prototypes and the query
    class probabilities are

    .. math::

      c_k = \frac{1}{|S_k|} \sum_{(x_i, y_i) \in S_k} f_θ(x_i), \qquad
      p_θ(y = k \mid x) = \frac{\exp(−s\, d(f_θ(x), c_k))}
                               {\sum_{k'} \exp(−s\, d(f_θ(x), c_{k'}))},

    and the meta-loss is the mean query cross-entropy
    ``L = −(1/|Q|) Σ_{(x, y) ∈ Q} log p_θ(y | x)``, differentiated through the
    prototypes with ``jax.grad``. There is no inner gradient step.

    ``embed_fn`` plays the role ``loss_fn`` plays for ``maml``; the batches of a
    ``Task`` are ``(inputs, labels)`` with ``inputs`` anything ``embed_fn``
    accepts (one leading example axis) and integer ``labels`` of shape
    ``(num_examples,)`` in ``[0, ways)``, e.g. the episodes of
    ``sample_episodes``. Any number of support examples per class is allowed;
    a class without one gets a zero prototype (see ``class_prototypes``). Label
    values are traced, so they are not range-checked.

    Support and query are embedded by separate ``embed_fn`` calls, so a model
    whose output depends on the whole batch (``Conv4``'s transductive batch
    norm) normalises each with its own statistics, as ``maml`` does.

    The learner's functions:

    * ``init(params) -> params`` (identity: the meta-parameters are ``θ``).
    * ``adapt(θ, support, *, num_steps=None) -> θ``: the embedding parameters,
      unchanged (there is no inner step; ``num_steps`` is accepted for the
      common contract and ignored).
    * ``predict(θ, support, inputs, *, num_steps=None)``: the task's
      classifier, ``scale * prototype_logits(embed_fn(θ, inputs), prototypes,
      distance)`` with the support's prototypes; ``maml_jax.predict`` calls it.
    * ``meta_loss(θ, task) -> (L, aux)`` with ``maml``'s aux keys
      ``support_loss_pre/post``, ``query_loss_pre/post`` and
      ``query_accuracy_pre/post``. With no inner step, pre and post are the
      same value: the metrics of the prototype classifier. The support loss
      classifies the support examples by the prototypes they define.
    * ``adaptation_curve(θ, task, num_steps)``: ``support_loss``,
      ``query_loss``, ``query_accuracy`` of shape ``(num_steps + 1,)``,
      constant along the steps, so curves compare with MAML's at every step.

    Args:
      embed_fn: ``embed_fn(params, inputs) -> (num_examples, dim)`` embeddings.
      ways: ``N``, the number of classes per task (static; labels are in
        ``[0, ways)``).
      distance: ``"sqeuclidean"`` (default, as in the paper) or ``"cosine"``.
      scale: ``s > 0``, a fixed factor on the logits (an inverse temperature);
        mostly useful with ``"cosine"``, whose logits lie in ``[−2, 0]``.
      has_state: whether the embedding carries model state (BatchNorm running
        statistics): ``embed_fn(params, state, inputs, *, training) ->
        (embeddings, new_state)``. The learner's functions then take
        ``state=``; ``meta_loss`` threads it through the support and the query
        pass (training mode) and returns ``(loss, (aux, new_state))``;
        ``adapt`` returns ``(params, state)``; ``predict`` and
        ``adaptation_curve`` embed the support set as in meta-training (its
        batch statistics) and the queries in inference mode.

    Returns:
      A ``MetaLearner`` with ``init``, ``adapt``, ``meta_loss``,
      ``adaptation_curve`` and ``predict``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from maml_jax import Task
      >>> from maml_jax import protonet
      >>> embed_fn = lambda w, x: x @ w  # a linear embedding
      >>> learner = protonet(embed_fn, ways=2)
      >>> support = (jnp.array([[0.0, 0.0], [4.0, 0.0], [0.0, 2.0], [4.0, 2.0]]),
      ...            jnp.array([0, 1, 0, 1]))
      >>> query = (jnp.array([[0.0, 1.0], [4.0, 1.0]]), jnp.array([0, 1]))
      >>> task = Task(support=support, query=query)
      >>> logits = learner.predict(jnp.eye(2), support, query[0])
      >>> jnp.argmax(logits, axis=-1).tolist()
      [0, 1]
      >>> loss, aux = learner.meta_loss(jnp.eye(2), task)
      >>> float(aux["query_accuracy_post"]), bool(loss < 1e-6)  # log(1 + e^-16)
      (1.0, True)

    References:
      Snell, Swersky & Zemel, "Prototypical Networks for Few-shot Learning",
      NeurIPS 2017.
    """
    if not callable(embed_fn):
        raise TypeError(
            f"embed_fn must be a function embed_fn(params, inputs) -> (n, dim) "
            f"embeddings; got {type(embed_fn).__name__}."
        )
    ways = _validation.check_positive_int("ways", ways)
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}; got {distance!r}.")
    scale = _check_scale(scale)

    if not isinstance(has_state, bool):
        raise TypeError(f"has_state must be True or False; got {has_state!r}.")

    def check_state(state: Any, where: str) -> None:
        if has_state and state is None:
            raise ValueError(
                f"{where}: the learner was built with has_state=True, so it needs "
                f"the model state: pass state=... (e.g. train_state.model_state)."
            )
        if not has_state and state is not None:
            raise ValueError(
                f"{where} got a model state, but the learner was built without "
                f"has_state=True, so its embed_fn takes none."
            )

    def embed(params, state, inputs, num_labels, where, training):
        if has_state:
            call = "embed_fn(params, state, inputs, training=...)"
            out = embed_fn(params, state, inputs, training=training)
            if not (isinstance(out, tuple) and len(out) == 2):
                raise TypeError(
                    f"{call} with has_state=True must return (embeddings, "
                    f"new_state); got {type(out).__name__}."
                )
            embeddings, new_state = out
            _validation.check_state_structure(state, new_state, call)
            new_state = jax.lax.stop_gradient(new_state)
        else:
            embeddings, new_state = embed_fn(params, inputs), state
        _check_embeddings(embeddings, num_labels, where)
        return embeddings, new_state

    def classify(embeddings, labels, prototypes) -> tuple[jax.Array, jax.Array]:
        logits = scale * prototype_logits(embeddings, prototypes, distance)
        loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
        correct = jnp.argmax(logits, axis=-1) == labels
        accuracy = jnp.mean(correct.astype(logits.dtype))
        return loss, accuracy

    def episode(params, task, where, state, query_training) -> tuple[Aux, Any]:
        _validation.check_task(task, where)
        s_inputs, s_labels = _unpack(task.support, f"{where}: task.support")
        q_inputs, q_labels = _unpack(task.query, f"{where}: task.query")
        _check_support_matches_query(s_inputs, q_inputs, where)
        s_emb, support_state = embed(
            params, state, s_inputs, len(s_labels), f"{where}: task.support", True
        )
        if query_training:  # meta-training: the query pass continues the state
            state = support_state
        q_emb, state = embed(
            params,
            state,
            q_inputs,
            len(q_labels),
            f"{where}: task.query",
            query_training,
        )
        prototypes = class_prototypes(s_emb, s_labels, ways)
        q_loss, q_accuracy = classify(q_emb, q_labels, prototypes)
        s_loss, _ = classify(s_emb, s_labels, prototypes)
        metrics = {
            "support_loss": s_loss,
            "query_loss": q_loss,
            "query_accuracy": q_accuracy,
        }
        return metrics, state

    def init(params: Params) -> Params:
        _validation.check_params(params, "init")
        return params

    def adapt(
        meta_params: Params,
        support: Batch,
        *,
        num_steps: int | None = None,
        state: Any = None,
        training: bool = False,
    ) -> Any:
        del num_steps, training
        check_state(state, "adapt")
        _validation.check_examples(support, "adapt: support")
        _unpack(support, "adapt: support")
        return (meta_params, state) if has_state else meta_params

    def predict(
        meta_params: Params,
        support: Batch,
        inputs: Any,
        *,
        num_steps: int | None = None,
        state: Any = None,
    ) -> jax.Array:
        del num_steps
        check_state(state, "predict")
        _validation.check_examples(support, "predict: support")
        s_inputs, s_labels = _unpack(support, "predict: support")
        s_emb, _ = embed(
            meta_params, state, s_inputs, s_labels.shape[0], "predict: support", True
        )
        prototypes = class_prototypes(s_emb, s_labels, ways)
        _check_support_matches_query(s_inputs, inputs, "predict")
        embeddings, _ = embed(
            meta_params, state, inputs, None, "predict: inputs", False
        )
        return scale * prototype_logits(embeddings, prototypes, distance)

    def meta_loss(
        meta_params: Params, task: Task, *, outer_step: Any = None, state: Any = None
    ) -> tuple[jax.Array, Any]:
        del outer_step
        check_state(state, "meta_loss")
        metrics, new_state = episode(meta_params, task, "meta_loss", state, True)
        loss = metrics["query_loss"]
        metrics = jax.lax.stop_gradient(metrics)
        aux = {}
        for name, value in metrics.items():
            aux[f"{name}_pre"] = value
            aux[f"{name}_post"] = value
        return (loss, (aux, new_state)) if has_state else (loss, aux)

    def adaptation_curve(
        meta_params: Params, task: Task, num_steps: int, *, state: Any = None
    ) -> Aux:
        num_steps = _validation.check_positive_int("num_steps", num_steps)
        check_state(state, "adaptation_curve")
        metrics, _ = episode(meta_params, task, "adaptation_curve", state, False)
        return {k: jnp.full((num_steps + 1,), v) for k, v in metrics.items()}

    return MetaLearner(
        init, adapt, meta_loss, adaptation_curve, predict, has_state=has_state
    )


def _unit(x: jax.Array) -> jax.Array:
    """Rows scaled to unit norm; rows of norm below 1e-8 are divided by 1e-8.

    So a zero row stays zero (cosine 0 to everything) instead of becoming NaN.
    """
    squared = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(squared, _COSINE_EPS))


def _check_scale(scale: Any) -> float:
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a Python number > 0; got {scale!r}.")
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a finite number > 0; got {scale!r}.")
    return float(scale)


def _unpack(batch: Any, where: str) -> tuple[Any, jax.Array]:
    """Splits ``(inputs, labels)`` and checks the labels' dtype and shape."""
    if not (isinstance(batch, tuple | list) and len(batch) == 2):
        raise TypeError(
            f"{where} must be a pair (inputs, labels); got {type(batch).__name__}."
        )
    inputs, labels = batch
    dtype = jnp.result_type(labels)
    if not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(
            f"{where}: labels must be integers in [0, ways); got dtype {dtype}. "
            f"For one-hot labels pass jnp.argmax(one_hot, axis=-1)."
        )
    if jnp.ndim(labels) != 1:
        raise ValueError(
            f"{where}: labels must have shape (num_examples,); got shape "
            f"{jnp.shape(labels)}. A batch of tasks goes through "
            f"meta_value_and_grad, which strips the task axis."
        )
    return inputs, labels


def _check_embeddings(embeddings: Any, num_labels: int | None, where: str) -> None:
    shape = jnp.shape(embeddings)
    if len(shape) != 2 or shape[0] != (shape[0] if num_labels is None else num_labels):
        raise ValueError(
            f"{where}: embed_fn must return embeddings of shape (num_examples, dim) "
            f"with one row per label ({num_labels}); got shape {shape}."
        )
    if not jnp.issubdtype(jnp.result_type(embeddings), jnp.floating):
        raise TypeError(
            f"{where}: embed_fn must return floating-point embeddings; got "
            f"{jnp.result_type(embeddings)}."
        )


def _check_support_matches_query(s_inputs: Any, q_inputs: Any, where: str) -> None:
    """Support and query inputs must agree on everything but the example axis."""
    for s, q in zip(jax.tree.leaves(s_inputs), jax.tree.leaves(q_inputs), strict=True):
        if jnp.shape(s)[1:] != jnp.shape(q)[1:]:
            raise ValueError(
                f"{where}: support and query inputs differ beyond the example axis: "
                f"support {jnp.shape(s)}, query {jnp.shape(q)}."
            )
