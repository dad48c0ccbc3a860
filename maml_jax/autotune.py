"""Task batching chosen by measurement on the machine at hand.

On XLA:CPU a meta-batch of image tasks runs fastest as a ``lax.scan`` over small
vmapped chunks (see ``core.auto_batching``), but which chunk size is fastest
depends on the CPU (its caches, AVX2 or AVX-512, AMX), the model and the shapes.
``tune_batching`` compiles ``core.meta_value_and_grad`` once per candidate chunk
size, times each on the actual task batch and returns the fastest. The choice is
cached on disk per (CPU model and flags, jax and jaxlib versions, device count,
the lowered program), so a later run of the same program on the same kind of
machine measures nothing.

Measurement is off where ``$MAML_JAX_AUTOTUNE`` is ``0`` (or ``false``/``off``),
or with ``enabled=False``: the result is then ``core.auto_batching``'s rule.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jaxlib

from maml_jax import _validation, core
from maml_jax.types import MetaLearner, MetaParams, ModelState, TaskBatch

ENV_SWITCH = "MAML_JAX_AUTOTUNE"
# The largest chunk tried: larger vmapped chunks outgrow the CPU's caches, and
# every candidate costs one compilation.
MAX_CHUNK_SIZE = 8
# Bumped when what is measured, or how, changes: older cache entries are ignored.
_CACHE_VERSION = 1
# /proc/cpuinfo flags that change which formulation XLA:CPU runs fastest.
_CPU_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512_bf16",
    "avx512_vnni",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)


@dataclasses.dataclass(frozen=True)
class BatchingChoice:
    """The task batching to use, and where it came from.

    Attributes:
      batching: ``"scan"`` or ``"vmap"`` (for ``core.meta_value_and_grad``).
      chunk_size: tasks per ``scan`` chunk (``None`` with ``"vmap"``).
      source: ``"measured"`` (timed now), ``"cache"`` (timed earlier on this kind
        of machine, same program) or ``"rule"`` (``core.auto_batching``, not
        timed: measurement off, or nothing to choose).
      step_seconds: median seconds of one meta-gradient per candidate chunk size
        (empty for ``"rule"``).
      compile_seconds: seconds to compile each candidate (empty for ``"rule"``).
    """

    batching: str
    chunk_size: int | None
    source: str
    step_seconds: dict[int, float] = dataclasses.field(default_factory=dict)
    compile_seconds: dict[int, float] = dataclasses.field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready record (chunk sizes as string keys)."""
        return {
            "batching": self.batching,
            "chunk_size": self.chunk_size,
            "source": self.source,
            "step_seconds": {str(k): v for k, v in self.step_seconds.items()},
            "compile_seconds": {str(k): v for k, v in self.compile_seconds.items()},
        }

    @classmethod
    def from_dict(cls, record: dict[str, Any], source: str) -> BatchingChoice:
        return cls(
            batching=record["batching"],
            chunk_size=record["chunk_size"],
            source=source,
            step_seconds={int(k): v for k, v in record["step_seconds"].items()},
            compile_seconds={int(k): v for k, v in record["compile_seconds"].items()},
        )


def enabled_by_env() -> bool:
    """Whether ``$MAML_JAX_AUTOTUNE`` leaves measurement on (the default)."""
    value = os.environ.get(ENV_SWITCH, "1").strip().lower()
    return value not in ("0", "false", "off", "no")


def candidate_chunks(
    num_tasks: int, max_chunk: int = MAX_CHUNK_SIZE
) -> tuple[int, ...]:
    """The chunk sizes tried: every divisor of ``num_tasks`` up to ``max_chunk``."""
    return tuple(
        d for d in range(1, min(num_tasks, max_chunk) + 1) if num_tasks % d == 0
    )


def machine_description(cpuinfo: str | None = None) -> dict[str, Any]:
    """What the cache is keyed on besides the program: CPU model and flags, the
    jax/jaxlib versions, the backend and its device count."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        name, _, value = line.partition(":")
        fields.setdefault(name.strip(), value.strip())
    flags = set(fields.get("flags", "").split())
    return {
        "cpu": fields.get("model name") or platform.processor() or platform.machine(),
        "cpu_flags": [f for f in _CPU_FLAGS if f in flags],
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
    }


def default_cache_path() -> Path:
    """``<maml_jax cache dir>/autotune`` (``$MAML_JAX_CACHE_DIR``, else the XDG
    cache folder; see ``datasets.default_cache_dir``)."""
    from maml_jax.datasets import default_cache_dir

    return default_cache_dir() / "autotune"


def tune_batching(
    learner: MetaLearner,
    meta_params: MetaParams,
    tasks: TaskBatch,
    *,
    state: ModelState = None,
    outer_step: Any = None,
    chunks: Sequence[int] | None = None,
    repeats: int = 3,
    enabled: bool | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> BatchingChoice:
    """The fastest task batching for ``meta_value_and_grad`` on these tasks.

    Where ``core.auto_batching`` picks ``"scan"`` (image tasks on one CPU device),
    each candidate chunk size is compiled and run ``1 + repeats`` times on
    ``tasks`` (the first run is not timed) and the one with the lowest median
    time is returned; elsewhere (``"vmap"``) the rule's choice is returned
    untimed. Results are cached in ``cache_dir`` (default
    ``default_cache_path()``) under a key of the machine and the lowered
    program, written atomically.

    Args:
      learner, meta_params, tasks, state, outer_step: as for
        ``core.meta_value_and_grad`` (``tasks``: a ``TaskBatch`` of ``T`` tasks).
      chunks: candidate chunk sizes (each must divide ``T``); default
        ``candidate_chunks(T)``.
      repeats: timed runs per candidate.
      enabled: measure (``True``) or return the rule's choice (``False``);
        default: on unless ``$MAML_JAX_AUTOTUNE`` is ``0``.
      cache_dir: folder for the cached choices.

    Returns:
      A ``BatchingChoice``.

    Examples:
      >>> import jax.numpy as jnp, maml_jax
      >>> loss = lambda w, b: jnp.mean((b[0].reshape(len(b[0]), -1) @ w - b[1]) ** 2)
      >>> learner = maml_jax.maml(loss, inner_lr=0.1, num_inner_steps=1)
      >>> x, y = jnp.zeros((8, 5, 4, 4, 1)), jnp.zeros((8, 5))  # 8 tasks of images
      >>> tasks = maml_jax.TaskBatch((x, y), (x, y))
      >>> choice = maml_jax.tune_batching(learner, jnp.zeros(16), tasks, enabled=False)
      >>> choice.batching, choice.chunk_size, choice.source  # not measured: the rule
      ('scan', 4, 'rule')
    """
    num_tasks = _validation.check_task_batch(tasks, "tune_batching")
    repeats = _validation.check_positive_int("repeats", repeats)
    batching, rule_chunk = core.auto_batching(tasks)
    if enabled is None:
        enabled = enabled_by_env()
    if batching != "scan" or not enabled:
        return BatchingChoice(batching, rule_chunk, "rule")
    chunks = candidate_chunks(num_tasks) if chunks is None else tuple(chunks)
    for chunk in chunks:
        _validation.check_positive_int("chunks", chunk)
        if num_tasks % chunk:
            raise ValueError(
                f"chunk size {chunk} does not divide the {num_tasks} tasks."
            )
    if len(chunks) == 1:
        return BatchingChoice("scan", chunks[0], "rule")

    def step_fn(chunk: int):
        def meta_value_and_grad(meta_params, tasks, state, outer_step):
            return core.meta_value_and_grad(
                learner,
                meta_params,
                tasks,
                batching="scan",
                chunk_size=chunk,
                outer_step=outer_step,
                **({"state": state} if learner.has_state else {}),
            )

        return jax.jit(meta_value_and_grad)

    args = (meta_params, tasks, state, outer_step)
    # The program, not the Python objects that built it, keys the cache: any
    # change to the model, learner, shapes or dtypes is a new key.
    program = step_fn(chunks[0]).lower(*args).as_text()
    key = hashlib.sha256(
        json.dumps(
            {
                "version": _CACHE_VERSION,
                "machine": machine_description(),
                "chunks": list(chunks),
                "program": hashlib.sha256(program.encode()).hexdigest(),
            },
            sort_keys=True,
        ).encode()
    ).hexdigest()
    path = Path(cache_dir if cache_dir is not None else default_cache_path())
    path = path / f"{key}.json"
    cached = _read(path)
    if cached is not None:
        return cached

    step_seconds, compile_seconds = {}, {}
    for chunk in chunks:
        t0 = time.perf_counter()
        compiled = step_fn(chunk).lower(*args).compile()
        compile_seconds[chunk] = time.perf_counter() - t0
        jax.block_until_ready(compiled(*args))
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            times.append(time.perf_counter() - t0)
        step_seconds[chunk] = statistics.median(times)
        del compiled
    best = min(chunks, key=lambda c: (step_seconds[c], c))
    choice = BatchingChoice("scan", best, "measured", step_seconds, compile_seconds)
    _write(path, choice.as_dict())
    return choice


def _read(path: Path) -> BatchingChoice | None:
    """The cached choice, or ``None`` if absent or unreadable (then re-measured)."""
    try:
        return BatchingChoice.from_dict(json.loads(path.read_text()), "cache")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _write(path: Path, record: dict[str, Any]) -> None:
    """Writes atomically; a cache that cannot be written is not an error."""
    from maml_jax.datasets._common import atomic_path

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
    except OSError:
        pass
