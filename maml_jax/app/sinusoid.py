"""Sinusoid regression with MAML, the protocol of Finn et al. (2017), Section 5.1.

Question: does maml_jax reproduce the paper's few-shot sinusoid regression, and how
fast is its meta-train step?

Protocol: tasks ``y = A sin(x − φ)`` with ``A ~ U[0.1, 5]``, ``φ ~ U[0, π]``,
``x ~ U[−5, 5]``; an MLP 40-40 ReLU; K=10 support and 10 query points per task;
one inner SGD step with α = 0.01; meta-batch 25; Adam 1e-3; 70,000 meta-steps.
The baseline ("pretrained on all tasks") is the same MLP trained by plain
regression on the same tasks (support and query pooled), same optimizer and
budget, then fine-tuned at test time with the same inner SGD.

Evaluation: 600 fixed test tasks (from ``--seed + 1``); for K in {5, 10} support
points, the mean squared error on 100 query points drawn uniformly from [−5, 5]
after 0..10 inner steps, mean ± 95% CI over tasks.

Outputs (``--out``): ``results.json`` (config, numbers, versions, device, times),
``metrics.jsonl`` (training curve), ``sinusoid.png`` (like the paper's
Figure 2). One JSON line per measurement on stdout, then a table.

Command (the full run): ``maml-jax sinusoid --out runs/sinusoid`` (or
``python benchmarks/sinusoid.py``);
``--smoke`` runs a tiny configuration in seconds.
"""

from __future__ import annotations

import json
import math
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import maml_jax
from maml_jax import MetaLearner, Task, core
from maml_jax.app import options
from maml_jax.app.learners import REGRESSION_ALGORITHMS, make_learner

# MAML's 5-shot MSE after 1, 5 and 10 inner steps that a run is compared with.
PAPER_5SHOT = {1: 0.67, 5: 0.38, 10: 0.35}
REPORT_STEPS = (0, 1, 5, 10)
# Learners whose meta-gradient does not keep every inner step's activations.
_FIRST_ORDER = ("fomaml", "reptile", "imaml")


def pretrained_baseline(loss_fn, *, inner_lr: float) -> MetaLearner:
    """Joint training on all tasks as a ``MetaLearner`` (no inner loop in training).

    ``meta_loss`` is the regression loss on the task's support and query pooled,
    so the outer optimizer does plain multi-task regression; ``adaptation_curve``
    fine-tunes with SGD at ``inner_lr`` like MAML at test time.
    """

    optimizer = optax.sgd(inner_lr)

    def init(params):
        return params

    def adapt(params, support, *, num_steps=None):
        if num_steps is None:  # trained without an inner loop
            return params
        return core.inner_loop(
            loss_fn, params, support, optimizer=optimizer, num_steps=num_steps
        )[0]

    def meta_loss(params, task: Task, *, outer_step=None):
        del outer_step
        pooled = jax.tree.map(
            lambda s, q: jnp.concatenate([s, q]), task.support, task.query
        )
        return loss_fn(params, pooled), {}

    def adaptation_curve(params, task, num_steps):
        return core.adaptation_curve(
            loss_fn, params, task, optimizer=optimizer, num_steps=num_steps
        )

    return MetaLearner(init, adapt, meta_loss, adaptation_curve)


def parse_args(argv):
    """The validated options (``ValueError`` / ``FileExistsError`` if not valid)."""
    p = options.ArgumentParser(
        prog="maml-jax sinusoid", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--algorithm", default="maml", choices=REGRESSION_ALGORITHMS)
    p.add_argument("--steps", type=int, default=70_000)
    p.add_argument("--meta-batch", type=int, default=25)
    p.add_argument("--shots", type=int, default=10, help="K support points (train)")
    p.add_argument("--queries", type=int, default=10, help="query points (train)")
    p.add_argument("--inner-lr", type=float, default=0.01)
    p.add_argument("--inner-steps", type=int, default=1)
    p.add_argument("--outer-lr", type=float, default=1e-3)
    p.add_argument("--hidden", type=int, nargs="+", default=[40, 40])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-tasks", type=int, default=600)
    p.add_argument("--test-shots", type=int, nargs="+", default=[5, 10])
    p.add_argument("--test-queries", type=int, default=100)
    p.add_argument("--test-steps", type=int, default=10)
    p.add_argument("--steps-per-call", type=int, default=500)
    p.add_argument("--out", type=Path, default=Path("runs/sinusoid"))
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--smoke", action="store_true", help="tiny run, seconds")
    p.add_argument(
        "--debug", action="store_true", help="show the full traceback on errors"
    )
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.test_tasks, args.steps_per_call = 200, 40, 100
        args.test_steps = max(REPORT_STEPS)
    validate(args)
    return args


def validate(args) -> None:
    """Checks every option before any work, so a bad one fails in a second.

    Counts have a floor and a cap (``maml_jax.app.options``); the memory of one
    meta-step and of the test evaluation is estimated and compared with the
    device's; the confidence intervals need at least two test tasks.
    """
    check = options.check_range
    check("--steps", args.steps, 0, options.MAX_STEPS)
    check("--meta-batch", args.meta_batch, 1, options.MAX_META_BATCH)
    for name in ("shots", "queries", "test_queries"):
        check(
            f"--{name.replace('_', '-')}", getattr(args, name), 1, options.MAX_EXAMPLES
        )
    for shots in args.test_shots:
        check("--test-shots", shots, 1, options.MAX_EXAMPLES)
    check("--inner-steps", args.inner_steps, 1, options.MAX_INNER_STEPS)
    check("--test-steps", args.test_steps, 1, options.MAX_TEST_INNER_STEPS)
    check("--steps-per-call", args.steps_per_call, 1, options.MAX_STEPS_PER_CALL)
    # mean_ci95 needs two values for a sample standard deviation.
    check("--test-tasks", args.test_tasks, 2, options.MAX_EPISODES)
    check("--seed", args.seed, 0, options.MAX_SEED - 1)
    if len(args.hidden) > options.MAX_LAYERS:
        raise ValueError(
            f"--hidden takes at most {options.MAX_LAYERS} layers; got "
            f"{len(args.hidden)}."
        )
    for width in args.hidden:
        check("--hidden", width, 1, options.MAX_WIDTH)
    for name in ("inner_lr", "outer_lr"):
        value = getattr(args, name)
        if not math.isfinite(value) or value <= 0:
            raise ValueError(
                f"--{name.replace('_', '-')} must be a finite number > 0; got {value}."
            )
    if args.out.exists() and not args.out.is_dir():
        raise FileExistsError(f"--out {args.out} exists and is not a folder.")
    _check_memory(args)


def _check_memory(args) -> None:
    """Compares the float32 arrays one meta-step and the evaluation keep per task
    (parameters per inner step and gradients, activations per example) with the
    device memory; XLA's own compiled step measured within 1.5× of this.
    """
    widths = [1, *args.hidden, 1]
    num_params = sum(m * n + n for m, n in zip(widths[:-1], widths[1:], strict=True))
    units = sum(widths)
    kept = 1 if args.algorithm in _FIRST_ORDER else args.inner_steps
    examples = args.shots + args.queries
    per_task = 4 * (num_params * (kept + 2) + examples * units * 2 * (kept + 1))
    options.check_memory(
        "--meta-batch",
        args.meta_batch,
        per_task,
        f"the meta-step's tasks ({examples} points each through layers "
        f"{args.hidden}, {kept} inner step(s) kept)",
    )
    examples = max(args.test_shots) + args.test_queries
    per_task = 4 * (3 * num_params + examples * units * 2)
    options.check_memory(
        "--test-tasks",
        args.test_tasks,
        per_task,
        f"the test tasks, adapted all at once ({examples} points each through "
        f"layers {args.hidden})",
    )


def _prepare_out(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise OSError(f"--out {out} is not writable: {error.strerror}.") from None


def step_time_ms(state, tasks, repeats: int = 200) -> dict[str, float]:
    """Steady-state time of one jitted ``meta_train_step`` (compile excluded)."""
    lowered = jax.jit(maml_jax.train_step, donate_argnums=0).lower(state, tasks)
    t0 = time.perf_counter()
    step = lowered.compile()
    compile_s = time.perf_counter() - t0
    state = jax.tree.map(jnp.copy, state)
    for _ in range(10):
        state, metrics = step(state, tasks)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        state, metrics = step(state, tasks)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    times = np.array(times) * 1e3
    return {
        "compile_s": compile_s,
        "step_ms_median": float(np.median(times)),
        "step_ms_p10": float(np.percentile(times, 10)),
        "step_ms_p90": float(np.percentile(times, 90)),
    }


def train(name, learner, params, args, key, out: Path):
    state = maml_jax.MetaTrainState.create(
        params=params, learner=learner, tx=optax.adam(args.outer_lr)
    )
    sampler = lambda k: maml_jax.sample_sinusoid_tasks(
        k, args.meta_batch, args.shots, args.queries
    )
    metrics_path = out / f"metrics_{name}.jsonl"
    metrics_path.unlink(missing_ok=True)
    t0 = time.perf_counter()
    state = maml_jax.fit(
        state,
        sampler,
        key=key,
        num_steps=args.steps,
        steps_per_call=args.steps_per_call,
        metrics_path=metrics_path,
        progress=not args.no_progress,
    )
    jax.block_until_ready(state)
    return state, time.perf_counter() - t0


def evaluate(learner, meta_params, args, shots):
    key = jax.random.key(args.seed + 1)  # fixed test tasks, independent of training
    k_params, k_x = jax.random.split(key)
    sines = maml_jax.sample_sinusoid_params(k_params, args.test_tasks)
    tasks = maml_jax.sinusoid_tasks(k_x, sines, shots, args.test_queries)
    curves = maml_jax.evaluate(learner, meta_params, tasks, num_steps=args.test_steps)
    summary = maml_jax.summarize_curves({"mse": curves["query_loss"]})
    return summary, (sines, tasks)


def plot(path, apply_fn, results_params, learners, args, inner_lr):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shots_list = args.test_shots
    fig, axes = plt.subplots(
        len(results_params),
        len(shots_list),
        figsize=(5 * len(shots_list), 3.6 * 2),
        squeeze=False,
    )
    key = jax.random.key(args.seed + 2)
    sines = maml_jax.SinusoidParams(jnp.array([3.0]), jnp.array([1.0]))
    grid = jnp.linspace(-5, 5, 200)[None, :, None]
    for col, shots in enumerate(shots_list):
        task = maml_jax.sinusoid_tasks(key, sines, shots, 1)
        task = maml_jax.unstack_tasks(task)[0]
        for row, (name, meta_params) in enumerate(results_params.items()):
            ax = axes[row, col]
            ax.plot(
                grid[0, :, 0],
                maml_jax.sinusoid(sines, grid)[0, :, 0],
                "r",
                label="ground truth",
            )
            params = meta_params
            curves = {0: params}
            for step in range(1, max(REPORT_STEPS) + 1):
                grads = jax.grad(maml_jax.regression_loss(apply_fn))(
                    params, task.support
                )
                params = jax.tree.map(lambda p, g: p - inner_lr * g, params, grads)
                curves[step] = params
            styles = {
                0: ("pre-update", ":"),
                1: ("1 grad step", "--"),
                10: ("10 grad steps", "-"),
            }
            for step, (label, style) in styles.items():
                pred = apply_fn({"params": curves[step]}, grid[0])
                ax.plot(grid[0, :, 0], pred[:, 0], style, label=label)
            ax.scatter(
                task.support[0][:, 0],
                task.support[1][:, 0],
                c="k",
                marker="^",
                zorder=5,
                label="used for grad",
            )
            ax.set_title(f"{name}, K={shots}")
            ax.set_ylim(-5, 5)
            if row == 0 and col == 0:
                ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = args.out
    _prepare_out(out)
    model = maml_jax.MLP(hidden_sizes=tuple(args.hidden))
    params = model.init(jax.random.key(args.seed), jnp.zeros((1, 1)))["params"]
    loss_fn = maml_jax.regression_loss(model.apply)
    learners = {args.algorithm: make_learner(args, loss_fn, params)}
    if not args.no_baseline:
        learners["pretrained"] = pretrained_baseline(loss_fn, inner_lr=args.inner_lr)

    train_key = jax.random.key(args.seed + 100)
    results = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
        "config": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
        },
        "versions": {
            "python": platform.python_version(),
            "jax": jax.__version__,
            "maml_jax": maml_jax.__version__,
            "optax": optax.__version__,
        },
        "device": f"{jax.devices()[0].platform}: {jax.devices()[0].device_kind}",
        "machine": platform.processor() or platform.machine(),
        "paper_5shot_maml_mse": PAPER_5SHOT,
        "learners": {},
    }
    tasks = maml_jax.sample_sinusoid_tasks(
        jax.random.key(0), args.meta_batch, args.shots, args.queries
    )
    final_params = {}
    for name, learner in learners.items():
        state, seconds = train(name, learner, params, args, train_key, out)
        timing = step_time_ms(
            maml_jax.MetaTrainState.create(
                params=params, learner=learner, tx=optax.adam(args.outer_lr)
            ),
            tasks,
            repeats=20 if args.smoke else 300,
        )
        entry = {
            "train_seconds": seconds,
            "steps": args.steps,
            **timing,
            "scanned_ms_per_step": 1e3 * seconds / max(args.steps, 1),
        }
        for shots in args.test_shots:
            summary, _ = evaluate(learner, state.meta_params, args, shots)
            entry[f"{shots}shot"] = {
                str(s): {"mse": summary["mse"][s], "ci95": summary["mse_ci95"][s]}
                for s in REPORT_STEPS
                if s <= args.test_steps
            }
            entry[f"{shots}shot_curve"] = summary["mse"]
        results["learners"][name] = entry
        final_params[name] = state.meta_params
        print(
            json.dumps(
                {
                    "learner": name,
                    **{k: v for k, v in entry.items() if not k.endswith("curve")},
                }
            )
        )

    # The figure adapts with plain SGD at α, so it shows learners whose
    # meta-parameters are the network's parameters (not Meta-SGD / MAML++).
    plottable = {
        k: v
        for k, v in final_params.items()
        if jax.tree.structure(v) == jax.tree.structure(params)
    }
    if plottable:
        plot(
            out / "sinusoid.png", model.apply, plottable, learners, args, args.inner_lr
        )
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(table(results))
    return results


def table(results) -> str:
    lines = [
        "| learner | K | " + " | ".join(f"MSE @{s}" for s in REPORT_STEPS) + " |",
        "|---|---|" + "---|" * len(REPORT_STEPS),
    ]
    for name, entry in results["learners"].items():
        for shots in results["config"]["test_shots"]:
            row = entry[f"{shots}shot"]
            cells = [
                f"{row[str(s)]['mse']:.3f} ± {row[str(s)]['ci95']:.3f}"
                for s in REPORT_STEPS
                if str(s) in row
            ]
            lines.append(f"| {name} | {shots} | " + " | ".join(cells) + " |")
    lines.append("")
    for name, entry in results["learners"].items():
        lines.append(
            f"{name}: meta_train_step {entry['step_ms_median']:.3f} ms median "
            f"(p10 {entry['step_ms_p10']:.3f}, p90 {entry['step_ms_p90']:.3f}), "
            f"compile {entry['compile_s']:.2f} s; training {entry['train_seconds']:.1f}"
            f" s for {entry['steps']} steps ({entry['scanned_ms_per_step']:.3f} ms/step"
            f" scanned)"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    from maml_jax.app import cli  # one-line errors and exit codes, as maml-jax

    sys.exit(cli.main(["sinusoid", *sys.argv[1:]]))
