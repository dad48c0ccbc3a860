"""Peak memory of second-order MAML against the number of inner steps.

Question: how does the peak memory of one second-order MAML meta-train step grow
with the number of inner steps (1 to 100 and beyond) in maml_jax without and with
``remat`` (``maml(..., remat=True)``: each inner step is a ``jax.checkpoint``) and
in learn2learn, and how many inner steps fit in a fixed memory budget for each?

Workload: ``omniglot-5w1s-q15-maxpool`` of ``throughput.py`` and the peer benchmark
(``benchmarks/peers``): Conv4 64 filters, 3×3 ``SAME`` convolutions, transductive
batch norm, ReLU, 2×2 max-pool, mean head; 28×28×1, 5 ways, 1 support + 15 query
images per class, α = 0.4, loss ``5 × mean cross-entropy``, Adam 1e-3; random
images of the right shape (memory does not depend on their values). Ours uses the
CPU default im2col convolutions (``--conv lax``: ``lax.conv``, the default off
CPU). Tasks are processed one at a time in both libraries, as learn2learn's
examples do: ours with ``batching="scan"`` and ``--chunk 1``, learn2learn with a
Python loop over tasks (``clone()``, ``adapt()`` per inner step,
``query_loss.backward()``), so the peak does not depend on the meta-batch, which
is reduced to ``--meta-batch`` (default 1) task for both: a step's time grows
with inner steps × tasks. (Checked for ours: the remat slope per inner step is
the same at meta-batch 1, 2 and 4.)

Method: every measurement runs in a fresh subprocess. Ours: build the state,
compile one jitted meta-train step (on-device sampling, meta-gradient, Adam
update, state donated), run it once (warm-up), then run it again and measure.
learn2learn (run with ``.peers-venv/bin/python``, importing only torch,
learn2learn and ``benchmarks/peers/torch_models.py``'s Conv4): build the model,
one warm-up meta-step, then the measured one. Before the measured step the
process calls ``malloc_trim(0)`` and resets the kernel's peak-RSS counter
(``/proc/self/clear_refs``); the step's peak memory is the peak RSS during that
step minus the RSS just before it: what the step needs on top of the model,
optimizer state, compiled program and libraries (``process_peak_rss_mb``, the
``ru_maxrss`` of the whole process, is in the JSON rows too; for ours it is set by
the compiler). For ours we also report XLA's ``compiled.memory_analysis()``
(temporary + argument + output − aliased bytes), which agrees with the RSS figure
to a few MB. Each measurement is capped at ``--timeout`` seconds.

Budget: ``--budget-mb`` (default: learn2learn's step peak at
``--budget-peer-steps`` inner steps, else 1024 MB). The largest inner-step count
under the budget is read from each measured curve: between two measured points
by linear interpolation, past the last one by linear extrapolation. ``--search``
refines ours by measuring: compile-only probes (XLA's analysis; compile time is
flat in the inner steps) bisect to the largest count under the budget, then one
real run there confirms it (``--confirm-timeout``; ``--no-confirm`` skips it).
XLA:CPU's buffer assignment is not quite deterministic: the same program
compiled twice has been seen to need 726 MB and 873 MB, so an over-budget
confirmation sends the search on below that count. A second table gives the
largest counts at every budget equal to learn2learn's peak at one of its
measured counts.

Every row is appended to ``--out``/memory.jsonl; ``--reuse JSONL`` takes the rows
of earlier invocations of the same configuration from such a file (their modes
are not measured again), so a budget search or another mode can be added later.

Command (see benchmarks/README.md for the numbers)::

    python -m benchmarks.memory --inner-steps 1 2 5 10 25 50 100 --search --timeout 240

``--smoke``: sinusoid, 1 inner step with remat, no peer: one subprocess.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results" / "memory"
PEERS_PYTHON = ROOT / ".peers-venv" / "bin" / "python"
MB = 2**20
MODES = ("no-remat", "remat", "learn2learn")


# --------------------------------------------------------------------------- RSS


def _status_kb(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> int:
    """Returns freed heap to the OS, resets the peak RSS; returns the RSS in bytes."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current VmRSS (Linux >= 4.0)
    return _status_kb("VmRSS") * 1024


def peak_rss_since_reset() -> int:
    """The peak RSS in bytes since the last :func:`reset_peak_rss`."""
    return _status_kb("VmHWM") * 1024


def measured(run: Callable[[], Any]) -> tuple[float, float, float]:
    """Runs ``run()`` once; returns (its RSS peak in MB over the RSS before, the
    RSS before in MB, seconds)."""
    before = reset_peak_rss()
    t0 = time.perf_counter()
    run()
    seconds = time.perf_counter() - t0
    return (peak_rss_since_reset() - before) / MB, before / MB, seconds


# ------------------------------------------------------------------ ours (JAX)


def build_ours(
    workload: str,
    inner_steps: int,
    remat: bool,
    meta_batch: int,
    chunk: int,
    conv: str | None = None,
) -> tuple[Any, Callable]:
    """``(state, sampler)``: second-order MAML on ``workload`` with ``remat``.

    As ``throughput.build`` (same model, loss and data shapes; im2col convolutions
    on CPU unless ``conv`` says otherwise), but with the learner's ``remat`` flag,
    the meta-batch and tasks in a ``lax.scan`` over chunks of ``chunk``.
    """
    import jax
    import jax.numpy as jnp
    import optax

    import maml_jax
    from benchmarks.throughput import WORKLOADS
    from maml_jax import episodes, models

    w = WORKLOADS[workload]
    if w["kind"] == "sinusoid":
        model = maml_jax.MLP((40, 40))
        params = model.init(jax.random.key(0), jnp.zeros((1, 1)))["params"]
        loss_fn, has_aux = maml_jax.regression_loss(model.apply), False
        sampler = lambda key: maml_jax.sample_sinusoid_tasks(key, meta_batch, 10, 10)
    elif w["kind"] == "omniglot":
        model = models.Conv4(
            num_classes=w["ways"],
            filters=64,
            downsample=w.get("downsample", "stride"),
            head="mean",
            conv_impl=conv or "auto",
        )
        shape = (28, 28, 1)
        params = model.init(jax.random.key(0), jnp.zeros((2, *shape)))["params"]
        loss_fn = models.classification_loss(model.apply, loss_scale=w["ways"])
        has_aux = True
        data = jax.random.uniform(jax.random.key(1), (100, 20, *shape))
        spec = episodes.EpisodeSpec(w["ways"], w["shots"], w["queries"])
        sampler = lambda key: episodes.sample_episodes(key, data, spec, meta_batch)
    else:
        raise ValueError(f"workload {workload!r} is not supported here")
    learner = maml_jax.maml(
        loss_fn,
        inner_lr=w["inner_lr"],
        num_inner_steps=inner_steps,
        remat=remat,
        has_aux=has_aux,
    )
    state = maml_jax.MetaTrainState.create(
        params=params,
        learner=learner,
        tx=optax.adam(1e-3),
        batching="scan",
        chunk_size=chunk,
    )
    return state, sampler


def ours_worker(
    workload: str,
    inner_steps: int,
    remat: bool,
    meta_batch: int,
    chunk: int,
    conv: str | None = None,
    compile_only: bool = False,
) -> dict:
    """One measurement of ours in this (fresh) process: the JSON row.

    ``compile_only``: XLA's memory analysis and the compile time, no step run.
    """
    import jax

    from maml_jax import train

    state, sampler = build_ours(workload, inner_steps, remat, meta_batch, chunk, conv)
    step = jax.jit(
        lambda s, k: train.scan_train_steps(s, k, sampler, 1), donate_argnums=0
    )
    holder: dict[str, Any] = {}

    def compile_step() -> None:
        holder["compiled"] = step.lower(state, jax.random.key(0)).compile()

    compile_mb, _, compile_s = measured(compile_step)
    compiled = holder["compiled"]
    analysis = compiled.memory_analysis()
    xla = {
        k: getattr(analysis, f"{k}_size_in_bytes", 0) / MB
        for k in ("temp", "argument", "output", "alias")
    }
    row = {
        "impl": "maml_jax",
        "mode": "remat" if remat else "no-remat",
        "backend": jax.default_backend(),
        "conv": None
        if workload == "sinusoid"
        else conv or ("im2col" if jax.default_backend() == "cpu" else "lax"),
        "xla_mb": xla["temp"] + xla["argument"] + xla["output"] - xla["alias"],
        "xla_temp_mb": xla["temp"],
        "xla_argument_mb": xla["argument"],
        "xla_output_mb": xla["output"],
        "xla_alias_mb": xla["alias"],
        "compile_s": compile_s,
        "compile_peak_mb": compile_mb,
        "versions": {"jax": jax.__version__},
    }
    if compile_only:
        return {**row, "peak_mb": None, "compile_only": True}

    def run(i: int) -> None:
        nonlocal state
        state, metrics = compiled(state, jax.random.key(i))
        jax.block_until_ready(metrics)
        holder["loss"] = float(metrics["loss"][0])

    t0 = time.perf_counter()
    run(0)
    first_s = time.perf_counter() - t0
    peak_mb, base_mb, step_s = measured(lambda: run(1))
    return {
        **row,
        "first_step_s": first_s,
        "step_s": step_s,
        "peak_mb": peak_mb,
        "base_rss_mb": base_mb,
        "process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        / 1024,
        "loss": holder["loss"],
    }


# ------------------------------------------------------------ learn2learn (torch)


def peer_worker(workload: str, inner_steps: int, meta_batch: int) -> dict:
    """One measurement of learn2learn's second-order MAML in this fresh process.

    Imports only torch, learn2learn and ``benchmarks.peers`` (``run_peer``'s
    learn2learn meta-gradient, the same Conv4 as ours in PyTorch), never jax.
    """
    import warnings

    import torch
    import torch.nn.functional as F

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # gym's notice at import
        import learn2learn as l2l

    from benchmarks.peers.run_peer import learn2learn_meta_grad
    from benchmarks.peers.torch_models import Conv4

    if workload != "omniglot-5w1s-q15-maxpool":
        raise ValueError("the learn2learn worker runs omniglot-5w1s-q15-maxpool only")
    ways, shots, queries, inner_lr = 5, 1, 15, 0.4
    torch.manual_seed(0)
    loss = lambda logits, labels: ways * F.cross_entropy(logits, labels)
    meta_grad, maml = learn2learn_meta_grad(
        Conv4(ways), loss, inner_lr, inner_steps, first_order=False
    )
    opt = torch.optim.Adam(maml.parameters(), lr=1e-3)
    batch = (
        torch.rand(meta_batch, ways * shots, 1, 28, 28),
        torch.arange(ways).repeat_interleave(shots).expand(meta_batch, -1),
        torch.rand(meta_batch, ways * queries, 1, 28, 28),
        torch.arange(ways).repeat_interleave(queries).expand(meta_batch, -1),
    )
    holder: dict[str, float] = {}

    def meta_step() -> None:
        opt.zero_grad(set_to_none=True)
        holder["loss"] = meta_grad(batch)
        opt.step()

    t0 = time.perf_counter()
    meta_step()
    first_s = time.perf_counter() - t0
    peak_mb, base_mb, step_s = measured(meta_step)
    return {
        "impl": "learn2learn",
        "mode": "learn2learn",
        "backend": "cpu",
        "compile_s": None,
        "first_step_s": first_s,
        "step_s": step_s,
        "peak_mb": peak_mb,
        "base_rss_mb": base_mb,
        "process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        / 1024,
        "threads": torch.get_num_threads(),
        "loss": holder["loss"],
        "versions": {"torch": torch.__version__, "learn2learn": l2l.__version__},
    }


# ------------------------------------------------------------------- orchestration


def peers_available() -> bool:
    """Whether ``.peers-venv`` exists and imports learn2learn."""
    if not PEERS_PYTHON.exists():
        return False
    check = subprocess.run(
        [str(PEERS_PYTHON), "-c", "import learn2learn"],
        capture_output=True,
        cwd=ROOT,
        timeout=300,
    )
    return check.returncode == 0


@dataclass(frozen=True)
class Config:
    """What every measurement of one invocation shares."""

    workload: str
    meta_batch: int
    chunk: int
    conv: str | None
    timeout: float


def measure(
    mode: str, inner_steps: int, cfg: Config, *, compile_only: bool = False
) -> dict:
    """Runs one measurement in a fresh subprocess; returns its row.

    A measurement that runs past ``cfg.timeout`` seconds or fails gives a row
    with ``peak_mb = None`` and an ``error``.
    """
    python = str(PEERS_PYTHON) if mode == "learn2learn" else sys.executable
    cmd = [python, "-m", "benchmarks.memory", "--worker", mode]
    cmd += ["--workload", cfg.workload, "--inner-steps", str(inner_steps)]
    cmd += ["--meta-batch", str(cfg.meta_batch), "--chunk", str(cfg.chunk)]
    cmd += ["--conv", cfg.conv] if cfg.conv else []
    cmd += ["--compile-only"] if compile_only else []
    row: dict[str, Any] = {
        "workload": cfg.workload,
        "mode": mode,
        "inner_steps": inner_steps,
        "meta_batch": cfg.meta_batch,
        "chunk": cfg.chunk if mode != "learn2learn" else 1,
        "conv_flag": cfg.conv if mode != "learn2learn" else None,
        "order": "second",
    }
    t0 = time.perf_counter()
    try:
        done = subprocess.run(
            cmd, capture_output=True, text=True, cwd=ROOT, timeout=cfg.timeout
        )
    except subprocess.TimeoutExpired:
        return {**row, "peak_mb": None, "error": f"timeout ({cfg.timeout:.0f} s)"}
    row["wall_s"] = time.perf_counter() - t0
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {**row, "peak_mb": None, "error": " | ".join(tail)}
    return {**row, **json.loads(lines[-1])}


def figure(row: dict) -> float | None:
    """A row's peak memory in MB: the measured step peak RSS, or XLA's analysis
    for a compile-only probe."""
    if row.get("peak_mb") is not None:
        return row["peak_mb"]
    return row.get("xla_mb") if row.get("compile_only") else None


def largest_under(points: Sequence[tuple[int, float]], budget: float) -> dict:
    """The largest inner-step count whose peak is ≤ ``budget``, from a curve.

    ``points``: measured ``(inner_steps, peak_mb)``. Between measured points:
    linear interpolation; past the last one: linear extrapolation from the last
    two (``"extrapolated": True``); none under the budget: ``steps = 0``.
    """
    pts = sorted(points)
    under = [p for p in pts if p[1] <= budget]
    if not under:
        return {"steps": 0, "extrapolated": False}
    lo = max(under)
    above = [p for p in pts if p[0] > lo[0] and p[1] > budget]
    if above:
        hi = min(above)
        slope = (hi[1] - lo[1]) / (hi[0] - lo[0])
        steps = lo[0] + math.floor((budget - lo[1]) / slope)
        return {"steps": max(lo[0], min(steps, hi[0] - 1)), "extrapolated": False}
    if len(pts) < 2:
        return {"steps": lo[0], "extrapolated": True}
    (n0, m0), (n1, m1) = pts[-2], pts[-1]
    slope = (m1 - m0) / (n1 - n0)
    if slope <= 0:
        return {"steps": None, "extrapolated": True}
    steps = n1 + math.floor((budget - m1) / slope)
    return {"steps": steps, "extrapolated": steps > n1}


def search_largest(
    points: list[tuple[int, float]],
    budget: float,
    probe: Callable[[int], float | None],
    max_probes: int,
) -> dict:
    """Refines :func:`largest_under` by measuring: probes the estimate, then
    bisects between the largest count measured under the budget and the smallest
    measured over it, to 2 % of the count or ``max_probes`` probes."""
    probes = 0
    while True:
        under = [n for n, m in points if m <= budget]
        lo = max(under, default=0)
        hi = min((n for n, m in points if m > budget and n > lo), default=None)
        if hi is not None and hi - lo <= max(1, lo // 50):
            return {"steps": lo, "extrapolated": False, "probes": probes}
        estimate = largest_under(points, budget)
        if probes >= max_probes or not estimate["steps"] or lo == 0:
            return {**estimate, "probes": probes}
        if hi is None:  # past the measured curve: probe the extrapolation, +2 %
            guess = max(lo + 1, estimate["steps"] + estimate["steps"] // 50)
        else:
            guess = (lo + hi) // 2
        peak = probe(guess)
        probes += 1
        if peak is None:  # timed out or failed: keep what is measured
            return {**largest_under(points, budget), "probes": probes}
        points.append((guess, peak))


def find_limit(
    rows: list[dict],
    mode: str,
    budget: float,
    args: argparse.Namespace,
    cfg: Config,
    record: Callable[[dict], dict],
) -> dict:
    """Our largest inner-step count under ``budget``: compile-only probes
    (:func:`search_largest` on XLA's analysis), then one real run at the count
    found; if that run is over the budget (XLA:CPU's buffer assignment varies a
    little from one compilation to the next), the search goes on below it."""
    probes_left = args.max_probes
    confirm = replace(cfg, timeout=args.confirm_timeout)

    def probe(n: int) -> float | None:
        return figure(record(measure(mode, n, cfg, compile_only=True)))

    for _ in range(3):
        limit = search_largest(curve(rows, mode), budget, probe, probes_left)
        probes_left -= limit["probes"]
        limit["probes"] = args.max_probes - probes_left
        steps = limit["steps"]
        here = [r for r in rows if r["mode"] == mode and r["inner_steps"] == steps]
        if args.no_confirm or not steps or (here and not here[-1].get("compile_only")):
            return limit  # measured by a real run already
        row = record(measure(mode, steps, confirm))
        limit["confirmed_peak_mb"] = row.get("peak_mb")
        if row.get("peak_mb") is None or row["peak_mb"] <= budget:
            return limit
    return limit


def curve(rows: Sequence[dict], mode: str) -> list[tuple[int, float]]:
    """``(inner_steps, MB)`` of ``mode``'s rows that have a figure, sorted; of
    several rows at one count the last one counts (a run after a probe)."""
    latest = {
        r["inner_steps"]: figure(r)
        for r in rows
        if r["mode"] == mode and figure(r) is not None
    }
    return sorted(latest.items())


def table(rows: Sequence[dict]) -> str:
    """The markdown table: inner steps × modes (peak MB, step s, compile s)."""
    rows = [r for r in rows if not r.get("compile_only")]
    steps = sorted({r["inner_steps"] for r in rows})
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    width = {m: 2 if m == "learn2learn" else 3 for m in modes}
    head = "| inner steps |"
    for m in modes:
        head += f" {_label(m)}: step peak MB"
        head += " (XLA) | step s | compile s |" if width[m] == 3 else " | step s |"
    lines = [head, "|---|" + "---|" * sum(width.values())]
    for n in steps:
        cells = []
        for m in modes:
            r = next(
                (r for r in rows if r["mode"] == m and r["inner_steps"] == n), None
            )
            if r is None:
                cells += [""] * width[m]
            elif r.get("peak_mb") is None:
                cells += [r.get("error", "failed")[:40]] + ["–"] * (width[m] - 1)
            elif m == "learn2learn":
                cells += [f"{r['peak_mb']:.1f}", f"{r['step_s']:.2f}"]
            else:
                cells += [
                    f"{r['peak_mb']:.1f} ({r['xla_mb']:.1f})",
                    f"{r['step_s']:.2f}",
                    f"{r['compile_s']:.1f}",
                ]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def budget_sweep(rows: Sequence[dict], modes: Sequence[str]) -> list[dict]:
    """For each budget equal to learn2learn's peak at one of its measured counts,
    the largest count of every mode (from the curves) and remat's ratio."""
    out = []
    for n, mb in sorted(curve(rows, "learn2learn")):
        entry: dict[str, Any] = {"peer_steps": n, "budget_mb": mb}
        for mode in modes:
            entry[mode] = largest_under(curve(rows, mode), mb)
        remat = entry.get("remat", {}).get("steps")
        entry["ratio_remat"] = remat / n if remat is not None else None
        out.append(entry)
    return out


def plot(rows: Sequence[dict], budget: float, path: Path) -> None:
    """Peak MB against inner steps per mode (log-log), with the budget line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conv = next((f", ours {r['conv']}" for r in rows if r.get("conv")), "")
    fig, ax = plt.subplots(figsize=(7.2, 4.6))
    for mode, marker in zip(MODES, "os^", strict=True):
        pts = curve(rows, mode)
        if not pts:
            continue
        (line,) = ax.plot(*zip(*pts, strict=True), label=_label(mode))
        ran = dict(curve([r for r in rows if not r.get("compile_only")], mode))
        for n, mb in pts:  # filled: a measured run; hollow: a compile-only probe
            face = line.get_color() if ran.get(n) == mb else "white"
            ax.plot(n, mb, marker=marker, color=line.get_color(), mfc=face)
    ax.axhline(budget, color="gray", ls="--", lw=1, label=f"budget {budget:.0f} MB")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="inner steps (second-order MAML)",
        ylabel="peak memory of one meta-step (MB)",
        title=f"{rows[0]['workload']}{conv}: memory per meta-step\n"
        "(filled: step peak RSS; hollow: XLA analysis of a compile-only probe)",
    )
    ax.title.set_fontsize(10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_report(rows: Sequence[dict], summary: dict, ours: Sequence[str]) -> None:
    """Prints the table, the budget result and the budget sweep."""
    budget, limits = summary["budget_mb"], summary["largest_inner_steps"]
    print(table(rows))
    print(f"\nbudget {budget:.1f} MB ({summary['budget_from']}); largest inner steps:")
    for mode, lim in limits.items():
        if not curve(rows, mode):
            print(f"  {_label(mode)}: not measured")
            continue
        how = " (extrapolated)" if lim.get("extrapolated") else ""
        peak = lim.get("confirmed_peak_mb")
        how += f" (measured there: {peak:.1f} MB)" if peak is not None else ""
        print(f"  {_label(mode)}: {lim['steps']}{how}")
    if summary["ratio_remat_vs_learn2learn"]:
        ratio = summary["ratio_remat_vs_learn2learn"]
        print(f"  ours remat / learn2learn: {ratio:.1f}×")
    if not summary["sweep"]:
        return
    print(
        "\n| budget = learn2learn's peak at N steps | MB | "
        + " | ".join(_label(m) for m in ours)
        + " | remat / learn2learn |"
    )
    print("|---|---|" + "---|" * len(ours) + "---|")
    for e in summary["sweep"]:
        cells = [f"{e[m]['steps']}{'*' if e[m]['extrapolated'] else ''}" for m in ours]
        ratio = f"{e['ratio_remat']:.1f}×" if e["ratio_remat"] else "–"
        print(
            f"| {e['peer_steps']} | {e['budget_mb']:.1f} | "
            + " | ".join(cells)
            + f" | {ratio} |"
        )
    print("(* extrapolated past the measured curve)")


def _label(mode: str) -> str:
    return mode if mode == "learn2learn" else f"ours {mode}"


def reusable_rows(path: Path, args: argparse.Namespace) -> list[dict]:
    """The measurement rows in ``path`` of this invocation's modes and
    configuration (workload, meta-batch, and for ours chunk and ``--conv``)."""
    rows = []
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if r.get("mode") not in args.modes or r["workload"] != args.workload:
            continue
        same = r["meta_batch"] == args.meta_batch
        if r["mode"] != "learn2learn":
            same &= r["chunk"] == args.chunk and r.get("conv_flag") == args.conv
        if same:
            rows.append({**r, "reused": True})
    return rows


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--workload",
        default="omniglot-5w1s-q15-maxpool",
        choices=("omniglot-5w1s-q15-maxpool", "omniglot-5w1s", "sinusoid"),
    )
    p.add_argument(
        "--inner-steps", type=int, nargs="+", default=[1, 2, 5, 10, 25, 50, 100]
    )
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--meta-batch", type=int, default=1)
    p.add_argument("--chunk", type=int, default=1, help="tasks per scan chunk (ours)")
    p.add_argument("--conv", choices=("im2col", "lax"), help="default: im2col on CPU")
    p.add_argument("--timeout", type=float, default=180.0, help="s per measurement")
    p.add_argument("--budget-mb", type=float)
    p.add_argument("--budget-peer-steps", type=int, default=100)
    p.add_argument(
        "--search",
        action="store_true",
        help="probe ours past the curve (compile-only), then confirm with one run",
    )
    p.add_argument("--max-probes", type=int, default=8)
    p.add_argument("--confirm-timeout", type=float, default=600.0)
    p.add_argument("--no-confirm", action="store_true")
    p.add_argument(
        "--reuse",
        type=Path,
        metavar="JSONL",
        help="take the rows of earlier runs of this configuration from this file; "
        "modes with rows there are not measured again",
    )
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--compile-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        if args.worker == "learn2learn":
            row = peer_worker(args.workload, args.inner_steps[0], args.meta_batch)
        else:
            row = ours_worker(
                args.workload,
                args.inner_steps[0],
                args.worker == "remat",
                args.meta_batch,
                args.chunk,
                args.conv,
                args.compile_only,
            )
        print(json.dumps(row), flush=True)
        return row

    if args.smoke:
        args.workload, args.inner_steps, args.modes = "sinusoid", [1], ["remat"]
        args.search, args.meta_batch = False, 2
    rows: list[dict] = []
    if args.reuse:
        rows += reusable_rows(args.reuse, args)
    reused = {r["mode"] for r in rows if r.get("peak_mb") is not None}
    if "learn2learn" in set(args.modes) - reused and (
        args.workload != "omniglot-5w1s-q15-maxpool" or not peers_available()
    ):
        print(
            "learn2learn skipped: no .peers-venv with learn2learn, or another "
            "workload than omniglot-5w1s-q15-maxpool",
            file=sys.stderr,
        )
        args.modes = [m for m in args.modes if m != "learn2learn"]
    cfg = Config(args.workload, args.meta_batch, args.chunk, args.conv, args.timeout)
    args.out.mkdir(parents=True, exist_ok=True)
    jsonl = args.out / "memory.jsonl"

    def record(row: dict) -> dict:
        row.update(date=time.strftime("%Y-%m-%d %H:%M"), cpu_count=os.cpu_count())
        print(json.dumps(row), flush=True)
        with jsonl.open("a") as f:
            f.write(json.dumps(row) + "\n")
        rows.append(row)
        return row

    for mode in args.modes:
        if mode in reused:
            continue
        for steps in sorted(args.inner_steps):
            if record(measure(mode, steps, cfg)).get("peak_mb") is None:
                break  # larger counts only take longer

    budget, budget_from = args.budget_mb, "--budget-mb"
    if budget is None:
        ref = dict(curve(rows, "learn2learn")).get(args.budget_peer_steps)
        budget = ref if ref is not None else 1024.0
        budget_from = (
            f"learn2learn's step peak at {args.budget_peer_steps} inner steps"
            if ref is not None
            else "default"
        )
    limits: dict[str, dict] = {}
    for mode in args.modes:
        if args.search and mode != "learn2learn":
            limits[mode] = find_limit(rows, mode, budget, args, cfg, record)
        else:
            limits[mode] = largest_under(curve(rows, mode), budget)
    peer = limits.get("learn2learn", {}).get("steps")
    remat = limits.get("remat", {}).get("steps")
    summary = {
        "workload": args.workload,
        "meta_batch": args.meta_batch,
        "chunk": args.chunk,
        "conv": args.conv,
        "budget_mb": budget,
        "budget_from": budget_from,
        "largest_inner_steps": limits,
        "ratio_remat_vs_learn2learn": remat / peer if peer and remat else None,
        "sweep": budget_sweep(rows, [m for m in args.modes if m != "learn2learn"]),
    }
    with jsonl.open("a") as f:
        f.write(json.dumps({"summary": summary, "date": time.strftime("%F %R")}))
        f.write("\n")
    print_report(rows, summary, [m for m in args.modes if m != "learn2learn"])
    if not args.no_plot and rows:
        plot(rows, budget, args.out / "memory.png")
    return {"rows": rows, "summary": summary}


if __name__ == "__main__":
    main()
