"""Resume soak: one SFT (or RL) run SIGKILLed at N random moments (checkpoints every step, so most kills
land while an async save is in flight) and resumed after each; its final parameters must equal an
uninterrupted run's bit for bit. `-m slow` runs 10 kills of each; as a script:
`python tests/test_soak.py --kills 10 --seed 0 [--rl]`.
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
import test_rl_run as rl  # noqa: E402
from tiny import cli_env  # noqa: E402

TOTAL_STEPS = 100
FLAGS = [flag for flag in resume.TINY]
FLAGS[FLAGS.index("--train.max-steps") + 1] = str(TOTAL_STEPS)
FLAGS[FLAGS.index("--checkpoint.every-steps") + 1] = "1"
CLI = [sys.executable, str(resume.REPO / "cli.py")]


def sft_command(run_dir: Path) -> list[str]:
    return [*CLI, "train", "--preset", "demo", "--run-dir", str(run_dir), *FLAGS]


def rl_command(sft_dir: Path):
    def command(run_dir: Path) -> list[str]:
        return [*CLI, "rl", *rl.rl_args(sft_dir, run_dir, "--rl.max-steps", str(TOTAL_STEPS // 2),
                                        "--checkpoint.every-steps", "1")]
    return command


def run_to_end(command, run_dir: Path) -> None:
    done = subprocess.run(command(run_dir), cwd=resume.REPO, env=cli_env(), capture_output=True,
                          text=True, timeout=resume.RUN_TIMEOUT_S)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]


def logged_step(run_dir: Path) -> int:
    """The last optimizer step the run logged (SFT: train/loss, RL: rl/loss)."""
    lines = resume.metric_lines(run_dir)
    return max(max(resume.losses(lines), default=-1), max(resume.losses(lines, "rl/loss"), default=-1))


def kill_at_random_moment(command, run_dir: Path, rng: random.Random) -> dict:
    """Start (or resume) the run; once it has logged a step past its start, SIGKILL it 0-0.6 s later."""
    start = logged_step(run_dir)
    process = subprocess.Popen(command(run_dir), cwd=resume.REPO, env=cli_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + resume.RUN_TIMEOUT_S
    try:
        while logged_step(run_dir) <= start:
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


def soak(kills: int, seed: int, workdir: Path, *, rl_stage: bool = False) -> dict:
    command = sft_command
    if rl_stage:  # RL continues a short SFT run
        sft_dir = workdir / "sft"
        run_to_end(lambda d: [*sft_command(d)[:-len(FLAGS)], *resume.TINY], sft_dir)
        command = rl_command(sft_dir)
    reference, run_dir = workdir / "uninterrupted", workdir / "soaked"
    run_to_end(command, reference)
    rng = random.Random(seed)
    trials = []
    while len([t for t in trials if t["killed"]]) < kills:
        trial = kill_at_random_moment(command, run_dir, rng)
        trials.append(trial)
        print(f"trial {len(trials)}: {trial}", flush=True)
        if not trial["killed"]:  # finished before the kill: start the soak over in a fresh directory
            raise AssertionError(f"the run ended before kill {len(trials)}; lower the kill delay: {trial}")
    run_to_end(command, run_dir)
    params, step = resume.last_params(run_dir)
    reference_params, reference_step = resume.last_params(reference)
    differing = resume.differing_leaves(params, reference_params)
    return {"kills": kills, "mid_save": sum(t["save_in_flight"] for t in trials), "step": step,
            "reference_step": reference_step, "differing_leaves": differing}


@pytest.mark.slow
@pytest.mark.parametrize("rl_stage", [False, True], ids=["sft", "rl"])
def test_ten_sigkills_at_random_moments_resume_bitwise(tmp_path, rl_stage):
    result = soak(10, seed=0, workdir=tmp_path, rl_stage=rl_stage)
    print(result)
    assert result["step"] == result["reference_step"] == (TOTAL_STEPS // 2 if rl_stage else TOTAL_STEPS)
    assert result["differing_leaves"] == []


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rl", action="store_true", help="soak an RL run (on a short SFT run) instead")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        outcome = soak(args.kills, args.seed, Path(workdir), rl_stage=args.rl)
    print(outcome)
    sys.exit(0 if outcome["differing_leaves"] == [] and outcome["step"] == outcome["reference_step"] else 1)
