"""Fault suite: a real `maml-jax train` killed with SIGKILL loses nothing."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tests import helpers

SMALL, _final_params = helpers.CLI_SMALL_ARGS, helpers.final_params

STEPS = 40
# A job script's line: checkpoints every 5 steps, chunks of at most 4 (so chunks
# end at 4, 5, 8, 10, 12, 15, ...); the re-run is the same line plus --resume.
RUN = [*SMALL, "--steps", str(STEPS), "--eval-every", "8", "--checkpoint-every", "5"]
RUN += ["--steps-per-call", "4"]


def _command(omniglot_dir, out, resume=False):
    args = [sys.executable, "-m", "maml_jax.app.cli", "train", *RUN]
    args += ["--data-dir", str(omniglot_dir), "--out", str(out)]
    return args + ["--resume"] if resume else args


def _chunk_ends():
    """Where chunks end: at most 4 steps, cut at every checkpoint and evaluation."""
    ends, step = [], 0
    while step < STEPS:
        due = [step + 4, STEPS, (step // 5 + 1) * 5, (step // 8 + 1) * 8]
        step = min(due)
        ends.append(step)
    return ends


def _logged_steps(out):
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [
        json.loads(line)["step"]
        for line in path.read_text().splitlines()
        if line.strip()
    ]


@pytest.mark.slow
def test_sigkill_at_five_points_then_resume_is_identical(
    omniglot_dir, dataset_cache, tmp_path
):
    rng = random.Random(0)
    run = tmp_path / "killed"
    kills = 0
    resume = False
    while kills < 5:
        proc = subprocess.Popen(
            _command(omniglot_dir, run, resume),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=os.environ.copy(),
        )
        before = len(_logged_steps(run))
        deadline = time.monotonic() + 180
        # Kill right after a new chunk is logged (its checkpoint is being written
        # then) plus a random delay of up to 0.1 s.
        while len(_logged_steps(run)) <= before and proc.poll() is None:
            assert time.monotonic() < deadline, "no progress"
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.1))
        if proc.poll() is not None:  # finished before the kill: run is complete
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        kills += 1
        resume = True
    finish = subprocess.run(
        _command(omniglot_dir, run, resume=True),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert finish.returncode == 0, finish.stderr
    assert kills == 5

    full = tmp_path / "full"
    done = subprocess.run(
        _command(omniglot_dir, full), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    a, b = _final_params(full), _final_params(run)
    assert a.step == b.step == STEPS
    for x, y in zip(jax.tree.leaves(a.state), jax.tree.leaves(b.state), strict=True):
        np.testing.assert_array_equal(x, y)
    assert _logged_steps(run) == _logged_steps(full) == _chunk_ends()
