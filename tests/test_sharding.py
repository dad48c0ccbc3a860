"""Task-sharded meta-steps on 1-8 virtual CPU devices and across two processes.

The main test process has already imported JAX with one device, so everything
that needs more runs in subprocesses with ``XLA_FLAGS`` set before the import:
one script (``EIGHT_DEVICES`` below) for the 8-device checks, and
``tests/_distributed_worker.py`` for the two-process gloo run. Subprocesses print
JSON; the assertions are here. Everything is float32 (no x64 in subprocesses).
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import maml_jax
from maml_jax import sharding

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "_distributed_worker.py"
TIMEOUT_S = 150
RTOL, ATOL = 1e-5, 1e-6  # float32; sharding only regroups the gradient sum
# One worker runs the module, so its module fixture is computed once under
# pytest-xdist (--dist loadgroup).
pytestmark = pytest.mark.xdist_group("sharding")

EIGHT_DEVICES = r"""
import json, re
import jax, jax.numpy as jnp, numpy as np, optax
jax.config.update("jax_numpy_rank_promotion", "raise")
import maml_jax
from maml_jax import sharding, train

META_BATCH, STEPS = 8, 3
model = maml_jax.MLP((16, 16))
params = model.init(jax.random.key(0), jnp.zeros((1, 1)))["params"]
learner = maml_jax.maml(
    maml_jax.regression_loss(model.apply), inner_lr=0.01, num_inner_steps=1
)
fresh = lambda: maml_jax.MetaTrainState.create(
    params=params, learner=learner, tx=optax.adam(1e-3)
)
sample = lambda key: maml_jax.sample_sinusoid_tasks(key, META_BATCH, 5, 5)
tasks = [sample(jax.random.fold_in(jax.random.key(1), i)) for i in range(STEPS)]
flat = lambda state: np.concatenate(
    [np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(state.meta_params)]
)

reference = fresh()
for t in tasks:
    reference, _ = maml_jax.meta_train_step(reference, t)
scan_reference, _ = jax.jit(train.scan_train_steps, static_argnums=(2, 3))(
    fresh(), jax.random.key(2), sample, STEPS
)
out = {
    "devices": jax.device_count(),
    "reference": flat(reference).tolist(),
    "scan_reference": flat(scan_reference).tolist(),
    "runs": {},
}
full_batch = re.compile(r"\[%d,(10|5),1\]" % META_BATCH)
for n in (1, 2, 4, 8):
    mesh = sharding.task_mesh(jax.devices()[:n])
    step = sharding.make_sharded_train_step(mesh)
    state = sharding.replicate(fresh(), mesh)
    for t in tasks:
        placed = sharding.shard_tasks(t, mesh)
        state, metrics = step(state, placed)
    hlo = step.jitted.lower(state, placed).compile().as_text()
    run = sharding.make_sharded_scan_train_steps(mesh, sample, STEPS)
    key = sharding.replicate(jax.random.key(2), mesh)
    scan_state, scan_metrics = run(sharding.replicate(fresh(), mesh), key)
    # After the call, lower().compile() hits the compilation cache.
    scan_hlo = run.lower(scan_state, key).compile().as_text()
    out["runs"][n] = {
        "params": flat(state).tolist(),
        "scan_params": flat(scan_state).tolist(),
        "step": int(state.step),
        "scan_step": int(scan_state.step),
        "compiles": step.jitted._cache_size(),
        "scan_compiles": run._cache_size(),
        "placed_type": type(placed).__name__,
        "sampled_type": type(
            jax.eval_shape(sharding.shard_sampler(sample, mesh), key)
        ).__name__,
        "shard_rows": [s.data.shape[0] for s in placed.query[0].addressable_shards],
        "shard_devices": len(placed.query[0].sharding.device_set),
        "state_replicated": all(
            x.sharding.is_fully_replicated for x in jax.tree.leaves(state)
        ),
        "metrics_shapes": {k: list(v.shape) for k, v in metrics.items()},
        "step_all_reduce": "all-reduce" in hlo,
        "step_all_gather": "all-gather" in hlo,
        "scan_all_gather": "all-gather" in scan_hlo,
        "scan_full_batch_shapes": len(full_batch.findall(scan_hlo)),
    }

mesh4 = sharding.task_mesh(jax.devices()[:4])
fit_state = maml_jax.fit(
    sharding.replicate(fresh(), mesh4),
    sharding.shard_sampler(sample, mesh4),
    key=jax.random.key(2),
    num_steps=STEPS,
    steps_per_call=STEPS,
    progress=False,
)
out["fit"] = {
    "params": flat(fit_state).tolist(),
    "devices": [len(x.sharding.device_set) for x in jax.tree.leaves(fit_state)],
}

errors = {}
six = maml_jax.sample_sinusoid_tasks(jax.random.key(3), 6, 5, 5)
try:
    sharding.make_sharded_train_step(mesh4)(sharding.replicate(fresh(), mesh4), six)
except ValueError as e:
    errors["step"] = str(e)
bad_sampler = lambda key: maml_jax.sample_sinusoid_tasks(key, 6, 5, 5)
try:
    sharding.make_sharded_scan_train_steps(mesh4, bad_sampler, 1)(
        sharding.replicate(fresh(), mesh4), jax.random.key(0)
    )
except ValueError as e:
    errors["scan"] = str(e)
scan_state = maml_jax.MetaTrainState.create(
    params=params, learner=learner, tx=optax.adam(1e-3), batching="scan"
)
try:
    sharding.make_sharded_train_step(mesh4)(scan_state, tasks[0])
except ValueError as e:
    errors["batching"] = str(e)
out["errors"] = errors
print("RESULT " + json.dumps(out))
"""


def _env(num_devices: int | None) -> dict[str, str]:
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), env.get("PYTHONPATH")) if p
    )
    env.pop("XLA_FLAGS", None)
    if num_devices is not None:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
    return env


def _result(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"no RESULT line in:\n{stdout[-2000:]}"
    return json.loads(lines[-1][len("RESULT ") :])


def _run_all(commands: dict[str, tuple[list[str], dict]], cwd, logs) -> dict:
    """Runs the commands concurrently and returns each one's parsed RESULT.

    Output goes to files in ``logs`` (no pipe can fill up and block a process).
    If a process fails, the others are killed at once (a peer waiting in a
    collective would otherwise wait for it); if the time runs out, all are
    killed. Either way the test fails with every process's stderr.
    """
    logs = Path(logs)
    logs.mkdir(parents=True, exist_ok=True)
    procs, files = {}, []
    for name, (cmd, env) in commands.items():
        out = open(logs / f"{name}.out", "w")
        err = open(logs / f"{name}.err", "w")
        files += [out, err]
        procs[name] = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=out, stderr=err, text=True
        )
    deadline, timed_out = time.monotonic() + TIMEOUT_S, False
    try:
        while any(p.poll() is None for p in procs.values()):
            if any(p.poll() for p in procs.values()):
                break  # one failed: do not wait for its peers
            if time.monotonic() > deadline:
                timed_out = True
                break
            time.sleep(0.2)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
        for proc in procs.values():
            proc.wait()
        for f in files:
            f.close()

    def read(name, ext):
        return (logs / f"{name}.{ext}").read_text()

    if timed_out or any(p.returncode for p in procs.values()):
        reason = f"timed out after {TIMEOUT_S} s" if timed_out else "failed"
        report = "\n".join(
            f"--- {name} (exit {proc.returncode}) stderr:\n{read(name, 'err')[-3000:]}"
            for name, proc in procs.items()
        )
        pytest.fail(f"subprocesses {reason}:\n{report}")
    return {name: _result(read(name, "out")) for name in procs}


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("eight")
    cmd = [sys.executable, "-c", EIGHT_DEVICES]
    return _run_all({"eight": (cmd, _env(8))}, cwd, cwd / "logs")["eight"]


@pytest.mark.parametrize("num_devices", [1, 2, 4, 8])
def test_sharded_step_equals_unsharded(eight_devices, num_devices):
    assert eight_devices["devices"] == 8
    run = eight_devices["runs"][str(num_devices)]
    assert run["step"] == run["scan_step"] == 3
    np.testing.assert_allclose(
        run["params"], eight_devices["reference"], rtol=RTOL, atol=ATOL
    )
    # On-device sampling draws the same tasks for every device count.
    np.testing.assert_allclose(
        run["scan_params"], eight_devices["scan_reference"], rtol=RTOL, atol=ATOL
    )
    assert run["compiles"] == 1 and run["scan_compiles"] == 1
    assert run["state_replicated"]
    assert set(run["metrics_shapes"]) >= {"loss", "grad_norm"}
    assert all(shape == [] for shape in run["metrics_shapes"].values())


@pytest.mark.parametrize("num_devices", [2, 4, 8])
def test_tasks_are_split_and_gradients_all_reduced(eight_devices, num_devices):
    run = eight_devices["runs"][str(num_devices)]
    assert run["placed_type"] == run["sampled_type"] == "TaskBatch"
    assert run["shard_devices"] == num_devices
    assert run["shard_rows"] == [8 // num_devices] * num_devices
    assert run["step_all_reduce"] and not run["step_all_gather"]
    # Each device samples only its own tasks: no full-batch array, no gather.
    assert not run["scan_all_gather"]
    assert run["scan_full_batch_shapes"] == 0
    assert eight_devices["runs"]["1"]["scan_full_batch_shapes"] > 0  # the check works


def test_fit_with_sharded_sampler(eight_devices):
    """fit() on a replicated state with shard_sampler runs on all 4 devices."""
    fit = eight_devices["fit"]
    assert set(fit["devices"]) == {4}
    np.testing.assert_allclose(
        fit["params"], eight_devices["scan_reference"], rtol=RTOL, atol=ATOL
    )


def test_indivisible_meta_batch_is_a_clear_error(eight_devices):
    errors = eight_devices["errors"]
    for where in ("step", "scan"):
        message = errors[where]
        assert "6 tasks" in message and "4 devices" in message, message
    assert "batching='vmap'" in errors["batching"]


def test_single_device_in_process(key):
    """The sharded step on this process's one device equals meta_train_step."""
    model = maml_jax.MLP((8,))
    params = model.init(key, jnp.zeros((1, 1)))["params"]
    learner = maml_jax.maml(
        maml_jax.regression_loss(model.apply), inner_lr=0.01, num_inner_steps=1
    )

    def create():
        return maml_jax.MetaTrainState.create(
            params=params, learner=learner, tx=optax.sgd(1e-2)
        )

    tasks = maml_jax.sample_sinusoid_tasks(jax.random.key(1), 4, 5, 5)
    mesh = sharding.task_mesh(jax.devices()[:1])
    sharded, _ = sharding.make_sharded_train_step(mesh)(
        sharding.replicate(create(), mesh), tasks
    )
    expected, _ = maml_jax.meta_train_step(create(), tasks)
    for a, b in zip(
        jax.tree.leaves(sharded.meta_params),
        jax.tree.leaves(expected.meta_params),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=0)
    assert sharding.is_primary()
    assert sharding.local_task_slice(mesh, 4) == slice(0, 4)
    assert type(sharding.shard_tasks(tasks, mesh)) is maml_jax.TaskBatch
    with pytest.raises(TypeError, match="shard_tasks got a single Task"):
        sharding.shard_tasks(maml_jax.unstack_tasks(tasks)[0], mesh)


def test_initialize_distributed_rejects_partial_configuration(monkeypatch):
    for names in (
        sharding.ENV_COORDINATOR,
        sharding.ENV_NUM_PROCESSES,
        sharding.ENV_PROCESS_ID,
    ):
        for name in names:
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MAML_JAX_COORDINATOR", "127.0.0.1:1234")
    with pytest.raises(ValueError, match="MAML_JAX_NUM_PROCESSES"):
        sharding.initialize_distributed(process_id=0)
    with pytest.raises(ValueError, match="process_id must be in"):
        sharding.initialize_distributed(num_processes=2, process_id=2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_gloo(tmp_path):
    """2 processes x 2 CPU devices on loopback equal a 1-process, 1-device run.

    Covers host-fed tasks (each process feeds only its share), on-device
    sampling, ``fit`` with ``shard_sampler``, a collective orbax checkpoint, and
    a metrics file written by process 0 only.
    """
    address = f"127.0.0.1:{_free_port()}"
    commands = {}
    for pid in (0, 1):
        cmd = [sys.executable, str(WORKER), "--coordinator", address]
        cmd += ["--num-processes", "2", "--process-id", str(pid)]
        cmd += ["--out", str(tmp_path), "--checkpoint", "--fit"]
        commands[f"process{pid}"] = (cmd, _env(2))
    (tmp_path / "reference").mkdir()
    ref_cmd = [sys.executable, str(WORKER), "--fit"]
    ref_cmd += ["--out", str(tmp_path / "reference")]
    commands["reference"] = (ref_cmd, _env(None))
    started = time.monotonic()
    results = _run_all(commands, ROOT, tmp_path / "logs")
    seconds = time.monotonic() - started

    p0, p1, ref = results["process0"], results["process1"], results["reference"]
    for pid, r in enumerate((p0, p1)):
        assert r["process_id"] == pid and r["process_count"] == 2
        assert r["global_devices"] == 4 and r["local_devices"] == 2
        assert r["tasks_per_local_device"] == [2, 2]
        assert r["compiles"] == 1
        assert r["checkpoint_restored_equal"]
        assert r["step"] == ref["step"] == 9  # 3 sharded, 3 scanned, 3 in fit
    assert p0["share"] == [0, 4] and p1["share"] == [4, 8]
    # Replicas agree exactly; the reference up to the regrouped float32 sum.
    assert p0["leaves"] == p1["leaves"] and p0["losses"] == p1["losses"]
    for got, want in zip(p0["leaves"], ref["leaves"], strict=True):
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(p0["losses"], ref["losses"], rtol=RTOL)
    # Only process 0 writes the metrics file.
    assert p0["wrote"] == [str(tmp_path / "metrics.json")] and p1["wrote"] == []
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["step"] == 9 and saved["loss"] == p0["losses"]
    assert (tmp_path / "checkpoints" / "9").is_dir()
    assert seconds < TIMEOUT_S


@pytest.mark.slow
def test_scaling_benchmark_smoke():
    from benchmarks import scaling

    rows = scaling.main(["--smoke"])
    assert [(r["mode"], r["devices"]) for r in rows] == [
        ("sharded", 1),
        ("unsharded", 1),
        ("sharded", 2),
    ]
    for r in rows:
        assert r["step_ms_median"] > 0 and r["compile_s"] > 0 and r["tasks_per_s"] > 0
        assert r["steps"] == 4  # warm-up + 3 timed calls, one meta-step each
    assert rows[2]["tasks_per_device"] == 2
