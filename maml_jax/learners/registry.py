"""One registry of the learners by name, for command lines and benchmarks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from maml_jax.learners.imaml import imaml
from maml_jax.learners.maml import anil, fomaml, maml
from maml_jax.learners.maml_plus_plus import maml_plus_plus
from maml_jax.learners.meta_sgd import meta_sgd
from maml_jax.learners.protonet import protonet
from maml_jax.learners.reptile import reptile
from maml_jax.types import MetaLearner

LEARNERS: dict[str, Callable[..., MetaLearner]] = {
    "maml": maml,
    "fomaml": fomaml,
    "anil": anil,
    "reptile": reptile,
    "meta_sgd": meta_sgd,
    "maml_plus_plus": maml_plus_plus,
    "imaml": imaml,
    "protonet": protonet,
}
"""Every learner factory by name. All but ``protonet`` are gradient-based."""

GRADIENT_LEARNERS = tuple(name for name in LEARNERS if name != "protonet")


def make_learner(name: str, fn: Callable[..., Any], **kwargs: Any) -> MetaLearner:
    """``LEARNERS[name](fn, **kwargs)``: the learner called ``name``.

    Args:
      name: a key of ``LEARNERS``.
      fn: the ``loss_fn`` (``embed_fn`` for ``protonet``).
      **kwargs: the factory's keywords.

    Examples:
      >>> import jax.numpy as jnp
      >>> loss_fn = lambda w, b: jnp.mean((b[0] @ w - b[1]) ** 2)
      >>> learner = make_learner("fomaml", loss_fn, inner_lr=0.1, num_inner_steps=1)
      >>> learner.init(jnp.zeros(2)).shape
      (2,)
    """
    if name not in LEARNERS:
        raise ValueError(
            f"unknown learner {name!r}; choose from {', '.join(LEARNERS)}."
        )
    return LEARNERS[name](fn, **kwargs)
