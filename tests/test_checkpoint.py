"""Tests for atomic, verified checkpoints and exact resume (``maml_jax.checkpoint``)."""

import asyncio
import json
import logging
import pickle
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import maml_jax
from maml_jax.checkpoint import Checkpointer, CorruptCheckpointError

_MODELS = {hidden: maml_jax.MLP((hidden,)) for hidden in (8, 16)}
# Built once, so every state shares the jitted step's compilation cache.
_LEARNERS = {
    hidden: maml_jax.maml(
        maml_jax.regression_loss(model.apply), inner_lr=0.01, num_inner_steps=1
    )
    for hidden, model in _MODELS.items()
}
_TX = optax.adam(1e-3)
_TASK_KEY = jax.random.key(42)


def _fresh_state(hidden=8, dtype=jnp.float32):
    params = _MODELS[hidden].init(jax.random.key(0), jnp.zeros((1, 1)))["params"]
    params = jax.tree.map(lambda p: p.astype(dtype), params)
    return maml_jax.MetaTrainState.create(
        params=params, learner=_LEARNERS[hidden], tx=_TX
    )


def _train(state, num_steps):
    """Trains until ``state.step == num_steps``; step ``s`` sees fixed tasks."""
    while int(state.step) < num_steps:
        key = jax.random.fold_in(_TASK_KEY, int(state.step))
        tasks = maml_jax.sample_sinusoid_tasks(key, 4, 5, 5)
        state, _ = maml_jax.meta_train_step(state, tasks)
    return state


def _assert_bit_identical(actual, expected):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        assert a.dtype == e.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


def _host_copy(state):
    return jax.tree.map(np.array, state)


@pytest.mark.parametrize("abstract", [False, True])
def test_restore_is_bit_identical_with_extra(tmp_path, abstract):
    state = _train(_fresh_state(), 3)
    expected = _host_copy(state)
    extra = {"config": {"inner_lr": 0.01, "hidden": (8,)}, "seed": 7, "lines": 3}
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.save(state, extra=extra) == 3
        template = _fresh_state()
        if abstract:
            template = jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), template
            )
        restored = ckpt.restore(template)
    assert restored.step == 3
    assert restored.extra == {
        "config": {"inner_lr": 0.01, "hidden": [8]},  # JSON: tuples read as lists
        "seed": 7,
        "lines": 3,
    }
    assert restored.state.step.dtype == jnp.int32
    assert restored.state.opt_state[0].count.dtype == jnp.int32
    assert restored.state.tx is template.tx
    assert restored.state.learner is template.learner
    _assert_bit_identical(_host_copy(restored.state), expected)


def test_resume_from_checkpoint_continues_exactly(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        state = _train(_fresh_state(), 3)
        ckpt.save(state, extra={"seed": 0})
        uninterrupted = _host_copy(_train(state, 6))

        restored = ckpt.restore(_fresh_state())
        assert restored.step == 3
        resumed = _train(restored.state, 6)
    _assert_bit_identical(_host_copy(resumed), uninterrupted)


def test_keeps_only_the_last_keep_checkpoints(tmp_path):
    state = _fresh_state()
    with Checkpointer(tmp_path, keep=2) as ckpt:
        for step in range(1, 5):
            ckpt.save(state.replace(step=jnp.int32(step)))
        assert ckpt.all_steps() == [3, 4]
        assert ckpt.latest_step() == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["3", "4"]


def test_save_refuses_stale_step_and_non_json_extra(tmp_path):
    state = _fresh_state()
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(state.replace(step=jnp.int32(2)))
        with pytest.raises(ValueError, match="already holds a checkpoint at step 2"):
            ckpt.save(state.replace(step=jnp.int32(2)))
        with pytest.raises(ValueError, match="JSON-serialisable"):
            ckpt.save(state.replace(step=jnp.int32(3)), extra={"loss": jnp.ones(())})
        assert ckpt.all_steps() == [2]


def test_restore_without_checkpoint_raises(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() is None
        with pytest.raises(FileNotFoundError, match="No checkpoint"):
            ckpt.restore(_fresh_state())


def test_mismatched_model_is_refused_naming_the_leaf(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(_fresh_state(hidden=8))
        with pytest.raises(ValueError) as info:
            ckpt.restore(_fresh_state(hidden=16))
    message = str(info.value)
    assert "different configuration" in message
    assert str(tmp_path / "0") in message
    assert (
        "meta_params['Dense_0']['kernel'] has shape (1, 8) in the checkpoint "
        "but (1, 16) in this run"
    ) in message
    assert "opt_state[0].mu['Dense_1']['kernel'] has shape (8, 1)" in message


def test_mismatched_dtype_is_refused(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(_fresh_state())
        with pytest.raises(ValueError, match="has dtype float32 in the checkpoint"):
            ckpt.restore(_fresh_state(dtype=jnp.float64))


def test_mismatched_config_is_refused_listing_keys(tmp_path):
    config = {"inner_lr": 0.01, "hidden": (8,), "algorithm": "maml"}
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(_fresh_state(), extra={"config": config})
        assert ckpt.restore(_fresh_state(), config=config).step == 0
        other = {"inner_lr": 0.1, "hidden": (8,), "seed": 1}
        with pytest.raises(ValueError) as info:
            ckpt.restore(_fresh_state(), config=other)
    message = str(info.value)
    assert "config['inner_lr'] is 0.01 in the checkpoint but 0.1 in this run" in message
    assert "config['algorithm'] is 'maml' in the checkpoint but absent" in message
    assert "config['seed'] is absent in the checkpoint but 1" in message
    assert "hidden" not in message


def test_interrupted_save_is_never_restored(tmp_path, monkeypatch):
    state = _fresh_state()
    ckpt = Checkpointer(tmp_path)
    ckpt.save(state.replace(step=jnp.int32(3)))

    # Crash after every file is written but before orbax's atomic rename.
    async def crash(self):
        raise RuntimeError("simulated crash")

    with monkeypatch.context() as patch:
        patch.setattr(ocp.path.atomicity.AtomicRenameTemporaryPath, "finalize", crash)
        with pytest.raises(RuntimeError, match="simulated crash"):
            ckpt.save(state.replace(step=jnp.int32(4)))
    ckpt.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["3", "4.orbax-checkpoint-tmp"]
    # Leftovers named like older orbax versions' temporary directories.
    shutil.copytree(tmp_path / "3", tmp_path / "9.orbax-checkpoint-tmp-1700000000")

    with Checkpointer(tmp_path) as resumed:  # a new process after the crash
        assert resumed.all_steps() == [3]
        assert resumed.restore(_fresh_state()).step == 3
        resumed.save(state.replace(step=jnp.int32(4)))  # removes the leftovers
        assert resumed.all_steps() == [3, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["3", "4"]


def test_read_only_reader_leaves_a_save_in_progress_alone(tmp_path, monkeypatch):
    # The bug: a reader (``maml-jax eval``) opened while training was saving
    # deleted the save's temporary directory, and the save then failed.
    state = _fresh_state()
    writer = Checkpointer(tmp_path)
    writer.save(state.replace(step=jnp.int32(3)))
    finalize = ocp.path.atomicity.AtomicRenameTemporaryPath.finalize
    seen = []

    def read():
        assert (tmp_path / "4.orbax-checkpoint-tmp").is_dir()
        with Checkpointer(tmp_path, read_only=True) as reader:
            seen.append((reader.all_steps(), reader.restore(_fresh_state()).step))
            with pytest.raises(RuntimeError, match="read_only=True"):
                reader.save(state.replace(step=jnp.int32(5)))

    async def read_then_finalize(self):
        if not seen:  # a reader opens mid-save, before the first rename
            await asyncio.to_thread(read)
        await finalize(self)

    monkeypatch.setattr(
        ocp.path.atomicity.AtomicRenameTemporaryPath, "finalize", read_then_finalize
    )
    writer.save(state.replace(step=jnp.int32(4)))
    writer.close()
    assert seen == [([3], 3)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["3", "4"]


def test_read_only_creates_renames_and_deletes_nothing(tmp_path, caplog):
    missing = tmp_path / "missing"
    with Checkpointer(missing, read_only=True) as reader:
        assert reader.latest_step() is None
        with pytest.raises(FileNotFoundError, match="No checkpoint"):
            reader.restore(_fresh_state())
    assert not missing.exists()

    state = _train(_fresh_state(), 1)
    with Checkpointer(tmp_path, keep=1) as writer:
        writer.save(state)
        writer.save(_train(state, 2))
    shutil.copytree(tmp_path / "2", tmp_path / "1")  # not kept: a stale copy
    shutil.copytree(tmp_path / "2", tmp_path / "7.orbax-checkpoint-tmp")
    _delete_manifest(tmp_path / "2")
    before = sorted(p.name for p in tmp_path.iterdir())
    with Checkpointer(tmp_path, read_only=True, keep=1) as reader:
        with caplog.at_level(logging.WARNING, logger="maml_jax.checkpoint"):
            # 2 is unreadable and 1 holds step 2's state: nothing to fall back on.
            with pytest.raises(CorruptCheckpointError, match="No readable"):
                reader.restore(_fresh_state(), fallback=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_step_must_be_an_int(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(_fresh_state())
        with pytest.raises(TypeError, match="step must be an int; got '0'"):
            ckpt.restore(_fresh_state(), step="0")
        with pytest.raises(TypeError, match="step must be an int"):
            ckpt.restore(_fresh_state(), step=0.0)
        assert ckpt.restore(_fresh_state(), step=np.int64(0)).step == 0


def _truncate_files(directory):
    for path in directory.rglob("*"):
        if path.is_file():
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _delete_manifest(step_dir):
    (step_dir / "manifest" / "metadata").unlink()


def _drop_a_shape(step_dir):
    path = step_dir / "manifest" / "metadata"
    manifest = json.loads(path.read_text())
    del manifest["leaves"]["meta_params['Dense_0']['kernel']"]["shape"]
    path.write_text(json.dumps(manifest))


def _replace_by_older(step_dir):
    # An intact checkpoint, but of step 1, under the name of step 2.
    shutil.rmtree(step_dir)
    shutil.copytree(step_dir.parent / "1", step_dir)


def _swap_arrays(step_dir):
    # Valid arrays of the right shapes but other values: only the digests see it.
    shutil.rmtree(step_dir / "state")
    shutil.copytree(step_dir.parent / "1" / "state", step_dir / "state")


@pytest.mark.parametrize(
    "corrupt, reason",
    [
        (lambda d: _truncate_files(d / "state"), "reading its arrays failed"),
        (_delete_manifest, "reading its manifest failed"),
        (_swap_arrays, "do not match the digests"),
        (
            _drop_a_shape,
            r"reading its manifest failed \(ValueError: malformed manifest: leaf "
            r"meta_params\['Dense_0'\]\['kernel'\] has no 'shape'\)",
        ),
        (_replace_by_older, r"holds the state of step 1, not 2"),
    ],
    ids=[
        "truncated-arrays",
        "deleted-manifest",
        "garbled-values",
        "manifest-leaf-without-shape",
        "copy-of-an-older-step",
    ],
)
def test_corrupt_checkpoint_is_reported_or_falls_back(
    tmp_path, caplog, corrupt, reason
):
    state = _train(_fresh_state(), 1)
    expected = _host_copy(state)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(state, extra={"seed": 1})
        state = _train(state, 2)
        ckpt.save(state, extra={"seed": 2})
        corrupt(tmp_path / "2")

        with pytest.raises(CorruptCheckpointError, match=reason) as info:
            ckpt.restore(_fresh_state())
        assert str(tmp_path / "2") in str(info.value)
        assert ckpt.all_steps() == [1, 2]

        with caplog.at_level(logging.WARNING, logger="maml_jax.checkpoint"):
            restored = ckpt.restore(_fresh_state(), fallback=True)
        assert restored.step == 1
        assert restored.extra == {"seed": 1}
        _assert_bit_identical(_host_copy(restored.state), expected)
        assert str(tmp_path / "2") in caplog.text
        assert "Restored step 1" in caplog.text
        # The bad directory is kept for inspection but no longer a checkpoint.
        assert ckpt.all_steps() == [1]
        assert (tmp_path / "2.corrupt").is_dir()
        ckpt.save(_train(restored.state, 2))
        assert ckpt.all_steps() == [1, 2]


def test_fallback_with_no_readable_checkpoint_raises(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(_fresh_state())
        _delete_manifest(tmp_path / "0")
        with pytest.raises(CorruptCheckpointError, match=str(tmp_path / "0")):
            ckpt.restore(_fresh_state(), fallback=True)
        assert ckpt.all_steps() == [0]


def test_restore_never_unpickles(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("restore called pickle")

    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(_fresh_state(), extra={"seed": 0})
        for name in ("load", "loads", "Unpickler"):
            monkeypatch.setattr(pickle, name, refuse)
        assert ckpt.restore(_fresh_state()).extra == {"seed": 0}


def test_fit_callback_checkpoints_resume_exactly(tmp_path):
    def sample(key):
        return maml_jax.sample_sinusoid_tasks(key, 4, 5, 5)

    def run(state, num_steps, ckpt):
        return maml_jax.fit(
            state,
            sample,
            key=_TASK_KEY,
            num_steps=num_steps,
            steps_per_call=2,
            progress=False,
            callbacks=(lambda s, record: ckpt.save(s, extra={"loss": record["loss"]}),),
        )

    with Checkpointer(tmp_path / "a") as ckpt:
        uninterrupted = _host_copy(run(_fresh_state(), 4, ckpt))
        assert ckpt.all_steps() == [2, 4]
    with Checkpointer(tmp_path / "b") as ckpt:
        run(_fresh_state(), 2, ckpt)
    with Checkpointer(tmp_path / "b") as ckpt:  # a new process resumes
        state, extra, step = ckpt.restore(_fresh_state())
        assert step == 2 and isinstance(extra["loss"], float)
        resumed = _host_copy(run(state, 4, ckpt))
    _assert_bit_identical(resumed, uninterrupted)
