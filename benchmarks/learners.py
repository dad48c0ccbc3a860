"""Every learner on the same budget: sinusoid regression and Omniglot 5-way 1-shot.

Question: on this machine and a fixed budget, what does each learner of the MAML
family reach on the sinusoid protocol (5-shot MSE after 1/10 steps) and on
Omniglot 5w1s (test accuracy ± 95% CI over 600 fixed episodes), and at what
speed (tasks/s, wall time)?

Command (the table in ``benchmarks/README.md``)::

    python benchmarks/learners.py --sinusoid-steps 20000 --omniglot-steps 600 \\
        --out runs/learners

Budgets far below the papers' (70k / 60k steps) are reported as such. Each learner
runs with its protocol defaults (see ``maml_jax.app.learners``). ``--smoke`` runs
two learners for a few steps. Prints one JSON line per learner and workload, then a
markdown table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks import omniglot
from maml_jax.app import learners, sinusoid

REGRESSION = learners.REGRESSION_ALGORITHMS  # ProtoNets have no regression form


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--algorithms",
        nargs="+",
        default=list(learners.ALGORITHMS),
        choices=learners.ALGORITHMS,
    )
    p.add_argument("--sinusoid-steps", type=int, default=20_000)
    p.add_argument("--omniglot-steps", type=int, default=600)
    p.add_argument("--episodes", type=int, default=600)
    p.add_argument("--data-dir", type=Path, default=omniglot.DEFAULT_DATA)
    p.add_argument("--out", type=Path, default=Path("runs/learners"))
    p.add_argument("--skip-omniglot", action="store_true")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    if args.smoke:
        args.algorithms = ["maml", "protonet"]
    rows = []
    for name in args.algorithms:
        row = {"algorithm": name}
        if name in REGRESSION:
            sin_argv = [
                "--algorithm",
                name,
                "--steps",
                str(args.sinusoid_steps),
                "--no-baseline",
                "--no-progress",
                "--out",
                str(args.out / f"sinusoid-{name}"),
            ]
            if args.smoke:
                sin_argv.append("--smoke")
            t0 = time.perf_counter()
            try:
                result = sinusoid.main(sin_argv)["learners"][name]
            except FloatingPointError as error:  # a diverged run is a result too
                row["sinusoid"] = {"error": str(error)}
            else:
                row["sinusoid"] = {
                    "steps": result["steps"],
                    "wall_s": time.perf_counter() - t0,
                    "tasks_per_s": 25 / (result["scanned_ms_per_step"] / 1e3),
                    "mse_5shot": {s: result["5shot"][s]["mse"] for s in ("1", "10")},
                    "ci95_5shot": {s: result["5shot"][s]["ci95"] for s in ("1", "10")},
                }
        if not args.skip_omniglot:
            om_argv = [
                "--algorithm",
                name,
                "--steps",
                str(args.omniglot_steps),
                "--episodes",
                str(args.episodes),
                "--data-dir",
                str(args.data_dir),
                "--no-progress",
                "--out",
                str(args.out / f"omniglot-{name}"),
            ]
            if args.smoke:
                om_argv.append("--smoke")
            try:
                result = omniglot.main(om_argv)
            except FloatingPointError as error:
                row["omniglot"] = {"error": str(error)}
                result = None
            if result is not None:
                row["omniglot"] = {
                    "steps": result["trained_steps"],
                    "wall_s": result["train_seconds"],
                    "tasks_per_s": result["median_tasks_per_s"],
                    "accuracy": result["accuracy"][-1],
                    "ci95": result["accuracy_ci95"][-1],
                    "test_inner_steps": result["inner_steps"],
                }
        print(json.dumps(row), flush=True)
        rows.append(row)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "learners.json").write_text(json.dumps(rows, indent=2))
    print(table(rows))
    return rows


def table(rows) -> str:
    lines = [
        "| learner | sinusoid 5-shot MSE @1 | @10 | sinusoid tasks/s | "
        "Omniglot 5w1s test acc. (%) | Omniglot tasks/s | Omniglot wall (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        sin, om = row.get("sinusoid"), row.get("omniglot")
        cells = [row["algorithm"]]
        if sin and "error" in sin:
            cells += ["diverged", "diverged", "-"]
        elif sin:
            cells += [
                f"{sin['mse_5shot']['1']:.3f} ± {sin['ci95_5shot']['1']:.3f}",
                f"{sin['mse_5shot']['10']:.3f} ± {sin['ci95_5shot']['10']:.3f}",
                f"{sin['tasks_per_s']:,.0f}",
            ]
        else:
            cells += ["n/a", "n/a", "n/a"]
        if om and "error" in om:
            cells += ["diverged", "-", "-"]
        elif om:
            cells += [
                f"{100 * om['accuracy']:.2f} ± {100 * om['ci95']:.2f}",
                f"{om['tasks_per_s']:.0f}",
                f"{om['wall_s']:.0f}",
            ]
        else:
            cells += ["-", "-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
