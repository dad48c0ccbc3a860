"""Few-shot classification presets (Omniglot, mini-ImageNet) at paper protocol.

``FewShotConfig.from_preset(name, **overrides)`` is everything that defines a
run, validated; ``maml_jax.app.runs`` trains and evaluates it.

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

Every other learner's own protocol (``reptile-omniglot-5w1s``,
``protonet-omniglot-5w1s``, ...) is in ``maml_jax.app.family_presets``, each value
with its source; ``maml-omniglot-5w1s`` etc. are aliases of the MAML presets here.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np

import maml_jax
from maml_jax import core, episodes, ops
from maml_jax.app import family_presets, options, protocol
from maml_jax.app.learners import (
    ALGORITHMS,
    NORMS,
    PER_STEP_NORM_ALGORITHMS,
    QUERY_INFERENCE_NORMS,
    RUNNING_QUERY_ALGORITHMS,
    STATEFUL_NORMS,
)

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

# The MAML paper's protocols under the learner-prefixed names of the family.
PRESETS.update({f"maml-{name}": PRESETS[name] for name in list(PRESETS)})
PRESETS.update(family_presets.PRESETS)

SPLITS = {
    "omniglot": {
        "train": "vinyals-train",
        "val": "vinyals-val",
        "test": "vinyals-test",
    },
    "miniimagenet": {"train": "train", "val": "val", "test": "test"},
}
# Each dataset's images as the runs load them (float32).
IMAGE_SHAPES = {"omniglot": (28, 28, 1), "miniimagenet": (84, 84, 3)}

# --on-nonfinite: "stop" raises FloatingPointError at the first non-finite step;
# "skip" leaves the parameters unchanged at such a step and counts it.
ON_NONFINITE = {"stop": "raise", "skip": "skip"}
# What `train --resume` may change (besides the data folder): the run's length, the
# non-finite policy, and when the state is logged, evaluated and saved (training
# is the same bit for bit whatever the chunking); the rest must equal the saved.
FREE_ON_RESUME = (
    "steps",
    "on_nonfinite",
    "steps_per_call",
    "eval_every",
    "checkpoint_every",
)


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
    norm: str = "transductive"  # one of NORMS
    precision: str = "float32"  # or "bfloat16": compute dtype of Conv4
    conv_impl: str | None = None  # None: ops.resolve_conv_impl("auto")
    batching: str | None = None  # None: "scan" on CPU, "vmap" elsewhere
    chunk_size: int | None = None  # None: measured by `train` (maml_jax.autotune)
    # How `train` chose batching and chunk_size: "given" (options), "measured" or
    # "cache" (maml_jax.autotune), "rule" (core.auto_batching's; None in runs
    # written before it was recorded).
    batching_choice: str | None = None
    eval_every: int = 1000
    val_episodes: int = 200
    checkpoint_every: int = 1000
    steps_per_call: int = 50
    filters: int | None = None  # None: the paper's 64 (Omniglot) / 32 (mini-ImageNet)
    on_nonfinite: str = "stop"  # or "skip": skip a non-finite step and count it
    # Also log query loss/accuracy before adaptation: one more query forward a step.
    pre_adaptation_query: bool = False
    # The dataset folder, absolute, recorded by `train`: the default of `eval` and
    # `train --resume` (None in runs written before it was recorded).
    data_dir: str | None = None
    # A learner's own protocol (family_presets); the defaults are the MAML
    # paper's, and runs written before these fields existed hold them.
    # Training episodes where they differ from evaluation's (None: the same):
    # ProtoNets trains 60-way with 5 queries, Reptile on 10 shots.
    train_ways: int | None = None
    train_shots: int | None = None
    train_queries: int | None = None
    loss_scale: float | None = None  # None: ways (the MAML code's sum over K)
    downsample: str | None = None  # None: "stride" Omniglot, "maxpool" mini-ImageNet
    head: str | None = None  # None: "mean" Omniglot, "flatten" mini-ImageNet
    inner_optimizer: str = "sgd"  # or "adam": optax.adam(inner_lr, b1=inner_b1)
    inner_b1: float = 0.9
    outer_optimizer: str = "adam"  # or "sgd"
    outer_schedule: str = "constant"  # see protocol.OUTER_SCHEDULES
    outer_lr_final: float = 0.0
    outer_decay_every: int | None = None
    # The cosine/linear schedule's length, fixed when the run starts (None: steps),
    # so that lengthening a run on --resume does not bend its schedule.
    schedule_steps: int | None = None
    msl_anneal_steps: int | None = None  # MAML++; None: steps // 4
    reg_lambda: float | None = None  # iMAML; None: 2.0
    cg_steps: int | None = None  # iMAML; None: 5
    cg_damping: float | None = None  # iMAML; None: 0.0

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

    @classmethod
    def load(cls, path) -> FewShotConfig:
        """Reads and validates a run's ``config.json`` (``ValueError`` if unusable).

        The memory check of ``validate`` is left to whoever allocates (``train``).
        """
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON: {error}.") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path} must hold a JSON object of the run's settings.")
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - set(names))
        missing = sorted(
            name
            for name, f in names.items()
            if name not in raw and f.default is dataclasses.MISSING
        )
        if unknown or missing:
            raise ValueError(
                f"{path} is not a run configuration: "
                + "; ".join(
                    f"{label} {', '.join(keys)}"
                    for label, keys in (("unknown keys", unknown), ("missing", missing))
                    if keys
                )
                + "."
            )
        for name, value in raw.items():
            if not _has_type(value, names[name].type):
                raise ValueError(
                    f"{path}: {name} must be {names[name].type}; got {value!r}."
                )
        config = cls(**raw)
        try:
            config.validate(memory=False)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None
        return config

    def validate(self, *, memory: bool = True) -> None:
        """Checks every field (``ValueError`` naming the option and its limit).

        With ``memory``, also that the validation episodes fit on the device.
        """
        if self.dataset not in SPLITS:
            raise ValueError(
                f"unknown dataset {self.dataset!r}; choose from {', '.join(SPLITS)}."
            )
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
        options.check_range("--steps", self.steps, 0, options.MAX_STEPS)
        for name, most in (
            ("meta_batch", options.MAX_META_BATCH),
            ("inner_steps", options.MAX_INNER_STEPS),
            ("test_inner_steps", options.MAX_TEST_INNER_STEPS),
            ("val_episodes", options.MAX_EPISODES),
            ("steps_per_call", options.MAX_STEPS_PER_CALL),
            ("filters", options.MAX_WIDTH),
            ("chunk_size", options.MAX_META_BATCH),
        ):
            value = getattr(self, name)
            if value is not None:
                options.check_range(f"--{name.replace('_', '-')}", value, 1, most)
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"--seed must be in [0, 2**32); got {self.seed}.")
        if self.conv_impl not in (None, *ops.CONV_IMPLS):
            raise ValueError(
                f"--conv-impl must be one of {', '.join(ops.CONV_IMPLS)}; got "
                f"{self.conv_impl!r}."
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
        if (
            self.chunk_size is not None
            and self.batching in ("scan", "unroll")
            and self.meta_batch % self.chunk_size
        ):
            # With batching None/"auto" this is checked once resolved (train).
            raise ValueError(
                f"--chunk-size ({self.chunk_size}) must divide --meta-batch "
                f"({self.meta_batch}): batching {self.batching!r} splits the "
                f"meta-batch into chunks of --chunk-size tasks."
            )
        if self.precision not in ("float32", "bfloat16"):
            raise ValueError("--precision must be float32 or bfloat16.")
        if self.norm not in NORMS:
            raise ValueError(f"--norm must be one of {NORMS}.")
        if self.norm in STATEFUL_NORMS and self.algorithm == "imaml":
            raise ValueError(
                f"--norm {self.norm} needs a learner that carries model state; "
                f"imaml does not yet. Use --norm transductive with imaml."
            )
        if (
            self.norm in QUERY_INFERENCE_NORMS
            and self.algorithm not in RUNNING_QUERY_ALGORITHMS
        ):
            raise ValueError(
                f"--norm {self.norm} is one of the options of "
                f"{', '.join(RUNNING_QUERY_ALGORITHMS)}."
            )
        if self.norm == "per-step" and self.algorithm not in PER_STEP_NORM_ALGORITHMS:
            raise ValueError(
                f"--norm per-step needs a learner that passes its inner step to the "
                f"model: one of {', '.join(PER_STEP_NORM_ALGORITHMS)}."
            )
        protocol.validate(self)
        if memory:
            self.check_episodes_memory("--val-episodes", self.val_episodes)

    def check_episodes_memory(self, option: str, count: int) -> None:
        """Checks that ``count`` episodes of this run fit on the device at once."""
        images = self.ways * (self.shots + self.queries)
        shape = IMAGE_SHAPES[self.dataset]
        options.check_memory(
            option,
            count,
            4 * images * int(np.prod(shape)),
            f"the episodes ({images} images of {'×'.join(map(str, shape))} float32 "
            f"each)",
        )

    @property
    def spec(self) -> episodes.EpisodeSpec:
        """The validation and test episodes."""
        return episodes.EpisodeSpec(
            self.ways, self.shots, self.queries, rotations=self.dataset == "omniglot"
        )

    @property
    def train_spec(self) -> episodes.EpisodeSpec:
        """The training episodes (``train_*`` where set, else as ``spec``)."""
        return self.spec._replace(
            ways=self.train_ways or self.ways,
            shots=self.train_shots or self.shots,
            queries=self.train_queries or self.queries,
        )

    def for_training(self) -> FewShotConfig:
        """This configuration with the training episodes' ways, shots and queries
        (what the training learner is built for)."""
        spec = self.train_spec
        if (spec.ways, spec.shots, spec.queries) == (
            self.ways,
            self.shots,
            self.queries,
        ):
            return self
        return dataclasses.replace(
            self, ways=spec.ways, shots=spec.shots, queries=spec.queries
        )

    def resolved(self, *, shard: bool = False) -> FewShotConfig:
        """Fills backend-dependent defaults (the fastest formulation on each backend).

        With ``shard`` (tasks split over devices) the task batching is ``vmap``,
        the only one XLA can split across devices.
        """
        cpu = jax.default_backend() == "cpu"
        batching = self.batching
        if batching in (None, "auto"):  # recorded as what "auto" picks here
            batching = "scan" if cpu and not shard else "vmap"
        chunk = self.chunk_size
        if chunk is None and batching != "vmap":
            spec = self.train_spec
            examples = spec.ways * (spec.shots + spec.queries)
            chunk = core.cpu_chunk_size(self.meta_batch, examples)
        schedule_steps = self.schedule_steps
        if schedule_steps is None and self.outer_schedule in ("cosine", "linear"):
            schedule_steps = max(self.steps, 1)
        return dataclasses.replace(
            self,
            conv_impl=ops.resolve_conv_impl(self.conv_impl or "auto"),
            batching=batching,
            chunk_size=chunk,
            schedule_steps=schedule_steps,
        )


# Their defaults: a checkpoint's config leaves a field out while it holds its
# default, so runs written before these fields existed still resume.
PROTOCOL_DEFAULTS = {
    f.name: f.default
    for f in dataclasses.fields(FewShotConfig)
    if f.name in protocol.FIELDS
}


def _has_type(value: Any, annotation: str) -> bool:
    """Whether a JSON value fits a field's annotation (``"int"``, ``"str | None"``)."""
    kinds = {
        "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "float": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
        "str": lambda v: isinstance(v, str),
        "bool": lambda v: isinstance(v, bool),
        "None": lambda v: v is None,
    }
    return any(kinds[kind](value) for kind in annotation.split(" | "))
