"""Which Conv4 / task-batching formulation makes the Omniglot meta-step fastest here?

Question: for second-order MAML on Omniglot 5-way 1-shot (Conv4, 64 filters, stride-2
convolutions, transductive batch norm, meta-batch 32, 1 inner step), how long does
one jitted meta-step (on-device episode sampling, meta-gradient, Adam update) take
with each convolution formulation (``lax.conv`` or im2col matmuls) and each way of
batching the tasks (``vmap``, ``scan`` over chunks, ``unroll``ed chunks)? All give the
same gradients (tested in ``tests/test_conv4.py`` and ``tests/test_core.py``).

Command: ``python benchmarks/formulations.py [--queries 1] [--repeats 10]``; prints
one JSON line per formulation (compile seconds, median and min step ms) and a table.
``--smoke`` times two cheap formulations on a smaller batch.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax

import maml_jax
from benchmarks._timing import time_sampled_step
from maml_jax import episodes, models

FORMULATIONS = (  # (conv_impl, batching, chunk_size)
    ("lax", "vmap", None),
    ("im2col", "vmap", None),
    ("im2col", "scan", 8),
    ("im2col", "scan", 4),
    ("im2col", "scan", 2),
    ("im2col", "scan", 1),
    ("im2col", "unroll", 8),
    ("lax", "unroll", 8),
)


def time_formulation(conv_impl, batching, chunk, *, meta_batch, queries, repeats):
    ways, shots = 5, 1
    data = jax.random.uniform(jax.random.key(0), (300, 20, 28, 28, 1))
    spec = episodes.EpisodeSpec(ways, shots, queries, rotations=True)
    model = models.Conv4(num_classes=ways, conv_impl=conv_impl)
    params = model.init(jax.random.key(1), jnp.zeros((2, 28, 28, 1)))["params"]
    learner = maml_jax.maml(
        models.classification_loss(model.apply, loss_scale=ways),
        inner_lr=0.4,
        num_inner_steps=1,
        has_aux=True,
    )
    state = maml_jax.MetaTrainState.create(
        params=params,
        learner=learner,
        tx=optax.adam(1e-3),
        batching=batching,
        chunk_size=chunk,
    )
    sampler = lambda key: episodes.sample_episodes(key, data, spec, meta_batch)
    compile_s, times, _ = time_sampled_step(state, sampler, repeats)
    return {
        "conv_impl": conv_impl,
        "batching": batching,
        "chunk_size": chunk,
        "meta_batch": meta_batch,
        "queries_per_class": queries,
        "compile_s": compile_s,
        "step_ms_median": 1e3 * float(np.median(times)),
        "step_ms_min": 1e3 * float(np.min(times)),
        "tasks_per_s": meta_batch / float(np.median(times)),
    }


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--queries", type=int, default=1)
    p.add_argument("--meta-batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    formulations = FORMULATIONS
    if args.smoke:
        formulations = (("im2col", "vmap", None), ("im2col", "scan", 2))
        args.meta_batch, args.repeats = 4, 2
    rows = []
    for conv_impl, batching, chunk in formulations:
        row = time_formulation(
            conv_impl,
            batching,
            chunk,
            meta_batch=args.meta_batch,
            queries=args.queries,
            repeats=args.repeats,
        )
        print(json.dumps(row), flush=True)
        rows.append(row)
    print(
        "| conv | batching | chunk | compile (s) | step median (ms) | min (ms) |"
        " tasks/s |\n|---|---|---|---|---|---|---|"
    )
    for r in rows:
        print(
            f"| {r['conv_impl']} | {r['batching']} | {r['chunk_size'] or '-'} | "
            f"{r['compile_s']:.1f} | {r['step_ms_median']:.0f} | "
            f"{r['step_ms_min']:.0f} | {r['tasks_per_s']:.0f} |"
        )
    return rows


if __name__ == "__main__":
    main()
