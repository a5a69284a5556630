"""The embedded demo: synthetic catalogue, tiny from-scratch model, CPU, a few minutes end to end."""

from sidrec.config import (
                           CheckpointConfig,
                           Config,
                           DataConfig,
                           EvalConfig,
                           ModelConfig,
                           OptimConfig,
                           TrainConfig,
                           WandbConfig,
)

DEMO = Config(
    description="synthetic catalogue, tiny model from scratch on CPU: train, eval the best vs most-popular (<5 min)",
    run_dir="runs/demo",
    model=ModelConfig(hidden_size=128, intermediate_size=384, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=32, max_position_embeddings=1024),
    # A tiny model from scratch does not bridge upstream's train/eval prompt wordings: evaluate with
    # the training wording (see --data.eval-wording).
    data=DataConfig(synthetic=True, category="Synthetic", synthetic_items=120, synthetic_users=300,
                    tasks=("sid_sft",), cutoff_len=256, seq_len=256, eval_wording="training"),
    optim=OptimConfig(name="adamw", lr=3e-3, warmup_steps=10),
    train=TrainConfig(epochs=3, global_batch_size=32, per_device_batch_size=32, valid_every_steps=0,
                      early_stopping_patience=3),
    eval=EvalConfig(split="test", num_beams=20, batch_size=32),
    checkpoint=CheckpointConfig(keep=1),
    wandb=WandbConfig(mode="disabled"),
)

PRESETS = {"demo": DEMO}
