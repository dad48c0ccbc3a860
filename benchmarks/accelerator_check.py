"""The accelerator check: ours against learn2learn and higher, and a short MAML run.

Question: on one accelerator, how many tasks per second does maml_jax's MAML
meta-train step process (``conv_impl="lax"``, ``batching="vmap"``) against
learn2learn's and higher's, on the Omniglot workload of the peer benchmark
(``omniglot-5w1s-q15-maxpool``) and the sinusoid, with compile time and peak
device memory; and what test accuracy does MAML's Omniglot 5-way 1-shot protocol
reach after four minutes of training there?

Every measurement runs in its own process (``benchmarks/peers/run_ours.py``,
``run_peer.py --device cuda``), so each peak memory is that process's alone; the
training is ``maml-jax train --preset omniglot-5w1s`` stopped by SIGTERM when its
time is up (it saves a checkpoint), then ``maml-jax eval`` on 600 test episodes.
The training time shrinks if the measurements ran long, so that the whole check
ends within ``--deadline`` seconds. Peers whose packages are missing are skipped
with a note. Writes one JSON file (``--out``; default ``$OUT/accelerator_check.json``
where ``$OUT`` is set, else ``benchmarks/results/accelerator_check.json``).

Run it through ``benchmarks/accelerator_check.sh``, which first installs the peer
wheels that ``benchmarks/build_peer_wheels.sh`` built. ``--smoke``: CPU-sized
(2 tasks per step through an 8-filter Conv4 with ``im2col`` convolutions, 2 timed
steps, a 2-step training run that ends by itself, 10 test episodes).

Command: ``bash benchmarks/accelerator_check.sh``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKLOADS = ("omniglot-5w1s-q15-maxpool", "sinusoid")
PEERS = ("learn2learn", "higher")
OMNIGLOT_CANDIDATES = (
    ROOT / "shared" / "data" / "omniglot",
    ROOT.parent / "shared" / "data" / "omniglot",
    ROOT / ".omniglot",
)
EVAL_RESERVE_S = 90  # test episodes, their compile and the JSON, after training


def _omniglot_dir(given: Path | None) -> Path | None:
    env = os.environ.get("MAML_JAX_OMNIGLOT_DIR")
    for path in (given, Path(env) if env else None, *OMNIGLOT_CANDIDATES):
        if path is not None and (path / "images_background.zip").is_file():
            return path
    return None


def _run_json(cmd: list[str], env: dict, timeout: float) -> dict:
    """Runs ``cmd``; its last JSON line, or ``{"error": ...}``."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "command": " ".join(cmd)}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode == 0 and lines:
        row = json.loads(lines[-1])
    else:
        tail = " | ".join(proc.stderr.strip().splitlines()[-5:])
        row = {"error": f"exit {proc.returncode}: {tail}"}
    row.pop("times_s", None)
    row["command"] = " ".join(cmd[1:])
    row["wall_s"] = time.perf_counter() - t0
    return row


def _summary(row: dict) -> dict:
    keys = (
        "tasks_per_s",
        "step_s_median",
        "compile_s",
        "peak_device_mb",
        "temp_mb",
        "peak_rss_mb",
        "meta_batch",
        "formulation",
        "device",
        "error",
        "command",
        "wall_s",
    )
    return {k: row[k] for k in keys if k in row}


def _missing_peers() -> dict[str, str]:
    """Why each peer cannot run here (empty where all can)."""
    missing = {}
    for peer in PEERS:
        absent = [m for m in ("torch", peer) if importlib.util.find_spec(m) is None]
        if absent:
            missing[peer] = (
                f"skipped: {', '.join(absent)} not installed (build the wheels with "
                f"benchmarks/build_peer_wheels.sh; accelerator_check.sh installs them)"
            )
    return missing


def _conv_impl(args) -> str:
    """``lax`` convolutions on the accelerator. The CPU smoke run checks the
    script, not the formulation: it takes ``im2col``, as the library does on CPU
    (``lax`` convolutions batched by ``vmap`` compile for minutes there)."""
    return "im2col" if args.smoke else "lax"


def throughput(args, env: dict, notes: list[str]) -> dict:
    """Ours and the peers on each workload: one subprocess per measurement."""
    py = sys.executable
    ours_extra = [f"--conv-impl={_conv_impl(args)}", "--batching=vmap"]
    if args.smoke:
        ours_extra += ["--meta-batch=2", "--filters=8"]
    missing = _missing_peers()
    results: dict[str, dict] = {w: {} for w in WORKLOADS}
    if len(missing) < len(PEERS):  # the peers read exported weights and batches
        export = subprocess.run(
            [py, "-m", "benchmarks.peers.export", "--workloads", *WORKLOADS],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=args.timeout,
        )
        if export.returncode:
            tail = " | ".join(export.stderr.strip().splitlines()[-3:])
            missing = {p: f"skipped: export failed: {tail}" for p in PEERS}
    device = "cuda" if args.info.get("torch_cuda") else "cpu"
    for workload in WORKLOADS:
        common = [f"--workload={workload}", f"--steps={args.steps}"]
        ours = [py, "-m", "benchmarks.peers.run_ours", *common, *ours_extra]
        results[workload]["maml_jax"] = _summary(_run_json(ours, env, args.timeout))
        for peer in PEERS:
            if peer in missing:
                results[workload][peer] = {"skipped": missing[peer]}
                continue
            cmd = [py, "-m", "benchmarks.peers.run_peer", f"--impl={peer}", *common]
            cmd += [f"--device={device}", "--warmup=2"]
            results[workload][peer] = _summary(_run_json(cmd, env, args.timeout))
    notes.extend(f"{peer}: {why}" for peer, why in missing.items())
    return results


# Asked in a child process: this one must not take the accelerator's memory
# (JAX preallocates most of it) while the measurements run.
_INFO = """
import importlib.util, json
import jax
d = jax.devices()[0]
info = {"backend": jax.default_backend(), "device": f"{d.platform}: {d.device_kind}"}
if importlib.util.find_spec("torch") is not None:
    import torch
    info["torch_cuda"] = torch.cuda.is_available()
print(json.dumps(info))
"""


def _device_info(env: dict) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", _INFO], env=env, capture_output=True, text=True
    )
    lines = done.stdout.strip().splitlines()
    return json.loads(lines[-1]) if done.returncode == 0 and lines else {}


def training(args, env: dict, seconds: float, notes: list[str]) -> dict:
    """``maml-jax train --preset omniglot-5w1s`` for ``seconds``, then ``eval``."""
    data = _omniglot_dir(args.omniglot_dir)
    if data is None:
        notes.append("training skipped: no Omniglot archives found")
        return {"skipped": "no Omniglot archives (--omniglot-dir)"}
    run = Path(tempfile.mkdtemp(prefix="accelerator-check-")) / "run"
    cli = [sys.executable, "-m", "maml_jax.app.cli"]
    train = [*cli, "train", "--preset", "omniglot-5w1s"]
    train += ["--conv-impl", _conv_impl(args)]
    train += ["--batching", "vmap", "--no-progress", "--data-dir", str(data)]
    train += ["--out", str(run)]
    if args.smoke:
        train += ["--steps", "2", "--meta-batch", "4", "--filters", "8"]
        train += ["--val-episodes", "4", "--eval-every", "2"]
        train += ["--checkpoint-every", "2", "--steps-per-call", "2"]
    else:  # run until stopped; validate and save every 1000 steps
        train += ["--steps", "10000000", "--eval-every", "1000"]
        train += ["--checkpoint-every", "1000", "--steps-per-call", "50"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        train, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # finishes its chunk and checkpoints
    _, stderr = proc.communicate()
    train_s = time.perf_counter() - t0
    result = {
        "preset": "omniglot-5w1s",
        "command": " ".join(train[1:]),
        "train_wall_s": train_s,
        "exit_code": proc.returncode,
    }
    if proc.returncode not in (0, 128 + signal.SIGTERM):
        tail = " | ".join(stderr.decode().strip().splitlines()[-5:])
        return {**result, "error": tail}
    episodes = "10" if args.smoke else "600"
    done = subprocess.run(
        [*cli, "eval", "--run", str(run), "--episodes", episodes],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=args.timeout,
    )
    if done.returncode:
        tail = " | ".join(done.stderr.strip().splitlines()[-5:])
        return {**result, "error": f"eval: {tail}"}
    test = json.loads((run / "test_results.json").read_text())
    return {
        **result,
        "trained_steps": test["trained_steps"],
        "steps_per_s": test["trained_steps"] / train_s,
        "test_episodes": test["episodes"],
        "test_accuracy": test["accuracy"][-1],
        "test_ci95": test["accuracy_ci95"][-1],
        "test_accuracy_per_inner_step": test["accuracy"],
        "device": test["device"],
        "run": str(run),
    }


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    import maml_jax  # imports jax without starting a backend (no device memory)

    names = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint")
    found = {"python": platform.python_version(), "maml_jax": maml_jax.__version__}
    for name in (*names, "torch", "learn2learn", "higher"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU-sized, seconds")
    p.add_argument("--out", type=Path, help="the JSON file to write")
    p.add_argument("--omniglot-dir", type=Path, help="folder with Omniglot's zips")
    p.add_argument("--steps", type=int, help="timed steps per measurement (20)")
    p.add_argument("--train-seconds", type=float, help="training time (240)")
    p.add_argument("--deadline", type=float, default=470, help="whole check, s")
    p.add_argument("--timeout", type=float, help="per subprocess, s (240)")
    args = p.parse_args(argv)
    # A smoke run on a busy CPU can take minutes to compile; it is never cut short.
    args.timeout = args.timeout or (1800 if args.smoke else 240)
    args.steps = args.steps or (2 if args.smoke else 20)
    out = args.out or (
        Path(os.environ["OUT"]) / "accelerator_check.json"
        if os.environ.get("OUT")
        else ROOT / "benchmarks" / "results" / "accelerator_check.json"
    )
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, (str(ROOT), os.environ.get("PYTHONPATH")))
    )
    # One dataset cache for the export and the training run: decode once.
    env.setdefault("MAML_JAX_CACHE_DIR", tempfile.mkdtemp(prefix="maml-jax-cache-"))
    data = _omniglot_dir(args.omniglot_dir)
    if data is not None:
        env["MAML_JAX_OMNIGLOT_DIR"] = str(data)
    args.info = _device_info(env)
    notes: list[str] = []
    results = {
        "smoke": args.smoke,
        "backend": args.info.get("backend"),
        "device": args.info.get("device"),
        "versions": _versions(),
        "throughput": throughput(args, env, notes),
    }
    if args.smoke:  # a 2-step run that ends by itself
        seconds = args.train_seconds or args.timeout
    else:
        seconds = args.train_seconds or 240.0
        left = args.deadline - (time.perf_counter() - t0) - EVAL_RESERVE_S
        if left < seconds:
            notes.append(f"training shortened from {seconds:.0f} s to {left:.0f} s")
            seconds = max(left, 30.0)
    results["training"] = training(args, env, seconds, notes)
    results["notes"] = notes
    results["total_s"] = time.perf_counter() - t0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(json.dumps({"wrote": str(out), "total_s": results["total_s"]}))
    return results


if __name__ == "__main__":
    main()
