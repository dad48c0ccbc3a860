"""``jax.shard_map`` over tasks equals the unsharded computation (float64).

The pattern users write: parameters replicated (``P()``), tasks split
(``P("tasks")``), ``meta_value_and_grad`` per device, ``pmean`` of loss and
meta-gradient. Under shard_map's varying-axes typing the gradient of a
replicated value is summed over devices, so without ``maml_jax._varying`` every
inner step would adapt with the sum of all devices' support gradients.

The 4-device checks run in one subprocess (``tests/_shard_map_worker.py``; JAX
fixes its device count at start-up); the assertions are here. The tests of the
cast itself run in this process, on one device.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import maml_jax
from maml_jax import _varying
from tests import helpers

# One worker runs the module, so its module fixture is computed once under
# pytest-xdist (--dist loadgroup).
pytestmark = pytest.mark.xdist_group("shard_map")

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300
RTOL, ATOL = 1e-8, 1e-8  # float64; sharding only regroups the sums over tasks


@pytest.fixture(scope="module")
def four_devices():
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), env.get("PYTHONPATH")) if p
    )
    # The programs are tiny: LLVM's optimisation passes are most of their
    # compile time, and the comparison is within one process either way.
    env["XLA_FLAGS"] = (
        "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"
    )
    script = ROOT / "tests" / "_shard_map_worker.py"
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not lines:
        pytest.fail(f"worker failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def _check(results, case):
    result = results[case]
    assert not isinstance(result, str), f"{case}: {result}"
    sharded, unsharded = result
    np.testing.assert_allclose(sharded, unsharded, rtol=RTOL, atol=ATOL, err_msg=case)


LEARNERS = [
    "maml",
    "maml_apply_if_finite",  # inner optimizer state that depends on the gradients
    "fomaml",
    "anil",
    "meta_sgd",
    "maml_plus_plus",
    "reptile",
    "imaml",
    "protonet",
    "maml_stateful",  # model state (a running mean) threaded through the inner loop
]


@pytest.mark.parametrize("learner", LEARNERS)
def test_meta_value_and_grad_equals_unsharded(four_devices, learner):
    """``pmean`` of per-device loss and meta-gradient: 8 tasks, 2 per device."""
    _check(four_devices, f"meta_grad/{learner}")


@pytest.mark.parametrize("batching", ["scan", "auto"])
def test_task_batching_inside_shard_map(four_devices, batching):
    _check(four_devices, f"batching/{batching}")


@pytest.mark.parametrize("learner", ["maml_plus_plus", "imaml", "protonet"])
def test_grad_of_pmean_of_meta_loss(four_devices, learner):
    """A user differentiating ``pmean(mean meta_loss)`` with ``jax.grad`` gets the
    mean meta-gradient too: learned rates (closed over by the inner optimizer)
    and iMAML's ``custom_vjp`` included."""
    _check(four_devices, f"grad_of_pmean/{learner}")


@pytest.mark.parametrize("learner", ["maml", "meta_sgd", "imaml"])
def test_adapt_equals_unsharded(four_devices, learner):
    """Each device adapts its tasks with its own support gradients."""
    _check(four_devices, f"adapt/{learner}")


def test_user_train_step_with_optax_chain(four_devices):
    """3 steps of a user's shard_map step with ``chain(clip_by_global_norm, adam)``
    equal 3 ``meta_train_step``s: parameters and losses."""
    _check(four_devices, "train_steps/maml")


def _one_device_mesh():
    return Mesh(np.asarray(jax.devices()[:1]), ("tasks",))


def test_cast_is_identity_outside_shard_map():
    w = jnp.zeros(3)
    batch = (jnp.ones((4, 6, 3)), jnp.ones((4, 6)))
    tasks = maml_jax.TaskBatch(batch, batch)

    def unchanged(p, t):
        assert _varying.like_data(p, t) is p
        return helpers.linear_loss(p, t.support)

    unchanged(w, tasks)
    jax.jit(unchanged)(w, tasks)
    jax.vmap(unchanged, in_axes=(None, 0))(w, tasks)
    jax.grad(unchanged)(w, tasks)
    learner = maml_jax.maml(helpers.linear_loss, inner_lr=0.1, num_inner_steps=2)
    jaxpr = jax.make_jaxpr(
        lambda w, t: maml_jax.meta_value_and_grad(learner, w, t, batching="vmap")
    )(w, tasks)
    assert "pvary" not in str(jaxpr) and "pcast" not in str(jaxpr)


def test_cast_makes_params_vary_over_the_data_axes():
    """Inside shard_map: invariant leaves become varying, varying ones are kept."""

    def per_device(p, varying_p, x):
        out = _varying.like_data({"a": p, "b": varying_p}, (x, None))
        assert _varying.varying_axes(p) == frozenset()
        assert _varying.varying_axes(out["a"]) == {"tasks"}
        assert out["b"] is varying_p
        assert _varying.like_data(p, jnp.ones(2)) is p  # invariant data: no cast
        return out["a"] * x

    f = jax.shard_map(
        per_device,
        mesh=_one_device_mesh(),
        in_specs=(P(), P("tasks"), P("tasks")),
        out_specs=P("tasks"),
    )
    np.testing.assert_array_equal(
        jax.jit(f)(jnp.full(2, 3.0), jnp.ones(2), jnp.full(2, 2.0)), jnp.full(2, 6.0)
    )
