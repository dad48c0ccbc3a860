"""``autotune.tune_batching``: measures every candidate, caches per machine and
program; ``fit`` trains an ``"auto"`` state with the measured chunk size (that
every chunk size gives the same meta-gradient is tested in test_core.py)."""

import json

import chex
import jax
import jax.numpy as jnp
import optax
import pytest

import maml_jax
from maml_jax import autotune, core

T, K, H = 4, 5, 4  # tasks, examples per set, image side


def _linear_loss(params, batch):
    """Cross-entropy of a linear classifier on flattened (K, H, H, 1) images."""
    x, y = batch
    logits = x.reshape(x.shape[0], -1) @ params["w"] + params["b"][None]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _problem(inner_lr=0.1, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    params = {
        "w": 0.1 * jax.random.normal(keys[0], (H * H, K)),
        "b": jnp.zeros(K),
    }
    x = jax.random.normal(keys[1], (T, K, H, H, 1))
    y = jnp.tile(jnp.arange(K), (T, 1))
    xq = jax.random.normal(keys[2], (T, K, H, H, 1))
    tasks = maml_jax.TaskBatch((x, y), (xq, y))
    learner = maml_jax.maml(_linear_loss, inner_lr=inner_lr, num_inner_steps=1)
    return learner, learner.init(params), tasks


@pytest.fixture
def on(monkeypatch):
    monkeypatch.setenv(autotune.ENV_SWITCH, "1")


def test_candidate_chunks_are_the_divisors_up_to_eight():
    assert autotune.candidate_chunks(32) == (1, 2, 4, 8)
    assert autotune.candidate_chunks(6) == (1, 2, 3, 6)
    assert autotune.candidate_chunks(5) == (1, 5)
    assert autotune.candidate_chunks(1) == (1,)


def test_machine_description_names_the_cpu_and_its_vector_units():
    cpuinfo = (
        "processor\t: 0\nmodel name\t: AMD EPYC 7B13\n"
        "flags\t\t: fpu sse avx2 fma\nprocessor\t: 1\nmodel name\t: other\n"
    )
    described = autotune.machine_description(cpuinfo)
    assert described["cpu"] == "AMD EPYC 7B13"
    assert described["cpu_flags"] == ["avx2", "fma"]
    assert described["jax"] == jax.__version__
    assert described["backend"] == jax.default_backend()


def test_measures_every_candidate_then_reads_the_cache(tmp_path, on):
    learner, meta_params, tasks = _problem()
    first = autotune.tune_batching(learner, meta_params, tasks, cache_dir=tmp_path)
    assert first.source == "measured" and first.batching == "scan"
    assert set(first.step_seconds) == set(first.compile_seconds) == {1, 2, 4}
    assert all(s > 0 for s in first.step_seconds.values())
    assert first.step_seconds[first.chunk_size] == min(first.step_seconds.values())
    [entry] = tmp_path.iterdir()
    assert json.loads(entry.read_text())["chunk_size"] == first.chunk_size

    again = autotune.tune_batching(learner, meta_params, tasks, cache_dir=tmp_path)
    assert again.source == "cache"
    assert again.as_dict() | {"source": "measured"} == first.as_dict()


def test_another_program_or_candidate_set_is_measured_anew(tmp_path, on):
    learner, meta_params, tasks = _problem()

    def tune(learner, meta_params, tasks, chunks=(1, 2)):
        return autotune.tune_batching(
            learner, meta_params, tasks, chunks=chunks, repeats=1, cache_dir=tmp_path
        ).source

    assert tune(learner, meta_params, tasks) == "measured"
    # New parameter and data values: the same program.
    _, new_params, new_tasks = _problem(seed=1)
    assert tune(learner, new_params, new_tasks) == "cache"
    # Another inner learning rate is another program.
    other, _, _ = _problem(inner_lr=0.2)
    assert tune(other, meta_params, tasks) == "measured"
    assert tune(learner, meta_params, tasks, chunks=(1, 4)) == "measured"
    assert len(list(tmp_path.iterdir())) == 3


def test_an_unreadable_cache_entry_is_measured_again(tmp_path, on):
    learner, meta_params, tasks = _problem()
    kwargs = dict(chunks=(1, 2), repeats=1, cache_dir=tmp_path)
    autotune.tune_batching(learner, meta_params, tasks, **kwargs)
    [entry] = tmp_path.iterdir()
    entry.write_text('{"batching": "scan", "chunk')
    choice = autotune.tune_batching(learner, meta_params, tasks, **kwargs)
    assert choice.source == "measured"
    assert json.loads(entry.read_text())["chunk_size"] == choice.chunk_size


def test_switched_off_it_is_the_rule_and_writes_nothing(tmp_path, monkeypatch):
    learner, meta_params, tasks = _problem()
    rule = core.auto_batching(tasks)
    off = autotune.tune_batching(
        learner, meta_params, tasks, enabled=False, cache_dir=tmp_path
    )
    assert (off.batching, off.chunk_size, off.source) == (*rule, "rule")
    for value in ("0", "off", "false"):
        monkeypatch.setenv(autotune.ENV_SWITCH, value)
        choice = autotune.tune_batching(learner, meta_params, tasks, cache_dir=tmp_path)
        assert choice.source == "rule"
    assert list(tmp_path.iterdir()) == []


def test_tasks_without_images_are_vmapped_untimed(tmp_path, on):
    model = maml_jax.MLP(hidden_sizes=(8,))
    params = model.init(jax.random.key(0), jnp.zeros((1, 1)))["params"]
    learner = maml_jax.maml(
        maml_jax.regression_loss(model.apply), inner_lr=0.01, num_inner_steps=1
    )
    tasks = maml_jax.sample_sinusoid_tasks(jax.random.key(1), 4, 5, 5)
    choice = autotune.tune_batching(
        learner, learner.init(params), tasks, cache_dir=tmp_path
    )
    assert (choice.batching, choice.chunk_size, choice.source) == ("vmap", None, "rule")
    assert list(tmp_path.iterdir()) == []


def test_candidates_must_divide_the_tasks(tmp_path, on):
    learner, meta_params, tasks = _problem()
    with pytest.raises(ValueError, match="chunk size 3 does not divide the 4 tasks"):
        autotune.tune_batching(
            learner, meta_params, tasks, chunks=(1, 3), cache_dir=tmp_path
        )


def test_fit_trains_an_auto_state_with_the_measured_chunk(tmp_path, monkeypatch, on):
    monkeypatch.setenv("MAML_JAX_CACHE_DIR", str(tmp_path))
    learner, meta_params, tasks = _problem()
    params = jax.tree.map(jnp.array, meta_params)

    def sampler(key):
        (x, y), (xq, yq) = tasks
        noise = 0.01 * jax.random.normal(key, x.shape)
        return maml_jax.TaskBatch((x + noise, y), (xq - noise, yq))

    def run(batching="auto", chunk_size=None, **kwargs):
        state = maml_jax.MetaTrainState.create(
            params=params,
            learner=learner,
            tx=optax.adam(1e-2),
            batching=batching,
            chunk_size=chunk_size,
        )
        return maml_jax.fit(
            state,
            sampler,
            key=jax.random.key(2),
            num_steps=3,
            progress=False,
            **kwargs,
        )

    tuned = run()
    [entry] = (tmp_path / "autotune").iterdir()
    chunk = json.loads(entry.read_text())["chunk_size"]
    assert (tuned.batching, tuned.chunk_size) == ("scan", chunk)
    explicit = run("scan", chunk)
    chex.assert_trees_all_equal(tuned.meta_params, explicit.meta_params)
    # Switched off, the state keeps "auto" (the rule's chunk size).
    kept = run(autotune=False)
    assert (kept.batching, kept.chunk_size) == ("auto", None)
