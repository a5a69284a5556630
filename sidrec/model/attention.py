"""Attention over packed rows (training and validation), and the whole-row form everything else uses.

A packed row holds several examples back to back; a query sees the keys of its own segment at or before
it. Computed over whole rows that is a [t, t] score matrix per head, almost all of it masked: rows of
1024 tokens hold examples of ~140 tokens. `packed` cuts the row into blocks of BLOCK queries, and each
block attends only to its own and the `lookback` blocks before it, enough to reach back to the start of
the longest possible segment (`max_segment_len`, known from the data). On a 2-core CPU the forward +
backward of one layer's attention over 3 rows of 1024, examples <= 498 tokens (the Industrial mixture's
longest), took 0.11 s against 0.31 s whole-row (a microbenchmark; `just bench` measures it on the train
bench's own rows). When the lookback spans the whole row (no bound, or rows barely longer than the
longest example) it is one block of the whole row. The visibility is an additive bias built once per batch
(`packed_bias`); `packed` scans the query blocks, with its own VJP (`_block_attention`).

`splash` runs the same visibility through Pallas' TPU splash-attention kernel (flash attention with
segment ids; the causal / local-window mask is static, so it also skips blocks past the lookback). It is
tested here only in Pallas interpret mode on CPU (`splash_interpret`), against `whole_row`.

Einsum letters as in qwen2.py; n is the block index, q / s the query / key position inside a block
(window).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from sidrec.model import vma

# Attention score of a masked key; finite so a fully masked (padding) query row stays NaN-free.
MASKED_SCORE = float(np.finfo(np.float32).min) / 2
# Query rows per block in `packed`: 32, 64 and 128 measured within 10% of each other (CPU, rows of
# 1024); 64 wastes the least of the lookback window at the block edges.
BLOCK = 64
IMPLEMENTATIONS = ("xla", "splash", "splash_interpret")


def visibility(segment_ids: jax.Array) -> jax.Array:
    """[b, t, s] bool: same non-zero segment and key not after query (packed causal attention)."""
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    real = (segment_ids != 0)[:, :, None]
    t = segment_ids.shape[1]
    causal = jnp.arange(t)[:, None] >= jnp.arange(t)[None, :]
    return same & real & causal


def masked_softmax(scores: jax.Array, visible: jax.Array, dtype) -> jax.Array:
    scores = jnp.where(visible, scores, MASKED_SCORE)
    return jax.nn.softmax(scores, axis=-1).astype(dtype)


def whole_row(q, k, v, *, visible, dtype) -> jax.Array:
    """q [b,t,k,g,e], k/v [b,s,k,e], visible [b,t,s] -> [b,t,k,g,e]."""
    scale = q.shape[-1] ** -0.5
    scores = jnp.einsum("btkge,bske->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    probs = masked_softmax(scores, visible[:, None, None], dtype)
    return jnp.einsum("bkgts,bske->btkge", probs, v)


def lookback_blocks(seq_len: int, max_segment_len: int | None) -> int | None:
    """Blocks before its own that a query block of `packed` sees to reach its segments' starts; None when
    `packed` runs whole rows instead: rows not a multiple of BLOCK, or a reach spanning every block (the
    blocks would only add their windows' copies: measured 7% slower on office-cpu's rows of 512)."""
    all_before = seq_len // BLOCK - 1
    if seq_len % BLOCK or max_segment_len is None or math.ceil((max_segment_len - 1) / BLOCK) >= all_before:
        return None
    return math.ceil((max_segment_len - 1) / BLOCK)


def keys_per_query(seq_len: int, max_segment_len: int | None, implementation: str = "xla") -> float:
    """Keys one query's scores are computed against (for executed-FLOP counts), on average.

    xla (`packed`): the lookback window, BLOCK-padded at the row's start, or the whole row. splash: the
    kernel's blocks at or below the diagonal within the lookback.
    """
    if implementation == "xla":
        lookback = lookback_blocks(seq_len, max_segment_len)
        return float(seq_len if lookback is None else (lookback + 1) * BLOCK)
    block = splash_block(seq_len) or BLOCK
    reach = seq_len if max_segment_len is None else max_segment_len - 1
    first = np.maximum(0, (np.arange(seq_len // block) * block - reach) // block)
    return float(np.mean(np.arange(seq_len // block) - first + 1) * block)


def _windows(x: jax.Array, block: int, lookback: int, fill, axis: int = 1) -> jax.Array:
    """x with n*block tokens on `axis` -> n blocks on `axis`, each (lookback+1)*block tokens on axis+1:
    block i with the `lookback` before it (`fill` before the row's start)."""
    n = x.shape[axis] // block
    blocks = x.reshape(*x.shape[:axis], n, block, *x.shape[axis + 1:])
    padding = [(0, 0)] * blocks.ndim
    padding[axis] = (lookback, 0)
    padded = jnp.pad(blocks, padding, constant_values=fill)
    return jnp.concatenate([jax.lax.slice_in_dim(padded, j, j + n, axis=axis) for j in range(lookback + 1)],
                           axis=axis + 1)


def packed_bias(segment_ids: jax.Array, max_segment_len: int | None) -> jax.Array:
    """fp32 [n, b, 1, Q, 1, S]: 0 where query q of block n sees key s of its window, MASKED_SCORE elsewhere
    (`visibility` cut into blocks). Blocks of Q = BLOCK queries with S = (lookback + 1) * BLOCK keys, or
    one block of the whole row where `lookback_blocks` says None. Built once per batch, outside the
    layer scan: every layer adds the same bias.

    The unit axes stand for the kv heads and the query heads of a group, so a block's bias adds to its
    scores [b, k, Q, g, S] without a rank-changing broadcast: XLA hoisted that broadcast out of the
    layer scan as a stacked copy of the whole bias (11.8 MB at the train bench's largest configuration).
    Built block-major from block-major segment ids, so no transposed copy of it is written either. (Step
    time: no change measurable on a 2-core CPU; the memory is what it saves.)"""
    b, t = segment_ids.shape
    lookback = lookback_blocks(t, max_segment_len)
    block, lookback = (t, 0) if lookback is None else (BLOCK, lookback)

    def block_major(x, fill):  # [b, t] -> queries [n, b, 1, Q, 1, 1], key windows [n, b, 1, 1, 1, S]
        queries = jnp.moveaxis(x.reshape(b, t // block, block), 1, 0)
        keys = jnp.moveaxis(_windows(x, block, lookback, fill), 1, 0)
        return queries[:, :, None, :, None, None], keys[:, :, None, None, None, :]

    query_segment, key_segment = block_major(segment_ids, -1)
    query_index, key_index = block_major(jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)), 0)
    visible = (query_segment == key_segment) & (query_segment != 0) & (query_index >= key_index)
    return jnp.where(visible, 0.0, MASKED_SCORE).astype(jnp.float32)


def packed(q, k, v, *, bias: jax.Array, dtype) -> jax.Array:
    """`whole_row` with `visibility(segment_ids)`, block by block over the lookback window, for
    bias = `packed_bias(segment_ids, ...)`.

    q [b,t,k,g,e], k/v [b,t,k,e] -> [b,t,k,g,e]. Equal to whole_row at every real (non-zero segment)
    query. A padding query sees every key of its window with equal weight here (all of its bias is
    MASKED_SCORE); nothing reads padding outputs (the loader puts no loss targets there), so nothing
    flows back through them either.
    Computed block-major and head-major ([n, b, k, Q*g, e]: a kv head's g query heads are one matmul's
    rows), with a hand-written VJP (`_block_attention`).
    """
    b, t, K, G, E = q.shape
    n, block = bias.shape[0], bias.shape[-3]
    queries = jnp.transpose(q.reshape(b, n, block, K, G, E), (1, 0, 3, 2, 4, 5)).reshape(n, b, K, block * G, E)
    keys, values = (jnp.transpose(x, (0, 2, 1, 3)) for x in (k, v))
    out = _block_attention(queries, keys, values, bias, dtype)
    return jnp.transpose(out.reshape(n, b, K, block, G, E), (1, 0, 3, 2, 4, 5)).reshape(b, t, K, G, E)


def _padded(keys, bias):
    """keys (or values) [b,k,t,e] with S - Q zeros before the row's start: [b,k,S - Q + t,e]."""
    block, window = bias.shape[-3], bias.shape[-1]
    return jnp.pad(keys, ((0, 0), (0, 0), (window - block, 0), (0, 0)))


def _key_window(padded, bias, index):
    """[b,k,S,e]: the keys (or values), `_padded`, that query block `index` sees."""
    block, window = bias.shape[-3], bias.shape[-1]
    return jax.lax.dynamic_slice_in_dim(padded, index * block, window, axis=2)


def _block_scores(queries, keys, bias):
    """fp32 [b,k,Q*g,S]: one block's scaled scores plus its visibility bias [b,1,Q,1,S]."""
    b, K, rows, E = queries.shape
    block, window = bias.shape[-3], bias.shape[-1]
    scores = jnp.einsum("bkme,bkse->bkms", queries, keys, preferred_element_type=jnp.float32) * E ** -0.5
    return (scores.reshape(b, K, block, rows // block, window) + bias).reshape(b, K, rows, window)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _block_attention(queries, keys, values, bias, dtype):
    """softmax(queries keys^T / sqrt(e) + bias) values, one query block at a time: queries [n,b,k,Q*g,e],
    keys/values [b,k,t,e], bias [n,b,1,Q,1,S] -> [n,b,k,Q*g,e].

    A scan over the n query blocks, each slicing its window of S keys, so no [.., Q*g, S] array
    bigger than one block's is ever written. Saving every block's probabilities for the backward (with
    keys and values copied into overlapping windows), stacked over the layers, was most of the step's
    memory traffic on CPU, on fresh pages every step: at the train bench's largest configuration
    (2-core AVX-512 EPYC) this form takes the step from 0.65-0.67 s to 0.55-0.60 s, page faults from
    133k to 61k a step. Building each block's mask inside the scan instead of reading the bias
    measured 4-8% slower. The backward recomputes the probabilities from the saved row
    log-normalisers, FlashAttention's arithmetic: the softmax backward's row term from sum(dO * O)
    over e instead of sum(dP * P) over the window, and no mask (masked probabilities are exactly 0,
    so are their score gradients).
    """
    return _block_attention_forward(queries, keys, values, bias, dtype)[0]


def _block_attention_forward(queries, keys, values, bias, dtype):
    padded_keys, padded_values = _padded(keys, bias), _padded(values, bias)

    def one_block(_, xs):
        index, block_queries, block_bias = xs
        scores = _block_scores(block_queries, _key_window(padded_keys, bias, index), block_bias)
        top = jnp.max(scores, axis=-1, keepdims=True)
        unnormalised = jnp.exp(scores - top)
        total = jnp.sum(unnormalised, axis=-1, keepdims=True)
        probs = (unnormalised / total).astype(dtype)
        out = jnp.einsum("bkms,bkse->bkme", probs, _key_window(padded_values, bias, index))
        return None, (out, top + jnp.log(total))

    _, (out, log_normaliser) = jax.lax.scan(one_block, None, (jnp.arange(bias.shape[0]), queries, bias))
    return out, (queries, keys, values, bias, out, log_normaliser)


def _block_attention_backward(dtype, residuals, out_grad):
    queries, keys, values, bias, out, log_normaliser = residuals
    f32 = jnp.float32
    block, window = bias.shape[-3], bias.shape[-1]
    row_term = jnp.sum(out_grad.astype(f32) * out.astype(f32), axis=-1, keepdims=True)
    padded_keys, padded_values = _padded(keys, bias), _padded(values, bias)

    def add_window(total, window_grad, index):
        """total (`_padded` like the keys) with window_grad [b,k,S,e] added at block index's window."""
        current = _key_window(total, bias, index)
        return jax.lax.dynamic_update_slice_in_dim(total, current + window_grad, index * block, axis=2)

    def one_block(carry, xs):
        keys_grad, values_grad = carry
        index, block_queries, block_bias, block_out_grad, block_log_normaliser, block_row_term = xs
        key_window, value_window = _key_window(padded_keys, bias, index), _key_window(padded_values, bias, index)
        scores = _block_scores(block_queries, key_window, block_bias)
        probs = jnp.exp(scores - block_log_normaliser).astype(dtype)
        probs_grad = jnp.einsum("bkme,bkse->bkms", block_out_grad, value_window, preferred_element_type=f32)
        scores_grad = (probs * (probs_grad - block_row_term) * queries.shape[-1] ** -0.5).astype(dtype)
        queries_grad = jnp.einsum("bkms,bkse->bkme", scores_grad, key_window)
        keys_grad = add_window(keys_grad, jnp.einsum("bkms,bkme->bkse", scores_grad, block_queries,
                                                     preferred_element_type=f32), index)
        values_grad = add_window(values_grad, jnp.einsum("bkms,bkme->bkse", probs, block_out_grad,
                                                         preferred_element_type=f32), index)
        return (keys_grad, values_grad), queries_grad

    zeros = jnp.zeros(padded_keys.shape, f32)
    init = tuple(vma.varying_like(zeros, x, queries, out_grad) for x in (keys, values))
    xs = (jnp.arange(bias.shape[0]), queries, bias, out_grad, log_normaliser, row_term)
    (keys_grad, values_grad), queries_grad = jax.lax.scan(one_block, init, xs)
    keys_grad, values_grad = (x[:, :, window - block:].astype(like.dtype) for x, like in
                              ((keys_grad, keys), (values_grad, values)))
    return queries_grad, keys_grad, values_grad, None


_block_attention.defvjp(_block_attention_forward, _block_attention_backward)


# ----------------------------------------------------------------------------------------------------
# TPU: Pallas splash attention


def splash_block(seq_len: int) -> int | None:
    """The kernel's block size for rows of seq_len (None: rows must be a multiple of 128)."""
    return next((size for size in (512, 256, 128) if seq_len % size == 0), None)


@functools.cache
def _splash_kernel(seq_len: int, heads_per_kv: int, max_segment_len: int | None, interpret: bool):
    # Imported here: the Pallas TPU modules are not needed (or loaded) by the default path.
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as kernel_lib,
        splash_attention_mask as mask_lib,
    )

    block = splash_block(seq_len)
    if block is None:
        raise ValueError(f"splash attention needs rows that are a multiple of 128 tokens, got {seq_len}")
    shape = (seq_len, seq_len)
    if max_segment_len is None or max_segment_len >= seq_len:
        mask = mask_lib.CausalMask(shape)
    else:  # causal and at most max_segment_len - 1 keys back: blocks beyond it are skipped
        mask = mask_lib.LocalMask(shape, window_size=(max_segment_len - 1, 0), offset=0)
    sizes = kernel_lib.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                                  block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block,
                                  block_kv_dq=block)
    # One kv head and its group of query heads: grouped-query attention is this kernel vmapped over kv heads.
    return kernel_lib.make_splash_mqa_single_device(mask_lib.MultiHeadMask([mask] * heads_per_kv),
                                                    block_sizes=sizes, interpret=interpret)


def splash(q, k, v, *, segment_ids, max_segment_len: int | None, interpret: bool = False) -> jax.Array:
    """`packed` through the splash-attention kernel: q [b,t,k,g,e], k/v [b,t,k,e] -> [b,t,k,g,e].

    Padding tokens (segment 0) attend among themselves here instead of to nothing: real queries never
    see them in either, and padding outputs are never read.
    """
    from jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel import SegmentIds

    b, t, K, G, E = q.shape
    kernel = _splash_kernel(t, G, max_segment_len, interpret)
    q = jnp.transpose(q * jnp.asarray(E ** -0.5, q.dtype), (0, 2, 3, 1, 4))  # [b, k, g, t, e]: the kernel does not scale
    k, v = jnp.transpose(k, (0, 2, 1, 3)), jnp.transpose(v, (0, 2, 1, 3))   # [b, k, t, e]

    def one_row(q, k, v, segments):
        ids = SegmentIds(q=segments, kv=segments)
        return jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=ids))(q, k, v)

    out = jax.vmap(one_row)(q, k, v, segment_ids)  # [b, k, g, t, e]
    return jnp.transpose(out, (0, 3, 1, 2, 4))
