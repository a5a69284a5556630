"""Qwen2 decoder as pure functions over a parameter pytree (no module objects).

Numerics follow Hugging Face `Qwen2ForCausalLM`: RMSNorm in fp32 then cast, rotary tables in fp32 then
cast, attention softmax in fp32, grouped-query attention where query head h reads kv head h // G.
Matrices are stored [in, out]. Every parameter is declared once in `param_specs`; the abstract tree,
the initializer and the logical axes (for sharding) are derived from it.

Einsum letters: b batch, t/s time (query/key), d model, h heads, k kv heads, g query heads per kv
head, e head dim, f ffn, v vocab, w beams, m generated (suffix) time, n gathered positions.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sidrec.config import ModelConfig
from sidrec.errors import UserError

# Logit of vocabulary rows that exist only as padding: finite (no NaN in softmax or its gradient)
# and low enough that exp() underflows to exactly 0 next to any real logit.
MASKED_LOGIT = -1e30
# Attention score of a masked key; finite so a fully masked (padding) query row stays NaN-free.
_MASKED_SCORE = float(np.finfo(np.float32).min) / 2

Params = dict[str, Any]
Unshard = Callable[[str, Any], Any]


class Qwen2ConfigError(UserError):
    """An architecture that cannot be built (the message names the fields)."""


@dataclass(frozen=True, kw_only=True)
class Qwen2Config:
    """Static architecture + numerics; hashable, so it can be a static jit argument."""

    vocab_size: int
    """Rows of the embedding / columns of the head (may be padded past real_vocab_size)."""
    real_vocab_size: int
    """Tokens that exist; logits of rows >= this are MASKED_LOGIT."""
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    compute_dtype: str = "float32"
    remat: bool = False
    init_std: float = 0.02
    """Std of the from-scratch normal initializer (HF: initializer_range)."""

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise Qwen2ConfigError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                             f"({self.num_kv_heads})")
        if self.real_vocab_size > self.vocab_size:
            raise Qwen2ConfigError(f"real_vocab_size ({self.real_vocab_size}) exceeds vocab_size "
                             f"({self.vocab_size})")
        if self.compute_dtype not in ("float32", "bfloat16"):
            raise Qwen2ConfigError(f"compute_dtype must be 'float32' or 'bfloat16', got {self.compute_dtype!r}")

    @property
    def dtype(self):
        return jnp.dtype(self.compute_dtype)

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_model_config(cls, model: ModelConfig, vocab_size: int, pad_to_multiple: int = 1) -> Qwen2Config:
        """A from-scratch architecture; rows are padded up to a multiple (e.g. 128 for fast matmuls)."""
        return cls(
            vocab_size=round_up(vocab_size, pad_to_multiple),
            real_vocab_size=vocab_size,
            hidden_size=model.hidden_size,
            intermediate_size=model.intermediate_size,
            num_layers=model.num_layers,
            num_heads=model.num_heads,
            num_kv_heads=model.num_kv_heads,
            head_dim=model.head_dim,
            rope_theta=model.rope_theta,
            rms_norm_eps=model.rms_norm_eps,
            tie_word_embeddings=model.tie_word_embeddings,
            max_position_embeddings=model.max_position_embeddings,
            compute_dtype=model.dtype,
            remat=model.remat,
            init_std=model.init_std,
        )


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


# ----------------------------------------------------------------------------------------------
# Parameter declaration


@dataclass(frozen=True)
class ArrayInfo:
    shape: tuple[int, ...]
    dtype: Any
    logical_axes: tuple[str, ...]
    init: Callable[[jax.Array, tuple[int, ...], Any], jax.Array]


def _normal(std: float):
    return lambda key, shape, dtype: std * jax.random.normal(key, shape, dtype)


def _ones(key, shape, dtype):
    return jnp.ones(shape, dtype)


def _zeros(key, shape, dtype):
    return jnp.zeros(shape, dtype)


def param_specs(cfg: Qwen2Config) -> dict:
    """THE declaration of every parameter: shape, fp32 master dtype, logical axes, initializer."""
    L, D, F, V = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    matrix = _normal(cfg.init_std)

    def info(shape, axes, init):
        return ArrayInfo(tuple(shape), jnp.float32, tuple(axes), init)

    specs = {
        "embed": info((V, D), ("vocab", "embed"), matrix),
        "layers": {
            "attn_norm": info((L, D), ("layers", "embed"), _ones),
            "wq": info((L, D, q_dim), ("layers", "embed", "q_heads"), matrix),
            "bq": info((L, q_dim), ("layers", "q_heads"), _zeros),
            "wk": info((L, D, kv_dim), ("layers", "embed", "kv_heads"), matrix),
            "bk": info((L, kv_dim), ("layers", "kv_heads"), _zeros),
            "wv": info((L, D, kv_dim), ("layers", "embed", "kv_heads"), matrix),
            "bv": info((L, kv_dim), ("layers", "kv_heads"), _zeros),
            "wo": info((L, q_dim, D), ("layers", "q_heads", "embed"), matrix),
            "mlp_norm": info((L, D), ("layers", "embed"), _ones),
            "w_gate": info((L, D, F), ("layers", "embed", "mlp"), matrix),
            "w_up": info((L, D, F), ("layers", "embed", "mlp"), matrix),
            "w_down": info((L, F, D), ("layers", "mlp", "embed"), matrix),
        },
        "final_norm": info((D,), ("embed",), _ones),
    }
    if not cfg.tie_word_embeddings:
        specs["lm_head"] = info((D, V), ("embed", "vocab"), matrix)
    return specs


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
    the full row length T, as computed (packed segments are masked, not skipped).
    """
    n = count_params(cfg)
    if not cfg.tie_word_embeddings:
        n -= cfg.vocab_size * cfg.hidden_size
    attention = 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len
    return 6.0 * n + attention


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
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def _apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [..., heads, e]; cos/sin [..., e] broadcast over the heads axis (HF rotate_half form)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[..., None, :] + rotated * sin[..., None, :]


def _project_qkv(layer: Params, cfg: Qwen2Config, h: jax.Array, cos, sin):
    """h [b, t, d] -> q [b, t, k, g, e], k and v [b, t, k, e], rotary applied to q and k."""
    b, t, _ = h.shape
    q = (jnp.einsum("btd,dh->bth", h, layer["wq"]) + layer["bq"]).reshape(b, t, cfg.num_heads, cfg.head_dim)
    k = (jnp.einsum("btd,dk->btk", h, layer["wk"]) + layer["bk"]).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    v = (jnp.einsum("btd,dk->btk", h, layer["wv"]) + layer["bv"]).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
    q = q.reshape(b, t, cfg.num_kv_heads, cfg.q_per_kv, cfg.head_dim)
    return q, k, v


def _masked_softmax(scores: jax.Array, visible: jax.Array, dtype) -> jax.Array:
    scores = jnp.where(visible, scores, _MASKED_SCORE)
    return jax.nn.softmax(scores, axis=-1).astype(dtype)


def _attend(q, k, v, visible, dtype) -> jax.Array:
    """q [b,t,k,g,e], k/v [b,s,k,e], visible [b,t,s] -> [b,t,k*g*e]; fp32 scores and softmax."""
    scale = q.shape[-1] ** -0.5
    scores = jnp.einsum("btkge,bske->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    probs = _masked_softmax(scores, visible[:, None, None], dtype)
    out = jnp.einsum("bkgts,bske->btkge", probs, v)
    return out.reshape(*out.shape[:2], -1)


def _mlp(layer: Params, cfg: Qwen2Config, x: jax.Array) -> jax.Array:
    h = rms_norm(x, layer["mlp_norm"], cfg.rms_norm_eps)
    gate = jax.nn.silu(jnp.einsum("btd,df->btf", h, layer["w_gate"]))
    up = jnp.einsum("btd,df->btf", h, layer["w_up"])
    return jnp.einsum("btf,fd->btd", gate * up, layer["w_down"])


def _cast(tree, dtype):
    return jax.tree.map(lambda a: a.astype(dtype), tree)


def _decoder_layer(layer: Params, cfg: Qwen2Config, x, cos, sin, visible):
    """One pre-norm block over full sequences; also returns this layer's (k, v) for a cache."""
    with jax.named_scope("attention"):
        h = rms_norm(x, layer["attn_norm"], cfg.rms_norm_eps)
        q, k, v = _project_qkv(layer, cfg, h, cos, sin)
        x = x + jnp.einsum("bth,hd->btd", _attend(q, k, v, visible, x.dtype), layer["wo"])
    with jax.named_scope("mlp"):
        x = x + _mlp(layer, cfg, x)
    return x, (k, v)


def attention_visibility(segment_ids: jax.Array) -> jax.Array:
    """[b, t, s] bool: same non-zero segment and key not after query (packed causal attention)."""
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    real = (segment_ids != 0)[:, :, None]
    t = segment_ids.shape[1]
    causal = jnp.arange(t)[:, None] >= jnp.arange(t)[None, :]
    return same & real & causal


def _embed(params, cfg, tokens, unshard):
    with jax.named_scope("embed"):
        table = unshard("embed", params["embed"])
        return jnp.take(table, tokens, axis=0).astype(cfg.dtype)


def _final_norm(params, cfg, x, unshard):
    with jax.named_scope("final_norm"):
        return rms_norm(x, unshard("final_norm", params["final_norm"]), cfg.rms_norm_eps)


def _run_layers(params, cfg: Qwen2Config, x, positions, visible, unshard, *, keep_kv: bool):
    """Scan the stacked layers; optionally return the stacked (k, v) [L, b, t, k, e] for a cache."""
    cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta, cfg.dtype)

    def body(x, layer):
        with jax.named_scope("layer"):
            layer = _cast(unshard("layer", layer), cfg.dtype)
            x, kv = _decoder_layer(layer, cfg, x, cos, sin, visible)
        return x, (kv if keep_kv else None)

    if cfg.remat:
        # Save only each layer's input: the (all-gathered) weights and activations are recomputed
        # in the backward pass, so FSDP never keeps a gathered copy of every layer alive.
        body = jax.checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable)
    return jax.lax.scan(body, x, params["layers"])


# ----------------------------------------------------------------------------------------------
# Training / scoring forward


def forward_hidden(params: Params, cfg: Qwen2Config, tokens, segment_ids, positions, *,
                   unshard: Unshard | None = None) -> jax.Array:
    """Final-norm hidden states [b, t, d] in the compute dtype.

    tokens, segment_ids, positions: int32 [b, t]. A query sees keys of the same non-zero segment at or
    before its index in the row; positions restart per packed segment (the caller provides them).
    unshard(name, tree) returns the gathered arrays (FSDP hook; None = identity); it is called on
    "embed", on each per-layer slice dict ("layer", inside the scan, leaves without the L axis), on
    "final_norm" (and in logits_at on "lm_head", or "embed" again when tied). It receives the fp32
    master arrays and the cast to the compute dtype follows, so gradients are reduce-scattered in fp32;
    an unshard that casts before gathering trades that for half the all-gather bytes.
    """
    unshard = unshard or _identity_unshard
    x = _embed(params, cfg, tokens, unshard)
    x, _ = _run_layers(params, cfg, x, positions, attention_visibility(segment_ids), unshard, keep_kv=False)
    return _final_norm(params, cfg, x, unshard)


def _head(params, cfg: Qwen2Config, unshard) -> jax.Array:
    """The [d, v] output projection in the compute dtype (embed.T when tied)."""
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


def logits_at(params: Params, cfg: Qwen2Config, hidden, index, *, unshard: Unshard | None = None) -> jax.Array:
    """fp32 logits [b, n, v] at positions index [b, n] of hidden [b, t, d] (the loss needs few)."""
    gathered = jnp.take_along_axis(hidden, index[..., None], axis=1)
    return _vocab_logits(params, cfg, gathered, unshard or _identity_unshard)


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
    """Run left-padded prompts tokens/mask [b, s]; return next-token logits [b, v] (fp32) and a cache.

    Positions of real tokens count from the first real one (cumsum(mask) - 1), as HF generate.
    max_new_tokens bounds how many decode_step calls the cache can take.
    """
    mask = mask.astype(bool)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
    x = _embed(params, cfg, tokens, _identity_unshard)
    x, (k, v) = _run_layers(params, cfg, x, positions, attention_visibility(mask.astype(jnp.int32)),
                            _identity_unshard, keep_kv=True)
    last = _final_norm(params, cfg, x[:, -1], _identity_unshard)
    L, b = cfg.num_layers, tokens.shape[0]
    suffix_shape = (L, b, num_beams, max_new_tokens, cfg.num_kv_heads, cfg.head_dim)
    cache = KVCache(
        prompt_k=k, prompt_v=v, prompt_mask=mask,
        suffix_k=jnp.zeros(suffix_shape, cfg.dtype), suffix_v=jnp.zeros(suffix_shape, cfg.dtype),
        length=jnp.zeros((), jnp.int32), next_position=jnp.sum(mask, axis=1, dtype=jnp.int32),
    )
    return _vocab_logits(params, cfg, last, _identity_unshard), cache


def _decode_attention(q, k_new, v_new, prompt_k, prompt_v, prompt_mask, suffix_k, suffix_v, length, dtype):
    """Attention of one new token per beam over: shared prompt + its beam's earlier suffix + itself.

    q [b,w,k,g,e]; k_new/v_new [b,w,k,e]; prompt_k/v [b,s,k,e]; suffix_k/v [b,w,m,k,e].
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
    probs = _masked_softmax(scores, visible, dtype)
    p_prompt, p_suffix, p_self = probs[..., :s], probs[..., s:s + m], probs[..., s + m]
    out = (jnp.einsum("bwkgs,bske->bwkge", p_prompt, prompt_v)
           + jnp.einsum("bwkgm,bwmke->bwkge", p_suffix, suffix_v)
           + p_self[..., None] * v_new[:, :, :, None, :])
    return out.reshape(*out.shape[:2], -1)


def decode_step(params: Params, cfg: Qwen2Config, tokens, cache: KVCache) -> tuple[jax.Array, KVCache]:
    """Feed one token per beam, tokens [b, w]; return fp32 logits [b, w, v] and the extended cache."""
    positions = jnp.broadcast_to((cache.next_position + cache.length)[:, None], tokens.shape)
    cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta, cfg.dtype)
    x = _embed(params, cfg, tokens, _identity_unshard)

    def body(x, xs):
        layer, prompt_k, prompt_v, suffix_k, suffix_v = xs
        with jax.named_scope("layer"):
            layer = _cast(layer, cfg.dtype)
            with jax.named_scope("attention"):
                h = rms_norm(x, layer["attn_norm"], cfg.rms_norm_eps)
                q, k, v = _project_qkv(layer, cfg, h, cos, sin)
                attended = _decode_attention(q, k, v, prompt_k, prompt_v, cache.prompt_mask,
                                             suffix_k, suffix_v, cache.length, x.dtype)
                x = x + jnp.einsum("bth,hd->btd", attended, layer["wo"])
            with jax.named_scope("mlp"):
                x = x + _mlp(layer, cfg, x)
        return x, (k, v)

    xs = (params["layers"], cache.prompt_k, cache.prompt_v, cache.suffix_k, cache.suffix_v)
    x, (k_new, v_new) = jax.lax.scan(body, x, xs)
    logits = _vocab_logits(params, cfg, _final_norm(params, cfg, x, _identity_unshard), _identity_unshard)
    # Written after the scan so the suffix buffers are updated in place, not re-emitted per layer.
    # (Past max_new_tokens the index clamps to the last slot: size the cache for the whole decode.)
    cache = dataclasses.replace(
        cache,
        suffix_k=jax.lax.dynamic_update_index_in_dim(cache.suffix_k, k_new, cache.length, axis=3),
        suffix_v=jax.lax.dynamic_update_index_in_dim(cache.suffix_v, v_new, cache.length, axis=3),
        length=cache.length + 1,
    )
    return logits, cache


def reorder_beams(cache: KVCache, parent) -> KVCache:
    """Beam w of prompt b continues beam parent[b, w]: gather the per-beam suffix buffers."""
    index = parent[None, :, :, None, None, None]
    return dataclasses.replace(
        cache,
        suffix_k=jnp.take_along_axis(cache.suffix_k, index, axis=2),
        suffix_v=jnp.take_along_axis(cache.suffix_v, index, axis=2),
    )
