"""One writer per run directory: a second train/rl is refused in one line; a dead holder's lock is taken over."""

import os
import signal
import subprocess
import sys
import time

import pytest

import cli
from sidrec.rundir import RunDirBusyError, RunDirLock

HOLD = """
import sys, time
from sidrec.rundir import RunDirLock
with RunDirLock(sys.argv[1], "cli.py train"):
    print("held", flush=True)
    time.sleep(600)
"""


def hold_in_subprocess(run_dir):
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    return process


def test_second_writer_is_refused_naming_the_holder_and_a_dead_holder_is_taken_over(tmp_path):
    holder = hold_in_subprocess(tmp_path)
    try:
        with pytest.raises(RunDirBusyError) as error:
            with RunDirLock(tmp_path, "cli.py rl"):
                pass
        message = str(error.value)
        assert f"{tmp_path} is in use by cli.py train (pid {holder.pid} on " in message
        assert "pass another --run-dir" in message and "\n" not in message
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (tmp_path / ".lock").exists()  # what a crash leaves behind
    with RunDirLock(tmp_path, "cli.py rl"):
        assert f"cli.py rl (pid {os.getpid()} " in (tmp_path / ".lock").read_text()
    with RunDirLock(tmp_path, "cli.py rl"):  # released on exit
        pass


def test_cli_train_on_a_busy_run_dir_is_one_error_line(tmp_path, capsys):
    holder = hold_in_subprocess(tmp_path)
    try:
        started = time.perf_counter()
        code = cli.main(["train", "--preset", "demo", "--run-dir", str(tmp_path), "--wandb.mode", "disabled"])
        assert time.perf_counter() - started < 60  # refused before any model is built
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith(f"error: {tmp_path} is in use by cli.py train (pid {holder.pid}")
