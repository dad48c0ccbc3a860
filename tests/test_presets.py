"""Each learner's own protocol as a preset: values, schedules, and a smoke run on
the real Omniglot data."""

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from maml_jax.app import cli, family_presets, presets, protocol, runs

FAMILY = sorted(family_presets.PRESETS)
# The presets whose protocols take code paths of their own (an Adam inner loop
# and an annealed meta-step, 60-way training episodes with a halving schedule,
# per-step norms with LSLR, MSL and a cosine schedule) train in the suite; the
# others share those paths and are validated above (CI has a time budget).
TRAINED = [
    "reptile-omniglot-5w1s",
    "protonet-omniglot-5w1s",
    "maml-plus-plus-omniglot-5w1s",
]
# Tiny but real: two meta-steps of a few tasks through a 4-filter Conv4.
TINY = [
    "--steps",
    "2",
    "--meta-batch",
    "2",
    "--filters",
    "4",
    "--val-episodes",
    "4",
    "--steps-per-call",
    "2",
    "--eval-every",
    "2",
    "--checkpoint-every",
    "2",
    "--no-progress",
]


def test_every_family_preset_is_valid_and_sourced():
    for name in FAMILY:
        config = presets.FewShotConfig.from_preset(name)
        assert name in family_presets.SOURCES and family_presets.SOURCES[name]
        assert name in family_presets.NOT_HONOURED
        assert config.preset == name
    # The MAML presets keep their names and gain learner-prefixed aliases.
    for name in ("omniglot-5w1s", "omniglot-20w5s", "miniimagenet-5w1s"):
        assert presets.PRESETS[f"maml-{name}"] == presets.PRESETS[name]


def test_protocol_values_from_the_authors():
    get = presets.FewShotConfig.from_preset
    reptile = get("reptile-omniglot-5w1s")
    assert (reptile.inner_optimizer, reptile.inner_b1, reptile.inner_lr) == (
        "adam",
        0.0,
        0.001,
    )
    assert reptile.train_spec.shots == 10 and reptile.spec.shots == 1
    assert (reptile.meta_batch, reptile.inner_steps, reptile.test_inner_steps) == (
        5,
        5,
        50,
    )
    proto = get("protonet-omniglot-5w1s")
    assert proto.train_spec.ways == 60 and proto.spec.ways == 5
    assert (proto.outer_schedule, proto.outer_decay_every) == ("halving", 2000)
    mpp = get("maml-plus-plus-omniglot-5w1s")
    assert (mpp.outer_schedule, mpp.outer_lr_final, mpp.msl_anneal_steps) == (
        "cosine",
        1e-5,
        5000,
    )
    imaml = get("imaml-omniglot-5w1s")
    assert (imaml.inner_steps, imaml.reg_lambda, imaml.cg_steps) == (16, 2.0, 5)


def _lr_at(config, step):
    """The outer learning rate in effect at ``step`` (an SGD step of gradient 1)."""
    tx = protocol.outer_optimizer(dataclasses.replace(config, outer_optimizer="sgd"))
    state = tx.init(jnp.zeros(()))
    for _ in range(step):
        _, state = tx.update(jnp.zeros(()), state)
    update, _ = tx.update(jnp.ones(()), state)
    return -float(update)


def test_outer_schedules():
    get = presets.FewShotConfig.from_preset
    # ProtoNets: Adam 1e-3 halved every 2000 episodes (staircase).
    proto = get("protonet-omniglot-5w1s", outer_decay_every=2)
    assert [_lr_at(proto, s) for s in (0, 1, 2, 4)] == pytest.approx(
        [1e-3, 1e-3, 5e-4, 2.5e-4], rel=1e-6
    )
    # Reptile: ε from 1 to 0 linearly over the run.
    reptile = get("reptile-omniglot-5w1s", steps=4).resolved()
    assert reptile.schedule_steps == 4
    assert [_lr_at(reptile, s) for s in (0, 2, 4)] == pytest.approx([1.0, 0.5, 0.0])
    # MAML++: cosine from 1e-3 to 1e-5.
    mpp = get("maml-plus-plus-omniglot-5w1s", steps=10).resolved()
    lrs = [_lr_at(mpp, s) for s in (0, 5, 10)]
    assert lrs == pytest.approx([1e-3, (1e-3 + 1e-5) / 2, 1e-5], rel=1e-5)
    # Constant by default, with the MAML presets' clipping kept.
    mini = get("miniimagenet-5w1s")
    tx = protocol.outer_optimizer(mini)
    assert isinstance(tx, optax.GradientTransformation)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(train_ways=20), "only protonet"),
        (dict(inner_optimizer="adam", algorithm="meta_sgd"), "takes an inner"),
        (dict(outer_schedule="halving"), "needs outer_decay_every"),
        (dict(outer_schedule="step"), "outer_schedule must be one of"),
        (dict(loss_scale=-1.0), "loss_scale must be a finite number > 0"),
        (dict(outer_lr_final=1.0), "must not exceed outer_lr"),
    ],
)
def test_bad_protocol_fields(overrides, message):
    with pytest.raises(ValueError, match=message):
        presets.FewShotConfig.from_preset("omniglot-5w1s", **overrides)


def test_runs_before_the_protocol_fields_still_load_and_resume(tmp_path):
    config = presets.FewShotConfig.from_preset("omniglot-5w1s")
    saved = {
        k: v for k, v in dataclasses.asdict(config).items() if k not in protocol.FIELDS
    }
    (tmp_path / "config.json").write_text(json.dumps(saved))
    loaded = presets.FewShotConfig.load(tmp_path / "config.json")
    assert loaded == config
    # A checkpoint's config leaves the protocol fields out at their defaults.
    assert not set(runs._config_dict(loaded)) & set(protocol.FIELDS)
    reptile = presets.FewShotConfig.from_preset("reptile-omniglot-5w1s")
    assert runs._config_dict(reptile)["inner_optimizer"] == "adam"


@pytest.mark.benchmark
@pytest.mark.parametrize("name", TRAINED)
def test_family_preset_trains(name, omniglot_dir, dataset_cache, tmp_path):
    out = tmp_path / "run"
    argv = ["train", "--preset", name, *TINY, "--data-dir", str(omniglot_dir)]
    assert cli.main([*argv, "--out", str(out)]) == 0
    saved = json.loads((out / "config.json").read_text())
    expected = presets.FewShotConfig.from_preset(name)
    for field in protocol.FIELDS:
        if field != "schedule_steps":  # fixed to the run's length (2) at start
            assert saved[field] == getattr(expected, field), field
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 2
    assert np.isfinite(records[-1]["eval/val_accuracy"])
    results = runs.evaluate_run(out, episodes_count=4)
    assert len(results["accuracy"]) == expected.test_inner_steps + 1


def test_bfloat16_falls_back_to_float32_on_a_cpu_without_bf16_matrix_units():
    from maml_jax.app import precision

    amd = "model name\t: AMD EPYC\nflags\t\t: fpu avx avx2 fma\n"
    xeon = "model name\t: Intel Xeon\nflags\t\t: avx2 avx512f amx_bf16 amx_tile\n"
    assert precision.cpu_bf16_matmul(amd) is False
    assert precision.cpu_bf16_matmul(xeon) is True
    assert precision.cpu_bf16_matmul("no flags here") is None
    config = presets.FewShotConfig.from_preset("omniglot-5w1s", precision="bfloat16")
    resolved, notice = precision.resolve(config, has_bf16=False)
    assert resolved.precision == "float32" and "training in float32" in notice
    assert precision.resolve(config, has_bf16=True) == (config, None)
    assert precision.resolve(config, has_bf16=None) == (config, None)
    float32 = presets.FewShotConfig.from_preset("omniglot-5w1s")
    assert precision.resolve(float32, has_bf16=False) == (float32, None)
