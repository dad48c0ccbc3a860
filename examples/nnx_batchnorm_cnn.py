"""MAML on Omniglot 5-way 1-shot with your own Flax NNX CNN with BatchNorm.

The CNN is a plain NNX module; ``maml_jax.from_nnx`` splits it into its
``nnx.Param`` variables (meta-learned) and the rest, BatchNorm's ``BatchStat``
running averages (model state), both as nested dicts. The loss it returns runs
the module in ``train()`` mode during meta-training, and every meta-step
replaces the running averages with the mean of the tasks' updated ones;
evaluation adapts and predicts in ``eval()`` mode, with the running averages.
Checkpoints hold both, and running again with the same ``--out`` resumes where
the last checkpoint left off, bit for bit.

Command: ``python examples/nnx_batchnorm_cnn.py --data-dir DATA --out OUT``,
where ``DATA`` holds Omniglot's ``images_background.zip`` and
``images_evaluation.zip``. The defaults are the MAML paper's CNN and meta-batch
(64 filters, 32 tasks per step), a run for an accelerator; ``--smoke`` runs 4
steps of a tiny CNN in about 25 s of CPU time (and decodes the archives into
the dataset cache the first time, about 8 s more).
``evaluate`` adapts on each support set's batch statistics, as meta-training
does, and scores the queries with the running averages (see the Linen example
for why not inference mode throughout).
"""

from __future__ import annotations

import argparse
import math
import tempfile

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import maml_jax
from maml_jax import datasets

WAYS, SHOTS = 5, 1
TEST_INNER_STEPS = 3


class Block(nnx.Module):
    """3x3 conv, BatchNorm, ReLU, 2x2 max-pooling."""

    def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs):
        self.conv = nnx.Conv(in_features, out_features, (3, 3), rngs=rngs)
        self.norm = nnx.BatchNorm(out_features, momentum=0.9, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jax.nn.relu(self.norm(self.conv(x)))
        return nnx.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")


class CNN(nnx.Module):
    """Conv blocks on ``(n, size, size, 1)`` images, then a linear head."""

    def __init__(
        self, ways: int, *, size: int, filters: int, blocks: int, rngs: nnx.Rngs
    ):
        widths = [1] + [filters] * blocks
        self.blocks = nnx.List(
            [Block(i, o, rngs=rngs) for i, o in zip(widths, widths[1:], strict=False)]
        )
        for _ in range(blocks):
            size = math.ceil(size / 2)
        self.head = nnx.Linear(filters * size * size, ways, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        for block in self.blocks:
            x = block(x)
        return self.head(x.reshape(x.shape[0], -1))


def cross_entropy(logits: jax.Array, labels: jax.Array):
    """Mean cross-entropy, with the accuracy as aux (reported by fit and evaluate)."""
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, {"accuracy": jnp.mean(jnp.argmax(logits, axis=-1) == labels)}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="folder of Omniglot zips")
    parser.add_argument("--out", help="checkpoint folder (default: a temporary one)")
    parser.add_argument("--steps", type=int, default=2000, help="meta-steps")
    parser.add_argument("--meta-batch", type=int, default=32, help="tasks per step")
    parser.add_argument("--filters", type=int, default=64)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--checkpoint-every", type=int, default=500)
    parser.add_argument("--test-episodes", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="a seconds-long run")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.meta_batch, args.filters, args.blocks = 4, 2, 8, 2
        args.checkpoint_every, args.test_episodes = 2, 10
    train_key = jax.random.key(args.seed)

    # (characters, 20 drawings, 28, 28, 1). The episodes rotate them on device:
    # each character is four classes, as in the MAML paper's protocol.
    load = lambda split: jnp.asarray(
        datasets.omniglot_classes(args.data_dir, split, rotations=False)
    )
    train_data, test_data = load("vinyals-train"), load("vinyals-test")
    train_spec = maml_jax.EpisodeSpec(WAYS, SHOTS, queries=1, rotations=True)
    test_spec = maml_jax.EpisodeSpec(WAYS, SHOTS, queries=15, rotations=True)

    net = CNN(
        WAYS,
        size=train_data.shape[2],
        filters=args.filters,
        blocks=args.blocks,
        rngs=nnx.Rngs(args.seed),
    )
    model = maml_jax.from_nnx(net, cross_entropy)  # state: the BatchStat variables
    learner = maml_jax.maml(
        model.loss_fn, inner_lr=0.4, num_inner_steps=1, has_aux=True, has_state=True
    )
    train_state = maml_jax.MetaTrainState.create(
        params=model.params,
        learner=learner,
        tx=optax.adam(1e-3),
        model_state=model.state,
    )

    scratch = tempfile.TemporaryDirectory()  # checkpoints when --out is not given
    with scratch, maml_jax.Checkpointer(args.out or scratch.name, keep=2) as ckpt:
        extra = {}
        if ckpt.latest_step() is not None:
            # A fresh state is the template: same structure, shapes and dtypes.
            train_state, extra, step = ckpt.restore(train_state)
            print(f"resumed from step {step}")

        def save(state, record):
            step = record["step"]
            if step % args.checkpoint_every == 0 or step == args.steps:
                extra["loss"] = float(record["loss"])
                ckpt.save(state, extra=extra)

        train_state = maml_jax.fit(
            train_state,
            lambda key: maml_jax.sample_episodes(
                key, train_data, train_spec, args.meta_batch
            ),
            key=train_key,
            num_steps=args.steps,
            stop_every=(args.checkpoint_every,),
            progress=not args.smoke,
            callbacks=(save,),
        )

    # Fixed test episodes from unseen characters; adaptation and prediction run
    # in eval() mode with the trained running averages.
    sample = jax.jit(maml_jax.sample_episodes, static_argnums=(2, 3))
    test_tasks = sample(
        jax.random.key(20170306), test_data, test_spec, args.test_episodes
    )
    curves = maml_jax.evaluate(
        learner,
        train_state.meta_params,
        test_tasks,
        num_steps=TEST_INNER_STEPS,
        batch_size=50,
        state=train_state.model_state,
    )
    # The trained model as an NNX module again, to use as any other: the
    # learned initialisation and running averages put back into ``net``.
    _, params, rest = nnx.split(net, nnx.Param, ...)
    nnx.replace_by_pure_dict(params, train_state.meta_params)
    nnx.replace_by_pure_dict(rest, train_state.model_state)
    nnx.update(net, params, rest)
    net.eval()
    images = test_tasks.query[0][0]
    same = model.apply_fn(train_state.meta_params, train_state.model_state, images)
    assert jnp.allclose(net(images), same, atol=1e-5)
    accuracy, ci95 = maml_jax.mean_ci95(curves["query_accuracy"][:, -1])
    results = {
        "test_accuracy": float(accuracy),
        "test_accuracy_ci95": float(ci95),
        "final_loss": extra.get("loss", float("nan")),
    }
    print(
        f"test accuracy ({args.test_episodes} episodes, {TEST_INNER_STEPS} inner "
        f"steps): {accuracy:.3f} ± {ci95:.3f}"
    )
    print(f"final loss: {results['final_loss']:.4f}")
    return results


if __name__ == "__main__":
    main()
