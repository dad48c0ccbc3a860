"""How does the task-sharded Omniglot meta-step scale with the number of devices?

Question: tasks/s of one sharded meta-step (``maml_jax.sharding``: on-device
episode sampling split over the devices, second-order MAML, all-reduced
meta-gradient, Adam) for Omniglot 5-way 1-shot (Conv4 with im2col convolutions,
random data of shape (300, 20, 28, 28, 1), rotations, 1 query per class,
meta-batch 32, 1 inner step, ``batching="vmap"``) on 1, 2, 4 and 8 devices; and
is the sharded step on 1 device as fast as the unsharded ``scan_train_steps``
(within 5%)?

Each device count runs in its own subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` (JAX reads it at import).
Compile time is reported separately; step time is the median (and min) of
``--repeats`` calls after one warm-up call, each call one meta-step blocked on.
The unsharded step is timed in the 1-device subprocess, alternating call by call
with the sharded one, so background load affects both alike.

What virtual CPU devices show, and what not: they are N XLA devices in one
process that share this machine's cores, caches and memory bandwidth. A run on
them checks that the program partitions (each device computes ``32 / N`` tasks,
one all-reduce per step) and measures the partitioning overhead: per-device
dispatch, the in-memory all-reduce, and smaller per-device batches. It cannot
show a real speedup: on a 2-core machine one device already uses both cores for
its large matmuls, so N devices only split the same 2 cores N ways (the best
case is about 1x, and a busy machine adds noise). Real scaling needs real
devices (GPUs/TPUs, or several hosts via ``initialize_distributed``).

Command: ``python benchmarks/scaling.py [--devices 1,2,4,8] [--repeats 10]``;
prints one JSON line per row and a table; ``--smoke`` times a tiny sinusoid MLP
(meta-batch 4) on 1 and 2 devices. ``main(argv)`` returns the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", default="1,2,4,8", help="comma-separated counts")
    p.add_argument("--meta-batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--timeout", type=float, default=600, help="seconds per count")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _problem(smoke: bool, meta_batch: int):
    """``(state, sampler)``: the Omniglot problem, or the sinusoid one for smoke."""
    import jax
    import jax.numpy as jnp
    import optax

    import maml_jax

    if smoke:
        model = maml_jax.MLP((16, 16))
        params = model.init(jax.random.key(0), jnp.zeros((1, 1)))["params"]
        loss_fn, has_aux, inner_lr = maml_jax.regression_loss(model.apply), False, 0.01

        def sampler(key):
            return maml_jax.sample_sinusoid_tasks(key, meta_batch, 5, 5)

    else:
        ways = 5
        data = jax.random.uniform(jax.random.key(0), (300, 20, 28, 28, 1))
        spec = maml_jax.EpisodeSpec(ways, 1, 1, rotations=True)
        model = maml_jax.Conv4(num_classes=ways, conv_impl="im2col")
        params = model.init(jax.random.key(1), jnp.zeros((2, 28, 28, 1)))["params"]
        loss_fn = maml_jax.classification_loss(model.apply, loss_scale=ways)
        has_aux, inner_lr = True, 0.4

        def sampler(key):
            return maml_jax.sample_episodes(key, data, spec, meta_batch)

    learner = maml_jax.maml(
        loss_fn, inner_lr=inner_lr, num_inner_steps=1, has_aux=has_aux
    )

    def fresh():
        return maml_jax.MetaTrainState.create(
            params=params, learner=learner, tx=optax.adam(1e-3), batching="vmap"
        )

    return fresh, sampler


def _compile(jitted, *args):
    t0 = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - t0


def worker(num_devices: int, args) -> list[dict]:
    """Runs in the subprocess: times the sharded (and, on 1 device, unsharded) step."""
    import jax
    import numpy as np

    from maml_jax import sharding, train

    if jax.device_count() != num_devices:
        raise RuntimeError(
            f"expected {num_devices} devices, got {jax.device_count()}: set XLA_FLAGS"
            f"=--xla_force_host_platform_device_count={num_devices} before JAX starts."
        )
    fresh, sampler = _problem(args.smoke, args.meta_batch)
    mesh = sharding.task_mesh()
    key = sharding.replicate(jax.random.key(0), mesh)
    runs = {}  # name -> [compiled, state, key, compile_s, times]
    sharded = sharding.make_sharded_scan_train_steps(mesh, sampler, 1)
    state = sharding.replicate(fresh(), mesh)
    compiled, seconds = _compile(sharded, state, key)
    runs["sharded"] = [compiled, state, key, seconds, []]
    if num_devices == 1:
        unsharded = jax.jit(
            train.scan_train_steps, static_argnums=(2, 3), donate_argnums=0
        )
        state, plain_key = fresh(), jax.random.key(0)
        compiled, seconds = _compile(unsharded, state, plain_key, sampler, 1)
        runs["unsharded"] = [compiled, state, plain_key, seconds, []]
    for i in range(args.repeats + 1):  # call 0 is the warm-up
        for run in runs.values():
            compiled, state, run_key = run[:3]
            t0 = time.perf_counter()
            state, metrics = compiled(state, run_key)
            jax.block_until_ready((state, metrics))
            if i:
                run[4].append(time.perf_counter() - t0)
            run[1] = state
    rows = []
    for name, (_, state, _, compile_s, times) in runs.items():
        median = float(np.median(times))
        rows.append(
            {
                "benchmark": "sinusoid-smoke" if args.smoke else "omniglot-5w1s",
                "mode": name,
                "devices": num_devices,
                "meta_batch": args.meta_batch,
                "tasks_per_device": args.meta_batch // num_devices,
                "compile_s": compile_s,
                "step_ms_median": 1e3 * median,
                "step_ms_min": 1e3 * min(times),
                "tasks_per_s": args.meta_batch / median,
                "steps": int(state.step),
                "platform": jax.devices()[0].platform,
                "jax": jax.__version__,
            }
        )
    return rows


def _run_count(num_devices: int, args) -> list[dict]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), env.get("PYTHONPATH")) if p
    )
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(num_devices)]
    cmd += ["--meta-batch", str(args.meta_batch), "--repeats", str(args.repeats)]
    cmd += ["--smoke"] if args.smoke else []
    try:
        done = subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=args.timeout
        )
    except subprocess.TimeoutExpired as error:
        raise RuntimeError(
            f"{num_devices}-device run took over {args.timeout:.0f} s"
        ) from error
    if done.returncode:
        raise RuntimeError(
            f"{num_devices}-device run failed (exit {done.returncode}):\n"
            f"{done.stderr[-3000:]}"
        )
    return [json.loads(line) for line in done.stdout.splitlines() if line[:1] == "{"]


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.smoke:
        args.devices, args.meta_batch, args.repeats = "1,2", 4, 3
    if args.worker is not None:
        for row in worker(args.worker, args):
            print(json.dumps(row), flush=True)
        return []
    counts = [int(n) for n in args.devices.split(",")]
    for n in counts:
        if args.meta_batch % n:
            raise ValueError(
                f"--meta-batch {args.meta_batch} is not a multiple of {n} devices."
            )
    rows = []
    for n in counts:
        for row in _run_count(n, args):
            rows.append(row)
    base = next((r for r in rows if r["mode"] == "sharded" and r["devices"] == 1), None)
    plain = next((r for r in rows if r["mode"] == "unsharded"), None)
    for row in rows:
        if base is not None:
            row["speedup_vs_1_device"] = row["tasks_per_s"] / base["tasks_per_s"]
        if plain is not None:
            row["step_time_vs_unsharded"] = (
                row["step_ms_median"] / plain["step_ms_median"]
            )
        print(json.dumps(row), flush=True)
    print(
        "| mode | devices | tasks/device | compile (s) | step median (ms) |"
        " min (ms) | tasks/s | vs 1 device | time vs unsharded |\n"
        "|---|---|---|---|---|---|---|---|---|"
    )
    for r in rows:
        print(
            f"| {r['mode']} | {r['devices']} | {r['tasks_per_device']} | "
            f"{r['compile_s']:.1f} | {r['step_ms_median']:.1f} | "
            f"{r['step_ms_min']:.1f} | {r['tasks_per_s']:.0f} | "
            f"{r.get('speedup_vs_1_device', float('nan')):.2f}x | "
            f"{r.get('step_time_vs_unsharded', float('nan')):.3f} |"
        )
    return rows


if __name__ == "__main__":
    main()
