"""Packed-row attention (block-local lookback, Pallas splash in interpret mode) equals whole-row masked
attention at every real query, values and gradients; and the training loss does not depend on the form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sidrec.model import attention, qwen2

B, K, G, E = 2, 2, 2, 16


def packed_segments(rng, rows: int, seq_len: int, max_len: int) -> np.ndarray:
    """Segment ids of rows packed with examples of 1..max_len tokens, some padding at each row's end.

    Each row opens with examples filling BLOCK - 1 tokens and then a max_len one: that one starts on a
    block's last token, so its last query needs the full lookback (one block less misses its first key)."""
    whole, rest = divmod(attention.BLOCK - 1, max_len)
    opening = [max_len] * whole + ([rest] if rest else []) + [max_len]
    ids = np.zeros((rows, seq_len), np.int32)
    for r in range(rows):
        start, segment = 0, 1
        lengths = list(opening)
        while True:
            length = lengths.pop(0) if lengths else int(rng.integers(1, max_len + 1))
            if start + length > seq_len - 7:
                break
            ids[r, start:start + length] = segment
            start, segment = start + length, segment + 1
    return ids


def qkv(rng, seq_len, dtype=jnp.float32):
    q = rng.normal(size=(B, seq_len, K, G, E))
    k, v = rng.normal(size=(2, B, seq_len, K, E))
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def reference(q, k, v, segment_ids):
    return attention.whole_row(q, k, v, visible=attention.visibility(segment_ids), dtype=q.dtype)


def assert_equals_reference(fn, q, k, v, segment_ids, tol):
    """fn(q, k, v) equals `reference` at every real query: values, a weighted loss and its gradients."""
    real = np.asarray(segment_ids != 0)
    np.testing.assert_allclose(np.asarray(fn(q, k, v))[real], np.asarray(reference(q, k, v, segment_ids))[real],
                               atol=tol, rtol=tol)
    weights = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)
    mask = real[:, :, None, None, None]

    def loss_and_grads(f):
        return jax.value_and_grad(lambda q, k, v: jnp.sum(jnp.where(mask, f(q, k, v) * weights, 0.0)),
                                  argnums=(0, 1, 2))(q, k, v)

    (loss, grads), (ref_loss, ref_grads) = loss_and_grads(fn), loss_and_grads(lambda q, k, v: reference(q, k, v,
                                                                                                        segment_ids))
    np.testing.assert_allclose(loss, ref_loss, rtol=tol)
    for ours_grad, ref_grad in zip(grads, ref_grads):
        np.testing.assert_allclose(ours_grad, ref_grad, atol=tol, rtol=tol)


@pytest.mark.parametrize("seq_len, max_len, bound", [(256, 70, 70), (384, 130, 130), (256, 70, None),
                                                     (100, 40, 40)])
def test_packed_equals_whole_row_attention(seq_len, max_len, bound):
    """Lookback of ceil((70-1)/64) = 2 of 3 earlier blocks, 3 of 5, and the whole-row fallbacks: no bound,
    rows not a multiple of the block. fp32 sums in another order: 1e-5."""
    rng = np.random.default_rng(seq_len + max_len)
    segment_ids = jnp.asarray(packed_segments(rng, B, seq_len, max_len))
    q, k, v = qkv(rng, seq_len)
    bias = attention.packed_bias(segment_ids, bound)
    assert_equals_reference(lambda q, k, v: attention.packed(q, k, v, bias=bias, dtype=jnp.float32), q, k, v,
                            segment_ids, tol=1e-5)


def test_packed_in_bf16_stays_within_bf16_rounding_of_the_fp32_reference():
    """The hand-written VJP keeps fp32 where autodiff does (scores, softmax, its row term); in bf16 the
    values and gradients differ from the fp32 reference by bf16 rounding of the inputs and probabilities:
    within 2% of each array's largest entry (measured 0.4-0.7%; autodiff of whole_row in bf16: 0.4-0.5%)."""
    rng = np.random.default_rng(5)
    segment_ids = jnp.asarray(packed_segments(rng, B, 256, 70))
    q, k, v = qkv(rng, 256)
    weights = jnp.asarray(rng.normal(size=q.shape), jnp.float32) * (segment_ids != 0)[:, :, None, None, None]
    bias = attention.packed_bias(segment_ids, 70)

    def loss_and_grads(f, dtype):
        def loss(q, k, v):
            return jnp.sum(f(q.astype(dtype), k.astype(dtype), v.astype(dtype)).astype(jnp.float32) * weights)
        return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)

    ours = loss_and_grads(lambda q, k, v: attention.packed(q, k, v, bias=bias, dtype=q.dtype), jnp.bfloat16)
    ref = loss_and_grads(lambda q, k, v: reference(q, k, v, segment_ids), jnp.float32)
    for got, want in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
        scale = float(jnp.max(jnp.abs(want)))
        assert float(jnp.max(jnp.abs(got - want))) <= 0.02 * scale


def test_a_bound_shorter_than_a_segment_changes_the_result():
    """The lookback really cuts keys: a bound below the longest segment gives different outputs (so the
    trainer must pass the data's longest example, never less)."""
    rng = np.random.default_rng(0)
    segment_ids = jnp.asarray(np.ones((B, 256), np.int32))  # one 256-token segment per row
    q, k, v = qkv(rng, 256)
    exact, cut = (attention.packed(q, k, v, bias=attention.packed_bias(segment_ids, bound), dtype=jnp.float32)
                  for bound in (256, 64))
    assert attention.lookback_blocks(256, 64) == 1 and attention.lookback_blocks(256, 256) is None  # whole rows
    np.testing.assert_allclose(exact[:, :128], cut[:, :128], atol=1e-6)  # within reach of both
    assert float(jnp.max(jnp.abs(exact[:, 128:] - cut[:, 128:]))) > 1e-3


@pytest.mark.parametrize("bound", [None, 100])
def test_splash_kernel_in_interpret_mode_equals_whole_row_attention(bound):
    """The TPU splash-attention path (causal mask, or the local window when bounded), run by Pallas'
    interpreter on CPU: values and gradients at real queries within 2e-5 (fp32, flash-style online
    softmax sums in another order)."""
    rng = np.random.default_rng(7)
    seq_len = 256
    segment_ids = jnp.asarray(packed_segments(rng, B, seq_len, 100))
    q, k, v = qkv(rng, seq_len)
    assert_equals_reference(lambda q, k, v: attention.splash(q, k, v, segment_ids=segment_ids, max_segment_len=bound,
                                                             interpret=True), q, k, v, segment_ids, tol=2e-5)


def test_training_loss_and_gradient_do_not_depend_on_the_attention_form():
    """forward_hidden + cross-entropy of a tiny Qwen2 over packed rows of 256: whole rows (no bound),
    block-local (the data's bound: 1 block back), and splash in interpret mode give one loss and one
    gradient."""
    from sidrec.train import cross_entropy_sum

    rng = np.random.default_rng(3)
    seq_len, vocab_size = 256, 300
    cfg = qwen2.Qwen2Config(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                            head_dim=8, vocab_size=vocab_size, real_vocab_size=vocab_size)
    params = qwen2.init_params(cfg, jax.random.key(0))
    segments = packed_segments(rng, B, seq_len, 40)
    positions = np.zeros_like(segments)
    for r in range(B):
        for s in range(1, segments[r].max() + 1):
            where = np.flatnonzero(segments[r] == s)
            positions[r, where] = np.arange(len(where))
    # Targets over the rows' first two examples: the second one's last tokens need the full lookback.
    targets = np.arange(attention.BLOCK - 4, attention.BLOCK + 44)
    assert (segments[:, targets] != 0).all()
    micro_batch = {
        "tokens": jnp.asarray(rng.integers(0, vocab_size, segments.shape), jnp.int32),
        "segment_ids": jnp.asarray(segments), "positions": jnp.asarray(positions, jnp.int32),
        "loss_pos": jnp.asarray(np.arange(B)[:, None] * seq_len + targets, jnp.int32),  # into the flattened rows
        "loss_tgt": jnp.asarray(rng.integers(0, vocab_size, (B, len(targets))), jnp.int32),
        "loss_w": jnp.ones((B, len(targets)), jnp.float32),
    }

    def value_and_grad(model_cfg, bound):
        return jax.value_and_grad(lambda p: cross_entropy_sum(p, model_cfg, micro_batch, max_segment_len=bound))(params)

    ref_loss, ref_grads = value_and_grad(cfg, None)
    for model_cfg, bound in [(cfg, 40), (qwen2.Qwen2Config(**{**cfg.__dict__, "attention": "splash_interpret"}), 40)]:
        loss, grads = value_and_grad(model_cfg, bound)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4), grads, ref_grads)


def test_unknown_attention_is_a_clear_error():
    with pytest.raises(qwen2.Qwen2ConfigError, match="attention must be one of xla, splash, splash_interpret"):
        qwen2.Qwen2Config(vocab_size=10, real_vocab_size=10, attention="flash")
