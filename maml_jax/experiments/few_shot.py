"""N-way K-shot classification runs (Omniglot, mini-ImageNet) at paper protocol.

``train(config, data_dir, out)`` meta-trains with on-device episode sampling,
periodic validation, JSON-lines metrics, orbax checkpoints and exact resume;
``evaluate_run(run_dir)`` reports test accuracy after each inner step with 95%
confidence intervals. The ``maml-jax train`` / ``maml-jax eval`` commands call
these.

Presets follow Finn et al. (2017), Appendix A and the authors' code
(``cbfinn/maml``): loss = summed cross-entropy / K, i.e. ``ways ×`` the mean
(``loss_scale = ways``), meta-batch 32 (5-way) / 16 (20-way) on Omniglot with
1 / 5 inner steps at α = 0.4 / 0.1 and 3 / 5 test steps; mini-ImageNet with 5
inner steps at α = 0.01, 15 queries per class, meta-batch 4 / 2, 10 test steps
and gradients clipped to [−10, 10]; Adam 1e-3; 60,000 meta-steps.

Omniglot uses the Vinyals et al. split pinned in ``maml_jax.datasets`` (1028
train / 172 validation / 423 test characters, each rotated by 0/90/180/270° as
four classes): training on ``vinyals-train``, validation on ``vinyals-val``,
test on ``vinyals-test``. (The original code trains on 1100 characters from an
unpinned shuffle; we use the published split so numbers are comparable.)
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import maml_jax
from maml_jax import episodes, models, sharding
from maml_jax.checkpoint import Checkpointer
from maml_jax.experiments import sinusoid

PRESETS: dict[str, dict[str, Any]] = {
    "omniglot-5w1s": dict(
        dataset="omniglot",
        ways=5,
        shots=1,
        queries=1,
        meta_batch=32,
        inner_steps=1,
        inner_lr=0.4,
        test_inner_steps=3,
    ),
    "omniglot-5w5s": dict(
        dataset="omniglot",
        ways=5,
        shots=5,
        queries=5,
        meta_batch=32,
        inner_steps=1,
        inner_lr=0.4,
        test_inner_steps=3,
    ),
    "omniglot-20w1s": dict(
        dataset="omniglot",
        ways=20,
        shots=1,
        queries=1,
        meta_batch=16,
        inner_steps=5,
        inner_lr=0.1,
        test_inner_steps=5,
    ),
    "omniglot-20w5s": dict(
        dataset="omniglot",
        ways=20,
        shots=5,
        queries=5,
        meta_batch=16,
        inner_steps=5,
        inner_lr=0.1,
        test_inner_steps=5,
    ),
    "miniimagenet-5w1s": dict(
        dataset="miniimagenet",
        ways=5,
        shots=1,
        queries=15,
        meta_batch=4,
        inner_steps=5,
        inner_lr=0.01,
        test_inner_steps=10,
        grad_clip=10.0,
    ),
    "miniimagenet-5w5s": dict(
        dataset="miniimagenet",
        ways=5,
        shots=5,
        queries=15,
        meta_batch=2,
        inner_steps=5,
        inner_lr=0.01,
        test_inner_steps=10,
        grad_clip=10.0,
    ),
}

SPLITS = {
    "omniglot": {
        "train": "vinyals-train",
        "val": "vinyals-val",
        "test": "vinyals-test",
    },
    "miniimagenet": {"train": "train", "val": "val", "test": "test"},
}
TEST_KEY = 20170306  # fixed: the same test episodes for every run and seed
# --on-nonfinite: "stop" raises FloatingPointError at the first non-finite step;
# "skip" leaves the parameters unchanged at such a step and counts it.
ON_NONFINITE = {"stop": "raise", "skip": "skip"}


# Tasks per chunk of the CPU "scan" batching, measured on a 2-core CPU
# (benchmarks/README.md): at most 4 tasks and about 160 examples a chunk. Omniglot
# 5w1s with 1 query per class (10 examples a task): 4 fastest (162 ms; 2: 173 ms,
# 8: 171 ms); with 15 per class and max-pool (80 a task): 2 (2.36-2.51 s; 4: 2.59 s).
CPU_MAX_CHUNK_SIZE = 4
CPU_CHUNK_EXAMPLES = 160


def cpu_chunk_size(meta_batch: int, examples_per_task: int) -> int:
    """Tasks per ``scan`` chunk on CPU: the largest divisor of ``meta_batch`` up to
    ``min(CPU_MAX_CHUNK_SIZE, CPU_CHUNK_EXAMPLES // examples_per_task)`` (at least 1).
    """
    limit = min(CPU_MAX_CHUNK_SIZE, max(1, CPU_CHUNK_EXAMPLES // examples_per_task))
    return max(d for d in range(1, limit + 1) if meta_batch % d == 0)


@dataclasses.dataclass(frozen=True)
class FewShotConfig:
    """Everything that defines a few-shot run (saved as ``config.json``)."""

    preset: str
    dataset: str
    ways: int
    shots: int
    queries: int
    meta_batch: int
    inner_steps: int
    inner_lr: float
    test_inner_steps: int
    algorithm: str = "maml"
    steps: int = 60_000
    outer_lr: float = 1e-3
    grad_clip: float | None = None
    seed: int = 0
    norm: str = "transductive"
    precision: str = "float32"  # or "bfloat16": compute dtype of Conv4
    conv_impl: str | None = None  # None: "im2col" on CPU, "lax" elsewhere
    batching: str | None = None  # None: "scan" on CPU, "vmap" elsewhere
    chunk_size: int | None = None  # None: cpu_chunk_size for "scan"
    eval_every: int = 1000
    val_episodes: int = 200
    checkpoint_every: int = 1000
    steps_per_call: int = 50
    filters: int | None = None  # None: the paper's 64 (Omniglot) / 32 (mini-ImageNet)
    on_nonfinite: str = "stop"  # or "skip": skip a non-finite step and count it
    # Also log query loss/accuracy before adaptation: one more query forward a step.
    pre_adaptation_query: bool = False

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> FewShotConfig:
        if name not in PRESETS:
            raise ValueError(
                f"unknown preset {name!r}; choose from {', '.join(PRESETS)}."
            )
        fields = {
            **PRESETS[name],
            **{k: v for k, v in overrides.items() if v is not None},
        }
        config = cls(preset=name, **fields)
        config.validate()
        return config

    def validate(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(
                f"--algorithm {self.algorithm!r} is not available; choose from "
                f"{', '.join(ALGORITHMS)}."
            )
        for name in (
            "ways",
            "shots",
            "queries",
            "meta_batch",
            "inner_steps",
            "test_inner_steps",
            "val_episodes",
            "checkpoint_every",
            "steps_per_call",
            "eval_every",
        ):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"--{name.replace('_', '-')} must be >= 1; got "
                    f"{getattr(self, name)}."
                )
        if self.steps < 0:
            raise ValueError(f"--steps must be >= 0; got {self.steps}.")
        for name in ("filters", "chunk_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(
                    f"--{name.replace('_', '-')} must be >= 1; got {value}."
                )
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"--seed must be in [0, 2**32); got {self.seed}.")
        if self.conv_impl not in (None, "lax", "im2col"):
            raise ValueError(
                f"--conv-impl must be lax or im2col; got {self.conv_impl!r}."
            )
        if self.batching not in (None, *maml_jax.core.TASK_BATCHING):
            raise ValueError(
                f"--batching must be one of {', '.join(maml_jax.core.TASK_BATCHING)}; "
                f"got {self.batching!r}."
            )
        if self.on_nonfinite not in ON_NONFINITE:
            raise ValueError(
                f"--on-nonfinite must be one of {', '.join(ON_NONFINITE)}; got "
                f"{self.on_nonfinite!r}."
            )
        for name in ("inner_lr", "outer_lr"):
            value = getattr(self, name)
            if not np.isfinite(value) or value <= 0:
                raise ValueError(
                    f"--{name.replace('_', '-')} must be a finite "
                    f"number > 0; got {value}."
                )
        for name in ("checkpoint_every", "eval_every"):
            if getattr(self, name) % self.steps_per_call:
                raise ValueError(
                    f"--{name.replace('_', '-')} ({getattr(self, name)}) must be a "
                    f"multiple of --steps-per-call ({self.steps_per_call})."
                )
        if self.precision not in ("float32", "bfloat16"):
            raise ValueError("--precision must be float32 or bfloat16.")
        if self.norm not in models.NORMS:
            raise ValueError(f"--norm must be one of {models.NORMS}.")

    @property
    def spec(self) -> episodes.EpisodeSpec:
        return episodes.EpisodeSpec(
            self.ways, self.shots, self.queries, rotations=self.dataset == "omniglot"
        )

    def resolved(self, *, shard: bool = False) -> FewShotConfig:
        """Fills backend-dependent defaults (fastest measured formulation).

        With ``shard`` (tasks split over devices) the task batching is ``vmap``,
        the only one XLA can split across devices.
        """
        cpu = jax.default_backend() == "cpu"
        batching = self.batching or ("scan" if cpu and not shard else "vmap")
        chunk = self.chunk_size
        if chunk is None and batching != "vmap":
            examples = self.ways * (self.shots + self.queries)
            chunk = cpu_chunk_size(self.meta_batch, examples)
        return dataclasses.replace(
            self,
            conv_impl=self.conv_impl or ("im2col" if cpu else "lax"),
            batching=batching,
            chunk_size=chunk,
        )


class TrainingInterrupted(Exception):
    """Training stopped on SIGTERM/SIGINT after saving a checkpoint."""

    def __init__(self, signum: int, step: int, out: Path):
        self.signum, self.step = signum, step
        super().__init__(
            f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint "
            f"saved in {out / 'checkpoints'}; continue with --resume --out {out}."
        )


def load_classes(config: FewShotConfig, data_dir, split: str) -> np.ndarray:
    """The ``(num_classes, num_examples, H, W, C)`` array of one split."""
    from maml_jax import datasets

    name = SPLITS[config.dataset][split]
    if config.dataset == "omniglot":
        return datasets.omniglot_classes(data_dir, name, rotations=False)
    return datasets.load_miniimagenet(data_dir, name).images


# The gradient learners of the sinusoid protocol, plus the metric baseline.
ALGORITHMS = (*sinusoid.ALGORITHMS, "protonet")


def _make_learner(config: FewShotConfig, model, loss_fn):
    """The learner for ``config.algorithm``, with the paper-style defaults."""
    common = dict(inner_lr=config.inner_lr, num_inner_steps=config.inner_steps)
    name = config.algorithm
    if name == "maml":
        return maml_jax.maml(loss_fn, has_aux=True, **common)
    if name == "fomaml":
        return maml_jax.fomaml(loss_fn, has_aux=True, **common)
    if name == "anil":  # only the linear head adapts
        return maml_jax.anil(
            loss_fn,
            has_aux=True,
            adapt_mask=lambda p: {k: k == "head" for k in p},
            **common,
        )
    if name == "reptile":
        return maml_jax.reptile(loss_fn, has_aux=True, **common)
    if name == "meta_sgd":
        return maml_jax.meta_sgd(loss_fn, has_aux=True, **common)
    if name == "maml_plus_plus":
        return maml_jax.maml_plus_plus(
            loss_fn, has_aux=True, msl_anneal_steps=max(config.steps // 4, 1), **common
        )
    if name == "imaml":
        return maml_jax.imaml(
            loss_fn, has_aux=True, reg_lambda=2.0, cg_steps=5, **common
        )
    if name == "protonet":
        # build_learner made ``model`` headless: its features are the embedding.
        return maml_jax.protonet(
            lambda p, x: model.apply({"params": p}, x), ways=config.ways
        )
    raise ValueError(f"--algorithm must be one of {', '.join(ALGORITHMS)}.")


def build_learner(config: FewShotConfig, image_shape):
    """Model, initial params, learner and outer optimizer for ``config``."""
    omniglot = config.dataset == "omniglot"
    model = models.Conv4(
        num_classes=None if config.algorithm == "protonet" else config.ways,
        filters=config.filters or (64 if omniglot else 32),
        downsample="stride" if omniglot else "maxpool",
        head="mean" if omniglot else "flatten",
        norm=config.norm,
        conv_impl=config.conv_impl or "lax",
        dtype=None if config.precision == "float32" else jnp.bfloat16,
    )
    # Jitted: one compile instead of op-by-op dispatch (the same values).
    params = jax.jit(model.init)(
        jax.random.key(config.seed), jnp.zeros((2, *image_shape))
    )
    loss_fn = models.classification_loss(model.apply, loss_scale=config.ways)
    learner = _make_learner(config, model, loss_fn)
    tx = optax.adam(config.outer_lr)
    if config.grad_clip:
        tx = optax.chain(optax.clip(config.grad_clip), tx)
    return model, params["params"], learner, tx


# Fixed validation/test episodes, sampled in one compiled call (the same
# episodes as op-by-op sampling, seconds faster).
_sample_episodes = jax.jit(episodes.sample_episodes, static_argnums=(2, 3))


def _check_episodes_fit(config: FewShotConfig, data: np.ndarray, split: str) -> None:
    try:
        episodes.check_episode_spec(config.spec, data.shape)
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
) -> maml_jax.MetaTrainState:
    """Meta-trains (or resumes) a run in directory ``out``.

    With ``resume=True`` the run's saved configuration is used (``config`` is
    ignored and may be ``None``); ``steps`` then changes the run's length and
    ``on_nonfinite`` the policy for non-finite steps (e.g. ``"skip"`` to get
    past a step that stopped the run). A step whose meta-loss or meta-gradient
    is not finite stops training (``FloatingPointError`` naming the step and
    the last good checkpoint; none is written after it) or, with
    ``on_nonfinite="skip"``, is skipped: parameters and optimizer state stay as
    they were and ``state.skipped_steps`` (logged as ``skipped_steps``,
    checkpointed) counts it.

    With ``shard=True`` the task batch is split over every device of every
    process (``maml_jax.sharding``; call ``sharding.initialize_distributed``
    first for several processes): parameters are replicated, each device samples
    and processes its share of the tasks, and only process 0 writes the config,
    the metrics log and the plot (checkpoints are written collectively by orbax).
    """
    out = Path(out)
    config_path = out / "config.json"
    if resume:
        if not config_path.exists():
            raise FileNotFoundError(
                f"--resume: no run to resume at {out} (no config.json)."
            )
        config = FewShotConfig(**json.loads(config_path.read_text()))
    elif not isinstance(config, FewShotConfig):
        raise TypeError(
            f"config must be a FewShotConfig unless resume=True; got "
            f"{type(config).__name__}."
        )
    changes = {"steps": steps, "on_nonfinite": on_nonfinite}
    config = dataclasses.replace(
        config, **{k: v for k, v in changes.items() if v is not None}
    )
    config.validate()
    if not resume:
        if config_path.exists():
            raise FileExistsError(
                f"{out} already holds a run; pass --resume to continue it or choose "
                f"another --out."
            )
        config = config.resolved(shard=shard)
    mesh = sharding.task_mesh() if shard else None
    if mesh is not None and config.batching != "vmap":
        raise ValueError(
            f"sharding splits only batching='vmap'; this run uses "
            f"{config.batching!r} (drop --batching, or do not shard)."
        )
    primary = sharding.is_primary()
    _prepare_out(out)
    train_data = load_classes(config, data_dir, "train")
    val_data = load_classes(config, data_dir, "val")
    _check_episodes_fit(config, train_data, "train")
    _check_episodes_fit(config, val_data, "val")
    if not resume and primary:
        _write_atomic(config_path, json.dumps(dataclasses.asdict(config), indent=2))

    model, params, learner, tx = build_learner(config, train_data.shape[2:])
    state = maml_jax.MetaTrainState.create(
        params=params,
        learner=learner,
        tx=tx,
        batching=config.batching,
        chunk_size=config.chunk_size,
    )
    metrics_path = out / "metrics.jsonl"
    checkpointer = Checkpointer(out / "checkpoints", keep=3)
    if resume and checkpointer.latest_step() is not None:
        # A corrupted latest checkpoint is moved aside (logged) and the newest
        # readable one before it is resumed from: resuming is exact either way.
        restored = checkpointer.restore(
            state, config=_config_dict(config), fallback=True
        )
        state = restored.state
        if primary:
            _truncate_log(metrics_path, int(state.step))
    elif resume and primary:
        metrics_path.unlink(missing_ok=True)

    train_data = jnp.asarray(train_data)
    val_tasks = _sample_episodes(
        jax.random.key(config.seed + 1),
        jnp.asarray(val_data),
        config.spec,
        config.val_episodes,
    )
    spec, meta_batch = config.spec, config.meta_batch
    sampler = lambda key: episodes.sample_episodes(key, train_data, spec, meta_batch)
    if mesh is not None:
        state = sharding.replicate(state, mesh)
        sampler = sharding.shard_sampler(sampler, mesh)

    def eval_fn(state):
        curves = maml_jax.evaluate(
            learner,
            state.meta_params,
            val_tasks,
            num_steps=config.test_inner_steps,
            batch_size=50,
        )
        return {"val_accuracy": curves["query_accuracy"][:, -1].mean()}

    stop_signal: list[int] = []

    def save(state, record):
        step = record["step"]
        if step % config.checkpoint_every == 0 or step == config.steps or stop_signal:
            checkpointer.save(state, extra={"config": _config_dict(config)})
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
            metrics_path=metrics_path if primary else None,
            progress=progress and primary,
            callbacks=(save,),
            nonfinite=ON_NONFINITE[config.on_nonfinite],
            pre_adaptation_query=config.pre_adaptation_query,
        )
        if checkpointer.latest_step() != int(state.step):
            # No chunk ran (e.g. --steps 0): save the state anyway, so that every
            # finished run has a checkpoint of its final step to evaluate.
            checkpointer.save(state, extra={"config": _config_dict(config)})
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
        from maml_jax import plots

        plots.learning_curve(
            metrics_path,
            out / "learning_curve.png",
            title=f"{config.preset} ({config.algorithm})",
        )
    return state


def evaluate_run(
    run_dir,
    data_dir,
    *,
    split: str = "test",
    episodes_count: int = 600,
    inner_steps: int | None = None,
    batch_size: int = 50,
) -> dict:
    """Test accuracy after each inner step, mean ± 95% CI, for a trained run.

    The episodes come from a fixed key (the same for every run), so runs are
    compared on the same tasks. Writes ``<split>_results.json`` in the run.
    """
    run_dir = Path(run_dir)
    config_path = run_dir / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(
            f"--run {run_dir}: not a training run (no config.json)."
        )
    config = FewShotConfig(**json.loads(config_path.read_text()))
    if split not in SPLITS[config.dataset]:
        raise ValueError(f"--split must be one of {', '.join(SPLITS[config.dataset])}.")
    steps = config.test_inner_steps if inner_steps is None else inner_steps
    if steps < 1:
        raise ValueError(f"--inner-steps must be >= 1; got {steps}.")
    data = load_classes(config, data_dir, split)
    _check_episodes_fit(config, data, split)
    _, params, learner, tx = build_learner(config, data.shape[2:])
    template = maml_jax.MetaTrainState.create(params=params, learner=learner, tx=tx)
    with Checkpointer(run_dir / "checkpoints") as checkpointer:
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
    )
    summary = maml_jax.summarize_curves(
        {"accuracy": curves["query_accuracy"], "loss": curves["query_loss"]}
    )
    device = jax.devices()[0]
    results = {
        "command": " ".join(["maml-jax", *sys.argv[1:]]),
        "run": str(run_dir),
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


def _config_dict(config: FewShotConfig) -> dict:
    """The fields a checkpoint must agree on (the run length may change)."""
    fields = dataclasses.asdict(config)
    # Free: the run length, what and how often is logged, and the non-finite
    # policy (it does not change the state's structure).
    for free in (
        "steps",
        "eval_every",
        "val_episodes",
        "checkpoint_every",
        "on_nonfinite",
        "pre_adaptation_query",
    ):
        fields.pop(free)
    return fields


def _prepare_out(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise OSError(f"--out {out} is not writable: {error.strerror}.") from None
    if not shutil.disk_usage(out).free:
        raise OSError(f"--out {out}: the disk is full.")


def _truncate_log(path: Path, step: int) -> None:
    """Drops log records after ``step`` so a resumed log has every step once.

    A line cut short by a crash (the only place one can be is the end) is dropped.
    """
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record["step"] <= step:
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
