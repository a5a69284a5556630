"""Flags for tiny end-to-end `cli.py` runs in tests (seconds each on one CPU core)."""

import sys
from pathlib import Path

REPO = Path(__file__).parents[1]
CLI = [sys.executable, str(REPO / "cli.py")]

TINY_DATA_AND_MODEL = [
    "--data.synthetic-items", "40", "--data.synthetic-users", "120",
    "--model.hidden-size", "32", "--model.intermediate-size", "64", "--model.num-layers", "1",
    "--model.num-heads", "2", "--model.num-kv-heads", "1", "--model.head-dim", "16",
    "--wandb.mode", "disabled",
]
