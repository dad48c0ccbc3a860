"""One process of the multi-process sharding test (launched by test_sharding.py).

With ``--process-id`` it joins a ``jax.distributed`` run (gloo CPU collectives)
and meta-trains on the global task mesh; without it, it is the single-process,
single-device reference running the same steps unsharded. Either way it runs:

- phase A: ``--steps`` meta-steps on host-sampled tasks (step ``i``: tasks from
  ``fold_in(key(1), i)``); in the distributed run each process builds and feeds
  only its own share of every meta-batch (``local_task_slice`` and
  ``shard_tasks(..., process_local=True)``);
- phase B: ``--steps`` more meta-steps in one call with on-device sampling
  (``make_sharded_scan_train_steps``; reference: ``train.scan_train_steps``);
- phase C (``--fit``): ``train.fit`` to step ``3 * --steps`` in calls of
  ``--steps`` steps, with ``shard_sampler`` (reference: the plain sampler).

Then process 0 alone (``is_primary()``) writes ``metrics.json`` in ``--out``,
and every process prints one line ``RESULT {json}`` with its final parameters.
Set ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` for N local devices.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--coordinator", default=None)
    p.add_argument("--num-processes", type=int, default=None)
    p.add_argument("--process-id", type=int, default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--meta-batch", type=int, default=8)
    p.add_argument("--checkpoint", action="store_true")
    p.add_argument("--fit", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    t_start = time.perf_counter()
    distributed = args.process_id is not None

    import jax

    from maml_jax import sharding

    if distributed:
        sharding.initialize_distributed(
            args.coordinator,
            args.num_processes,
            args.process_id,
            initialization_timeout=60,
        )

    import jax.numpy as jnp
    import numpy as np
    import optax

    import maml_jax
    from maml_jax import train

    model = maml_jax.MLP((16, 16))
    params = model.init(jax.random.key(0), jnp.zeros((1, 1)))["params"]
    learner = maml_jax.maml(
        maml_jax.regression_loss(model.apply), inner_lr=0.01, num_inner_steps=1
    )
    state = maml_jax.MetaTrainState.create(
        params=params, learner=learner, tx=optax.adam(1e-3)
    )
    meta_batch = args.meta_batch

    def sample(key):
        return maml_jax.sample_sinusoid_tasks(key, meta_batch, 5, 5)

    host_tasks = [
        jax.device_get(sample(jax.random.fold_in(jax.random.key(1), i)))
        for i in range(args.steps)
    ]
    scan_key = jax.random.key(2)
    losses = []

    if distributed:
        mesh = sharding.task_mesh()
        share = sharding.local_task_slice(mesh, meta_batch)
        state = sharding.replicate(state, mesh)
        step = sharding.make_sharded_train_step(mesh)
        for tasks in host_tasks:
            local = jax.tree.map(lambda x: x[share], tasks)
            global_tasks = sharding.shard_tasks(local, mesh, process_local=True)
            shard_shapes = [
                s.data.shape[0] for s in global_tasks.support[0].addressable_shards
            ]
            state, metrics = step(state, global_tasks)
            losses.append(float(metrics["loss"]))
        run = sharding.make_sharded_scan_train_steps(mesh, sample, args.steps)
        state, metrics = run(state, sharding.replicate(scan_key, mesh))
        if args.fit:
            state = maml_jax.fit(
                state,
                sharding.shard_sampler(sample, mesh),
                key=jax.random.key(3),
                num_steps=3 * args.steps,
                steps_per_call=args.steps,
                progress=False,
            )
        info = {
            "process_id": jax.process_index(),
            "process_count": jax.process_count(),
            "global_devices": jax.device_count(),
            "local_devices": jax.local_device_count(),
            "share": [share.start, share.stop],
            "tasks_per_local_device": shard_shapes,
            "compiles": step.jitted._cache_size(),
        }
    else:
        for tasks in host_tasks:
            state, metrics = maml_jax.meta_train_step(state, tasks)
            losses.append(float(metrics["loss"]))
        run = jax.jit(train.scan_train_steps, static_argnums=(2, 3))
        state, metrics = run(state, scan_key, sample, args.steps)
        if args.fit:
            state = maml_jax.fit(
                state,
                sample,
                key=jax.random.key(3),
                num_steps=3 * args.steps,
                steps_per_call=args.steps,
                progress=False,
            )
        info = {"process_id": None, "global_devices": jax.device_count()}

    losses += [float(x) for x in np.asarray(metrics["loss"])]
    # The state is replicated, so every process can read it in full.
    leaves = [np.asarray(x).ravel().tolist() for x in jax.tree.leaves(state)]
    wrote = []
    if not distributed or sharding.is_primary():
        path = os.path.join(args.out, "metrics.json")
        with open(path, "w") as f:
            json.dump({"step": int(state.step), "loss": losses}, f)
        wrote.append(path)
    if args.checkpoint and distributed:
        from maml_jax.checkpoint import Checkpointer

        with Checkpointer(os.path.join(args.out, "checkpoints")) as ckpt:
            ckpt.save(state)
            restored = ckpt.restore(state).state
        same = jax.tree.map(
            lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))),
            state,
            restored,
        )
        info["checkpoint_restored_equal"] = all(jax.tree.leaves(same))
    info.update(
        step=int(state.step),
        losses=losses,
        leaves=leaves,
        wrote=wrote,
        seconds=time.perf_counter() - t_start,
    )
    print("RESULT " + json.dumps(info), flush=True)
    if distributed:
        jax.distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
