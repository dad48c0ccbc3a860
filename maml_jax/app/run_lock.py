"""One writer per run folder: an exclusive ``flock`` on ``<run>/train.lock``.

``maml-jax train`` takes the lock before it writes anything in the run folder
and holds it until training ends, so a second ``train`` into the same folder
fails at once with a message naming the first process, instead of interleaving
its metrics or checkpoints with it. The lock belongs to the open file, not to
the file's existence: the OS releases it when the process exits however it
exits (crash, SIGKILL), so a ``train.lock`` left behind never blocks a later
run. The file holds the holder's pid and host, for the message. Readers
(``maml-jax eval``, plots) never take it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from collections.abc import Iterator
from pathlib import Path

LOCK_NAME = "train.lock"


class RunLockedError(OSError):
    """Another process holds the run folder's lock."""


@contextlib.contextmanager
def hold(run_dir: str | os.PathLike) -> Iterator[Path]:
    """Holds the exclusive lock of ``run_dir`` (which must exist) while open.

    Yields:
      The lock file's path.

    Raises:
      RunLockedError: at once (never waits) if another process, or another
        ``hold`` of this process, holds the lock; names the holder's pid.

    Examples:
      >>> import tempfile
      >>> with tempfile.TemporaryDirectory() as run:
      ...     with hold(run):
      ...         try:
      ...             with hold(run):
      ...                 pass
      ...         except RunLockedError as error:
      ...             print("in use by another maml-jax train" in str(error))
      ...     with hold(run) as path:  # released on exit
      ...         print(path.name)
      True
      train.lock
    """
    path = Path(run_dir) / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunLockedError(
                f"--out {Path(run_dir)} is in use by another maml-jax train "
                f"({_holder(fd)}); wait for it to end or stop it, or choose "
                f"another --out."
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)  # still locked: no reader sees a stale pid
    finally:
        os.close(fd)  # releases the lock


def _holder(fd: int) -> str:
    """``pid N on host H`` from the lock file, or why it cannot say."""
    try:
        pid, host = os.pread(fd, 256, 0).decode().split()
        return f"pid {int(pid)} on host {host}"
    except (OSError, UnicodeDecodeError, ValueError):
        # The holder has not written its pid yet (or the file is not ours).
        return "pid unknown"
