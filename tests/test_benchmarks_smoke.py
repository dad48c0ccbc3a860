"""Every benchmark script's --smoke mode, the CLI and the README's quick start run."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_sinusoid_smoke(tmp_path):
    from maml_jax.app import sinusoid

    results = sinusoid.main(["--smoke", "--no-progress", "--out", str(tmp_path)])
    for name in ("maml", "pretrained"):
        entry = results["learners"][name]
        assert set(entry["5shot"]) == {"0", "1", "5", "10"}
        assert entry["step_ms_median"] > 0 and entry["compile_s"] > 0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["learners"]["maml"]["steps"] == 200
    assert (tmp_path / "sinusoid.png").stat().st_size > 10_000
    assert len((tmp_path / "metrics_maml.jsonl").read_text().splitlines()) == 2


def test_cli_help_and_unknown_command():
    run = lambda *a: subprocess.run(
        [sys.executable, "-m", "maml_jax.app.cli", *a], capture_output=True, text=True
    )
    assert run("--help").returncode == 0
    bad = run("nope")
    assert bad.returncode == 2 and "invalid choice: 'nope'" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_readme_quick_start_runs():
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"## Quick start\s+```python\n(.*?)```", readme, re.S).group(1)
    code = code.replace("range(1000)", "range(20)")
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert float(namespace["loss"]) > 0


@pytest.mark.slow
def test_omniglot_smoke(omniglot_dir, dataset_cache, tmp_path):
    from benchmarks import omniglot

    results = omniglot.main(
        [
            "--smoke",
            "--no-progress",
            "--data-dir",
            str(omniglot_dir),
            "--out",
            str(tmp_path),
        ]
    )
    assert results["trained_steps"] == 3 and results["episodes"] == 20
    assert len(results["accuracy"]) == 4  # 0..3 test-time inner steps
    assert all(0.0 <= a <= 1.0 for a in results["accuracy"])
    assert results["median_tasks_per_s"] > 0
    assert (tmp_path / "learning_curve.png").exists()


@pytest.mark.slow
def test_formulations_smoke():
    from benchmarks import formulations

    rows = formulations.main(["--smoke"])
    assert len(rows) == 2
    assert all(r["step_ms_median"] > 0 and r["compile_s"] > 0 for r in rows)


@pytest.mark.slow
def test_learners_smoke(tmp_path):
    from benchmarks import learners

    # Omniglot runs are covered by test_omniglot_smoke; here the sinusoid side.
    rows = learners.main(["--smoke", "--skip-omniglot", "--out", str(tmp_path)])
    assert [r["algorithm"] for r in rows] == ["maml", "protonet"]
    assert "sinusoid" in rows[0] and "sinusoid" not in rows[1]
    assert rows[0]["sinusoid"]["mse_5shot"]["1"] > 0
    assert (tmp_path / "learners.json").exists()


def test_throughput_smoke(tmp_path):
    from benchmarks import throughput

    rows = throughput.main(["--smoke", "--jsonl", str(tmp_path / "t.jsonl")])
    assert [r["inner_steps"] for r in rows] == [1, 2]
    assert all(r["tasks_per_s"] > 0 and r["compile_s"] > 0 for r in rows)
    assert all(0 < r["sampler_fraction"] < 1 for r in rows)
    assert len((tmp_path / "t.jsonl").read_text().splitlines()) == 2


def test_fit_compiles_smoke():
    from benchmarks import fit_compiles

    (row,) = fit_compiles.main(["--smoke"])  # chunks of 2 and 1: one program
    assert row["chunk_compiles"] == 1 and row["backend_compile_s"] > 0


def test_drop_in_conv_smoke():
    from benchmarks import drop_in_conv

    rows = drop_in_conv.main(["--smoke"])
    assert {r["conv"] for r in rows} == {"nn.Conv", "maml_jax.layers.Conv"}
    assert all(r["step_s_median"] > 0 and r["compile_s"] > 0 for r in rows)
    assert all(r["batching"] == "auto" and r["tune_s"] > 0 for r in rows)


def test_memory_smoke(tmp_path):
    from benchmarks import memory

    out = memory.main(["--smoke", "--no-plot", "--out", str(tmp_path)])
    (row,) = out["rows"]
    assert row["mode"] == "remat" and row["peak_mb"] is not None
    assert row["xla_mb"] > 0 and row["compile_s"] > 0 and row["step_s"] > 0
    lines = (tmp_path / "memory.jsonl").read_text().splitlines()
    assert len(lines) == 2 and "summary" in json.loads(lines[-1])
    # The budget arithmetic on a made-up linear curve (peak = 100 + 10 × steps).
    curve = [(1, 110.0), (10, 200.0)]
    assert memory.largest_under(curve, 150.0) == {"steps": 5, "extrapolated": False}
    assert memory.largest_under(curve, 300.0) == {"steps": 20, "extrapolated": True}
    probe = lambda n: 100.0 + 10.0 * n
    found = memory.search_largest(list(curve), 305.0, probe, max_probes=10)
    assert found["steps"] == 20 and found["probes"] >= 1


def test_accelerator_check_smoke(omniglot_dir, dataset_cache, tmp_path):
    import os

    out = tmp_path / "check.json"
    env = {**os.environ, "PYTHON": sys.executable}
    env["PEER_WHEELS"] = str(tmp_path / "no-wheels")  # never install here
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "accelerator_check.sh"), "--smoke"]
        + ["--out", str(out), "--omniglot-dir", str(omniglot_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert set(result) == {
        "smoke",
        "backend",
        "device",
        "versions",
        "throughput",
        "training",
        "notes",
        "total_s",
    }
    assert result["smoke"] is True and result["versions"]["jax"]
    for workload in ("omniglot-5w1s-q15-maxpool", "sinusoid"):
        rows = result["throughput"][workload]
        ours = rows["maml_jax"]
        assert ours["tasks_per_s"] > 0 and ours["compile_s"] > 0, ours
        assert ours["formulation"]["conv_impl"] == "im2col"  # lax on a GPU
        assert ours["formulation"]["batching"] == "vmap"
        for peer in ("learn2learn", "higher"):  # measured, or skipped with a note
            assert rows[peer].get("tasks_per_s", 0) > 0 or "skipped" in rows[peer]
    training = result["training"]
    assert training["trained_steps"] == 2 and training["test_episodes"] == 10
    assert 0.0 <= training["test_accuracy"] <= 1.0
