"""Atomic, verified checkpoints of a ``MetaTrainState`` on orbax, for exact resume.

Each checkpoint is an orbax step directory ``<directory>/<step>/`` with two items:

- ``state``: the state's array leaves (``step``, ``meta_params``, ``opt_state``),
  written by orbax's ``StandardSave`` (tensorstore/zarr arrays, no pickle);
- ``manifest``: a JSON file with, for every leaf, its path, shape, dtype and the
  SHA-256 of its bytes, plus the caller's small JSON ``extra`` dict.

Atomicity is orbax's: it writes everything into ``<step>.orbax-checkpoint-tmp``
and renames it to ``<step>`` only once every file is written, so a crash
mid-write leaves a temporary directory that is never listed as a checkpoint
(a later writing ``Checkpointer`` on the directory deletes it before its first
save). On top of that, restore checks the manifest against the template
(refusing a checkpoint of another model or dtype with a message naming the
leaf), the digests against the restored bytes and the restored ``step`` against
the directory's name, so a truncated, garbled, malformed or misplaced checkpoint
is reported, never loaded: tensorstore alone can return silently wrong values
when a data file's bytes are flipped.

A directory has one writer at a time (one run, one process; the caller makes
sure of it). Readers open it with ``read_only=True`` and may do so while the
writer is saving: a read-only ``Checkpointer`` creates, renames and deletes
nothing, so it cannot remove the temporary directory of a save in progress.
To resume::

    ckpt = Checkpointer(directory, keep=3)
    if ckpt.latest_step() is not None:
        state, extra, _ = ckpt.restore(state, config=config, fallback=True)
    state = fit(state, ..., callbacks=(lambda s, r: ckpt.save(s, extra=...),))
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import numbers
import os
import pathlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from maml_jax import _validation
from maml_jax.train import MetaTrainState

__all__ = ["Checkpointer", "CorruptCheckpointError", "RestoredCheckpoint"]

_FORMAT = 1
_MAX_LISTED = 10
logger = logging.getLogger(__name__)


class CorruptCheckpointError(RuntimeError):
    """A finalized checkpoint directory could not be read back intact."""


class RestoredCheckpoint(NamedTuple):
    """What ``Checkpointer.restore`` returns.

    Attributes:
      state: the restored state, with the template's static fields.
      extra: the JSON ``extra`` dict saved with it (``{}`` if none).
      step: the step of the checkpoint that was restored.
    """

    state: MetaTrainState
    extra: dict[str, Any]
    step: int


class Checkpointer:
    """Keeps the last ``keep`` checkpoints of a ``MetaTrainState`` in ``directory``.

    Saving is synchronous: ``save`` returns once the step directory is
    finalized on disk. Restoring only reads arrays and JSON; nothing is
    unpickled (orbax's ``StandardSave``/``StandardRestore`` store arrays with
    tensorstore and metadata as JSON, and ``JsonSave`` uses ``json``).

    Args:
      directory: the run's checkpoint directory (created if missing, unless
        ``read_only``).
      keep: how many of the most recent checkpoints to keep (older ones are
        deleted after each save).
      read_only: open the directory only to read it, e.g. to evaluate a run
        that may still be training: nothing in it is created, renamed or
        deleted (temporary directories of saves in progress are left alone,
        ``restore(fallback=True)`` skips an unreadable checkpoint without
        moving it aside) and ``save`` raises.

    Examples:
      >>> import tempfile
      >>> import jax, jax.numpy as jnp, optax
      >>> import maml_jax
      >>> from maml_jax.checkpoint import Checkpointer
      >>> model = maml_jax.MLP((8,))
      >>> params = model.init(jax.random.key(0), jnp.zeros((1, 1)))["params"]
      >>> learner = maml_jax.maml(
      ...     maml_jax.regression_loss(model.apply), inner_lr=0.01, num_inner_steps=1
      ... )
      >>> state = maml_jax.MetaTrainState.create(
      ...     params=params, learner=learner, tx=optax.adam(1e-3)
      ... )
      >>> with tempfile.TemporaryDirectory() as d, Checkpointer(d, keep=2) as ckpt:
      ...     ckpt.save(state, extra={"seed": 0})
      ...     restored = ckpt.restore(state)
      0
      >>> restored.step, restored.extra
      (0, {'seed': 0})
    """

    def __init__(
        self, directory: str | os.PathLike, *, keep: int = 3, read_only: bool = False
    ) -> None:
        self.keep = _validation.check_positive_int("keep", keep)
        self.read_only = bool(read_only)
        self.directory = pathlib.Path(directory).absolute()
        # Not orbax's own ``read_only`` option, which logs warnings on every
        # open: this class is orbax's only caller, and when read-only it never
        # asks orbax to save, delete or clean up.
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if self.read_only else self.keep,
            # Synchronous: no background thread can still be writing on exit.
            enable_async_checkpointing=False,
            # Delete ``*.orbax-checkpoint-tmp`` left by an interrupted save; a
            # reader must not: it may be the save another process is writing.
            cleanup_tmp_directories=not self.read_only,
            create=not self.read_only,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "manifest")
        )

    def save(
        self, state: MetaTrainState, *, extra: Mapping[str, Any] | None = None
    ) -> int:
        """Writes ``state`` (and ``extra``) as the checkpoint for ``state.step``.

        Args:
          state: the train state; it must not have been donated yet.
          extra: a small JSON-serialisable dict stored alongside (e.g. the run
            config under ``"config"``, the PRNG seed, the metrics-log length).

        Returns:
          The step that was saved.

        Raises:
          ValueError: if ``extra`` is not JSON-serialisable, or ``state.step``
            is not after the latest checkpoint in ``directory``.
          RuntimeError: if this ``Checkpointer`` is read-only.
        """
        if self.read_only:
            raise RuntimeError(
                f"Cannot save in {self.directory}: this Checkpointer was opened "
                f"with read_only=True."
            )
        step = int(state.step)
        extra = _as_json("extra", {} if extra is None else extra)
        latest = self.latest_step()
        if latest is not None and step <= latest:
            raise ValueError(
                f"Cannot save step {step} in {self.directory}: it already holds a "
                f"checkpoint at step {latest}. Resume from the latest checkpoint, "
                f"or use a new directory for a run that branches off an older one."
            )
        manifest = {"format": _FORMAT, "leaves": _leaf_records(state), "extra": extra}
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                manifest=ocp.args.JsonSave(manifest),
            ),
            force=True,
        )
        self._manager.wait_until_finished()
        return step

    def all_steps(self) -> list[int]:
        """Steps of the finalized checkpoints, ascending (tmp dirs excluded)."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The latest finalized step, or ``None`` if there is no checkpoint."""
        return self._manager.latest_step()

    def restore(
        self,
        template: MetaTrainState,
        *,
        step: int | None = None,
        config: Mapping[str, Any] | None = None,
        fallback: bool = False,
    ) -> RestoredCheckpoint:
        """Restores a checkpoint into the structure, shapes and dtypes of ``template``.

        Leaves are restored bit for bit; the static fields (learner, optimizer,
        batching) come from ``template``, e.g. a fresh ``MetaTrainState.create``
        with the run's model and optimizer. ``template``'s leaves are only read
        for their shape, dtype and sharding (``jax.ShapeDtypeStruct`` works).

        Args:
          template: a state with the same leaves as the saved one.
          step: the step to restore (an int); default the latest.
          config: this run's config; when given and the checkpoint's ``extra``
            has a ``"config"``, any differing key refuses the restore. Pass only
            the keys that must match (drop e.g. the total number of steps).
          fallback: if the latest checkpoint is unreadable, log it, rename its
            directory to ``<step>.corrupt`` (kept for inspection, no longer
            listed; left in place when read-only) and restore the newest
            readable one before it. Only used when ``step`` is ``None``.

        Returns:
          ``RestoredCheckpoint(state, extra, step)``.

        Raises:
          TypeError: if ``step`` is not an int.
          FileNotFoundError: if there is no checkpoint (or no such ``step``).
          ValueError: if the checkpoint does not match ``template`` or
            ``config``; the message lists what differs.
          CorruptCheckpointError: if the checkpoint (every one, with
            ``fallback``) cannot be read back intact, its manifest is
            malformed, or it holds the state of another step than its
            directory's name; names the directory.
        """
        if step is not None:
            if isinstance(step, bool) or not isinstance(step, numbers.Integral):
                raise TypeError(f"step must be an int; got {step!r}.")
            step = int(step)
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(f"No checkpoint in {self.directory}.")
        if step is not None and step not in steps:
            raise FileNotFoundError(
                f"No checkpoint for step {step} in {self.directory}; "
                f"available steps: {steps}."
            )
        candidates = [step] if step is not None else steps[::-1]
        if not fallback:
            candidates = candidates[:1]
        corrupt: list[tuple[int, CorruptCheckpointError]] = []
        for candidate in candidates:
            try:
                restored = self._restore_step(candidate, template, config)
            except CorruptCheckpointError as error:
                corrupt.append((candidate, error))
                continue
            for bad_step, error in corrupt:
                if self.read_only:
                    logger.warning("%s Skipped it (read-only).", error)
                    continue
                moved = self._quarantine(bad_step)
                logger.warning("%s Moved it to %s.", error, moved)
            if corrupt:
                logger.warning(
                    "Restored step %d from %s instead.", candidate, self.directory
                )
                self._manager.reload()
            return restored
        if len(corrupt) == 1:
            error = corrupt[0][1]
            hint = (
                ""
                if fallback
                else " Move that directory away, or restore with fallback=True to "
                "use the newest readable checkpoint before it."
            )
            raise CorruptCheckpointError(f"{error}{hint}") from error
        raise CorruptCheckpointError(
            f"No readable checkpoint in {self.directory}:\n  "
            + "\n  ".join(str(e) for _, e in corrupt)
        )

    def close(self) -> None:
        """Waits for pending work and releases orbax's resources."""
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _restore_step(
        self,
        step: int,
        template: MetaTrainState,
        config: Mapping[str, Any] | None,
    ) -> RestoredCheckpoint:
        step_dir = self.directory / str(step)
        with _reading(step_dir, "its manifest"):
            manifest = self._manager.restore(
                step, args=ocp.args.Composite(manifest=ocp.args.JsonRestore())
            ).manifest
            version = _manifest_format(manifest)
            if version == _FORMAT:
                saved, extra = _parse_manifest(manifest)
        if version != _FORMAT:
            raise ValueError(
                f"Checkpoint {step_dir} has format {version}; this maml_jax "
                f"reads format {_FORMAT}."
            )
        _check_compatible(step_dir, saved, template, extra.get("config"), config)
        abstract = jax.tree.map(_abstract_leaf, template)
        with _reading(step_dir, "its arrays"):
            state = self._manager.restore(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)),
            ).state
        actual = _leaf_records(state)
        bad = [path for path, record in saved.items() if actual[path] != record]
        if bad:
            raise CorruptCheckpointError(
                f"Checkpoint {step_dir} is corrupted: the restored bytes of "
                f"{_listing(bad)} do not match the digests written at save time."
            )
        if int(state.step) != step:
            # Intact, but another step's: e.g. a folder replaced by a copy.
            raise CorruptCheckpointError(
                f"Checkpoint {step_dir} is corrupted: it holds the state of step "
                f"{int(state.step)}, not {step} (was the directory replaced or "
                f"renamed?)."
            )
        return RestoredCheckpoint(state=state, extra=extra, step=step)

    def _quarantine(self, step: int) -> pathlib.Path:
        source = self.directory / str(step)
        target = source.with_name(f"{step}.corrupt")
        suffix = 1
        while target.exists():
            target = source.with_name(f"{step}.corrupt-{suffix}")
            suffix += 1
        source.rename(target)
        return target


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
