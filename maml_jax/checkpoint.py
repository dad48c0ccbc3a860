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

import logging
import numbers
import os
import pathlib
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import orbax.checkpoint as ocp

from maml_jax import _validation
from maml_jax._checkpoint_manifest import (
    CorruptCheckpointError,
    _abstract_leaf,
    _as_json,
    _check_compatible,
    _leaf_records,
    _listing,
    _manifest_format,
    _parse_manifest,
    _reading,
)
from maml_jax.train import MetaTrainState

__all__ = ["Checkpointer", "CorruptCheckpointError", "RestoredCheckpoint"]

_FORMAT = 1
logger = logging.getLogger(__name__)


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
