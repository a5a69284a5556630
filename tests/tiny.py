"""Flags and the environment for tiny end-to-end `cli.py` runs in tests (seconds each on one CPU core)."""

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).parents[1]
CLI = [sys.executable, str(REPO / "cli.py")]

TINY_DATA_AND_MODEL = [
    "--data.synthetic-items", "40", "--data.synthetic-users", "120",
    "--model.hidden-size", "32", "--model.intermediate-size", "64", "--model.num-layers", "1",
    "--model.num-heads", "2", "--model.num-kv-heads", "1", "--model.head-dim", "16",
    "--wandb.mode", "disabled",
]

# One persistent compilation cache for every `cli.py` subprocess of a test session: runs of the same tiny
# config (an RL run, its killed copy, the resume) compile each program once. A cached executable computes
# exactly what a freshly compiled one does; the key covers the program, the devices and the XLA flags.
COMPILE_CACHE = tempfile.mkdtemp(prefix="sidrec-test-jax-cache-")
atexit.register(shutil.rmtree, COMPILE_CACHE, ignore_errors=True)


def cli_env(devices: int = 1, compile_cache: bool = True) -> dict[str, str]:
    """The environment of a `cli.py` subprocess: CPU with `devices` fake devices, no JAX_* setting inherited
    (no multi-process setup leaks in), and the session's compilation cache unless compile_cache is False
    (processes of one run compiling side by side would write the same entries at once)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    env |= {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    if compile_cache:
        env |= {"JAX_COMPILATION_CACHE_DIR": COMPILE_CACHE, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}
    return env
