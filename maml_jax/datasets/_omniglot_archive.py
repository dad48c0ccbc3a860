"""Checking and decoding one canonical Omniglot archive (private).

:func:`decode_archive` checks an ``images_<split>.zip`` by its content and
decodes it to uint8 ink, as :mod:`maml_jax.datasets.omniglot` describes under
"Validation" and "Preprocessing". The pinned character lists the check compares
against are read here too. Nothing in this module touches the network or the
cache; :func:`~maml_jax.datasets.load_omniglot` does both.
"""

from __future__ import annotations

import functools
import io
import re
import struct
import zipfile
import zlib
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image

from maml_jax.datasets._common import DatasetError

NUM_DRAWINGS = 20
"""Drawings (examples) per character."""

HOME = "https://github.com/brendenlake/omniglot (folder python/)"
"""Where the canonical archives are published; error messages point there."""

RESAMPLE_FILTERS = {
    "lanczos": Image.Resampling.LANCZOS,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}
"""Pillow filter of each ``resample`` name."""

_SOURCE_SIZE = 105
# Members are checked before they are read (the zip's own metadata) and read with
# a bound, so a decompression bomb costs at most _MAX_MEMBER_BYTES. A 105 x 105
# PNG holds at most 88 KB of pixel data (16-bit RGBA, stored uncompressed); the
# canonical ones are under 1 KB and barely compress further in the zip.
_MAX_MEMBER_BYTES = 1 << 20
# Members larger than any honest 105 x 105 PNG's pixel data may not compress
# better than this: PNG data is already deflated, so a high ratio means padding.
_RATIO_CHECKED_ABOVE = 128 << 10
_MAX_RATIO = 100
# Stored and deflate only: zipfile inflates bzip2 and lzma members without an
# output bound (a few KB of bzip2 can expand to GBs before a bounded read ends).
_READABLE_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)
_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_IGNORED = re.compile(r"(^|/)(__MACOSX/|\._|\.DS_Store$|Thumbs\.db$)")
_DRAWING = re.compile(r"(\d{4})_(\d{2})\.png")
_ZIP_READ_ERRORS = (
    zipfile.BadZipFile,
    zlib.error,
    OSError,
    EOFError,
    ValueError,
    NotImplementedError,
)


@functools.cache
def pinned_names(list_name: str) -> tuple[str, ...]:
    """Returns the ``Alphabet/characterNN`` lines of ``_splits/<list_name>.txt``."""
    text = resources.files(__package__).joinpath("_splits", f"{list_name}.txt")
    return tuple(text.read_text(encoding="utf-8").split())


def decode_archive(
    path: Path, split: str, image_size: int, resample: str
) -> dict[str, np.ndarray]:
    """Validates the archive and decodes it to uint8 ink ``(C, 20, H, W)``."""
    try:
        zf = zipfile.ZipFile(path)
    except _ZIP_READ_ERRORS as e:
        raise DatasetError(
            f"{path} is not a readable zip archive ({e}): it is probably truncated "
            "or corrupted, e.g. by an interrupted download. Replace it with the "
            f"canonical images_{split}.zip from {HOME}."
        ) from e
    with zf:
        characters, ids = _index_archive(path, split, zf.infolist())
        ink = np.empty(
            (len(characters), NUM_DRAWINGS, image_size, image_size), np.uint8
        )
        for c, (_, drawings) in enumerate(characters):
            for d, info in enumerate(drawings):
                ink[c, d] = _decode_png(path, split, zf, info, image_size, resample)
    alphabets, folders = zip(*(name.split("/") for name, _ in characters), strict=True)
    return {
        "ink": ink,
        "alphabets": np.array(alphabets),
        "characters": np.array(folders),
        "character_ids": np.array(ids, np.int32),
    }


def _index_archive(
    path: Path, split: str, infos: list[zipfile.ZipInfo]
) -> tuple[list[tuple[str, list[zipfile.ZipInfo]]], list[int]]:
    """Checks the layout; returns ``[(name, 20 drawings)]`` in pinned order, ids."""
    top = f"images_{split}"
    other = "evaluation" if split == "background" else "background"
    fix = f"Replace it with the canonical images_{split}.zip from {HOME}."
    files = [i for i in infos if not i.is_dir() and not _IGNORED.search(i.filename)]
    if not any(i.filename.startswith(f"{top}/") for i in files):
        if any(i.filename.startswith(f"images_{other}/") for i in files):
            problem = (
                f"holds images_{other}/, so it is images_{other}.zip under "
                "the wrong name (are the two archives swapped?)"
            )
        elif nested := next(
            (i.filename for i in files if f"/{top}/" in i.filename), None
        ):
            prefix = nested[: nested.index(f"/{top}/") + 1]
            problem = (
                f"has {top}/ nested under {prefix!r}; it must be the top "
                "folder of the archive"
            )
        else:
            problem = f"has no top-level {top}/ folder"
        raise DatasetError(f"{path} {problem}. {fix}")
    groups: dict[str, dict[int, zipfile.ZipInfo]] = {}
    ids: dict[str, set[int]] = {}
    for info in files:
        parts = info.filename.split("/")
        match = _DRAWING.fullmatch(parts[-1])
        if parts[0] != top or len(parts) != 4 or match is None:
            raise DatasetError(
                f"{path} has an unexpected entry {info.filename!r}; every file must "
                f"be {top}/<Alphabet>/characterNN/IIII_DD.png. {fix}"
            )
        _check_member(path, info, fix)
        name = f"{parts[1]}/{parts[2]}"
        drawing = int(match.group(2))
        if drawing in groups.setdefault(name, {}):
            raise DatasetError(
                f"{path} has drawing {drawing:02d} of {name} twice. {fix}"
            )
        groups[name][drawing] = info
        ids.setdefault(name, set()).add(int(match.group(1)))
    expected = pinned_names(f"lake_{split}")
    if set(groups) != set(expected):
        raise DatasetError(_content_mismatch(path, split, other, set(groups)) + fix)
    ordered = []
    for name in expected:
        drawings = groups[name]
        numbers = set(range(1, NUM_DRAWINGS + 1))
        if set(drawings) != numbers:
            missing, extra = (
                sorted(numbers - set(drawings)),
                sorted(drawings.keys() - numbers),
            )
            raise DatasetError(
                f"{path}: {name} has {len(drawings)} drawings, expected "
                f"{NUM_DRAWINGS} (IIII_01.png ... IIII_20.png); missing drawing "
                f"numbers {missing}, unexpected {extra}. " + fix
            )
        if len(ids[name]) != 1:
            raise DatasetError(
                f"{path}: {name} mixes character ids {sorted(ids[name])}. " + fix
            )
        ordered.append((name, [drawings[d] for d in range(1, NUM_DRAWINGS + 1)]))
    return ordered, [ids[name].pop() for name in expected]


def _content_mismatch(path: Path, split: str, other: str, found: set[str]) -> str:
    expected = set(pinned_names(f"lake_{split}"))
    if found and found <= set(pinned_names(f"lake_{other}")):
        return (
            f"{path} holds characters of images_{other}.zip, not of images_{split}"
            ".zip (are the two archives swapped?). "
        )

    def alphabets(names: set[str]) -> int:
        return len({n.split("/")[0] for n in names})

    missing, extra = sorted(expected - found), sorted(found - expected)
    return (
        f"{path} does not hold the Omniglot images_{split} characters: expected "
        f"{len(expected)} characters in {alphabets(expected)} alphabets, found "
        f"{len(found)} in {alphabets(found)}; missing {len(missing)} "
        f"{missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected {len(extra)} "
        f"{extra[:5]}{'...' if len(extra) > 5 else ''}. "
    )


def _check_member(path: Path, info: zipfile.ZipInfo, fix: str) -> None:
    """Refuses a member by its zip metadata alone, before any byte is inflated."""
    where = f"{path}: {info.filename}"
    if info.flag_bits & 0x1:
        raise DatasetError(
            f"{where} is encrypted (password-protected); the canonical archive "
            f"is not. {fix}"
        )
    if info.compress_type not in _READABLE_METHODS:
        raise DatasetError(
            f"{where} uses zip compression method {info.compress_type}; only "
            f"stored and deflate members are read (as in the canonical archive). "
            f"Re-zip it with a standard zip tool, or: {fix}"
        )
    if info.file_size > _MAX_MEMBER_BYTES:
        raise DatasetError(
            f"{where} declares {info.file_size} bytes uncompressed, more than the "
            f"{_MAX_MEMBER_BYTES} any {_SOURCE_SIZE}x{_SOURCE_SIZE} PNG needs (it "
            f"may be a decompression bomb); it was not read. {fix}"
        )
    ratio = info.file_size / max(info.compress_size, 1)
    if info.file_size > _RATIO_CHECKED_ABOVE and ratio > _MAX_RATIO:
        raise DatasetError(
            f"{where} inflates {ratio:.0f}-fold ({info.compress_size} to "
            f"{info.file_size} bytes); PNG data hardly compresses, so it is not a "
            f"plain PNG (it may be a decompression bomb); it was not read. {fix}"
        )


def _read_member(
    path: Path, zf: zipfile.ZipFile, info: zipfile.ZipInfo, fix: str
) -> bytes:
    """Returns a member's bytes, inflating at most ``_MAX_MEMBER_BYTES + 1``."""
    try:
        with zf.open(info) as member:
            data = member.read(_MAX_MEMBER_BYTES + 1)
    except (*_ZIP_READ_ERRORS, RuntimeError) as e:  # RuntimeError: encrypted
        raise DatasetError(
            f"{path} is corrupted: cannot read {info.filename} ({e}). {fix}"
        ) from e
    if len(data) > _MAX_MEMBER_BYTES:
        raise DatasetError(
            f"{path}: {info.filename} inflates to more than {_MAX_MEMBER_BYTES} "
            f"bytes although it declares {info.file_size} (a corrupted or forged "
            f"zip entry); reading stopped there. {fix}"
        )
    return data


def _decode_png(
    path: Path,
    split: str,
    zf: zipfile.ZipFile,
    info: zipfile.ZipInfo,
    image_size: int,
    resample: str,
) -> np.ndarray:
    fix = f"Replace it with the canonical images_{split}.zip from {HOME}."
    data = _read_member(path, zf, info, fix)  # _index_archive ran _check_member
    return _png_to_ink(data, f"{path}: {info.filename}", image_size, resample, fix)


def _png_to_ink(
    data: bytes, where: str, image_size: int, resample: str, fix: str
) -> np.ndarray:
    """Decodes PNG bytes to uint8 ink (255 - gray), transparency as white paper.

    The size is read from the PNG header (the IHDR chunk, which must come first)
    before Pillow sees the data, so no pixel of a wrong-sized image is decoded.
    """
    if data[:8] != _PNG_SIGNATURE or data[12:16] != b"IHDR" or len(data) < 24:
        raise DatasetError(
            f"{where} does not decode as a PNG image (no PNG signature and IHDR "
            f"header). {fix}"
        )
    width, height = struct.unpack(">II", data[16:24])
    if (width, height) != (_SOURCE_SIZE, _SOURCE_SIZE):
        raise DatasetError(
            f"{where} is {width}x{height} pixels, expected "
            f"{_SOURCE_SIZE}x{_SOURCE_SIZE}; it was not decoded. {fix}"
        )
    try:
        with Image.open(io.BytesIO(data), formats=("PNG",)) as image:
            image.load()
            gray = _on_white_paper(image)
    except _IMAGE_ERRORS as e:
        raise DatasetError(
            f"{where} does not decode as a PNG image ({e}). {fix}"
        ) from e
    if image_size != _SOURCE_SIZE:
        gray = gray.resize((image_size, image_size), RESAMPLE_FILTERS[resample])
    return 255 - np.asarray(gray, dtype=np.uint8)


def _on_white_paper(image: Image.Image) -> Image.Image:
    """Converts to 8-bit gray, compositing any transparency onto white.

    A transparent pixel is paper, whatever colour it stores (usually black, which
    a plain ``convert("L")`` would turn into ink).
    """
    if image.mode not in ("RGBA", "LA", "PA") and "transparency" not in image.info:
        return image.convert("L")
    paper = Image.new("RGBA", image.size, (255, 255, 255, 255))
    return Image.alpha_composite(paper, image.convert("RGBA")).convert("L")


__all__ = [
    "HOME",
    "NUM_DRAWINGS",
    "RESAMPLE_FILTERS",
    "decode_archive",
    "pinned_names",
]
