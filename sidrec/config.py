"""Typed, frozen configuration for every command.

Every field is overridable from the CLI as `--group.field value` (tyro turns `hf_path` into
`--model.hf-path`); every field's docstring is its `--help` text. Presets (presets/) are values of
`Config`. One sentinel convention: 0 means "off" or "no limit" (max_steps, max_samples, periods,
patience, clip_norm); -1 only in the mesh, where it means "the rest of the devices". Cross-field rules live in
`Config.validate()`, which the CLI calls before anything heavy starts; it raises `ConfigError`
naming the fields involved.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from sidrec.errors import UserError
from sidrec.model import attention
from sidrec.model.qwen2 import Architecture

DType = Literal["float32", "bfloat16"]

ALL_TASKS = ("sid_sft", "sid_item_feat", "fusion_seq_rec", "sft_data", "title_history2sid")


class ConfigError(UserError):
    """A user-facing configuration mistake; the CLI prints it as one line."""


@dataclass(frozen=True, kw_only=True)
class ModelConfig(Architecture):
    """Which model to fine-tune: a local Hugging Face directory, or one from scratch whose shape is the
    Architecture fields (hidden_size ... init_std; ignored when hf_path is set: config.json decides)."""

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
    attention: Literal["xla", "splash", "splash_interpret"] = "xla"
    """Attention of the training step: xla (any backend), splash (Pallas splash-attention kernel, TPU
    only; rows a multiple of 128), splash_interpret (that kernel interpreted: any backend, slow, tests)."""
    sid_init_noise: float = 0.0
    """Std of Gaussian noise added to new SID embedding rows (0: exactly the mean of existing rows)."""


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """MiniOneRec data: `<root>/Amazon/{train,valid,test}/<category>_*.csv`, info/, index/."""

    root: str = "../shared/data"
    """Directory holding Amazon/ (or Amazon/ itself)."""
    category: str = "Industrial_and_Scientific"
    """File prefix of the category under Amazon/ (e.g. Office_Products)."""
    synthetic: bool = False
    """Generate a synthetic catalogue into <run-dir>/data and use it (the demo)."""
    synthetic_items: int = 400
    """Items of the synthetic catalogue."""
    synthetic_users: int = 1500
    """Users (one interaction sequence each) of the synthetic catalogue."""
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
    valid_max_samples: int = 0
    """Validate on the first N valid rows (0: all rows)."""


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """The update rule and its learning-rate schedule."""

    name: Literal["adamw", "muon"] = "adamw"
    """AdamW (upstream's) or Muon on the layer matrices + AdamW on the rest."""
    impl: Literal["optax", "local"] = "optax"
    """Muon implementation: optax.contrib.muon or our own chain (sidrec/optim.py)."""
    lr: float = 3e-4
    """Peak learning rate (Muon: of the matrix parameters)."""
    aux_lr: float = 3e-4
    """Muon only: AdamW learning rate of embeddings, head, norms and biases."""
    b1: float = 0.9
    """AdamW first-moment decay."""
    b2: float = 0.999
    """AdamW second-moment decay."""
    eps: float = 1e-8
    """AdamW epsilon (added to sqrt(v_hat), as torch)."""
    weight_decay: float = 0.0
    """Decoupled weight decay (not on norms and biases)."""
    momentum: float = 0.95
    """Muon momentum (Nesterov)."""
    ns_steps: int = 5
    """Newton-Schulz iterations per Muon update."""
    muon_scale: Literal["none", "shape", "rms"] = "shape"
    """Muon update scale: none (local only), sqrt(max(1, fan_out/fan_in)), or 0.2*sqrt(max(fan_in, fan_out))."""
    ns_dtype: DType = "float32"
    """Local Muon: dtype of the Newton-Schulz iteration (bfloat16 is faster on accelerators)."""
    clip_norm: float = 1.0
    """Global-norm gradient clipping (0: off)."""
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    """Decay after warmup, as Hugging Face's schedulers (linear is upstream's SFT, cosine its RL)."""
    warmup_steps: int = 20
    """Linear warmup from 0 over this many optimizer steps."""
    warmup_ratio: float = 0.0
    """Warmup as a fraction of the run's steps, rounded up (used instead of warmup_steps when > 0)."""


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Steps, batch sizes and the periodic actions of the training loop."""

    epochs: float = 3.0
    """Passes over the training mixture (fractions allowed)."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0: epochs decide)."""
    global_batch_size: int = 1024
    """Examples per optimizer step, over all devices and accumulation steps."""
    per_device_batch_size: int = 16
    """Examples per device per micro-batch; grad_accum = global / (per_device * devices)."""
    valid_every_steps: int = 0
    """Validation loss every N steps (0: only at epoch ends)."""
    early_stopping_patience: int = 3
    """Stop after this many validations without improvement (0: never)."""
    log_every_steps: int = 1
    """Log train metrics every N steps."""


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """Constrained beam-search evaluation."""

    split: Literal["valid", "test"] = "test"
    """Which split's prompts to rank."""
    max_samples: int = 0
    """Evaluate the first N prompts of the split (0: all)."""
    num_beams: int = 50
    """Beam width = predictions per prompt (upstream: 50)."""
    batch_size: int = 8
    """Prompts per device per beam-search call."""
    constrained: bool = True
    """Trie-constrained beams (False: upstream's 'pure' beam search over the full vocabulary)."""
    dtype: DType = "float32"
    """Compute dtype of the search (scores are fp32 log-softmax either way)."""
    which: Literal["best", "last"] = "best"
    """Which checkpoint of the run directory to evaluate (when no --model.hf-path is given)."""


@dataclass(frozen=True, kw_only=True)
class RLConfig:
    """GRPO after SFT (`cli.py rl`): upstream MiniOneRec's rl.py with trie-constrained beam rollouts."""

    sft_run_dir: str | None = None
    """SFT run directory to start from (its `sft_which` checkpoint); or set --model.hf-path instead."""
    sft_which: Literal["best", "last"] = "best"
    """Which checkpoint of the SFT run starts RL."""
    group_size: int = 16
    """Completions per prompt: the G best beams of a constrained beam search (upstream: 16)."""
    prompts_per_step: int = 64
    """Distinct prompts per optimizer step over all devices (upstream: 8 GPUs x 4 x accumulation 2)."""
    micro_batches: int = 2
    """Accumulation: prompts_per_step / micro_batches prompts per forward, split over the devices."""
    epochs: float = 2.0
    """Passes over the RL training prompts (upstream: 2)."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0: epochs decide)."""
    beta: float = 1e-3
    """Weight of the k3 KL to the reference model (upstream rl.sh: 1e-3)."""
    reward_type: Literal["rule", "ranking", "ranking_only", "prefix"] = "ranking"
    """rule (1 for the target), ranking (rule + upstream's NDCG penalty; rl.sh), ranking_only, prefix
    (1/depth per leading SID level matched)."""
    loss_type: Literal["grpo", "dapo", "gspo"] = "grpo"
    """Token mean per completion then mean (upstream's default), one token mean (upstream --dapo), or the
    sequence-level ratio (upstream --gspo)."""
    dynamic_sampling: bool = False
    """Drop groups whose advantages are all zero from the update (their KL term included)."""
    ref_sync_steps: int = 512
    """Mix the policy into the reference every N steps (TRL sync_ref_model, rl.sh on; 0: never)."""
    ref_sync_alpha: float = 0.6
    """ref <- alpha * policy + (1 - alpha) * ref at each sync (TRL's ref_model_mixup_alpha default)."""
    tasks: tuple[str, ...] = ("sid", "title2sid", "description2sid", "seq_title2sid")
    """RL training prompts (upstream: all: SidDataset, RLTitle2SidDataset's title and description
    prompts, RLSeqTitle2SidDataset)."""
    title_answer_leak: bool = True
    """Reproduce upstream's RLTitle2SidDataset prompts, which end with the answer SID."""
    seq_title_sample: int = 10000
    """Rows of RLSeqTitle2SidDataset (upstream: 10000, or all rows when fewer)."""
    max_prompt_len: int = 512
    """Prompts keep their last N tokens (TRL's max_prompt_length)."""
    valid_every_steps: int = 0
    """Validation (valid-split rollouts: HR@G, NDCG@G) every N steps (0: at the end only)."""
    valid_max_samples: int = 256
    """Validate on the first N valid prompts (0: all)."""
    keep_start: bool = True
    """Step 0 (the start model, validated before any update) competes for the best checkpoint, so a run
    that never beats its start on valid hands back the start itself (False: the best RL step)."""


@dataclass(frozen=True, kw_only=True)
class SidsConfig:
    """Semantic-ID construction (`cli.py sids`): item text -> embeddings -> residual quantisation ->
    a complete data root (`<out>/Amazon/...`) for --data.root."""

    out: str = "runs/sids"
    """Output directory: receives Amazon/{index,info,train,valid,test} and sids_report.json."""
    overwrite: bool = False
    """Replace an existing <out>/Amazon."""
    items: str | None = None
    """Raw inputs instead of --data.root: an items file (.json as item.json, .jsonl or .csv with item_id,
    title, description); needs --sids.interactions."""
    interactions: str | None = None
    """Raw inputs: a directory with train/, valid/, test/ holding <Category>_*.csv (upstream's columns;
    SID and title columns optional)."""
    method: Literal["rqkmeans", "rqkmeans-balanced", "rqvae"] = "rqkmeans-balanced"
    """Residual k-means (upstream rqkmeans_faiss.py's algorithm), its balanced variant with every cluster
    floor(n/K) or ceil(n/K) items (upstream rqkmeans_constrained.py), or an RQ-VAE (upstream rqvae.py)."""
    levels: int = 3
    """Quantisation levels (SID tokens before dedup)."""
    codes: int = 256
    """Codes per level."""
    dedup: Literal["extra-level", "sinkhorn", "none"] = "extra-level"
    """Collisions: a 4th token <d_rank> on every SID (upstream's constrained script, uniform depth),
    Sinkhorn re-assignment of the last level (upstream rqvae), or keep them."""
    embeddings: Literal["tfidf", "hf", "npy"] = "tfidf"
    """tfidf: offline fallback (TF-IDF + truncated SVD, scikit-learn); hf: mean-pooled hidden states of
    --model.hf-path; npy: --sids.embeddings-npy."""
    embeddings_npy: str | None = None
    """[items, dim] float array, rows in index.json order (with --sids.embeddings npy)."""
    tfidf_dim: int = 256
    """Dimensions kept by the SVD of the TF-IDF fallback."""
    embed_batch_size: int = 16
    """Items per device per forward (hf embeddings)."""
    embed_max_len: int = 512
    """Tokens kept per item text (hf embeddings; upstream max_sent_len 2048)."""
    kmeans_iterations: int = 20
    """Most Lloyd iterations per level after k-means++ seeding (fewer once assignments stop changing;
    balanced, Industrial TF-IDF: residual MSE 0.001059 / 0.001046 / 0.001048 at 10 / 20 / 50)."""
    rqvae_layers: tuple[int, ...] = (2048, 1024, 512, 256, 128, 64)
    """RQ-VAE encoder hidden sizes (decoder mirrored; upstream's default)."""
    rqvae_e_dim: int = 32
    """RQ-VAE latent and codebook dimension (upstream: 32)."""
    rqvae_epochs: int = 10000
    """RQ-VAE training epochs (upstream rqvae.sh: 10000)."""
    rqvae_batch_size: int = 20480
    """RQ-VAE batch (upstream rqvae.sh: 20480, i.e. the whole catalogue)."""
    rqvae_lr: float = 1e-3
    """RQ-VAE AdamW learning rate (upstream: 1e-3, constant after 50 warmup epochs)."""
    sinkhorn_rounds: int = 20
    """Re-assignment rounds of --sids.dedup sinkhorn (upstream: up to 20)."""
    sinkhorn_epsilon: float = 0.003
    """Entropic temperature of the Sinkhorn transport on min-max normalised distances."""


@dataclass(frozen=True, kw_only=True)
class MeshConfig:
    """Device mesh (data x fsdp) and multi-process settings."""

    data: int = 1
    """Data-parallel axis size (-1: the rest of the devices)."""
    fsdp: int = -1
    """FSDP axis size (-1: the rest of the devices)."""
    coordinator_address: str | None = None
    """host:port of process 0 for multi-process runs outside TPU pods (None: auto-detect/env)."""
    num_processes: int | None = None
    """Processes of a multi-process run (None: auto-detect/env JAX_NUM_PROCESSES)."""
    process_id: int | None = None
    """This process's index (None: auto-detect/env JAX_PROCESS_ID)."""


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    """Orbax checkpoints of the run directory."""

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
    """Weights & Biases logging (offline by default: runs sync later with `wandb sync`)."""

    mode: Literal["online", "offline", "disabled"] = "offline"
    """online, offline (local files only) or disabled."""
    project: str = "sidrec"
    """W&B project."""
    name: str | None = None
    """W&B run name (None: the run directory's name)."""


@dataclass(frozen=True, kw_only=True)
class Config:
    """Everything a command needs; presets are values of it."""

    description: str = ""
    """One line shown by `cli.py presets`."""
    run_dir: str = "runs/default"
    """Where checkpoints, logs, the tokenizer and eval outputs are written (local or gs://)."""
    seed: int = 42
    """Seed of initialisation, data order and upstream's random instruction choice."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The model and its tokenizer."""
    data: DataConfig = field(default_factory=DataConfig)
    """The data files and the SFT prompts."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """The optimizer."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The training loop."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation."""
    rl: RLConfig = field(default_factory=RLConfig)
    """The RL stage (`cli.py rl`)."""
    sids: SidsConfig = field(default_factory=SidsConfig)
    """Semantic-ID construction (`cli.py sids`)."""
    mesh: MeshConfig = field(default_factory=MeshConfig)
    """Devices and processes."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoints."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """Weights & Biases."""
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
    if m.attention != "xla" and attention.splash_block(d.seq_len) is None:
        yield f"--model.attention {m.attention} needs --data.seq-len a multiple of 128 (got {d.seq_len})"
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
    negative = [flag for flag, value in (("--train.max-steps", t.max_steps), ("--eval.max-samples", e.max_samples),
                                         ("--data.valid-max-samples", d.valid_max_samples)) if value < 0]
    if negative:
        yield f"{', '.join(negative)}: must be >= 0 (0 means no limit)"
    if o.lr < 0 or o.aux_lr < 0:
        yield "--optim.lr and --optim.aux-lr must be >= 0"
    if o.name == "adamw" and o.impl == "local":
        yield "--optim.impl local applies to --optim.name muon only"
    if e.num_beams < 1 or e.batch_size < 1:
        yield "--eval.num-beams and --eval.batch-size must be >= 1"
    r = cfg.rl
    if r.group_size < 2:
        yield f"--rl.group-size ({r.group_size}) must be >= 2 (GRPO advantages need a group)"
    if r.micro_batches < 1 or r.prompts_per_step % r.micro_batches:
        yield (f"--rl.prompts-per-step ({r.prompts_per_step}) must be a multiple of --rl.micro-batches "
               f"({r.micro_batches})")
    unknown_rl = [x for x in r.tasks if x not in ("sid", "title2sid", "description2sid", "seq_title2sid")]
    if unknown_rl or not r.tasks:
        yield (f"--rl.tasks: unknown or empty {list(unknown_rl)}; choose from "
               "['sid', 'title2sid', 'description2sid', 'seq_title2sid']")
    if r.max_steps < 0 or r.valid_max_samples < 0 or r.ref_sync_steps < 0:
        yield "--rl.max-steps, --rl.valid-max-samples and --rl.ref-sync-steps must be >= 0 (0: no limit / never)"
    sids = cfg.sids
    if sids.levels < 1 or sids.codes < 2:
        yield f"--sids.levels ({sids.levels}) must be >= 1 and --sids.codes ({sids.codes}) >= 2"
    if (sids.items is None) != (sids.interactions is None):
        yield "--sids.items and --sids.interactions go together (raw inputs), or neither (--data.root)"
    if sids.embeddings == "npy" and not sids.embeddings_npy:
        yield "--sids.embeddings npy needs --sids.embeddings-npy FILE"
    if sids.embeddings == "hf" and not m.hf_path:
        yield "--sids.embeddings hf needs --model.hf-path (a Qwen2-family Hugging Face directory)"
    if sids.rqvae_epochs < 1 or sids.rqvae_batch_size < 1 or sids.rqvae_e_dim < 1 or sids.rqvae_lr <= 0:
        yield "--sids.rqvae-epochs, --sids.rqvae-batch-size and --sids.rqvae-e-dim must be >= 1, --sids.rqvae-lr > 0"
    if sids.kmeans_iterations < 1 or sids.tfidf_dim < 1 or sids.sinkhorn_rounds < 0 or sids.sinkhorn_epsilon <= 0:
        yield ("--sids.kmeans-iterations and --sids.tfidf-dim must be >= 1, --sids.sinkhorn-rounds >= 0, "
               "--sids.sinkhorn-epsilon > 0")
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
