"""One writer per run directory: training and RL hold an OS lock on `<run_dir>/.lock` while they run.

`flock` is released by the kernel when its process exits, however it exits (SIGKILL included), so a
lock left by a dead run is simply taken over; the file keeps the last holder's pid, host and start
time for the message a second writer gets. Process 0 locks (the others write through Orbax in step
with it); remote run directories (gs://) are not locked. Evaluation only reads and takes no lock.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path
from typing import Self

import jax

from sidrec.errors import UserError

LOCK_FILE = ".lock"


class RunDirBusyError(UserError):
    """Another live process writes to this run directory."""


class RunDirLock:
    """`with RunDirLock(run_dir, "train"): ...`; raises RunDirBusyError when another process holds it."""

    def __init__(self, run_dir: str | os.PathLike, command: str):
        self._run_dir, self._command = str(run_dir), command
        self._fd: int | None = None

    def __enter__(self) -> Self:
        if "://" in self._run_dir or jax.process_index() != 0:
            return self
        path = Path(self._run_dir) / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 1024).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise RunDirBusyError(
                f"{self._run_dir} is in use by {holder}; wait for it to end, stop it, or pass another "
                "--run-dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{self._command} (pid {os.getpid()} on {socket.gethostname()}, started "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')})\n".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the lock; the file stays (removing it would race a new holder)
            self._fd = None
