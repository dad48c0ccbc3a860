"""Omniglot (Lake et al., 2015) from its canonical zip archives.

Files. The loader reads the two archives of the canonical distribution,
unextracted, from a directory you choose::

    <data_dir>/images_background.zip   30 alphabets, 964 characters
    <data_dir>/images_evaluation.zip   20 alphabets, 659 characters

Both come from https://github.com/brendenlake/omniglot (folder ``python/``);
``download=True`` fetches them from :data:`OMNIGLOT_URL_BASE`. Inside, each is
laid out ``images_<split>/<Alphabet>/characterNN/IIII_DD.png``: 20 drawings
(``DD`` = 01..20) of every character, 105 x 105 1-bit PNGs, ``IIII`` the global
character id (0001-0964 background, 0965-1623 evaluation).

Validation. Archives are checked by content, never by a file checksum (re-zipped
copies are fine): the zip must open and every member must pass its CRC, the
top folder must be ``images_<split>/``, the set of ``Alphabet/characterNN``
folders must be exactly the pinned list for that archive, each character must
have exactly 20 drawings, and every image must decode as a 105 x 105 PNG.
Hostile files are refused before they cost time or memory: before any member
is inflated, every member must be unencrypted, stored or deflated (zipfile
inflates bzip2 and lzma without an output bound), declare at most 1 MiB
uncompressed (a 105 x 105 PNG's pixels take at most 88 KB) and, above 128 KiB, inflate
at most 100-fold; members are then read with a bound of 1 MiB whatever they
declare, and a PNG's size is checked in its header before its pixels are
decoded. Anything else raises :class:`~maml_jax.datasets.DatasetError` (a
``ValueError``) naming the file, the problem and the fix; a missing archive
raises :class:`~maml_jax.datasets.DatasetNotFoundError` (also a
``FileNotFoundError``).

Preprocessing. Each PNG is decoded once with Pillow, converted to 8-bit
grayscale (an image with transparency, such as RGBA, LA or a palette with a
transparent entry, is first composited onto white, so transparent pixels are
paper whatever colour they store), resized to ``image_size`` x ``image_size``
with Lanczos filtering (``resample="lanczos"``, the antialiasing filter MAML's
preprocessing asks for; ``"bilinear"`` and ``"nearest"`` are available), and
inverted so that ink is 1.0 and background 0.0. Conversion to grayscale comes
first because Pillow resizes 1-bit images with nearest-neighbour whatever filter
is requested (so MAML's own script, which resizes the 1-bit image directly, gets
nearest).
Images come out as float32 in [0, 1] with a trailing channel axis.

Cache. The decoded images are cached as ``.npz`` (uint8) under ``cache_dir``
(default :func:`default_cache_dir`: ``$MAML_JAX_CACHE_DIR``, else
``$XDG_CACHE_HOME/maml_jax``, else ``~/.cache/maml_jax``; never the data
directory, which may be read-only or shared). The cache key is the sha256 of
the archive's bytes together with the split, image size, filter and a format
version, so a changed archive never reuses a stale cache; a cache that cannot be
read, or whose stored key or shapes do not match, is rebuilt. Writes are atomic
(temporary file in the same directory, then :func:`os.replace`). A cache hit
skips the content validation, which already passed when the cache was written
for these exact archive bytes.

Splits. :func:`omniglot_classes` assembles the class array of a pinned split
over both archives (see :data:`SPLIT_NAMES`); the lists live in the package as
text files (``maml_jax/datasets/_splits/``), never drawn from a seed.

References:
  Lake, Salakhutdinov & Tenenbaum, "Human-level concept learning through
  probabilistic program induction", Science, 2015.
  Vinyals, Blundell, Lillicrap, Kavukcuoglu & Wierstra, "Matching Networks for
  One Shot Learning", NeurIPS 2016.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np

from maml_jax.datasets._common import (
    DatasetError,
    DatasetNotFoundError,
    PathLike,
    cache_key,
    default_cache_dir,
    download_file,
    load_npz_checked,
    sha256_file,
    try_save_cache,
)
from maml_jax.datasets._omniglot_archive import HOME as _HOME
from maml_jax.datasets._omniglot_archive import NUM_DRAWINGS
from maml_jax.datasets._omniglot_archive import RESAMPLE_FILTERS as _RESAMPLE
from maml_jax.datasets._omniglot_archive import decode_archive as _decode_archive
from maml_jax.datasets._omniglot_archive import pinned_names as _pinned

ArchiveSplit = Literal["background", "evaluation"]
SplitName = Literal[
    "vinyals-train",
    "vinyals-val",
    "vinyals-test",
    "vinyals-trainval",
    "lake-background",
    "lake-evaluation",
]
Resample = Literal["lanczos", "bilinear", "nearest"]

ARCHIVE_SPLITS: tuple[ArchiveSplit, ...] = ("background", "evaluation")
"""The two canonical archives, ``images_<split>.zip``."""

SPLIT_NAMES: tuple[SplitName, ...] = (
    "vinyals-train",
    "vinyals-val",
    "vinyals-test",
    "vinyals-trainval",
    "lake-background",
    "lake-evaluation",
)
"""Pinned class splits accepted by :func:`omniglot_classes`.

``vinyals-*``: the split of Vinyals et al. (2016) as published by Prototypical
Networks and torchmeta: 1028 train / 172 val / 423 test characters, mixing both
archives; ``vinyals-trainval`` (1200) is the "1200 training characters" of
Matching Networks and MAML. Use ``vinyals-train`` for meta-training,
``vinyals-val`` for model selection and ``vinyals-test`` for the reported
numbers; the training presets use these. (MAML's reference code instead draws
1200/423 characters with a fixed random seed; the pinned split makes results
comparable across libraries.) ``lake-*``: Lake et al.'s alphabet-disjoint
split, background (964) for training and evaluation (659) for testing.
"""

OMNIGLOT_URL_BASE = (
    "https://raw.githubusercontent.com/brendenlake/omniglot/master/python"
)
"""Where ``download=True`` fetches ``images_<split>.zip`` from."""

DOWNLOAD_TIMEOUT_S = 10.0
"""Seconds allowed for the host lookup and for each socket operation."""

_CANONICAL_MD5 = {
    "background": "68d2efa1b9178cc56df9314c21c6e718",
    "evaluation": "6b91aef0f799c5bb55b94e3f2daec811",
}
_CACHE_FORMAT = 2  # 2: transparency is paper (format 1 made it ink)


class OmniglotSplit(NamedTuple):
    """One Omniglot archive, decoded.

    Attributes:
      images: float32 array of shape ``(num_characters, 20, H, W, 1)``, values in
        [0, 1], ink = 1. Characters are ordered by alphabet then character folder,
        drawings by their index ``01..20``.
      alphabets: ``(num_characters,)`` alphabet folder name of each character.
      characters: ``(num_characters,)`` character folder name (``characterNN``).
      character_ids: int32 ``(num_characters,)`` global ids 1..1623 (the ``IIII``
        of the file names).
    """

    images: np.ndarray
    alphabets: tuple[str, ...]
    characters: tuple[str, ...]
    character_ids: np.ndarray

    @property
    def names(self) -> tuple[str, ...]:
        """``Alphabet/characterNN`` of each character, the pinned-split format."""
        return tuple(
            f"{a}/{c}" for a, c in zip(self.alphabets, self.characters, strict=True)
        )


def omniglot_class_names(
    split_name: SplitName, *, rotations: bool = True
) -> tuple[str, ...]:
    """Returns the class names of a pinned split, in :func:`omniglot_classes` order.

    Args:
      split_name: one of :data:`SPLIT_NAMES`.
      rotations: if True, each character gives four classes, named
        ``Alphabet/characterNN/rot000`` (then ``rot090``, ``rot180``,
        ``rot270``), as in the Prototypical Networks split files.

    Returns:
      A tuple of ``Alphabet/characterNN[/rotDDD]`` strings.

    Examples:
      >>> names = omniglot_class_names("vinyals-test", rotations=False)
      >>> len(names), names[0]
      (423, 'Gurmukhi/character42')
      >>> omniglot_class_names("vinyals-trainval")[1]
      'Alphabet_of_the_Magi/character01/rot090'
    """
    if split_name not in SPLIT_NAMES:
        raise ValueError(f"split_name must be one of {SPLIT_NAMES}, got {split_name!r}")
    family, part = split_name.split("-")
    if split_name == "vinyals-trainval":
        names = _pinned("vinyals_train") + _pinned("vinyals_val")
    else:
        names = _pinned(f"{family}_{part}")
    if rotations:
        names = tuple(f"{n}/rot{deg:03d}" for n in names for deg in (0, 90, 180, 270))
    return names


def load_omniglot(
    data_dir: PathLike,
    *,
    split: ArchiveSplit = "background",
    image_size: int = 28,
    resample: Resample = "lanczos",
    download: bool = False,
    cache: bool = True,
    cache_dir: PathLike | None = None,
) -> OmniglotSplit:
    """Loads one canonical Omniglot archive as arrays, validating and caching it.

    Args:
      data_dir: directory holding ``images_background.zip`` and/or
        ``images_evaluation.zip`` (kept zipped).
      split: which archive, ``"background"`` (964 characters) or
        ``"evaluation"`` (659).
      image_size: output side length H = W (105 keeps the original pixels).
      resample: resize filter, ``"lanczos"`` (default), ``"bilinear"`` or
        ``"nearest"``.
      download: if the archive is missing, fetch it from
        :data:`OMNIGLOT_URL_BASE` into ``data_dir`` (md5-checked against the
        canonical file, written atomically, then validated like any archive).
      cache: read and write the decoded-array cache.
      cache_dir: where the cache lives; default :func:`default_cache_dir`.

    Returns:
      An :class:`OmniglotSplit` with ``images`` of shape
      ``(num_characters, 20, image_size, image_size, 1)``, float32, ink = 1.

    Raises:
      DatasetNotFoundError: the archive is missing (and ``download`` is False).
      DatasetError: the archive is corrupted, truncated, laid out differently,
        holds the other split, or cannot be downloaded.

    Examples:
      >>> train = load_omniglot("data/omniglot")  # doctest: +SKIP
      >>> train.images.shape, train.names[0]  # doctest: +SKIP
      ((964, 20, 28, 28, 1), 'Alphabet_of_the_Magi/character01')
    """
    if split not in ARCHIVE_SPLITS:
        raise ValueError(f"split must be one of {ARCHIVE_SPLITS}, got {split!r}")
    if (
        isinstance(image_size, bool)
        or not isinstance(image_size, int)
        or image_size < 1
    ):
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    if resample not in _RESAMPLE:
        raise ValueError(
            f"resample must be one of {tuple(_RESAMPLE)}, got {resample!r}"
        )
    path = _archive_path(Path(data_dir), split, download)
    key = cache_key(
        "omniglot", _CACHE_FORMAT, split, sha256_file(path), image_size, resample
    )
    cache_file = Path(cache_dir if cache_dir is not None else default_cache_dir())
    cache_file /= f"omniglot_{split}_{image_size}px_{resample}_{key[:16]}.npz"
    arrays = load_npz_checked(cache_file, key) if cache else None
    if arrays is None or not _cache_is_consistent(arrays, split, image_size):
        arrays = _decode_archive(path, split, image_size, resample)
        if cache:
            try_save_cache(cache_file, key, arrays)
    ink = arrays["ink"]
    images = np.divide(ink, np.float32(255), dtype=np.float32)[..., None]
    return OmniglotSplit(
        images=images,
        alphabets=tuple(arrays["alphabets"].tolist()),
        characters=tuple(arrays["characters"].tolist()),
        character_ids=arrays["character_ids"],
    )


def omniglot_classes(
    data_dir: PathLike,
    split_name: SplitName = "vinyals-train",
    *,
    image_size: int = 28,
    rotations: bool = True,
    resample: Resample = "lanczos",
    download: bool = False,
    cache: bool = True,
    cache_dir: PathLike | None = None,
) -> np.ndarray:
    """Builds the ``(num_classes, 20, H, W, 1)`` array of a pinned split.

    Loads whichever archives the split draws from (with :func:`load_omniglot`,
    so validation and caching apply) and orders the characters as
    :func:`omniglot_class_names` does. With ``rotations``, each character
    becomes four classes, class-major with the rotation inner: class
    ``4 * c + k`` is character ``c`` rotated by ``k * 90`` degrees
    counter-clockwise (:func:`numpy.rot90` with ``k``), as in Vinyals et al.

    Args:
      data_dir: directory holding the canonical archives.
      split_name: one of :data:`SPLIT_NAMES` (see there for which to use when).
      image_size: output side length.
      rotations: multiply the classes by four with 0/90/180/270 rotations.
      resample: resize filter, as in :func:`load_omniglot`.
      download: fetch missing archives, as in :func:`load_omniglot`.
      cache: use the decoded-array cache.
      cache_dir: cache location; default :func:`default_cache_dir`.

    Returns:
      float32 array of shape ``(num_classes, 20, image_size, image_size, 1)``:
      1028 / 172 / 423 / 1200 / 964 / 659 characters (times 4 with rotations).

    Examples:
      >>> x = omniglot_classes("data/omniglot", "vinyals-test")  # doctest: +SKIP
      >>> x.shape  # doctest: +SKIP
      (1692, 20, 28, 28, 1)
    """
    names = omniglot_class_names(split_name, rotations=False)
    wanted = set(names)
    where: dict[str, tuple[np.ndarray, int]] = {}
    for split in ARCHIVE_SPLITS:
        if wanted.isdisjoint(_pinned(f"lake_{split}")):
            continue
        loaded = load_omniglot(
            data_dir,
            split=split,
            image_size=image_size,
            resample=resample,
            download=download,
            cache=cache,
            cache_dir=cache_dir,
        )
        for i, name in enumerate(loaded.names):
            where[name] = (loaded.images, i)
    out = np.empty((len(names), NUM_DRAWINGS, image_size, image_size, 1), np.float32)
    for c, name in enumerate(names):
        images, i = where[name]
        out[c] = images[i]
    if rotations:
        out = np.stack([np.rot90(out, k, axes=(2, 3)) for k in range(4)], axis=1)
        out = out.reshape(-1, NUM_DRAWINGS, image_size, image_size, 1)
    return out


def _archive_path(data_dir: Path, split: str, download: bool) -> Path:
    path = data_dir / f"images_{split}.zip"
    if path.is_file():
        return path
    url = f"{OMNIGLOT_URL_BASE.rstrip('/')}/images_{split}.zip"
    if download:
        try:
            download_file(
                url, path, md5=_CANONICAL_MD5[split], timeout=DOWNLOAD_TIMEOUT_S
            )
        except OSError as e:
            raise DatasetError(
                f"could not download {url} to {path} ({e}). Without network "
                f"access, get images_{split}.zip from {_HOME} on another machine "
                f"and copy it, still zipped, into the data directory {data_dir}."
            ) from e
        return path
    extracted = data_dir / f"images_{split}"
    note = (
        f" (found the extracted folder {extracted}; this loader reads the zip "
        "itself, so keep the .zip file)"
        if extracted.is_dir()
        else ""
    )
    raise DatasetNotFoundError(
        f"Omniglot archive {path} not found{note}. Put the canonical "
        f"images_{split}.zip from {_HOME} into the data directory {data_dir}, "
        "still zipped, or pass download=True to fetch it."
    )


def _cache_is_consistent(arrays: dict[str, np.ndarray], split: str, size: int) -> bool:
    names = _pinned(f"lake_{split}")
    n = len(names)
    try:
        ink, alphabets = arrays["ink"], arrays["alphabets"]
        characters, ids = arrays["characters"], arrays["character_ids"]
    except KeyError:
        return False
    return (
        ink.dtype == np.uint8
        and ink.shape == (n, NUM_DRAWINGS, size, size)
        and alphabets.shape == characters.shape == ids.shape == (n,)
        and tuple(
            f"{a}/{c}"
            for a, c in zip(alphabets.tolist(), characters.tolist(), strict=True)
        )
        == names
    )
