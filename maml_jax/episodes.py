"""N-way K-shot episodes sampled on device from an in-memory class array.

The dataset is one array ``(num_classes, num_examples, H, W, C)`` already on the
device; sampling is a pure function of a PRNG key, so it runs inside the jitted
meta-train step and no Python data loader sits in the training loop.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from maml_jax import _validation
from maml_jax.types import Task, TaskBatch


class EpisodeSpec(NamedTuple):
    """The shape of an N-way K-shot episode.

    Attributes:
      ways: classes per task (N).
      shots: support examples per class (K).
      queries: query examples per class.
      rotations: if True, each of the ``num_classes`` stored classes stands for four
        classes (rotated by 0, 90, 180, 270 degrees), as in Vinyals et al. (2016)
        and the MAML paper's Omniglot protocol: class index ``4 c + r`` is stored
        class ``c`` rotated by ``r · 90°`` counter-clockwise.
    """

    ways: int
    shots: int
    queries: int
    rotations: bool = False


def check_episode_spec(spec: EpisodeSpec, data_shape: tuple[int, ...]) -> None:
    """Raises a clear ``ValueError`` if ``spec`` cannot be sampled from the data."""
    if len(data_shape) != 5:
        raise ValueError(
            f"the class array must have shape (num_classes, num_examples, H, W, C); "
            f"got shape {tuple(data_shape)}."
        )
    ways = _validation.check_positive_int("ways", spec.ways)
    shots = _validation.check_positive_int("shots", spec.shots)
    queries = _validation.check_positive_int("queries", spec.queries)
    num_classes, num_examples = data_shape[0], data_shape[1]
    available = num_classes * (4 if spec.rotations else 1)
    if ways > available:
        raise ValueError(
            f"ways={ways} is more than the {available} classes available"
            f"{' (with rotations)' if spec.rotations else ''}; use ways <= {available}."
        )
    if shots + queries > num_examples:
        raise ValueError(
            f"shots + queries = {shots} + {queries} = {shots + queries} is more than "
            f"the {num_examples} examples per class; use shots + queries <= "
            f"{num_examples}."
        )
    if spec.rotations and data_shape[2] != data_shape[3]:
        raise ValueError(
            f"rotations need square images; got H={data_shape[2]}, W={data_shape[3]}."
        )


def sample_episode(key: jax.Array, data: jax.Array, spec: EpisodeSpec) -> Task:
    """Samples one N-way K-shot task from ``data`` (usable under ``jit``/``vmap``).

    Classes are drawn uniformly without replacement, examples within each class
    without replacement (so support and query never share an example), and the
    class order (hence the label assignment) is a uniformly random permutation.

    Args:
      key: PRNG key.
      data: ``(num_classes, num_examples, H, W, C)``.
      spec: ways, shots, queries and whether rotations are extra classes.

    Returns:
      ``Task(support=(x, y), query=(x, y))`` with ``x`` of shape
      ``(ways * shots, H, W, C)`` / ``(ways * queries, H, W, C)`` and integer labels
      ``y`` in ``[0, ways)``, grouped by class (label ``i`` for rows
      ``i * shots ... (i + 1) * shots - 1``).
    """
    check_episode_spec(spec, data.shape)
    num_classes, num_examples = data.shape[:2]
    per_class = spec.shots + spec.queries
    key_classes, key_examples = jax.random.split(key)
    num_labels = num_classes * (4 if spec.rotations else 1)
    classes = _draw_without_replacement(key_classes, num_labels, spec.ways)
    example_keys = jax.random.split(key_examples, spec.ways)
    examples = jax.vmap(
        lambda k: _draw_without_replacement(k, num_examples, per_class)
    )(example_keys)
    stored = classes // 4 if spec.rotations else classes
    images = data[stored[:, None], examples]  # (ways, per_class, H, W, C)
    if spec.rotations:
        images = jax.vmap(_rotate)(images, classes % 4)
    labels = jnp.broadcast_to(jnp.arange(spec.ways)[:, None], (spec.ways, per_class))

    def split(a, lo, hi):
        part = a[:, lo:hi]
        return part.reshape(-1, *part.shape[2:])

    support = (split(images, 0, spec.shots), split(labels, 0, spec.shots))
    query = (split(images, spec.shots, per_class), split(labels, spec.shots, per_class))
    return Task(support=support, query=query)


def sample_episodes(
    key: jax.Array, data: jax.Array, spec: EpisodeSpec, num_tasks: int
) -> TaskBatch:
    """Samples ``num_tasks`` independent episodes as a ``TaskBatch``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> data = jnp.zeros((10, 20, 28, 28, 1))
      >>> tasks = sample_episodes(jax.random.key(0), data, EpisodeSpec(5, 1, 15), 4)
      >>> tasks.support[0].shape, tasks.query[1].shape
      ((4, 5, 28, 28, 1), (4, 75))
    """
    num_tasks = _validation.check_positive_int("num_tasks", num_tasks)
    check_episode_spec(spec, data.shape)
    keys = jax.random.split(key, num_tasks)
    # vmap keeps the Task type of one episode; the stacked episodes are a batch.
    tasks = jax.vmap(sample_episode, in_axes=(0, None, None))(keys, data, spec)
    return TaskBatch(*tasks)


def _draw_without_replacement(key: jax.Array, n: int, k: int) -> jax.Array:
    """``k`` distinct integers of ``[0, n)``, a uniformly random ordered draw.

    The indices of the ``k`` largest of ``n`` i.i.d. uniforms: the same
    distribution as ``jax.random.choice(..., replace=False)``, which shuffles all
    ``n``: much slower when ``n`` is large and ``k`` small, as when an Omniglot
    episode draws its classes from thousands inside every meta-step.
    """
    return jax.lax.top_k(jax.random.uniform(key, (n,)), k)[1]


def _rotate(images: jax.Array, quarter_turns: jax.Array) -> jax.Array:
    """Rotates ``(n, H, W, C)`` images by ``quarter_turns · 90°`` counter-clockwise."""
    rotations = [jnp.rot90(images, k, axes=(1, 2)) for k in range(4)]
    return jnp.select([quarter_turns == k for k in range(4)], rotations)
