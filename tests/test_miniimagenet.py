"""Tests of maml_jax.datasets.miniimagenet on small generated fixtures.

No copy of mini-ImageNet is needed: each test writes a tiny split (3 classes of
6 images) in exactly the formats users have, the learn2learn pickle caches
and Ravi & Larochelle's ``images/`` + ``<split>.csv``.
"""

from __future__ import annotations

import csv
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from maml_jax.datasets import (
    DatasetError,
    DatasetNotFoundError,
    default_cache_dir,
    load_miniimagenet,
    miniimagenet,
)

WNIDS = ("n03000000", "n01000000", "n02000000")  # deliberately not sorted
PER_CLASS = 6


def _write_folder(root: Path, split: str = "train") -> dict[str, list[np.ndarray]]:
    """Writes ``images/*.jpg`` and ``<split>.csv``; returns the decoded pixels."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True, exist_ok=True)
    pixels: dict[str, list[np.ndarray]] = {}
    with open(root / f"{split}.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filename", "label"])
        for wnid in WNIDS:
            for i in range(PER_CLASS):
                name = f"{wnid}{i + 1:08d}.jpg"
                array = rng.integers(0, 256, (84, 84, 3), dtype=np.uint8)
                Image.fromarray(array).save(root / "images" / name, quality=90)
                with Image.open(root / "images" / name) as decoded:
                    pixels.setdefault(wnid, []).append(
                        np.asarray(decoded.convert("RGB"))
                    )
                writer.writerow([name, wnid])
    return pixels


def _write_pickle(
    root: Path,
    pixels: dict[str, list[np.ndarray]],
    split="train",
    protocol: int = pickle.DEFAULT_PROTOCOL,
    numpy_indices=False,
) -> Path:
    """Writes the learn2learn pickle holding ``pixels``, images in shuffled order."""
    flat = [(wnid, i) for wnid in pixels for i in range(len(pixels[wnid]))]
    order = np.random.default_rng(1).permutation(len(flat))
    image_data = np.stack([pixels[flat[j][0]][flat[j][1]] for j in order])
    position = {flat[j]: k for k, j in enumerate(order)}
    class_dict = {
        wnid: [position[(wnid, i)] for i in range(len(images))]
        for wnid, images in pixels.items()
    }
    if numpy_indices:
        class_dict = {k: np.array(v, np.int64) for k, v in class_dict.items()}
    path = root / f"mini-imagenet-cache-{split}.pkl"
    with open(path, "wb") as f:
        pickle.dump(
            {"image_data": image_data, "class_dict": class_dict}, f, protocol=protocol
        )
    return path


@pytest.fixture
def fixture(tmp_path) -> tuple[Path, Path, np.ndarray]:
    """Same data twice: ``(folder_dir, pickle_dir, expected uint8 array)``."""
    folder_dir, pickle_dir = tmp_path / "folder", tmp_path / "pickle"
    pickle_dir.mkdir()
    pixels = _write_folder(folder_dir)
    _write_pickle(pickle_dir, pixels)
    expected = np.stack([np.stack(pixels[w]) for w in sorted(WNIDS)])
    return folder_dir, pickle_dir, expected


def test_both_formats_load_the_same_array(fixture, tmp_path):
    folder_dir, pickle_dir, expected = fixture
    from_pickle = load_miniimagenet(pickle_dir, "train", strict=False)
    from_folder = load_miniimagenet(
        folder_dir, "train", strict=False, cache_dir=tmp_path / "cache"
    )
    assert from_pickle.images.shape == (3, PER_CLASS, 84, 84, 3)
    assert from_pickle.images.dtype == np.float32
    assert 0.0 <= from_pickle.images.min() and from_pickle.images.max() <= 1.0
    assert from_pickle.class_names == from_folder.class_names == tuple(sorted(WNIDS))
    np.testing.assert_array_equal(from_pickle.images, from_folder.images)
    np.testing.assert_allclose(from_pickle.images, expected / 255.0, atol=1e-7)
    raw = load_miniimagenet(
        folder_dir, "train", strict=False, dtype=np.uint8, cache_dir=tmp_path / "cache"
    )
    np.testing.assert_array_equal(raw.images, expected)


@pytest.mark.parametrize("protocol", [2, 4, 5])
@pytest.mark.parametrize("numpy_indices", [False, True])
def test_pickle_protocols_and_index_types(tmp_path, protocol, numpy_indices):
    pixels = _write_folder(tmp_path / "folder")
    _write_pickle(tmp_path, pixels, protocol=protocol, numpy_indices=numpy_indices)
    data = load_miniimagenet(tmp_path, "train", strict=False, dtype=np.uint8)
    np.testing.assert_array_equal(data.images[0], np.stack(pixels["n01000000"]))


def test_source_selection(fixture, tmp_path):
    folder_dir, pickle_dir, _ = fixture
    with pytest.raises(DatasetNotFoundError, match="mini-imagenet-cache-train.pkl"):
        load_miniimagenet(folder_dir, "train", source="pickle", strict=False)
    with pytest.raises(DatasetNotFoundError, match="train.csv"):
        load_miniimagenet(pickle_dir, "train", source="images", strict=False)
    with pytest.raises(DatasetNotFoundError) as info:
        load_miniimagenet(tmp_path / "empty", "val")
    assert isinstance(info.value, FileNotFoundError)
    assert "mini-imagenet-cache-val.pkl" in str(info.value)
    assert "val.csv" in str(info.value)


class _RunsACommand:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _CallsEval:
    def __reduce__(self):
        return (eval, ("1 + 1",))


@pytest.mark.parametrize("payload", ["os.system", "eval"])
def test_malicious_pickle_is_refused(tmp_path, payload):
    marker = tmp_path / "pwned"
    evil = _RunsACommand(f"touch {marker}") if payload == "os.system" else _CallsEval()
    path = tmp_path / "mini-imagenet-cache-train.pkl"
    path.write_bytes(pickle.dumps({"image_data": evil, "class_dict": {}}))
    expected = (
        r"refusing to load global (posix|nt)\.system"
        if payload == "os.system"
        else r"refusing to load global builtins\.eval"
    )
    with pytest.raises(DatasetError, match=expected) as info:
        load_miniimagenet(tmp_path, "train", strict=False)
    assert "NOT loaded" in str(info.value) and str(path) in str(info.value)
    assert not marker.exists()


def test_strict_counts(fixture):
    folder_dir, pickle_dir, _ = fixture
    for data_dir, name in [
        (pickle_dir, "mini-imagenet-cache-train.pkl"),
        (folder_dir, "train.csv"),
    ]:
        with pytest.raises(
            DatasetError, match="64 classes of 600 images, found 3"
        ) as info:
            load_miniimagenet(data_dir, "train", cache=False)
        assert name in str(info.value) and "strict=False" in str(info.value)


def test_unequal_class_sizes(fixture):
    folder_dir, _, _ = fixture
    csv_path = folder_dir / "train.csv"
    lines = csv_path.read_text().splitlines()
    csv_path.write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(DatasetError, match="different numbers of images"):
        load_miniimagenet(folder_dir, "train", strict=False, cache=False)


def test_bad_image_folder(fixture):
    folder_dir, _, _ = fixture
    (folder_dir / "images" / f"{WNIDS[0]}00000002.jpg").unlink()
    with pytest.raises(
        DatasetError, match="1 images listed in .*train.csv are missing"
    ):
        load_miniimagenet(folder_dir, "train", strict=False, cache=False)
    (folder_dir / "images" / f"{WNIDS[0]}00000002.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DatasetError, match="does not decode as an image"):
        load_miniimagenet(folder_dir, "train", strict=False, cache=False)
    (folder_dir / "train.csv").write_text("file,class\nx.jpg,n01\n")
    with pytest.raises(DatasetError, match="header 'filename,label'"):
        load_miniimagenet(folder_dir, "train", strict=False, cache=False)


def test_images_are_resized_to_84(fixture):
    folder_dir, _, _ = fixture
    big = np.random.default_rng(2).integers(0, 256, (90, 100, 3), dtype=np.uint8)
    Image.fromarray(big).save(folder_dir / "images" / f"{WNIDS[1]}00000001.jpg")
    data = load_miniimagenet(
        folder_dir, "train", strict=False, dtype=np.uint8, cache=False
    )
    assert data.images.shape == (3, PER_CLASS, 84, 84, 3)


def test_bad_pickles(fixture):
    _, pickle_dir, _ = fixture
    path = pickle_dir / "mini-imagenet-cache-train.pkl"
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(DatasetError, match="truncated or corrupted"):
        load_miniimagenet(pickle_dir, "train", strict=False)
    cases = [
        ({"images": 1}, "does not hold a dict"),
        (
            {"image_data": np.zeros((2, 32, 32, 3), np.uint8), "class_dict": {}},
            r"image_data is uint8 \(2, 32, 32, 3\)",
        ),
        (
            {
                "image_data": np.zeros((2, 84, 84, 3), np.uint8),
                "class_dict": {"a": [5]},
            },
            "indexes outside image_data",
        ),
        (
            {
                "image_data": np.zeros((2, 84, 84, 3), np.uint8),
                "class_dict": {"a": [0], "b": [0]},
            },
            "more than one class",
        ),
    ]
    for obj, pattern in cases:
        path.write_bytes(pickle.dumps(obj))
        with pytest.raises(DatasetError, match=pattern):
            load_miniimagenet(pickle_dir, "train", strict=False)


def test_image_folder_cache(fixture, tmp_path, monkeypatch):
    folder_dir, _, expected = fixture
    cache_dir = tmp_path / "cache"
    first = load_miniimagenet(
        folder_dir, "train", strict=False, dtype=np.uint8, cache_dir=cache_dir
    )
    assert [p.suffix for p in cache_dir.iterdir()] == [".npz"]

    def no_decoding(path):
        raise AssertionError(f"decoded {path} despite a valid cache")

    with monkeypatch.context() as m:
        m.setattr(miniimagenet, "_decode_image", no_decoding)
        again = load_miniimagenet(
            folder_dir, "train", strict=False, dtype=np.uint8, cache_dir=cache_dir
        )
    np.testing.assert_array_equal(again.images, first.images)
    # Changing an image (size and mtime) makes a new cache entry.
    Image.fromarray(np.zeros((84, 84, 3), np.uint8)).save(
        folder_dir / "images" / f"{WNIDS[1]}00000001.jpg"
    )
    changed = load_miniimagenet(
        folder_dir, "train", strict=False, dtype=np.uint8, cache_dir=cache_dir
    )
    assert changed.images[0, 0].max() < 10
    np.testing.assert_array_equal(changed.images[1:], expected[1:])
    # A corrupted cache file is ignored and rewritten.
    for path in cache_dir.iterdir():
        path.write_bytes(b"garbage")
    rebuilt = load_miniimagenet(
        folder_dir, "train", strict=False, dtype=np.uint8, cache_dir=cache_dir
    )
    np.testing.assert_array_equal(rebuilt.images, changed.images)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"split": "training"}, "split"),
        ({"source": "zip"}, "source"),
        ({"dtype": np.float64}, "dtype"),
    ],
)
def test_invalid_arguments(tmp_path, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        load_miniimagenet(tmp_path, **kwargs)


def test_pickle_written_by_numpy_1(tmp_path):
    """numpy 1.x names its pickle helpers numpy.core.*; those load too."""
    pixels = _write_folder(tmp_path / "folder")
    path = _write_pickle(tmp_path, pixels, protocol=2)
    raw = path.read_bytes()
    assert b"numpy._core" in raw
    path.write_bytes(raw.replace(b"numpy._core", b"numpy.core"))
    data = load_miniimagenet(tmp_path, "train", strict=False, dtype=np.uint8)
    np.testing.assert_array_equal(data.images[2], np.stack(pixels["n03000000"]))


def test_default_and_unwritable_cache_dirs(fixture, tmp_path, monkeypatch):
    folder_dir, _, expected = fixture
    monkeypatch.setenv("MAML_JAX_CACHE_DIR", str(tmp_path / "env_cache"))
    assert default_cache_dir() == tmp_path / "env_cache"
    load_miniimagenet(folder_dir, "train", strict=False)
    assert [p.suffix for p in (tmp_path / "env_cache").iterdir()] == [".npz"]
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.warns(RuntimeWarning, match="could not write the dataset cache"):
        data = load_miniimagenet(
            folder_dir, "train", strict=False, dtype=np.uint8, cache_dir=blocker / "c"
        )
    np.testing.assert_array_equal(data.images, expected)
