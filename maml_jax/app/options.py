"""Command-line options: bounds on sizes, checked before anything is allocated,
and one-line usage errors.

Two guards keep a typo (``--meta-batch 200000``, ``--test-inner-steps
1000000000``) from ending as an out-of-memory traceback or an XLA abort:

* a cap per option (``MAX_*``), far above every paper protocol, so that absurd
  values are rejected whatever the machine;
* an estimate of the largest arrays a setting allocates at once, compared with
  the memory of the device that will hold them (``check_memory``): exact for
  the few-shot episode arrays (which are not all a run allocates), within about
  1.5× of XLA's own figure for the sinusoid step. It rejects settings that
  cannot fit, not every setting that will not.

Errors are ``ValueError``s naming the option and its limit; the CLI prints them
as one line. ``ArgumentParser`` makes argparse's own errors one line too.
"""

from __future__ import annotations

import argparse
import os

# The step counter is an int32 array in MetaTrainState.
MAX_STEPS = 2**31 - 1
MAX_META_BATCH = 10_000  # tasks per meta-step; papers use 2 to 32
MAX_INNER_STEPS = 1_000  # training: second-order MAML keeps every step alive
MAX_TEST_INNER_STEPS = 10_000  # papers use 3 to 10
MAX_EPISODES = 1_000_000  # validation / test tasks; papers use 200 to 600
MAX_EXAMPLES = 100_000  # support or query points per sinusoid task
MAX_WIDTH = 100_000  # hidden units of a layer, or Conv4 filters
MAX_LAYERS = 100
MAX_STEPS_PER_CALL = 100_000
MAX_SEED = 2**32  # exclusive, as for jax.random.key from a uint32 seed


def check_range(option: str, value, low: int, high: int) -> None:
    """Raises a ``ValueError`` unless ``low <= value <= high``."""
    if value < low:
        raise ValueError(f"{option} must be >= {low}; got {value}.")
    if value > high:
        raise ValueError(f"{option} must be <= {high:,}; got {value:,}.")


def memory_bytes() -> tuple[int, str] | None:
    """The memory of the default device and what it is, or ``None`` if unknown.

    An accelerator reports the memory XLA may allocate (``bytes_limit``); on
    CPU it is the host's physical memory.
    """
    import jax

    device = jax.devices()[0]
    try:
        stats = device.memory_stats()
    except (NotImplementedError, RuntimeError):  # not every backend has it
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"the {device.platform} device"
    try:
        pages, page = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None
    return pages * page, "this machine"


def check_memory(option: str, value: int, bytes_each: int, what: str) -> None:
    """Raises a ``ValueError`` if ``value × bytes_each`` exceeds the device memory.

    ``what`` says what the bytes hold, e.g. "the episodes (10 images of
    28×28×1 float32 each)". The error names the most that fits.
    """
    known = memory_bytes()
    if known is None:
        return
    available, device = known
    needed = value * bytes_each
    if needed <= available:
        return
    most = available // bytes_each
    advice = (
        f"use at most {option} {most:,}"
        if most >= 1
        else f"even {option} 1 does not fit; make each one smaller"
    )
    raise ValueError(
        f"{option} {value:,}: {what} need about {_size(needed)}, more than the "
        f"{_size(available)} of {device}; {advice}."
    )


def _size(num_bytes: float) -> str:
    units = ("B", "KB", "MB", "GB", "TB")
    power = 0
    while num_bytes >= 1000 and power < len(units) - 1:
        num_bytes /= 1000
        power += 1
    return f"{num_bytes:.1f} {units[power]}"


class ArgumentParser(argparse.ArgumentParser):
    """``argparse`` whose usage errors are one line on stderr (exit status 2)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")
