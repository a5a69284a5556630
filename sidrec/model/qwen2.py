"""Qwen2 decoder as pure functions over a parameter pytree (no module objects).

Numerics follow Hugging Face `Qwen2ForCausalLM`: RMSNorm in fp32 then cast, rotary tables in fp32 then
cast, attention softmax in fp32, grouped-query attention where query head h reads kv head h // G.
Matrices are stored [in, out]. Every parameter is declared once in `param_specs`; the abstract tree,
the initializer, the logical axes (sharding), the role (optimizer routing, weight decay) and the
Hugging Face tensor name (hf.py's key map) are derived from it. The architecture fields are declared
once in `Architecture`.

Einsum letters: b batch, t/s time (query/key), d model, h heads, k kv heads, g query heads per kv
head, e head dim, f ffn, v vocab, w beams, m generated (suffix) time, n gathered positions.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from sidrec.errors import UserError
from sidrec.model import attention, vma, vocab
from sidrec.util import round_up

# Logit of vocabulary rows that exist only as padding: finite (no NaN in softmax or its gradient)
# and low enough that exp() underflows to exactly 0 next to any real logit.
MASKED_LOGIT = -1e30

Params = dict[str, Any]
Unshard = Callable[[str, Any], Any]


class Qwen2ConfigError(UserError):
    """An architecture that cannot be built (the message names the fields)."""


@dataclass(frozen=True, kw_only=True)
class Architecture:
    """The shape of a Qwen2 decoder (what a config.json describes). THE list of architecture fields:
    `ModelConfig` (the CLI's from-scratch model) and `Qwen2Config` both extend it; the defaults are a
    small from-scratch model (a checkpoint's config.json always gives its own values)."""

    hidden_size: int = 128
    """Width of the residual stream."""
    intermediate_size: int = 384
    """Width of the SwiGLU MLP."""
    num_layers: int = 2
    """Decoder layers (stacked on a leading axis and scanned)."""
    num_heads: int = 4
    """Query heads."""
    num_kv_heads: int = 2
    """Key/value heads (grouped-query attention: num_heads must be a multiple)."""
    head_dim: int = 32
    """Width of one attention head (even: rotary embeddings rotate pairs)."""
    rope_theta: float = 10000.0
    """Rotary embedding base."""
    rms_norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    tie_word_embeddings: bool = True
    """The output head is the transposed input embedding."""
    max_position_embeddings: int = 4096
    """Longest position the model is meant for (recorded in exported config.json)."""
    init_std: float = 0.02
    """Std of the normal initializer of from-scratch matrices and embeddings (HF: initializer_range)."""


ARCHITECTURE_FIELDS = tuple(f.name for f in dataclasses.fields(Architecture))


def architecture_of(config: Architecture) -> dict[str, Any]:
    """The architecture fields of any Architecture subclass (ModelConfig, Qwen2Config) as a dict."""
    return {name: getattr(config, name) for name in ARCHITECTURE_FIELDS}


@dataclass(frozen=True, kw_only=True)
class Qwen2Config(Architecture):
    """Architecture + vocabulary + numerics of one model; hashable, so it can be a static jit argument."""

    vocab_size: int
    """Rows of the embedding / columns of the head (may be padded past real_vocab_size)."""
    real_vocab_size: int
    """Tokens that exist; logits of rows >= this are MASKED_LOGIT."""
    compute_dtype: str = "float32"
    """Dtype of matmuls (master weights stay fp32; softmax and loss are fp32)."""
    remat: bool = False
    """Rematerialise each layer in the backward pass."""
    attention: str = "xla"
    """Attention over packed training rows: "xla" (sidrec.model.attention.packed), "splash" (the Pallas
    TPU kernel), "splash_interpret" (that kernel in Pallas' interpreter: any backend, slow; for tests).
    Decoding and scoring always use XLA."""

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise Qwen2ConfigError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                                   f"({self.num_kv_heads})")
        if self.real_vocab_size > self.vocab_size:
            raise Qwen2ConfigError(f"real_vocab_size ({self.real_vocab_size}) exceeds vocab_size "
                                   f"({self.vocab_size})")
        if self.compute_dtype not in ("float32", "bfloat16"):
            raise Qwen2ConfigError(f"compute_dtype must be 'float32' or 'bfloat16', got {self.compute_dtype!r}")
        if self.attention not in attention.IMPLEMENTATIONS:
            raise Qwen2ConfigError(f"attention must be one of {', '.join(attention.IMPLEMENTATIONS)}, "
                                   f"got {self.attention!r}")

    @property
    def dtype(self):
        return jnp.dtype(self.compute_dtype)

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def build(cls, architecture: Architecture, vocab_size: int, *, pad_to_multiple: int = 1,
              compute_dtype: str = "float32", remat: bool = False, attention: str = "xla") -> Qwen2Config:
        """A model of `architecture` over `vocab_size` tokens, rows padded to a multiple (fast matmuls)."""
        return cls(**architecture_of(architecture), vocab_size=round_up(vocab_size, pad_to_multiple),
                   real_vocab_size=vocab_size, compute_dtype=compute_dtype, remat=remat, attention=attention)


# ----------------------------------------------------------------------------------------------
# Parameter declaration


# What a parameter is, for everything decided per parameter (optimizer, weight decay):
EMBEDDING, HEAD, MATRIX, BIAS, NORM = "embedding", "head", "matrix", "bias", "norm"
ROLES = (EMBEDDING, HEAD, MATRIX, BIAS, NORM)


@dataclass(frozen=True)
class ArrayInfo:
    """One parameter: shape, fp32 master dtype, logical axes (sharding), initializer, role, and its
    Hugging Face tensor name ("{i}" = layer index of a stacked leaf) and whether torch stores it
    transposed (nn.Linear keeps [out, in], we keep [in, out])."""

    shape: tuple[int, ...]
    dtype: Any
    logical_axes: tuple[str, ...]
    init: Callable[[jax.Array, tuple[int, ...], Any], jax.Array]
    role: str
    hf_name: str
    hf_transposed: bool = False

    @property
    def stacked(self) -> bool:
        """A per-layer leaf stacked on a leading [L] axis."""
        return "{i}" in self.hf_name


def _normal(std: float):
    return lambda key, shape, dtype: std * jax.random.normal(key, shape, dtype)


def _ones(key, shape, dtype):
    return jnp.ones(shape, dtype)


def _zeros(key, shape, dtype):
    return jnp.zeros(shape, dtype)


def param_specs(cfg: Qwen2Config) -> dict:
    """THE declaration of every parameter; the abstract tree, initializer, logical axes, optimizer
    roles and the HF key map are all derived from it."""
    L, D, F, V = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    matrix = _normal(cfg.init_std)

    def layer(hf_suffix, shape, axes, init, role, transposed=False):
        return ArrayInfo((L, *shape), jnp.float32, ("layers", *axes), init, role,
                         f"model.layers.{{i}}.{hf_suffix}", transposed)

    specs = {
        "embed": ArrayInfo((V, D), jnp.float32, ("vocab", "embed"), matrix, EMBEDDING, "model.embed_tokens.weight"),
        "layers": {
            "attn_norm": layer("input_layernorm.weight", (D,), ("embed",), _ones, NORM),
            "wq": layer("self_attn.q_proj.weight", (D, q_dim), ("embed", "q_heads"), matrix, MATRIX, True),
            "bq": layer("self_attn.q_proj.bias", (q_dim,), ("q_heads",), _zeros, BIAS),
            "wk": layer("self_attn.k_proj.weight", (D, kv_dim), ("embed", "kv_heads"), matrix, MATRIX, True),
            "bk": layer("self_attn.k_proj.bias", (kv_dim,), ("kv_heads",), _zeros, BIAS),
            "wv": layer("self_attn.v_proj.weight", (D, kv_dim), ("embed", "kv_heads"), matrix, MATRIX, True),
            "bv": layer("self_attn.v_proj.bias", (kv_dim,), ("kv_heads",), _zeros, BIAS),
            "wo": layer("self_attn.o_proj.weight", (q_dim, D), ("q_heads", "embed"), matrix, MATRIX, True),
            "mlp_norm": layer("post_attention_layernorm.weight", (D,), ("embed",), _ones, NORM),
            "w_gate": layer("mlp.gate_proj.weight", (D, F), ("embed", "mlp"), matrix, MATRIX, True),
            "w_up": layer("mlp.up_proj.weight", (D, F), ("embed", "mlp"), matrix, MATRIX, True),
            "w_down": layer("mlp.down_proj.weight", (F, D), ("mlp", "embed"), matrix, MATRIX, True),
        },
        "final_norm": ArrayInfo((D,), jnp.float32, ("embed",), _ones, NORM, "model.norm.weight"),
    }
    if not cfg.tie_word_embeddings:
        specs["lm_head"] = ArrayInfo((D, V), jnp.float32, ("embed", "vocab"), matrix, HEAD, "lm_head.weight", True)
    return specs


TIED_HEAD_HF_NAME = "lm_head.weight"
"""What a tied checkpoint may also store (a copy of the embedding)."""


def path_name(path) -> str:
    """'layers/wq' for the pytree path of params['layers']['wq'] (optax's masked trees included)."""
    return jax.tree_util.keystr(tuple(path), simple=True, separator="/")


def flat_specs(cfg: Qwen2Config) -> dict[str, ArrayInfo]:
    """'layers/wq' -> its ArrayInfo, in tree order."""
    flat = jax.tree_util.tree_flatten_with_path(param_specs(cfg), is_leaf=_is_info)[0]
    return {path_name(path): info for path, info in flat}


def param_roles(cfg: Qwen2Config) -> dict[str, str]:
    """'layers/wq' -> role (MATRIX, NORM, ...): what optimizer routing and weight decay read."""
    return {name: info.role for name, info in flat_specs(cfg).items()}


def _is_info(x) -> bool:
    return isinstance(x, ArrayInfo)


def abstract_params(cfg: Qwen2Config) -> dict:
    return jax.tree.map(lambda i: jax.ShapeDtypeStruct(i.shape, i.dtype), param_specs(cfg), is_leaf=_is_info)


def logical_axes(cfg: Qwen2Config) -> dict:
    """Pytree of tuples of logical axis names (map with is_leaf=lambda x: isinstance(x, tuple))."""
    return jax.tree.map(lambda i: i.logical_axes, param_specs(cfg), is_leaf=_is_info)


def init_params(cfg: Qwen2Config, key: jax.Array) -> Params:
    """From-scratch weights (jit it with out_shardings to create them already sharded)."""
    specs, treedef = jax.tree.flatten(param_specs(cfg), is_leaf=_is_info)
    keys = jax.random.split(key, len(specs))
    return jax.tree.unflatten(treedef, [i.init(k, i.shape, i.dtype) for i, k in zip(specs, keys)])


def count_params(cfg: Qwen2Config) -> int:
    """Stored parameters (padded vocabulary rows included)."""
    specs = jax.tree.leaves(param_specs(cfg), is_leaf=_is_info)
    return sum(math.prod(i.shape) for i in specs)


def flops_per_token(cfg: Qwen2Config, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward): 6 N + 12 L H Hd T (PaLM appendix B).

    N counts the parameters used in matmuls: the input embedding is a gather, so an untied model's
    embedding table is left out (a tied one is counted once, as the head). Attention is counted over
    the full row length T, the convention (what the step computes: `executed_train_flops`).
    """
    n = count_params(cfg)
    if not cfg.tie_word_embeddings:
        n -= cfg.vocab_size * cfg.hidden_size
    attention = 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len
    return 6.0 * n + attention


def layer_matmul_params(cfg: Qwen2Config) -> int:
    """Weights of the decoder layers' matmuls (q, k, v, o and the three MLP projections), all layers."""
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return cfg.num_layers * cfg.hidden_size * (2 * q + 2 * kv + 3 * cfg.intermediate_size)


def executed_train_flops(cfg: Qwen2Config, token_slots: float, target_slots: float, seq_len: int,
                         max_segment_len: int | None = None) -> float:
    """FLOPs one training step really executes (for hardware utilisation, next to `flops_per_token`'s MFU).

    The layers run over every row slot, padding included: forward + backward = 3 forwards, 4 with remat.
    Each query's attention covers `attention.keys_per_query` keys (rows of `seq_len`, examples of at
    most `max_segment_len`), with the score matmuls its backward recomputes: the xla form's VJP
    recomputes the scores once (7 matmuls where autodiff has 6: 3.5 forwards), splash's separate dq
    and dkv kernels recompute the scores and their gradient through the values twice (9: 4.5). The
    vocabulary head runs only at the target slots, 4 forwards there: vocab.cross_entropy's backward
    recomputes its logits chunk by chunk before the two gradients. A small model with a large
    vocabulary executes far less than 6N per token (the head is most of N).
    """
    implementation = cfg.attention.removesuffix("_interpret")
    keys = attention.keys_per_query(seq_len, max_segment_len, implementation)
    score_matmul = 2 * cfg.num_layers * cfg.num_heads * cfg.head_dim * keys  # q.k or p.v of one slot
    passes = 4 if cfg.remat else 3
    attention_passes = passes + (0.5 if implementation == "xla" else 1.5)
    per_slot = passes * 2 * layer_matmul_params(cfg) + attention_passes * 2 * score_matmul
    return token_slots * per_slot + target_slots * 4 * 2 * cfg.hidden_size * cfg.real_vocab_size


# ----------------------------------------------------------------------------------------------
# Building blocks


def _identity_unshard(name: str, tree):
    return tree


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """HF Qwen2RMSNorm: normalise in fp32, cast back, then scale (in the input dtype)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * normed.astype(x.dtype)


def rope_tables(positions: jax.Array, head_dim: int, theta: float, dtype) -> tuple[jax.Array, jax.Array]:
    """cos, sin [..., head_dim] for integer positions [...]; fp32 then cast, as HF."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    # HF's angles are [freqs, freqs]: cos / sin of each half once, then the copy (XLA CPU's cos ~35 ns).
    cos, sin = jnp.cos(freqs).astype(dtype), jnp.sin(freqs).astype(dtype)
    return jnp.concatenate([cos, cos], axis=-1), jnp.concatenate([sin, sin], axis=-1)


def _apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [..., heads, e]; cos/sin [..., e] broadcast over the heads axis (HF rotate_half form)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[..., None, :] + rotated * sin[..., None, :]


def _project_qkv(layer: Params, cfg: Qwen2Config, h: jax.Array, cos, sin):
    """h [b, t, d] -> q [b, t, k, g, e], k and v [b, t, k, e], rotary applied to q and k.

    The stored [d, h*e] matrices are viewed as [d, h, e] (head-major, as HF's q_proj rows), and query
    head h = kv head k * g + its index in the group, so [h] reshapes to [k, g].
    """
    d, H, K, E = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q = jnp.einsum("btd,dhe->bthe", h, layer["wq"].reshape(d, H, E)) + layer["bq"].reshape(H, E)
    k = jnp.einsum("btd,dke->btke", h, layer["wk"].reshape(d, K, E)) + layer["bk"].reshape(K, E)
    v = jnp.einsum("btd,dke->btke", h, layer["wv"].reshape(d, K, E)) + layer["bv"].reshape(K, E)
    q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
    return q.reshape(*q.shape[:2], K, cfg.q_per_kv, E), k, v


def _mlp(layer: Params, cfg: Qwen2Config, x: jax.Array) -> jax.Array:
    h = rms_norm(x, layer["mlp_norm"], cfg.rms_norm_eps)
    return swiglu(h, layer["w_gate"], layer["w_up"], layer["w_down"])


@jax.custom_vjp
def swiglu(h, w_gate, w_up, w_down):
    """(silu(h @ w_gate) * (h @ w_up)) @ w_down for h [..., d], HF's Qwen2MLP.

    Its own VJP is autodiff's arithmetic with the weight gradients' matmuls written over explicitly
    transposed [d, n] operands: autodiff's transpose of the einsums had XLA's CPU backend transpose the
    wide [n, f] intermediates (fused into the silu backward, ~12 ns an element), measured 140 -> 100 ms
    for one MLP's forward + backward at [4096, 256] x [256, 768].
    """
    return _swiglu_forward(h, w_gate, w_up, w_down)[0]


def _swiglu_forward(h, w_gate, w_up, w_down):
    flat = h.reshape(-1, h.shape[-1])
    gate, up = flat @ w_gate, flat @ w_up
    out = (jax.nn.silu(gate) * up) @ w_down
    return out.reshape(*h.shape[:-1], out.shape[-1]), (flat, gate, up, w_gate, w_up, w_down)


def _swiglu_backward(residuals, out_grad):
    flat, gate, up, w_gate, w_up, w_down = residuals
    shape = (*out_grad.shape[:-1], flat.shape[-1])
    out_grad = out_grad.reshape(-1, out_grad.shape[-1])
    sigmoid = jax.nn.sigmoid(gate)
    silu = gate * sigmoid
    product_grad = out_grad @ w_down.T
    w_down_grad = (out_grad.T @ (silu * up)).T
    gate_grad = product_grad * up * (sigmoid * (1 + gate * (1 - sigmoid)))
    up_grad = product_grad * silu
    flat_t = flat.T
    h_grad = gate_grad @ w_gate.T + up_grad @ w_up.T
    return (h_grad.reshape(shape), vma.summed_like(flat_t @ gate_grad, w_gate),
            vma.summed_like(flat_t @ up_grad, w_up), vma.summed_like(w_down_grad, w_down))


swiglu.defvjp(_swiglu_forward, _swiglu_backward)


def _cast(tree, dtype):
    return jax.tree.map(lambda a: a.astype(dtype), tree)


def _decoder_layer(layer: Params, cfg: Qwen2Config, x, cos, sin, attend):
    """THE pre-norm block, for training, prefill and decoding alike: only `attend(q, k, v)` ->
    [b, t, k, g, e] differs (decoding runs it with the beams on the t axis). Also returns this
    layer's (k, v) for a cache. `layer` holds one layer's fp32 master slices."""
    with jax.named_scope("layer"):
        layer = _cast(layer, cfg.dtype)
        with jax.named_scope("attention"):
            h = rms_norm(x, layer["attn_norm"], cfg.rms_norm_eps)
            q, k, v = _project_qkv(layer, cfg, h, cos, sin)
            wo = layer["wo"].reshape(cfg.num_kv_heads, cfg.q_per_kv, cfg.head_dim, cfg.hidden_size)
            x = x + jnp.einsum("btkge,kged->btd", attend(q, k, v), wo)
        with jax.named_scope("mlp"):
            x = x + _mlp(layer, cfg, x)
    return x, (k, v)


def _embed(params, cfg, tokens, unshard):
    with jax.named_scope("embed"):
        table = unshard("embed", params["embed"])
        return jnp.take(table, tokens, axis=0).astype(cfg.dtype)


def _final_norm(params, cfg, x, unshard):
    with jax.named_scope("final_norm"):
        return rms_norm(x, unshard("final_norm", params["final_norm"]), cfg.rms_norm_eps)


def _run_layers(params, cfg: Qwen2Config, x, positions, attend, unshard, *, keep_kv: bool, prefix_kv=None):
    """Scan the stacked layers; optionally return the stacked (k, v) [L, b, t, k, e] for a cache.

    attend(q, k, v, prefix) -> [b, t, k, g, e] is the attention of one layer; prefix is that layer's
    slice of prefix_kv: optional stacked (k, v) [L, b, s, k, e] of earlier tokens that every query may
    also attend to (see `_whole_row`); gradients flow into it.
    """
    cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta, cfg.dtype)

    def body(x, xs):
        layer, prefix = xs
        x, kv = _decoder_layer(unshard("layers", layer), cfg, x, cos, sin,
                               lambda q, k, v: attend(q, k, v, prefix))
        return x, (kv if keep_kv else None)

    if cfg.remat:
        # Save only each layer's input: the (all-gathered) weights and activations are recomputed
        # in the backward pass, so FSDP never keeps a gathered copy of every layer alive.
        body = jax.checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable)
    return jax.lax.scan(body, x, (params["layers"], prefix_kv))


def _whole_row(visible, dtype):
    """Attention over whole rows, visible [b, t, s + t] with a prefix's s keys first (else [b, t, t])."""
    def attend(q, k, v, prefix):
        if prefix is not None:
            k, v = jnp.concatenate([prefix[0], k], axis=1), jnp.concatenate([prefix[1], v], axis=1)
        return attention.whole_row(q, k, v, visible=visible, dtype=dtype)
    return attend


def _packed_rows(cfg: Qwen2Config, segment_ids, max_segment_len):
    """Attention over packed rows (sidrec.model.attention), by cfg.attention. Called outside the layer
    scan, so the xla form's bias is built once for all layers."""
    if cfg.attention == "xla":
        bias = attention.packed_bias(segment_ids, max_segment_len)
        return lambda q, k, v, prefix: attention.packed(q, k, v, bias=bias, dtype=cfg.dtype)

    def attend(q, k, v, prefix):
        return attention.splash(q, k, v, segment_ids=segment_ids, max_segment_len=max_segment_len,
                                interpret=cfg.attention == "splash_interpret").astype(cfg.dtype)
    return attend


# ----------------------------------------------------------------------------------------------
# Training / scoring forward


def forward_hidden(params: Params, cfg: Qwen2Config, tokens, segment_ids, positions, *,
                   unshard: Unshard | None = None, max_segment_len: int | None = None) -> jax.Array:
    """Final-norm hidden states [b, t, d] in the compute dtype.

    tokens, segment_ids, positions: int32 [b, t]. A query sees keys of the same non-zero segment at or
    before its index in the row; positions restart per packed segment (the caller provides them).
    max_segment_len: no segment is longer (the training data's longest example), so attention looks back
    no further than that (sidrec.model.attention.packed); None: whole rows.
    unshard(name, tree) returns the gathered arrays (FSDP hook; None = identity); `name` is the top-level
    key of params: "embed", "layers" (each per-layer slice dict inside the scan, leaves without the L
    axis), "final_norm" (and in logits_at "lm_head", or "embed" again when tied). It receives the fp32
    master arrays and the cast to the compute dtype follows, so gradients are reduce-scattered in fp32;
    an unshard that casts before gathering trades that for half the all-gather bytes.
    """
    unshard = unshard or _identity_unshard
    x = _embed(params, cfg, tokens, unshard)
    x, _ = _run_layers(params, cfg, x, positions, _packed_rows(cfg, segment_ids, max_segment_len), unshard,
                       keep_kv=False)
    return _final_norm(params, cfg, x, unshard)


def output_head(params: Params, cfg: Qwen2Config, *, unshard: Unshard | None = None) -> vocab.Head:
    """The output projection as stored, in the compute dtype: the [v, d] embedding when tied, else the
    [d, v] lm_head (for sidrec.model.vocab's chunked reductions, which need no transpose)."""
    unshard = unshard or _identity_unshard
    if cfg.tie_word_embeddings:
        return vocab.Head(unshard("embed", params["embed"]).astype(cfg.dtype), vocab_axis=0)
    return vocab.Head(unshard("lm_head", params["lm_head"]).astype(cfg.dtype), vocab_axis=1)


def _head(params, cfg: Qwen2Config, unshard) -> jax.Array:
    if cfg.tie_word_embeddings:
        return unshard("embed", params["embed"]).T.astype(cfg.dtype)
    return unshard("lm_head", params["lm_head"]).astype(cfg.dtype)


def _vocab_logits(params, cfg: Qwen2Config, hidden, unshard) -> jax.Array:
    """hidden [..., d] -> fp32 logits [..., v], padded vocabulary rows masked."""
    with jax.named_scope("logits"):
        # One 2-D matmul: with leading batch dims XLA materialised a transpose of the [slots, vocab]
        # gradient (measured 9.6 s -> 6.7 s for the loss + gradient of a 152k-vocabulary step on CPU).
        flat = hidden.reshape(-1, hidden.shape[-1])
        logits = jnp.dot(flat, _head(params, cfg, unshard), preferred_element_type=jnp.float32)
        if cfg.real_vocab_size < cfg.vocab_size:
            logits = jnp.where(jnp.arange(cfg.vocab_size) < cfg.real_vocab_size, logits, MASKED_LOGIT)
        return logits.reshape(*hidden.shape[:-1], cfg.vocab_size)


def cross_entropy_at(params: Params, cfg: Qwen2Config, hidden, index, targets, *,
                     unshard: Unshard | None = None) -> jax.Array:
    """fp32, shaped like targets: full-vocabulary cross-entropy of targets at positions index (int, any
    shape) of hidden [b, t, d] flattened to [b * t, d] (the loss slots of a device span its rows),
    without materialising the logits in either pass (sidrec.model.vocab.cross_entropy)."""
    gathered = jnp.take(hidden.reshape(-1, hidden.shape[-1]), index.reshape(-1), axis=0)
    with jax.named_scope("logits"):
        ce = vocab.cross_entropy(gathered, output_head(params, cfg, unshard=unshard), targets.reshape(-1),
                                 cfg.real_vocab_size)
    return ce.reshape(targets.shape)


def logits_at(params: Params, cfg: Qwen2Config, hidden, index, *, unshard: Unshard | None = None) -> jax.Array:
    """fp32 logits [b, n, v] at positions index [b, n] of hidden [b, t, d] (the loss needs few)."""
    gathered = jnp.take_along_axis(hidden, index[..., None], axis=1)
    return _vocab_logits(params, cfg, gathered, unshard or _identity_unshard)


def continuation_hidden(params: Params, cfg: Qwen2Config, prompt_tokens, prompt_mask, continuations, *,
                        unshard: Unshard | None = None) -> jax.Array:
    """Hidden states [b, w, m, d] that predict each token of w continuations [b, w, m] of left-padded
    prompts [b, s] (entry c predicts continuations[..., c]: the prompt's last state for c = 0).

    Equal to running every prompt + continuation row through `forward_hidden`, but the prompt is run once
    and its per-layer K/V shared by its w continuations (what scoring a beam-search group needs, with
    gradients through the shared prompt). Positions count from the prompt's first real token.
    """
    unshard = unshard or _identity_unshard
    b, w, m = continuations.shape
    mask = prompt_mask.astype(bool)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
    x = _embed(params, cfg, prompt_tokens, unshard)
    x, prompt_kv = _run_layers(params, cfg, x, positions, _whole_row(attention.visibility(mask), cfg.dtype),
                               unshard, keep_kv=True)
    last = _final_norm(params, cfg, x[:, -1], unshard)
    # Continuation token (j, c) sees the real prompt tokens and tokens (j, <= c) of its own continuation.
    beam, step = jnp.repeat(jnp.arange(w), m), jnp.tile(jnp.arange(m), w)
    own = (beam[:, None] == beam[None, :]) & (step[:, None] >= step[None, :])
    visible = jnp.concatenate([jnp.broadcast_to(mask[:, None, :], (b, w * m, mask.shape[1])),
                               jnp.broadcast_to(own, (b, w * m, w * m))], axis=-1)
    suffix_positions = jnp.sum(mask, axis=1, dtype=jnp.int32)[:, None] + step[None, :]
    y = _embed(params, cfg, continuations.reshape(b, w * m), unshard)
    y, _ = _run_layers(params, cfg, y, suffix_positions, _whole_row(visible, cfg.dtype), unshard, keep_kv=False,
                       prefix_kv=prompt_kv)
    y = _final_norm(params, cfg, y, unshard).reshape(b, w, m, -1)
    return jnp.concatenate([jnp.broadcast_to(last[:, None, None], (b, w, 1, last.shape[-1])), y[:, :, :-1]], axis=2)


def vocab_logits(params: Params, cfg: Qwen2Config, hidden, *, unshard: Unshard | None = None) -> jax.Array:
    """fp32 logits [..., v] of hidden states [..., d] (padded vocabulary rows masked)."""
    return _vocab_logits(params, cfg, hidden, unshard or _identity_unshard)


def forward(params: Params, cfg: Qwen2Config, tokens, segment_ids, positions) -> jax.Array:
    """fp32 logits [b, t, v] at every position."""
    hidden = forward_hidden(params, cfg, tokens, segment_ids, positions)
    return _vocab_logits(params, cfg, hidden, _identity_unshard)


# ----------------------------------------------------------------------------------------------
# Cached decoding, shaped for beam search: the prompt K/V is stored once per prompt and shared by
# its beams; each beam has its own small suffix buffer of generated tokens.


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class KVCache:
    prompt_k: jax.Array       # [L, b, s, k, e] rotary already applied
    prompt_v: jax.Array       # [L, b, s, k, e]
    prompt_mask: jax.Array    # [b, s] bool, True on real (non-padding) prompt tokens
    suffix_k: jax.Array       # [L, b, w, m, k, e] generated tokens, per beam
    suffix_v: jax.Array       # [L, b, w, m, k, e]
    length: jax.Array         # int32 scalar: tokens generated so far (filled suffix slots)
    next_position: jax.Array  # int32 [b]: position of the first generated token (= real prompt length)

    @property
    def num_beams(self) -> int:
        return self.suffix_k.shape[2]

    @property
    def max_new_tokens(self) -> int:
        return self.suffix_k.shape[3]


def prefill(params: Params, cfg: Qwen2Config, tokens, mask, *, num_beams: int = 1,
            max_new_tokens: int) -> tuple[jax.Array, KVCache]:
    """Run left-padded prompts tokens/mask [b, s]; return the last position's final hidden state [b, d]
    (`vocab_logits` of it are the next-token logits) and a cache.

    Positions of real tokens count from the first real one (cumsum(mask) - 1), as HF generate.
    max_new_tokens bounds how many decode_step calls the cache can take.
    """
    mask = mask.astype(bool)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
    x = _embed(params, cfg, tokens, _identity_unshard)
    x, (k, v) = _run_layers(params, cfg, x, positions, _whole_row(attention.visibility(mask), cfg.dtype),
                            _identity_unshard, keep_kv=True)
    last = _final_norm(params, cfg, x[:, -1], _identity_unshard)
    L, b = cfg.num_layers, tokens.shape[0]
    suffix_shape = (L, b, num_beams, max_new_tokens, cfg.num_kv_heads, cfg.head_dim)
    cache = KVCache(
        prompt_k=k, prompt_v=v, prompt_mask=mask,
        suffix_k=jnp.zeros(suffix_shape, cfg.dtype), suffix_v=jnp.zeros(suffix_shape, cfg.dtype),
        length=jnp.zeros((), jnp.int32), next_position=jnp.sum(mask, axis=1, dtype=jnp.int32),
    )
    return last, cache


def _decode_attention(q, k_new, v_new, *, prompt_k, prompt_v, prompt_mask, suffix_k, suffix_v, length, dtype):
    """Attention of one new token per beam over: shared prompt + its beam's earlier suffix + itself.

    q [b,w,k,g,e]; k_new/v_new [b,w,k,e]; prompt_k/v [b,s,k,e]; suffix_k/v [b,w,m,k,e] -> [b,w,k,g,e].
    """
    scale = q.shape[-1] ** -0.5
    f32 = jnp.float32
    prompt_scores = jnp.einsum("bwkge,bske->bwkgs", q, prompt_k, preferred_element_type=f32)
    suffix_scores = jnp.einsum("bwkge,bwmke->bwkgm", q, suffix_k, preferred_element_type=f32)
    self_scores = jnp.einsum("bwkge,bwke->bwkg", q, k_new, preferred_element_type=f32)[..., None]
    scores = jnp.concatenate([prompt_scores, suffix_scores, self_scores], axis=-1) * scale
    s, m = prompt_k.shape[1], suffix_k.shape[2]
    visible = jnp.concatenate([
        jnp.broadcast_to(prompt_mask[:, None, None, None, :], prompt_scores.shape),
        jnp.broadcast_to(jnp.arange(m) < length, suffix_scores.shape),
        jnp.ones(self_scores.shape, bool),
    ], axis=-1)
    probs = attention.masked_softmax(scores, visible, dtype)
    p_prompt, p_suffix, p_self = probs[..., :s], probs[..., s:s + m], probs[..., s + m]
    out = (jnp.einsum("bwkgs,bske->bwkge", p_prompt, prompt_v)
           + jnp.einsum("bwkgm,bwmke->bwkge", p_suffix, suffix_v)
           + p_self[..., None] * v_new[:, :, :, None, :])
    return out


def decode_step(params: Params, cfg: Qwen2Config, tokens, cache: KVCache) -> tuple[jax.Array, KVCache]:
    """Feed one token per beam, tokens [b, w]; return the final hidden states [b, w, d] (`vocab_logits` of
    them are the next-token logits) and the extended cache."""
    positions = jnp.broadcast_to((cache.next_position + cache.length)[:, None], tokens.shape)
    cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta, cfg.dtype)
    x = _embed(params, cfg, tokens, _identity_unshard)

    def body(x, xs):
        layer, prompt_k, prompt_v, suffix_k, suffix_v = xs
        attend = functools.partial(_decode_attention, prompt_k=prompt_k, prompt_v=prompt_v,
                                   prompt_mask=cache.prompt_mask, suffix_k=suffix_k, suffix_v=suffix_v,
                                   length=cache.length, dtype=cfg.dtype)
        return _decoder_layer(layer, cfg, x, cos, sin, attend)

    xs = (params["layers"], cache.prompt_k, cache.prompt_v, cache.suffix_k, cache.suffix_v)
    x, (k_new, v_new) = jax.lax.scan(body, x, xs)
    hidden = _final_norm(params, cfg, x, _identity_unshard)
    # Written after the scan so the suffix buffers are updated in place, not re-emitted per layer.
    # (Past max_new_tokens the index clamps to the last slot: size the cache for the whole decode.)
    cache = dataclasses.replace(
        cache,
        suffix_k=jax.lax.dynamic_update_index_in_dim(cache.suffix_k, k_new, cache.length, axis=3),
        suffix_v=jax.lax.dynamic_update_index_in_dim(cache.suffix_v, v_new, cache.length, axis=3),
        length=cache.length + 1,
    )
    return hidden, cache


def reorder_beams(cache: KVCache, parent) -> KVCache:
    """Beam w of prompt b continues beam parent[b, w]: gather the per-beam suffix buffers."""
    index = parent[None, :, :, None, None, None]
    return dataclasses.replace(
        cache,
        suffix_k=jnp.take_along_axis(cache.suffix_k, index, axis=2),
        suffix_v=jnp.take_along_axis(cache.suffix_v, index, axis=2),
    )
