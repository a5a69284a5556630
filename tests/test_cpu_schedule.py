"""Importing sidrec turns off XLA:CPU's concurrency-optimized scheduler (sidrec/__init__.py) without
overriding a user's own XLA_FLAGS."""

import os
import subprocess
import sys

PRINT_FLAGS = "import os, sidrec; print(os.environ['XLA_FLAGS'])"


def flags_after_import(xla_flags: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    if xla_flags is not None:
        env["XLA_FLAGS"] = xla_flags
    return subprocess.run([sys.executable, "-c", PRINT_FLAGS], env=env, check=True, capture_output=True,
                          text=True).stdout.strip()


def test_import_appends_the_flag_to_existing_flags():
    assert flags_after_import(None) == "--xla_cpu_enable_concurrency_optimized_scheduler=false"
    assert flags_after_import("--xla_force_host_platform_device_count=8") == (
        "--xla_force_host_platform_device_count=8 --xla_cpu_enable_concurrency_optimized_scheduler=false")


def test_a_user_setting_wins():
    mine = "--xla_cpu_enable_concurrency_optimized_scheduler=true"
    assert flags_after_import(mine) == mine
