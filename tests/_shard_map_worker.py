"""The ``jax.shard_map`` checks of ``test_shard_map.py``, on 4 virtual CPU devices.

Launched by the test with ``XLA_FLAGS=--xla_force_host_platform_device_count=4``
(JAX fixes its device count at start-up, and the test process has one device).
Everything is float64. Each case computes a result inside ``jax.shard_map`` (8
tasks, 2 per device, parameters replicated) and the same result unsharded, and
the script prints one line ``RESULT {json}`` mapping each case to the pair
``[sharded, unsharded]``, each flattened to a list of floats; the assertions are
in the test. ``python tests/_shard_map_worker.py CASE ...`` runs some cases only.
"""

from __future__ import annotations

import functools
import json
import sys

import jax

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import maml_jax  # noqa: E402
from tests import helpers  # noqa: E402

AXIS = "tasks"
NUM_DEVICES, NUM_TASKS = 4, 8
WAYS, SHOTS, QUERIES, DIM = 3, 2, 3, 4


def mesh() -> Mesh:
    return Mesh(np.asarray(jax.devices()[:NUM_DEVICES]), (AXIS,))


def sharded(f, in_specs, out_specs):
    """``f`` inside ``shard_map`` over the task axis, jitted."""
    return jax.jit(
        jax.shard_map(f, mesh=mesh(), in_specs=in_specs, out_specs=out_specs)
    )


# Data and parameters come from NumPy: JAX's samplers would add compiles.
def sinusoid_tasks(seed: int = 1, num_support: int = 5, num_query: int = 5):
    """Sinusoid regression tasks ``y = A sin(x − φ)``, ``x ~ U[−5, 5]``."""
    rng = np.random.default_rng(seed)
    amplitude = rng.uniform(0.1, 5.0, (NUM_TASKS, 1, 1))
    phase = rng.uniform(0.0, np.pi, (NUM_TASKS, 1, 1))

    def batch(n):
        x = rng.uniform(-5.0, 5.0, (NUM_TASKS, n, 1))
        return jnp.asarray(x), jnp.asarray(amplitude * np.sin(x - phase))

    return maml_jax.TaskBatch(batch(num_support), batch(num_query))


def cluster_tasks(seed: int = 2) -> maml_jax.TaskBatch:
    """Gaussian-cluster ``WAYS``-way tasks with labels grouped by class."""
    rng = np.random.default_rng(seed)
    centres = 2.0 * rng.standard_normal((NUM_TASKS, WAYS, 1, DIM))

    def batch(n):
        x = centres + rng.standard_normal((NUM_TASKS, WAYS, n, DIM))
        labels = np.broadcast_to(np.repeat(np.arange(WAYS), n), (NUM_TASKS, WAYS * n))
        return jnp.asarray(x.reshape(NUM_TASKS, WAYS * n, DIM)), jnp.asarray(labels)

    return maml_jax.TaskBatch(batch(SHOTS), batch(QUERIES))


def mlp_params(sizes: tuple[int, ...], seed: int = 0) -> list[dict]:
    """Parameters for ``helpers.mlp_apply``."""
    rng = np.random.default_rng(seed)
    return [
        {
            "w": jnp.asarray(rng.standard_normal((m, n)) / np.sqrt(m)),
            "b": jnp.asarray(0.1 * rng.standard_normal(n)),
        }
        for m, n in zip(sizes[:-1], sizes[1:], strict=True)
    ]


REGRESSION = {
    "maml": lambda: maml_jax.maml(helpers.mlp_loss, inner_lr=0.05, num_inner_steps=2),
    "fomaml": lambda: maml_jax.fomaml(
        helpers.mlp_loss, inner_lr=0.05, num_inner_steps=2
    ),
    "anil": lambda: maml_jax.anil(
        helpers.mlp_loss,
        inner_lr=0.05,
        num_inner_steps=2,
        adapt_mask=[{"w": False, "b": False}] * 2 + [{"w": True, "b": True}],
    ),
    "meta_sgd": lambda: maml_jax.meta_sgd(
        helpers.mlp_loss, inner_lr=0.05, num_inner_steps=2
    ),
    "maml_plus_plus": lambda: maml_jax.maml_plus_plus(
        helpers.mlp_loss, inner_lr=0.05, num_inner_steps=2, msl_anneal_steps=10
    ),
    # Its state (a count of non-finite steps) depends on the support gradients.
    "maml_apply_if_finite": lambda: maml_jax.maml(
        helpers.mlp_loss,
        inner_optimizer=optax.apply_if_finite(optax.sgd(0.05), 3),
        num_inner_steps=2,
    ),
    "reptile": lambda: maml_jax.reptile(
        helpers.mlp_loss, inner_lr=0.05, num_inner_steps=2
    ),
    "imaml": lambda: maml_jax.imaml(
        helpers.mlp_loss, inner_lr=0.05, num_inner_steps=5, reg_lambda=2.0
    ),
}


def learner_and_data(name: str):
    """``(learner, meta_params, tasks)`` for a learner name."""
    if name == "protonet":
        learner = maml_jax.protonet(helpers.mlp_apply, ways=WAYS)
        params = mlp_params((DIM, 8, 4))
        return learner, params, cluster_tasks()
    learner = REGRESSION[name]()
    params = learner.init(mlp_params((1, 8, 8, 1)))
    return learner, params, sinusoid_tasks()


def meta_grad(name: str, batching: str = "vmap", chunk_size: int | None = None):
    """The user's pattern: per-device ``meta_value_and_grad``, ``pmean`` of both.

    The reference is vmapped (batching changes only float rounding).
    """
    learner, params, tasks = learner_and_data(name)
    value_and_grad = functools.partial(
        maml_jax.meta_value_and_grad, learner, outer_step=3
    )

    def per_device(mp, tasks):
        (loss, _), grads = value_and_grad(
            mp, tasks, batching=batching, chunk_size=chunk_size
        )
        return jax.lax.pmean(loss, AXIS), jax.lax.pmean(grads, AXIS)

    got = sharded(per_device, (P(), P(AXIS)), (P(), P()))(params, tasks)
    reference = functools.partial(value_and_grad, batching="vmap")
    (loss, _), grads = jax.jit(reference)(params, tasks)
    return got, (loss, grads)


def grad_of_pmean(name: str):
    """``jax.grad`` of the ``pmean`` of ``learner.meta_loss``, taken by the user."""
    learner, params, tasks = learner_and_data(name)

    def mean_loss(mp, tasks):
        losses, _ = jax.vmap(
            lambda mp, t: learner.meta_loss(mp, maml_jax.Task(*t)), in_axes=(None, 0)
        )(mp, tasks)
        return jnp.mean(losses)

    def per_device(mp, tasks):
        return jax.grad(lambda p: jax.lax.pmean(mean_loss(p, tasks), AXIS))(mp)

    got = sharded(per_device, (P(), P(AXIS)), P())(params, tasks)
    return got, jax.jit(jax.grad(mean_loss))(params, tasks)


def adapt(name: str):
    """Every task's adapted parameters, each device adapting its own tasks."""
    learner, params, tasks = learner_and_data(name)
    adapt_all = jax.vmap(learner.adapt, in_axes=(None, 0))
    got = sharded(adapt_all, (P(), P(AXIS)), P(AXIS))(params, tasks.support)
    return got, jax.jit(adapt_all)(params, tasks.support)


def centred_loss(p, s, batch, *, training):
    """``mlp_loss`` of inputs centred by a running mean: the model state."""
    x, y = batch
    mean = 0.9 * s + 0.1 * jax.lax.stop_gradient(x.mean(0)) if training else s
    return helpers.mlp_loss(p, (x - mean[None], y)), mean


def meta_grad_stateful():
    """Loss, task-mean new state and meta-gradient of a stateful MAML."""
    learner = maml_jax.maml(
        centred_loss, inner_lr=0.05, num_inner_steps=2, has_state=True
    )
    params, state, tasks = mlp_params((1, 8, 8, 1)), jnp.zeros(1), sinusoid_tasks()
    value_and_grad = functools.partial(
        maml_jax.meta_value_and_grad, learner, batching="vmap"
    )

    def per_device(mp, state, tasks):
        (loss, (_, new_state)), grads = value_and_grad(mp, tasks, state=state)
        return jax.lax.pmean((loss, new_state, grads), AXIS)

    got = sharded(per_device, (P(), P(), P(AXIS)), P())(params, state, tasks)
    (loss, (_, new_state)), grads = jax.jit(value_and_grad)(params, tasks, state=state)
    return got, (loss, new_state, grads)


def train_steps(name: str = "maml", num_steps: int = 3):
    """A user's jitted ``shard_map`` step with an optax chain vs ``meta_train_step``."""
    learner, params, _ = learner_and_data(name)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2))

    def per_device(mp, opt_state, tasks):
        (loss, _), grads = maml_jax.meta_value_and_grad(
            learner, mp, tasks, batching="vmap"
        )
        loss, grads = jax.lax.pmean((loss, grads), AXIS)
        updates, opt_state = tx.update(grads, opt_state, mp)
        return optax.apply_updates(mp, updates), opt_state, loss

    step = sharded(per_device, (P(), P(), P(AXIS)), (P(), P(), P()))
    mp, opt_state, losses = params, tx.init(params), []
    state = maml_jax.MetaTrainState.create(params=params, learner=learner, tx=tx)
    ref_losses = []
    for i in range(num_steps):
        tasks = sinusoid_tasks(seed=10 + i)
        mp, opt_state, loss = step(mp, opt_state, tasks)
        state, metrics = maml_jax.meta_train_step(state, tasks)
        losses.append(loss)
        ref_losses.append(metrics["loss"])
    return (mp, losses), (state.meta_params, ref_losses)


CASES = {
    **{f"meta_grad/{n}": functools.partial(meta_grad, n) for n in REGRESSION},
    "meta_grad/protonet": functools.partial(meta_grad, "protonet"),
    "meta_grad/maml_stateful": meta_grad_stateful,
    "batching/scan": functools.partial(meta_grad, "maml", "scan", 1),
    "batching/auto": functools.partial(meta_grad, "maml", "auto"),
    "grad_of_pmean/maml_plus_plus": functools.partial(grad_of_pmean, "maml_plus_plus"),
    "grad_of_pmean/imaml": functools.partial(grad_of_pmean, "imaml"),
    "grad_of_pmean/protonet": functools.partial(grad_of_pmean, "protonet"),
    "adapt/maml": functools.partial(adapt, "maml"),
    "adapt/meta_sgd": functools.partial(adapt, "meta_sgd"),
    "adapt/imaml": functools.partial(adapt, "imaml"),
    "train_steps/maml": train_steps,
}


def flat(tree) -> list[float]:
    return [float(v) for x in jax.tree.leaves(tree) for v in np.ravel(x)]


def main(argv: list[str]) -> None:
    assert jax.device_count() >= NUM_DEVICES, jax.devices()
    results = {}
    for name in argv or CASES:
        try:
            got, want = CASES[name]()
            results[name] = [flat(got), flat(want)]
        except Exception as error:  # reported per case; the test shows it
            results[name] = f"{type(error).__name__}: {error}"
    print("RESULT " + json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1:])
