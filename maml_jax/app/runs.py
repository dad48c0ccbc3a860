"""Few-shot run folders: train, resume exactly, stop on a signal, evaluate.

``train(config, data_dir, out)`` meta-trains with on-device episode sampling,
periodic validation, JSON-lines metrics, orbax checkpoints and exact resume;
``evaluate_run(run_dir)`` reports test accuracy after each inner step with 95%
confidence intervals. The ``maml-jax train`` / ``maml-jax eval`` commands call
these. A run folder holds ``config.json`` (which records the data folder, the
default of ``evaluate_run`` and of a resume), ``metrics.jsonl``,
``checkpoints/``, ``learning_curve.png``, ``<split>_results.json`` and
``train.lock``: ``train`` holds an exclusive lock on it (``run_lock``), so a
folder has one writer at a time; ``evaluate_run`` opens the checkpoints
read-only, so it can evaluate a run that is still training. SIGTERM or SIGINT
during ``train`` finishes the current chunk of steps, saves a checkpoint and
raises ``TrainingInterrupted``; a resumed run continues exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import maml_jax
from maml_jax import episodes, sharding
from maml_jax.app import options, run_lock
from maml_jax.app.learners import build_learner
from maml_jax.app.presets import (
    ON_NONFINITE,
    PROTOCOL_DEFAULTS,
    SPLITS,
    FewShotConfig,
)
from maml_jax.checkpoint import Checkpointer

TEST_KEY = 20170306  # fixed: the same test episodes for every run and seed


class TrainingInterrupted(Exception):
    """Training stopped on SIGTERM/SIGINT after saving a checkpoint."""

    def __init__(self, signum: int, step: int, out: Path):
        self.signum, self.step = signum, step
        super().__init__(
            f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint "
            f"saved in {out / 'checkpoints'}; continue with --resume --out {out}."
        )


def load_config(run_dir, *, flag: str = "--run") -> FewShotConfig:
    """The configuration a run saved in ``<run_dir>/config.json``."""
    path = Path(run_dir) / "config.json"
    if not path.exists():
        what = "no run to resume" if flag == "--resume" else "not a training run"
        raise FileNotFoundError(f"{flag} {run_dir}: {what} (no config.json).")
    return FewShotConfig.load(path)


def data_folder(config: FewShotConfig, data_dir, run_dir=None) -> Path:
    """``data_dir`` if given, else the folder recorded in ``config``; checked to exist.

    Returned absolute (links are kept, not resolved), as ``train`` records it.
    ``run_dir`` names the run whose ``config.json`` recorded the folder (``None``
    for a new run).
    """
    if data_dir is not None:
        path = Path(data_dir)
        if not path.is_dir():
            raise FileNotFoundError(
                f"--data-dir {path} does not exist or is not a folder."
            )
        return Path(os.path.abspath(path))
    where = "the configuration"
    if run_dir is not None:
        where = str(Path(run_dir) / "config.json")
    if config.data_dir is None:
        if run_dir is None:
            raise ValueError("--data-dir is required for a new run.")
        raise ValueError(
            f"--data-dir is required: {where} records no data folder (the run "
            f"was written before data folders were recorded)."
        )
    path = Path(config.data_dir)
    if not path.is_dir():
        raise FileNotFoundError(
            f"the data folder recorded in {where}, {path}, no longer exists; "
            f"pass --data-dir."
        )
    return path


def load_classes(config: FewShotConfig, data_dir, split: str) -> np.ndarray:
    """The ``(num_classes, num_examples, H, W, C)`` array of one split."""
    from maml_jax import datasets

    name = SPLITS[config.dataset][split]
    if config.dataset == "omniglot":
        return datasets.omniglot_classes(data_dir, name, rotations=False)
    return datasets.load_miniimagenet(data_dir, name).images


# Fixed validation/test episodes, sampled in one compiled call rather than op by
# op (the same episodes, without dispatching every op from Python).
_sample_episodes = jax.jit(episodes.sample_episodes, static_argnums=(2, 3))


def _check_episodes_fit(
    config: FewShotConfig, data: np.ndarray, split: str, spec=None
) -> None:
    try:
        episodes.check_episode_spec(spec or config.spec, data.shape)
    except ValueError as error:
        raise ValueError(f"{config.dataset} {split} split: {error}") from None


def train(
    config: FewShotConfig | None,
    data_dir,
    out,
    *,
    resume: bool = False,
    steps: int | None = None,
    progress: bool = True,
    shard: bool = False,
    on_nonfinite: str | None = None,
    steps_per_call: int | None = None,
    eval_every: int | None = None,
    checkpoint_every: int | None = None,
    autotune: bool | None = None,
) -> maml_jax.MetaTrainState:
    """Meta-trains (or resumes) a run in directory ``out``.

    ``data_dir`` is recorded (absolute) in ``config.json``. With
    ``resume=True`` the run's saved configuration is used (``config`` is
    ignored and may be ``None``), and ``data_dir=None`` means the recorded
    folder (a different ``data_dir`` is recorded in its place). ``steps``,
    ``on_nonfinite``, ``steps_per_call``, ``eval_every`` and
    ``checkpoint_every`` (``presets.FREE_ON_RESUME``), when given, override the
    configuration for this call, e.g. ``steps`` to lengthen a run or
    ``on_nonfinite="skip"`` to get past a step that stopped it; ``config.json``
    keeps the saved values. Chunks of steps end at every multiple of
    ``eval_every`` and of ``checkpoint_every``, so validation and checkpoints
    come at those steps for any ``steps_per_call``, which only sets the longest
    chunk (how often the host looks in, and how soon a signal is handled).

    A step whose meta-loss or meta-gradient is not finite stops training
    (``FloatingPointError`` naming the step and the last good checkpoint; none
    is written after it) or, with ``on_nonfinite="skip"``, is skipped:
    parameters and optimizer state stay as they were and
    ``state.skipped_steps`` (logged as ``skipped_steps``, checkpointed) counts
    it.

    With ``shard=True`` the task batch is split over every device of every
    process (``maml_jax.sharding``; call ``sharding.initialize_distributed``
    first for several processes): parameters are replicated, each device samples
    and processes its share of the tasks, and only process 0 writes the config,
    the metrics log and the plot (checkpoints are written collectively by orbax).

    A new run on CPU whose configuration leaves ``batching`` and ``chunk_size``
    open measures the chunk size (``maml_jax.autotune.tune_batching`` on one
    training batch; ``autotune=False``, or ``$MAML_JAX_AUTOTUNE=0``, takes
    ``core.auto_batching``'s rule instead). ``config.json`` records the choice
    (``chunk_size``, ``batching_choice``) and ``autotune.json`` the timings; a
    resumed run keeps the recorded choice.

    The whole configuration is validated before anything is written in ``out``;
    then (process 0) takes ``out``'s lock for the whole training
    (``run_lock.RunLockedError`` if another ``train`` holds it).
    """
    out = Path(out)
    config_path = out / "config.json"
    changes = {
        "steps": steps,
        "on_nonfinite": on_nonfinite,
        "steps_per_call": steps_per_call,
        "eval_every": eval_every,
        "checkpoint_every": checkpoint_every,
    }
    changes = {k: v for k, v in changes.items() if v is not None}
    if resume:
        # config.json keeps the saved configuration (this call's changes are
        # for this call only) and the data folder last trained on.
        recorded = load_config(out, flag="--resume")
        config = dataclasses.replace(recorded, **changes)
    elif not isinstance(config, FewShotConfig):
        raise TypeError(
            f"config must be a FewShotConfig unless resume=True; got "
            f"{type(config).__name__}."
        )
    else:
        config = dataclasses.replace(config, **changes)
    config.validate()
    data_dir = data_folder(config, data_dir, out if resume else None)
    tune = False
    if not resume:
        given = config.batching not in (None, "auto") or config.chunk_size is not None
        recorded = config = config.resolved(shard=shard)
        config.validate()  # what "auto" resolved to, e.g. the chunk size
        choice = "given" if given else "rule"
        recorded = config = dataclasses.replace(config, batching_choice=choice)
        tune = not given and config.batching == "scan" and autotune is not False
    write_config = not resume or recorded.data_dir != str(data_dir)
    recorded = dataclasses.replace(recorded, data_dir=str(data_dir))
    config = dataclasses.replace(config, data_dir=str(data_dir))
    mesh = sharding.task_mesh() if shard else None
    if mesh is not None and config.batching != "vmap":
        raise ValueError(
            f"sharding splits only batching='vmap'; this run uses "
            f"{config.batching!r} (drop --batching, or do not shard)."
        )
    if mesh is not None and config.meta_batch % mesh.size:
        raise ValueError(
            f"--meta-batch ({config.meta_batch}) must be a multiple of the "
            f"{mesh.size} devices the tasks are split over."
        )
    primary = sharding.is_primary()
    _prepare_out(out)
    # One writer per run folder: lock it before writing anything in it, and
    # only then look for an existing run (two trains cannot both find none).
    with run_lock.hold(out) if primary else contextlib.nullcontext():
        if not resume and config_path.exists():
            raise FileExistsError(
                f"{out} already holds a run; pass --resume to continue it or choose "
                f"another --out."
            )
        return _train_locked(
            config,
            recorded,
            data_dir,
            out,
            resume=resume,
            write_config=write_config,
            progress=progress,
            mesh=mesh,
            tune=tune,
        )


def _train_locked(
    config: FewShotConfig,
    recorded: FewShotConfig,
    data_dir,
    out: Path,
    *,
    resume: bool,
    write_config: bool,
    progress: bool,
    mesh,
    tune: bool = False,
) -> maml_jax.MetaTrainState:
    """``train`` once ``config`` is valid and ``out`` is locked.

    ``recorded`` is what ``config.json`` holds (without this call's changes);
    ``tune``: measure the chunk size (a new CPU run that left it open).
    """
    config_path = out / "config.json"
    primary = sharding.is_primary()
    train_data = load_classes(config, data_dir, "train")
    val_data = load_classes(config, data_dir, "val")
    _check_episodes_fit(config, train_data, "train", config.train_spec)
    _check_episodes_fit(config, val_data, "val")

    # The training learner is built for the training episodes (ProtoNets trains
    # 60-way and tests 5-way); validation uses one built for the test episodes.
    model, params, learner, tx, model_state = build_learner(
        config.for_training(), train_data.shape[2:]
    )
    eval_learner = learner
    if config.for_training() is not config:
        eval_learner = build_learner(config, train_data.shape[2:])[2]
    state = maml_jax.MetaTrainState.create(
        params=params,
        learner=learner,
        tx=tx,
        batching=config.batching,
        chunk_size=config.chunk_size,
        model_state=model_state,
    )
    train_data = jnp.asarray(train_data)
    if tune:
        choice = maml_jax.autotune.tune_batching(
            learner,
            state.meta_params,
            episodes.sample_episodes(
                jax.random.key(config.seed),
                train_data,
                config.train_spec,
                config.meta_batch,
            ),
            state=state.model_state,
            outer_step=state.step,
        )
        chosen = dict(
            batching=choice.batching,
            chunk_size=choice.chunk_size,
            batching_choice=choice.source,
        )
        config = dataclasses.replace(config, **chosen)
        recorded = dataclasses.replace(recorded, **chosen)
        state = state.replace(batching=choice.batching, chunk_size=choice.chunk_size)
        if primary and choice.source != "rule":
            _write_atomic(out / "autotune.json", json.dumps(choice.as_dict(), indent=2))
            print(_tuned_line(choice), file=sys.stderr)
    if write_config and primary:  # the run exists once all of it is known to work
        _write_atomic(config_path, json.dumps(dataclasses.asdict(recorded), indent=2))
    metrics_path = out / "metrics.jsonl"
    checkpointer = Checkpointer(out / "checkpoints", keep=3)
    if resume and checkpointer.latest_step() is not None:
        # A corrupted latest checkpoint is moved aside (logged) and the newest
        # readable one before it is resumed from: resuming is exact either way.
        restored = checkpointer.restore(
            state, config=_config_dict(recorded), fallback=True
        )
        state = restored.state
        if primary:
            _truncate_log(metrics_path, int(state.step))
    elif resume and primary:
        metrics_path.unlink(missing_ok=True)

    val_tasks = _sample_episodes(
        jax.random.key(config.seed + 1),
        jnp.asarray(val_data),
        config.spec,
        config.val_episodes,
    )
    spec, meta_batch = config.train_spec, config.meta_batch
    sampler = lambda key: episodes.sample_episodes(key, train_data, spec, meta_batch)
    if mesh is not None:
        state = sharding.replicate(state, mesh)
        sampler = sharding.shard_sampler(sampler, mesh)

    def eval_fn(state):
        curves = maml_jax.evaluate(
            eval_learner,
            state.meta_params,
            val_tasks,
            num_steps=config.test_inner_steps,
            batch_size=50,
            state=state.model_state,
        )
        return {"val_accuracy": curves["query_accuracy"][:, -1].mean()}

    stop_signal: list[int] = []

    def save(state, record):
        step = record["step"]
        if step % config.checkpoint_every == 0 or step == config.steps or stop_signal:
            checkpointer.save(state, extra={"config": _config_dict(recorded)})
        if stop_signal:
            raise maml_jax.train.StopTraining

    def request_stop(signum, frame):
        stop_signal.append(signum)

    handlers = {
        sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        state = maml_jax.fit(
            state,
            sampler,
            key=jax.random.key(config.seed),
            num_steps=config.steps,
            steps_per_call=config.steps_per_call,
            eval_fn=eval_fn,
            eval_every=config.eval_every,
            stop_every=(config.checkpoint_every,),
            metrics_path=metrics_path if primary else None,
            progress=progress and primary,
            callbacks=(save,),
            nonfinite=ON_NONFINITE[config.on_nonfinite],
            pre_adaptation_query=config.pre_adaptation_query,
        )
        if checkpointer.latest_step() != int(state.step):
            # No chunk ran (e.g. --steps 0): save the state anyway, so that every
            # finished run has a checkpoint of its final step to evaluate.
            checkpointer.save(state, extra={"config": _config_dict(recorded)})
    except FloatingPointError as error:
        last = checkpointer.latest_step()
        where = (
            f"the last good checkpoint is step {last} in {out / 'checkpoints'}"
            if last is not None
            else "no checkpoint was written yet"
        )
        raise FloatingPointError(f"{error} Training stopped; {where}.") from None
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        checkpointer.close()
    if stop_signal:
        raise TrainingInterrupted(stop_signal[0], int(state.step), out)
    if primary:
        from maml_jax.app import plots

        plots.learning_curve(
            metrics_path,
            out / "learning_curve.png",
            title=f"{config.preset} ({config.algorithm})",
        )
    return state


def evaluate_run(
    run_dir,
    data_dir=None,
    *,
    split: str = "test",
    episodes_count: int = 600,
    inner_steps: int | None = None,
    batch_size: int = 50,
) -> dict:
    """Test accuracy after each inner step, mean ± 95% CI, for a trained run.

    The episodes come from a fixed key (the same for every run), so runs are
    compared on the same tasks. ``data_dir=None`` reads the data folder the run
    recorded. Writes ``<split>_results.json`` in the run.
    """
    run_dir = Path(run_dir)
    config = load_config(run_dir)
    if split not in SPLITS[config.dataset]:
        raise ValueError(f"--split must be one of {', '.join(SPLITS[config.dataset])}.")
    steps = config.test_inner_steps if inner_steps is None else inner_steps
    options.check_range("--inner-steps", steps, 1, options.MAX_TEST_INNER_STEPS)
    config.check_episodes_memory("--episodes", episodes_count)
    data_dir = data_folder(config, data_dir, run_dir)
    data = load_classes(config, data_dir, split)
    _check_episodes_fit(config, data, split)
    _, params, learner, tx, model_state = build_learner(config, data.shape[2:])
    template = maml_jax.MetaTrainState.create(
        params=params, learner=learner, tx=tx, model_state=model_state
    )
    # Read-only: the run may still be training (and saving) in another process.
    with Checkpointer(run_dir / "checkpoints", read_only=True) as checkpointer:
        if checkpointer.latest_step() is None:
            raise FileNotFoundError(f"--run {run_dir}: no checkpoint to evaluate.")
        restored = checkpointer.restore(template, config=_config_dict(config))
    tasks = _sample_episodes(
        jax.random.key(TEST_KEY), jnp.asarray(data), config.spec, episodes_count
    )
    t0 = time.perf_counter()
    curves = maml_jax.evaluate(
        learner,
        restored.state.meta_params,
        tasks,
        num_steps=steps,
        batch_size=batch_size,
        state=restored.state.model_state,
    )
    summary = maml_jax.summarize_curves(
        {"accuracy": curves["query_accuracy"], "loss": curves["query_loss"]}
    )
    device = jax.devices()[0]
    results = {
        "command": " ".join(["maml-jax", *sys.argv[1:]]),
        "run": str(run_dir),
        "data_dir": str(data_dir),
        "preset": config.preset,
        "algorithm": config.algorithm,
        "split": split,
        "episodes": episodes_count,
        "episode_key": TEST_KEY,
        "seed": config.seed,
        "trained_steps": restored.step,
        "skipped_steps": int(restored.state.skipped_steps),
        "inner_steps": steps,
        "accuracy": summary["accuracy"],
        "accuracy_ci95": summary["accuracy_ci95"],
        "loss": summary["loss"],
        "eval_seconds": time.perf_counter() - t0,
        "versions": {
            "python": platform.python_version(),
            "jax": jax.__version__,
            "maml_jax": maml_jax.__version__,
        },
        "device": f"{device.platform}: {device.device_kind}",
    }
    _write_atomic(run_dir / f"{split}_results.json", json.dumps(results, indent=2))
    return results


def format_results(results: dict) -> str:
    lines = [
        f"{results['preset']} ({results['algorithm']}), {results['split']} split, "
        f"{results['episodes']} episodes, checkpoint step "
        f"{results['trained_steps']}",
        "| inner steps | accuracy (%) | 95% CI |",
        "|---|---|---|",
    ]
    for step, (acc, ci) in enumerate(
        zip(results["accuracy"], results["accuracy_ci95"], strict=True)
    ):
        lines.append(f"| {step} | {100 * acc:.2f} | ± {100 * ci:.2f} |")
    return "\n".join(lines)


def _tuned_line(choice) -> str:
    """One line: what was measured (or found cached) and chosen."""
    times = ", ".join(
        f"{chunk}: {seconds * 1e3:.0f} ms"
        for chunk, seconds in choice.step_seconds.items()
    )
    how = "measured" if choice.source == "measured" else "cached for this machine"
    return (
        f"task batching: scan in chunks of {choice.chunk_size} tasks, the fastest "
        f"meta-gradient of chunk sizes {times} ({how}; --no-autotune uses a fixed "
        f"rule)."
    )


def _config_dict(config: FewShotConfig) -> dict:
    """The fields a checkpoint must agree on (the run length may change).

    Pass the configuration as saved in ``config.json``: ``steps_per_call`` is
    kept (checkpoints written before it was free hold it), so a resume's
    ``steps_per_call`` must not reach this dict.
    """
    fields = dataclasses.asdict(config)
    # A protocol field at its default is left out: checkpoints written before it
    # existed do not hold it.
    for name, default in PROTOCOL_DEFAULTS.items():
        if fields[name] == default:
            fields.pop(name)
    # Free: the run length, what and how often is logged, the non-finite
    # policy (it does not change the state's structure) and where the data is.
    for free in (
        "steps",
        "eval_every",
        "val_episodes",
        "checkpoint_every",
        "on_nonfinite",
        "pre_adaptation_query",
        "data_dir",
        "batching_choice",
    ):
        fields.pop(free)
    return fields


def _prepare_out(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        # A unique name: another process may be probing the same folder.
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as error:
        raise OSError(f"--out {out} is not writable: {error.strerror}.") from None
    if not shutil.disk_usage(out).free:
        raise OSError(f"--out {out}: the disk is full.")


def _truncate_log(path: Path, step: int) -> None:
    """Drops log records after ``step`` so a resumed log has every step once.

    A line cut short by a crash (the only place one can be is the end) is dropped;
    a record without an integer ``step`` is a ``ValueError`` (the log is not one
    ``train`` wrote, and dropping it would lose what it holds).
    """
    if not path.exists():
        return
    kept = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        logged = record.get("step") if isinstance(record, dict) else None
        if isinstance(logged, bool) or not isinstance(logged, int):
            raise ValueError(
                f"{path} line {number} has no integer 'step', so the log cannot be "
                f"cut back to the checkpoint's step {step}; fix or remove that line "
                f"(or the whole log) and resume again."
            )
        if logged <= step:
            kept.append(line)
    _write_atomic(path, "".join(line + "\n" for line in kept))


def _write_atomic(path: Path, text: str) -> None:
    """Writes ``text`` to ``path`` so that a crash leaves the old file or the new."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
