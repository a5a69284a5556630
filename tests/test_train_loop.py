"""The training loop end to end on a tiny synthetic run: validation loss goes down, the log shows the
Muon/AdamW split and the metrics; a non-finite loss stops the run with a clear message, exit code 2
and no checkpoint written after it."""

import json
import subprocess

from tiny import CLI, REPO, TINY_DATA_AND_MODEL, cli_env


def train(run_dir, *flags):
    return subprocess.run([*CLI, "train", "--preset", "demo", "--run-dir", str(run_dir), *TINY_DATA_AND_MODEL,
                           "--train.global-batch-size", "16", "--train.per-device-batch-size", "16",
                           "--data.valid-max-samples", "32", *flags],
                          cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300)


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
                          cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "rel" / "run" / "checkpoints" / "2").is_dir()


def test_a_non_finite_step_leaves_parameters_moments_and_count_as_they_were():
    """The jitted step skips its update when the loss or gradient is not finite (lax.cond): the same
    parameters, AdamW moments and step count come back, bit for bit; a finite step changes them."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from sidrec import parallel
    from sidrec.config import MeshConfig
    from sidrec.model import qwen2
    from sidrec.train import compile_steps

    cfg = qwen2.Qwen2Config(vocab_size=64, real_vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1,
                            num_heads=2, num_kv_heads=1, head_dim=8)
    mesh = parallel.make_mesh(MeshConfig(), jax.devices()[:1])
    specs = parallel.param_partition_specs(qwen2.param_specs(cfg), 1)
    steps = compile_steps(cfg, optax.adamw(1e-2), mesh, specs)
    rng = np.random.default_rng(0)
    batch = {"tokens": rng.integers(0, 64, (1, 1, 64)).astype(np.int32), "segment_ids": np.ones((1, 1, 64), np.int32),
             "positions": np.arange(64, dtype=np.int32)[None, None], "loss_pos": np.arange(8, dtype=np.int32)[None, None],
             "loss_tgt": rng.integers(0, 64, (1, 1, 8)).astype(np.int32), "loss_w": np.ones((1, 1, 8), np.float32),
             "n_targets": np.float32(8)}
    state = steps.init_state(jax.device_put(qwen2.init_params(cfg, jax.random.key(0)), parallel.shardings(mesh, specs)))
    state, metrics = steps.train_step(state, parallel.global_batch(mesh, batch))  # finite: moments now non-zero
    assert bool(metrics["finite"]) and int(state.step) == 1
    before = jax.tree.map(np.asarray, state)
    poisoned = {**batch, "n_targets": np.float32(0.0), "loss_w": np.full((1, 1, 8), np.nan, np.float32)}
    state, metrics = steps.train_step(state, parallel.global_batch(mesh, poisoned))
    assert not bool(metrics["finite"])
    after = jax.tree.map(np.asarray, state)
    assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(a, b, equal_nan=False), before, after))
    state, metrics = steps.train_step(state, parallel.global_batch(mesh, batch))
    assert bool(metrics["finite"]) and int(state.step) == 2
    assert not np.array_equal(np.asarray(state.params["embed"]), after.params["embed"])
    assert jnp.isfinite(state.params["embed"]).all()
