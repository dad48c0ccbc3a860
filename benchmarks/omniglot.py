"""Few-shot Omniglot at paper protocol: train a preset, report test accuracy ± CI.

Question: what test accuracy (600 fixed episodes of the Vinyals test split, mean ±
95% CI, after each test-time inner step) does a learner reach on Omniglot within a
given number of meta-steps on this machine, and how long does it take?

Command (the run recorded in ``benchmarks/README.md``)::

    python benchmarks/omniglot.py --preset omniglot-5w1s --steps 12000 \\
        --out runs/omniglot-5w1s

The data directory defaults to ``../shared/data/omniglot`` beside the repository
(the canonical zips); pass ``--data-dir`` for another copy. ``--algorithm`` picks
the learner; ``--smoke`` runs 3 meta-steps with tiny evaluation in about a minute.
Prints one JSON line with the result and the accuracy table.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from maml_jax.app import learners, presets, runs

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--preset",
        default="omniglot-5w1s",
        choices=[k for k in presets.PRESETS if k.startswith("omniglot")],
    )
    p.add_argument("--algorithm", default="maml", choices=learners.ALGORITHMS)
    p.add_argument("--steps", type=int, default=12_000)
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--episodes", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--smoke", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    overrides = dict(steps=args.steps, algorithm=args.algorithm, seed=args.seed)
    if args.smoke:
        overrides.update(
            steps=3,
            meta_batch=4,
            val_episodes=8,
            steps_per_call=1,
            eval_every=3,
            checkpoint_every=3,
        )
        args.episodes = 20
    config = presets.FewShotConfig.from_preset(args.preset, **overrides)
    out = args.out or Path(tempfile.mkdtemp(prefix="maml_jax_omniglot_"))
    t0 = time.perf_counter()
    runs.train(config, args.data_dir, out, progress=not args.no_progress)
    train_seconds = time.perf_counter() - t0
    results = runs.evaluate_run(out, args.data_dir, episodes_count=args.episodes)
    metrics = [
        json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
    ]
    tasks_per_s = [r["tasks_per_s"] for r in metrics[1:]] or [metrics[0]["tasks_per_s"]]
    results.update(
        train_seconds=train_seconds,
        median_tasks_per_s=sorted(tasks_per_s)[len(tasks_per_s) // 2],
    )
    (out / "test_results.json").write_text(json.dumps(results, indent=2))
    print(
        json.dumps(
            {
                k: results[k]
                for k in (
                    "preset",
                    "algorithm",
                    "trained_steps",
                    "train_seconds",
                    "median_tasks_per_s",
                    "accuracy",
                    "accuracy_ci95",
                )
            }
        )
    )
    print(runs.format_results(results))
    return results


if __name__ == "__main__":
    main()
