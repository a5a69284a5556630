"""`cli.py rl` end to end on a tiny synthetic SFT run: it trains, logs the GRPO metrics, writes a run
directory `cli.py eval` reads unchanged; a SIGKILLed run resumes to bitwise the parameters of an
uninterrupted one; user mistakes end in one line and exit code 2."""

import json
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from tiny import CLI, REPO, TINY_DATA_AND_MODEL, cli_env

from sidrec import build
from sidrec.checkpoint import restore_params
from sidrec.model import qwen2

TIMEOUT_S = 300
RL_STEPS = 6
TINY_RL = ["--rl.group-size", "4", "--rl.prompts-per-step", "4", "--rl.micro-batches", "2",
           "--rl.max-steps", str(RL_STEPS), "--rl.valid-every-steps", "3", "--rl.valid-max-samples", "8",
           "--optim.lr", "1e-3", "--checkpoint.every-steps", "2", "--checkpoint.keep", "3",
           "--eval.num-beams", "5", "--eval.max-samples", "16"]


def cli(*args, cwd=REPO):
    return subprocess.run([*CLI, *args], cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=TIMEOUT_S)


def rl_args(sft_dir, run_dir, *extra):
    return ["--preset", "demo-rl", "--rl.sft-run-dir", str(sft_dir), "--run-dir", str(run_dir),
            "--data.root", str(sft_dir / "data"), "--wandb.mode", "disabled", *TINY_RL, *extra]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("sft") / "run"
    done = cli("train", "--preset", "demo", "--run-dir", str(run_dir), *TINY_DATA_AND_MODEL,
               "--train.global-batch-size", "16", "--train.per-device-batch-size", "16",
               "--data.valid-max-samples", "16", "--train.max-steps", "20", "--optim.warmup-steps", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


def params_of(run_dir, which="last"):
    _, model_cfg = build.load_run_description(run_dir)
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    params, step = restore_params(run_dir, qwen2.abstract_params(model_cfg), which, one)
    return jax.tree.map(np.asarray, params), step


@pytest.fixture(scope="module")
def rl_eval_run(sft_run, tmp_path_factory):
    """(run directory, finished process) of one uninterrupted `cli.py rl-eval`; read-only for its users."""
    run_dir = tmp_path_factory.mktemp("rl") / "run"
    done = cli("rl-eval", *rl_args(sft_run, run_dir))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return run_dir, done


def test_rl_trains_logs_and_evaluates(sft_run, rl_eval_run):
    run_dir, done = rl_eval_run
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "rl/reward_mean" in r]
    assert [r["step"] for r in steps] == list(range(1, RL_STEPS + 1))
    for key in ("rl/reward_std", "rl/group_hit_rate", "rl/zero_advantage_groups", "rl/kl", "rl/completion_length",
                "rl/rollout_s", "rl/update_s", "rl/grad_norm"):
        assert key in steps[-1], key
    assert steps[-1]["rl/completion_length"] == 5  # 3 SID tokens, "\n", EOS
    assert steps[0]["rl/kl"] == 0 and steps[-1]["rl/kl"] > 0  # the policy leaves its (fixed) reference
    assert [r["step"] for r in records if "valid/ndcg@4" in r] == [0, 3, 6]
    # The RL run directory is a sidrec run directory: eval read its best checkpoint and wrote its files.
    assert (run_dir / "eval_predictions.metrics.json").is_file()
    assert "SFT start" in done.stdout
    rl_params, _ = params_of(run_dir)
    sft_params, _ = params_of(sft_run, "best")
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(rl_params), jax.tree.leaves(sft_params)))


def test_sigkill_then_resume_is_bitwise_identical(sft_run, rl_eval_run, tmp_path):
    whole, killed = rl_eval_run[0], tmp_path / "killed"  # eval after training leaves the parameters alone
    process = subprocess.Popen([*CLI, "rl", *rl_args(sft_run, killed)], cwd=REPO, env=cli_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + TIMEOUT_S
    while not (killed / "checkpoints" / "2").is_dir() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = cli("rl", *rl_args(sft_run, killed))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from step" in done.stdout + done.stderr
    (a, step_a), (b, step_b) = params_of(whole), params_of(killed)
    assert step_a == step_b == RL_STEPS
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    # Rerunning the finished run trains nothing and keeps what it knows (best, start) but claims no timings.
    done = cli("rl", *rl_args(sft_run, killed))
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((killed / "run_summary.json").read_text())
    assert summary["steps"] == RL_STEPS and summary["start_valid_ndcg@4"] is not None
    assert summary["rollout_s_per_step"] is None and summary["rollout_prompts_per_s"] is None


@pytest.mark.parametrize("extra, message", [
    (["--rl.prompts-per-step", "6", "--rl.micro-batches", "4"], "--rl.prompts-per-step (6) must be a multiple of"),
    (["--rl.group-size", "1"], "--rl.group-size (1) must be >= 2"),
    (["--rl.tasks", "sid", "bogus"], "--rl.tasks: unknown"),
])
def test_bad_settings_are_one_line(sft_run, tmp_path, extra, message):
    done = cli("rl", *rl_args(sft_run, tmp_path / "rl", *extra))
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]


def test_unknown_reward_type_is_refused(sft_run, tmp_path):
    done = cli("rl", *rl_args(sft_run, tmp_path / "rl", "--rl.reward-type", "semantic"))
    assert done.returncode == 2 and "Traceback" not in done.stderr and "reward-type" in done.stderr


def test_sft_run_without_checkpoints_is_one_line(sft_run, tmp_path):
    empty = tmp_path / "empty"
    (empty / "checkpoints").mkdir(parents=True)
    for name in ("model_config.json",):
        (empty / name).write_text((sft_run / name).read_text())
    (empty / "tokenizer").mkdir()
    for file in (sft_run / "tokenizer").iterdir():
        (empty / "tokenizer" / file.name).write_text(file.read_text())
    done = cli("rl", *rl_args(sft_run, tmp_path / "rl", "--rl.sft-run-dir", str(empty)))
    assert done.returncode == 2 and "no checkpoints" in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_no_start_model_is_one_line(sft_run, tmp_path):
    done = cli("rl", *rl_args(sft_run, tmp_path / "rl"), "--rl.sft-run-dir", "None")
    assert done.returncode == 2 and "needs a starting model" in done.stderr, done.stderr[-2000:]


def test_vocabulary_without_the_catalogue_sids_is_one_line(sft_run, tmp_path):
    # A catalogue whose SID tokens the SFT model never saw: a different synthetic category.
    other = tmp_path / "other"
    done = cli("train", "--preset", "demo", "--run-dir", str(other), *TINY_DATA_AND_MODEL,
               "--data.synthetic-items", "300", "--train.max-steps", "0", "--train.epochs", "0.01",
               "--train.global-batch-size", "16", "--train.per-device-batch-size", "16",
               "--data.valid-max-samples", "8")
    assert done.returncode == 0, done.stderr[-2000:]
    done = cli("rl", *rl_args(sft_run, tmp_path / "rl"), "--data.root", str(other / "data"))
    assert done.returncode == 2 and "SID tokens" in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]


def test_a_run_that_never_beats_its_start_hands_back_the_start(sft_run, tmp_path):
    """--rl.keep-start (default): step 0 competes for "best"; an lr too small to change any ranking ties the
    start on valid, and the strict comparison keeps the start, so eval reads the SFT parameters themselves."""
    run_dir = tmp_path / "rl"
    done = cli("rl-eval", *rl_args(sft_run, run_dir, "--optim.lr", "1e-20", "--rl.max-steps", "2",
                                   "--rl.valid-every-steps", "0"))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "No RL step beat the start on valid" in done.stdout
    summary = json.loads((run_dir / "run_summary.json").read_text())
    assert summary["best_step"] == 0 and summary["best_valid_ndcg@4"] == summary["start_valid_ndcg@4"]
    (best, step), (sft, _) = params_of(run_dir, "best"), params_of(sft_run, "best")
    assert step == 0
    for x, y in zip(jax.tree.leaves(best), jax.tree.leaves(sft)):
        np.testing.assert_array_equal(x, y)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
