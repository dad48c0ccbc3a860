"""Tests of maml_jax.datasets.omniglot on the real canonical archives.

The archives are looked up in ``$MAML_JAX_OMNIGLOT_DIR``, else in
``<repo>/../shared/data/omniglot``. When they are missing the tests are skipped,
or fail under ``CI=true``. Every archive is decoded once per session into a
temporary cache; broken archives are built from the good ones in ``tmp_path``.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import os
import shutil
import socket
import threading
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from maml_jax.datasets import (
    DatasetError,
    DatasetNotFoundError,
    OmniglotSplit,
    _omniglot_archive,
    load_omniglot,
    omniglot,
    omniglot_class_names,
    omniglot_classes,
)

DATA_DIR = Path(
    os.environ.get("MAML_JAX_OMNIGLOT_DIR")
    or Path(__file__).resolve().parents[1].parent / "shared" / "data" / "omniglot"
)
SPLITS = ("background", "evaluation")
COUNTS = {"background": (30, 964), "evaluation": (20, 659)}


def _require(path: Path) -> Path:
    if not path.is_file():
        message = (
            f"Omniglot archive {path} is missing; set MAML_JAX_OMNIGLOT_DIR "
            "to the folder holding images_background.zip/images_evaluation.zip"
        )
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def archives() -> dict[str, Path]:
    return {split: _require(DATA_DIR / f"images_{split}.zip") for split in SPLITS}


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("omniglot_cache")


@pytest.fixture(scope="session")
def loaded(archives: dict[str, Path], cache_dir: Path) -> dict[str, OmniglotSplit]:
    """Both archives, decoded once per session into the session cache."""
    out = {}
    for split in SPLITS:
        start = time.perf_counter()
        out[split] = load_omniglot(DATA_DIR, split=split, cache_dir=cache_dir)
        print(f"first load of {split}: {time.perf_counter() - start:.2f} s")
    return out


@pytest.fixture(scope="session")
def eval_members(archives: dict[str, Path]) -> list[tuple[str, bytes]]:
    """``(name, bytes)`` of every file entry of the evaluation archive."""
    with zipfile.ZipFile(archives["evaluation"]) as zf:
        return [(i.filename, zf.read(i)) for i in zf.infolist() if not i.is_dir()]


# --- good archives -----------------------------------------------------------


@pytest.mark.parametrize("split", SPLITS)
def test_good_archive_shapes_values_metadata(loaded, split):
    data = loaded[split]
    num_alphabets, num_characters = COUNTS[split]
    assert data.images.shape == (num_characters, 20, 28, 28, 1)
    assert data.images.dtype == np.float32
    assert data.images.min() == 0.0 and data.images.max() == 1.0
    # Ink is 1 and sparse: most pixels, and nearly all corners, are background 0.
    assert data.images.mean() < 0.2
    assert data.images[:, :, 0, 0, 0].mean() < 0.01
    assert len(set(data.alphabets)) == num_alphabets
    assert data.names == omniglot_class_names(f"lake-{split}", rotations=False)
    first = 1 if split == "background" else 965
    assert sorted(data.character_ids.tolist()) == list(
        range(first, first + num_characters)
    )


def test_ink_is_one_and_lanczos(archives, loaded):
    name = "images_evaluation/Angelic/character01/0965_01.png"
    with zipfile.ZipFile(archives["evaluation"]) as zf:
        raw = Image.open(io.BytesIO(zf.read(name)))
        raw.load()
    assert raw.mode == "1" and raw.size == (105, 105)
    assert np.asarray(raw.convert("L")).mean() > 127  # white paper, black strokes
    gray = raw.convert("L").resize((28, 28), Image.Resampling.LANCZOS)
    expected = 1.0 - np.asarray(gray, np.float32) / 255.0
    got = loaded["evaluation"].images[0, 0, :, :, 0]
    np.testing.assert_allclose(got, expected, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"split": "train"},
        {"image_size": 0},
        {"image_size": 28.0},
        {"resample": "bicubic"},
    ],
)
def test_invalid_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        load_omniglot(tmp_path, **kwargs)


# --- cache -------------------------------------------------------------------


@pytest.mark.parametrize("split", SPLITS)
def test_second_load_is_fast_and_equal(loaded, cache_dir, split):
    start = time.perf_counter()
    again = load_omniglot(DATA_DIR, split=split, cache_dir=cache_dir)
    elapsed = time.perf_counter() - start
    print(f"cached load of {split}: {elapsed * 1000:.0f} ms")
    assert elapsed < 1.0
    np.testing.assert_array_equal(again.images, loaded[split].images)
    assert again.names == loaded[split].names
    np.testing.assert_array_equal(again.character_ids, loaded[split].character_ids)


def test_cache_dir_holds_only_complete_files(loaded, cache_dir):
    names = sorted(p.name for p in cache_dir.iterdir())
    assert len(names) == 2 and all(n.endswith(".npz") for n in names), names


def _cache_file(cache_dir: Path, split: str) -> Path:
    (path,) = cache_dir.glob(f"omniglot_{split}_28px_lanczos_*.npz")
    return path


def _rewrite_npz(path: Path, **changes) -> None:
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays.update(changes)
    with open(path, "wb") as f:
        np.savez(f, **arrays)


@pytest.mark.parametrize("damage", ["truncated", "stale_key", "wrong_shape"])
def test_bad_cache_is_rebuilt(loaded, cache_dir, tmp_path, damage):
    cache = _cache_file(shutil.copytree(cache_dir, tmp_path / "cache"), "evaluation")
    if damage == "truncated":
        cache.write_bytes(cache.read_bytes()[: cache.stat().st_size // 2])
    elif damage == "stale_key":
        _rewrite_npz(
            cache,
            cache_key=np.array("0" * 64),
            ink=np.zeros((659, 20, 28, 28), np.uint8),
        )
    else:
        _rewrite_npz(cache, ink=np.zeros((659, 20, 28, 27), np.uint8))
    rebuilt = load_omniglot(DATA_DIR, split="evaluation", cache_dir=cache.parent)
    np.testing.assert_array_equal(rebuilt.images, loaded["evaluation"].images)
    # The rebuilt cache replaced the bad one and is used from now on.
    assert [p.name for p in cache.parent.glob("omniglot_evaluation_*")] == [cache.name]
    with np.load(cache) as z:
        assert z["ink"].shape == (659, 20, 28, 28)


def test_cache_of_other_archive_bytes_is_not_used(
    loaded, cache_dir, tmp_path, archives
):
    """A cache is keyed by the archive's digest: changed bytes mean a new cache."""
    cache = _cache_file(shutil.copytree(cache_dir, tmp_path / "cache"), "evaluation")
    _rewrite_npz(cache, ink=np.zeros((659, 20, 28, 28), np.uint8))  # poisoned
    assert (
        load_omniglot(DATA_DIR, split="evaluation", cache_dir=cache.parent).images.max()
        == 0.0
    )
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    changed = shutil.copy(archives["evaluation"], data_dir)
    with zipfile.ZipFile(changed, "a") as zf:
        zf.comment = b"same images, different bytes"
    fresh = load_omniglot(data_dir, split="evaluation", cache_dir=cache.parent)
    np.testing.assert_array_equal(fresh.images, loaded["evaluation"].images)
    assert len(list(cache.parent.glob("omniglot_evaluation_*"))) == 2


# --- bad archives ------------------------------------------------------------


def test_missing_archive(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        load_omniglot(tmp_path, split="background", cache=False)
    assert isinstance(info.value, FileNotFoundError)
    assert isinstance(info.value, DatasetError) and isinstance(info.value, ValueError)
    message = str(info.value)
    assert str(tmp_path / "images_background.zip") in message
    assert "brendenlake/omniglot" in message and "download=True" in message


def test_missing_archive_with_extracted_folder(tmp_path):
    (tmp_path / "images_evaluation").mkdir()
    with pytest.raises(DatasetNotFoundError, match="extracted folder"):
        load_omniglot(tmp_path, split="evaluation", cache=False)


def test_truncated_archive(archives, tmp_path):
    path = tmp_path / "images_evaluation.zip"
    path.write_bytes(archives["evaluation"].read_bytes()[:3_000_000])
    with pytest.raises(DatasetError, match="truncated or corrupted") as info:
        load_omniglot(tmp_path, split="evaluation", cache=False)
    assert "images_evaluation.zip" in str(info.value)


def test_corrupted_bytes_fail_the_crc(archives, tmp_path):
    path = Path(shutil.copy(archives["evaluation"], tmp_path))
    with zipfile.ZipFile(path) as zf:
        info = next(i for i in zf.infolist() if not i.is_dir())
    raw = bytearray(path.read_bytes())
    start = info.header_offset
    name_len = int.from_bytes(raw[start + 26 : start + 28], "little")
    extra_len = int.from_bytes(raw[start + 28 : start + 30], "little")
    raw[start + 30 + name_len + extra_len + info.compress_size // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(DatasetError, match="is corrupted: cannot read") as info_:
        load_omniglot(tmp_path, split="evaluation", cache=False)
    assert "images_evaluation.zip" in str(info_.value)
    assert info.filename in str(info_.value)


Members = list[tuple[str, bytes]]
A1 = "images_evaluation/Angelic/character01/"


def _each(
    edit: Callable[[str, bytes], tuple[str, bytes] | None],
) -> Callable[[Members], Members]:
    """Applies ``edit`` to every entry; ``None`` drops the entry."""
    return lambda members: [e for n, d in members if (e := edit(n, d)) is not None]


LAYOUT_CASES: dict[str, tuple[Callable[[Members], Members], str]] = {
    "extra_top_folder": (
        _each(lambda n, d: (f"omniglot/{n}", d)),
        "nested under 'omniglot/'",
    ),
    "missing_character": (
        _each(lambda n, d: None if "/Angelic/character03/" in n else (n, d)),
        r"found 658 in 20.*missing 1 \['Angelic/character03'\]",
    ),
    "extra_character": (
        lambda ms: (
            ms
            + [
                (n.replace("/character01/", "/character21/"), d)
                for n, d in ms
                if n.startswith(A1)
            ]
        ),
        r"found 660 in 20.*unexpected 1 \['Angelic/character21'\]",
    ),
    "missing_image": (
        _each(lambda n, d: None if n.endswith("0965_05.png") else (n, d)),
        r"Angelic/character01 has 19 drawings.*\[5\]",
    ),
    "extra_nesting": (
        _each(lambda n, d: (n.replace("/character02/", "/character02/x/"), d)),
        "unexpected entry",
    ),
    "not_a_png": (
        _each(lambda n, d: (n, b"not a png" if n.endswith("0965_01.png") else d)),
        "does not decode as a PNG",
    ),
    "other_split_renamed": (
        _each(lambda n, d: (n.replace("images_evaluation/", "images_background/"), d)),
        "holds characters of images_evaluation.zip",
    ),
}


@pytest.mark.parametrize("case", sorted(LAYOUT_CASES))
def test_wrong_layout(eval_members, tmp_path, case):
    edit, pattern = LAYOUT_CASES[case]
    split = "background" if case == "other_split_renamed" else "evaluation"
    with zipfile.ZipFile(tmp_path / f"images_{split}.zip", "w") as zf:
        for name, data in edit(eval_members):
            zf.writestr(name, data)
    with pytest.raises(DatasetError, match=pattern) as info:
        load_omniglot(tmp_path, split=split, cache=False)
    assert f"images_{split}.zip" in str(info.value)
    assert "brendenlake/omniglot" in str(info.value)


def test_swapped_archives(archives, tmp_path):
    shutil.copy(archives["evaluation"], tmp_path / "images_background.zip")
    shutil.copy(archives["background"], tmp_path / "images_evaluation.zip")
    for split, other in [("background", "evaluation"), ("evaluation", "background")]:
        with pytest.raises(DatasetError, match="swapped") as info:
            load_omniglot(tmp_path, split=split, cache=False)
        assert f"images_{split}.zip" in str(info.value)
        assert f"images_{other}" in str(info.value)


# --- hostile archives --------------------------------------------------------

FIRST = A1 + "0965_01.png"  # the first drawing decoded, in pinned order


@pytest.fixture(scope="session")
def eval_without_first(eval_members, tmp_path_factory) -> Path:
    """The evaluation archive without FIRST, which each test appends its own way."""
    path = tmp_path_factory.mktemp("hostile") / "images_evaluation.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in eval_members:
            if name != FIRST:
                zf.writestr(name, data)
    return path


def _with_first(
    base: Path, tmp_path: Path, data: bytes, compress_type=zipfile.ZIP_DEFLATED
) -> Path:
    path = Path(shutil.copy(base, tmp_path / "images_evaluation.zip"))
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr(FIRST, data, compress_type=compress_type)
    return path


def _patch_central_entry(
    path: Path, name: str, *, flag_bits: int | None = None, file_size: int | None = None
) -> None:
    """Rewrites fields of ``name``'s central-directory record (what zipfile trusts)."""
    raw = bytearray(path.read_bytes())
    at = raw.rfind(name.encode()) - 46
    assert raw[at : at + 4] == b"PK\x01\x02"
    if flag_bits is not None:
        raw[at + 8 : at + 10] = flag_bits.to_bytes(2, "little")
    if file_size is not None:
        raw[at + 24 : at + 28] = file_size.to_bytes(4, "little")
    path.write_bytes(bytes(raw))


@pytest.fixture
def opened_members(monkeypatch) -> list[str]:
    """Names of the zip members opened for reading from now on."""
    opened: list[str] = []
    real_open = zipfile.ZipFile.open

    def spy(self, name, mode="r", *args, **kwargs):
        if mode == "r":
            opened.append(getattr(name, "filename", name))
        return real_open(self, name, mode, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "open", spy)
    return opened


def _load_refused(tmp_path: Path, pattern: str) -> str:
    start = time.perf_counter()
    with pytest.raises(DatasetError, match=pattern) as info:
        load_omniglot(tmp_path, split="evaluation", cache=False)
    assert time.perf_counter() - start < 10.0
    message = str(info.value)
    assert "images_evaluation.zip" in message and FIRST in message
    assert "brendenlake/omniglot" in message
    return message


@pytest.mark.parametrize(
    "size, pattern",
    [(8 << 20, "declares 8388608 bytes uncompressed"), (512 << 10, r"\d+-fold")],
)
def test_decompression_bomb_is_refused_unread(
    eval_without_first, tmp_path, opened_members, size, pattern
):
    """A member too large, or compressing too well, for a 105x105 PNG is never
    inflated (a 6.8 MB archive inflating to 1 GiB took 15 s and 2.4 GB)."""
    _with_first(eval_without_first, tmp_path, bytes(size))
    _load_refused(tmp_path, pattern)
    assert FIRST not in opened_members


def test_bzip2_member_is_refused_unread(eval_without_first, tmp_path, opened_members):
    """zipfile inflates bzip2 without an output bound: 16 MiB from a few bytes,
    before any size check could stop it, even when the entry declares 300 bytes."""
    path = _with_first(eval_without_first, tmp_path, bytes(16 << 20), zipfile.ZIP_BZIP2)
    _patch_central_entry(path, FIRST, file_size=300)
    _load_refused(tmp_path, "compression method 12")
    assert FIRST not in opened_members


def test_member_lying_about_its_size_is_stopped(eval_without_first, tmp_path):
    """Declaring 300 bytes for 16 MiB: reading stops at the declared size (the
    bounded read, and zipfile itself) and the entry fails its CRC."""
    path = _with_first(eval_without_first, tmp_path, bytes(16 << 20))
    _patch_central_entry(path, FIRST, file_size=300)
    _load_refused(tmp_path, "is corrupted: cannot read|inflates to more than")


def test_encrypted_member(eval_members, eval_without_first, tmp_path, opened_members):
    path = _with_first(eval_without_first, tmp_path, dict(eval_members)[FIRST])
    _patch_central_entry(path, FIRST, flag_bits=0x1)
    _load_refused(tmp_path, "is encrypted")
    assert FIRST not in opened_members


def _png_header(width: int, height: int) -> bytes:
    """A 1-bit PNG declaring ``width x height`` pixels, with almost no pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body).to_bytes(4, "big")
        return len(body).to_bytes(4, "big") + kind + body + crc

    size = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", size + bytes([1, 0, 0, 0, 0]))
        + chunk(b"IDAT", zlib.compress(bytes(64)))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("side", [3000, 10000])
def test_png_size_is_checked_before_decoding(eval_without_first, tmp_path, side):
    """The header's size is refused before pixels are decoded (10000 x 10000 also
    tripped Pillow's bomb warning, which escaped as a warning or an exception)."""
    _with_first(eval_without_first, tmp_path, _png_header(side, side))
    message = _load_refused(tmp_path, f"is {side}x{side} pixels, expected 105x105")
    assert "not decoded" in message


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparent_background_is_paper(eval_members, tmp_path, mode):
    """A drawing re-saved with a transparent background decodes like the original
    (before: the transparent black background counted as ink, 1.00 vs 0.16)."""
    original = dict(eval_members)[FIRST]
    with Image.open(io.BytesIO(original)) as image:
        strokes = np.asarray(image.convert("L")) < 128
    if mode == "P":  # palette: 0 = black stroke, 1 = black but transparent
        pixels, extra = np.where(strokes, 0, 1).astype(np.uint8), {"transparency": 1}
    else:  # black everywhere, opaque only on the strokes
        pixels = np.zeros((105, 105, len(mode)), np.uint8)
        pixels[strokes, -1] = 255
        extra = {}
    image = Image.frombytes(mode, (105, 105), pixels.tobytes())
    if mode == "P":
        image.putpalette([0, 0, 0, 0, 0, 0])
    buf = io.BytesIO()
    image.save(buf, "PNG", **extra)
    path = tmp_path / "images_evaluation.zip"
    redrawn = FIRST.replace("_01.png", "_02.png")
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(FIRST, original)
        zf.writestr(redrawn, buf.getvalue())
    with zipfile.ZipFile(path) as zf:
        plain, transparent = (
            _omniglot_archive._decode_png(
                path, "evaluation", zf, zf.getinfo(name), 28, "lanczos"
            )
            for name in (FIRST, redrawn)
        )
    assert transparent.mean() / 255 < 0.3
    np.testing.assert_array_equal(transparent, plain)


# --- pinned splits -----------------------------------------------------------


def test_vinyals_split_sizes_as_published():
    sizes = {
        part: len(omniglot_class_names(f"vinyals-{part}", rotations=False))
        for part in ("train", "val", "test", "trainval")
    }
    assert sizes == {"train": 1028, "val": 172, "test": 423, "trainval": 1200}
    assert omniglot_class_names("vinyals-trainval", rotations=False) == (
        omniglot_class_names("vinyals-train", rotations=False)
        + omniglot_class_names("vinyals-val", rotations=False)
    )


def test_vinyals_split_disjoint_and_complete(loaded):
    parts = [
        omniglot_class_names(f"vinyals-{p}", rotations=False)
        for p in ("train", "val", "test")
    ]
    every = [name for part in parts for name in part]
    assert len(every) == len(set(every)) == 1623
    assert set(every) == set(loaded["background"].names + loaded["evaluation"].names)
    # Vinyals' test characters all come from the evaluation archive.
    assert set(parts[2]) <= set(loaded["evaluation"].names)


def test_rotated_class_names():
    names = omniglot_class_names("vinyals-val")
    assert len(names) == 4 * 172
    assert names[:4] == tuple(
        f"Armenian/character01/rot{d}" for d in ("000", "090", "180", "270")
    )


def test_omniglot_classes_rotations(loaded, cache_dir):
    x = omniglot_classes(DATA_DIR, "vinyals-test", cache_dir=cache_dir)
    assert x.shape == (4 * 423, 20, 28, 28, 1) and x.dtype == np.float32
    plain = omniglot_classes(
        DATA_DIR, "vinyals-test", rotations=False, cache_dir=cache_dir
    )
    np.testing.assert_array_equal(x[::4], plain)
    evaluation = loaded["evaluation"]
    first = evaluation.names.index("Gurmukhi/character42")
    np.testing.assert_array_equal(plain[0], evaluation.images[first])
    for k in range(4):
        np.testing.assert_array_equal(x[k::4], np.rot90(plain, k, axes=(2, 3)))


@pytest.mark.parametrize(
    "split_name, count",
    [
        ("vinyals-trainval", 1200),
        ("lake-background", 964),
        ("lake-evaluation", 659),
    ],
)
def test_omniglot_classes_without_rotations(loaded, cache_dir, split_name, count):
    x = omniglot_classes(DATA_DIR, split_name, rotations=False, cache_dir=cache_dir)
    assert x.shape == (count, 20, 28, 28, 1)
    if split_name.startswith("lake-"):
        np.testing.assert_array_equal(x, loaded[split_name[5:]].images)


def test_unknown_split_name(tmp_path):
    with pytest.raises(ValueError, match="split_name"):
        omniglot_classes(tmp_path, "vinyals")


# --- download ----------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_download_without_network_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setattr(
        omniglot, "OMNIGLOT_URL_BASE", f"http://127.0.0.1:{_closed_port()}/python"
    )
    data_dir = tmp_path / "data"
    start = time.perf_counter()
    with pytest.raises(DatasetError, match="could not download") as info:
        load_omniglot(data_dir, split="background", download=True, cache=False)
    assert time.perf_counter() - start < 5.0
    assert str(data_dir) in str(info.value)
    assert "brendenlake/omniglot" in str(info.value)
    assert not data_dir.exists() or not any(data_dir.iterdir())


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def local_server(archives) -> Iterator[str]:
    """Serves the data directory on localhost (stands in for GitHub)."""
    handler = functools.partial(_QuietHandler, directory=str(DATA_DIR))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_download_is_checked_and_atomic(
    local_server, archives, loaded, cache_dir, tmp_path, monkeypatch
):
    monkeypatch.setattr(omniglot, "OMNIGLOT_URL_BASE", local_server)
    md5 = hashlib.md5(archives["evaluation"].read_bytes()).hexdigest()
    monkeypatch.setattr(omniglot, "_CANONICAL_MD5", {"evaluation": "0" * 32})
    with pytest.raises(DatasetError, match="md5"):
        load_omniglot(tmp_path, split="evaluation", download=True, cache=False)
    assert list(tmp_path.iterdir()) == []  # nothing kept, no temporary files
    monkeypatch.setattr(omniglot, "_CANONICAL_MD5", {"evaluation": md5})
    data = load_omniglot(
        tmp_path, split="evaluation", download=True, cache_dir=cache_dir
    )
    assert [p.name for p in tmp_path.iterdir()] == ["images_evaluation.zip"]
    assert (tmp_path / "images_evaluation.zip").read_bytes() == (
        archives["evaluation"].read_bytes()
    )
    np.testing.assert_array_equal(data.images, loaded["evaluation"].images)
