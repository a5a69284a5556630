"""RunLogger files and wandb handling, MFU arithmetic, peak-FLOP lookup, the metrics table."""

import json
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from sidrec.logging import (
    RunLogger,
    flatten_metrics,
    format_metrics_table,
    mfu,
    peak_flops_for,
)


def test_disabled_logger_writes_logs_and_summary_without_wandb(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # any `import wandb` would now raise
    run_dir = tmp_path / "run"
    with RunLogger({"optim": {"lr": 3e-4}}, run_dir, is_main=True, wandb_mode="disabled",
                   total_steps=10) as logger:
        logger.info("optimizer split: muon 12 tensors, adamw 5 tensors")
        logger.log(1, {"train/loss": jnp.float32(2.5), "train/lr/muon": 1e-3, "train/lr/adamw": 3e-4})
        logger.log(2, {"train/loss": 2.25, "valid/loss": np.float64(2.0),
                       "eval": {"hr": {10: 0.125}}})
        logger.write_summary({"best_valid_loss": 2.0, "steps": 2})
        logger.write_summary({"best_valid_loss": 1.5, "steps": 3})  # replaced, not appended
    assert json.loads((run_dir / "run_summary.json").read_text()) == {"best_valid_loss": 1.5, "steps": 3}
    assert [p.name for p in run_dir.iterdir() if "tmp" in p.name] == []
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert lines == [
        {"step": 1, "train/loss": 2.5, "train/lr/muon": 1e-3, "train/lr/adamw": 3e-4},
        {"step": 2, "train/loss": 2.25, "valid/loss": 2.0, "eval/hr/10": 0.125},
    ]
    assert "optimizer split" in (run_dir / "log.txt").read_text()
    out = capsys.readouterr()
    assert "optimizer split" in out.out
    # The bar's last postfix keeps the lr of step 1 and shows the new losses.
    assert "loss=2.2500" in out.err and "lr=1.00e-03" in out.err and "valid=2.0000" in out.err
    assert not (run_dir / "wandb").exists()


def test_other_processes_write_nothing(tmp_path, capsys):
    logger = RunLogger({}, tmp_path / "run", is_main=False, wandb_mode="offline", total_steps=5)
    logger.info("hidden")
    logger.log(1, {"train/loss": 1.0})
    logger.write_summary({"x": 1})
    logger.close()
    assert not (tmp_path / "run").exists()
    assert capsys.readouterr() == ("", "")


def test_offline_wandb_lives_in_the_run_dir_and_resumes_the_same_run(tmp_path):
    pytest.importorskip("wandb")
    run_dir = tmp_path / "run"
    for step in (1, 2):  # the second logger is a resumed run
        with RunLogger({"seed": 42}, run_dir, is_main=True, wandb_mode="offline", project="test",
                       total_steps=2, start_step=step - 1) as logger:
            logger.log(step, {"train/loss": 1.0 / step})
    run_id = (run_dir / "wandb_id").read_text()
    runs = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    # wandb names a resumed offline run's directory after the run id (a "-1" suffix when both
    # sessions start within the same second).
    assert len(runs) >= 1 and all(name.split("-")[3] == run_id for name in runs)


def test_flatten_metrics_nests_with_slashes():
    flat = flatten_metrics({"eval": {"hr": {"1": 0.5}, "n": np.int64(3)}, "x": 1})
    assert flat == {"eval/hr/1": 0.5, "eval/n": 3, "x": 1}
    assert type(flat["eval/n"]) is int


def test_mfu_is_achieved_over_peak():
    # 8 devices at 100 TFLOP/s peak for 2 s could do 1.6e15 FLOPs; 4e14 of them is 25 %.
    assert mfu(4e14, 2.0, 8, 100e12) == pytest.approx(0.25)
    assert mfu(4e14, 2.0, 8, None) is None


@pytest.mark.parametrize("kind, peak", [
    ("TPU v5 lite", 197e12),       # v5e: must not match the shorter "TPU v5" (v5p)
    ("TPU v5", 459e12),
    ("TPU v6 lite", 918e12),
    ("TPU v4", 275e12),
    ("NVIDIA H100 80GB HBM3", 989e12),
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("cpu", None),
])
def test_peak_flops_by_device_kind(kind, peak):
    assert peak_flops_for(kind) == peak


def test_peak_flops_override_wins():
    assert peak_flops_for("cpu", 1e12) == 1e12
    assert peak_flops_for("TPU v4", 2e14) == 2e14


def test_metrics_table_with_baseline_and_json_keys():
    metrics = {"hr": {"1": 0.1, "3": 0.2, "5": 0.25, "10": 0.3, "20": 0.4, "50": 0.5},
               "ndcg": {"1": 0.1, "3": 0.15, "5": 0.17, "10": 0.2, "20": 0.22, "50": 0.25}}
    popular = {"hr": {1: 0.01, 10: 0.05}, "ndcg": {1: 0.01, 10: 0.02}}
    table = format_metrics_table(metrics, popular, baseline_name="most-popular").splitlines()
    assert table[0] == "| K | HR@K | NDCG@K | HR@K (most-popular) | NDCG@K (most-popular) |"
    assert len(table) == 2 + 6
    assert table[2] == "| 1 | 0.1000 | 0.1000 | 0.0100 | 0.0100 |"
    assert table[3] == "| 3 | 0.2000 | 0.1500 | - | - |"
    assert table[5] == "| 10 | 0.3000 | 0.2000 | 0.0500 | 0.0200 |"


def test_metrics_table_lists_only_computed_ks():
    table = format_metrics_table({"hr": {1: 0.5, 5: 0.75}, "ndcg": {1: 0.5, 5: 0.6}})
    assert table.splitlines()[2:] == ["| 1 | 0.5000 | 0.5000 |", "| 5 | 0.7500 | 0.6000 |"]
