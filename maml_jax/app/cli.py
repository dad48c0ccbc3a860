"""The ``maml-jax`` command line.

* ``maml-jax train --preset omniglot-5w1s --data-dir DIR --out runs/NAME`` —
  meta-train a few-shot classifier (progress bar, validation, metrics, plots,
  checkpoints; the same line with ``--resume``, or just ``--resume --out
  runs/NAME``, continues a stopped run exactly).
* ``maml-jax eval --run runs/NAME`` — test accuracy ± 95% CI (on the data folder
  the run recorded, unless ``--data-dir`` is given).
* ``maml-jax sinusoid [options]`` — the MAML paper's sinusoid regression.
* ``maml-jax reproduce --omniglot-dir DIR --out DIR`` — the papers' few-shot
  tables, one resumable run folder per row (``maml_jax.app.reproduce``).

Errors in what the user gave (a bad option, a missing or unreadable file, a size
that cannot fit in memory) print one line and exit with status 2 (``--debug``
shows the traceback); so does a non-finite meta-loss or meta-gradient during
``train`` unless ``--on-nonfinite skip`` skips such steps and counts them.
SIGTERM or SIGINT during ``train`` finishes the current chunk of steps, saves a
checkpoint and exits with status 128 + signal number (143 / 130) and a one-line
message; ``--resume`` continues exactly. SIGINT at any other time (start-up,
``eval``, ``sinusoid``) prints one line and exits with status 130.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

EXIT_USAGE = 2
EXIT_INTERRUPTED = 128 + 2  # SIGINT

COMMANDS = ("train", "eval", "sinusoid", "reproduce")
# What bad input, files and sizes raise. Anything else, and a RuntimeError that
# is neither a corrupt checkpoint nor XLA running out of memory, is a bug and
# shows its traceback.
EXPECTED_ERRORS = (
    ValueError,
    TypeError,
    OSError,  # FileNotFoundError, FileExistsError, PermissionError, ...
    ArithmeticError,  # FloatingPointError, OverflowError, ZeroDivisionError
    MemoryError,
    RuntimeError,
)


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _debug_flag(parser) -> None:
    parser.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show the full traceback on errors",
    )


def _train_parser(sub) -> None:
    from maml_jax.app.learners import ALGORITHMS, NORMS
    from maml_jax.app.presets import FREE_ON_RESUME, PRESETS
    from maml_jax.ops import CONV_IMPLS

    p = sub.add_parser("train", help="meta-train a few-shot classifier")
    _debug_flag(p)
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="required for a new run; with --resume, the run's",
    )
    p.add_argument(
        "--shard",
        action="store_true",
        help="split the task batch over all devices (task batching vmap)",
    )
    p.add_argument(
        "--distributed",
        action="store_true",
        help="initialise jax.distributed from MAML_JAX_COORDINATOR, "
        "MAML_JAX_NUM_PROCESSES, MAML_JAX_PROCESS_ID (or the JAX_* names) and "
        "shard over the devices of every process",
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        help="folder with the dataset files (e.g. Omniglot's zips); required for "
        "a new run, recorded in it; with --resume, default: the recorded one",
    )
    p.add_argument("--out", type=Path, required=True, help="run directory")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last checkpoint; other options "
        "must equal its saved configuration, except "
        + ", ".join(f"--{_flag(name)}" for name in FREE_ON_RESUME)
        + " and --data-dir",
    )
    p.add_argument("--no-progress", action="store_true")
    for name, kind in (
        ("steps", int),
        ("ways", int),
        ("shots", int),
        ("queries", int),
        ("meta-batch", int),
        ("inner-steps", int),
        ("inner-lr", float),
        ("test-inner-steps", int),
        ("outer-lr", float),
        ("seed", int),
        ("eval-every", int),
        ("val-episodes", int),
        ("checkpoint-every", int),
        ("steps-per-call", int),
        ("chunk-size", int),
        ("filters", int),
    ):
        p.add_argument(f"--{name}", type=kind)
    p.add_argument("--algorithm", choices=ALGORITHMS)
    p.add_argument(
        "--norm",
        choices=NORMS,
        help="Conv4's normalisation (running: batch norm with running averages, "
        "used for the query set at test time; running-query: the same, with the "
        "query pass also meta-trained on the running averages; per-step: one set "
        "of running averages and norm weights per inner step, as MAML++'s "
        "BNRS/BNWB; support: each query image normalised with the adapted "
        "model's support-set statistics, in meta-training and at test)",
    )
    p.add_argument("--conv-impl", choices=CONV_IMPLS)
    p.add_argument(
        "--precision",
        choices=("float32", "bfloat16"),
        help="compute dtype (bfloat16: mixed precision, float32 parameters)",
    )
    p.add_argument("--batching", choices=("auto", "vmap", "scan", "unroll"))
    p.add_argument(
        "--no-autotune",
        action="store_true",
        help="a new CPU run without --batching/--chunk-size takes the chunk size "
        "from a fixed rule instead of timing the candidates on one batch (the "
        "timing is cached per machine and program; also $MAML_JAX_AUTOTUNE=0)",
    )
    p.add_argument(
        "--on-nonfinite",
        choices=("stop", "skip"),
        help="a step with a NaN/inf meta-loss or meta-gradient: stop training "
        "(default; names the step and the last good checkpoint) or skip its update "
        "and count it (skipped_steps in the log); may change on --resume",
    )
    p.add_argument(
        "--pre-adaptation-query",
        action="store_const",
        const=True,
        help="also log query loss and accuracy before adaptation (one more forward "
        "pass over every query set per step; off by default)",
    )


def _eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="test accuracy of a trained run")
    _debug_flag(p)
    p.add_argument("--run", type=Path, required=True)
    p.add_argument(
        "--data-dir", type=Path, help="default: the data folder the run recorded"
    )
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--episodes", type=int, default=600)
    p.add_argument("--inner-steps", type=int, help="default: the preset's test steps")


def _run_train(args) -> None:
    from maml_jax.app import precision, presets, runs

    overrides = {
        k: v
        for k, v in vars(args).items()
        if k
        not in (
            "command",
            "preset",
            "data_dir",
            "out",
            "resume",
            "no_progress",
            "no_autotune",
            "debug",
            "shard",
            "distributed",
        )
    }
    shard = args.shard or args.distributed
    if args.resume:
        _check_resume_options(args, overrides, shard=shard)
        config = None
    else:
        if args.preset is None:
            raise ValueError("--preset is required for a new run.")
        if args.data_dir is None:
            raise ValueError("--data-dir is required for a new run.")
        config = presets.FewShotConfig.from_preset(args.preset, **overrides)
        config, notice = precision.resolve(config)
        if notice:
            print(notice, file=sys.stderr)
    if args.data_dir is not None and not args.data_dir.is_dir():
        raise FileNotFoundError(
            f"--data-dir {args.data_dir} does not exist or is not a folder."
        )
    if args.distributed:
        from maml_jax import sharding

        sharding.initialize_distributed()
    changes = {name: overrides[name] for name in presets.FREE_ON_RESUME}
    state = runs.train(
        config,
        args.data_dir,
        args.out,
        resume=args.resume,
        progress=not args.no_progress,
        shard=shard,
        autotune=False if args.no_autotune else None,
        **(changes if args.resume else {}),
    )
    skipped = int(state.skipped_steps)
    note = f" ({skipped} non-finite steps skipped)" if skipped else ""
    print(f"trained to step {int(state.step)}{note}; run directory {args.out}")


def _check_resume_options(args, overrides: dict, *, shard: bool) -> None:
    """Accepts the run's original command line with ``--resume``: refuses only
    options whose value differs from the saved configuration, naming each."""
    from maml_jax.app import presets, runs

    saved = runs.load_config(args.out, flag="--resume")
    given = {
        k: v
        for k, v in overrides.items()
        if v is not None and k not in presets.FREE_ON_RESUME
    }
    # Validated and with "auto" resolved as a new run of these options would be.
    wanted = presets.FewShotConfig.from_preset(args.preset or saved.preset, **given)
    wanted = wanted.resolved(shard=shard)
    names = (["preset"] if args.preset is not None else []) + list(given)
    differing = []
    for name in names:
        old, new = getattr(saved, name), getattr(wanted, name)
        if old == new:
            continue
        raw = args.preset if name == "preset" else given[name]
        shown = f"{raw}" if raw == new else f"{raw}, i.e. {new} here"
        differing.append(f"--{_flag(name)} (saved {old}, given {shown})")
    if differing:
        free = ", ".join(f"--{_flag(name)}" for name in presets.FREE_ON_RESUME)
        raise ValueError(
            f"--resume continues the run in {args.out} with its saved "
            f"configuration, and these options differ from it: "
            f"{'; '.join(differing)}. Drop them or train a new run (only "
            f"{free} and --data-dir may change on --resume)."
        )


def _run_eval(args) -> None:
    from maml_jax.app import options, runs

    options.check_range("--episodes", args.episodes, 2, options.MAX_EPISODES)
    results = runs.evaluate_run(
        args.run,
        args.data_dir,
        split=args.split,
        episodes_count=args.episodes,
        inner_steps=args.inner_steps,
    )
    print(runs.format_results(results))


def main(argv: list[str] | None = None) -> int:
    """Runs the command in ``argv`` (default ``sys.argv[1:]``); the exit status.

    Without ``argv`` this is the process's entry point, and after an interrupt
    the process ends at once (see ``_leave``).
    """
    entry = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    prog = "maml-jax" if command not in COMMANDS else f"maml-jax {command}"
    debug = "--debug" in argv
    try:
        return _main(argv, prog)
    except KeyboardInterrupt:
        # SIGINT outside train's handler (start-up, eval, sinusoid): nothing to
        # save, so one line instead of a traceback from wherever it landed.
        if debug:
            raise
        print(f"{prog}: interrupted (SIGINT).", file=sys.stderr)
        if entry:
            _leave(EXIT_INTERRUPTED)
        return EXIT_INTERRUPTED
    except EXPECTED_ERRORS as error:
        line = None if debug else _error_line(error)
        if line is None:
            raise
        print(f"{prog}: error: {line}", file=sys.stderr)
        return EXIT_USAGE


def _leave(status: int) -> None:
    """Ends the process now, without the interpreter's teardown.

    An interrupt can land while XLA's threads still work (a compile, a
    transfer); tearing the interpreter down under them has crashed with SIGSEGV.
    Every ``finally`` has run by now (logs closed, files replaced atomically),
    so only exit hooks are skipped, as after a signal.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _error_line(error: BaseException) -> str | None:
    """The one line an expected error prints, or ``None`` for a bug."""
    from maml_jax.checkpoint import CorruptCheckpointError

    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, MemoryError) or (
        isinstance(error, RuntimeError) and "RESOURCE_EXHAUSTED" in text
    ):
        return f"out of memory ({text[:300]}); use smaller sizes (see --help)."
    if isinstance(error, RuntimeError) and not isinstance(
        error, CorruptCheckpointError
    ):
        return None
    return text


def _main(argv: list[str], prog: str) -> int:
    # Everything that imports jax runs in here, inside main's handlers.
    from maml_jax.app import options

    if argv and argv[0] == "sinusoid":
        from maml_jax.app import sinusoid

        sinusoid.main(argv[1:])
        return 0
    if argv and argv[0] == "reproduce":
        return _run_reproduce(argv[1:], prog)
    parser = options.ArgumentParser(prog="maml-jax", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--debug", action="store_true", help="show the full traceback on errors"
    )
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="{train,eval,sinusoid,reproduce}"
    )
    _train_parser(sub)
    _eval_parser(sub)
    sub.add_parser("sinusoid", help="sinusoid regression (maml-jax sinusoid --help)")
    sub.add_parser(
        "reproduce", help="the papers' tables, resumable (maml-jax reproduce --help)"
    )
    args = parser.parse_args(argv)
    from maml_jax.app.runs import TrainingInterrupted

    try:
        {"train": _run_train, "eval": _run_eval}[args.command](args)
    except TrainingInterrupted as stopped:
        print(f"{prog}: {stopped}", file=sys.stderr)
        return 128 + stopped.signum
    return 0


def _run_reproduce(argv: list[str], prog: str) -> int:
    from maml_jax.app import reproduce
    from maml_jax.app.runs import TrainingInterrupted

    try:
        reproduce.main(argv)
    except TrainingInterrupted as stopped:
        print(
            f"{prog}: {stopped} Or run the same reproduce command again.",
            file=sys.stderr,
        )
        return 128 + stopped.signum
    return 0


if __name__ == "__main__":
    sys.exit(main())
