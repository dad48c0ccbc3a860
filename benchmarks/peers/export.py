"""Exports the peer benchmark's shared weights and real meta-batches to ``.npz``.

The weights are exactly those of ``benchmarks/throughput.py``'s ``build()`` for the
workload (what ``run_ours.py`` starts from). The data are real tasks:

* ``omniglot-5w1s-q15-maxpool``: episodes of the Vinyals training split (characters
  ×4 rotations, as ``maml-jax train``), from the canonical archives
  (``$MAML_JAX_OMNIGLOT_DIR``, default ``../shared/data/omniglot``), sampled with
  ``maml_jax.episodes.sample_episodes``: 5 ways, 1 shot, 15 queries per class,
  32 tasks per meta-batch.
* ``sinusoid``: ``maml_jax.sample_sinusoid_tasks``, 25 tasks of 10 + 10 points.

Command: ``python -m benchmarks.peers.export [--workloads ...] [--batches N]``;
writes ``benchmarks/peers/data/<workload>.npz`` (see ``common.load_export``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import numpy as np

import maml_jax
from benchmarks import throughput
from benchmarks.peers.common import (
    OMNIGLOT_DIR,
    PARAM_PREFIX,
    WORKLOADS,
    export_path,
)
from maml_jax import episodes

DEFAULT_BATCHES = {"sinusoid": 20, "omniglot-5w1s-q15-maxpool": 4}


def flax_params(workload: str) -> dict[str, np.ndarray]:
    """The initial meta-parameters of ``throughput.build(workload, "maml", ...)``."""
    state, _, _ = throughput.build(workload, "maml", 1, False)
    flat = jax.tree_util.tree_flatten_with_path(state.meta_params)[0]
    return {
        "/".join(str(getattr(k, "key", k)) for k in path): np.asarray(leaf)
        for path, leaf in flat
    }


def real_batches(
    workload: str, num_batches: int, seed: int = 0, data_dir: Path = OMNIGLOT_DIR
) -> dict[str, np.ndarray]:
    """``num_batches`` real meta-batches: support/query inputs and targets."""
    w = throughput.WORKLOADS[workload]
    keys = [jax.random.fold_in(jax.random.key(seed), i) for i in range(num_batches)]
    if w["kind"] == "sinusoid":
        sample = lambda k: maml_jax.sample_sinusoid_tasks(k, w["meta_batch"], 10, 10)
    elif w["kind"] == "omniglot":
        from maml_jax import datasets

        classes = datasets.omniglot_classes(data_dir, "vinyals-train", rotations=False)
        spec = episodes.EpisodeSpec(w["ways"], w["shots"], w["queries"], rotations=True)
        data = jax.device_put(classes)
        sample = jax.jit(
            lambda k: episodes.sample_episodes(k, data, spec, w["meta_batch"])
        )
    else:
        raise ValueError(f"no real data for workload {workload!r}")
    tasks = [sample(k) for k in keys]
    stack = lambda get: np.stack([np.asarray(get(t)) for t in tasks])
    out = {
        "support_x": stack(lambda t: t.support[0]),
        "support_y": stack(lambda t: t.support[1]),
        "query_x": stack(lambda t: t.query[0]),
        "query_y": stack(lambda t: t.query[1]),
    }
    if w["kind"] == "omniglot":
        out["support_y"] = out["support_y"].astype(np.int64)
        out["query_y"] = out["query_y"].astype(np.int64)
    return out


def workload_meta(workload: str) -> dict[str, object]:
    """What a peer needs besides weights and data (as ``throughput.build`` sets it)."""
    w = throughput.WORKLOADS[workload]
    ways = w.get("ways", 0)
    return {
        "kind": w["kind"],
        "ways": ways,
        "inner_lr": w["inner_lr"],
        "loss_scale": float(ways) if w["kind"] != "sinusoid" else 1.0,
        "meta_batch": w["meta_batch"],
    }


def export(workload: str, num_batches: int, seed: int = 0) -> Path:
    """Writes ``workload``'s weights, real meta-batches and settings; returns where."""
    arrays: dict[str, object] = {
        PARAM_PREFIX + k: v for k, v in flax_params(workload).items()
    }
    arrays.update(real_batches(workload, num_batches, seed))
    arrays.update(workload_meta(workload))
    path = export_path(workload)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    p.add_argument("--batches", type=int, help="meta-batches (default per workload)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for workload in args.workloads:
        n = args.batches or DEFAULT_BATCHES[workload]
        print(f"wrote {export(workload, n, args.seed)} ({n} meta-batches)")


if __name__ == "__main__":
    main()
