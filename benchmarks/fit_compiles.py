"""How many programs does ``fit`` compile, and how long does that take?

Question: when ``num_steps`` is not a multiple of ``steps_per_call`` (a short
last chunk), or a chunk is cut short by ``stop_every``, does ``fit`` compile a
second chunk program, and what does that cost? Each case runs ``fit`` from a
fresh compilation cache and reports the chunk program's compiles, XLA's
backend compile seconds (summed from ``jax.monitoring``) and the wall seconds
of the whole ``fit`` call.

Command: ``python -m benchmarks.fit_compiles [--workload sinusoid|conv4]``;
prints one JSON line per case. ``--smoke`` runs a tiny sinusoid case.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import optax

import maml_jax
from maml_jax import episodes, models, train

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"

# (num_steps, steps_per_call, stop_every): chunks of 4 with and without a short one.
CASES = ((8, 4, ()), (10, 4, ()), (10, 4, (5,)))


def build(workload: str, smoke: bool):
    """``(state, sampler)`` of a small MLP on sinusoids or Conv4 on random images."""
    if workload == "sinusoid":
        model = maml_jax.MLP(hidden_sizes=(8,) if smoke else (40, 40))
        params = model.init(jax.random.key(0), jnp.zeros((1, 1)))["params"]
        loss_fn = maml_jax.regression_loss(model.apply)
        meta_batch = 2 if smoke else 25
        sampler = lambda k: maml_jax.sample_sinusoid_tasks(k, meta_batch, 10, 10)
        learner = maml_jax.maml(loss_fn, inner_lr=0.01, num_inner_steps=1)
    else:
        data = jax.random.uniform(jax.random.key(0), (50, 20, 28, 28, 1))
        spec = episodes.EpisodeSpec(5, 1, 1)
        model = models.Conv4(num_classes=5)
        params = model.init(jax.random.key(1), jnp.zeros((2, 28, 28, 1)))["params"]
        loss_fn = models.classification_loss(model.apply, loss_scale=5)
        sampler = lambda k: episodes.sample_episodes(k, data, spec, 4)
        learner = maml_jax.maml(loss_fn, inner_lr=0.4, num_inner_steps=1, has_aux=True)
    state = maml_jax.MetaTrainState.create(
        params=params, learner=learner, tx=optax.adam(1e-3)
    )
    return state, sampler


def measure(workload, num_steps, steps_per_call, stop_every, smoke) -> dict:
    state, sampler = build(workload, smoke)
    jax.clear_caches()
    compile_s = []
    listener = lambda event, seconds, **_: (
        compile_s.append(seconds) if event == BACKEND_COMPILE_EVENT else None
    )
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        t0 = time.perf_counter()
        state = maml_jax.fit(
            state,
            sampler,
            key=jax.random.key(1),
            num_steps=num_steps,
            steps_per_call=steps_per_call,
            stop_every=stop_every,
            progress=False,
        )
        jax.block_until_ready(state)
        wall_s = time.perf_counter() - t0
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    return {
        "workload": workload,
        "num_steps": num_steps,
        "steps_per_call": steps_per_call,
        "stop_every": list(stop_every),
        "chunk_compiles": train._scan_train_steps_jit._cache_size(),
        "backend_compiles": len(compile_s),
        "backend_compile_s": round(sum(compile_s), 3),
        "fit_wall_s": round(wall_s, 3),
    }


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", choices=("sinusoid", "conv4"), default="sinusoid")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    cases = ((3, 2, ()),) if args.smoke else CASES
    rows = []
    for num_steps, steps_per_call, stop_every in cases:
        row = measure(args.workload, num_steps, steps_per_call, stop_every, args.smoke)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


if __name__ == "__main__":
    main()
