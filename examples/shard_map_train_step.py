"""Your own jitted MAML train step inside ``jax.shard_map``, with an optax chain.

The meta-parameters and the optimizer state are replicated (``P()``), the task
batch is split over a mesh axis (``P("tasks")``); each device computes the
meta-gradient of its own tasks and ``pmean`` averages loss and gradient over
the axis. maml_jax casts the parameters to vary over the tasks' axis before it
differentiates, so the step equals the unsharded one (to float rounding); the
script checks that against ``maml_jax.meta_train_step`` on one device.

Command: ``python examples/shard_map_train_step.py`` (2000 meta-steps of
sinusoid regression over 4 virtual CPU devices, about a minute on a 2-core
CPU); ``--smoke`` runs a few steps. On a machine with several accelerators,
drop the ``XLA_FLAGS`` line: the mesh takes every device.
"""

from __future__ import annotations

import os

# Several CPU devices on a one-CPU machine; must be set before jax starts.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import argparse  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import maml_jax  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000, help="meta-steps")
    parser.add_argument("--meta-batch", type=int, default=32, help="tasks per step")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="a seconds-long run")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.meta_batch = 5, 8

    mesh = Mesh(np.asarray(jax.devices()), ("tasks",))
    if args.meta_batch % mesh.size:
        parser.error(f"--meta-batch must be a multiple of the {mesh.size} devices.")
    model = maml_jax.MLP(hidden_sizes=(40, 40))
    init_key, key = jax.random.split(jax.random.key(args.seed))
    params = model.init(init_key, jnp.zeros((1, 1)))["params"]
    learner = maml_jax.maml(
        maml_jax.regression_loss(model.apply), inner_lr=0.01, num_inner_steps=1
    )
    tx = optax.chain(optax.clip_by_global_norm(10.0), optax.adam(1e-3))

    def sample(key):
        return maml_jax.sample_sinusoid_tasks(key, args.meta_batch, 10, 10)

    def per_device(meta_params, opt_state, tasks):  # this device's tasks
        (loss, _), grads = maml_jax.meta_value_and_grad(
            learner, meta_params, tasks, batching="vmap"
        )
        loss, grads = jax.lax.pmean((loss, grads), "tasks")
        updates, opt_state = tx.update(grads, opt_state, meta_params)
        return optax.apply_updates(meta_params, updates), opt_state, loss

    step = jax.jit(
        jax.shard_map(
            per_device,
            mesh=mesh,
            in_specs=(P(), P(), P("tasks")),
            out_specs=(P(), P(), P()),
        )
    )

    meta_params, opt_state = params, tx.init(params)
    reference = maml_jax.MetaTrainState.create(
        params=params, learner=learner, tx=tx, batching="vmap"
    )
    losses = []
    for i in range(args.steps):
        tasks = sample(jax.random.fold_in(key, i))
        meta_params, opt_state, loss = step(meta_params, opt_state, tasks)
        losses.append(float(loss))
        if i < 3:  # the sharded step is the unsharded one
            reference, metrics = maml_jax.meta_train_step(reference, tasks)
            gap = max(
                float(jnp.max(jnp.abs(a - b)))
                for a, b in zip(
                    jax.tree.leaves(meta_params),
                    jax.tree.leaves(reference.meta_params),
                    strict=True,
                )
            )
            np.testing.assert_allclose(loss, metrics["loss"], rtol=1e-5)
            assert gap < 1e-5, f"sharded and unsharded steps differ by {gap}"
            print(
                f"step {i}: loss {losses[-1]:.4f}, max |sharded - unsharded| {gap:.1e}"
            )
    print(f"devices: {mesh.size}; meta-steps: {args.steps}")
    print(f"final loss: {np.mean(losses[-10:]):.4f}")
    return {"final_loss": float(np.mean(losses[-10:]))}


if __name__ == "__main__":
    main()
