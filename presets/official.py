"""Evaluate the official MiniOneRec checkpoints (Hugging Face directories downloaded beforehand)."""

from sidrec.config import Config, DataConfig, EvalConfig, ModelConfig, WandbConfig, replace

EVAL_OFFICIAL_INDUSTRIAL = Config(
    description="eval the official MiniOneRec Industrial_ckpt (HF dir) on test, constrained 50 beams",
    run_dir="runs/eval-official-industrial",
    model=ModelConfig(hf_path="checkpoints/Industrial_ckpt", dtype="bfloat16"),
    data=DataConfig(root="data", category="Industrial_and_Scientific"),
    eval=EvalConfig(split="test", num_beams=50, batch_size=8, constrained=True, dtype="bfloat16"),
    wandb=WandbConfig(mode="offline"),
)

EVAL_OFFICIAL_OFFICE = replace(
    EVAL_OFFICIAL_INDUSTRIAL,
    description="eval the official MiniOneRec Office_ckpt (HF dir) on test, constrained 50 beams",
    run_dir="runs/eval-official-office",
    **{"model.hf_path": "checkpoints/Office_ckpt", "data.category": "Office_Products"})


def _pure(base: Config, name: str) -> Config:
    return replace(base, description=base.description.replace("constrained", "unconstrained ('pure')"),
                   run_dir=f"runs/{name}", **{"eval.constrained": False})


PRESETS = {
    "eval-official-industrial": EVAL_OFFICIAL_INDUSTRIAL,
    "eval-official-office": EVAL_OFFICIAL_OFFICE,
    "eval-official-industrial-pure": _pure(EVAL_OFFICIAL_INDUSTRIAL, "eval-official-industrial-pure"),
    "eval-official-office-pure": _pure(EVAL_OFFICIAL_OFFICE, "eval-official-office-pure"),
}
