"""One measurement of maml_jax's meta-train step, as ``run_peer.py`` measures peers.

The configuration is ``benchmarks/throughput.py``'s ``build(workload, "maml",
inner_steps, first_order)``, so it follows the library's default formulation
(task batching, convolution implementation) as the library changes; the timing is
``benchmarks._timing.time_sampled_step``: one jitted step with on-device task
sampling, the meta-gradient and the Adam update, state donated; compile timed
separately, then one warm-up step and ``--steps`` timed steps. Sampling is part of
our step (it is part of our pipeline); the peers read pre-made batches.

With ``--steps-per-call K`` each timed call runs ``K`` meta-steps in one
``lax.scan`` (as ``fit`` does, so dispatch is paid once per call) and the times are
per meta-step; the row's ``impl`` is then ``maml_jax-scan``. ``--precision
bfloat16`` computes the convolutions in bfloat16 (``Conv4(dtype=jnp.bfloat16)``;
``impl`` gets ``-bf16``). ``--conv-impl`` and ``--batching`` fix the formulation
instead of the library's default (``auto``: with the chunk size measured by
``maml_jax.tune_batching``, as ``fit`` does; ``tune_s`` is its cost, not in the
step time, and ``$MAML_JAX_AUTOTUNE=0`` takes the fixed rule); ``--meta-batch`` and
``--filters`` shrink the workload (smoke runs). ``peak_device_mb`` is the device's
peak memory in use (``memory_stats``; absent on CPU).

Command: ``python -m benchmarks.peers.run_ours --workload sinusoid``; one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from importlib.metadata import version

import jax
import numpy as np

import maml_jax
from benchmarks import throughput
from benchmarks._timing import time_sampled_step
from benchmarks.peers.common import WORKLOADS


def measure(
    workload: str,
    first_order: bool,
    inner_steps: int,
    steps: int,
    steps_per_call: int = 1,
    precision: str = "float32",
    conv_impl: str = "auto",
    batching: str = "auto",
    meta_batch: int | None = None,
    filters: int | None = None,
) -> dict:
    """Builds, compiles and times our step; returns the JSON row."""
    state, sampler, meta_batch = throughput.build(
        workload,
        "maml",
        inner_steps,
        first_order,
        precision,
        conv_impl=conv_impl,
        meta_batch=meta_batch,
        filters=filters,
    )
    tune_s, source = None, "given"
    if batching != "auto":
        state = state.replace(batching=batching, chunk_size=None)
    elif state.batching == "auto" and state.chunk_size is None:
        # As fit does: the chunk size measured on this machine (cached per machine
        # and program, so only the first run of an alternating series measures).
        t0 = time.perf_counter()
        choice = maml_jax.tune_batching(
            state.learner, state.meta_params, sampler(jax.random.key(0))
        )
        tune_s, source = time.perf_counter() - t0, choice.source
        state = state.replace(batching=choice.batching, chunk_size=choice.chunk_size)
    compile_s, times, temp_mb = time_sampled_step(state, sampler, steps, steps_per_call)
    median = float(np.median(times))
    batching, chunk = state.batching, state.chunk_size
    return {
        "impl": ("maml_jax" if steps_per_call == 1 else "maml_jax-scan")
        + ("-bf16" if precision == "bfloat16" else ""),
        "steps_per_call": steps_per_call,
        "precision": precision,
        "workload": workload,
        "order": "first" if first_order else "second",
        "inner_steps": inner_steps,
        "meta_batch": meta_batch,
        "steps": steps,
        "warmup": 1,
        "step_s_median": median,
        "step_s_p10": float(np.percentile(times, 10)),
        "step_s_p90": float(np.percentile(times, 90)),
        "tasks_per_s": meta_batch / median,
        "compile_s": compile_s,
        "temp_mb": temp_mb,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": os.cpu_count(),
        "peak_device_mb": _peak_device_mb(),
        "formulation": {
            "batching": batching,
            "chunk_size": chunk,
            "batching_choice": source,
            "tune_s": tune_s,
            "conv_impl": conv_impl,
            "backend": jax.default_backend(),
        },
        "versions": {
            "python": platform.python_version(),
            "jax": jax.__version__,
            "jaxlib": version("jaxlib"),
            "maml_jax": maml_jax.__version__,  # also when run from a checkout
        },
        "times_s": [float(t) for t in times],
    }


def _peak_device_mb() -> float | None:
    """The device's peak memory in use so far (MiB), where the backend reports it."""
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**20


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", required=True, choices=WORKLOADS)
    p.add_argument("--order", choices=("first", "second"), default="second")
    p.add_argument("--inner-steps", type=int, default=1)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--steps-per-call", type=int, default=1)
    p.add_argument("--precision", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--conv-impl", choices=("auto", "lax", "im2col"), default="auto")
    p.add_argument("--batching", choices=("auto", "vmap"), default="auto")
    p.add_argument("--meta-batch", type=int, help="default: the workload's")
    p.add_argument("--filters", type=int, help="Conv4 width; default: the workload's")
    args = p.parse_args(argv)
    row = measure(
        args.workload,
        args.order == "first",
        args.inner_steps,
        args.steps,
        args.steps_per_call,
        args.precision,
        args.conv_impl,
        args.batching,
        args.meta_batch,
        args.filters,
    )
    print(json.dumps(row), flush=True)
    return row


if __name__ == "__main__":
    main()
