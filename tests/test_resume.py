"""A training run killed (SIGKILL) or preempted (SIGTERM) after its first checkpoint and then resumed
ends with bitwise the same parameters, and logs the same losses, as a run that was never interrupted.

Each run is `cli.py train` in a subprocess on a tiny synthetic config (one CPU device). The kill step
is drawn from a seeded rng and printed (`pytest -s` shows it). Runs share the test session's persistent
compilation cache (tiny.cli_env), so only the first one pays for compiling.
"""

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from tiny import TINY_DATA_AND_MODEL, cli_env

from sidrec import build
from sidrec.checkpoint import restore_params
from sidrec.model import qwen2

REPO = Path(__file__).parents[1]
TOTAL_STEPS = 24
SAVE_EVERY = 4
TINY = [
    *TINY_DATA_AND_MODEL,
    "--train.global-batch-size", "16", "--train.per-device-batch-size", "2", "--data.valid-max-samples", "16",
    "--train.max-steps", str(TOTAL_STEPS), "--checkpoint.every-steps", str(SAVE_EVERY),
    "--checkpoint.keep", "2",
]
RUN_TIMEOUT_S = 300


def train_command(run_dir: Path) -> list[str]:
    return [sys.executable, str(REPO / "cli.py"), "train", "--preset", "demo", "--run-dir", str(run_dir), *TINY]


def train(run_dir: Path) -> None:
    done = subprocess.run(train_command(run_dir), cwd=REPO, env=cli_env(), capture_output=True,
                          text=True, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]


def metric_lines(run_dir: Path, from_byte: int = 0) -> list[dict]:
    """The run's metrics.jsonl records from byte `from_byte` on (a line still being written is left out)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    with open(path, "rb") as file:
        file.seek(from_byte)
        text = file.read().decode()
    return [json.loads(line) for line in text.splitlines(keepends=True) if line.endswith("\n")]


def metrics_size(run_dir: Path) -> int:
    return (run_dir / "metrics.jsonl").stat().st_size


def losses(lines: list[dict], name: str = "train/loss") -> dict[int, float]:
    return {line["step"]: line[name] for line in lines if name in line}


def committed_steps(run_dir: Path) -> list[int]:
    """Steps Orbax has committed: it writes into `<step>.orbax-checkpoint-tmp-*` and renames when done."""
    directory = run_dir / "checkpoints"
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []


def reached(run_dir: Path, step: int) -> bool:
    """A checkpoint is committed and step `step`'s loss was logged (so the run is past `step`)."""
    return bool(committed_steps(run_dir)) and max(losses(metric_lines(run_dir)), default=-1) >= step


def interrupt(run_dir: Path, sig: signal.Signals, at_step: int) -> int:
    """Start a run and send it `sig` once `reached(run_dir, at_step)`; returns its exit code."""
    log_path = run_dir.parent / f"{run_dir.name}.interrupted.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(train_command(run_dir), cwd=REPO, env=cli_env(), stdout=log,
                                   stderr=subprocess.STDOUT)
        deadline = time.monotonic() + RUN_TIMEOUT_S
        try:
            while not reached(run_dir, at_step):
                assert process.poll() is None, f"the run ended before step {at_step}: {log_path.read_text()[-3000:]}"
                assert time.monotonic() < deadline, f"no step {at_step} after {RUN_TIMEOUT_S}s; see {log_path}"
                time.sleep(0.005)
            process.send_signal(sig)
            return process.wait(timeout=RUN_TIMEOUT_S)
        finally:
            if process.poll() is None:
                process.kill()


def last_params(run_dir: Path) -> tuple[dict, int]:
    _, model_cfg = build.load_run_description(run_dir)
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    params, step = restore_params(run_dir, qwen2.abstract_params(model_cfg), "last", one_device)
    return jax.tree.map(np.asarray, params), step


def differing_leaves(a: dict, b: dict) -> list[str]:
    flat_a, flat_b = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
    assert [path for path, _ in flat_a] == [path for path, _ in flat_b]
    return [jax.tree_util.keystr(path) for (path, x), (_, y) in zip(flat_a, flat_b)
            if x.dtype != y.dtype or not np.array_equal(x, y)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    train(run_dir)
    return run_dir


def interrupt_and_resume(sig: signal.Signals, run_dir: Path) -> dict:
    """Interrupt a run at a seeded random step after its first checkpoint, resume it to the end."""
    at_step = random.Random(f"resume-{sig.name}").randint(SAVE_EVERY, TOTAL_STEPS - SAVE_EVERY - 2)
    exit_code = interrupt(run_dir, sig, at_step)
    before = metric_lines(run_dir)
    resume_step = max(committed_steps(run_dir))
    print(f"{sig.name}: sent after step {at_step}'s loss was logged; the run had logged up to step "
          f"{max(losses(before))}; resuming from checkpoint {resume_step}")
    size = metrics_size(run_dir)
    train(run_dir)
    return {"exit_code": exit_code, "before": before, "resume_step": resume_step,
            "resumed": metric_lines(run_dir, from_byte=size)}


def check_matches_uninterrupted(run: dict, run_dir: Path, uninterrupted: Path) -> None:
    reference = metric_lines(uninterrupted)
    assert SAVE_EVERY <= run["resume_step"] < TOTAL_STEPS  # interrupted after a checkpoint, before the end
    # The resumed run continues at its checkpoint's step and logs exactly the uninterrupted run's losses
    # (json keeps every float32 bit), including the final validation loss.
    resumed = losses(run["resumed"])
    assert sorted(resumed) == list(range(run["resume_step"], TOTAL_STEPS))
    assert resumed == {step: loss for step, loss in losses(reference).items() if step >= run["resume_step"]}
    assert losses(run["resumed"], "valid/loss") == losses(reference, "valid/loss")
    # Before the interruption, too, it was the same run.
    before = losses(run["before"])
    assert before == {step: loss for step, loss in losses(reference).items() if step in before}
    params, step = last_params(run_dir)
    reference_params, reference_step = last_params(uninterrupted)
    assert step == reference_step == TOTAL_STEPS
    assert differing_leaves(params, reference_params) == []


def test_sigkill_then_resume_is_bitwise_identical(uninterrupted, tmp_path):
    run = interrupt_and_resume(signal.SIGKILL, tmp_path / "run")
    assert run["exit_code"] == -signal.SIGKILL
    check_matches_uninterrupted(run, tmp_path / "run", uninterrupted)


def test_sigterm_saves_exits_cleanly_and_resumes_bitwise_identical(uninterrupted, tmp_path):
    run = interrupt_and_resume(signal.SIGTERM, tmp_path / "run")
    assert run["exit_code"] == 0
    # The preempted run saved the state of the step it stopped at, having logged every step before it.
    assert run["resume_step"] == max(losses(run["before"])) + 1
    assert "checkpoint saved, exiting cleanly" in (tmp_path / "run" / "log.txt").read_text()
    check_matches_uninterrupted(run, tmp_path / "run", uninterrupted)
