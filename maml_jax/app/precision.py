"""``--precision bfloat16`` only where it pays.

On XLA:CPU, bfloat16 matmuls run on bfloat16 matrix units (AMX, AVX512_BF16) where a
CPU has them; elsewhere XLA:CPU converts the operands to float32 and back, so mixed
precision saves nothing and adds the conversions (``benchmarks/README.md``, mixed
precision). A new CPU run asking for
bfloat16 on a CPU without such units trains in float32 instead, with a one-line notice.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax

# /proc/cpuinfo flags of the units XLA:CPU runs bfloat16 matmuls on.
BF16_MATMUL_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_bf16_matmul(cpuinfo: str | None = None) -> bool | None:
    """Whether this CPU has bfloat16 matrix units (``None``: cannot tell)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
    flags = next(
        (
            line.split(":", 1)[1].split()
            for line in cpuinfo.splitlines()
            if line.startswith("flags")
        ),
        None,
    )
    if flags is None:
        return None
    return any(flag in flags for flag in BF16_MATMUL_FLAGS)


def resolve(config: Any, *, has_bf16: bool | None = None) -> tuple[Any, str | None]:
    """``(config, notice)``: bfloat16 becomes float32 on a CPU without bfloat16
    matrix units (the notice says so); anything else is returned unchanged."""
    if config.precision != "bfloat16" or jax.default_backend() != "cpu":
        return config, None
    if has_bf16 is None:
        has_bf16 = cpu_bf16_matmul()
    if has_bf16 is not False:
        return config, None
    notice = (
        "--precision bfloat16: this CPU has no bfloat16 matrix units "
        f"({' or '.join(BF16_MATMUL_FLAGS)}), so mixed precision would not be faster "
        "than float32; training in float32."
    )
    return dataclasses.replace(config, precision="float32"), notice
