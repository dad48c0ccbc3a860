"""Closed-form task families and reference computations for the tests."""

import jax
import jax.numpy as jnp
import numpy as np

from maml_jax import Task, TaskBatch


def linear_loss(w, batch):
    """Mean squared error of a linear model: ``mean((x @ w - y) ** 2)``."""
    x, y = batch
    return jnp.mean((x @ w - y) ** 2)


def linear_grad(w, batch):
    x, y = batch
    return 2.0 / x.shape[0] * x.T @ (x @ w - y)


def linear_hessian(batch):
    x, _ = batch
    return 2.0 / x.shape[0] * x.T @ x


def linear_tasks(key, num_tasks=4, num_support=6, num_query=8, dim=3):
    """Random linear-regression tasks in float64, as a ``TaskBatch``."""
    k1, k2, k3, k4, k5 = jax.random.split(key, 5)
    w_true = jax.random.normal(k1, (num_tasks, dim), jnp.float64)
    xs = jax.random.normal(k2, (num_tasks, num_support, dim), jnp.float64)
    xq = jax.random.normal(k3, (num_tasks, num_query, dim), jnp.float64)
    ys = jnp.einsum("tnd,td->tn", xs, w_true)
    ys = ys + 0.1 * jax.random.normal(k4, ys.shape, jnp.float64)
    yq = jnp.einsum("tnd,td->tn", xq, w_true)
    yq = yq + 0.1 * jax.random.normal(k5, yq.shape, jnp.float64)
    return TaskBatch(support=(xs, ys), query=(xq, yq))


def batch_meta_loss(learner, meta_params, tasks):
    """Mean meta-loss over a batch of tasks and the per-task aux (``vmap``)."""
    meta_loss = lambda mp, task: learner.meta_loss(mp, Task(*task))
    losses, aux = jax.vmap(meta_loss, in_axes=(None, 0))(meta_params, tasks)
    return jnp.mean(losses), aux


def task_at(tasks, i):
    """Task ``i`` of a ``TaskBatch``."""
    return Task(*jax.tree.map(lambda x: x[i], tasks))


def mlp_params(key, sizes=(1, 8, 8, 1), dtype=jnp.float64):
    """A plain-JAX MLP parameter list (no Flax)."""
    params = []
    for k, (m, n) in zip(
        jax.random.split(key, len(sizes) - 1),
        zip(sizes[:-1], sizes[1:], strict=True),
        strict=True,
    ):
        kw, kb = jax.random.split(k)
        params.append(
            {
                "w": jax.random.normal(kw, (m, n), dtype) / np.sqrt(m),
                "b": 0.1 * jax.random.normal(kb, (n,), dtype),
            }
        )
    return params


def mlp_apply(params, x):
    for layer in params[:-1]:
        x = jnp.tanh(x @ layer["w"] + layer["b"][None])
    return x @ params[-1]["w"] + params[-1]["b"][None]


def mlp_loss(params, batch):
    x, y = batch
    return jnp.mean((mlp_apply(params, x) - y) ** 2)


def mlp_loss_with_aux(params, batch):
    x, y = batch
    error = mlp_apply(params, x) - y
    return jnp.mean(error**2), {"mae": jnp.mean(jnp.abs(error))}


# Small but real: paper 5-way 1-shot episodes, a smaller meta-batch for speed.
CLI_SMALL_ARGS = [
    "--preset",
    "omniglot-5w1s",
    "--meta-batch",
    "4",
    "--val-episodes",
    "8",
    "--steps-per-call",
    "2",
    "--eval-every",
    "2",
    "--checkpoint-every",
    "2",
    "--no-progress",
]


def final_params(run_dir):
    """The restored checkpoint (state and step) of a ``maml-jax train`` run."""
    import json

    import maml_jax
    from maml_jax.app import learners, presets
    from maml_jax.checkpoint import Checkpointer

    config = presets.FewShotConfig(**json.loads((run_dir / "config.json").read_text()))
    _, params, learner, tx, _ = learners.build_learner(config, (28, 28, 1))
    template = maml_jax.MetaTrainState.create(params=params, learner=learner, tx=tx)
    with Checkpointer(run_dir / "checkpoints", read_only=True) as checkpointer:
        return checkpointer.restore(template)
