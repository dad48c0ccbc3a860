"""Reliability: non-finite steps (stop or skip), unwritable output, ``--steps 0``,
every valid few-shot configuration runs, invalid flags are one clear line.

The kill/SIGTERM/corruption/bad-archive suites are in ``test_faults.py``,
``test_cli.py``, ``test_checkpoint.py``, ``test_omniglot.py`` and
``test_bad_input.py``; ``RELIABILITY.md`` sums them up.
"""

import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import maml_jax
from maml_jax.app import cli, learners, presets, runs
from maml_jax.checkpoint import Checkpointer
from tests import helpers

_final_params = helpers.final_params

# --- non-finite steps in ``fit``: a linear model, NaN injected at chosen steps ---

RUN_KEY = jax.random.key(3)
# Step s is the update from state.step == s to s + 1. At NAN_LOSS steps the
# query loss is NaN; at NAN_GRAD steps the loss is finite but its gradient NaN.
NAN_LOSS, NAN_GRAD = (2, 6), (5,)
BAD = sorted(NAN_LOSS + NAN_GRAD)


def _loss(w, batch):
    """MSE, plus ``0 * sqrt(g·(1 + w0²))``: finite, but its gradient is NaN at g=0."""
    x, y, g = batch
    return jnp.mean((x @ w - y) ** 2) + 0.0 * jnp.sqrt(jnp.mean(g) * (1 + w[0] ** 2))


def _flag(key, steps):
    """Whether ``key`` is the key of one of ``steps`` in a run keyed RUN_KEY."""
    data = jax.random.key_data(key)
    step_keys = [jax.random.key_data(jax.random.fold_in(RUN_KEY, s)) for s in steps]
    return jnp.any(jnp.array([jnp.all(data == k) for k in step_keys]))


def _sample(key):
    """Linear tasks; NaN injected at the NAN_LOSS and NAN_GRAD steps of RUN_KEY."""
    tasks = helpers.linear_tasks(key, 4, 5, 5, 3)
    (xs, ys), (xq, yq) = tasks.support, tasks.query
    yq = jnp.where(_flag(key, NAN_LOSS), jnp.nan, yq)
    g = jnp.where(_flag(key, NAN_GRAD), 0.0, jnp.ones_like(yq))
    return maml_jax.TaskBatch(support=(xs, ys, jnp.ones_like(ys)), query=(xq, yq, g))


# One sampler, learner and optimizer for all tests: the jitted programs are shared.
LEARNER = maml_jax.maml(_loss, inner_lr=0.05, num_inner_steps=1)
TX = optax.adam(0.1)


def _state():
    return maml_jax.MetaTrainState.create(params=jnp.zeros(3), learner=LEARNER, tx=TX)


def _host(tree):
    return jax.tree.map(np.array, tree)


def _fit(state, num_steps, nonfinite, *, steps_per_call=1, **kwargs):
    return maml_jax.fit(
        state,
        _sample,
        key=RUN_KEY,
        num_steps=num_steps,
        steps_per_call=steps_per_call,
        progress=False,
        nonfinite=nonfinite,
        **kwargs,
    )


def test_skip_keeps_state_at_bad_steps_counts_them_and_goes_on(tmp_path):
    state = _state()
    seen = {0: _host((state.meta_params, state.opt_state))}

    def snapshot(state, record):
        seen[record["step"]] = _host((state.meta_params, state.opt_state))

    log = tmp_path / "metrics.jsonl"
    final = _fit(state, 10, "skip", callbacks=(snapshot,), metrics_path=log)
    assert int(final.step) == 10 and int(final.skipped_steps) == len(BAD)
    for s in range(10):
        before, after = jax.tree.leaves(seen[s]), jax.tree.leaves(seen[s + 1])
        same = all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))
        assert same == (s in BAD), s  # params and optimizer state, bit for bit
    assert np.all(np.isfinite(final.meta_params))
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["skipped_steps"] for r in records] == [
        sum(b < r["step"] for b in BAD) for r in records
    ]
    # A chunk of one skipped step has no applied step to average.
    assert [math.isnan(r["loss"]) for r in records] == [s in BAD for s in range(10)]


@pytest.mark.parametrize(
    "start, message",
    [
        (0, "meta-loss became nan at step 3; lower the learning rates"),
        (4, r"meta-gradient norm became nan at step 6 \(meta-loss \d"),
    ],
)
def test_raise_stops_at_the_first_bad_step_before_any_callback(start, message):
    seen = []
    state = _state().replace(step=jnp.int32(start))
    with pytest.raises(FloatingPointError, match=message):
        # A chunk of 4 steps holds the bad step, and no callback (hence no
        # checkpoint) ever sees the state after it.
        _fit(
            state,
            8,
            "raise",
            steps_per_call=4,
            callbacks=(lambda s, r: seen.append(r["step"]),),
        )
    assert seen == []


def test_meta_train_step_skip_under_jit_with_donation():
    good, bad = (_sample(jax.random.fold_in(RUN_KEY, s)) for s in (0, NAN_LOSS[0]))
    applied, _ = maml_jax.meta_train_step(_state(), good)  # "raise": always applies
    state = _state()
    before = _host(state.meta_params)
    state, metrics = maml_jax.meta_train_step(state, bad, nonfinite="skip")
    assert bool(metrics["skipped"]) and int(state.skipped_steps) == 1
    np.testing.assert_array_equal(state.meta_params, before)
    state, metrics = maml_jax.meta_train_step(state, good, nonfinite="skip")
    assert not bool(metrics["skipped"]) and int(state.step) == 2
    # A finite step in "skip" mode is the very same update as in "raise" mode.
    for a, b in zip(
        jax.tree.leaves((applied.meta_params, applied.opt_state)),
        jax.tree.leaves((state.meta_params, state.opt_state)),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)


def test_skipped_count_survives_checkpoint_and_resume(tmp_path):
    uninterrupted = _host(_fit(_state(), 8, "skip"))
    with Checkpointer(tmp_path) as ckpt:
        _fit(_state(), 6, "skip", callbacks=(lambda s, r: ckpt.save(s),))
    with Checkpointer(tmp_path) as ckpt:  # a new process resumes
        restored = ckpt.restore(_state()).state
    assert restored.step == 6 and int(restored.skipped_steps) == 2  # steps 2, 5
    resumed = _host(_fit(restored, 8, "skip"))
    assert int(resumed.skipped_steps) == 3
    for a, b in zip(
        jax.tree.leaves(uninterrupted), jax.tree.leaves(resumed), strict=True
    ):
        np.testing.assert_array_equal(a, b)


def test_bad_nonfinite_policy_is_rejected():
    with pytest.raises(ValueError, match="nonfinite must be one of 'raise', 'skip'"):
        _fit(_state(), 2, "ignore")
    with pytest.raises(ValueError, match="--on-nonfinite must be one of stop, skip"):
        presets.FewShotConfig.from_preset("omniglot-5w1s", on_nonfinite="ignore")


# --- the command line on the real Omniglot files ---

# Small programs: XLA compiles lax convolutions under vmap about twice as fast as
# the CPU default (im2col + scan, run by test_cli.py and test_faults.py).
FAST_COMPILE = ["--conv-impl", "lax", "--batching", "vmap"]
TINY = [
    "--preset",
    "omniglot-5w1s",
    "--meta-batch",
    "2",
    "--filters",
    "8",
    "--val-episodes",
    "2",
    "--test-inner-steps",
    "1",
    "--no-progress",
    *FAST_COMPILE,
]


def _main(argv, capsys):
    try:
        code = cli.main(argv)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def _one_clean_line(err):
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


def test_unwritable_out_is_one_line_exit_2(tmp_path, capsys):
    if os.geteuid() == 0:
        # Root ignores permission bits: make --out a path under a regular file.
        blocker = tmp_path / "a-file"
        blocker.write_text("")
        out, reason = blocker / "run", "Not a directory"
    else:
        blocker = tmp_path / "read-only"
        blocker.mkdir()
        blocker.chmod(0o555)
        out, reason = blocker / "run", "Permission denied"
    try:
        # --out is checked before any data is read: any folder is a --data-dir.
        argv = ["train", *TINY, "--data-dir", str(tmp_path), "--out", str(out)]
        code, _, err = _main(argv, capsys)
    finally:
        blocker.chmod(0o755)
    assert code == 2
    _one_clean_line(err)
    assert f"--out {out} is not writable: {reason}." in err
    assert not out.exists()


@pytest.mark.slow
def test_steps_zero_writes_config_and_checkpoint_and_evaluates(
    omniglot_dir, dataset_cache, tmp_path, capsys
):
    run = tmp_path / "run"
    argv = ["train", *TINY, "--steps", "0", "--data-dir", str(omniglot_dir)]
    code, out, err = _main([*argv, "--out", str(run)], capsys)
    assert code == 0, err
    assert f"trained to step 0; run directory {run}" in out
    config = json.loads((run / "config.json").read_text())
    assert config["steps"] == 0 and config["filters"] == 8
    assert config["on_nonfinite"] == "stop"
    assert (run / "metrics.jsonl").read_text() == ""  # no step, no record
    assert (run / "learning_curve.png").is_file()
    initial = _final_params(run)  # the step-0 checkpoint: the initialization
    assert initial.step == 0 and int(initial.state.skipped_steps) == 0

    # eval only reads: a save in progress (a run still training) is left alone.
    saving = run / "checkpoints" / "2.orbax-checkpoint-tmp"
    saving.mkdir()
    argv = ["eval", "--run", str(run), "--data-dir", str(omniglot_dir)]
    code, out, err = _main([*argv, "--episodes", "4"], capsys)
    assert code == 0, err
    assert saving.is_dir()
    assert "checkpoint step 0" in out and "| 1 |" in out
    results = json.loads((run / "test_results.json").read_text())
    assert results["trained_steps"] == 0 and results["skipped_steps"] == 0
    assert len(results["accuracy"]) == 2
    assert all(0.0 <= a <= 1.0 for a in results["accuracy"])

    code, _, err = _main([*argv, "--inner-steps", "0"], capsys)
    assert code == 2 and "--inner-steps must be >= 1; got 0." in err
    _one_clean_line(err)


@pytest.mark.slow
def test_on_nonfinite_reaches_fit_stop_then_resume_with_skip(
    omniglot_dir, dataset_cache, tmp_path, capsys, monkeypatch
):
    """The CLI plumbing around ``fit`` (whose NaN handling is tested above).

    ``fit`` is replaced by a stand-in that checkpoints like the real one and then
    stops on a NaN or reports skipped steps, so no meta-step is compiled.
    """
    calls = []

    def fake_fit(state, sample_tasks, *, num_steps, callbacks, nonfinite, **kwargs):
        calls.append((int(state.step), int(state.skipped_steps), nonfinite))
        start = int(state.step)
        for step in range(start + 1, num_steps + 1):
            if nonfinite == "raise" and step == 3:
                raise FloatingPointError(
                    "meta-loss became nan at step 3; lower the learning rates or "
                    "check the data."
                )
            skipped = int(state.skipped_steps) + (nonfinite == "skip" and step == 3)
            state = state.replace(
                step=jnp.int32(step), skipped_steps=jnp.int32(skipped)
            )
            record = {"step": step, "loss": 1.0, "skipped_steps": skipped}
            with open(kwargs["metrics_path"], "a") as log:
                log.write(json.dumps(record) + "\n")
            for callback in callbacks:
                callback(state, record)
        return state

    monkeypatch.setattr(maml_jax, "fit", fake_fit)
    run = tmp_path / "run"
    common = ["--data-dir", str(omniglot_dir), "--out", str(run)]
    argv = ["train", *TINY, "--steps", "5", "--steps-per-call", "1"]
    code, _, err = _main([*argv, "--checkpoint-every", "1", *common], capsys)
    assert code == 2 and calls == [(0, 0, "raise")]
    _one_clean_line(err)
    assert "meta-loss became nan at step 3;" in err
    assert f"the last good checkpoint is step 2 in {run / 'checkpoints'}" in err
    assert _final_params(run).step == 2  # nothing written after the bad step

    resume = ["train", "--preset", "omniglot-5w1s", "--resume", "--no-progress"]
    code, out, err = _main([*resume, "--on-nonfinite", "skip", *common], capsys)
    assert code == 0, err
    assert calls[1] == (2, 0, "skip")
    assert "trained to step 5 (1 non-finite steps skipped)" in out
    final = _final_params(run)
    assert final.step == 5 and int(final.state.skipped_steps) == 1
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]

    # A corrupted latest checkpoint: eval refuses it in one line; --resume moves
    # it aside and continues from the newest readable one (step 4).
    (run / "checkpoints" / "5" / "manifest" / "metadata").unlink()
    evaluate = ["eval", "--run", str(run), "--data-dir", str(omniglot_dir)]
    code, _, err = _main(evaluate, capsys)
    assert code == 2 and "is corrupted or incomplete" in err
    assert "Traceback" not in err
    code, out, err = _main([*resume, *common], capsys)  # "stop" again: saved config
    assert code == 0, err
    assert calls[2] == (4, 1, "raise") and "trained to step 5" in out
    assert (run / "checkpoints" / "5.corrupt").is_dir()
    assert _final_params(run).step == 5


# --- every valid configuration runs (the public Python API, in process) ---


@pytest.mark.slow
@settings(
    max_examples=3,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
    phases=[Phase.explicit, Phase.reuse, Phase.generate],  # shrinking takes minutes
)
@given(
    ways=st.integers(1, 5),
    shots=st.integers(1, 2),
    queries=st.integers(1, 2),
    meta_batch=st.integers(1, 2),
    inner_steps=st.integers(1, 2),
    filters=st.integers(4, 8),
    steps=st.integers(1, 2),
    algorithm=st.sampled_from(learners.ALGORITHMS),
    norm=st.sampled_from(("transductive", "inductive", "none")),
    on_nonfinite=st.sampled_from(("stop", "skip")),
)
def test_every_valid_config_trains_to_a_finite_loss(
    omniglot_dir, dataset_cache, **fields
):
    config = presets.FewShotConfig.from_preset(
        "omniglot-5w1s",
        test_inner_steps=1,
        val_episodes=2,
        steps_per_call=1,
        eval_every=1,
        checkpoint_every=1,
        conv_impl="lax",  # FAST_COMPILE
        batching="vmap",
        **fields,
    )
    with tempfile.TemporaryDirectory() as out:
        state = runs.train(config, omniglot_dir, out, progress=False)
        log = Path(out, "metrics.jsonl").read_text()
    records = [json.loads(line) for line in log.splitlines()]
    assert int(state.step) == config.steps and int(state.skipped_steps) == 0
    assert [r["step"] for r in records] == list(range(1, config.steps + 1))
    assert all(math.isfinite(r["loss"]) for r in records)
    assert all(0.0 <= r["eval/val_accuracy"] <= 1.0 for r in records)
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(state.meta_params))


# --- invalid flags not covered by test_bad_input.py: one line, exit 2 ---

COUNT_FLAGS = (
    "--queries",
    "--test-inner-steps",
    "--val-episodes",
    "--checkpoint-every",
    "--steps-per-call",
    "--eval-every",
    "--chunk-size",
    "--filters",
)
CHOICE_FLAGS = (
    "--preset",
    "--algorithm",
    "--norm",
    "--conv-impl",
    "--precision",
    "--batching",
    "--on-nonfinite",
)
bad_train_flags = st.one_of(
    st.tuples(st.sampled_from(COUNT_FLAGS), st.sampled_from(["0", "-2", "x", "2.5"])),
    st.tuples(st.sampled_from(CHOICE_FLAGS), st.sampled_from(["bogus", ""])),
    st.tuples(st.just("--seed"), st.sampled_from(["-1", "4294967296", "1.5"])),
)


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(flag_value=bad_train_flags)
def test_bad_train_flags_exit_2_with_one_line(flag_value, tmp_path, capsys):
    flag, value = flag_value
    argv = ["train", "--preset", "omniglot-5w1s", "--data-dir", str(tmp_path)]
    argv += ["--out", str(tmp_path / "run"), flag, value]
    code, _, err = _main(argv, capsys)
    assert code == 2
    assert "Traceback" not in err and err.strip()
    assert flag in err  # "--x must be ..." or argparse's "argument --x: ..."
    assert not (tmp_path / "run").exists()  # rejected before touching --out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--episodes", "1"], "--episodes must be >= 2; got 1."),
        (["--episodes", "x"], "argument --episodes: invalid int value"),
        (["--inner-steps", "-1"], "--inner-steps must be >= 1; got -1."),
        (["--split", "bogus"], "argument --split: invalid choice"),
    ],
)
def test_bad_eval_flags_exit_2_with_one_line(tmp_path, capsys, extra, message):
    run = tmp_path / "run"  # a run without a checkpoint: the flags fail first
    run.mkdir()
    config = presets.FewShotConfig.from_preset("omniglot-5w1s")
    (run / "config.json").write_text(json.dumps(dataclasses.asdict(config)))
    argv = ["eval", "--run", str(run), "--data-dir", str(tmp_path), *extra]
    code, _, err = _main(argv, capsys)
    assert code == 2 and message in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "batching",
    [
        ["--batching", "scan"],
        pytest.param(
            [],  # "auto", which resolves to scan only on CPU
            marks=pytest.mark.skipif(
                jax.default_backend() != "cpu", reason="auto is vmap off CPU"
            ),
        ),
    ],
    ids=["scan", "auto"],
)
def test_chunk_size_not_dividing_meta_batch_writes_nothing(tmp_path, capsys, batching):
    run = tmp_path / "run"  # any folder is a --data-dir: rejected before reading
    argv = ["train", "--preset", "omniglot-5w1s", "--data-dir", str(tmp_path)]
    argv += ["--out", str(run), "--meta-batch", "4", "--chunk-size", "3", *batching]
    code, _, err = _main(argv, capsys)
    assert code == 2
    _one_clean_line(err)
    assert "--chunk-size (3) must divide --meta-batch (4)" in err
    assert not run.exists()  # so the same --out can be used once fixed


def test_meta_batch_not_splitting_over_devices_writes_nothing(tmp_path):
    run = tmp_path / "run"
    argv = ["train", "--preset", "omniglot-5w1s", "--shard", "--meta-batch", "3"]
    done = subprocess.run(
        [sys.executable, "-m", "maml_jax.app.cli", *argv]
        + ["--data-dir", str(tmp_path), "--out", str(run)],
        capture_output=True,
        text=True,
        env={
            **os.environ,
            "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        },
        timeout=300,
    )
    assert done.returncode == 2
    _one_clean_line(done.stderr)
    assert "--meta-batch (3) must be a multiple of the 2 devices" in done.stderr
    assert not run.exists()


def _saved_run(tmp_path, **fields):
    """A run folder holding only the config.json of a small omniglot-5w1s run."""
    run = tmp_path / "run"
    run.mkdir()
    config = presets.FewShotConfig.from_preset("omniglot-5w1s", meta_batch=4)
    config = dataclasses.replace(config.resolved(), **fields)
    (run / "config.json").write_text(json.dumps(dataclasses.asdict(config)))
    return run


def test_resume_refuses_only_options_that_differ_from_the_saved_run(tmp_path, capsys):
    run = _saved_run(tmp_path, data_dir=str(tmp_path / "moved"))
    original = ["train", "--preset", "omniglot-5w1s", "--meta-batch", "4"]
    resume = [*original, "--out", str(run), "--resume", "--no-progress"]
    # Options equal to the saved ones ("auto" resolving to the saved value) and
    # free ones changed are accepted; this run then stops at its moved data.
    free = ["--steps", "9", "--eval-every", "3", "--steps-per-call", "7"]
    code, _, err = _main([*resume, "--batching", "auto", *free], capsys)
    assert code == 2
    _one_clean_line(err)
    assert f"the data folder recorded in {run / 'config.json'}, " in err
    assert "no longer exists; pass --data-dir." in err

    code, _, err = _main([*resume, "--ways", "3", "--inner-lr", "0.4"], capsys)
    assert code == 2
    _one_clean_line(err)
    assert "these options differ from it: --ways (saved 5, given 3). Drop" in err
    preset = ["--preset", "omniglot-5w5s"]
    code, _, err = _main([*resume, *preset, "--meta-batch", "8"], capsys)
    assert code == 2
    assert (
        "--preset (saved omniglot-5w1s, given omniglot-5w5s); "
        "--meta-batch (saved 4, given 8)." in err
    )
    code, _, err = _main(["train", "--resume", "--out", str(tmp_path)], capsys)
    assert code == 2 and "no run to resume (no config.json)" in err
    with pytest.raises(TypeError, match="config must be a FewShotConfig"):
        runs.train(None, tmp_path, tmp_path / "other")


def test_eval_and_resume_without_data_dir_use_the_recorded_folder(tmp_path, capsys):
    old = _saved_run(tmp_path)  # written before runs recorded their data folder
    for argv in (["eval", "--run", str(old)], ["train", "--resume", "--out", str(old)]):
        code, _, err = _main(argv, capsys)
        assert code == 2
        _one_clean_line(err)
        assert f"--data-dir is required: {old / 'config.json'} records no" in err
    moved = tmp_path / "moved"
    config = json.loads((old / "config.json").read_text())
    (old / "config.json").write_text(json.dumps({**config, "data_dir": str(moved)}))
    code, _, err = _main(["eval", "--run", str(old)], capsys)
    assert code == 2
    assert f"the data folder recorded in {old / 'config.json'}, {moved}, no " in err
    code, _, err = _main(["eval", "--run", str(old), "--data-dir", str(moved)], capsys)
    assert code == 2 and f"--data-dir {moved} does not exist" in err
    code, _, err = _main(["train", "--out", str(tmp_path / "new")], capsys)
    assert code == 2 and "--preset is required for a new run." in err
    code, _, err = _main(["train", "--preset", "omniglot-5w1s", "--out", "x"], capsys)
    assert code == 2 and "--data-dir is required for a new run." in err
