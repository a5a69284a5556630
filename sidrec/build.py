"""Shared setup of train/eval/export: data root, tokenizer with SID tokens, model weights.

A run directory is self-describing: `tokenizer/` (with the SID tokens) and `model_config.json` are
written at the start of training, so evaluating or exporting a run needs nothing but the directory.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path

import jax

from sidrec.config import Config
from sidrec.data import minionerec, synthetic
from sidrec.errors import UserError
from sidrec.model import hf, qwen2
from sidrec.textfile import read_json
from sidrec.tokenizer import TokenizerInfo, add_sid_tokens, load_tokenizer, save_tokenizer

MODEL_CONFIG_FILE = "model_config.json"
TOKENIZER_DIR = "tokenizer"
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def data_root(cfg: Config) -> Path:
    """The MiniOneRec data root; the synthetic catalogue is generated once into <run_dir>/data."""
    if not cfg.data.synthetic:
        return Path(cfg.data.root)
    root = Path(cfg.run_dir) / "data"
    if not (root / "Amazon").is_dir():
        synthetic.write_synthetic(root, n_items=cfg.data.synthetic_items, n_users=cfg.data.synthetic_users,
                                  seed=cfg.seed, category=cfg.data.category)
    return root


def load_catalogue(cfg: Config) -> minionerec.Catalogue:
    return minionerec.load_catalogue(data_root(cfg), cfg.data.category)


def resolve_hf_path(path: str) -> Path:
    """A local HF directory, or a hub id (`Qwen/Qwen2.5-1.5B`) fetched into the HF cache once."""
    if os.path.isdir(path):
        return Path(path)
    if _HUB_ID.match(path) and not path.startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.txt"]))
        except Exception as error:  # offline, unknown repo, no permission: one clear line
            raise UserError(f"--model.hf-path {path}: not a local directory and the hub download failed "
                            f"({type(error).__name__}: {str(error).splitlines()[0][:200]}); download it "
                            "and pass the local directory") from None
    raise UserError(f"--model.hf-path {path}: no such directory (expected config.json, "
                    "*.safetensors and tokenizer.json)")


def build_tokenizer(cfg: Config, catalogue: minionerec.Catalogue) -> TokenizerInfo:
    """The training tokenizer: the model's own (+ SID tokens), or a BPE trained on the data."""
    saved = Path(cfg.run_dir) / TOKENIZER_DIR
    if cfg.model.tokenizer_path:
        info = load_tokenizer(cfg.model.tokenizer_path)
    elif cfg.model.hf_path:
        info = load_tokenizer(resolve_hf_path(cfg.model.hf_path))
    elif (saved / "tokenizer.json").is_file():
        info = load_tokenizer(saved)
    else:
        texts = [e.instruction + e.prompt + e.target for e in
                 minionerec.training_examples(catalogue, cfg.data.tasks,
                                              minionerec.load_split(catalogue, "train"),
                                              minionerec.PromptOptions.from_config(cfg.data, cfg.seed))]
        info = synthetic.train_bpe_tokenizer(texts, catalogue.sid_tokens, vocab_size=cfg.model.bpe_vocab_size)
    return add_sid_tokens(info, catalogue.sid_tokens)


def save_run_description(cfg: Config, tokenizer: TokenizerInfo, model_cfg: qwen2.Qwen2Config) -> None:
    run_dir = Path(cfg.run_dir)
    if jax.process_index() != 0:
        return
    save_tokenizer(tokenizer, run_dir / TOKENIZER_DIR)
    (run_dir / MODEL_CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(model_cfg), indent=2) + "\n")


def load_run_description(run_dir: str | Path, compute_dtype: str | None = None
                         ) -> tuple[TokenizerInfo, qwen2.Qwen2Config]:
    run_dir = Path(run_dir)
    path = run_dir / MODEL_CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{run_dir}: not a sidrec run directory (no {MODEL_CONFIG_FILE}); train first or "
                        "pass --model.hf-path")
    model_cfg = qwen2.Qwen2Config(**read_json(path))
    if compute_dtype:
        model_cfg = dataclasses.replace(model_cfg, compute_dtype=compute_dtype)
    return load_tokenizer(run_dir / TOKENIZER_DIR), model_cfg


def model_config(cfg: Config, tokenizer: TokenizerInfo, vocab_multiple: int) -> qwen2.Qwen2Config:
    """Architecture of the model to train: the HF checkpoint's, or the from-scratch fields."""
    architecture = cfg.model
    if cfg.model.hf_path is not None:
        directory = resolve_hf_path(cfg.model.hf_path)
        architecture = hf.config_from_hf(hf.load_hf_config(directory), where=str(directory / "config.json"))
    return qwen2.Qwen2Config.build(architecture, tokenizer.tokenizer.get_vocab_size(), pad_to_multiple=vocab_multiple,
                                   compute_dtype=cfg.model.dtype, remat=cfg.model.remat, attention=cfg.model.attention)


def vocab_multiple(fsdp_size: int) -> int:
    """Vocabulary rows are padded for fast matmuls and an even fsdp split (padded logits are masked)."""
    return math.lcm(128, fsdp_size)


def initial_params(cfg: Config, model_cfg: qwen2.Qwen2Config, vocab_multiple: int, shardings):
    """Weights at step 0: from scratch (seeded), or the HF checkpoint resized to the SID vocabulary."""
    key = jax.random.key(cfg.seed)
    if cfg.model.hf_path is None:
        return jax.jit(qwen2.init_params, static_argnums=0, out_shardings=shardings)(model_cfg, key)
    params, base = hf.load_model(resolve_hf_path(cfg.model.hf_path), model_cfg.compute_dtype, model_cfg.remat)
    params, _ = hf.resize_vocab(params, base, model_cfg.real_vocab_size, key=key,
                                noise_std=cfg.model.sid_init_noise, pad_to_multiple=vocab_multiple)
    return jax.device_put(params, shardings)
