"""One measurement of a PyTorch MAML implementation's meta-train step: a JSON line.

Question: how long does one meta-train step (meta-gradient over the meta-batch and
an Adam update) take with learn2learn, higher or torch.func on the same model,
weights, real data and loss as maml_jax (``export.py``)?

* ``learn2learn``: as its examples do: ``MAML(model, lr=α, first_order=...)``; per
  task ``learner = maml.clone()``, ``learner.adapt(support_loss)`` per inner step,
  ``query_loss.backward()``; gradients divided by the meta-batch size; Adam step.
* ``higher``: ``innerloop_ctx(model, SGD(lr=α), copy_initial_weights=False,
  track_higher_grads=second_order)`` per task, ``query_loss.backward()`` (first
  order: the query gradient at the adapted weights, added to the meta-gradient).
* ``torchfunc``: ``functional_call`` + ``torch.func.grad`` inner steps (first order:
  inner gradients detached), ``vmap`` over tasks, outer ``torch.func.grad``.

Loss: ``loss_scale × mean cross-entropy`` (Omniglot, ``loss_scale = ways``) or MSE
(sinusoid). Timing: ``--warmup`` steps, then ``--steps`` timed steps cycling
through the exported meta-batches; torch's default thread count unless
``--threads`` (on a machine shared with other jobs, torch's OpenMP threads can
slow down many-fold when the cores are oversubscribed). ``--precision bfloat16``
runs the meta-gradient under ``torch.autocast("cpu", dtype=torch.bfloat16)``
(PyTorch's mixed precision: convolutions and matmuls in bfloat16, parameters and
the Adam step in float32); ``impl`` gets ``-bf16``. ``--device cuda`` runs on the
GPU (the timed step ends with ``torch.cuda.synchronize``; ``peak_device_mb`` is
``torch.cuda.max_memory_allocated``).

Command: ``python -m benchmarks.peers.run_peer --impl learn2learn --workload
sinusoid``.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
import warnings
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.peers import torch_models
from benchmarks.peers.common import PEERS, WORKLOADS, Exported, load_export

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
MetaGrad = Callable[[Batch], float]


def make_loss(exported: Exported) -> LossFn:
    """The workload's loss on (predictions, targets), as in maml_jax."""
    if exported.kind == "sinusoid":
        return F.mse_loss
    scale = exported.loss_scale
    return lambda logits, labels: scale * F.cross_entropy(logits, labels)


def to_torch(exported: Exported, dtype: torch.dtype = torch.float32) -> list[Batch]:
    """The exported meta-batches as torch tensors (images NHWC → NCHW)."""

    def inputs(x: np.ndarray) -> torch.Tensor:
        if x.ndim == 6:  # (batches, tasks, examples, H, W, C)
            x = x.transpose(0, 1, 2, 5, 3, 4)
        return torch.from_numpy(np.array(x, copy=True)).to(dtype)

    def targets(y: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.array(y, copy=True))
        return t if exported.kind != "sinusoid" else t.to(dtype)

    xs, ys = inputs(exported.support_x), targets(exported.support_y)
    xq, yq = inputs(exported.query_x), targets(exported.query_y)
    return [(xs[i], ys[i], xq[i], yq[i]) for i in range(exported.num_batches)]


def learn2learn_meta_grad(
    model: nn.Module, loss: LossFn, inner_lr: float, steps: int, first_order: bool
) -> tuple[MetaGrad, nn.Module]:
    """learn2learn's MAML; returns (meta_grad, the module whose parameters learn)."""
    import learn2learn as l2l

    maml = l2l.algorithms.MAML(model, lr=inner_lr, first_order=first_order)

    def meta_grad(batch: Batch) -> float:
        xs, ys, xq, yq = batch
        total = 0.0
        for t in range(xs.shape[0]):
            learner = maml.clone()
            for _ in range(steps):
                learner.adapt(loss(learner(xs[t]), ys[t]))
            query_loss = loss(learner(xq[t]), yq[t])
            query_loss.backward()
            total += query_loss.item()
        for p in maml.parameters():
            p.grad.mul_(1.0 / xs.shape[0])
        return total / xs.shape[0]

    return meta_grad, maml


def higher_meta_grad(
    model: nn.Module, loss: LossFn, inner_lr: float, steps: int, first_order: bool
) -> tuple[MetaGrad, nn.Module]:
    """higher's ``innerloop_ctx``; returns (meta_grad, the module that learns)."""
    import higher

    inner_opt = torch.optim.SGD(model.parameters(), lr=inner_lr)
    params = list(model.parameters())

    def meta_grad(batch: Batch) -> float:
        xs, ys, xq, yq = batch
        total = 0.0
        for t in range(xs.shape[0]):
            with higher.innerloop_ctx(
                model,
                inner_opt,
                copy_initial_weights=False,
                track_higher_grads=not first_order,
            ) as (fmodel, diffopt):
                for _ in range(steps):
                    diffopt.step(loss(fmodel(xs[t]), ys[t]))
                query_loss = loss(fmodel(xq[t]), yq[t])
                if first_order:  # adapted weights are detached: add their gradient
                    grads = torch.autograd.grad(query_loss, list(fmodel.parameters()))
                    for p, g in zip(params, grads, strict=True):
                        p.grad = g if p.grad is None else p.grad + g
                else:
                    query_loss.backward()
            total += query_loss.item()
        for p in params:
            p.grad.mul_(1.0 / xs.shape[0])
        return total / xs.shape[0]

    return meta_grad, model


def torchfunc_meta_grad(
    model: nn.Module, loss: LossFn, inner_lr: float, steps: int, first_order: bool
) -> tuple[MetaGrad, nn.Module]:
    """torch.func: ``vmap`` over tasks of ``grad``-based adaptation, outer ``grad``."""
    from torch.func import functional_call, grad, grad_and_value, vmap

    def task_loss(params, xs, ys) -> torch.Tensor:
        return loss(functional_call(model, params, (xs,)), ys)

    inner_grad = grad(task_loss)

    def adapted_query_loss(params, xs, ys, xq, yq) -> torch.Tensor:
        for _ in range(steps):
            g = inner_grad(params, xs, ys)
            if first_order:
                g = {k: v.detach() for k, v in g.items()}
            params = {k: params[k] - inner_lr * g[k] for k in params}
        return task_loss(params, xq, yq)

    def meta_loss(params, xs, ys, xq, yq) -> torch.Tensor:
        per_task = vmap(adapted_query_loss, in_dims=(None, 0, 0, 0, 0))
        return per_task(params, xs, ys, xq, yq).mean()

    meta_value_and_grad = grad_and_value(meta_loss)
    named = dict(model.named_parameters())

    def meta_grad(batch: Batch) -> float:
        params = {k: v.detach() for k, v in named.items()}
        grads, value = meta_value_and_grad(params, *batch)
        for k, p in named.items():
            p.grad = grads[k] if p.grad is None else p.grad + grads[k]
        return value.item()

    return meta_grad, model


IMPLS = {
    "learn2learn": learn2learn_meta_grad,
    "higher": higher_meta_grad,
    "torchfunc": torchfunc_meta_grad,
}


def make_meta_grad(
    impl: str,
    exported: Exported,
    inner_steps: int,
    first_order: bool,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
) -> tuple[MetaGrad, nn.Module]:
    """A fresh model with the exported weights and ``impl``'s meta-gradient on it.

    ``meta_grad(batch)`` puts the meta-gradient (mean over the batch's tasks) in
    the ``.grad`` of the returned module's parameters, which must be ``None`` or
    zero before (``zero_grad``), and returns the meta-loss.
    """
    model = torch_models.build_model(
        exported.params, exported.ways if exported.kind != "sinusoid" else None
    ).to(device=device, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # gym's and learn2learn's import notices
        return IMPLS[impl](
            model, make_loss(exported), exported.inner_lr, inner_steps, first_order
        )


def measure(
    impl: str,
    workload: str,
    first_order: bool,
    inner_steps: int,
    steps: int,
    warmup: int,
    precision: str = "float32",
    device: str = "cpu",
) -> dict:
    """Times ``steps`` meta-train steps after ``warmup``; returns the JSON row."""
    exported = load_export(workload)
    batches = [tuple(t.to(device) for t in b) for b in to_torch(exported)]
    meta_grad, learning = make_meta_grad(
        impl, exported, inner_steps, first_order, device=device
    )
    opt = torch.optim.Adam(learning.parameters(), lr=1e-3)
    bf16 = precision == "bfloat16"
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for i in range(warmup + steps):
        batch = batches[i % len(batches)]
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=bf16):
            losses.append(meta_grad(batch))
        opt.step()
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    if not np.all(np.isfinite(losses)):
        raise FloatingPointError(f"non-finite meta-loss: {losses}")
    import learn2learn

    median = float(np.median(times))
    return {
        "impl": impl + ("-bf16" if bf16 else ""),
        "precision": precision,
        "workload": workload,
        "order": "first" if first_order else "second",
        "inner_steps": inner_steps,
        "meta_batch": exported.meta_batch,
        "steps": steps,
        "warmup": warmup,
        "step_s_median": median,
        "step_s_p10": float(np.percentile(times, 10)),
        "step_s_p90": float(np.percentile(times, 90)),
        "tasks_per_s": exported.meta_batch / median,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_device_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "threads": torch.get_num_threads(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "learn2learn": learn2learn.__version__,
            "higher": _version("higher"),
        },
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "times_s": times,
    }


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--impl", required=True, choices=PEERS)
    p.add_argument("--workload", required=True, choices=WORKLOADS)
    p.add_argument("--order", choices=("first", "second"), default="second")
    p.add_argument("--inner-steps", type=int, default=1)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch.set_num_threads (default 0: torch's default, all cores)",
    )
    p.add_argument(
        "--precision",
        choices=("float32", "bfloat16"),
        default="float32",
        help="bfloat16: the meta-gradient under torch.autocast('cpu', bfloat16)",
    )
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    row = measure(
        args.impl,
        args.workload,
        args.order == "first",
        args.inner_steps,
        args.steps,
        args.warmup,
        args.precision,
        args.device,
    )
    print(json.dumps(row), flush=True)
    return row


if __name__ == "__main__":
    main()
