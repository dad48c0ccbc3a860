"""``maml-jax train`` / ``eval`` on the real Omniglot files: smoke, resume, errors."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

import maml_jax
from maml_jax.app import cli, presets
from tests import helpers

SMALL = helpers.CLI_SMALL_ARGS


def _train(omniglot_dir, out, *extra):
    argv = ["train", *SMALL, "--data-dir", str(omniglot_dir), "--out", str(out), *extra]
    assert cli.main(argv) == 0


_final_params = helpers.final_params


@pytest.mark.slow
def test_train_then_eval(omniglot_dir, dataset_cache, tmp_path, capsys, monkeypatch):
    # Bit-exact resume is tested in test_faults.py (after SIGKILL at five points).
    # The chunk size is measured (measuring itself: test_autotune.py).
    measured = maml_jax.BatchingChoice(
        "scan", 2, "measured", {1: 0.3, 2: 0.2, 4: 0.25}, {1: 9.0, 2: 9.0, 4: 9.0}
    )
    monkeypatch.setattr(maml_jax.autotune, "tune_batching", lambda *a, **k: measured)
    full = tmp_path / "full"
    _train(omniglot_dir, full, "--steps", "4", "--pre-adaptation-query")
    config = json.loads((full / "config.json").read_text())
    assert (config["chunk_size"], config["batching_choice"]) == (2, "measured")
    assert json.loads((full / "autotune.json").read_text())["step_seconds"]["2"] == 0.2
    assert "chunks of 2 tasks" in capsys.readouterr().err
    records = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    assert all("eval/val_accuracy" in r for r in records)
    assert all({"query_accuracy_pre", "query_accuracy_post"} <= set(r) for r in records)
    assert (full / "learning_curve.png").stat().st_size > 10_000

    capsys.readouterr()
    # No --data-dir: eval reads the data folder the run recorded.
    assert cli.main(["eval", "--run", str(full), "--episodes", "20"]) == 0
    table = capsys.readouterr().out
    assert "| 3 |" in table and "accuracy" in table
    results = json.loads((full / "test_results.json").read_text())
    assert len(results["accuracy"]) == 4 and results["episodes"] == 20
    assert results["trained_steps"] == 4 and "jax" in results["versions"]
    assert results["data_dir"] == os.path.abspath(omniglot_dir)


def _run_cli(*args, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "maml_jax.app.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--ways", "5000"], "ways=5000 is more than the 4112 classes"),
        (["--shots", "15", "--queries", "10"], "is more than the 20 examples"),
        (["--inner-lr", "-1"], "--inner-lr must be a finite number > 0"),
        (["--meta-batch", "0"], "--meta-batch must be >= 1"),
    ],
)
def test_bad_train_input_is_one_clear_line(
    omniglot_dir, dataset_cache, tmp_path, extra, message
):
    done = _run_cli(
        "train",
        "--preset",
        "omniglot-5w1s",
        "--data-dir",
        str(omniglot_dir),
        "--out",
        str(tmp_path / "run"),
        *extra,
    )
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def _eval_steps(run):
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if "eval/val_accuracy" in r]


@pytest.mark.slow
def test_checkpoint_every_needs_no_multiple_of_steps_per_call(
    omniglot_dir, dataset_cache, tmp_path, capsys, monkeypatch
):
    from maml_jax.checkpoint import Checkpointer

    def not_called(*args, **kwargs):
        raise AssertionError("--no-autotune measured the chunk size")

    monkeypatch.setattr(maml_jax.autotune, "tune_batching", not_called)
    run = tmp_path / "run"
    cadence = [
        "--no-autotune",
        "--checkpoint-every",
        "5",
        "--eval-every",
        "10",
        "--steps-per-call",
        "50",
    ]
    _train(omniglot_dir, run, "--steps", "10", *cadence)
    with Checkpointer(run / "checkpoints") as checkpointer:
        assert checkpointer.all_steps() == [5, 10]
    logged = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in logged] == [5, 10]
    assert _eval_steps(run) == [10]
    config = json.loads((run / "config.json").read_text())
    assert config["data_dir"] == os.path.abspath(omniglot_dir)
    assert (config["chunk_size"], config["batching_choice"]) == (4, "rule")
    # --resume alone finds the configuration and the data folder in the run.
    capsys.readouterr()
    assert cli.main(["train", "--resume", "--out", str(run), "--no-progress"]) == 0
    assert "trained to step 10" in capsys.readouterr().out


@pytest.mark.slow
def test_resume_off_the_eval_grid_with_the_original_command_line(
    omniglot_dir, dataset_cache, tmp_path, capsys
):
    run = tmp_path / "run"
    argv = ["train", *SMALL, "--steps", "10", "--eval-every", "4"]
    argv += ["--data-dir", str(omniglot_dir), "--out", str(run)]
    assert cli.main(argv) == 0  # checkpoints every 2 steps; 6, 8, 10 are kept
    full = _final_params(run)
    assert _eval_steps(run) == [4, 8, 10]
    # A crash right after the step-6 checkpoint: resume from a step that is not
    # a multiple of --eval-every, with the original command line.
    for step in ("8", "10"):
        shutil.rmtree(run / "checkpoints" / step)
    assert cli.main([*argv, "--resume"]) == 0
    resumed = _final_params(run)
    assert _eval_steps(run) == [4, 8, 10]
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [2, 4, 6, 8, 10]
    assert resumed.step == full.step == 10
    for x, y in zip(
        jax.tree.leaves(full.state), jax.tree.leaves(resumed.state), strict=True
    ):
        np.testing.assert_array_equal(x, y)

    # One option differs from the saved run: refused, naming it and both values.
    capsys.readouterr()
    assert cli.main([*argv, "--resume", "--meta-batch", "8"]) == 2
    err = capsys.readouterr().err
    assert "--meta-batch (saved 4, given 8)" in err and "--ways" not in err
    assert len(err.strip().splitlines()) == 1


def test_missing_data_dir_and_unknown_preset(tmp_path):
    done = _run_cli(
        "train",
        "--preset",
        "omniglot-5w1s",
        "--data-dir",
        str(tmp_path / "nowhere"),
        "--out",
        str(tmp_path / "run"),
    )
    assert done.returncode == 2 and "does not exist" in done.stderr
    assert "Traceback" not in done.stderr
    done = _run_cli(
        "train",
        "--preset",
        "omniglot-7w1s",
        "--data-dir",
        str(tmp_path),
        "--out",
        str(tmp_path / "run"),
    )
    assert done.returncode == 2 and "invalid choice" in done.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    done = _run_cli(
        "train",
        "--preset",
        "omniglot-5w1s",
        "--data-dir",
        str(empty),
        "--out",
        str(tmp_path / "run"),
    )
    assert done.returncode == 2 and "images_background.zip" in done.stderr
    assert "Traceback" not in done.stderr


def test_existing_run_needs_resume_and_eval_needs_a_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    done = _run_cli(
        "train",
        "--preset",
        "omniglot-5w1s",
        "--data-dir",
        str(tmp_path),
        "--out",
        str(run),
    )
    assert done.returncode == 2 and "already holds a run" in done.stderr
    done = _run_cli(
        "eval", "--run", str(tmp_path / "none"), "--data-dir", str(tmp_path)
    )
    assert done.returncode == 2 and "not a training run" in done.stderr
    debug = _run_cli(
        "eval", "--run", str(tmp_path / "none"), "--data-dir", str(tmp_path), "--debug"
    )
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_presets_match_the_paper():
    p = presets.PRESETS
    assert (
        p["omniglot-5w1s"]["inner_lr"] == 0.4 and p["omniglot-5w1s"]["meta_batch"] == 32
    )
    assert (
        p["omniglot-20w1s"]["inner_steps"] == 5
        and p["omniglot-20w1s"]["inner_lr"] == 0.1
    )
    assert p["miniimagenet-5w1s"]["queries"] == 15
    assert p["miniimagenet-5w5s"]["meta_batch"] == 2
    config = presets.FewShotConfig.from_preset("omniglot-5w1s")
    assert config.spec.rotations and config.steps == 60_000
    with pytest.raises(ValueError, match="unknown preset"):
        presets.FewShotConfig.from_preset("cifar")


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_resume_is_exact(
    omniglot_dir, dataset_cache, tmp_path
):
    import signal
    import time

    run = tmp_path / "run"
    args = [
        sys.executable,
        "-m",
        "maml_jax.app.cli",
        "train",
        *SMALL,
        "--steps",
        "400",
        "--checkpoint-every",
        "200",
        "--eval-every",
        "200",
        "--data-dir",
        str(omniglot_dir),
        "--out",
        str(run),
    ]
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.2)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert time.monotonic() - sent < 30
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "stopped by SIGTERM at step" in stderr and "--resume" in stderr
    stopped = _final_params(run)
    logged = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
    assert logged[-1] == stopped.step and stopped.step < 400

    # Resume to a few steps past the stop in a fresh process. (That resumed runs
    # are bit-identical to uninterrupted ones is tested in test_faults.py.)
    target = str(stopped.step + 4)
    resume = _run_cli(
        "train",
        "--preset",
        "omniglot-5w1s",
        "--data-dir",
        str(omniglot_dir),
        "--out",
        str(run),
        "--resume",
        "--steps",
        target,
        "--no-progress",
    )
    assert resume.returncode == 0, resume.stderr
    resumed = _final_params(run)
    assert resumed.step == int(target)
    steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
    assert steps == sorted(set(steps))  # every logged step once


@pytest.mark.slow
def test_shard_over_two_devices_matches_one_device(
    omniglot_dir, dataset_cache, tmp_path
):
    # Inductive norm: with batch norm over the batch, the conv biases have an exactly
    # zero gradient, which Adam turns from float noise into ±lr steps; comparing
    # them across reduction orders would test noise.
    common = [
        *SMALL,
        "--steps",
        "2",
        "--batching",
        "vmap",
        "--norm",
        "inductive",
        "--data-dir",
        str(omniglot_dir),
    ]
    two = _run_cli(
        "train",
        *common,
        "--out",
        str(tmp_path / "two"),
        "--shard",
        env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
    )
    assert two.returncode == 0, two.stderr
    one = _run_cli("train", *common, "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    a, b = _final_params(tmp_path / "one"), _final_params(tmp_path / "two")
    assert a.step == b.step == 2
    for x, y in zip(jax.tree.leaves(a.state), jax.tree.leaves(b.state), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-3, atol=1e-5)  # Adam step: 1e-3
    logged = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in logged] == [2]


@pytest.mark.slow
def test_running_norm_trains_resumes_and_evaluates(
    omniglot_dir, dataset_cache, tmp_path, capsys
):
    from maml_jax.checkpoint import Checkpointer

    run = tmp_path / "running"
    _train(omniglot_dir, run, "--steps", "2", "--norm", "running")
    capsys.readouterr()
    argv = ["train", "--resume", "--out", str(run), "--steps", "3", "--no-progress"]
    assert cli.main(argv) == 0
    assert "trained to step 3" in capsys.readouterr().out
    with Checkpointer(run / "checkpoints", read_only=True) as checkpointer:
        assert checkpointer.latest_step() == 3
    assert cli.main(["eval", "--run", str(run), "--episodes", "6"]) == 0
    results = json.loads((run / "test_results.json").read_text())
    assert results["trained_steps"] == 3
    assert np.all(np.isfinite(results["accuracy"]))


@pytest.mark.parametrize(
    "norm,model_norm,query_state",
    [
        ("running", "running", "start"),
        ("running-query", "running", "start"),
        ("support", "support", "support"),
    ],
)
def test_stateful_norms_build_their_model_and_learner(norm, model_norm, query_state):
    from maml_jax.app.learners import build_learner

    config = presets.FewShotConfig.from_preset("omniglot-5w1s", norm=norm, filters=4)
    model, _, learner, _, state = build_learner(config, (28, 28, 1))
    assert model.norm == model_norm and learner.has_state and state is not None
    assert learner.query_state == query_state
    if norm == "support":
        assert set(state["batch_stats"]) >= {"norm0_mean", "norm0_var", "norm0_count"}
