"""Tests for the train state, the jitted step, evaluation and ``fit``."""

import functools
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import maml_jax
from maml_jax import train
from tests import helpers

NUM_TASKS, K = 5, 10


def _setup(seed=0, lr=1e-3, learner=None):
    model = maml_jax.MLP(hidden_sizes=(16, 16))
    params = model.init(jax.random.key(seed), jnp.zeros((1, 1)))["params"]
    learner = learner or maml_jax.maml(
        maml_jax.regression_loss(model.apply), inner_lr=0.01, num_inner_steps=1
    )
    state = maml_jax.MetaTrainState.create(
        params=params, learner=learner, tx=optax.adam(lr)
    )
    return state, learner


def _sampler(key):
    return maml_jax.sample_sinusoid_tasks(key, NUM_TASKS, K, K)


def test_apply_gradients_matches_optax():
    state, _ = _setup()
    grads = jax.tree.map(jnp.ones_like, state.meta_params)
    new = state.apply_gradients(grads=grads)
    updates, _ = optax.adam(1e-3).update(grads, state.opt_state, state.meta_params)
    chex.assert_trees_all_close(
        new.meta_params, optax.apply_updates(state.meta_params, updates)
    )
    assert int(new.step) == 1


def test_meta_train_step_equals_manual_update_and_traces_once():
    state, learner = _setup()
    tasks = _sampler(jax.random.key(1))
    (_, _), grads = maml_jax.meta_value_and_grad(learner, state.meta_params, tasks)
    expected = state.apply_gradients(grads=grads).meta_params

    chex.clear_trace_counter()
    step = jax.jit(chex.assert_max_traces(train.train_step, n=1), donate_argnums=0)
    new_state, metrics = step(state, tasks)
    chex.assert_trees_all_close(new_state.meta_params, expected, rtol=1e-5)
    for key in ("loss", "grad_norm", "support_loss_pre", "query_loss_post"):
        assert metrics[key].shape == ()
    for seed in (2, 3):
        new_state, _ = step(new_state, _sampler(jax.random.key(seed)))
    assert int(new_state.step) == 3


def test_pre_adaptation_query_metrics_are_opt_in_and_leave_the_update_alone():
    state, learner = _setup()
    tasks = _sampler(jax.random.key(1))
    _, aux = helpers.batch_meta_loss(learner, state.meta_params, tasks)
    step = jax.jit(train.train_step, static_argnames=("pre_adaptation_query",))
    lean_state, lean = step(state, tasks)
    full_state, full = step(state, tasks, pre_adaptation_query=True)

    assert "query_loss_pre" not in lean and "query_loss_post" in lean
    assert "support_loss_pre" in lean  # free: the inner loop computes it
    assert set(full) == set(lean) | {"query_loss_pre"}
    np.testing.assert_allclose(full["query_loss_pre"], jnp.mean(aux["query_loss_pre"]))
    chex.assert_trees_all_equal(lean_state.meta_params, full_state.meta_params)
    for key in lean:
        np.testing.assert_array_equal(lean[key], full[key])


def test_public_meta_train_step_runs_and_donates():
    state, _ = _setup()
    new_state, metrics = maml_jax.meta_train_step(state, _sampler(jax.random.key(1)))
    assert int(new_state.step) == 1 and np.isfinite(float(metrics["loss"]))


def test_state_rejects_unknown_batching():
    with pytest.raises(ValueError, match="batching must be one of"):
        state, learner = _setup()
        maml_jax.MetaTrainState.create(
            params=state.meta_params, learner=learner, tx=optax.sgd(1.0), batching="x"
        )


def _sampler_f32(key):
    # float32 tasks, as in training on images: a step's last bits there depend on
    # how XLA compiles it, which is what the chunking tests below pin down.
    tasks = _sampler(key)
    return jax.tree.map(lambda x: x.astype(jnp.float32), tasks)


def _ends(records):
    return lambda state, record: records.append(record["step"])


@pytest.mark.parametrize("presample", [True, False])
def test_fit_is_bit_identical_for_any_chunking(monkeypatch, presample):
    if not presample:  # no batch fits: tasks are sampled inside the loop
        monkeypatch.setattr(train, "PRESAMPLE_MAX_BYTES", 1)
    finals, chunk_ends = [], []
    for steps_per_call, stop_every in ((8, ()), (8, ()), (1, ()), (50, (3, 5))):
        state, _ = _setup()
        ends = []
        state = maml_jax.fit(
            state,
            _sampler_f32,
            key=jax.random.key(42),
            num_steps=8,
            steps_per_call=steps_per_call,
            stop_every=stop_every,
            progress=False,
            callbacks=(_ends(ends),),
        )
        finals.append(jax.device_get((state.meta_params, state.opt_state)))
        chunk_ends.append(ends)
    assert chunk_ends[2:] == [list(range(1, 9)), [3, 5, 6, 8]]  # lengths 1, 3, 2
    for other in finals[1:]:
        chex.assert_trees_all_equal(finals[0], other)  # bit for bit


def _fit_records(state, num_steps, steps_per_call, path, **kwargs):
    state = maml_jax.fit(
        state,
        _sampler_f32,
        key=jax.random.key(42),
        num_steps=num_steps,
        steps_per_call=steps_per_call,
        metrics_path=path,
        progress=False,
        nonfinite="skip",
        **kwargs,
    )
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for record in records:
        del record["tasks_per_s"]  # a timing
    return state, records


def test_fit_runs_a_short_last_chunk_with_the_same_program_bit_identically(
    tmp_path,
):
    template = _setup()[0]  # one learner and tx, so fit calls can share programs
    fresh = lambda: jax.tree.map(jnp.copy, template)  # fit donates its state
    train._scan_train_steps_jit.clear_cache()
    # Chunks of 4, 4 and 2: the last runs the 4-step program with 2 steps active.
    masked, masked_records = _fit_records(fresh(), 10, 4, tmp_path / "a.jsonl")
    assert train._scan_train_steps_jit._cache_size() == 1
    assert [r["step"] for r in masked_records] == [4, 8, 10]
    # The same chunks, the last one a 2-step program with every step active.
    part, _ = _fit_records(fresh(), 8, 4, tmp_path / "b.jsonl")
    full, full_records = _fit_records(part, 10, 2, tmp_path / "b.jsonl")
    assert train._scan_train_steps_jit._cache_size() == 2
    chex.assert_trees_all_equal(masked, full)  # step, skipped_steps included
    assert masked_records == full_records
    assert int(masked.step) == 10 and int(masked.skipped_steps) == 0
    # And unchunked, one step per call.
    single, _ = _fit_records(fresh(), 10, 1, tmp_path / "c.jsonl")
    chex.assert_trees_all_equal(masked, single)


def test_steps_beyond_active_steps_do_not_run():
    state, _ = _setup()
    run = jax.jit(
        lambda s, n, active: train.scan_train_steps(
            s, jax.random.key(3), _sampler_f32, n, active_steps=active
        ),
        static_argnums=1,
    )
    ref_state, ref_metrics = run(state, 2, None)
    new_state, metrics = run(state, 4, jnp.int32(2))
    chex.assert_trees_all_equal(new_state, ref_state)
    for name, values in metrics.items():
        assert values.shape == (4,)
        np.testing.assert_array_equal(values[:2], ref_metrics[name])
        np.testing.assert_array_equal(values[2:], 0)
    unchanged, _ = run(state, 4, jnp.int32(0))
    chex.assert_trees_all_equal(unchanged, state)


def test_fit_compiles_the_chunk_program_once_for_equal_samplers():
    template = _setup()[0]
    fresh = lambda: jax.tree.map(jnp.copy, template)
    train._scan_train_steps_jit.clear_cache()
    sampler = lambda: functools.partial(
        maml_jax.sample_sinusoid_tasks, num_tasks=NUM_TASKS, num_support=K, num_query=K
    )
    for _ in range(2):  # a new but equal partial each time
        maml_jax.fit(
            fresh(),
            sampler(),
            key=jax.random.key(0),
            num_steps=10,
            steps_per_call=4,
            progress=False,
        )
    assert train._scan_train_steps_jit._cache_size() == 1
    # A new lambda is a new function object, so a new program (documented).
    maml_jax.fit(
        fresh(),
        lambda key: sampler()(key),
        key=jax.random.key(0),
        num_steps=10,
        steps_per_call=4,
        progress=False,
    )
    assert train._scan_train_steps_jit._cache_size() == 2


def test_fit_refuses_a_sampler_of_single_tasks():
    state, _ = _setup()
    one_task = lambda key: maml_jax.unstack_tasks(_sampler(key))[0]
    match = r"fit: sample_tasks\(key\) got a single Task.*stack_tasks"
    with pytest.raises(TypeError, match=match):
        maml_jax.fit(state, one_task, key=jax.random.key(0), num_steps=1)


def test_fit_chunks_end_where_evaluation_or_a_stop_is_due():
    ends, evaluated = [], []
    state, _ = _setup()

    def eval_fn(state):
        evaluated.append(int(state.step))
        return {}

    maml_jax.fit(
        state,
        _sampler,
        key=jax.random.key(0),
        num_steps=17,
        steps_per_call=4,
        eval_fn=eval_fn,
        eval_every=6,
        stop_every=(5,),
        progress=False,
        callbacks=(_ends(ends),),
    )
    assert ends == [4, 5, 6, 10, 12, 15, 17]
    assert evaluated == [6, 12, 17]  # multiples of eval_every, and the end
    with pytest.raises(ValueError, match="stop_every must be >= 1"):
        maml_jax.fit(
            state, _sampler, key=jax.random.key(0), num_steps=1, stop_every=(0,)
        )


def test_fit_evaluates_at_multiples_of_eval_every_after_a_resume():
    key = jax.random.key(5)

    def run(state, num_steps, stop_at=None):
        evaluated = []

        def eval_fn(state):
            evaluated.append(int(state.step))
            return {}

        def stop(state, record):
            if record["step"] == stop_at:
                raise train.StopTraining

        state = maml_jax.fit(
            state,
            _sampler,
            key=key,
            num_steps=num_steps,
            steps_per_call=3,
            eval_fn=eval_fn,
            eval_every=4,
            progress=False,
            callbacks=(stop,),
        )
        return state, evaluated

    full, full_evals = run(_setup()[0], 12)
    part, part_evals = run(_setup()[0], 12, stop_at=7)  # chunks end at 3, 4, 7
    assert int(part.step) == 7 and part_evals == [4]
    resumed, resumed_evals = run(part, 12)
    assert full_evals == part_evals + resumed_evals == [4, 8, 12]
    chex.assert_trees_all_equal(full.meta_params, resumed.meta_params)


def test_fit_resumes_where_it_stopped():
    key = jax.random.key(7)
    full, _ = _setup()
    full = maml_jax.fit(full, _sampler, key=key, num_steps=10, progress=False)
    part, _ = _setup()
    part = maml_jax.fit(part, _sampler, key=key, num_steps=6, progress=False)
    part = maml_jax.fit(part, _sampler, key=key, num_steps=10, progress=False)
    chex.assert_trees_all_close(full.meta_params, part.meta_params, rtol=1e-6)


def test_fit_writes_metrics_and_evaluates(tmp_path):
    path = tmp_path / "metrics.jsonl"
    state, learner = _setup()
    test_tasks = maml_jax.sample_sinusoid_tasks(jax.random.key(9), 20, K, K)

    def eval_fn(state):
        curves = maml_jax.evaluate(learner, state.meta_params, test_tasks, num_steps=2)
        return {"query_loss_1": curves["query_loss"][:, 1].mean()}

    seen = []
    maml_jax.fit(
        state,
        _sampler,
        key=jax.random.key(0),
        num_steps=9,
        steps_per_call=3,
        eval_fn=eval_fn,
        eval_every=6,
        metrics_path=path,
        progress=True,
        callbacks=(lambda s, r: seen.append(r["step"]),),
    )
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in records] == [3, 6, 9] == seen
    assert "eval/query_loss_1" in records[1] and "eval/query_loss_1" in records[2]
    assert "eval/query_loss_1" not in records[0]
    assert all(r["tasks_per_s"] > 0 and np.isfinite(r["loss"]) for r in records)


def test_fit_learns_sinusoids():
    state, learner = _setup(lr=3e-3)
    test_tasks = maml_jax.sample_sinusoid_tasks(jax.random.key(9), 50, K, K)
    before = maml_jax.evaluate(learner, state.meta_params, test_tasks, num_steps=1)
    state = maml_jax.fit(
        state, _sampler, key=jax.random.key(1), num_steps=1500, progress=False
    )
    after = maml_jax.evaluate(learner, state.meta_params, test_tasks, num_steps=1)
    assert after["query_loss"][:, 1].mean() < 0.5 * before["query_loss"][:, 1].mean()


def test_fit_stops_on_non_finite_loss():
    state, _ = _setup(lr=1e-3)
    nan_sampler = lambda key: jax.tree.map(lambda x: x * jnp.nan, _sampler(key))
    with pytest.raises(FloatingPointError, match="meta-loss became nan"):
        maml_jax.fit(
            state, nan_sampler, key=jax.random.key(0), num_steps=2, progress=False
        )


def test_evaluate_shapes_and_summary():
    state, learner = _setup()
    tasks = maml_jax.sample_sinusoid_tasks(jax.random.key(3), 30, 5, 20)
    curves = maml_jax.evaluate(
        learner, state.meta_params, tasks, num_steps=3, batch_size=7
    )
    assert curves["query_loss"].shape == (30, 4)
    full = maml_jax.evaluate(learner, state.meta_params, tasks, num_steps=3)
    np.testing.assert_allclose(curves["query_loss"], full["query_loss"], rtol=1e-5)
    summary = maml_jax.summarize_curves(curves)
    assert len(summary["query_loss"]) == 4 and len(summary["query_loss_ci95"]) == 4


def test_learning_curve_plots_logs_with_and_without_pre_adaptation_metrics(tmp_path):
    from maml_jax.app import plots

    for name, extra in (("post", {}), ("both", {"query_accuracy_pre": 0.2})):
        path = tmp_path / f"{name}.jsonl"
        rows = [
            {"step": s, "loss": 1.0 / s, "query_accuracy_post": 0.5, **extra}
            for s in (1, 2, 3)
        ]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        png = plots.learning_curve(path, tmp_path / f"{name}.png")
        assert png.stat().st_size > 5_000
    empty = tmp_path / "empty.jsonl"  # a --steps 0 run: no records, no legend
    empty.write_text("")
    assert plots.learning_curve(empty, tmp_path / "empty.png").is_file()


def _presampled(jaxpr) -> bool:
    """Whether the step keys are drawn before the loop (not inside its body)."""
    return any(e.primitive.name == "random_fold_in" for e in jaxpr.eqns)


@pytest.mark.parametrize("num_steps", [1, 5])
def test_presampled_scan_draws_the_same_tasks_and_update(num_steps):
    key = jax.random.key(3)
    results = []
    for presample in (True, False):
        state, _ = _setup()
        run = jax.jit(
            lambda s, k, p=presample: train.scan_train_steps(
                s, k, _sampler, num_steps, presample=p
            )
        )
        results.append(run(state, key))
    (new_a, metrics_a), (new_b, metrics_b) = results
    assert int(new_a.step) == int(new_b.step) == num_steps
    chex.assert_trees_all_close(new_a.meta_params, new_b.meta_params, rtol=1e-6)
    chex.assert_trees_all_close(metrics_a, metrics_b, rtol=1e-5)
    assert metrics_a["loss"].shape == (num_steps,)


def test_scan_presamples_by_default_only_when_the_batches_are_small(monkeypatch):
    state, _ = _setup()
    trace = lambda: jax.make_jaxpr(
        lambda s, k: train.scan_train_steps(s, k, _sampler, 10)
    )(state, jax.random.key(0))
    assert _presampled(trace().jaxpr)
    batch_bytes = 4 * NUM_TASKS * 2 * (K + K)
    monkeypatch.setattr(train, "PRESAMPLE_MAX_BYTES", 10 * batch_bytes - 1)
    assert not _presampled(trace().jaxpr)
