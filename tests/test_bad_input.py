"""Property-based checks: every invalid input is a clear error, every valid one runs."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import maml_jax
from maml_jax.app import cli, presets
from maml_jax.episodes import EpisodeSpec, check_episode_spec
from tests import helpers

FAST = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)

bad_steps = st.one_of(
    st.integers(max_value=0),
    st.floats(allow_nan=True),
    st.booleans(),
    st.text(max_size=3),
    st.none(),
)
bad_lrs = st.one_of(
    st.floats(max_value=0.0),
    st.just(math.nan),
    st.just(math.inf),
    st.booleans(),
    st.none(),
)
FACTORIES = {
    "maml": lambda **kw: maml_jax.maml(helpers.linear_loss, **kw),
    "fomaml": lambda **kw: maml_jax.fomaml(helpers.linear_loss, **kw),
    "reptile": lambda **kw: maml_jax.reptile(helpers.linear_loss, **kw),
    "meta_sgd": lambda **kw: maml_jax.meta_sgd(helpers.linear_loss, **kw),
    "maml_plus_plus": lambda **kw: maml_jax.maml_plus_plus(helpers.linear_loss, **kw),
    "imaml": lambda **kw: maml_jax.imaml(helpers.linear_loss, reg_lambda=1.0, **kw),
    "anil": lambda **kw: maml_jax.anil(helpers.linear_loss, adapt_mask=True, **kw),
}


@pytest.mark.parametrize("name", sorted(FACTORIES))
@FAST
@given(steps=bad_steps)
def test_bad_num_inner_steps_is_rejected_by_every_learner(name, steps):
    with pytest.raises((ValueError, TypeError), match="num_inner_steps"):
        FACTORIES[name](inner_lr=0.1, num_inner_steps=steps)


@pytest.mark.parametrize("name", sorted(FACTORIES))
@FAST
@given(lr=bad_lrs)
def test_bad_inner_lr_is_rejected_by_every_learner(name, lr):
    with pytest.raises((ValueError, TypeError), match="inner_lr"):
        FACTORIES[name](inner_lr=lr, num_inner_steps=1)


@settings(max_examples=12, deadline=None)
@given(
    num_tasks=st.integers(1, 4),
    support=st.integers(1, 6),
    query=st.integers(1, 6),
    dim=st.integers(1, 4),
    steps=st.integers(1, 3),
)
def test_every_valid_shape_runs(num_tasks, support, query, dim, steps):
    tasks = helpers.linear_tasks(jax.random.key(0), num_tasks, support, query, dim)
    learner = maml_jax.maml(helpers.linear_loss, inner_lr=0.01, num_inner_steps=steps)
    (loss, aux), grads = maml_jax.meta_value_and_grad(learner, jnp.zeros(dim), tasks)
    assert grads.shape == (dim,) and bool(jnp.all(jnp.isfinite(grads)))
    assert aux["query_loss_post"].shape == (num_tasks,)


@settings(max_examples=12, deadline=None)
@given(support_tasks=st.integers(1, 5), query_tasks=st.integers(1, 5))
def test_mismatched_task_axes_are_rejected(support_tasks, query_tasks):
    tasks = helpers.linear_tasks(jax.random.key(0), max(support_tasks, query_tasks))
    bad = maml_jax.TaskBatch(
        support=jax.tree.map(lambda x: x[:support_tasks], tasks.support),
        query=jax.tree.map(lambda x: x[:query_tasks], tasks.query),
    )
    learner = maml_jax.maml(helpers.linear_loss, inner_lr=0.01, num_inner_steps=1)
    if support_tasks == query_tasks:
        maml_jax.meta_value_and_grad(learner, jnp.zeros(3), bad)
    else:
        with pytest.raises(ValueError, match="same leading task axis length"):
            maml_jax.meta_value_and_grad(learner, jnp.zeros(3), bad)


@FAST
@given(
    ways=st.integers(-2, 30),
    shots=st.integers(-2, 25),
    queries=st.integers(-2, 25),
    classes=st.integers(1, 25),
    rotations=st.booleans(),
)
def test_episode_specs_are_valid_exactly_when_they_fit(
    ways, shots, queries, classes, rotations
):
    spec = EpisodeSpec(ways, shots, queries, rotations)
    available = classes * (4 if rotations else 1)
    fits = (
        ways >= 1
        and shots >= 1
        and queries >= 1
        and ways <= available
        and (shots + queries <= 20)
    )
    if fits:
        check_episode_spec(spec, (classes, 20, 4, 4, 1))
    else:
        with pytest.raises((ValueError, TypeError)):
            check_episode_spec(spec, (classes, 20, 4, 4, 1))


INT_FIELDS = (
    "ways",
    "shots",
    "queries",
    "meta_batch",
    "inner_steps",
    "test_inner_steps",
    "val_episodes",
)


@FAST
@given(field=st.sampled_from(INT_FIELDS), value=st.integers(-5, 0))
def test_config_rejects_non_positive_counts(field, value):
    with pytest.raises(ValueError, match=f"--{field.replace('_', '-')} must be >= 1"):
        presets.FewShotConfig.from_preset("omniglot-5w1s", **{field: value})


@FAST
@given(
    field=st.sampled_from(("inner_lr", "outer_lr")),
    value=st.one_of(st.floats(max_value=0.0), st.just(math.nan), st.just(math.inf)),
)
def test_config_rejects_bad_learning_rates(field, value):
    with pytest.raises(
        ValueError, match=f"--{field.replace('_', '-')} must be a finite"
    ):
        presets.FewShotConfig.from_preset("omniglot-5w1s", **{field: value})


@FAST
@given(
    flag=st.sampled_from(
        [
            "--ways",
            "--shots",
            "--meta-batch",
            "--inner-steps",
            "--steps",
            "--inner-lr",
            "--outer-lr",
        ]
    ),
    value=st.sampled_from(["-1", "0", "abc", "1e999", "nan", ""]),
)
def test_cli_bad_flag_values_exit_2_with_one_line(flag, value, tmp_path, capsys):
    argv = [
        "train",
        "--preset",
        "omniglot-5w1s",
        "--data-dir",
        str(tmp_path),
        "--out",
        str(tmp_path / "run"),
        flag,
        value,
    ]
    try:
        code = cli.main(argv)
    except SystemExit as exit_:  # argparse's own type errors
        code = exit_.code
    err = capsys.readouterr().err
    if flag == "--steps" and value == "0":
        # --steps 0 is valid; the empty data dir is then the error.
        assert code == 2 and "images_background.zip" in err
        return
    assert code == 2
    assert "Traceback" not in err and err.strip()
    assert flag in err or flag.lstrip("-").replace("-", "_") in err or "argument" in err


def test_steps_zero_is_a_full_valid_run_shape():
    config = presets.FewShotConfig.from_preset("omniglot-5w1s", steps=0)
    assert config.steps == 0


@pytest.mark.parametrize("bad", [np.zeros((5, 20, 28, 28)), np.zeros((5, 20))])
def test_sample_episodes_rejects_bad_data_shapes(bad):
    with pytest.raises(ValueError, match="num_classes, num_examples, H, W, C"):
        maml_jax.sample_episodes(
            jax.random.key(0), jnp.asarray(bad), EpisodeSpec(2, 1, 1), 2
        )


# --- Library edge cases: no tasks, no examples ------------------------------


def _with_examples(tasks, num_support, num_query):
    return maml_jax.TaskBatch(
        support=jax.tree.map(lambda x: x[:, :num_support], tasks.support),
        query=jax.tree.map(lambda x: x[:, :num_query], tasks.query),
    )


@pytest.mark.parametrize("batching", ["auto", "vmap", "scan", "unroll"])
def test_a_batch_of_no_tasks_is_a_clear_error(batching):
    # Was ZeroDivisionError, NaN or "Need at least one array to stack".
    tasks = jax.tree.map(lambda x: x[:0], helpers.linear_tasks(jax.random.key(0)))
    learner = maml_jax.maml(helpers.linear_loss, inner_lr=0.01, num_inner_steps=1)
    with pytest.raises(ValueError, match="a batch of tasks needs at least one task"):
        maml_jax.meta_value_and_grad(learner, jnp.zeros(3), tasks, batching=batching)
    with pytest.raises(ValueError, match="a batch of tasks needs at least one task"):
        maml_jax.evaluate(learner, jnp.zeros(3), tasks, num_steps=1)


def _protonet_setup():
    learner = maml_jax.protonet(lambda p, x: x @ p, ways=2)
    x = jax.random.normal(jax.random.key(0), (3, 4, 3))
    labels = jnp.tile(jnp.array([0, 1, 0, 1]), (3, 1))
    return learner, jnp.eye(3), maml_jax.TaskBatch((x, labels), (x, labels))


LEARNER_SETUPS = {
    **{
        name: lambda f=factory: (
            f(inner_lr=0.01, num_inner_steps=1),
            jnp.zeros(3),
            helpers.linear_tasks(jax.random.key(0), 3, 4, 4),
        )
        for name, factory in FACTORIES.items()
    },
    "protonet": _protonet_setup,
}


@pytest.mark.parametrize("name", sorted(LEARNER_SETUPS))
@pytest.mark.parametrize("part", ["support", "query"])
def test_an_empty_support_or_query_set_is_a_clear_error(name, part):
    # An empty support set used to train silently with no adaptation.
    learner, params, tasks = LEARNER_SETUPS[name]()
    meta_params = learner.init(params)
    empty = _with_examples(tasks, *((0, 4) if part == "support" else (4, 0)))
    match = f"task.{part}.*example axis.*is empty"
    with pytest.raises(ValueError, match=match):
        learner.meta_loss(meta_params, helpers.task_at(empty, 0))
    with pytest.raises(ValueError, match=match):
        maml_jax.meta_value_and_grad(learner, meta_params, empty)
    if part == "support":
        with pytest.raises(ValueError, match="adapt: support.*example axis.*empty"):
            learner.adapt(meta_params, helpers.task_at(empty, 0).support)
    # One example is enough.
    one = _with_examples(tasks, 1, 1)
    (loss, _), _ = maml_jax.meta_value_and_grad(learner, meta_params, one)
    assert bool(jnp.isfinite(loss))


# --- CLI: one line on stderr, exit status 2, before any work ----------------


def _cli(argv, capsys):
    """``(exit status, stderr)`` of ``maml-jax ARGV``."""
    capsys.readouterr()
    try:
        code = cli.main(argv)
    except SystemExit as exit_:
        code = exit_.code
    except KeyboardInterrupt:  # would end the whole pytest session
        pytest.fail("KeyboardInterrupt escaped cli.main")
    return code, capsys.readouterr().err


def _assert_one_line(err, *needles):
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err


@pytest.fixture
def no_sinusoid_training(monkeypatch):
    from maml_jax.app import sinusoid

    def train(*args, **kwargs):
        raise AssertionError("training started before the options were checked")

    monkeypatch.setattr(sinusoid, "train", train)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--steps", "-1"], "--steps must be >= 0; got -1"),
        (["--steps", str(10**20)], "--steps must be <= 2,147,483,647"),
        (["--inner-lr", "nan"], "--inner-lr must be a finite number > 0; got nan"),
        (["--outer-lr=-inf"], "--outer-lr must be a finite number > 0"),
        (["--meta-batch", "0"], "--meta-batch must be >= 1; got 0"),
        (["--meta-batch", "200000"], "--meta-batch must be <= 10,000"),
        (["--shots", "0"], "--shots must be >= 1; got 0"),
        (["--queries", "0"], "--queries must be >= 1"),
        (["--hidden", "40", "0"], "--hidden must be >= 1; got 0"),
        (["--inner-steps", "0"], "--inner-steps must be >= 1"),
        (["--test-tasks", "1"], "--test-tasks must be >= 2; got 1"),
        (["--test-shots", "5", "0"], "--test-shots must be >= 1"),
        (["--test-queries", "0"], "--test-queries must be >= 1"),
        (["--test-steps", "1000000000"], "--test-steps must be <= 10,000"),
        (["--steps-per-call", "0"], "--steps-per-call must be >= 1"),
        (["--seed", "-1"], "--seed must be >= 0"),
        (["--steps", "1e20"], "argument --steps: invalid int value"),
    ],
)
def test_sinusoid_bad_options_are_one_line_before_training(
    extra, message, tmp_path, capsys, no_sinusoid_training
):
    code, err = _cli(["sinusoid", *extra, "--out", str(tmp_path / "out")], capsys)
    assert code == 2
    _assert_one_line(err, "maml-jax sinusoid: error:", message)
    assert not (tmp_path / "out").exists()


def test_sinusoid_out_must_not_be_a_file(tmp_path, capsys, no_sinusoid_training):
    (tmp_path / "file").write_text("")
    code, err = _cli(["sinusoid", "--out", str(tmp_path / "file")], capsys)
    assert code == 2
    _assert_one_line(err, "exists and is not a folder")


def test_sinusoid_sizes_that_cannot_fit_name_the_option_and_limit(
    tmp_path, capsys, monkeypatch, no_sinusoid_training
):
    from maml_jax.app import options

    monkeypatch.setattr(options, "memory_bytes", lambda: (10**8, "this machine"))
    out = ["--out", str(tmp_path / "out")]
    code, err = _cli(["sinusoid", "--meta-batch", "5000", *out], capsys)
    assert code == 2
    _assert_one_line(err, "--meta-batch 5,000:", "100.0 MB", "use at most --meta-batch")
    most = int(err.split("use at most --meta-batch ")[1].rstrip(".\n").replace(",", ""))
    assert 25 < most < 5000
    code, err = _cli(["sinusoid", "--test-tasks", "100000", *out], capsys)
    _assert_one_line(err, "--test-tasks 100,000:", "use at most --test-tasks")
    code, err = _cli(["sinusoid", "--hidden", "40000", "40000", *out], capsys)
    _assert_one_line(err, "even --meta-batch 1 does not fit")


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("val_episodes", 50_000_000, "--val-episodes must be <= 1,000,000"),
        ("meta_batch", 200_000, "--meta-batch must be <= 10,000"),
        ("test_inner_steps", 10**9, "--test-inner-steps must be <= 10,000"),
        ("inner_steps", 10**6, "--inner-steps must be <= 1,000"),
        ("steps", 10**20, "--steps must be <= 2,147,483,647"),
        ("filters", 10**7, "--filters must be <= 100,000"),
    ],
)
def test_config_caps_sizes(field, value, message):
    with pytest.raises(ValueError, match=message):
        presets.FewShotConfig.from_preset("omniglot-5w1s", **{field: value})


def test_config_checks_the_validation_episodes_fit_in_memory(monkeypatch):
    from maml_jax.app import options

    monkeypatch.setattr(options, "memory_bytes", lambda: (10**9, "this machine"))
    # 10 images of 28x28x1 float32 an episode: 31,360 bytes; 1 GB holds 31,887.
    with pytest.raises(ValueError, match="use at most --val-episodes 31,887"):
        presets.FewShotConfig.from_preset("omniglot-5w1s", val_episodes=40_000)
    presets.FewShotConfig.from_preset("omniglot-5w1s", val_episodes=30_000)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--val-episodes", "50000000"], "--val-episodes must be <= 1,000,000"),
        (["--test-inner-steps", "1000000000"], "--test-inner-steps must be <="),
        (["--meta-batch", "200000"], "--meta-batch must be <= 10,000"),
    ],
)
def test_train_sizes_are_checked_before_loading_data(extra, message, tmp_path, capsys):
    # tmp_path holds no dataset: the error must come before any loading.
    argv = ["train", "--preset", "omniglot-5w1s", "--data-dir", str(tmp_path)]
    code, err = _cli([*argv, "--out", str(tmp_path / "run"), *extra], capsys)
    assert code == 2
    _assert_one_line(err, "maml-jax train: error:", message)


def test_eval_episodes_are_capped(tmp_path, capsys):
    argv = ["eval", "--run", str(tmp_path), "--data-dir", str(tmp_path)]
    code, err = _cli([*argv, "--episodes", "100000000"], capsys)
    assert code == 2
    _assert_one_line(err, "--episodes must be <= 1,000,000")


def test_argparse_errors_are_one_line(capsys):
    code, err = _cli(["train", "--preset", "omniglot-9w9s"], capsys)
    assert code == 2
    _assert_one_line(err, "maml-jax train: error:", "invalid choice")
    code, err = _cli(["sinusoid", "--algorithm", "nope"], capsys)
    assert code == 2
    _assert_one_line(err, "maml-jax sinusoid: error:", "invalid choice")


# --- Run folders: config.json and metrics.jsonl written by someone else ------


def _write_run(tmp_path, **changes):
    import dataclasses
    import json

    config = dataclasses.asdict(presets.FewShotConfig.from_preset("omniglot-5w1s"))
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({**config, **changes}))
    return run


@pytest.mark.parametrize("command", ["eval", "resume"])
def test_unknown_dataset_in_config_json_is_one_line(command, tmp_path, capsys):
    # Was a KeyError traceback from SPLITS[config.dataset].
    run = _write_run(tmp_path, dataset="cifar")
    if command == "eval":
        argv = ["eval", "--run", str(run), "--data-dir", str(tmp_path)]
    else:
        argv = ["train", "--preset", "omniglot-5w1s", "--data-dir", str(tmp_path)]
        argv += ["--out", str(run), "--resume"]
    code, err = _cli(argv, capsys)
    assert code == 2
    _assert_one_line(err, "config.json", "unknown dataset 'cifar'")


@pytest.mark.parametrize(
    "text,message",
    [
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "must hold a JSON object"),
        (None, "unknown keys colour"),
        ("ways", "ways must be int; got '5'"),
    ],
)
def test_config_json_that_is_not_a_run_configuration(text, message, tmp_path):
    import json

    run = _write_run(tmp_path)
    path = run / "config.json"
    config = json.loads(path.read_text())
    if text is None:
        path.write_text(json.dumps({**config, "colour": "red"}))
    elif text == "ways":
        path.write_text(json.dumps({**config, "ways": "5"}))
    else:
        path.write_text(text)
    with pytest.raises(ValueError, match=message):
        presets.FewShotConfig.load(path)


def test_resume_log_with_a_record_without_step_is_a_clear_error(tmp_path):
    from maml_jax.app import runs

    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 2, "loss": 1.0}\n{"loss": 0.5}\n{"step": 6, "loss": 0')
    with pytest.raises(ValueError, match=r"metrics.jsonl line 2 has no integer 'step'"):
        runs._truncate_log(log, 4)
    log.write_text('{"step": 2, "loss": 1.0}\n{"step": 6, "loss": 0.5}\n{"step": 8')
    runs._truncate_log(log, 4)  # a line cut short by a crash is dropped
    assert log.read_text() == '{"step": 2, "loss": 1.0}\n'


def test_plot_skips_malformed_log_lines_with_a_warning(tmp_path, caplog):
    from maml_jax.app import plots

    log = tmp_path / "metrics.jsonl"
    log.write_text(
        '{"step": 2, "loss": 1.0, "query_loss_post": 0.9}\n'
        '{"loss": 0.5}\n'
        "[3]\n"
        '{"step": 4, "loss": 0.7, "query_loss_post": 0.6}\n'
        '{"step": 6, "lo'
    )
    with caplog.at_level("WARNING", logger="maml_jax.app.plots"):
        png = plots.learning_curve(log, tmp_path / "curve.png")
    assert png.stat().st_size > 1000
    assert "skipped 3 malformed line(s)" in caplog.text and "line 2" in caplog.text


# --- CLI: interrupts and the errors main turns into one line ----------------


def _raise(error):
    def fail(*args, **kwargs):
        raise error

    return fail


@pytest.mark.parametrize("command", ["train", "sinusoid"])
def test_keyboard_interrupt_at_start_up_is_one_line_and_130(
    command, tmp_path, capsys, monkeypatch
):
    from maml_jax.app import sinusoid

    monkeypatch.setattr(presets.FewShotConfig, "from_preset", _raise(KeyboardInterrupt))
    monkeypatch.setattr(sinusoid, "main", _raise(KeyboardInterrupt))
    argv = ["train", "--preset", "omniglot-5w1s", "--data-dir", str(tmp_path)]
    argv = [*argv, "--out", str(tmp_path / "run")] if command == "train" else [command]
    code, err = _cli(argv, capsys)
    assert code == 130
    _assert_one_line(err, f"maml-jax {command}: interrupted (SIGINT).")
    with pytest.raises(KeyboardInterrupt):  # --debug shows where
        cli.main([*argv, "--debug"])


@pytest.mark.parametrize(
    "error,shown",
    [
        (OverflowError("Python int too large to convert to C long"), "too large"),
        (FileExistsError("runs/x exists"), "runs/x exists"),
        (MemoryError(), "out of memory (MemoryError)"),
        (RuntimeError("RESOURCE_EXHAUSTED: Out of memory\nallocating 9 GB"), "9 GB"),
        (ValueError("first line\n  second line"), "first line second line"),
    ],
)
def test_expected_errors_are_one_line(error, shown, capsys, monkeypatch):
    from maml_jax.app import sinusoid

    monkeypatch.setattr(sinusoid, "main", _raise(error))
    code, err = _cli(["sinusoid"], capsys)
    assert code == 2
    _assert_one_line(err, "maml-jax sinusoid: error:", shown)


def test_unexpected_errors_keep_their_traceback(monkeypatch):
    from maml_jax.app import sinusoid

    monkeypatch.setattr(sinusoid, "main", _raise(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["sinusoid"])


def test_sigint_while_starting_up_is_one_line_and_130(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    # The child reports once cli.main runs (importing the maml_jax package
    # itself happens before main and is not main's to handle), then SIGINT lands
    # while it imports jax's modules, builds the model or compiles.
    # A pytest-xdist worker ignores SIGINT and an ignored signal stays ignored
    # across exec, so the child first restores Python's own handler, as it has
    # when started from a shell.
    script = (
        "import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "import sys; from maml_jax.app import cli; print('main', flush=True); "
        "sys.argv[1:] = ['sinusoid', '--smoke', '--no-progress', '--out', "
        f"{str(tmp_path / 'out')!r}]; sys.exit(cli.main())"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    try:
        assert child.stdout.readline() == "main\n"
        time.sleep(0.5)  # inside main for sure: the smoke run takes seconds more
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=120)
    finally:
        child.kill()
    assert child.returncode == 130, err
    _assert_one_line(err, "maml-jax sinusoid: interrupted (SIGINT).")
