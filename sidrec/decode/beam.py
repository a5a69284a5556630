"""Trie-constrained beam search in one jit, ranked exactly as upstream MiniOneRec's evaluation.

Upstream calls Hugging Face `generate(num_beams=W, num_return_sequences=W, length_penalty=0.0,
do_sample=False)` with a logits processor that adds -1e6 to every token outside the trie's allowed set
(after a log-softmax). We reproduce HF's beam search (transformers >= 4.50, `_beam_search`) step by step:

- scores are sums of fp32 full-vocabulary log-softmax values; at step 0 only beam 0 exists (HF starts
  the other beams at -1e9);
- each step keeps the best 2W continuations over all beams; those ending in EOS (or reaching the last
  step) that rank among the first W are offered to a separate set of W finished hypotheses, the best
  W others keep running (a finished continuation never occupies a running beam);
- the result is the finished set, best first (length penalty 0: plain sums).

Constrained, a continuation outside the trie costs -1e6 like upstream's mask; such continuations only
matter when fewer than W allowed ones exist (Industrial's 48 first-level codes for 50 beams), and then
sit below every valid one, their beams never coming back into the trie.

The model is reached only through `prefill`, `decode_step`, `reorder_beams` and `output_head`
(sidrec.model.qwen2's signatures): the prompt is prefilled once and its K/V shared by all beams. Steps
never form the [beams, vocabulary] logits: the normaliser is a chunked logsumexp over the head, and
a constrained step takes the logits of the trie's few hundred tokens only.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from sidrec.decode.trie import INVALID_NODE, ROOT_NODE, SidTrie, candidates
from sidrec.model import qwen2, vocab

NOT_A_BEAM = -1e9      # HF's score of an empty slot (beams 1.. at step 0, unfilled finished slots)
DISALLOWED = -1e6      # upstream's additive mask on tokens the trie does not allow


class BeamState(NamedTuple):
    running_scores: jax.Array   # f32 [B, S]
    running_nodes: jax.Array    # int32 [B, S] trie node of each running beam's generated prefix
    running_tokens: jax.Array   # int32 [B, S, G] generated tokens (EOS past the current step)
    finished_scores: jax.Array  # f32 [B, W], sorted best first
    finished_tokens: jax.Array  # int32 [B, W, G]
    finished_flags: jax.Array   # bool [B, W] slot holds a real hypothesis (HF: is_sent_finished)
    improvable: jax.Array       # bool [B, 1] a running beam may still beat the worst finished one


@functools.partial(jax.jit, static_argnames=("cfg", "num_beams", "constrained"))
def beam_search(params, cfg, trie: SidTrie, tokens: jax.Array, mask: jax.Array, *, num_beams: int = 50,
                constrained: bool = True) -> tuple[jax.Array, jax.Array]:
    """Beam search over left-padded prompts tokens/mask [B, S].

    Returns (sequences int32 [B, W, G], scores f32 [B, W]) with G = trie.num_steps (SID depth + 2): the
    generated suffixes, best first, EOS-filled after an early EOS. `constrained=False` searches the full
    vocabulary (upstream's "pure" beam search) for the same G steps. The first step starts at the trie's
    root: upstream keys it by the prompt's last tokens, which eval prompts end with ("### Response:\\n").
    Compiles once per (prompt shape, num_beams, constrained, trie fan-outs).
    """
    steps = trie.num_steps
    hidden, cache = qwen2.prefill(params, cfg, tokens, mask, num_beams=num_beams, max_new_tokens=steps - 1)
    head = Head.of(params, cfg, trie, constrained)
    state = _initial_state(tokens.shape[0], num_beams, steps, trie.eos_id)
    advance = functools.partial(_advance, trie=trie, head=head, num_beams=num_beams, constrained=constrained)
    # Step 0: every beam would continue the same prompt, so only beam 0's continuations exist.
    state, _ = advance(state, hidden[:, None, :], step=0, level=0)

    def body(carry, step):
        state, cache = carry
        hidden, cache = qwen2.decode_step(params, cfg, state.running_tokens[:, :, step - 1], cache)
        state, parent = advance(state, hidden, step=step, level=None)
        return (state, qwen2.reorder_beams(cache, parent)), None

    (state, _), _ = jax.lax.scan(body, (state, cache), jnp.arange(1, steps))
    return state.finished_tokens, state.finished_scores


class Head(NamedTuple):
    """The output projection as a beam step uses it: the full head for the normaliser and the rare
    full-vocabulary top-k, and its entries at the trie's tokens (all a constrained step needs logits
    of; gathered once per search)."""

    full: vocab.Head
    catalogue: vocab.Head | None
    real_vocab: int

    @classmethod
    def of(cls, params, cfg, trie: SidTrie, constrained: bool) -> Head:
        full = qwen2.output_head(params, cfg)
        return cls(full, full.take(trie.tokens) if constrained else None, cfg.real_vocab_size)


class LogProbs(NamedTuple):
    """Full-vocabulary log_softmax of the running beams' logits, never materialised over the vocabulary
    (sidrec.model.vocab walks the head in chunks): logits where needed, minus the normaliser."""

    hidden: jax.Array            # [B, S, d]
    head: Head
    catalogue_logits: jax.Array | None  # f32 [B, S, T] logits of the trie's tokens (constrained only)
    normalizer: jax.Array        # f32 [B, S, 1]

    @classmethod
    def of(cls, hidden: jax.Array, head: Head) -> LogProbs:
        if head.catalogue is None:
            return cls(hidden, head, None, vocab.logsumexp(hidden, head.full, head.real_vocab)[..., None])
        catalogue = head.catalogue.logits(hidden)
        normalizer = vocab.logsumexp(hidden, head.full, head.real_vocab, shift=catalogue.max(axis=-1))
        return cls(hidden, head, catalogue, normalizer[..., None])

    @property
    def vocab_size(self) -> int:
        return self.head.real_vocab

    def at_catalogue_tokens(self) -> jax.Array:
        """f32 [B, S, T]: log-probabilities of the trie's tokens."""
        return self.catalogue_logits - self.normalizer

    def top_k(self, k: int) -> tuple[jax.Array, jax.Array]:
        values, tokens = vocab.top_k(self.hidden, self.head.full, self.head.real_vocab, k)
        return values - self.normalizer, tokens


def _initial_state(batch: int, num_beams: int, steps: int, eos_id: int) -> BeamState:
    return BeamState(
        running_scores=jnp.zeros((batch, 1), jnp.float32),
        running_nodes=jnp.full((batch, 1), ROOT_NODE, jnp.int32),
        running_tokens=jnp.full((batch, 1, steps), eos_id, jnp.int32),
        finished_scores=jnp.full((batch, num_beams), NOT_A_BEAM, jnp.float32),
        finished_tokens=jnp.full((batch, num_beams, steps), eos_id, jnp.int32),
        finished_flags=jnp.zeros((batch, num_beams), bool),
        improvable=jnp.ones((batch, 1), bool),
    )


def _advance(state: BeamState, hidden: jax.Array, *, step, level: int | None, trie: SidTrie, head: Head,
             num_beams: int, constrained: bool) -> tuple[BeamState, jax.Array]:
    """One HF beam-search step from the final hidden states [B, S, d] of the S running beams.

    Returns the new state (W running beams) and each running beam's parent [B, W] (to reorder caches).
    """
    W, K = num_beams, 2 * num_beams
    logp = LogProbs.of(hidden, head)
    if constrained:
        scores, tokens, children = _constrained_continuations(state, logp, trie, level, W)
    else:
        scores, tokens, children = _free_continuations(state, logp, K)
    per_beam = scores.shape[-1]
    scores, tokens, children = (_flatten_beams(x, K, fill)
                                for x, fill in ((scores, -jnp.inf), (tokens, 0), (children, INVALID_NODE)))
    top_scores, flat = jax.lax.top_k(scores, K)
    parent = jnp.minimum(flat // per_beam, state.running_scores.shape[1] - 1)  # padding -> a real beam
    top_tokens, top_children = _take(tokens, flat), _take(children, flat)
    sequences = jnp.take_along_axis(state.running_tokens, parent[..., None], axis=1)
    sequences = sequences.at[:, :, step].set(top_tokens)
    ends = (top_tokens == trie.eos_id) | (step == trie.num_steps - 1)

    # Running beams: the best W continuations that did not end (HF pushes ended ones down by 1e9).
    running_key = top_scores + jnp.where(ends, NOT_A_BEAM, 0.0)
    running_scores, keep = jax.lax.top_k(running_key, W)

    # Finished set: merge the ended continuations ranked among the first W, if still improvable.
    just_finished = ends & (jnp.arange(K) < W)
    offered = top_scores + jnp.where(state.improvable, 0.0, NOT_A_BEAM)
    offered = offered + jnp.where(just_finished, 0.0, NOT_A_BEAM)
    merged_scores = jnp.concatenate([state.finished_scores, offered], axis=1)
    finished_scores, best = jax.lax.top_k(merged_scores, W)
    finished_tokens = jnp.take_along_axis(
        jnp.concatenate([state.finished_tokens, sequences], axis=1), best[..., None], axis=1)
    finished_flags = _take(jnp.concatenate([state.finished_flags, just_finished], axis=1), best)

    # HF's stopping heuristic (early_stopping=False, length penalty 0): once no running beam beats the
    # worst finished hypothesis, nothing more is accepted.
    worst_finished = jnp.where(finished_flags, finished_scores.min(axis=1, keepdims=True), NOT_A_BEAM)
    improvable = state.improvable & jnp.any(running_scores[:, :1] > worst_finished, axis=1, keepdims=True)

    new_state = BeamState(
        running_scores=running_scores,
        running_nodes=_take(top_children, keep),
        running_tokens=jnp.take_along_axis(sequences, keep[..., None], axis=1),
        finished_scores=finished_scores,
        finished_tokens=finished_tokens,
        finished_flags=finished_flags,
        improvable=improvable,
    )
    return new_state, _take(parent, keep)


def _take(values: jax.Array, index: jax.Array) -> jax.Array:
    return jnp.take_along_axis(values, index, axis=1)


def _flatten_beams(values: jax.Array, at_least: int, fill) -> jax.Array:
    """[B, S, M] -> [B, S * M], padded with `fill` up to `at_least` columns (tiny test vocabularies)."""
    flat = values.reshape(values.shape[0], -1)
    missing = at_least - flat.shape[1]
    return jnp.pad(flat, ((0, 0), (0, missing)), constant_values=fill) if missing > 0 else flat


def _free_continuations(state: BeamState, logp: LogProbs, k: int):
    """Each beam's best k tokens (enough: the overall best k take at most k from one beam)."""
    token_logp, tokens = logp.top_k(min(k, logp.vocab_size))
    scores = state.running_scores[..., None] + token_logp
    return scores, tokens, jnp.full(tokens.shape, INVALID_NODE, jnp.int32)


def _constrained_continuations(state: BeamState, logp: LogProbs, trie: SidTrie, level: int | None,
                               num_beams: int):
    """Allowed children of each beam's trie node, plus (when some prompt has fewer than W of those)
    each beam's best disallowed tokens at -1e6, as upstream's mask would rank them."""
    allowed_tokens, slots, children, valid = candidates(trie, state.running_nodes, level)
    allowed_logp = jnp.take_along_axis(logp.at_catalogue_tokens(), slots, axis=-1)
    allowed_scores = jnp.where(valid, state.running_scores[..., None] + allowed_logp, -jnp.inf)

    k = min(2 * num_beams, logp.vocab_size)
    shape = state.running_nodes.shape + (k,)

    def disallowed():
        token_logp, tokens = logp.top_k(k)
        is_allowed = jnp.any((tokens[..., :, None] == allowed_tokens[..., None, :]) & valid[..., None, :],
                             axis=-1)
        scores = state.running_scores[..., None] + (token_logp + DISALLOWED)
        return jnp.where(is_allowed, -jnp.inf, scores), tokens

    def none():
        return jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.int32)

    # With at least W allowed continuations per prompt, disallowed ones can neither run nor finish
    # among the first W, so the full-vocabulary top-k is skipped.
    too_few = jnp.any(valid.sum(axis=(1, 2)) < num_beams)
    disallowed_scores, disallowed_tokens = jax.lax.cond(too_few, disallowed, none)
    return (jnp.concatenate([allowed_scores, disallowed_scores], axis=-1),
            jnp.concatenate([allowed_tokens, disallowed_tokens], axis=-1),
            jnp.concatenate([children, jnp.full(shape, INVALID_NODE, jnp.int32)], axis=-1))
