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
    bad = maml_jax.Task(
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
