"""Helpers shared by the dataset loaders: errors, digests, atomic files, caches.

Everything here is private to :mod:`maml_jax.datasets` except the two error
classes, which the package re-exports.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import tempfile
import threading
import urllib.parse
import urllib.request
import warnings
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

PathLike = str | os.PathLike[str]


class DatasetError(ValueError):
    """A dataset file is missing, unreadable, or does not hold the expected content.

    A subclass of :class:`ValueError`. The message names the offending file, says
    what is wrong with it, and how to fix it (where to put or get the files).
    """


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """A required dataset file does not exist.

    Both a :class:`DatasetError` (hence a :class:`ValueError`) and a
    :class:`FileNotFoundError`, so either ``except`` clause catches it.
    """


def sha256_file(path: PathLike, chunk_size: int = 1 << 20) -> str:
    """Returns the hex sha256 digest of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def cache_key(*parts: object) -> str:
    """Returns a hex sha256 over the ``repr`` of ``parts`` (a stable cache key)."""
    return hashlib.sha256(repr(parts).encode()).hexdigest()


def default_cache_dir() -> Path:
    """Returns the directory decoded arrays are cached in when none is given.

    ``$MAML_JAX_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/maml_jax``, else
    ``~/.cache/maml_jax``. The cache never goes next to the data, so read-only
    (or shared) data directories are never written to.
    """
    if env := os.environ.get("MAML_JAX_CACHE_DIR"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "maml_jax"


@contextlib.contextmanager
def atomic_path(dest: Path) -> Iterator[Path]:
    """Yields a temporary path beside ``dest``; renames it onto ``dest`` on success.

    The temporary file lives in ``dest``'s directory so that :func:`os.replace`
    is an atomic rename: readers see either the old file or the complete new one,
    never a partial write. On any exception the temporary file is removed.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent
    )
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_npz_atomic(path: Path, key: str, arrays: Mapping[str, np.ndarray]) -> None:
    """Writes ``arrays`` plus the cache ``key`` to ``path`` atomically (npz)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, cache_key=np.array(key), **arrays)
            f.flush()
            os.fsync(f.fileno())


def load_npz_checked(path: Path, key: str) -> dict[str, np.ndarray] | None:
    """Reads a cache written by :func:`save_npz_atomic`, or ``None`` if unusable.

    Returns ``None`` when the file is missing, unreadable or corrupted (any
    read error, including CRC errors of the npz members), or when its stored key
    differs from ``key`` (a stale cache). Callers must still check shapes.
    """
    if not path.is_file():
        return None
    try:
        with open(path, "rb") as f, np.load(f, allow_pickle=False) as z:
            if "cache_key" not in z.files or str(z["cache_key"]) != key:
                return None
            return {name: z[name] for name in z.files if name != "cache_key"}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error):
        return None


def try_save_cache(path: Path, key: str, arrays: Mapping[str, np.ndarray]) -> None:
    """Like :func:`save_npz_atomic`, but warns instead of failing when unwritable."""
    try:
        save_npz_atomic(path, key, arrays)
    except OSError as e:
        warnings.warn(
            f"could not write the dataset cache {path} ({e}); the data will be "
            "decoded again next time. Pass a writable cache_dir (or set "
            "MAML_JAX_CACHE_DIR) to cache it.",
            RuntimeWarning,
            stacklevel=3,
        )


def _resolve_host(host: str, port: int, timeout: float) -> None:
    """Resolves ``host`` within ``timeout`` seconds (socket timeouts skip DNS)."""
    outcome: list[BaseException | None] = []

    def target() -> None:
        try:
            socket.getaddrinfo(host, port)
            outcome.append(None)
        except OSError as e:
            outcome.append(e)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if not outcome:
        raise TimeoutError(f"DNS lookup of {host} took longer than {timeout} s")
    if outcome[0] is not None:
        raise outcome[0]


def download_file(url: str, dest: Path, *, md5: str | None, timeout: float) -> None:
    """Downloads ``url`` to ``dest`` atomically, checking its md5 if given.

    Fails fast without network: the host lookup and every socket operation are
    bounded by ``timeout`` seconds.

    Raises:
      OSError: on any network or file-system failure (``urllib.error.URLError``
        and ``TimeoutError`` are subclasses).
      DatasetError: when the downloaded bytes do not have the expected md5.
    """
    parsed = urllib.parse.urlsplit(url)
    default_port = 443 if parsed.scheme == "https" else 80
    _resolve_host(parsed.hostname or "", parsed.port or default_port, timeout)
    digest = hashlib.md5(usedforsecurity=False)
    with atomic_path(dest) as tmp:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            with open(tmp, "wb") as f:
                while block := response.read(1 << 20):
                    digest.update(block)
                    f.write(block)
        if md5 is not None and digest.hexdigest() != md5:
            raise DatasetError(
                f"the file downloaded from {url} has md5 {digest.hexdigest()}, "
                f"expected {md5}; it was not saved to {dest}. The download may be "
                "incomplete or the remote file may have changed."
            )


__all__ = [
    "DatasetError",
    "DatasetNotFoundError",
    "atomic_path",
    "cache_key",
    "default_cache_dir",
    "download_file",
    "load_npz_checked",
    "save_npz_atomic",
    "sha256_file",
    "try_save_cache",
]
