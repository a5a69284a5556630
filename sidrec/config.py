"""Typed, frozen configuration for every command.

Every field is overridable from the CLI as `--group.field value` (tyro turns `hf_path` into
`--model.hf-path`). Presets (presets/) are values of `Config`. Cross-field rules live in
`Config.validate()`, which the CLI calls before anything heavy starts; it raises `ConfigError`
naming the fields involved.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from sidrec.errors import UserError

DType = Literal["float32", "bfloat16"]

ALL_TASKS = ("sid_sft", "sid_item_feat", "fusion_seq_rec", "sft_data", "title_history2sid")


class ConfigError(UserError):
    """A user-facing configuration mistake; the CLI prints it as one line."""


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Which model to fine-tune: a local Hugging Face directory, or a small one from scratch."""

    hf_path: str | None = None
    """Local HF directory (config.json, *.safetensors, tokenizer.json). None: build from scratch."""
    tokenizer_path: str | None = None
    """Tokenizer directory (tokenizer.json). Default: hf_path; from scratch: a BPE trained on the data."""
    bpe_vocab_size: int = 1024
    """Vocabulary of the BPE trained for a from-scratch model (before the SID tokens are added)."""
    dtype: DType = "float32"
    """Compute dtype of matmuls (master weights stay fp32; softmax and loss are fp32)."""
    remat: bool = False
    """Rematerialise each layer in the backward pass (saves activation memory)."""
    sid_init_noise: float = 0.0
    """Std of Gaussian noise added to new SID embedding rows (0: exactly the mean of existing rows)."""
    hidden_size: int = 128
    """From-scratch architecture (this and the fields below are ignored when hf_path is set)."""
    intermediate_size: int = 384
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 4096
    init_std: float = 0.02
    """Std of the normal initialiser of from-scratch matrices and embeddings."""


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """MiniOneRec data: `<root>/Amazon/{train,valid,test}/<category>_*.csv`, info/, index/."""

    root: str = "../shared/data"
    """Directory holding Amazon/ (or Amazon/ itself)."""
    category: str = "Industrial_and_Scientific"
    synthetic: bool = False
    """Generate a synthetic catalogue into <run-dir>/data and use it (the demo)."""
    synthetic_items: int = 400
    synthetic_users: int = 1500
    tasks: tuple[str, ...] = ALL_TASKS
    """Training mixture (upstream: all five). Validation is always sid_sft on the valid split."""
    cutoff_len: int = 512
    """Rows longer than this keep their last tokens (upstream's cutoff_len)."""
    seq_len: int = 1024
    """Length of one packed training row (examples are packed whole; must be >= cutoff_len)."""
    upstream_answer_leak: bool = True
    """Reproduce upstream's sid_item_feat prompt that already contains the answer."""
    upstream_typos: bool = True
    """Keep upstream's prompt typos ('recetenly', 'palyed')."""
    upstream_instruction_random: bool = True
    """sft_data instruction picked with Python random seeded as upstream (False: the first one)."""
    eval_wording: Literal["upstream", "training"] = "upstream"
    """Eval prompt wording: upstream's EvalSidDataset text (differs from training's sid_sft prompt), or
    the sid_sft training prompt itself (for small models from scratch, which don't bridge the two)."""
    valid_max_samples: int = -1
    """Cap the validation set (-1: all rows)."""


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    name: Literal["adamw", "muon"] = "adamw"
    impl: Literal["optax", "local"] = "optax"
    """Muon implementation: optax.contrib.muon or our own chain (sidrec/optim.py)."""
    lr: float = 3e-4
    """Peak learning rate (Muon: of the matrix parameters)."""
    aux_lr: float = 3e-4
    """Muon only: AdamW learning rate of embeddings, head, norms and biases."""
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    momentum: float = 0.95
    """Muon momentum (Nesterov)."""
    ns_steps: int = 5
    muon_scale: Literal["none", "shape", "rms"] = "shape"
    """Muon update scale: none (local only), sqrt(max(1, fan_out/fan_in)), or 0.2*sqrt(max(fan_in, fan_out))."""
    ns_dtype: DType = "float32"
    """Local Muon: dtype of the Newton-Schulz iteration (bfloat16 is faster on accelerators)."""
    clip_norm: float = 1.0
    """Global-norm gradient clipping (0: off)."""
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    warmup_steps: int = 20


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    epochs: float = 3.0
    max_steps: int = -1
    """Stop after this many optimizer steps (-1: epochs decide)."""
    global_batch_size: int = 1024
    """Examples per optimizer step, over all devices and accumulation steps."""
    per_device_batch_size: int = 16
    """Examples per device per micro-batch; grad_accum = global / (per_device * devices)."""
    valid_every_steps: int = 0
    """Validation loss every N steps (0: only at epoch ends)."""
    early_stopping_patience: int = 3
    """Stop after this many validations without improvement (0: never)."""
    log_every_steps: int = 1


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    split: Literal["valid", "test"] = "test"
    max_samples: int = -1
    num_beams: int = 50
    batch_size: int = 8
    """Prompts per device per beam-search call."""
    constrained: bool = True
    """Trie-constrained beams (False: upstream's 'pure' beam search over the full vocabulary)."""
    dtype: DType = "float32"
    which: Literal["best", "last"] = "best"
    """Which checkpoint of the run directory to evaluate (when no --model.hf-path is given)."""


@dataclass(frozen=True, kw_only=True)
class MeshConfig:
    data: int = 1
    """Data-parallel axis size (-1: the rest of the devices)."""
    fsdp: int = -1
    """FSDP axis size (-1: the rest of the devices)."""
    coordinator_address: str | None = None
    """host:port of process 0 for multi-process runs outside TPU pods (None: auto-detect/env)."""
    num_processes: int | None = None
    process_id: int | None = None


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    every_steps: int = 0
    """Save every N optimizer steps (0: only at validations and the end)."""
    keep: int = 2
    """How many most recent checkpoints to keep (the best is always kept)."""
    resume: bool = True
    """Resume from the latest checkpoint in the run directory when there is one."""
    resume_from: str | None = None
    """An explicit checkpoint directory to resume from."""


@dataclass(frozen=True, kw_only=True)
class WandbConfig:
    mode: Literal["online", "offline", "disabled"] = "offline"
    project: str = "sidrec"
    name: str | None = None


@dataclass(frozen=True, kw_only=True)
class Config:
    description: str = ""
    """One line shown by `cli.py presets`."""
    run_dir: str = "runs/default"
    seed: int = 42
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    peak_flops_per_device: float = 0.0
    """Peak FLOP/s of one device for the MFU estimate (0: look up by device kind)."""
    expected_devices: int = 0
    """Device count the preset was written for (0: any); used to check the effective batch."""

    def validate(self) -> Config:
        errors = list(_validation_errors(self))
        if errors:
            raise ConfigError("; ".join(errors))
        return self


def _validation_errors(cfg: Config):
    m, d, o, t, e = cfg.model, cfg.data, cfg.optim, cfg.train, cfg.eval
    unknown = [x for x in d.tasks if x not in ALL_TASKS]
    if unknown:
        yield f"--data.tasks: unknown task(s) {unknown}; choose from {list(ALL_TASKS)}"
    if not d.tasks:
        yield "--data.tasks must name at least one task"
    if d.seq_len < d.cutoff_len:
        yield f"--data.seq-len ({d.seq_len}) must be >= --data.cutoff-len ({d.cutoff_len})"
    if m.hf_path is None:
        if m.num_heads % m.num_kv_heads:
            yield (f"--model.num-heads ({m.num_heads}) must be a multiple of "
                   f"--model.num-kv-heads ({m.num_kv_heads})")
        if m.head_dim % 2:
            yield f"--model.head-dim ({m.head_dim}) must be even (rotary embeddings)"
    if t.global_batch_size <= 0 or t.per_device_batch_size <= 0:
        yield "--train.global-batch-size and --train.per-device-batch-size must be positive"
    elif t.global_batch_size % t.per_device_batch_size:
        yield (f"--train.global-batch-size ({t.global_batch_size}) must be a multiple of "
               f"--train.per-device-batch-size ({t.per_device_batch_size})")
    if cfg.expected_devices and t.global_batch_size % (t.per_device_batch_size * cfg.expected_devices):
        yield (f"--train.global-batch-size ({t.global_batch_size}) must be a multiple of "
               f"per-device batch x devices ({t.per_device_batch_size} x {cfg.expected_devices})")
    if t.epochs <= 0 and t.max_steps <= 0:
        yield "set --train.epochs > 0 or --train.max-steps > 0"
    if o.lr < 0 or o.aux_lr < 0:
        yield "--optim.lr and --optim.aux-lr must be >= 0"
    if o.name == "adamw" and o.impl == "local":
        yield "--optim.impl local applies to --optim.name muon only"
    if e.num_beams < 1 or e.batch_size < 1:
        yield "--eval.num-beams and --eval.batch-size must be >= 1"
    if cfg.mesh.data == 0 or cfg.mesh.fsdp == 0 or (cfg.mesh.data < 0 and cfg.mesh.fsdp < 0):
        yield "--mesh.data and --mesh.fsdp: positive sizes, at most one of them -1"


def replace(cfg, **changes):
    """`dataclasses.replace` that accepts nested 'group.field' keys: replace(cfg, **{'optim.lr': 1e-3})."""
    nested: dict[str, dict] = {}
    flat = {}
    for key, value in changes.items():
        group, _, rest = key.partition(".")
        if rest:
            nested.setdefault(group, {})[rest] = value
        else:
            flat[key] = value
    for group, sub in nested.items():
        flat[group] = replace(getattr(cfg, group), **sub)
    return dataclasses.replace(cfg, **flat)
