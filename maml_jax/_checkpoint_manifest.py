"""Checkpoint manifests: what is recorded of each leaf, and the checks on restore.

Each checkpoint's manifest lists every leaf of the state (path, shape, dtype and
SHA-256 digest) and the run's configuration; restoring compares it with the
template's and treats anything malformed as corruption.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import pathlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np

_MAX_LISTED = 10


class CorruptCheckpointError(RuntimeError):
    """A finalized checkpoint directory could not be read back intact."""


@contextlib.contextmanager
def _reading(step_dir: pathlib.Path, what: str) -> Iterator[None]:
    """Turns any failure to read ``step_dir`` into a ``CorruptCheckpointError``."""
    try:
        yield
    except Exception as error:
        lines = str(error).strip().splitlines() or [""]
        cause = f"{type(error).__name__}: {lines[0][:300]}"
        raise CorruptCheckpointError(
            f"Checkpoint {step_dir} is corrupted or incomplete: reading {what} "
            f"failed ({cause})."
        ) from error


def _manifest_format(manifest: Any) -> int:
    """The manifest's format number; a ``ValueError`` if it has none."""
    version = manifest.get("format") if isinstance(manifest, dict) else None
    if isinstance(version, bool) or not isinstance(version, int):
        raise ValueError("malformed manifest: no format number")
    return version


def _parse_manifest(
    manifest: dict[str, Any],
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """The leaf records and ``extra`` of a manifest, checked field by field.

    Raises a ``ValueError`` naming the first malformed field, so that a
    hand-edited or garbled manifest reads as a corrupted checkpoint.
    """
    leaves, extra = manifest.get("leaves"), manifest.get("extra")
    if not isinstance(leaves, dict) or not isinstance(extra, dict):
        raise ValueError("malformed manifest: 'leaves' or 'extra' is not an object")
    for path, record in leaves.items():
        if not isinstance(record, dict):
            raise ValueError(f"malformed manifest: leaf {path} is not an object")
        for key in ("shape", "dtype", "sha256"):
            if key not in record:
                raise ValueError(f"malformed manifest: leaf {path} has no {key!r}")
        shape, dtype, digest = record["shape"], record["dtype"], record["sha256"]
        if not isinstance(shape, list) or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape
        ):
            raise ValueError(
                f"malformed manifest: leaf {path} has shape {shape!r}, not a list "
                f"of sizes"
            )
        if not isinstance(dtype, str) or not isinstance(digest, str):
            raise ValueError(
                f"malformed manifest: leaf {path}'s dtype or sha256 is not a string"
            )
    return leaves, extra


def _leaf_records(tree: Any) -> dict[str, dict[str, Any]]:
    """``{path: {"shape", "dtype", "sha256"}}`` for every leaf of ``tree``."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    host = jax.device_get([leaf for _, leaf in leaves])
    return {
        _path_str(path): {
            "shape": list(np.shape(value)),
            "dtype": str(np.asarray(value).dtype),
            "sha256": hashlib.sha256(np.ascontiguousarray(value).tobytes()).hexdigest(),
        }
        for (path, _), value in zip(leaves, host, strict=True)
    }


def _check_compatible(
    step_dir: pathlib.Path,
    saved: Mapping[str, Mapping[str, Any]],
    template: Any,
    saved_config: Any,
    config: Mapping[str, Any] | None,
) -> None:
    """Raises a ``ValueError`` listing every leaf and config key that differs."""
    wanted = {
        _path_str(path): _leaf_spec(leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(template)[0]
    }
    problems = []
    if config is not None and isinstance(saved_config, dict):
        problems += _config_diff(saved_config, _as_json("config", config))
    for path, (shape, dtype) in wanted.items():
        if path not in saved:
            problems.append(f"{path} is in this run but not in the checkpoint")
            continue
        saved_shape, saved_dtype = tuple(saved[path]["shape"]), saved[path]["dtype"]
        if saved_shape != shape:
            problems.append(
                f"{path} has shape {saved_shape} in the checkpoint but {shape} "
                f"in this run"
            )
        if saved_dtype != dtype:
            problems.append(
                f"{path} has dtype {saved_dtype} in the checkpoint but {dtype} "
                f"in this run"
            )
    problems += [
        f"{path} is in the checkpoint but not in this run"
        for path in saved
        if path not in wanted
    ]
    if problems:
        raise ValueError(
            f"Checkpoint {step_dir} was written by a different configuration:\n  "
            + _listing(problems, "\n  ")
        )


def _config_diff(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    missing = object()
    diffs = []
    for key in sorted(set(saved) | set(current)):
        old, new = saved.get(key, missing), current.get(key, missing)
        if old == new:
            continue
        old_text = "absent" if old is missing else f"{old!r}"
        new_text = "absent" if new is missing else f"{new!r}"
        diffs.append(
            f"config[{key!r}] is {old_text} in the checkpoint but {new_text} "
            f"in this run"
        )
    return diffs


def _listing(items: Sequence[str], separator: str = ", ") -> str:
    """Joins at most ``_MAX_LISTED`` items and says how many were left out."""
    shown = list(items[:_MAX_LISTED])
    if len(items) > _MAX_LISTED:
        shown.append(f"... and {len(items) - _MAX_LISTED} more")
    return separator.join(shown)


def _as_json(name: str, value: Mapping[str, Any]) -> dict[str, Any]:
    """``value`` as it will read back from JSON (tuples become lists)."""
    if not isinstance(value, Mapping):
        raise ValueError(f"{name} must be a dict; got {type(value).__name__}.")
    try:
        return json.loads(json.dumps(dict(value)))
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"{name} must be JSON-serialisable (convert arrays with float() or "
            f".tolist()): {error}"
        ) from error


def _abstract_leaf(leaf: Any) -> jax.ShapeDtypeStruct:
    shape, dtype = _leaf_spec(leaf)
    return jax.ShapeDtypeStruct(shape, dtype, sharding=getattr(leaf, "sharding", None))


def _leaf_spec(leaf: Any) -> tuple[tuple[int, ...], str]:
    if not hasattr(leaf, "shape"):
        leaf = np.asarray(leaf)
    return tuple(leaf.shape), str(np.dtype(leaf.dtype))


def _path_str(path: Sequence[Any]) -> str:
    return jax.tree_util.keystr(tuple(path)).lstrip(".")
