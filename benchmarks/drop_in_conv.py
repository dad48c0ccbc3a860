"""Does a user's CNN get the fast CPU path by swapping nn.Conv for the drop-in layer?

Question: for second-order MAML (5-way 1-shot, 5 queries per class, 1 inner step, Adam,
on-device task sampling), how long does one jitted meta-step take for a CNN the user
writes with ``flax.linen.Conv`` and for the same CNN with the drop-in
``maml_jax.layers.Conv``, with the library's default task batching (``"auto"`` as
``fit`` runs it: the chunk size measured by ``maml_jax.tune_batching``, whose cost is
reported as ``tune_s``; ``"rule"``: ``"auto"`` without measuring) and with each
candidate formulation (``vmap``, ``scan`` over chunks of 1, 2, 4), and how far is the
default from the best? Two networks: a Conv4 (64 filters, 2×2 max-pool, batch
statistics, 28×28×1) written from Flax layers as a user would, and a ResNet-12 (widths
64-160-320-640, three 3×3 convolutions and a 1×1 shortcut per block, 32×32×3 as on
CIFAR-FS). Inputs are random (the speed of a step does not depend on them).

Command: ``python -m benchmarks.drop_in_conv [--meta-batch 8] [--repeats 5] [--networks
conv4] [--convs maml_jax.layers.Conv]``; one JSON line per measurement and a table.
``--smoke``: a small Conv4, default batching only.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import maml_jax
from benchmarks._timing import time_sampled_step
from benchmarks.peers.compare import machine_info
from maml_jax import layers

WAYS, SHOTS = 5, 1
FORMULATIONS = (
    ("auto", None),
    ("rule", None),
    ("vmap", None),
    ("scan", 1),
    ("scan", 2),
    ("scan", 4),
)
CONVS = {"nn.Conv": nn.Conv, "maml_jax.layers.Conv": layers.Conv}


def batch_norm(x: jax.Array) -> jax.Array:
    """Transductive batch norm without scale and offset (as MAML's Conv4)."""
    mean, var = x.mean((0, 1, 2), keepdims=True), x.var((0, 1, 2), keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + 1e-5)


class UserConv4(nn.Module):
    conv: type
    filters: int = 64

    @nn.compact
    def __call__(self, x):
        for _ in range(4):
            x = self.conv(self.filters, (3, 3))(x)
            x = nn.max_pool(nn.relu(batch_norm(x)), (2, 2), (2, 2), padding="SAME")
        return nn.Dense(WAYS)(x.mean((1, 2)))


class ResNet12(nn.Module):
    conv: type
    widths: tuple[int, ...] = (64, 160, 320, 640)

    @nn.compact
    def __call__(self, x):
        for width in self.widths:
            shortcut = batch_norm(self.conv(width, (1, 1), use_bias=False)(x))
            for i in range(3):
                x = batch_norm(self.conv(width, (3, 3), use_bias=False)(x))
                if i < 2:
                    x = nn.leaky_relu(x, 0.1)
            x = nn.leaky_relu(x + shortcut, 0.1)
            x = nn.max_pool(x, (2, 2), (2, 2), padding="SAME")
        return nn.Dense(WAYS)(x.mean((1, 2)))


NETWORKS = {
    "conv4": (UserConv4, (28, 28, 1), {}),
    "resnet12": (ResNet12, (32, 32, 3), {}),
}
SMOKE_NETWORKS = {
    "conv4": (UserConv4, (28, 28, 1), {"filters": 8}),
    "resnet12": (ResNet12, (16, 16, 3), {"widths": (8, 16)}),
}


def sampler_for(shape, meta_batch: int, queries: int):
    def sample(key):
        ks = jax.random.split(key, 2)
        n_s, n_q = WAYS * SHOTS, WAYS * queries
        labels = lambda n: jnp.broadcast_to(jnp.arange(n) % WAYS, (meta_batch, n))
        return maml_jax.TaskBatch(
            support=(jax.random.normal(ks[0], (meta_batch, n_s, *shape)), labels(n_s)),
            query=(jax.random.normal(ks[1], (meta_batch, n_q, *shape)), labels(n_q)),
        )

    return sample


def time_network(network, conv_name, batching, chunk, args) -> dict:
    cls, shape, kwargs = (SMOKE_NETWORKS if args.smoke else NETWORKS)[network]
    model = cls(CONVS[conv_name], **kwargs)
    params = model.init(jax.random.key(0), jnp.zeros((2, *shape)))["params"]

    def loss_fn(p, batch):
        logits = model.apply({"params": p}, batch[0])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch[1])
        return loss.mean() * WAYS

    learner = maml_jax.maml(loss_fn, inner_lr=0.4, num_inner_steps=1)
    sampler = sampler_for(shape, args.meta_batch, args.queries)
    tasks = sampler(jax.random.key(0))
    resolved, tune_s = (batching, chunk), None
    if batching == "rule":
        resolved = maml_jax.auto_batching(tasks)
    elif batching == "auto":  # what fit does with an "auto" state (maml_jax.autotune)
        t0 = time.perf_counter()
        choice = maml_jax.tune_batching(
            learner, learner.init(params), tasks, enabled=True, cache_dir=args.cache_dir
        )
        tune_s = time.perf_counter() - t0
        resolved = (choice.batching, choice.chunk_size)
    state = maml_jax.MetaTrainState.create(
        params=params,
        learner=learner,
        tx=optax.adam(1e-3),
        batching=resolved[0],
        chunk_size=resolved[1],
    )
    compile_s, times, _ = time_sampled_step(state, sampler, args.repeats)
    return {
        "network": network,
        "conv": conv_name,
        "batching": batching,
        "resolved": f"{resolved[0]}" + (f"/{resolved[1]}" if resolved[1] else ""),
        "meta_batch": args.meta_batch,
        "compile_s": compile_s,
        "tune_s": tune_s,
        "step_s_median": float(np.median(times)),
    }


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--meta-batch", type=int, default=8)
    p.add_argument("--queries", type=int, default=5)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--networks", nargs="+", default=list(NETWORKS))
    p.add_argument("--convs", nargs="+", default=list(CONVS), choices=list(CONVS))
    p.add_argument(
        "--cache-dir",
        type=Path,
        help="where the measured choices are cached (default: a new temporary "
        "folder, so that every run measures)",
    )
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    if args.cache_dir is None:
        args.cache_dir = Path(tempfile.mkdtemp(prefix="autotune-"))
    formulations = FORMULATIONS
    if args.smoke:
        formulations = (("auto", None),)
        # One task: nothing for "auto" to measure (measuring: test_autotune.py).
        args.meta_batch, args.queries, args.repeats = 1, 1, 1
        args.networks = args.networks[:1]
    machine = machine_info()
    flags = (
        Path("/proc/cpuinfo").read_text().split()
        if Path("/proc/cpuinfo").exists()
        else []
    )
    machine["extensions"] = [f for f in ("avx2", "avx512f", "amx_tile") if f in flags]
    print(json.dumps({"machine": machine}), flush=True)
    rows = []
    for network in args.networks:
        for conv_name in args.convs:
            for batching, chunk in formulations:
                row = time_network(network, conv_name, batching, chunk, args)
                print(json.dumps(row), flush=True)
                rows.append(row)
    print(table(rows))
    return rows


def table(rows: list[dict]) -> str:
    """Per network: each (conv, formulation)'s step time and its ratio to the best."""
    lines = [
        "| network | conv | batching | compile (s) | step (s) | ÷ best |",
        "|---|---|---|---|---|---|",
    ]
    for network in dict.fromkeys(r["network"] for r in rows):
        mine = [r for r in rows if r["network"] == network]
        best = min(r["step_s_median"] for r in mine)
        for r in mine:
            batching = r["batching"]
            if batching == "auto":
                batching = (
                    f"**auto** ({r['resolved']}, measured in {r['tune_s']:.0f} s)"
                )
            elif batching == "rule":
                batching = f"auto without measuring ({r['resolved']})"
            elif r["resolved"] != batching:
                batching = r["resolved"]
            lines.append(
                f"| {network} | {r['conv']} | {batching} | {r['compile_s']:.1f} | "
                f"{r['step_s_median']:.3f} | {r['step_s_median'] / best:.2f} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
