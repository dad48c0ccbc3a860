"""maml_jax against learn2learn, higher and torch.func, side by side, alternating.

Question: on the same model, weights, data and loss, how many tasks per second
does one MAML meta-train step process with maml_jax and with each PyTorch peer?

For each workload it runs ``run_ours.py`` and ``run_peer.py --impl ...`` as
separate processes of the ``.peers-venv`` Python, alternating (ours, learn2learn,
higher, torch.func, ours, learn2learn, ... for ``--rounds``), so that drifts in
machine load spread over all of them; then prints a markdown table and appends
every row (with the machine, the load average before the run and the versions) to
``benchmarks/results/peers/<workload>.jsonl``. The real data are exported first
(``export.py``) when missing.

Table: s/meta-step is the median over rounds of each run's median; p10–p90 spans
the lowest p10 to the highest p90 over rounds; tasks/s = meta-batch / that median;
compile (ours only) is the median over rounds; peak RSS the largest; ratio = our
tasks/s ÷ the row's tasks/s, one column for each of our variants measured:
``maml_jax``; ``maml_jax-scan`` (sinusoid only), ours with 500 meta-steps per call
in one ``lax.scan``, as ``fit`` trains; ``maml_jax-bf16`` (Omniglot only), ours
computing the convolutions in bfloat16, measured against learn2learn and higher
under ``torch.autocast`` bfloat16 (``learn2learn-bf16``, ``higher-bf16``).

Command: ``python benchmarks/peers/compare.py --workloads sinusoid --rounds 2``
(after ``bash benchmarks/peers/setup.sh``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.peers.common import (  # noqa: E402
    PEERS,
    PEERS_PYTHON,
    RESULTS_DIR,
    ROOT,
    WORKLOADS,
    export_path,
)

# maml_jax-scan: ours with SCAN_STEPS_PER_CALL meta-steps per call (lax.scan, as
# fit runs them); run only for the workloads whose step is short enough for
# dispatch to matter (an Omniglot step takes seconds).
SCAN_STEPS_PER_CALL = 500
SCAN_WORKLOADS = ("sinusoid",)
# -bf16: bfloat16 compute (ours: Conv4(dtype=bfloat16); peers: torch.autocast),
# for the convolutional workloads (the sinusoid MLP is dispatch-bound).
BF16 = "-bf16"
BF16_IMPLS = ("maml_jax-bf16", "learn2learn-bf16", "higher-bf16")
IMPLS = ("maml_jax", "maml_jax-scan", *PEERS, *BF16_IMPLS)
OURS = ("maml_jax", "maml_jax-scan", "maml_jax-bf16")


def machine_info() -> dict:
    """CPU model, cores, memory and OS of this machine."""
    info = {"platform": platform.platform(), "cores": os.cpu_count()}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        info["cpu"] = next(
            line.split(":", 1)[1].strip()
            for line in cpuinfo.splitlines()
            if line.startswith("model name")
        )
        meminfo = Path("/proc/meminfo").read_text().split()
        info["mem_gib"] = round(int(meminfo[meminfo.index("MemTotal:") + 1]) / 2**20, 1)
    except (OSError, StopIteration, ValueError):
        pass
    return info


def runs_on(impl: str, workload: str) -> bool:
    """Whether ``impl`` is measured on ``workload``."""
    if impl == "maml_jax-scan":
        return workload in SCAN_WORKLOADS
    return not impl.endswith(BF16) or workload not in SCAN_WORKLOADS


def command(impl: str, workload: str, args: argparse.Namespace) -> list[str]:
    """The command line of one measurement."""
    common = [
        f"--workload={workload}",
        f"--order={args.order}",
        f"--inner-steps={args.inner_steps}",
        f"--steps={args.steps}",
    ]
    if impl.endswith(BF16):
        impl = impl.removesuffix(BF16)
        common.append("--precision=bfloat16")
    if impl == "maml_jax":
        return [str(args.python), "-m", "benchmarks.peers.run_ours", *common]
    if impl == "maml_jax-scan":
        return [
            str(args.python),
            "-m",
            "benchmarks.peers.run_ours",
            *common,
            f"--steps-per-call={SCAN_STEPS_PER_CALL}",
        ]
    return [
        str(args.python),
        "-m",
        "benchmarks.peers.run_peer",
        f"--impl={impl}",
        *common,
        f"--warmup={args.warmup}",
        f"--threads={args.torch_threads}",
    ]


def run_one(impl: str, workload: str, args: argparse.Namespace) -> dict:
    """Runs one measurement in its own process; returns its row (or the error)."""
    cmd = command(impl, workload, args)
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout
        )
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode == 0 and lines:
            row = json.loads(lines[-1])
        else:
            tail = proc.stderr.strip().splitlines()[-5:]
            row = {"error": f"exit {proc.returncode}: " + " | ".join(tail)}
    except subprocess.TimeoutExpired:
        row = {"error": f"timed out after {args.timeout} s"}
    row.setdefault("impl", impl)
    row.setdefault("workload", workload)
    row.update(
        command=" ".join(cmd[1:]),
        wall_s=time.perf_counter() - t0,
        loadavg_1min_before=load,
    )
    return row


def median(values: list[float]) -> float:
    v = sorted(values)
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


def table(rows: list[dict], impls: list[str]) -> str:
    """The markdown table of one workload's rows (see the module docstring)."""
    summary = {}
    for impl in impls:
        ok = [r for r in rows if r["impl"] == impl and "error" not in r]
        if not ok:
            continue
        med = median([r["step_s_median"] for r in ok])
        compile_s = [r["compile_s"] for r in ok if "compile_s" in r]
        summary[impl] = {
            "runs": len(ok),
            "median": med,
            "p10": min(r["step_s_p10"] for r in ok),
            "p90": max(r["step_s_p90"] for r in ok),
            "tasks": ok[0]["meta_batch"] / med,
            "compile": median(compile_s) if compile_s else None,
            "rss": max(r["peak_rss_mb"] for r in ok),
            "threads": ok[0].get("threads"),
        }
    ours = {o: summary[o]["tasks"] for o in OURS if o in summary}
    out = [
        "| implementation | runs | threads | s/meta-step (median) | p10–p90 (s) "
        "| tasks/s | compile (s) | peak RSS (MB) |"
        + "".join(f" {o} ÷ this |" for o in ours),
        "|---|---|---|---|---|---|---|---|" + "---|" * len(ours),
    ]
    for impl, s in summary.items():
        compile_s = f"{s['compile']:.1f}" if s["compile"] is not None else "–"
        out.append(
            f"| {impl} | {s['runs']} | {s['threads']} | {s['median']:.4g} "
            f"| {s['p10']:.4g}–"
            f"{s['p90']:.4g} | {s['tasks']:,.1f} | {compile_s} | {s['rss']:,.0f} |"
            + "".join(f" {t / s['tasks']:.2f} |" for t in ours.values())
        )
    for r in rows:
        if "error" in r:
            out.append(f"\n{r['impl']} failed: {r['error']}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> dict[str, list[dict]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=20, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=2, help="peers' warm-up steps")
    p.add_argument("--order", choices=("first", "second"), default="second")
    p.add_argument("--inner-steps", type=int, default=1)
    p.add_argument(
        "--torch-threads",
        type=int,
        default=0,
        help="peers' torch.set_num_threads (default 0: torch's default)",
    )
    p.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    p.add_argument("--python", type=Path, default=PEERS_PYTHON)
    p.add_argument("--no-save", action="store_true", help="do not append to results")
    args = p.parse_args(argv)
    if not args.python.exists():
        p.error(f"{args.python} is missing: run `bash benchmarks/peers/setup.sh`")
    missing = [w for w in args.workloads if not export_path(w).is_file()]
    if missing:
        subprocess.run(
            [
                str(args.python),
                "-m",
                "benchmarks.peers.export",
                "--workloads",
                *missing,
            ],
            cwd=ROOT,
            check=True,
        )
    run_id = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    machine = machine_info()
    results = {}
    for workload in args.workloads:
        rows = []
        impls = [impl for impl in args.impls if runs_on(impl, workload)]
        for round_ in range(args.rounds):
            for impl in impls:
                row = run_one(impl, workload, args)
                row.update(run_id=run_id, round=round_, machine=machine)
                rows.append(row)
                status = row.get("error") or (
                    f"{row['step_s_median']:.4g} s/step, "
                    f"{row['tasks_per_s']:,.1f} tasks/s"
                )
                print(f"[{workload} round {round_}] {impl}: {status}", flush=True)
                if not args.no_save:
                    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
                    with (RESULTS_DIR / f"{workload}.jsonl").open("a") as f:
                        f.write(json.dumps(row) + "\n")
        print(
            f"\n{workload}, {args.order} order, {args.inner_steps} inner step(s), "
            f"{args.rounds} round(s) × {args.steps} steps; {machine.get('cpu', '?')}, "
            f"{machine['cores']} cores\n"
        )
        print(table(rows, impls) + "\n", flush=True)
        results[workload] = rows
    return results


if __name__ == "__main__":
    main()
