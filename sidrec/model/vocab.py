"""Full-vocabulary reductions of logits = hidden @ head without materialising the logits.

Beam search needs, per running beam and step, the log-softmax normaliser over the whole vocabulary
(upstream's scores are full-vocabulary log-probabilities) but the logits of only a few tokens. With a
152k vocabulary the [beams, vocab] fp32 logits are hundreds of MB a step; on CPU writing and re-reading
them costs more than computing them, and XLA's row reductions over them are slower still (measured in
bench/eval_speed.py's floor section). Walking the head in column chunks keeps each chunk's logits in
cache: one matmul, a running max and a running sum of exp per chunk (the online logsumexp).

`head` is a `Head`: the projection as stored, [v, d] (a tied embedding) or [d, v] (lm_head), never
transposed (measured for hidden 896: transposing the tied embedding cost more than half of a chunked
logsumexp over it). Vocabulary entries >= real_vocab (padding) never count. Logits are accumulated in
fp32 like `qwen2.vocab_logits`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from sidrec.model import vma

CHUNK = 8192  # vocabulary entries per chunk: [400 beams, 8192] fp32 is 13 MB; 2k..16k measured alike on CPU


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Head:
    """The output projection: logits = hidden @ weight.T when vocab_axis is 0, hidden @ weight when 1."""

    weight: jax.Array
    vocab_axis: int = dataclasses.field(metadata={"static": True})

    def logits(self, hidden: jax.Array) -> jax.Array:
        """fp32 [..., n] for hidden [..., d] over all of this head's entries."""
        spec = "...d,nd->...n" if self.vocab_axis == 0 else "...d,dn->...n"
        return jnp.einsum(spec, hidden, self.weight, preferred_element_type=jnp.float32)

    def take(self, tokens: jax.Array) -> Head:
        """The head restricted to `tokens` [n] (in that order)."""
        return Head(jnp.take(self.weight, tokens, axis=self.vocab_axis), self.vocab_axis)

    def slice(self, start, size: int) -> Head:
        return Head(jax.lax.dynamic_slice_in_dim(self.weight, start, size, axis=self.vocab_axis), self.vocab_axis)


def _chunk_logits(flat, head: Head, start, size):
    return head.slice(start, size).logits(flat)


def _fold_chunks(fold, init, flat, head, real_vocab, chunk):
    """fold(carry, logits [n, c], start) over the chunks of the head's first real_vocab entries (padding
    is never read, so never masked): a scan over the full chunks, then the remainder (static
    shapes; the vocabulary need not divide by the chunk)."""
    chunk = min(chunk, real_vocab)
    full, rest = divmod(real_vocab, chunk)
    init = jax.tree.map(lambda x: vma.varying_like(x, flat, head.weight), init)

    def body(carry, index):
        start = index * chunk
        return fold(carry, _chunk_logits(flat, head, start, chunk), start), None

    carry, _ = jax.lax.scan(body, init, jnp.arange(full))
    if rest:
        start = full * chunk
        carry = fold(carry, _chunk_logits(flat, head, start, rest), start)
    return carry


def logsumexp(hidden: jax.Array, head: Head, real_vocab: int, *, shift: jax.Array | None = None,
              chunk: int = CHUNK) -> jax.Array:
    """fp32 [...]: logsumexp over the real vocabulary of the logits of hidden [..., d].

    shift [...]: optional, some real entries' largest logit per row (beam search has the trie tokens'
    at hand). Summing exp(logit - shift) then needs no running max (measured ~10% of a search step);
    it stays exact unless a logit exceeds the shift by ~80 (fp32 overflow), and then the whole batch
    is redone with the running max.
    """
    flat = hidden.reshape(-1, hidden.shape[-1])
    ones = jnp.ones((), jnp.float32)
    if shift is not None:
        flat_shift = shift.reshape(-1).astype(jnp.float32)

        def shifted(total, logits, start):
            return total + jnp.exp(logits - flat_shift[:, None]) @ jnp.broadcast_to(ones, logits.shape[-1:])

        total = _fold_chunks(shifted, jnp.zeros(flat.shape[:1], jnp.float32), flat, head, real_vocab, chunk)
        result = flat_shift + jnp.log(total)
        return jax.lax.cond(jnp.all(jnp.isfinite(result)), lambda: result.reshape(hidden.shape[:-1]),
                            lambda: logsumexp(hidden, head, real_vocab, chunk=chunk))

    def fold(carry, logits, start):
        running_max, running_sum = carry
        new_max = jnp.maximum(running_max, logits.max(axis=-1))
        # The sum as a matrix-vector product: XLA's CPU row reduction was ~2x slower (issue 15's probe).
        chunk_sum = jnp.exp(logits - new_max[:, None]) @ jnp.broadcast_to(ones, logits.shape[-1:])
        return new_max, running_sum * jnp.exp(running_max - new_max) + chunk_sum

    init = (jnp.full(flat.shape[:1], -jnp.inf, jnp.float32), jnp.zeros(flat.shape[:1], jnp.float32))
    running_max, running_sum = _fold_chunks(fold, init, flat, head, real_vocab, chunk)
    return (running_max + jnp.log(running_sum)).reshape(hidden.shape[:-1])


def top_k(hidden: jax.Array, head: Head, real_vocab: int, k: int, *,
          chunk: int = CHUNK) -> tuple[jax.Array, jax.Array]:
    """(fp32 logits, int32 tokens) [..., k] of the k largest logits, as `jax.lax.top_k` of the full row
    (ties go to the lower token id there and here: chunks are merged in vocabulary order)."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    k = min(k, real_vocab)

    def fold(carry, logits, start):
        values, tokens = carry
        chunk_values, chunk_tokens = jax.lax.top_k(logits, min(k, logits.shape[-1]))
        merged_values = jnp.concatenate([values, chunk_values], axis=-1)
        merged_tokens = jnp.concatenate([tokens, chunk_tokens + start], axis=-1)
        values, best = jax.lax.top_k(merged_values, k)
        return values, jnp.take_along_axis(merged_tokens, best, axis=-1)

    init = (jnp.full((flat.shape[0], k), -jnp.inf, jnp.float32), jnp.zeros((flat.shape[0], k), jnp.int32))
    values, tokens = _fold_chunks(fold, init, flat, head, real_vocab, chunk)
    return values.reshape(*hidden.shape[:-1], k), tokens.reshape(*hidden.shape[:-1], k)



def cross_entropy(hidden: jax.Array, head: Head, targets: jax.Array, real_vocab: int, *,
                  chunk: int = CHUNK) -> jax.Array:
    """fp32 [n]: -log_softmax(logits)[target] per row of hidden [n, d], targets int [n], differentiable in
    hidden and head.weight. Neither pass materialises [n, vocab]: the backward recomputes each chunk's
    logits and turns them into (softmax - onehot) * cotangent at once (one matmul more than autodiff of
    the materialised loss, far less memory traffic when d is small against the vocabulary)."""
    return _cross_entropy(hidden, head.weight, targets, head.vocab_axis, real_vocab, chunk)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _cross_entropy(hidden, weight, targets, vocab_axis, real_vocab, chunk):
    return _cross_entropy_forward(hidden, weight, targets, vocab_axis, real_vocab, chunk)[0]


def _target_logits(hidden, head: Head, targets):
    rows = jnp.take(head.weight, targets, axis=head.vocab_axis)  # [n, d] or [d, n]
    spec = "nd,nd->n" if head.vocab_axis == 0 else "nd,dn->n"
    return jnp.einsum(spec, hidden, rows, preferred_element_type=jnp.float32)


def _cross_entropy_forward(hidden, weight, targets, vocab_axis, real_vocab, chunk):
    head = Head(weight, vocab_axis)
    log_z = logsumexp(hidden, head, real_vocab, chunk=chunk)
    return log_z - _target_logits(hidden, head, targets), (hidden, weight, targets, log_z)


def _cross_entropy_backward(vocab_axis, real_vocab, chunk, residuals, cotangent):
    """d/dlogits = (softmax - onehot(target)) * cotangent: the softmax part chunk by chunk, the onehot part
    once at the target entries (a gather and a scatter-add instead of a compare in every chunk)."""
    hidden, weight, targets, log_z = residuals
    head = Head(weight, vocab_axis)
    contract_vocab = "nv,vd->nd" if vocab_axis == 0 else "nv,dv->nd"
    weight_grad_spec = "nv,nd->vd" if vocab_axis == 0 else "nv,nd->dv"

    def fold(carry, logits, start):
        hidden_grad, weight_grad = carry
        size = logits.shape[-1]
        softmax_grad = (jnp.exp(logits - log_z[:, None]) * cotangent[:, None]).astype(weight.dtype)
        columns = head.slice(start, size).weight
        hidden_grad = hidden_grad + jnp.einsum(contract_vocab, softmax_grad, columns,
                                               preferred_element_type=jnp.float32)
        chunk_grad = jnp.einsum(weight_grad_spec, softmax_grad, hidden, preferred_element_type=jnp.float32)
        weight_grad = jax.lax.dynamic_update_slice_in_dim(weight_grad, chunk_grad, start, axis=vocab_axis)
        return hidden_grad, weight_grad

    init = (jnp.zeros(hidden.shape, jnp.float32), jnp.zeros(weight.shape, jnp.float32))
    hidden_grad, weight_grad = _fold_chunks(fold, init, hidden, head, real_vocab, chunk)
    target_rows = jnp.take(weight, targets, axis=vocab_axis).astype(jnp.float32)  # [n, d] or [d, n]
    hidden_grad = hidden_grad - cotangent[:, None] * (target_rows if vocab_axis == 0 else target_rows.T)
    target_grad = cotangent[:, None] * hidden.astype(jnp.float32)  # [n, d]
    if vocab_axis == 0:
        weight_grad = weight_grad.at[targets].add(-target_grad)
    else:
        weight_grad = weight_grad.at[:, targets].add(-target_grad.T)
    return (vma.summed_like(hidden_grad, hidden).astype(hidden.dtype), vma.summed_like(weight_grad, weight).astype(weight.dtype),
            None)


_cross_entropy.defvjp(_cross_entropy_forward, _cross_entropy_backward)
