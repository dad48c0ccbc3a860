"""Properties of the on-device N-way K-shot episode sampler."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maml_jax.episodes import EpisodeSpec, sample_episode, sample_episodes

NUM_CLASSES, NUM_EXAMPLES = 12, 20


def _coded_data():
    """Every pixel of image (c, e) holds the code ``c * 100 + e``."""
    codes = np.arange(NUM_CLASSES)[:, None] * 100 + np.arange(NUM_EXAMPLES)[None]
    return jnp.asarray(
        np.broadcast_to(
            codes[..., None, None, None], (NUM_CLASSES, NUM_EXAMPLES, 2, 2, 1)
        )
    ).astype(jnp.float32)


def _decode(x):
    code = np.asarray(x[..., 0, 0, 0]).astype(int)
    return code // 100, code % 100


def test_shapes_labels_and_sampling_without_replacement():
    spec = EpisodeSpec(ways=5, shots=3, queries=4)
    tasks = jax.jit(lambda k: sample_episodes(k, _coded_data(), spec, 64))(
        jax.random.key(0)
    )
    (xs, ys), (xq, yq) = tasks.support, tasks.query
    assert xs.shape == (64, 15, 2, 2, 1) and xq.shape == (64, 20, 2, 2, 1)
    assert ys.dtype.kind == "i"
    np.testing.assert_array_equal(ys[0], np.repeat(np.arange(5), 3))
    np.testing.assert_array_equal(yq[0], np.repeat(np.arange(5), 4))
    s_class, s_example = _decode(xs)
    q_class, q_example = _decode(xq)
    for t in range(64):
        # One class per label, the same class in support and query.
        s_by_label = s_class[t].reshape(5, 3)
        q_by_label = q_class[t].reshape(5, 4)
        assert np.all(s_by_label == s_by_label[:, :1])
        assert np.all(q_by_label == s_by_label[:, :1])
        assert len(set(s_by_label[:, 0])) == 5  # no class repeated in a task
        for label in range(5):
            used = np.concatenate(
                [s_example[t].reshape(5, 3)[label], q_example[t].reshape(5, 4)[label]]
            )
            assert len(set(used)) == 7  # support and query disjoint, no repeats


def test_classes_are_uniform_and_labels_randomly_permuted():
    spec = EpisodeSpec(ways=4, shots=1, queries=1)
    tasks = sample_episodes(jax.random.key(1), _coded_data(), spec, 6000)
    classes, _ = _decode(tasks.support[0])  # (6000, 4): class of label 0..3
    counts = np.bincount(classes.ravel(), minlength=NUM_CLASSES)
    expected = 6000 * 4 / NUM_CLASSES
    chi2 = np.sum((counts - expected) ** 2 / expected)
    assert chi2 < 31.3  # chi-square, 11 dof, p = 0.001
    # Every class appears under every label equally often.
    for label in range(4):
        per_label = np.bincount(classes[:, label], minlength=NUM_CLASSES)
        chi2 = np.sum((per_label - 500) ** 2 / 500)
        assert chi2 < 31.3


def test_rotations_are_extra_classes():
    image = np.zeros((4, 4), np.float32)
    image[0, 1] = 1.0  # asymmetric, so every rotation differs
    data = jnp.asarray(np.broadcast_to(image[None, None, :, :, None], (1, 20, 4, 4, 1)))
    spec = EpisodeSpec(ways=4, shots=1, queries=0 + 1, rotations=True)
    task = sample_episode(jax.random.key(2), data, spec)
    seen = {tuple(np.asarray(x[..., 0]).ravel()) for x in task.support[0]}
    expected = {tuple(np.rot90(image, k).ravel()) for k in range(4)}
    assert seen == expected  # 4 ways from 1 stored class = its 4 rotations
    # Query images carry the same rotation as their class's support image.
    np.testing.assert_array_equal(task.support[0], task.query[0])


@pytest.mark.parametrize(
    "spec,match",
    [
        (EpisodeSpec(13, 1, 1), "ways=13 is more than the 12 classes"),
        (EpisodeSpec(5, 10, 11), r"shots \+ queries = 10 \+ 11 = 21 is more than"),
        (EpisodeSpec(0, 1, 1), "ways must be >= 1"),
    ],
)
def test_impossible_episodes_are_reported(spec, match):
    with pytest.raises(ValueError, match=match):
        sample_episodes(jax.random.key(0), _coded_data(), spec, 2)


def test_bad_data_shape_is_reported():
    with pytest.raises(ValueError, match=r"\(num_classes, num_examples, H, W, C\)"):
        sample_episodes(
            jax.random.key(0), jnp.zeros((5, 20, 28, 28)), EpisodeSpec(2, 1, 1), 2
        )
