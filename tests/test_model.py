"""sidrec.model.qwen2 against transformers' Qwen2ForCausalLM (committed fixtures) and against itself
(cached vs full, packed vs separate, beams vs independent)."""

from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path

import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np
import pytest

from sidrec.config import ModelConfig
from sidrec.model import attention, hf, qwen2

FIXTURES = Path(__file__).parent / "fixtures" / "model"
NAMES = ("tied", "untied")

# fp32 against transformers fp32 (eager attention): both accumulate in fp32 but in different orders;
# measured max |diff| is ~1e-5 on logits of std ~2.5, the bar is 1e-4.
FP32_TOL = 1e-4
# Our own fp32 paths computing the same thing in different shapes (cache vs full, packed vs alone).
SELF_TOL = 2e-5

forward = jax.jit(qwen2.forward, static_argnums=1)


@partial(jax.jit, static_argnums=1, static_argnames=("num_beams", "max_new_tokens"))
def prefill(params, cfg, tokens, mask, **sizes):
    """qwen2.prefill with its hidden state turned into next-token logits."""
    hidden, cache = qwen2.prefill(params, cfg, tokens, mask, **sizes)
    return qwen2.vocab_logits(params, cfg, hidden), cache


@partial(jax.jit, static_argnums=1)
def decode_step(params, cfg, tokens, cache):
    hidden, cache = qwen2.decode_step(params, cfg, tokens, cache)
    return qwen2.vocab_logits(params, cfg, hidden), cache

reorder_beams = jax.jit(qwen2.reorder_beams)


def load_fixture(name: str, **overrides):
    params, cfg = hf.load_model(FIXTURES / name)
    reference = dict(np.load(FIXTURES / name / "reference.npz"))
    return params, dataclasses.replace(cfg, **overrides), reference


def left_padded_positions(mask):
    return np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)


def full_logits(params, cfg, tokens, mask):
    """Uncached reference path: one forward over left-padded rows (segment 1 = real, 0 = padding)."""
    return np.asarray(forward(params, cfg, tokens, mask, left_padded_positions(mask)))


@pytest.mark.parametrize("name", NAMES)
def test_forward_matches_transformers(name):
    params, cfg, ref = load_fixture(name)
    logits = full_logits(params, cfg, ref["tokens"], ref["mask"])
    real = ref["mask"] == 1
    assert np.abs(logits - ref["logits"])[real].max() <= FP32_TOL
    assert ref["logits"][real].std() > 1.0  # the comparison is not between near-constant logits


@pytest.mark.parametrize("name", NAMES)
def test_cached_decoding_matches_transformers_and_full_forward(name):
    params, cfg, ref = load_fixture(name)
    steps = ref["decode_tokens"].shape[1]
    logits, cache = prefill(params, cfg, ref["tokens"], ref["mask"], max_new_tokens=steps)
    cached = [logits]
    for i in range(steps):
        logits, cache = decode_step(params, cfg, ref["decode_tokens"][:, i:i + 1], cache)
        cached.append(logits[:, 0])
    cached = np.stack(cached, axis=1)
    assert np.abs(cached - ref["decode_logits"]).max() <= FP32_TOL

    tokens = np.concatenate([ref["tokens"], ref["decode_tokens"]], axis=1)
    mask = np.concatenate([ref["mask"], np.ones_like(ref["decode_tokens"])], axis=1)
    uncached = full_logits(params, cfg, tokens, mask)[:, -steps - 1:]
    assert np.abs(cached - uncached).max() <= SELF_TOL


def test_packed_rows_equal_separately_run_sequences():
    params, cfg, _ = load_fixture("untied")
    rng = np.random.default_rng(0)
    lengths = (4, 6, 3)
    seqs = [rng.integers(0, cfg.real_vocab_size, n).astype(np.int32) for n in lengths]
    row_len = sum(lengths) + 2  # two trailing padding slots (segment 0)
    tokens = np.zeros((1, row_len), np.int32)
    segments = np.zeros((1, row_len), np.int32)
    positions = np.zeros((1, row_len), np.int32)
    start = 0
    for segment, seq in enumerate(seqs, start=1):
        span = slice(start, start + len(seq))
        tokens[0, span], segments[0, span], positions[0, span] = seq, segment, np.arange(len(seq))
        start += len(seq)
    packed = np.asarray(forward(params, cfg, tokens, segments, positions))[0]
    assert np.isfinite(packed).all()  # padding rows see no key at all and must not produce NaN
    # Each sequence alone in its own row, right-padded (trailing padding cannot change causal logits).
    alone_tokens = np.stack([np.pad(seq, (0, max(lengths) - len(seq))) for seq in seqs])
    alone_mask = (np.arange(max(lengths)) < np.array(lengths)[:, None]).astype(np.int32)
    alone = full_logits(params, cfg, alone_tokens, alone_mask)
    starts = np.cumsum((0,) + lengths[:-1])
    for row, (start, n) in enumerate(zip(starts, lengths)):
        assert np.abs(packed[start:start + n] - alone[row, :n]).max() <= SELF_TOL


def test_logits_at_equals_forward_gathered():
    params, cfg, ref = load_fixture("tied")
    tokens, mask = ref["tokens"], ref["mask"]
    positions = left_padded_positions(mask)
    index = np.array([[9, 0, 4], [3, 9, 7], [6, 8, 9]], np.int32)
    hidden = qwen2.forward_hidden(params, cfg, tokens, mask, positions)
    gathered = qwen2.logits_at(params, cfg, hidden, index)
    full = np.asarray(qwen2.forward(params, cfg, tokens, mask, positions))
    assert gathered.shape == (3, 3, cfg.vocab_size) and gathered.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(gathered), np.take_along_axis(full, index[..., None], axis=1))


@pytest.mark.parametrize("name", NAMES)
def test_cross_entropy_at_and_its_parameter_gradients_equal_the_materialised_loss(name):
    # The training loss: chunked cross-entropy with its own VJP vs autodiff through the full logits,
    # over the whole model (tied: the head is the input embedding, so both gradients meet there).
    params, cfg, ref = load_fixture(name)
    tokens, mask = ref["tokens"], ref["mask"]
    positions = left_padded_positions(mask)
    index = np.array([[9, 0, 4], [3, 9, 7], [6, 8, 9]], np.int32)
    targets = np.array([[1, 5, 17], [cfg.real_vocab_size - 1, 0, 3], [2, 2, 9]], np.int32)

    def materialised(params):
        hidden = qwen2.forward_hidden(params, cfg, tokens, mask, positions)
        logits = qwen2.logits_at(params, cfg, hidden, index)
        picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        return jnp.sum(jax.nn.logsumexp(logits, axis=-1) - picked)

    def chunked(params):
        hidden = qwen2.forward_hidden(params, cfg, tokens, mask, positions)
        flat_index = np.arange(len(index))[:, None] * hidden.shape[1] + index  # into the rows flattened
        return jnp.sum(qwen2.cross_entropy_at(params, cfg, hidden, flat_index, targets))

    want, want_grads = jax.jit(jax.value_and_grad(materialised))(params)
    got, grads = jax.jit(jax.value_and_grad(chunked))(params)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(want_grads)):
        # fp32, the same sums in another order: relative to each gradient's own scale.
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-5 * max(1.0, float(np.abs(w).max())),
                                   err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 2e-6), (jnp.bfloat16, 2e-2)])
def test_swiglu_vjp_equals_autodiff_of_the_formula(dtype, tol):
    # The MLP's hand-written VJP against autodiff of HF's formula; fp32: the same sums in another
    # order (relative to each gradient's scale); bf16: a few bf16 roundings (eps 7.8e-3).
    keys = jax.random.split(jax.random.key(0), 5)
    h = jax.random.normal(keys[0], (2, 24, 16)).astype(dtype)
    w_gate, w_up = ((0.3 * jax.random.normal(key, (16, 40))).astype(dtype) for key in keys[1:3])
    w_down = (0.3 * jax.random.normal(keys[3], (40, 16))).astype(dtype)
    weights = jax.random.normal(keys[4], (2, 24, 16))

    def formula(h, w_gate, w_up, w_down):
        return (jax.nn.silu(h @ w_gate) * (h @ w_up)) @ w_down

    def grads(mlp):
        loss = lambda *args: jnp.sum(mlp(*args).astype(jnp.float32) * weights)  # noqa: E731
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(h, w_gate, w_up, w_down)

    np.testing.assert_allclose(np.asarray(qwen2.swiglu(h, w_gate, w_up, w_down), np.float32),
                               np.asarray(formula(h, w_gate, w_up, w_down), np.float32), rtol=0, atol=tol * 4)
    for got, want in zip(grads(qwen2.swiglu), grads(formula)):
        assert got.dtype == want.dtype == dtype
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        np.testing.assert_allclose(got, want, rtol=0, atol=tol * np.abs(want).max())


def test_beam_decoding_with_reorder_equals_independent_sequences():
    """Random parents and tokens at every step: each beam's logits must equal a full forward over
    prompt + that beam's own history, so the shared prompt cache and the suffix gather are right."""
    params, cfg, ref = load_fixture("untied")  # 3 query heads per kv head
    tokens, mask = ref["tokens"], ref["mask"]
    batch, beams, steps = tokens.shape[0], 3, 4
    rng = np.random.default_rng(1)
    logits, cache = prefill(params, cfg, tokens, mask, num_beams=beams, max_new_tokens=steps)
    history = np.zeros((batch, beams, 0), np.int32)
    for step in range(steps):
        if step:
            parent = rng.integers(0, beams, (batch, beams)).astype(np.int32)
            cache = reorder_beams(cache, parent)
            history = np.take_along_axis(history, parent[..., None], axis=1)
        new = rng.integers(0, cfg.real_vocab_size, (batch, beams)).astype(np.int32)
        history = np.concatenate([history, new[..., None]], axis=2)
        logits, cache = decode_step(params, cfg, new, cache)
        # Every beam as its own row: prompt + history, right-padded to one length (one compile;
        # trailing padding cannot change earlier logits under causal attention).
        rows = np.concatenate([np.repeat(tokens, beams, axis=0), history.reshape(batch * beams, -1)], axis=1)
        rows_mask = np.concatenate([np.repeat(mask, beams, axis=0), np.ones_like(rows[:, tokens.shape[1]:])], axis=1)
        trailing = steps - step - 1
        expected = full_logits(params, cfg, np.pad(rows, ((0, 0), (0, trailing))),
                               np.pad(rows_mask, ((0, 0), (0, trailing))))[:, rows.shape[1] - 1]
        assert np.abs(np.asarray(logits).reshape(batch * beams, -1) - expected).max() <= SELF_TOL, step


def test_bfloat16_compute_is_close_to_float32():
    params, cfg, ref = load_fixture("tied")
    real = ref["mask"] == 1
    exact = full_logits(params, cfg, ref["tokens"], ref["mask"])[real]
    bf16_cfg = dataclasses.replace(cfg, compute_dtype="bfloat16")
    approx = full_logits(params, bf16_cfg, ref["tokens"], ref["mask"])[real]
    assert approx.dtype == np.float32
    # bf16 keeps ~3 significant digits through 2 layers: measured max |diff| 0.16 on logits of
    # std ~2.5; allow 0.25, and the ranking of the vocabulary must stay nearly the same.
    assert np.abs(approx - exact).max() <= 0.25
    assert np.mean(approx.argmax(-1) == exact.argmax(-1)) >= 0.9
    hidden = jax.eval_shape(partial(qwen2.forward_hidden, cfg=bf16_cfg), params, tokens=ref["tokens"],
                            segment_ids=ref["mask"], positions=ref["mask"])
    assert hidden.dtype == jnp.bfloat16
    _, cache = jax.eval_shape(partial(qwen2.prefill, cfg=bf16_cfg, max_new_tokens=1), params,
                              tokens=ref["tokens"], mask=ref["mask"])
    assert cache.prompt_k.dtype == cache.suffix_k.dtype == jnp.bfloat16


def test_padded_vocabulary_rows_are_masked():
    params, cfg, ref = load_fixture("untied")
    pad = 12
    padded = dict(params, embed=jnp.pad(params["embed"], ((0, pad), (0, 0)), constant_values=5.0),
                  lm_head=jnp.pad(params["lm_head"], ((0, 0), (0, pad)), constant_values=5.0))
    padded_cfg = dataclasses.replace(cfg, vocab_size=cfg.vocab_size + pad)
    logits = full_logits(padded, padded_cfg, ref["tokens"], ref["mask"])
    base = full_logits(params, cfg, ref["tokens"], ref["mask"])
    np.testing.assert_allclose(logits[..., :cfg.vocab_size], base, rtol=0, atol=1e-6)
    assert (logits[..., cfg.vocab_size:] == qwen2.MASKED_LOGIT).all()
    probs = jax.nn.softmax(logits, axis=-1)
    assert (probs[..., cfg.vocab_size:] == 0).all()


def test_unshard_hook_sees_named_unstacked_slices():
    params, cfg, ref = load_fixture("untied")
    calls = []

    def unshard(name, tree):
        calls.append((name, jax.tree.map(lambda a: a.shape, tree)))
        return tree

    positions = left_padded_positions(ref["mask"])
    hidden = qwen2.forward_hidden(params, cfg, ref["tokens"], ref["mask"], positions, unshard=unshard)
    qwen2.logits_at(params, cfg, hidden, np.zeros((3, 1), np.int32), unshard=unshard)
    names = [name for name, _ in calls]
    assert names == ["embed", "layers", "final_norm", "lm_head"]  # the scan body is traced once
    layer_shapes = calls[1][1]
    assert layer_shapes["wq"] == params["layers"]["wq"].shape[1:]
    assert layer_shapes["attn_norm"] == (cfg.hidden_size,)


def test_remat_gives_the_same_gradients():
    params, cfg, ref = load_fixture("tied")
    positions = left_padded_positions(ref["mask"])

    def loss(params, cfg):
        hidden = qwen2.forward_hidden(params, cfg, ref["tokens"], ref["mask"], positions)
        logits = qwen2.logits_at(params, cfg, hidden, np.full((3, 2), 9, np.int32))
        return jax.nn.logsumexp(logits, axis=-1).sum()

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    plain = grad(params, cfg)
    remat = grad(params, dataclasses.replace(cfg, remat=True))
    # Same math, differently fused programs: fp32 reassociation only (measured max |diff| ~1e-5).
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(remat)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=3e-5)
    assert float(jnp.abs(plain["layers"]["wq"]).max()) > 0


def test_remat_does_not_save_gathered_weights(capsys):
    """With remat, the backward keeps only each layer's input; without it, the gathered (here: scaled)
    per-layer weights are saved residuals. Traced only, nothing compiled."""
    params, cfg, ref = load_fixture("tied")
    fake_gather = lambda name, tree: jax.tree.map(lambda a: a * 1.5, tree)
    weight_shapes = {"f32[" + ",".join(map(str, w.shape)) + "]" for w in jax.tree.leaves(params["layers"])
                     if w.ndim == 3}

    def saved_weight_copies(remat):
        c = dataclasses.replace(cfg, remat=remat)
        jax.ad_checkpoint.print_saved_residuals(
            lambda p: qwen2.forward_hidden(p, c, ref["tokens"], ref["mask"], ref["mask"], unshard=fake_gather).sum(),
            params)
        lines = capsys.readouterr().out.splitlines()
        return [line for line in lines if line.split(" ")[0] in weight_shapes and "from the argument" not in line]

    assert saved_weight_copies(remat=False)  # the check can see a saved gathered weight
    assert not saved_weight_copies(remat=True)


def test_param_declaration_drives_init_abstract_and_axes():
    model = ModelConfig(hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4, num_kv_heads=2,
                        head_dim=8, tie_word_embeddings=False, init_std=0.05)
    cfg = qwen2.Qwen2Config.build(model, vocab_size=100, pad_to_multiple=64)
    assert (cfg.vocab_size, cfg.real_vocab_size) == (128, 100)
    params = jax.jit(qwen2.init_params, static_argnums=0)(cfg, jax.random.key(0))
    abstract = qwen2.abstract_params(cfg)
    axes = jax.tree.map(lambda i: i.logical_axes, qwen2.param_specs(cfg), is_leaf=lambda x: hasattr(x, "role"))
    assert jax.tree.structure(params) == jax.tree.structure(abstract)
    for leaf, spec, axis_names in zip(jax.tree.leaves(params), jax.tree.leaves(abstract),
                                      jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))):
        assert leaf.shape == spec.shape and leaf.dtype == spec.dtype == jnp.float32
        assert len(axis_names) == leaf.ndim
    assert params["layers"]["wq"].shape == (3, 32, 32) and params["layers"]["wk"].shape == (3, 32, 16)
    assert axes["layers"]["w_down"] == ("layers", "mlp", "embed")
    assert (params["layers"]["mlp_norm"] == 1).all() and (params["layers"]["bv"] == 0).all()
    assert abs(float(params["lm_head"].std()) - 0.05) < 0.005
    assert qwen2.count_params(cfg) == sum(x.size for x in jax.tree.leaves(params))
    tied = dataclasses.replace(cfg, tie_word_embeddings=True)
    assert "lm_head" not in qwen2.abstract_params(tied)


def test_flops_per_token_counts_matmul_params_and_attention():
    cfg = qwen2.Qwen2Config(vocab_size=1000, real_vocab_size=1000, hidden_size=64, intermediate_size=128,
                            num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, tie_word_embeddings=False)
    per_layer = 64 * 64 + 64 + 2 * (64 * 32 + 32) + 64 * 64 + 3 * 64 * 128 + 2 * 64
    matmul_params = 2 * per_layer + 64 + 64 * 1000  # + final norm + head; the input table is a gather
    assert qwen2.flops_per_token(cfg, 256) == 6 * matmul_params + 12 * 2 * 4 * 16 * 256
    tied = dataclasses.replace(cfg, tie_word_embeddings=True)
    assert qwen2.flops_per_token(tied, 256) == qwen2.flops_per_token(cfg, 256)


def test_decode_compiles_once_per_shape():
    params, cfg, ref = load_fixture("tied")
    step = jax.jit(partial(qwen2.decode_step, cfg=cfg))
    _, cache = prefill(params, cfg, ref["tokens"], ref["mask"], num_beams=2, max_new_tokens=3)
    for i in range(3):
        _, cache = step(params, tokens=np.full((3, 2), i, np.int32), cache=cache)
    assert step._cache_size() == 1
    assert int(cache.length) == 3


def test_executed_train_flops_counts_every_slot_and_the_head_at_targets_only():
    cfg = qwen2.Qwen2Config(vocab_size=1024, real_vocab_size=1000, hidden_size=64, intermediate_size=128,
                            num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)
    layer_matmul = 2 * 64 * (64 + 32 + 32 + 64 + 3 * 128)  # q, k, v, o, gate/up/down; two layers
    assert qwen2.layer_matmul_params(cfg) == layer_matmul
    score_matmul = 2 * 2 * 4 * 16 * 256  # q.k (or p.v) of one slot over 256 keys: two layers, 4 heads of 16
    head_per_target = 4 * 2 * 64 * 1000  # 4 forwards: logits, recomputed logits, two gradients; real vocab only
    # Attention: forward 2 score matmuls, backward 5 (the scores recomputed, then 4 gradients).
    expected = 512 * (3 * 2 * layer_matmul + 7 * score_matmul) + 10 * head_per_target
    assert qwen2.executed_train_flops(cfg, 512, 10, 256) == expected
    remat = dataclasses.replace(cfg, remat=True)
    expected = 512 * (4 * 2 * layer_matmul + 9 * score_matmul) + 10 * head_per_target
    assert qwen2.executed_train_flops(remat, 512, 10, 256) == expected
    # splash: dq (scores, their values gradient, dq) and dkv (scores, values gradient, dv, dk) kernels.
    splash = dataclasses.replace(cfg, attention="splash")
    keys = attention.keys_per_query(256, None, "splash")
    expected = 512 * (3 * 2 * layer_matmul + 9 * score_matmul * keys / 256) + 10 * head_per_target
    assert qwen2.executed_train_flops(splash, 512, 10, 256) == pytest.approx(expected)
    # With a vocabulary far larger than the layers (as Qwen2.5's 152k on a small model), executed work per
    # token is about 6N + attention when every token is a target, far less at one target in 32 tokens.
    wide = dataclasses.replace(cfg, vocab_size=16384, real_vocab_size=16384)
    full = qwen2.executed_train_flops(wide, 32, 32, 32) / 32 / qwen2.flops_per_token(wide, 32)
    sparse = qwen2.executed_train_flops(wide, 32, 1, 32) / 32 / qwen2.flops_per_token(wide, 32)
    assert 1.0 < full < 1.4 and sparse < 0.2
