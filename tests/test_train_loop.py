"""The training loop end to end on a tiny synthetic run: validation loss goes down, the log shows the
Muon/AdamW split and the metrics; a non-finite loss stops the run with a clear message, exit code 2
and no checkpoint written after it."""

import json
import subprocess

from tiny import CLI, REPO, TINY_DATA_AND_MODEL


def train(run_dir, *flags):
    return subprocess.run([*CLI, "train", "--preset", "demo", "--run-dir", str(run_dir), *TINY_DATA_AND_MODEL,
                           "--train.global-batch-size", "16", "--train.per-device-batch-size", "16",
                           "--data.valid-max-samples", "32", *flags],
                          cwd=REPO, capture_output=True, text=True, timeout=300)


def test_tiny_muon_run_drives_validation_loss_down_and_logs_the_split(tmp_path):
    done = train(tmp_path, "--optim.name", "muon", "--optim.lr", "0.02", "--optim.aux-lr", "0.005",
                 "--optim.warmup-steps", "2", "--train.max-steps", "30", "--train.valid-every-steps", "10",
                 "--peak-flops-per-device", "1e11")  # CPUs have no table entry: MFU/HFU need a peak
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    valid = [r["valid/loss"] for r in records if "valid/loss" in r]
    train_records = [r for r in records if "train/loss" in r]
    assert len(train_records) == 30
    initial = train_records[0]["train/loss"]  # step 0 trains with lr 0: the untrained model's loss
    assert len(valid) == 3 and valid[0] > valid[1] > valid[2] and valid[-1] < 0.5 * initial, (initial, valid)
    for key in ("train/lr/muon", "train/lr/adamw", "train/grad_norm", "train/tokens_per_s", "train/step_time_s",
                "train/mfu", "train/hfu"):
        assert key in train_records[-1], key
    last = train_records[-1]  # the two count different work over the same time and peak
    assert last["train/mfu"] > 0 and last["train/hfu"] > 0 and last["train/mfu"] != last["train/hfu"]
    log = (tmp_path / "log.txt").read_text()
    assert "optimizer: muon (optax)" in log
    assert "layers/wq" in log and "muon" in log and "embed" in log and "adamw" in log
    summary = json.loads((tmp_path / "run_summary.json").read_text())
    assert summary["steps"] == 30 and summary["best_valid_loss"] == min(valid)


def test_non_finite_loss_stops_without_saving(tmp_path):
    # An absurd learning rate blows the weights up after the first update; the next loss is not finite.
    done = train(tmp_path, "--optim.lr", "1e30", "--optim.warmup-steps", "0", "--optim.clip-norm", "0",
                 "--train.max-steps", "6", "--checkpoint.every-steps", "0")
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert "is not finite" in done.stderr and "no checkpoint was written" in done.stderr
    checkpoints = tmp_path / "checkpoints"
    assert not checkpoints.exists() or not any(p.name.isdigit() for p in checkpoints.iterdir())


def test_relative_run_dir(tmp_path):
    # Users pass --run-dir runs/NAME; Orbax itself only takes absolute paths.
    done = subprocess.run([*CLI, "train", "--preset", "demo", "--run-dir", "rel/run", *TINY_DATA_AND_MODEL,
                           "--train.global-batch-size", "16", "--train.per-device-batch-size", "16",
                           "--data.valid-max-samples", "16", "--train.max-steps", "2"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "rel" / "run" / "checkpoints" / "2").is_dir()
