"""Tests of maml_jax.datasets.miniimagenet on small generated fixtures.

No copy of mini-ImageNet is needed: each test writes a tiny split (3 classes of
6 images) in exactly the formats users have, the learn2learn pickle caches
and Ravi & Larochelle's ``images/`` + ``<split>.csv``.
"""

from __future__ import annotations

import codecs
import csv
import functools
import os
import pickle
import time
import tracemalloc
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


# --- hostile pickles ---------------------------------------------------------


class _Reduce:
    """Pickles as ``func(*args)``, optionally followed by ``__setstate__(state)``."""

    def __init__(self, func, args, state=None):
        self.reduced = (func, args) if state is None else (func, args, state)

    def __reduce__(self):
        return self.reduced


def _two_images(image_data) -> dict:
    return {"image_data": image_data, "class_dict": {"a": [0], "b": [1]}}


def _refused(tmp_path: Path, obj_or_bytes, pattern: str) -> str:
    path = tmp_path / "mini-imagenet-cache-train.pkl"
    raw = obj_or_bytes
    if not isinstance(raw, bytes):
        raw = pickle.dumps(raw, protocol=4)
    path.write_bytes(raw)
    start = time.perf_counter()
    with pytest.raises(DatasetError, match=pattern) as info:
        load_miniimagenet(tmp_path, "train", strict=False)
    assert time.perf_counter() - start < 5.0
    assert str(path) in str(info.value)
    return str(info.value)


def test_pickle_sharing_index_lists_is_refused_unexpanded(tmp_path):
    """One index list under every key (or nested in itself) is a few bytes in
    the file but billions of items once converted; the probe's took 52 s and
    ended in a raw MemoryError. Lengths are summed before anything is built."""
    shared = [0, 1] * 1000
    many = {f"n{i:08d}": shared for i in range(2000)}
    image_data = np.zeros((2, 84, 84, 3), np.uint8)
    _refused(
        tmp_path,
        {"image_data": image_data, "class_dict": many},
        "lists at least 2000 image indices but image_data holds 2 images",
    )
    inner = [0] * 1000
    nested = [[inner] * 1000] * 1000  # 10**9 items; 12 KB pickled
    _refused(
        tmp_path,
        {"image_data": image_data, "class_dict": {"a": nested}},
        "lists at least 1000 image indices",
    )
    inner = [0] * 10**4
    short = [[inner] * 10**4] * 2  # 2 * 10**8 items, in a list as long as allowed
    _refused(
        tmp_path,
        {"image_data": image_data, "class_dict": {"a": short}},
        r"class_dict\['a'\] is not a list of ints",
    )


SIZE_BOMBS = {
    # The C unpickler resized and zero-filled its memo up to a PUT's index:
    # 256 MiB here, 16 GiB for index 2**30.
    "memo_index": (b"\x80\x02}r" + (1 << 24).to_bytes(4, "little") + b".", "dict"),
    # Declared lengths, allocated before the (missing) data is read.
    "bytearray8": (b"\x80\x05\x96" + (1 << 31).to_bytes(8, "little"), "readable"),
    "frame": (b"\x80\x04\x95" + (1 << 31).to_bytes(8, "little") + b"}.", "dict"),
}


@pytest.mark.parametrize("case", sorted(SIZE_BOMBS))
def test_pickle_sizes_are_not_allocated_on_trust(tmp_path, case):
    bomb, pattern = SIZE_BOMBS[case]
    tracemalloc.start()
    try:
        _refused(tmp_path, bomb, pattern)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20


_RECONSTRUCT = np.empty(0).__reduce__()[0]
_BIG_BYTES = bytes(1 << 20)
HOSTILE_CALLS = {
    # Uninitialised memory of any shape, which then loaded as images.
    "ndarray_call": (
        _two_images(_Reduce(np.ndarray, ((2, 84, 84, 3), "u1"))),
        "refusing to call numpy.ndarray",
    ),
    "reconstruct_shape": (
        _two_images(_Reduce(_RECONSTRUCT, (np.ndarray, (2, 84, 84, 3), b"B"))),
        r"refusing numpy _reconstruct with shape \(2, 84, 84, 3\)",
    ),
    # numpy allocates an object array's whole shape before checking its items.
    "object_array": (
        _two_images(
            _Reduce(
                _RECONSTRUCT,
                (np.ndarray, (0,), b"b"),
                (1, (10**6,), np.dtype(object), False, [0]),
            )
        ),
        "refusing numpy dtype object",
    ),
    # Each hex encoding doubles the string: 2**24 times two bytes here.
    "encode_chain": (
        _two_images(
            functools.reduce(
                lambda inner, _: _Reduce(codecs.encode, (inner, "hex")),
                range(24),
                _Reduce(codecs.encode, ("ab", "latin1")),
            )
        ),
        r"refusing _codecs\.encode of a bytes to 'hex'",
    ),
    "bytearray_size": (
        _two_images(_Reduce(bytearray, (1 << 26,))),
        r"refusing bytearray\(\) of anything but bytes",
    ),
    # One memoised MiB copied 100 times builds 100 MiB from a 1 MiB file.
    "copies": (
        _two_images([_Reduce(bytearray, (_BIG_BYTES,)) for _ in range(100)]),
        "refusing to build more than",
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_CALLS))
def test_pickle_callables_refuse_allocating_arguments(tmp_path, case):
    obj, pattern = HOSTILE_CALLS[case]
    message = _refused(tmp_path, obj, pattern)
    assert "NOT loaded" in message


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_damaged_pickles_give_dataset_errors(tmp_path, protocol):
    """Random truncations and byte flips (mostly in the opcodes around the pixel
    data): before, some raised OverflowError or SystemError, some MemoryError."""
    obj = {
        "image_data": np.arange(2 * 84 * 84 * 3, dtype=np.uint8).reshape(2, 84, 84, 3),
        "class_dict": {"a": [0], "b": np.array([1])},
    }
    good = pickle.dumps(obj, protocol=protocol)
    path = tmp_path / "mini-imagenet-cache-train.pkl"
    rng = np.random.default_rng(protocol)
    for _ in range(200):
        damaged = bytearray(good)
        if rng.random() < 0.2:
            del damaged[rng.integers(len(damaged)) :]
        else:
            for _ in range(rng.integers(1, 4)):
                near = int(rng.integers(300))
                at = near if rng.random() < 0.5 else len(damaged) - 1 - near
                damaged[at] = int(rng.integers(256))
        path.write_bytes(bytes(damaged))
        try:
            load_miniimagenet(tmp_path, "train", strict=False, dtype=np.uint8)
        except DatasetError as e:
            assert str(path) in str(e)


def _unicode(text: str) -> bytes:
    return b"X" + len(text).to_bytes(4, "little") + text.encode()  # BINUNICODE


def _dtype_state(itemsize: int) -> bytes:
    """A void dtype's BUILD state, ``(3, '|', None, None, None, itemsize, 1, 0)``."""
    return (
        b"(K\x03"
        + _unicode("|")
        + b"NNNJ"
        + itemsize.to_bytes(4, "little")
        + b"K\x01K\x00t"
    )


def test_pickle_cannot_change_a_dtype_after_use(tmp_path):
    """Setting a dtype's state again after an array was built with it turned a
    4-byte array into one reading 1 MiB past its buffer."""
    raw = (
        b"\x80\x03}("
        + _unicode("image_data")
        # D = numpy.dtype("V4", False, True), memo 1, with its state set.
        + b"cnumpy\ndtype\n"
        + _unicode("V4")
        + b"\x89\x88\x87Rq\x01"
        + _dtype_state(4)
        + b"b0"
        # An array of one D: _reconstruct, then the state (1, (1,), D, False, data).
        + b"cnumpy._core.multiarray\n_reconstruct\ncnumpy\nndarray\n"
        + b"K\x00\x85C\x01b\x87R"
        + b"(K\x01K\x01\x85h\x01\x89C\x04abcdtb"
        # D's state again, now 1 MiB per item.
        + b"h\x01"
        + _dtype_state(1 << 20)
        + b"b0"
        + _unicode("class_dict")
        + b"}u."
    )
    _refused(tmp_path, raw, "refusing to change a numpy dtype once used")
