"""The seeds' recipes on Qwen2.5-1.5B base: TPU v6e-8 / v6e-16 / v4-8, AdamW vs Muon.

All share one recipe (3 epochs, global batch 1024, warmup 20 then linear decay, cutoff 512, bf16
compute, seed 42, 50-beam eval, 8 prompts per device); presets differ by optimizer and device count.
"""

from sidrec.config import (
    Config,
    DataConfig,
    EvalConfig,
    MeshConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    WandbConfig,
    replace,
)

INDUSTRIAL_V6E8_MUON = Config(
    description="Qwen2.5-1.5B, Industrial, optax Muon lr 3e-3 (aux AdamW 3e-4), TPU v6e-8",
    run_dir="runs/industrial-v6e8-muon",
    seed=42,
    model=ModelConfig(hf_path="Qwen/Qwen2.5-1.5B", dtype="bfloat16", remat=True),
    data=DataConfig(root="data", category="Industrial_and_Scientific", cutoff_len=512, seq_len=1024),
    optim=OptimConfig(name="muon", impl="optax", lr=3e-3, aux_lr=3e-4, warmup_steps=20, schedule="linear"),
    train=TrainConfig(epochs=3, global_batch_size=1024, per_device_batch_size=16),
    eval=EvalConfig(num_beams=50, batch_size=8, dtype="bfloat16"),
    mesh=MeshConfig(data=1, fsdp=-1),
    wandb=WandbConfig(mode="online"),
    expected_devices=8,
)


def _variant(base: Config, name: str, description: str, **changes) -> Config:
    return replace(base, description=description, run_dir=f"runs/{name}", **changes)


_OFFICE = {"data.category": "Office_Products"}

PRESETS = {
    "industrial-v6e8-muon": INDUSTRIAL_V6E8_MUON,
    "industrial-v6e8-muon-local": _variant(
        INDUSTRIAL_V6E8_MUON, "industrial-v6e8-muon-local",
        "Qwen2.5-1.5B, Industrial, our local Muon chain lr 3e-3 (aux AdamW 3e-4), TPU v6e-8",
        **{"optim.impl": "local"}),
    "industrial-v6e8-adamw": _variant(
        INDUSTRIAL_V6E8_MUON, "industrial-v6e8-adamw",
        "Qwen2.5-1.5B, Industrial, AdamW lr 3e-4 (upstream's optimizer), TPU v6e-8",
        **{"optim.name": "adamw", "optim.lr": 3e-4}),
    "office-v6e8-muon": _variant(
        INDUSTRIAL_V6E8_MUON, "office-v6e8-muon",
        "Qwen2.5-1.5B, Office, optax Muon lr 3e-3 (aux AdamW 3e-4), TPU v6e-8", **_OFFICE),
    "industrial-v6e16-muon": _variant(
        INDUSTRIAL_V6E8_MUON, "industrial-v6e16-muon",
        "Qwen2.5-1.5B, Industrial, optax Muon, TPU v6e-16 (4 hosts x 4 chips)",
        expected_devices=16),
    "office-v6e16-muon": _variant(
        INDUSTRIAL_V6E8_MUON, "office-v6e16-muon",
        "Qwen2.5-1.5B, Office, optax Muon, TPU v6e-16 (4 hosts x 4 chips)",
        expected_devices=16, **_OFFICE),
    "industrial-v4-8-muon": _variant(
        INDUSTRIAL_V6E8_MUON, "industrial-v4-8-muon",
        "Qwen2.5-1.5B, Industrial, optax Muon, TPU v4-8 (4 chips, grad accumulation 16)",
        expected_devices=4),
}
