"""maml_jax's meta-gradient against learn2learn's, higher's and torch.func's.

Same weights (``throughput.build``'s), the same real meta-batch (Omniglot
5-way 1-shot, 15 queries per class, the first ``NUM_TASKS`` tasks of one
meta-batch; a sinusoid meta-batch of 25 tasks), second-order MAML with 1 and 2
inner steps, in float32 and float64.

The measure is, per parameter, ``‖g_peer − g_ours‖ / ‖g_ours‖``, maximised over
parameters; except for the Conv4's convolution biases, whose true gradient is
exactly zero at every order (batch norm with batch statistics follows them and
removes any per-channel shift), so what is computed there is rounding: their
difference is measured against the norm of the whole meta-gradient instead.

* learn2learn and higher must agree with ours to ``TOLERANCE``: float64 ≤ 1e-13
  measured.
* Float32 is measured as a backward error: the distance to the nearest of our
  float64 meta-gradients at the weights and at ``PERTURBATIONS`` copies of the
  weights perturbed by ``PERTURBATION`` (3e-7 relative, a few float32 roundings).
  With 2 inner steps on the Omniglot batch the meta-gradient is discontinuous
  within that distance (a ReLU or max-pool switch): float64 meta-gradients at
  weights 3e-7 apart differ by 2.2e-3, and which side a float32 computation lands
  on depends on its rounding (measured: learn2learn and higher 3.2e-5 from the
  float64 meta-gradient at the weights; ours 2.2e-3 from it but 3.8e-5 from the
  one at a perturbed copy, and with an earlier row-patch convolution 3.3e-5 from
  it). Ours must be within ``OURS_FLOAT32_ERROR`` (1e-4), learn2learn and
  higher within ``TOLERANCE`` (1e-3; ~3e-5 measured).
* torch.func's second-order meta-gradient on the Conv4 is wrong, by ~0.1 (1 inner
  step) and ~0.9 (2 steps) in float32 and float64 alike; looping over tasks
  instead of ``vmap`` it agrees to ~4e-14, and a toy conv → batch norm shows the
  error only with batch norm's affine parameters: ``vmap`` of batch norm's double
  backward. Those cases assert the discrepancy is still there
  (``TORCHFUNC_CONV4_WRONG``), so a fixed torch.func shows up as a failure to look
  at. First order, and the MLP, agree.

The measured numbers are printed at the end of the run. Run with the peer
environment (not part of the main suite)::

    .peers-venv/bin/python -m pytest benchmarks/peers/test_agreement.py
"""

from __future__ import annotations

import functools
import re
import warnings

import jax
import numpy as np
import pytest

jax.config.update("jax_enable_x64", True)  # before any array is created

torch = pytest.importorskip("torch")  # the peer environment, .peers-venv

import maml_jax  # noqa: E402
from benchmarks import throughput  # noqa: E402
from benchmarks.peers import export, run_peer, torch_models  # noqa: E402
from benchmarks.peers.common import OMNIGLOT_DIR, PEERS, Exported  # noqa: E402
from maml_jax.types import TaskBatch  # noqa: E402

OMNIGLOT = "omniglot-5w1s-q15-maxpool"
NUM_TASKS = 4  # of the 32 in a meta-batch (the test's time is mostly our compiles)
TOLERANCE = {"float32": 1e-3, "float64": 1e-10}
OURS_FLOAT32_ERROR = 1e-4  # ours in float32 against ours in float64
# Float32 results are compared with float64 meta-gradients at the weights and at
# PERTURBATIONS copies of them perturbed by a few float32 roundings (see above).
PERTURBATION = 3e-7
PERTURBATIONS = 8
# torch.func's second-order meta-gradient on the Conv4 is off by far more than
# rounding (~0.1 measured); asserted as a floor, in both dtypes.
TORCHFUNC_CONV4_WRONG = 1e-2
ZERO_GRADIENT = re.compile(r"conv\d+_bias")  # followed by batch norm
# (what against what, order, workload, inner steps) -> max relative difference
MEASURED: dict[tuple[str, str, str, int], float] = {}

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@functools.cache
def exported(workload: str) -> Exported:
    """Weights and one real meta-batch of ``workload``, in memory."""
    if workload == OMNIGLOT and not (OMNIGLOT_DIR / "images_background.zip").is_file():
        pytest.skip(f"no Omniglot archives in {OMNIGLOT_DIR}")
    batch = export.real_batches(workload, 1, seed=0)
    n = NUM_TASKS if workload == OMNIGLOT else None
    batch = {k: v[:, :n] for k, v in batch.items()}
    if batch["support_x"].dtype == np.float64:  # sampled under jax_enable_x64
        for k in ("support_x", "support_y", "query_x", "query_y"):
            if batch[k].dtype == np.float64:
                batch[k] = batch[k].astype(np.float32)
    meta = export.workload_meta(workload)
    meta["meta_batch"] = batch["support_x"].shape[1]
    return Exported(params=export.flax_params(workload), **batch, **meta)


@functools.cache
def _meta_gradient_fn(workload: str, inner_steps: int, first_order: bool):
    """maml_jax's jitted meta-gradient ``(params, tasks) -> grads`` with the learner
    and batching of ``build``."""
    state, _, _ = throughput.build(workload, "maml", inner_steps, first_order)
    return jax.jit(
        lambda p, t: maml_jax.meta_value_and_grad(
            state.learner, p, t, batching=state.batching, chunk_size=state.chunk_size
        )[1]
    )


def _meta_gradient(
    workload: str,
    inner_steps: int,
    dtype: str,
    first_order: bool,
    params: dict[str, np.ndarray],
) -> dict[str, np.ndarray]:
    e = exported(workload)
    cast = lambda a: jax.numpy.asarray(a).astype(dtype) if a.dtype.kind == "f" else a
    nested: dict = {}
    for k, v in params.items():
        *outer, leaf = k.split("/")
        d = nested
        for part in outer:
            d = d.setdefault(part, {})
        d[leaf] = cast(v)
    tasks = TaskBatch(
        support=(cast(e.support_x[0]), jax.numpy.asarray(e.support_y[0])),
        query=(cast(e.query_x[0]), jax.numpy.asarray(e.query_y[0])),
    )
    if e.kind == "sinusoid":
        tasks = jax.tree.map(cast, tasks)
    grads = _meta_gradient_fn(workload, inner_steps, first_order)(nested, tasks)
    flat = jax.tree_util.tree_flatten_with_path(grads)[0]
    out = {
        "/".join(str(getattr(k, "key", k)) for k in path): np.asarray(leaf)
        for path, leaf in flat
    }
    assert all(v.dtype == np.dtype(dtype) for v in out.values())
    return out


@functools.cache
def ours(
    workload: str, inner_steps: int, dtype: str, first_order: bool = False
) -> dict[str, np.ndarray]:
    """maml_jax's meta-gradient, with the learner and batching of ``build``."""
    params = exported(workload).params
    return _meta_gradient(workload, inner_steps, dtype, first_order, params)


@functools.cache
def float64_references(workload: str, inner_steps: int) -> list[dict[str, np.ndarray]]:
    """Our float64 meta-gradient at the weights, then at ``PERTURBATIONS`` copies
    of them, each multiplied by ``1 + PERTURBATION · N(0, 1)`` (fixed seeds)."""
    params = exported(workload).params
    references = [ours(workload, inner_steps, "float64")]
    for seed in range(PERTURBATIONS):
        rng = np.random.default_rng(seed)
        perturbed = {
            k: v * (1 + PERTURBATION * rng.standard_normal(v.shape))
            for k, v in params.items()
        }
        references.append(
            _meta_gradient(workload, inner_steps, "float64", False, perturbed)
        )
    return references


def float32_backward_error(
    workload: str, inner_steps: int, grads: dict[str, np.ndarray]
) -> float:
    """How far a float32 meta-gradient is from the exact (float64) one at the
    weights or at weights within ``PERTURBATION`` of them, whichever is nearest:
    the error of a float32 computation measured as the float32 roundings of its
    inputs it corresponds to (see the module docstring)."""
    references = float64_references(workload, inner_steps)
    return min(max_relative_difference(ref, grads) for ref in references)


@functools.cache
def peer(
    impl: str, workload: str, inner_steps: int, dtype: str, first_order: bool = False
) -> dict[str, np.ndarray]:
    """A peer's meta-gradient in Flax names and layouts."""
    e = exported(workload)
    torch_dtype = getattr(torch, dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        meta_grad, module = run_peer.make_meta_grad(
            impl, e, inner_steps, first_order=first_order, dtype=torch_dtype
        )
        meta_grad(run_peer.to_torch(e, torch_dtype)[0])
    grads = {k.removeprefix("module."): p.grad for k, p in module.named_parameters()}
    return torch_models.torch_to_flax_names(grads)


def max_relative_difference(
    reference: dict[str, np.ndarray], other: dict[str, np.ndarray]
) -> float:
    """max over parameters of ‖other − reference‖ / ‖reference‖ (see the docstring:
    exactly-zero gradients are measured against the whole gradient's norm)."""
    assert sorted(reference) == sorted(other)
    total = np.sqrt(
        sum(np.sum(np.square(v, dtype=np.float64)) for v in reference.values())
    )
    diffs = []
    for k, ref in reference.items():
        scale = total if ZERO_GRADIENT.fullmatch(k) else np.linalg.norm(ref)
        diffs.append(float(np.linalg.norm(other[k] - ref) / scale))
    return max(diffs)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("inner_steps", [1, 2])
@pytest.mark.parametrize("workload", ["sinusoid", OMNIGLOT])
@pytest.mark.parametrize("impl", PEERS)
def test_meta_gradient_agrees(impl, workload, inner_steps, dtype):
    theirs = peer(impl, workload, inner_steps, dtype)
    diff = max_relative_difference(ours(workload, inner_steps, dtype), theirs)
    key = (f"{impl} {dtype} vs ours {dtype}", "second", workload, inner_steps)
    MEASURED[key] = diff
    if impl == "torchfunc" and workload == OMNIGLOT:
        assert diff > TORCHFUNC_CONV4_WRONG, (
            f"torch.func now agrees ({diff:.2e}): update TORCHFUNC_CONV4_WRONG"
        )
    elif dtype == "float64":
        assert diff < TOLERANCE[dtype]
    else:
        # Ours float32 is held to OURS_FLOAT32_ERROR by test_float32_error; here
        # the peer's float32 result must be as close to an exact meta-gradient
        # at weights within float32 rounding.
        error = float32_backward_error(workload, inner_steps, theirs)
        key = (f"{impl} float32 backward error", "second", workload, inner_steps)
        MEASURED[key] = error
        assert error < TOLERANCE[dtype]


@pytest.mark.parametrize("workload", ["sinusoid", OMNIGLOT])
@pytest.mark.parametrize("impl", PEERS)
def test_first_order_agrees(impl, workload):
    """First-order MAML (``run_peer.py --order first``), 1 inner step, float64."""
    diff = max_relative_difference(
        ours(workload, 1, "float64", first_order=True),
        peer(impl, workload, 1, "float64", first_order=True),
    )
    MEASURED[(f"{impl} float64 vs ours float64", "first", workload, 1)] = diff
    assert diff < TOLERANCE["float64"]


@pytest.mark.parametrize("inner_steps", [1, 2])
@pytest.mark.parametrize("workload", ["sinusoid", OMNIGLOT])
def test_float32_error(workload, inner_steps):
    """float32 against our float64 meta-gradient, directly (reported) and as the
    backward error (asserted for ours, reported for each peer)."""
    reference = ours(workload, inner_steps, "float64")
    for name in ("ours", *PEERS):
        grads = (
            ours(workload, inner_steps, "float32")
            if name == "ours"
            else peer(name, workload, inner_steps, "float32")
        )
        key = (f"{name} float32 vs ours float64", "second", workload, inner_steps)
        MEASURED[key] = max_relative_difference(reference, grads)
        key = (f"{name} float32 backward error", "second", workload, inner_steps)
        MEASURED[key] = float32_backward_error(workload, inner_steps, grads)
    error = MEASURED[("ours float32 backward error", "second", workload, inner_steps)]
    assert error < OURS_FLOAT32_ERROR


def test_zero_gradients_are_zero():
    """The conv biases' meta-gradient is rounding for all but torch.func."""
    total = lambda g: np.sqrt(sum(np.sum(np.square(v)) for v in g.values()))
    for dtype, tol in (("float32", 1e-5), ("float64", 1e-14)):
        for name, grads in [("ours", ours(OMNIGLOT, 1, dtype))] + [
            (impl, peer(impl, OMNIGLOT, 1, dtype)) for impl in PEERS
        ]:
            biases = {k: v for k, v in grads.items() if ZERO_GRADIENT.fullmatch(k)}
            ratio = total(biases) / total(grads)
            MEASURED[
                (f"{name} {dtype}: |g conv biases| / |g|", "second", OMNIGLOT, 1)
            ] = ratio
            wrong = name == "torchfunc"
            assert ratio > 1e-4 if wrong else ratio < tol, (name, dtype, ratio)


def test_torchfunc_without_vmap_agrees():
    """torch.func's error comes from ``vmap``: looping over tasks, it agrees."""
    from torch.func import functional_call, grad

    e = exported(OMNIGLOT)
    model = torch_models.build_model(e.params, e.ways).double()
    loss = run_peer.make_loss(e)
    xs, ys, xq, yq = run_peer.to_torch(e, torch.float64)[0]

    def task_loss(p, x, y):
        return loss(functional_call(model, p, (x,)), y)

    def adapted(p, t):
        g = grad(task_loss)(p, xs[t], ys[t])
        p = {k: p[k] - e.inner_lr * g[k] for k in p}
        return task_loss(p, xq[t], yq[t])

    params = {k: v.detach() for k, v in model.named_parameters()}
    mean_loss = lambda p: sum(adapted(p, t) for t in range(len(xs))) / len(xs)
    grads = torch_models.torch_to_flax_names(grad(mean_loss)(params))
    diff = max_relative_difference(ours(OMNIGLOT, 1, "float64"), grads)
    MEASURED[("torchfunc, no vmap, float64 vs ours", "second", OMNIGLOT, 1)] = diff
    assert diff < TOLERANCE["float64"]


@pytest.mark.parametrize("affine", [False, True])
def test_torchfunc_vmap_batch_norm(affine):
    """The smallest case: conv → batch norm; second order under ``vmap`` against a
    loop over tasks. Wrong only with batch norm's affine scale and offset."""
    from torch import nn
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4, affine=affine, track_running_stats=False),
        nn.Flatten(),
        nn.Linear(4 * 8 * 8, 3),
    ).double()
    x = torch.randn(3, 6, 1, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 3, (3, 6))

    def task_loss(p, x, y):
        return torch.nn.functional.cross_entropy(functional_call(model, p, (x,)), y)

    def adapted(p, x, y):
        g = grad(task_loss)(p, x, y)
        return task_loss({k: p[k] - 0.4 * g[k] for k in p}, x, y)

    params = {k: v.detach() for k, v in model.named_parameters()}
    batched = grad(lambda p: vmap(adapted, in_dims=(None, 0, 0))(p, x, y).sum())
    looped = grad(lambda p: sum(adapted(p, x[t], y[t]) for t in range(3)))
    gv, gl = batched(params), looped(params)
    diff = float((gv["0.weight"] - gl["0.weight"]).norm() / gl["0.weight"].norm())
    MEASURED[
        (f"torchfunc toy conv+BN(affine={affine}) vmap vs loop", "second", "-", 1)
    ] = diff
    assert diff > 1e-3 if affine else diff < 1e-12


def test_weights_round_trip():
    """Flax → torch → Flax names and layouts are exact."""
    for workload in ("sinusoid", OMNIGLOT):
        params = exported(workload).params
        ways = 0 if workload == "sinusoid" else 5
        model = torch_models.build_model(params, ways or None)
        back = torch_models.torch_to_flax_names(dict(model.named_parameters()))
        for k, v in params.items():
            np.testing.assert_array_equal(back[k], v)


def test_forward_agrees():
    """The torch Conv4 computes the Flax Conv4's logits on a real batch."""
    e = exported(OMNIGLOT)
    model = torch_models.build_model(e.params, e.ways).double()
    # "lax": a plain convolution and two-pass batch norm, as the torch model does.
    flax_model = maml_jax.Conv4(
        num_classes=e.ways,
        filters=64,
        downsample="maxpool",
        head="mean",
        conv_impl="lax",
    )
    x = e.query_x[0, 0].astype(np.float64)
    nested = {k: v for k, v in e.params.items() if "/" not in k}
    nested["head"] = {"kernel": e.params["head/kernel"], "bias": e.params["head/bias"]}
    nested = jax.tree.map(lambda a: np.asarray(a, np.float64), nested)
    expected = flax_model.apply({"params": nested}, x)
    got = model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).detach().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
