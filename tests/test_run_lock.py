"""One writer per run folder (``maml_jax.app.run_lock``) and ``maml-jax train``."""

import os
import signal
import socket
import subprocess
import sys

import pytest

from maml_jax.app import cli, run_lock


def _train(data_dir, out, capsys):
    argv = ["train", "--preset", "omniglot-5w1s", "--no-progress"]
    code = cli.main([*argv, "--data-dir", str(data_dir), "--out", str(out)])
    return code, capsys.readouterr().err


def test_second_train_into_a_locked_folder_fails_at_once(tmp_path, capsys):
    run, no_data = tmp_path / "run", tmp_path / "no-data"
    run.mkdir()
    no_data.mkdir()  # a train that got past the lock would fail reading it
    with run_lock.hold(run):  # this process plays the first `maml-jax train`
        code, err = _train(no_data, run, capsys)
    assert code == 2
    assert err.strip() == (
        f"maml-jax train: error: --out {run} is in use by another maml-jax train "
        f"(pid {os.getpid()} on host {socket.gethostname()}); wait for it to end "
        f"or stop it, or choose another --out."
    )
    assert sorted(p.name for p in run.iterdir()) == ["train.lock"]

    # Unlocked, the same command gets past the lock to the data; the lock is
    # released although it failed there.
    code, err = _train(no_data, run, capsys)
    assert code == 2 and "images_background.zip" in err
    assert not (run / "config.json").exists()
    with run_lock.hold(run):
        pass


def test_lock_of_a_killed_holder_is_released(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from maml_jax.app import run_lock\n"
            "with run_lock.hold(sys.argv[1]):\n"
            "    print('locked', flush=True); time.sleep(120)",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(run_lock.RunLockedError, match=f"pid {holder.pid} on"):
            with run_lock.hold(tmp_path):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        holder.stdout.close()
    with run_lock.hold(tmp_path):  # the OS released it with the process
        pass
