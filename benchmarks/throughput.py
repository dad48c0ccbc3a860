"""Meta-training throughput of maml_jax per learner, workload and inner-step count.

Question: how many tasks per second does one jitted meta-train step (on-device task
sampling, meta-gradient and optimizer update, with the state donated) process here,
how long does it take to compile, and how much memory does the compiled step need?

Workloads (paper protocols; Omniglot episodes from the real images of the
Vinyals training classes with random 90° rotations, ``--omniglot-dir``;
mini-ImageNet data random but of the right shape):

* ``sinusoid``: MLP 40-40, K=10 support + 10 query, meta-batch 25.
* ``omniglot-5w1s``: Conv4 64 filters, stride 2, 28×28, 1 support + 1 query per
  class, meta-batch 32. ``omniglot-5w1s-q15``: 15 queries per class.
* ``omniglot-20w1s``: 20 ways, 1 + 1 per class, meta-batch 16.
* ``miniimagenet-5w1s``: Conv4 32 filters, max-pool, 84×84×3, 1 + 15 per class,
  meta-batch 4.

For each (learner, workload, order, inner steps) it reports the median and the
10th/90th percentiles of the step time over ``--repeats`` steps after one warm-up
step, the compile time, tasks/s and the compiled step's temporary memory
(``compiled.memory_analysis()``), one JSON line each (``--jsonl`` appends them to a
file), then a table. On CPU the Conv4 workloads use im2col convolutions with tasks
in a ``lax.scan`` over chunks of 2–4 (``batching="auto"``, the fastest
measured); elsewhere ``lax`` convolutions and ``vmap``.

Command: ``python benchmarks/throughput.py --workloads sinusoid omniglot-5w1s
--learners maml fomaml --inner-steps 1 5``; ``--smoke`` for a seconds-long run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import maml_jax
from benchmarks._timing import median_call_seconds, time_sampled_step
from maml_jax import episodes, models
from maml_jax.app import presets


def _from_preset(name: str, **overrides: Any) -> dict[str, Any]:
    """A workload with the episode shape and inner rate of a CLI preset."""
    p = presets.PRESETS[name]
    fields = ("ways", "shots", "queries", "meta_batch", "inner_lr")
    return {"kind": p["dataset"], **{k: p[k] for k in fields}, **overrides}


WORKLOADS = {
    "sinusoid": dict(kind="sinusoid", meta_batch=25, inner_lr=0.01),
    "omniglot-5w1s": _from_preset("omniglot-5w1s"),
    "omniglot-5w1s-q15": _from_preset("omniglot-5w1s", queries=15),
    # The reference workload of ../shared/PERF-NOTES.md: 2×2 max-pool
    # downsampling (as learn2learn's OmniglotCNN), 15 queries per class.
    "omniglot-5w1s-q15-maxpool": _from_preset(
        "omniglot-5w1s", queries=15, downsample="maxpool"
    ),
    "omniglot-20w1s": _from_preset("omniglot-20w1s"),
    "miniimagenet-5w1s": _from_preset("miniimagenet-5w1s"),
}
DEFAULT_OMNIGLOT_DIR = Path(
    os.environ.get("MAML_JAX_OMNIGLOT_DIR")
    or Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"
)
LEARNERS = maml_jax.GRADIENT_LEARNERS


def build(
    workload: str,
    learner_name: str,
    inner_steps: int,
    first_order: bool,
    precision: str = "float32",
    omniglot_classes: np.ndarray | None = None,
    conv_impl: str = "auto",
    meta_batch: int | None = None,
    filters: int | None = None,
):
    """Returns (state, sampler, meta_batch) for one benchmark configuration.

    ``conv_impl``: Conv4's convolution (``ops.conv2d``); ``meta_batch``, ``filters``:
    tasks per step and Conv4's width instead of the workload's (smoke runs).

    ``precision="bfloat16"``: Conv4 computes in bfloat16 (float32 parameters,
    normalisation and sums; ``Conv4(dtype=jnp.bfloat16)``).
    ``omniglot_classes``: ``(classes, 20, 28, 28, 1)`` real images for the
    Omniglot workloads (``load_omniglot_classes``); ``None``: random images of
    that shape (the timings do not depend on the values).
    """
    if precision not in ("float32", "bfloat16"):
        raise ValueError(f"precision must be float32 or bfloat16; got {precision!r}.")
    w = WORKLOADS[workload]
    if meta_batch is not None:
        w = {**w, "meta_batch": meta_batch}
    if w["kind"] == "sinusoid":
        model = maml_jax.MLP((40, 40))
        params = model.init(jax.random.key(0), jnp.zeros((1, 1)))["params"]
        loss_fn, has_aux = maml_jax.regression_loss(model.apply), False
        sampler = lambda key: maml_jax.sample_sinusoid_tasks(
            key, w["meta_batch"], 10, 10
        )
        batching, chunk = "vmap", None
    else:
        omniglot = w["kind"] == "omniglot"
        shape = (28, 28, 1) if omniglot else (84, 84, 3)
        model = models.Conv4(
            num_classes=w["ways"],
            filters=filters or (64 if omniglot else 32),
            downsample=w.get("downsample", "stride" if omniglot else "maxpool"),
            head="mean" if omniglot else "flatten",
            conv_impl=conv_impl,
            dtype=jnp.bfloat16 if precision == "bfloat16" else None,
        )
        params = model.init(jax.random.key(0), jnp.zeros((2, *shape)))["params"]
        loss_fn = models.classification_loss(model.apply, loss_scale=w["ways"])
        has_aux = True
        if omniglot and omniglot_classes is not None:
            data = jnp.asarray(omniglot_classes)
            spec = episodes.EpisodeSpec(
                w["ways"], w["shots"], w["queries"], rotations=True
            )
        else:
            data = jax.random.uniform(jax.random.key(1), (100, 20, *shape))
            spec = episodes.EpisodeSpec(w["ways"], w["shots"], w["queries"])
        sampler = lambda key: episodes.sample_episodes(key, data, spec, w["meta_batch"])
        batching, chunk = "auto", None
    common = dict(inner_lr=w["inner_lr"], num_inner_steps=inner_steps, has_aux=has_aux)
    if learner_name in ("maml", "anil", "meta_sgd"):
        common["first_order"] = first_order
    if learner_name == "anil":
        head = "head" if "head" in params else sorted(params)[-1]
        common["adapt_mask"] = {k: k == head for k in params}
    if learner_name == "imaml":
        common.update(reg_lambda=2.0, cg_steps=5)
    learner = maml_jax.make_learner(learner_name, loss_fn, **common)
    state = maml_jax.MetaTrainState.create(
        params=params,
        learner=learner,
        tx=optax.adam(1e-3),
        batching=batching,
        chunk_size=chunk,
    )
    return state, sampler, w["meta_batch"]


def load_omniglot_classes(data_dir: Path) -> np.ndarray:
    """The Vinyals training classes' images, ``(1028, 20, 28, 28, 1)``."""
    from maml_jax import datasets

    return datasets.omniglot_classes(data_dir, "vinyals-train", rotations=False)


def step_flops(state, sampler) -> float | None:
    """XLA's FLOP count of one meta-train step, from the lowered (unoptimised) HLO.

    XLA's cost analysis counts a ``while`` body once, so the count is taken with
    the tasks batched by ``vmap`` (the same arithmetic as every other batching).
    """
    flat = state.replace(batching="vmap", chunk_size=None)
    step = jax.jit(lambda s, k: maml_jax.train.scan_train_steps(s, k, sampler, 1))
    cost = step.lower(flat, jax.random.key(0)).cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


def matmul_ceiling(size: int = 2048, repeats: int = 10) -> float:
    """This machine's float32 matmul rate in GFLOP/s (best of ``repeats``)."""
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    matmul = jax.jit(lambda a: a @ a).lower(a).compile()
    jax.block_until_ready(matmul(a))
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(matmul(a))
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best / 1e9


def sampler_ms(sampler, repeats: int) -> float:
    """Median milliseconds of the jitted task sampler alone (one meta-batch)."""
    return 1e3 * median_call_seconds(jax.jit(sampler), repeats)


def feeding_fraction(state, sampler, repeats: int, steps_per_call: int) -> float:
    """Share of the meta-step spent sampling tasks on device.

    Times ``steps_per_call`` scanned meta-steps that sample their tasks against the
    same steps fed one fixed, pre-sampled batch; the fraction is
    ``1 − fixed / sampled`` (noise can make it slightly negative).
    """
    fixed_tasks = jax.jit(sampler)(jax.random.key(0))

    def per_step(sample) -> float:
        step = jax.jit(
            lambda s, k: maml_jax.train.scan_train_steps(s, k, sample, steps_per_call)
        )
        compiled = step.lower(state, jax.random.key(0)).compile()
        seconds = median_call_seconds(lambda k: compiled(state, k), repeats)
        return seconds / steps_per_call

    sampled, fixed = per_step(sampler), per_step(lambda key: fixed_tasks)
    return 1.0 - fixed / sampled


def measure(
    workload,
    learner_name,
    inner_steps,
    first_order,
    repeats,
    ceiling=None,
    omniglot_classes=None,
) -> dict:
    state, sampler, meta_batch = build(
        workload,
        learner_name,
        inner_steps,
        first_order,
        omniglot_classes=omniglot_classes,
    )
    flops = step_flops(state, sampler)
    # Feeding is timed on a scan of many steps where steps are short, so that
    # dispatch does not hide it; a few repeats suffice for the slow workloads.
    fast = workload == "sinusoid"
    feeding = feeding_fraction(
        state, sampler, repeats if fast else 3, 200 if fast else 1
    )
    compile_s, times, temp_mb = time_sampled_step(state, sampler, repeats)
    median = float(np.median(times))
    # The sampler on its own: a direct measure where the difference of two
    # timed steps (feeding) is within the machine's noise.
    sampler_alone_ms = sampler_ms(sampler, repeats)
    return {
        "workload": workload,
        "learner": learner_name,
        "inner_steps": inner_steps,
        "order": "first"
        if first_order or learner_name in ("fomaml", "reptile")
        else "second",
        "meta_batch": meta_batch,
        "compile_s": compile_s,
        "step_ms_median": 1e3 * median,
        "step_ms_p10": 1e3 * float(np.percentile(times, 10)),
        "step_ms_p90": 1e3 * float(np.percentile(times, 90)),
        "tasks_per_s": meta_batch / median,
        "temp_mb": temp_mb,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "gflop_per_step": flops / 1e9 if flops else None,
        "gflop_per_s": flops / median / 1e9 if flops else None,
        "ceiling_gflop_per_s": ceiling,
        "peak_fraction": flops / median / 1e9 / ceiling if flops and ceiling else None,
        "sampling_fraction": feeding,
        "sampler_ms": sampler_alone_ms,
        "sampler_fraction": sampler_alone_ms / 1e3 / median,
        "device": jax.devices()[0].device_kind,
    }


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--workloads",
        nargs="+",
        default=["sinusoid", "omniglot-5w1s"],
        choices=sorted(WORKLOADS),
    )
    p.add_argument("--learners", nargs="+", default=["maml"], choices=LEARNERS)
    p.add_argument("--inner-steps", type=int, nargs="+", default=[1])
    p.add_argument(
        "--first-order", action="store_true", help="also measure first-order variants"
    )
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument(
        "--omniglot-dir",
        type=Path,
        default=DEFAULT_OMNIGLOT_DIR,
        help="folder with the Omniglot zips (default: $MAML_JAX_OMNIGLOT_DIR or "
        "../shared/data/omniglot)",
    )
    p.add_argument(
        "--random-images",
        action="store_true",
        help="time the Omniglot workloads on random images of the right shape",
    )
    p.add_argument("--jsonl", type=Path)
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    if args.smoke:
        args.workloads, args.learners, args.repeats = ["sinusoid"], ["maml"], 3
        args.inner_steps = [1, 2]
    omniglot_classes = None
    if not args.random_images and any(
        WORKLOADS[w]["kind"] == "omniglot" for w in args.workloads
    ):
        if not (args.omniglot_dir / "images_background.zip").is_file():
            p.error(
                f"no Omniglot archives in {args.omniglot_dir}: pass --omniglot-dir "
                f"(the folder with images_background.zip) or --random-images."
            )
        omniglot_classes = load_omniglot_classes(args.omniglot_dir)
    ceiling = matmul_ceiling()
    print(f"float32 matmul ceiling: {ceiling:.0f} GFLOP/s", flush=True)
    rows = []
    orders = (False, True) if args.first_order else (False,)
    for workload in args.workloads:
        for name in args.learners:
            for steps in args.inner_steps:
                for first_order in orders:
                    row = measure(
                        workload,
                        name,
                        steps,
                        first_order,
                        args.repeats,
                        ceiling,
                        omniglot_classes,
                    )
                    if WORKLOADS[workload]["kind"] == "omniglot":
                        real = omniglot_classes is not None
                        row["images"] = "real" if real else "random"
                    print(json.dumps(row), flush=True)
                    if args.jsonl:
                        with args.jsonl.open("a") as f:
                            f.write(json.dumps(row) + "\n")
                    rows.append(row)
    print(
        "| workload | learner | order | inner steps | compile (s) | step median (ms)"
        " | p10–p90 (ms) | tasks/s | temp MB | GFLOP/step | % of matmul peak"
        " | sampling % | sampler alone (ms, % of step) |"
        "\n|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    for r in rows:
        print(
            f"| {r['workload']} | {r['learner']} | {r['order']} | {r['inner_steps']}"
            f" | {r['compile_s']:.1f} | {r['step_ms_median']:.2f} | "
            f"{r['step_ms_p10']:.2f}–{r['step_ms_p90']:.2f} | "
            f"{r['tasks_per_s']:,.0f} | {r['temp_mb'] or 0:.1f} | "
            f"{r['gflop_per_step'] or 0:.2f} | {100 * (r['peak_fraction'] or 0):.1f} | "
            f"{100 * r['sampling_fraction']:.1f} | "
            f"{r['sampler_ms']:.2f} ({100 * r['sampler_fraction']:.1f}%) |"
        )
    return rows


if __name__ == "__main__":
    main()
