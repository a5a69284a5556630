"""`cli.py export`: a run's checkpoint -> Hugging Face directory (config.json, safetensors, tokenizer)."""

from __future__ import annotations

from pathlib import Path

import jax

from sidrec import build
from sidrec.checkpoint import restore_params
from sidrec.model import hf, qwen2


def export_run(run_dir: str, out: str, *, which: str = "best", dtype: str = "float32") -> Path:
    tokenizer, model_cfg = build.load_run_description(run_dir)
    one_device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    params, step = restore_params(run_dir, qwen2.abstract_params(model_cfg), which, one_device)
    print(f"exporting the {which} checkpoint (step {step}) of {run_dir} to {out} ({dtype})")
    path = hf.export(params, model_cfg, tokenizer, out, dtype=dtype)
    print(f"wrote {path}: load it with transformers.AutoModelForCausalLM.from_pretrained({str(path)!r})")
    return path
