"""mini-ImageNet with the Ravi & Larochelle (2017) split, from the files users have.

The split has 64 train / 16 val / 20 test classes (ImageNet wnids) of 600
RGB images each, 84 x 84 pixels. :func:`load_miniimagenet` reads either of the
two common distributions from a directory you choose:

1. Pickle caches (the files learn2learn downloads, also shared elsewhere)::

       <data_dir>/mini-imagenet-cache-{train,val,test}.pkl

   each a dict ``{"image_data": uint8 (N, 84, 84, 3), "class_dict": {wnid:
   [indices into image_data]}}``. They are unpickled with a restricted
   unpickler that can only rebuild numpy arrays, dtypes, scalars, dicts,
   lists and bytes (``_codecs.encode``, which protocol 2 uses for an array's
   raw data); any other global (``os.system``, ...) is refused with a
   :class:`~maml_jax.datasets.DatasetError` and never executed. So is a pickle
   that would build much more memory than the file holds (the allowed
   callables take only the arguments real pickles use, and what they build is
   budgeted), and ``class_dict`` is checked without expanding shared
   references, so a few hostile bytes cannot stand for billions of items.

2. An image folder with Ravi & Larochelle's split files::

       <data_dir>/images/<filename>.jpg     e.g. n0153282900000005.jpg
       <data_dir>/{train,val,test}.csv      header "filename,label"

   The CSVs are those of https://github.com/twitter/meta-learning-lstm
   (``data/miniImagenet/``); the images are produced from ILSVRC-2012 by the
   scripts that accompany such splits (or come pre-resized in the commonly
   shared ``images/`` folder). Images that are not 84 x 84 are resized with
   Pillow's Lanczos filter. Decoding 60,000 JPEGs is slow, so the result is
   cached as ``.npz`` (uint8) in ``cache_dir`` (default
   :func:`~maml_jax.datasets.default_cache_dir`), keyed by the CSV's sha256
   and the name, size and modification time of every listed image (a
   ``make``-style key: images are not hashed). Writes are atomic; an unreadable
   or inconsistent cache is rebuilt.

Output is ``(num_classes, 600, 84, 84, 3)``, float32 in [0, 1] (or the raw
uint8 with ``dtype=np.uint8``; the float32 train split takes 3.3 GB, the uint8
one 0.8 GB). Classes are sorted by wnid; images keep the order of the CSV rows
or of the pickle's index lists, so both formats give the same array for the
same data. ``strict=True`` (the default) checks the published counts;
``strict=False`` accepts any number of classes with an equal number of images
each (subsets, test fixtures, custom splits).

References:
  Vinyals et al., "Matching Networks for One Shot Learning", NeurIPS 2016.
  Ravi & Larochelle, "Optimization as a Model for Few-Shot Learning", ICLR 2017.
"""

from __future__ import annotations

import csv
import pickle
import struct
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
from PIL import Image

from maml_jax.datasets._common import (
    DatasetError,
    DatasetNotFoundError,
    PathLike,
    cache_key,
    default_cache_dir,
    load_npz_checked,
    sha256_file,
    try_save_cache,
)
from maml_jax.datasets._safe_pickle import RefusedPickle, load_restricted

MiniImageNetSplitName = Literal["train", "val", "test"]

MINIIMAGENET_SPLITS: tuple[MiniImageNetSplitName, ...] = ("train", "val", "test")
"""Ravi & Larochelle's splits."""

NUM_CLASSES = {"train": 64, "val": 16, "test": 20}
"""Classes per split in the published split (checked when ``strict``)."""

IMAGES_PER_CLASS = 600
IMAGE_SIZE = 84

_CACHE_FORMAT = 1
_HOW_TO_GET = (
    "Put mini-imagenet-cache-{split}.pkl (the learn2learn pickle) into {dir}, or "
    "an images/ folder of .jpg files with Ravi & Larochelle's {split}.csv (from "
    "github.com/twitter/meta-learning-lstm, data/miniImagenet/) beside it."
)


class MiniImageNetSplit(NamedTuple):
    """One mini-ImageNet split as arrays.

    Attributes:
      images: ``(num_classes, images_per_class, 84, 84, 3)``, float32 in [0, 1]
        (or uint8 in [0, 255] when loaded with ``dtype=np.uint8``).
      class_names: ``(num_classes,)`` ImageNet wnids, sorted.
    """

    images: np.ndarray
    class_names: tuple[str, ...]


def load_miniimagenet(
    data_dir: PathLike,
    split: MiniImageNetSplitName = "train",
    *,
    source: Literal["auto", "pickle", "images"] = "auto",
    strict: bool = True,
    dtype: Any = np.float32,
    cache: bool = True,
    cache_dir: PathLike | None = None,
) -> MiniImageNetSplit:
    """Loads a mini-ImageNet split from pickle caches or an image folder.

    Args:
      data_dir: directory holding ``mini-imagenet-cache-<split>.pkl``, or
        ``images/`` and ``<split>.csv``.
      split: ``"train"``, ``"val"`` or ``"test"``.
      source: ``"pickle"``, ``"images"``, or ``"auto"`` (the pickle when present,
        else the image folder).
      strict: require the published counts (64/16/20 classes of 600 images);
        if False, require only that all classes have the same number of images.
      dtype: ``np.float32`` (values in [0, 1]) or ``np.uint8`` (raw pixels).
      cache: cache the decoded image folder (the pickle needs no cache).
      cache_dir: cache location; default
        :func:`~maml_jax.datasets.default_cache_dir`.

    Returns:
      A :class:`MiniImageNetSplit` with ``images`` of shape
      ``(num_classes, images_per_class, 84, 84, 3)``.

    Raises:
      DatasetNotFoundError: the files for ``source`` are missing.
      DatasetError: a file is corrupted, refused (unsafe pickle), or holds the
        wrong counts or shapes.

    Examples:
      >>> test = load_miniimagenet("data/miniimagenet", "test")  # doctest: +SKIP
      >>> test.images.shape, test.images.dtype  # doctest: +SKIP
      ((20, 600, 84, 84, 3), dtype('float32'))
    """
    if split not in MINIIMAGENET_SPLITS:
        raise ValueError(f"split must be one of {MINIIMAGENET_SPLITS}, got {split!r}")
    if source not in ("auto", "pickle", "images"):
        raise ValueError(f"source must be 'auto', 'pickle' or 'images', got {source!r}")
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype(np.float32), np.dtype(np.uint8)):
        raise ValueError(f"dtype must be float32 or uint8, got {dtype}")
    data_dir = Path(data_dir)
    pickle_path = data_dir / f"mini-imagenet-cache-{split}.pkl"
    if source == "auto":
        source = "pickle" if pickle_path.is_file() else "images"
    if source == "pickle":
        if not pickle_path.is_file():
            raise DatasetNotFoundError(
                f"{pickle_path} not found. "
                + _HOW_TO_GET.format(split=split, dir=data_dir)
            )
        pixels, names = _load_pickle(pickle_path, split, strict)
    else:
        pixels, names = _load_image_folder(data_dir, split, strict, cache, cache_dir)
    if dtype == np.uint8:
        return MiniImageNetSplit(pixels, names)
    return MiniImageNetSplit(
        np.divide(pixels, np.float32(255), dtype=np.float32), names
    )


def _check_counts(path: Path, split: str, counts: dict[str, int], strict: bool) -> None:
    if not counts:
        raise DatasetError(f"{path} lists no images for the {split} split.")
    if strict:
        expected = NUM_CLASSES[split]
        odd = {k: v for k, v in sorted(counts.items()) if v != IMAGES_PER_CLASS}
        if len(counts) != expected or odd:
            shown = dict(list(odd.items())[:5])
            raise DatasetError(
                f"{path}: the Ravi & Larochelle {split} split has {expected} "
                f"classes of {IMAGES_PER_CLASS} images, found {len(counts)} classes"
                + (f", {len(odd)} of them with other counts {shown}" if odd else "")
                + ". The file is incomplete or holds another split; replace it, "
                "or pass strict=False to load a subset or custom split."
            )
    elif len(set(counts.values())) != 1:
        raise DatasetError(
            f"{path}: classes have different numbers of images "
            f"(from {min(counts.values())} to {max(counts.values())}); every "
            "class needs the same number to form one array."
        )


def _load_pickle(path: Path, split: str, strict: bool) -> tuple[np.ndarray, tuple]:
    try:
        with open(path, "rb") as f:
            obj = load_restricted(f)
    except RefusedPickle as e:
        raise DatasetError(
            f"{path}: {e}. A mini-ImageNet cache may only contain numpy arrays, "
            "dicts and lists; this file was NOT loaded (it may be malicious, or "
            "not a mini-ImageNet pickle)."
        ) from e
    except (
        pickle.UnpicklingError,
        EOFError,
        OSError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
        MemoryError,
        ArithmeticError,
        struct.error,
    ) as e:
        raise DatasetError(
            f"{path} is not a readable pickle ({type(e).__name__}: {e}); it is "
            "probably truncated or corrupted. Download it again."
        ) from e
    what = 'a dict with "image_data" (uint8, (N, 84, 84, 3)) and "class_dict"'
    if not isinstance(obj, dict) or not {"image_data", "class_dict"} <= obj.keys():
        raise DatasetError(f"{path} does not hold {what}.")
    data, class_dict = obj["image_data"], obj["class_dict"]
    shape = (IMAGE_SIZE, IMAGE_SIZE, 3)
    if not (
        isinstance(data, np.ndarray)
        and data.dtype == np.uint8
        and data.ndim == 4
        and data.shape[1:] == shape
    ):
        found = (
            f"{data.dtype} {data.shape}"
            if isinstance(data, np.ndarray)
            else type(data).__name__
        )
        raise DatasetError(f"{path}: image_data is {found}; expected {what}.")
    indices = _class_indices(path, class_dict, len(data))
    _check_counts(path, split, {k: len(v) for k, v in indices.items()}, strict)
    every = np.concatenate(list(indices.values()))
    if len(np.unique(every)) != len(every):
        raise DatasetError(f"{path}: some images belong to more than one class.")
    names = tuple(sorted(indices))
    out = np.empty((len(names), len(indices[names[0]]), *shape), np.uint8)
    for c, wnid in enumerate(names):
        out[c] = data[indices[wnid]]
    return out, names


def _class_indices(path: Path, class_dict: Any, num_images: int) -> dict:
    """Checks ``class_dict`` without expanding it; returns ``{wnid: intp array}``.

    Each value must be a flat list of ints or a 1-D integer array, and together
    they may list at most ``num_images`` indices (an image is in one class): a
    pickle's shared references can make a few bytes stand for billions of items
    (the same list under every key, or nested in itself), so lengths are summed,
    and nesting refused, before anything is converted.
    """
    if not isinstance(class_dict, dict) or not all(
        isinstance(k, str) for k in class_dict
    ):
        raise DatasetError(f"{path}: class_dict must map wnid strings to index lists.")
    total = 0
    for wnid, idx in class_dict.items():
        flat = (
            idx.ndim == 1 and (idx.size == 0 or np.issubdtype(idx.dtype, np.integer))
            if isinstance(idx, np.ndarray)
            else isinstance(idx, list | tuple)
        )
        if not flat:
            raise DatasetError(f"{path}: class_dict[{wnid!r}] is not a list of ints.")
        total += len(idx)
        if total > num_images:
            raise DatasetError(
                f"{path}: class_dict lists at least {total} image indices but "
                f"image_data holds {num_images} images, and an image belongs to one "
                "class (the file is corrupted, or shares one index list between "
                "classes)."
            )
    indices = {}
    for wnid, idx in class_dict.items():
        if isinstance(idx, np.ndarray):
            lo, hi = (int(idx.min()), int(idx.max())) if idx.size else (0, 0)
        else:
            if not all(_is_int(i) for i in idx):
                raise DatasetError(
                    f"{path}: class_dict[{wnid!r}] is not a list of ints."
                )
            idx = [int(i) for i in idx]
            lo, hi = (min(idx), max(idx)) if idx else (0, 0)
        if lo < 0 or hi >= num_images:
            raise DatasetError(
                f"{path}: class_dict[{wnid!r}] indexes outside image_data "
                f"({num_images} images)."
            )
        indices[wnid] = np.asarray(idx, dtype=np.intp)
    return indices


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _read_split_csv(path: Path) -> dict[str, list[str]]:
    """Reads Ravi's ``filename,label`` CSV into ``{label: [filenames]}``."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DatasetError(f"{path} is not a readable CSV file ({e}).") from e
    if not rows or [c.strip() for c in rows[0]] != ["filename", "label"]:
        raise DatasetError(
            f"{path} must start with the header 'filename,label' (Ravi & "
            f"Larochelle's format); found {rows[0] if rows else 'an empty file'}."
        )
    by_label: dict[str, list[str]] = {}
    seen: set[str] = set()
    for line, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise DatasetError(
                f"{path}, line {line}: expected 'filename,label', found {row}."
            )
        filename, label = row[0].strip(), row[1].strip()
        if filename in seen:
            raise DatasetError(f"{path}, line {line}: {filename} is listed twice.")
        seen.add(filename)
        by_label.setdefault(label, []).append(filename)
    return by_label


def _load_image_folder(
    data_dir: Path,
    split: str,
    strict: bool,
    cache: bool,
    cache_dir: PathLike | None,
) -> tuple[np.ndarray, tuple]:
    csv_path, images_dir = data_dir / f"{split}.csv", data_dir / "images"
    for needed in (csv_path, images_dir):
        if not needed.exists():
            raise DatasetNotFoundError(
                f"{needed} not found. " + _HOW_TO_GET.format(split=split, dir=data_dir)
            )
    by_label = _read_split_csv(csv_path)
    _check_counts(csv_path, split, {k: len(v) for k, v in by_label.items()}, strict)
    names = tuple(sorted(by_label))
    stats, missing = [], []
    for filename in (f for n in names for f in by_label[n]):
        try:
            st = (images_dir / filename).stat()
        except FileNotFoundError:
            missing.append(filename)
            continue
        stats.append((filename, st.st_size, st.st_mtime_ns))
    if missing:
        raise DatasetError(
            f"{len(missing)} images listed in {csv_path} are missing from "
            f"{images_dir}, e.g. {missing[:3]}. Put all mini-ImageNet images there."
        )
    key = cache_key(
        "miniimagenet", _CACHE_FORMAT, split, sha256_file(csv_path), tuple(stats)
    )
    cache_file = Path(cache_dir if cache_dir is not None else default_cache_dir())
    cache_file /= f"miniimagenet_{split}_{key[:16]}.npz"
    shape = (len(names), len(by_label[names[0]]), IMAGE_SIZE, IMAGE_SIZE, 3)
    arrays = load_npz_checked(cache_file, key) if cache else None
    if (
        arrays is not None
        and arrays.get("images", np.empty(0)).shape == shape
        and arrays["images"].dtype == np.uint8
        and tuple(arrays.get("class_names", np.empty(0)).tolist()) == names
    ):
        return arrays["images"], names
    out = np.empty(shape, np.uint8)
    for c, name in enumerate(names):
        for i, filename in enumerate(by_label[name]):
            out[c, i] = _decode_image(images_dir / filename)
    if cache:
        try_save_cache(cache_file, key, {"images": out, "class_names": np.array(names)})
    return out, names


def _decode_image(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DatasetError(f"{path} does not decode as an image ({e}).") from e
    if rgb.size != (IMAGE_SIZE, IMAGE_SIZE):
        rgb = rgb.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)
    return np.asarray(rgb, dtype=np.uint8)
