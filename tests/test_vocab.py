"""sidrec.model.vocab: chunked full-vocabulary reductions equal the same reductions of the materialised
logits (jax.nn.logsumexp, jax.lax.top_k), padded columns excluded, any chunk size."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sidrec.model import vocab


def _case(rows=6, dim=16, columns=1000, seed=0):
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.normal(size=(2, rows // 2, dim)), jnp.float32)
    head = jnp.asarray(rng.normal(size=(dim, columns)) * 2.0, jnp.float32)  # logits of std ~8
    return hidden, head


def _heads(weight):
    """The same projection stored both ways: as lm_head [d, v] and as a tied embedding [v, d]."""
    return [vocab.Head(weight, 1), vocab.Head(weight.T, 0)]


@pytest.mark.parametrize("chunk", [1000, 256, 333, 7, 4096])  # one chunk, dividing, remainder, tiny, > vocab
def test_logsumexp_equals_the_materialised_one(chunk):
    hidden, head = _case()
    real = 937  # columns past it are padding
    logits = jnp.einsum("bsd,dv->bsv", hidden, head)[..., :real]
    for stored in _heads(head):
        got = jax.jit(vocab.logsumexp, static_argnums=2, static_argnames="chunk")(hidden, stored, real, chunk=chunk)
        # fp32 sums of 937 terms in a different order: ~1 ulp of values ~30.
        np.testing.assert_allclose(got, jax.nn.logsumexp(logits, axis=-1), rtol=0, atol=1e-5)


@pytest.mark.parametrize("chunk", [1000, 256, 333, 7])
def test_top_k_equals_the_materialised_one(chunk):
    hidden, head = _case()
    real = 937
    logits = jnp.einsum("bsd,dv->bsv", hidden, head)[..., :real]
    want_values, want_tokens = jax.lax.top_k(logits, 50)
    for stored in _heads(head):
        values, tokens = jax.jit(vocab.top_k, static_argnums=(2, 3), static_argnames="chunk")(hidden, stored, real, 50,
                                                                                            chunk=chunk)
        np.testing.assert_array_equal(tokens, want_tokens)
        np.testing.assert_allclose(values, want_values, rtol=0, atol=1e-5)


def test_top_k_breaks_ties_towards_the_lower_token_like_lax_top_k():
    hidden = jnp.ones((1, 1, 1), jnp.float32)
    head = jnp.asarray(np.array([[1.0, 3.0, 2.0, 3.0, 3.0, 0.0, 3.0]]), jnp.float32)
    values, tokens = vocab.top_k(hidden, vocab.Head(head, 1), 7, 3, chunk=2)
    np.testing.assert_array_equal(tokens[0, 0], [1, 3, 4])
    np.testing.assert_array_equal(values[0, 0], [3.0, 3.0, 3.0])


def test_padding_columns_never_count():
    hidden, head = _case(columns=20)
    huge = head.at[:, 10:].set(100.0)  # padding columns with enormous logits
    np.testing.assert_allclose(vocab.logsumexp(hidden, vocab.Head(huge, 1), 10, chunk=3),
                               vocab.logsumexp(hidden, vocab.Head(head[:, :10], 1), 10), rtol=0, atol=1e-6)
    _, tokens = vocab.top_k(hidden, vocab.Head(huge.T, 0), 10, 10, chunk=3)
    assert int(tokens.max()) < 10


def test_head_take_and_logits_agree_in_both_layouts():
    hidden, head = _case(columns=50)
    tokens = jnp.array([7, 3, 49, 3])
    want = jnp.einsum("bsd,dv->bsv", hidden, head)[..., tokens]
    for stored in _heads(head):
        np.testing.assert_allclose(stored.take(tokens).logits(hidden), want, rtol=0, atol=1e-5)


def _materialised_cross_entropy(hidden, weight, targets, real):
    logits = jnp.einsum("nd,dv->nv", hidden, weight)[:, :real]
    return jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]


@pytest.mark.parametrize("chunk", [1000, 333, 64])
def test_cross_entropy_and_its_gradients_equal_autodiff_of_the_materialised_loss(chunk):
    rng = np.random.default_rng(1)
    hidden = jnp.asarray(rng.normal(size=(12, 16)), jnp.float32)
    weight = jnp.asarray(rng.normal(size=(16, 1000)) * 2.0, jnp.float32)
    real = 937
    targets = jnp.asarray(rng.integers(0, real, 12), jnp.int32).at[0].set(real - 1).at[1].set(0)
    row_weights = jnp.asarray(rng.uniform(size=12), jnp.float32)  # like loss_w: the cotangent is not all ones

    def want(hidden, weight):
        return jnp.sum(_materialised_cross_entropy(hidden, weight, targets, real) * row_weights)

    want_loss, (want_dh, want_dw) = jax.value_and_grad(want, argnums=(0, 1))(hidden, weight)
    assert float(jnp.abs(want_dw[:, real:]).max()) == 0.0
    for layout in (1, 0):
        def got(hidden, weight, layout=layout):
            head = vocab.Head(weight if layout == 1 else weight.T, layout)
            return jnp.sum(vocab.cross_entropy(hidden, head, targets, real, chunk=chunk) * row_weights)

        loss, (dh, dw) = jax.jit(jax.value_and_grad(got, argnums=(0, 1)))(hidden, weight)
        # fp32, sums over 937 entries in another order: losses ~30, gradients ~1.
        np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
        np.testing.assert_allclose(dh, want_dh, rtol=0, atol=2e-5)
        np.testing.assert_allclose(dw, want_dw, rtol=0, atol=2e-5)


def test_logsumexp_with_a_shift_is_exact_and_falls_back_when_the_shift_is_far_too_low():
    hidden, head = _case()
    real = 937
    logits = jnp.einsum("bsd,dv->bsv", hidden, head)[..., :real]
    want = jax.nn.logsumexp(logits, axis=-1)
    stored = vocab.Head(head, 1)
    from_a_few = logits[..., :40].max(axis=-1)  # as beam search: the largest logit of a few real tokens
    np.testing.assert_allclose(vocab.logsumexp(hidden, stored, real, shift=from_a_few, chunk=256), want,
                               rtol=0, atol=1e-5)
    # 200 below the max: exp overflows fp32, so the running-max path must answer (still exact).
    too_low = want - 200.0
    got = jax.jit(lambda h, s: vocab.logsumexp(h, stored, real, shift=s, chunk=256))(hidden, too_low)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
