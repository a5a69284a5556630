"""Resume soak: one training run SIGKILLed at N random moments (checkpoints every step, so most kills land
while an async save is in flight) and resumed after each; its final parameters must equal an uninterrupted
run's bit for bit. `-m slow` runs 10 kills; as a script: `python tests/test_soak.py --kills 10 --seed 0`.
"""

import argparse
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import test_resume as resume  # noqa: E402  (the resume test's runner and comparisons)

TOTAL_STEPS = 100
FLAGS = [flag for flag in resume.TINY]
FLAGS[FLAGS.index("--train.max-steps") + 1] = str(TOTAL_STEPS)
FLAGS[FLAGS.index("--checkpoint.every-steps") + 1] = "1"


def command(run_dir: Path) -> list[str]:
    return [sys.executable, str(resume.REPO / "cli.py"), "train", "--preset", "demo", "--run-dir", str(run_dir), *FLAGS]


def run_to_end(run_dir: Path, cache: Path) -> None:
    done = subprocess.run(command(run_dir), cwd=resume.REPO, env=resume.run_env(cache), capture_output=True,
                          text=True, timeout=resume.RUN_TIMEOUT_S)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]


def kill_at_random_moment(run_dir: Path, cache: Path, rng: random.Random) -> dict:
    """Start (or resume) the run; once it has logged a step past its start, SIGKILL it 0-0.6 s later."""
    start = max(resume.losses(resume.metric_lines(run_dir)), default=-1)
    process = subprocess.Popen(command(run_dir), cwd=resume.REPO, env=resume.run_env(cache),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + resume.RUN_TIMEOUT_S
    try:
        while max(resume.losses(resume.metric_lines(run_dir)), default=-1) <= start:
            if process.poll() is not None:
                return {"killed": False, "exit": process.returncode}
            assert time.monotonic() < deadline, "no progress"
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.6))
        in_flight = any(".orbax-checkpoint-tmp" in p.name for p in (run_dir / "checkpoints").iterdir())
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
        return {"killed": process.returncode == -signal.SIGKILL, "save_in_flight": in_flight,
                "committed": resume.committed_steps(run_dir)[-1:]}
    finally:
        if process.poll() is None:
            process.kill()


def soak(kills: int, seed: int, workdir: Path) -> dict:
    cache = workdir / "cache"
    reference, run_dir = workdir / "uninterrupted", workdir / "soaked"
    run_to_end(reference, cache)
    rng = random.Random(seed)
    trials = []
    while len([t for t in trials if t["killed"]]) < kills:
        trial = kill_at_random_moment(run_dir, cache, rng)
        trials.append(trial)
        print(f"trial {len(trials)}: {trial}", flush=True)
        if not trial["killed"]:  # finished before the kill: start the soak over in a fresh directory
            raise AssertionError(f"the run ended before kill {len(trials)}; lower the kill delay: {trial}")
    run_to_end(run_dir, cache)
    params, step = resume.last_params(run_dir)
    reference_params, reference_step = resume.last_params(reference)
    differing = resume.differing_leaves(params, reference_params)
    return {"kills": kills, "mid_save": sum(t["save_in_flight"] for t in trials), "step": step,
            "reference_step": reference_step, "differing_leaves": differing}


@pytest.mark.slow
def test_ten_sigkills_at_random_moments_resume_bitwise(tmp_path):
    result = soak(10, seed=0, workdir=tmp_path)
    print(result)
    assert result["step"] == result["reference_step"] == TOTAL_STEPS
    assert result["differing_leaves"] == []


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        outcome = soak(args.kills, args.seed, Path(workdir))
    print(outcome)
    sys.exit(0 if outcome["differing_leaves"] == [] and outcome["step"] == TOTAL_STEPS else 1)
