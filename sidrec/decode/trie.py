"""The catalogue's SIDs as a prefix trie in device arrays: the allowed next token at every decode step.

Upstream (MiniOneRec evaluate.py) generates `SID tokens + "\\n" + EOS` and, at each step, allows exactly
the tokens that extend the generated suffix to a prefix of some catalogue entry. A trie node stands for
such a prefix; node 0 is the empty prefix (the root) and `INVALID_NODE` a beam that has left the trie.

Layout: one CSR table over the nodes of every level, numbered level by level in sorted order, so the
children of node n are the edges `row_start[n]:row_start[n + 1]` and edge e leads to node e + 1 (every
node but the root is the child of exactly one edge). Memory is two int32 arrays of about
(depth + 2) x (number of distinct SIDs) entries: linear in the catalogue, fine for millions of items.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from sidrec.errors import UserError
from sidrec.tokenizer import TokenizerInfo

ROOT_NODE = 0
INVALID_NODE = -1


class TrieError(UserError):
    """A catalogue that cannot be turned into a decoding trie; the message names the SID and the fix."""


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class SidTrie:
    row_start: jax.Array    # int32 [num_nodes + 1]: children of node n are edges row_start[n]:row_start[n+1]
    child_token: jax.Array  # int32 [num_nodes - 1]: token id of edge e (which leads to node e + 1)
    tokens: jax.Array       # int32 [T]: the distinct tokens of all edges, sorted
    child_slot: jax.Array   # int32 [num_nodes - 1]: position of edge e's token in `tokens`
    level_fanout: tuple[int, ...] = dataclasses.field(metadata={"static": True})
    """Most children of any node at each generated step (len = SID depth + 2)."""
    newline_id: int = dataclasses.field(metadata={"static": True})
    eos_id: int = dataclasses.field(metadata={"static": True})

    @property
    def num_steps(self) -> int:
        """Generated tokens per hypothesis: the SID tokens, the newline and EOS."""
        return len(self.level_fanout)

    @property
    def max_fanout(self) -> int:
        return max(self.level_fanout)

    @property
    def num_nodes(self) -> int:
        return self.row_start.shape[0] - 1


def build_trie(sids: Iterable[Sequence[str]], tokenizer: TokenizerInfo) -> SidTrie:
    """Trie of the distinct SIDs (tuples of SID tokens, all of one depth) followed by newline and EOS.

    Token ids come from the tokenizer (extended by `add_sid_tokens`); newline and EOS from TokenizerInfo.
    """
    return trie_from_token_ids(_token_ids(sids, tokenizer), tokenizer.newline_id, tokenizer.eos_id)


def trie_from_token_ids(sid_ids, newline_id: int, eos_id: int) -> SidTrie:
    """Trie of SIDs given as token ids [n, depth] (duplicates allowed), followed by newline and EOS."""
    sid_ids = np.asarray(sid_ids, np.int32)
    if sid_ids.ndim != 2 or not sid_ids.size:
        raise TrieError(f"expected SID token ids shaped [items, depth], got shape {sid_ids.shape}")
    sid_ids = np.unique(sid_ids, axis=0)  # distinct rows, lexicographically sorted
    suffix = np.broadcast_to(np.array([newline_id, eos_id], np.int32), (len(sid_ids), 2))
    return _trie_from_sorted_paths(np.concatenate([sid_ids, suffix], axis=1), newline_id, eos_id)


def _token_ids(sids: Iterable[Sequence[str]], tokenizer: TokenizerInfo) -> np.ndarray:
    """Distinct SIDs as rows of token ids [n, depth]."""
    distinct = sorted(set(map(tuple, sids)))
    if not distinct:
        raise TrieError("the catalogue has no SIDs; check --data.root and --data.category")
    depth = len(distinct[0])
    ids = {}
    for sid in distinct:
        if len(sid) != depth:
            raise TrieError(f"SID {''.join(sid)!r} has depth {len(sid)} but {''.join(distinct[0])!r} has "
                            f"depth {depth}; all catalogue SIDs must have the same depth")
        for token in sid:
            if token not in ids:
                ids[token] = tokenizer.tokenizer.token_to_id(token)
                if ids[token] is None:
                    raise TrieError(
                        f"SID token {token!r} is not in the tokenizer's vocabulary; the model was not "
                        "trained with this catalogue's SID tokens (extend it with add_sid_tokens, or point "
                        "--model.hf-path at a checkpoint fine-tuned on this category)")
    return np.array([[ids[t] for t in sid] for sid in distinct], dtype=np.int32)


def _trie_from_sorted_paths(paths: np.ndarray, newline_id: int, eos_id: int) -> SidTrie:
    """paths [n, steps]: distinct rows sorted lexicographically, so every prefix is a contiguous run."""
    n, steps = paths.shape
    starts_new_prefix = np.zeros(n, bool)
    starts_new_prefix[0] = True
    parent = np.zeros(n, np.int64)  # node id, at the previous level, of each row's prefix
    next_id = 1
    child_tokens, child_parents, fanout = [], [], []
    for level in range(steps):
        starts_new_prefix = starts_new_prefix | np.r_[True, paths[1:, level] != paths[:-1, level]]
        first_rows = np.flatnonzero(starts_new_prefix)
        node = next_id + np.cumsum(starts_new_prefix) - 1  # node id of each row's prefix at this level
        child_tokens.append(paths[first_rows, level])
        child_parents.append(parent[first_rows])
        fanout.append(int(np.bincount(parent[first_rows]).max()))
        parent, next_id = node, next_id + len(first_rows)
    # Edge e leads to node e + 1; parents are non-decreasing along edges, so CSR rows are contiguous.
    edge_parent = np.concatenate(child_parents)
    row_start = np.searchsorted(edge_parent, np.arange(next_id + 1), side="left").astype(np.int32)
    edge_tokens = np.concatenate(child_tokens)
    tokens, child_slot = np.unique(edge_tokens, return_inverse=True)
    return SidTrie(row_start=jnp.asarray(row_start), child_token=jnp.asarray(edge_tokens),
                   tokens=jnp.asarray(tokens.astype(np.int32)), child_slot=jnp.asarray(child_slot.astype(np.int32)),
                   level_fanout=tuple(fanout), newline_id=int(newline_id), eos_id=int(eos_id))


def candidates(trie: SidTrie, node: jax.Array, level: int | None = None):
    """Allowed continuations of the prefixes `node` (any shape, e.g. [B, W]); usable inside jit.

    Returns (tokens, slots, children, valid), each `node.shape + (C,)` with C the fan-out of `level` (a
    Python int), or the largest fan-out of any level when `level` is None (a step counter traced by a
    scan); `slots` index `trie.tokens` (so the logits of `trie.tokens` are all a search needs). Invalid
    slots (padding past a node's children, or any slot of INVALID_NODE) have token 0, slot 0 and child
    INVALID_NODE.
    """
    width = trie.max_fanout if level is None else trie.level_fanout[level]
    safe_node = jnp.maximum(node, 0)
    start = trie.row_start[safe_node]
    count = jnp.where(node >= 0, trie.row_start[safe_node + 1] - start, 0)
    slot = jnp.arange(width, dtype=jnp.int32)
    valid = slot < count[..., None]
    edge = start[..., None] + slot
    tokens = jnp.where(valid, jnp.take(trie.child_token, edge, mode="clip"), 0)
    slots = jnp.where(valid, jnp.take(trie.child_slot, edge, mode="clip"), 0)
    children = jnp.where(valid, edge + 1, INVALID_NODE)
    return tokens, slots, children, valid
