"""Every preset parses and validates; the effective batch is 1024 on its declared devices; CLI
mistakes end in one clear line (exit 2), never a traceback."""

import subprocess
import sys
from pathlib import Path

import pytest

import cli
from presets import all_presets, get_preset
from sidrec.config import ConfigError, replace

REPO = Path(__file__).parents[1]
SEED_RECIPES = [name for name in all_presets() if ("v6e" in name or "v4" in name) and "grpo" not in name]
GRPO_RECIPES = [name for name in all_presets() if "grpo" in name]


def test_every_preset_parses_and_validates():
    presets = all_presets()
    assert {"demo", "industrial-cpu", "office-cpu", "industrial-v6e8-muon", "industrial-v6e8-muon-local",
            "industrial-v6e8-adamw", "office-v6e8-muon", "industrial-v6e16-muon", "office-v6e16-muon",
            "industrial-v4-8-muon", "eval-official-industrial", "eval-official-office",
            "eval-official-industrial-pure", "eval-official-office-pure"} <= set(presets)
    for name, preset in presets.items():
        assert preset.description, name
        cfg = cli.parse_config("train", ["--preset", name])  # the CLI path: tyro with the preset as default
        assert cfg == preset.validate(), name


@pytest.mark.parametrize("name", SEED_RECIPES)
def test_seed_recipes_fill_a_global_batch_of_1024(name):
    cfg = get_preset(name)
    per_micro_batch = cfg.train.per_device_batch_size * cfg.expected_devices
    grad_accum = cfg.train.global_batch_size // per_micro_batch
    assert cfg.train.global_batch_size == 1024
    assert grad_accum * per_micro_batch == 1024
    assert cfg.model.hf_path == "Qwen/Qwen2.5-1.5B" and cfg.model.dtype == "bfloat16"
    assert cfg.data.cutoff_len == 512 and cfg.seed == 42 and cfg.eval.num_beams == 50
    assert cfg.optim.warmup_steps == 20 and cfg.optim.schedule == "linear"
    expected = {"industrial-v4-8-muon": (4, 16), "industrial-v6e16-muon": (16, 4), "office-v6e16-muon": (16, 4)}
    assert (cfg.expected_devices, grad_accum) == expected.get(name, (8, 8))


@pytest.mark.parametrize("name", GRPO_RECIPES)
def test_grpo_recipes_are_upstream_rl_sh(name):
    cfg = get_preset(name)
    r, o = cfg.rl, cfg.optim
    # 8 devices x 4 prompts x accumulation 2 = 64 prompts, x 16 beams = 1024 completions a step.
    assert cfg.expected_devices == 8 and r.prompts_per_step // r.micro_batches // cfg.expected_devices == 4
    assert r.micro_batches == 2 and r.prompts_per_step * r.group_size == 1024
    assert (o.name, o.lr, o.schedule, o.warmup_ratio, o.clip_norm) == ("adamw", 1e-5, "cosine", 0.03, 0.3)
    assert (r.beta, r.reward_type, r.epochs, r.ref_sync_steps, r.ref_sync_alpha) == (1e-3, "ranking", 2, 512, 0.6)
    assert r.sft_run_dir and cfg.model.dtype == "bfloat16"


def test_overrides_reach_every_group():
    cfg = cli.parse_config("train", ["--preset", "industrial-v6e8-muon", "--optim.lr", "0.01",
                                     "--model.hf-path", "/models/q", "--eval.constrained", "False",
                                     "--mesh.fsdp", "4", "--mesh.data", "2", "--train.max-steps", "7",
                                     "--run-dir", "/tmp/x", "--seed", "3", "--wandb.mode", "disabled"])
    assert cfg.optim.lr == 0.01 and cfg.model.hf_path == "/models/q" and not cfg.eval.constrained
    assert (cfg.mesh.data, cfg.mesh.fsdp, cfg.train.max_steps, cfg.seed) == (2, 4, 7, 3)
    assert cfg.optim.name == "muon"  # untouched fields keep the preset's values


def test_invalid_combinations_name_the_fields():
    preset = get_preset("industrial-v6e8-muon")
    with pytest.raises(ConfigError, match="--train.global-batch-size"):
        replace(preset, **{"train.global_batch_size": 1000}).validate()
    with pytest.raises(ConfigError, match="--data.seq-len"):
        replace(preset, **{"data.seq_len": 256}).validate()
    with pytest.raises(ConfigError, match="--optim.impl local"):
        replace(preset, **{"optim.name": "adamw", "optim.impl": "local"}).validate()


def run_cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, str(REPO / "cli.py"), *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def test_presets_command_lists_every_preset():
    done = run_cli("presets")
    assert done.returncode == 0
    for name, preset in all_presets().items():
        assert name in done.stdout and preset.description in done.stdout


def test_help_shows_every_overridable_field():
    done = run_cli("train", "--preset", "industrial-v6e8-muon", "--help")
    assert done.returncode == 0
    for flag in ("--run-dir", "--seed", "--model.hf-path", "--model.dtype", "--data.root", "--data.category",
                 "--train.epochs", "--train.max-steps", "--train.global-batch-size", "--optim.name",
                 "--optim.lr", "--optim.aux-lr", "--checkpoint.every-steps", "--eval.split",
                 "--eval.max-samples", "--eval.num-beams", "--eval.batch-size", "--eval.constrained",
                 "--eval.dtype", "--wandb.mode", "--mesh.fsdp", "--mesh.data"):
        assert flag in done.stdout, flag


@pytest.mark.parametrize("args, message", [
    (["train", "--preset", "industrail-v6e8-muon"], "unknown preset 'industrail-v6e8-muon'; did you mean"),
    (["train", "--preset", "demo", "--data.synthetic", "False", "--data.root", "/nonexistent"], "/nonexistent"),
    (["train", "--preset", "demo", "--train.global-batch-size", "100", "--train.per-device-batch-size", "64"],
     "--train.global-batch-size (100) must be a multiple"),
    (["eval", "--preset", "demo", "--model.hf-path", "/nonexistent/model"], "--model.hf-path /nonexistent/model"),
    (["train", "--preset", "demo", "--mesh.fsdp", "3", "--run-dir", "{tmp}"], "--mesh.data (1) x --mesh.fsdp (3)"),
    (["train", "--preset", "demo", "--model.attention", "splash", "--run-dir", "{tmp}"],
     "--model.attention splash runs on TPU only"),
    (["train", "--preset", "demo", "--model.attention", "splash_interpret", "--data.seq-len", "320"],
     "--model.attention splash_interpret needs --data.seq-len a multiple of 128 (got 320)"),
])
def test_user_mistakes_end_in_one_clear_line(args, message, tmp_path):
    done = run_cli(*[a.replace("{tmp}", str(tmp_path / "run")) for a in args])
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert message in done.stderr
    assert done.stderr.strip().startswith("error:") and len(done.stderr.strip().splitlines()) == 1


def test_misspelled_field_is_reported_with_a_suggestion():
    done = run_cli("train", "--preset", "demo", "--optim.lrr", "3")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert "--optim.lrr" in done.stderr and "--optim.lr" in done.stderr
