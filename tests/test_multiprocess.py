"""Two processes on localhost (gloo CPU collectives, 4 fake CPU devices each, FSDP over all 8) train
and evaluate like one process with 8 devices: same losses and parameters, same predictions file.

Every run is `cli.py` in subprocesses on a tiny synthetic config; the processes of a run share its run
directory, as the hosts of a pod share a gs:// bucket.
"""

import json
import socket
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
DEVICES = 8
TOTAL_STEPS = 4
EVAL_SAMPLES = 5
TINY = [
    *TINY_DATA_AND_MODEL,
    # 8 examples a step fill at most 8 rows: one micro-batch, one compilation of the step.
    "--train.global-batch-size", "8", "--train.per-device-batch-size", "1", "--data.valid-max-samples", "8",
    "--train.max-steps", str(TOTAL_STEPS), "--checkpoint.every-steps", "2",
    "--mesh.fsdp", str(DEVICES), "--mesh.data", "1",
    # The first 5 test prompts share one length bucket: one call of 1 prompt per device (3 padding
    # rows), both processes holding real prompts, one compilation of the beam search.
    "--eval.num-beams", "5", "--eval.max-samples", str(EVAL_SAMPLES), "--eval.batch-size", "1",
]
RUN_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_cli(command: str, run_dir: Path, processes: int) -> list[str]:
    """`cli.py COMMAND` as `processes` processes splitting the 8 devices; returns each one's output."""
    base = [sys.executable, str(REPO / "cli.py"), command, "--preset", "demo", "--run-dir", str(run_dir), *TINY]
    env = cli_env(devices=DEVICES // processes, compile_cache=False)  # its programs differ run to run anyway
    distributed = [] if processes == 1 else [
        "--mesh.coordinator-address", f"localhost:{free_port()}", "--mesh.num-processes", str(processes)]
    logs = [run_dir.parent / f"{run_dir.name}.{command}.{i}of{processes}.log" for i in range(processes)]
    running, started = [], time.perf_counter()
    try:
        for i, log in enumerate(logs):
            with open(log, "w") as out:
                process_id = [] if processes == 1 else ["--mesh.process-id", str(i)]
                running.append(subprocess.Popen(base + distributed + process_id, cwd=REPO, env=env, stdout=out,
                                                stderr=subprocess.STDOUT))
        codes = [process.wait(timeout=RUN_TIMEOUT_S) for process in running]
    finally:
        for process in running:
            if process.poll() is None:
                process.kill()
    print(f"cli.py {command} as {processes} process(es): {time.perf_counter() - started:.1f}s")
    outputs = [log.read_text() for log in logs]
    for code, output in zip(codes, outputs):
        assert code == 0, output[-4000:]
    return outputs


def train_losses(run_dir: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {line["step"]: line["train/loss"] for line in lines if "train/loss" in line}


def last_params(run_dir: Path) -> tuple[dict, int]:
    _, model_cfg = build.load_run_description(run_dir)
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    params, step = restore_params(run_dir, qwen2.abstract_params(model_cfg), "last", one_device)
    return jax.tree.map(np.asarray, params), step


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """One process trains and evaluates its run; two processes train another run, then evaluate the
    first one's checkpoint (so both evaluations see the very same parameters)."""
    root = tmp_path_factory.mktemp("multiprocess")
    one, two = root / "one_process", root / "two_processes"
    run_cli("train-eval", one, processes=1)
    one_process_predictions = (one / "eval_predictions.json").read_text()
    two_process_train = run_cli("train", two, processes=2)
    two_process_eval = run_cli("eval", one, processes=2)
    return {"one": one, "two": two, "two_process_train": two_process_train, "two_process_eval": two_process_eval,
            "one_process_predictions": one_process_predictions,
            "two_process_predictions": (one / "eval_predictions.json").read_text()}


def test_two_processes_form_one_eight_device_mesh(runs):
    main, other = runs["two_process_train"]
    assert "2 process(es), 8 device(s) [cpu], mesh data=1 x fsdp=8" in main
    # Only process 0 reports (and writes the run directory's logs and summary).
    assert "2 process(es)" not in other
    assert json.loads((runs["two"] / "run_summary.json").read_text())["steps"] == TOTAL_STEPS


def test_two_processes_train_like_one(runs):
    # fp32 on the same 8-device program; only the order of the cross-process reductions (gloo vs
    # in-process all-reduce / reduce-scatter) differs, a rounding-level difference (measured ~1e-8
    # after 6 steps); the bound is 1e-5.
    one_losses, two_losses = train_losses(runs["one"]), train_losses(runs["two"])
    assert sorted(one_losses) == sorted(two_losses) == list(range(TOTAL_STEPS))
    assert max(abs(one_losses[s] - two_losses[s]) for s in one_losses) <= 1e-5
    (one_params, one_step), (two_params, two_step) = last_params(runs["one"]), last_params(runs["two"])
    assert one_step == two_step == TOTAL_STEPS
    differences = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), one_params, two_params)
    assert max(jax.tree.leaves(differences)) <= 1e-5, differences
    # The steps did change the parameters (the loss moved), so agreeing is not trivial.
    assert one_losses[TOTAL_STEPS - 1] < one_losses[0] - 1e-3


def test_two_process_eval_writes_the_same_predictions(runs):
    assert "2 process(es), 8 device(s)" in runs["two_process_eval"][0]
    predictions = json.loads(runs["two_process_predictions"])
    assert len(predictions) == EVAL_SAMPLES and all(len(p["predict"]) == 5 for p in predictions)
    # Each device searches its own prompts with replicated parameters, so splitting the prompts over
    # two processes changes nothing: the files are byte-identical (scores included).
    assert runs["two_process_predictions"] == runs["one_process_predictions"]
