"""Residual quantisation of item embeddings into SIDs, collision handling, and the code statistics.

Level l clusters the residuals left by levels < l into K_l codes (k-means or balanced k-means, on
device: sidrec/sids/kmeans.py); each item's SID is its code per level, e.g. <a_12><b_34><c_56>.

Two items can end with the same codes (a collision: the model could not tell them apart). Dedup:
- `extra-level` (upstream rqkmeans_constrained.py's 4th token): when any collision exists, every SID
  gets a 4th token <d_r>, r the item's rank (0, 1, ...) among the items sharing its codes in index
  order. Upstream appends r+1 only to colliding items, so its SIDs have 3 or 4 tokens; sidrec's trie
  (and the fixed number of generated SID tokens in upstream's own beam constraint) wants one depth, so
  every item gets the token and singletons get <d_0>.
- `sinkhorn` (upstream rqvae's generate_indices.py): each colliding group is re-assigned on the last
  level by a Sinkhorn-balanced transport of its items' last residuals over that level's codebook, for up
  to `rounds` rounds; upstream keeps what still collides after that (its shipped indices hold 15-16
  collisions), we then move each remaining item to its nearest last-level code that no other item with
  the same prefix uses. Collision-free whenever no prefix holds more than K_last items.
- `none`: keep collisions (upstream's shipped indices have 16 and 15 of them).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from sidrec.errors import UserError
from sidrec.sids import kmeans as km

LEVEL_LETTERS = "abcdefghijklmnopqrstuvwxyz"


class SidsError(UserError):
    """A SID construction request that cannot be met; the message says which setting to change."""


@dataclass(frozen=True)
class Quantized:
    codes: np.ndarray               # int32 [items, levels]
    codebooks: tuple[np.ndarray, ...]  # float32 [K_l, dim] per level
    residual_mse: tuple[float, ...]    # mean squared residual per coordinate after each level


def residual_kmeans(x: np.ndarray, codes_per_level: tuple[int, ...], *, iterations: int, balanced: bool,
                    seed: int) -> Quantized:
    """Codes [items, levels] from residual (balanced) k-means, one level at a time."""
    n = x.shape[0]
    too_many = [k for k in codes_per_level if k > n]
    if too_many:
        raise SidsError(f"{too_many[0]} codes per level for {n} items: K must not exceed the item count; "
                        "lower --sids.codes")
    residual = jnp.asarray(x, jnp.float32)
    key = jax.random.key(seed)
    codes, codebooks, mse = [], [], []
    for level, k in enumerate(codes_per_level):
        centres, assign = km.kmeans(jax.random.fold_in(key, level), residual, k, iterations, balanced)
        residual = residual - centres[assign]
        codes.append(np.asarray(assign))
        codebooks.append(np.asarray(centres))
        mse.append(float(jnp.mean(residual * residual)))
    return Quantized(np.stack(codes, 1).astype(np.int32), tuple(codebooks), tuple(mse))


def collision_groups(codes: np.ndarray) -> list[list[int]]:
    """Groups (item indices, ascending) of two or more items sharing all codes."""
    groups = defaultdict(list)
    for i, row in enumerate(map(tuple, codes)):
        groups[row].append(i)
    return [g for g in groups.values() if len(g) > 1]


def add_extra_level(codes: np.ndarray) -> np.ndarray:
    """[items, levels + 1]: the rank of each item among those sharing its codes (see module doc)."""
    seen = Counter()
    rank = np.zeros(len(codes), np.int32)
    for i, row in enumerate(map(tuple, codes)):
        rank[i] = seen[row]
        seen[row] += 1
    return np.concatenate([codes, rank[:, None]], 1)


def sinkhorn_assign(distances: np.ndarray, epsilon: float, iterations: int) -> np.ndarray:
    """Upstream rq/models/vq.py + layers.py sinkhorn_algorithm, transcribed (float64): distances centred
    to [-1, 1], Q = exp(-D / epsilon) normalised to sum 1, then `iterations` times rows to 1/B and
    columns to 1/K (columns last); each item takes its row's argmax."""
    d = np.asarray(distances, np.float64)
    middle = (d.max() + d.min()) / 2
    d = (d - middle) / (d.max() - middle + 1e-5)
    q = np.exp(-(d - d.min()) / epsilon)  # the shift cancels in the normalisations and avoids overflow
    q /= q.sum()
    b, k = q.shape
    for _ in range(iterations):
        q /= q.sum(1, keepdims=True) * b
        q /= q.sum(0, keepdims=True) * k
    return np.argmax(q, 1).astype(np.int32)


def sinkhorn_dedup(x: np.ndarray, quantized: Quantized, *, rounds: int, epsilon: float,
                   iterations: int = 50) -> tuple[np.ndarray, int]:
    """Collision-free codes (see module doc) and how many items the final nearest-free pass moved.

    As upstream generate_indices.py: each round, each colliding group's items get last-level codes from a
    Sinkhorn transport of that group alone over the last codebook (the earlier levels keep plain argmin),
    until no collision is left or `rounds` is reached; upstream stops there and keeps what still
    collides, we then move those to the nearest free code."""
    codes = quantized.codes.copy()
    last = quantized.codebooks[-1]
    before_last = x - sum(cb[codes[:, level]] for level, cb in enumerate(quantized.codebooks[:-1]))
    distances = np.asarray(km.squared_distances(jnp.asarray(before_last), jnp.asarray(last)))
    for _ in range(rounds):
        groups = collision_groups(codes)
        if not groups:
            return codes, 0
        for group in groups:
            codes[group, -1] = sinkhorn_assign(distances[group], epsilon, iterations)
    return _nearest_free(codes, distances)


def _nearest_free(codes: np.ndarray, distances: np.ndarray) -> tuple[np.ndarray, int]:
    """Keep the item of each colliding group nearest its code; move each other one to its nearest
    last-level code unused under the same prefix."""
    codes = codes.copy()
    used = defaultdict(set)
    for row in codes:
        used[tuple(int(c) for c in row[:-1])].add(int(row[-1]))
    moved = 0
    for group in collision_groups(codes):
        keep = min(group, key=lambda i: distances[i, codes[i, -1]])
        for i in group:
            if i == keep:
                continue
            prefix = tuple(int(c) for c in codes[i, :-1])
            free = [c for c in np.argsort(distances[i], kind="stable") if int(c) not in used[prefix]]
            if not free:
                raise SidsError(f"prefix {prefix} holds more items than the last level's {distances.shape[1]} "
                                "codes: no collision-free last code exists; use --sids.dedup extra-level "
                                "or more codes")
            codes[i, -1] = free[0]
            used[prefix].add(int(free[0]))
            moved += 1
    return codes, moved


def sid_tokens(codes: np.ndarray) -> list[tuple[str, ...]]:
    """Codes -> SID token tuples: level l's code c is <letter_l>_c> (<a_12>, <b_34>, ...)."""
    if codes.shape[1] > len(LEVEL_LETTERS):
        raise SidsError(f"at most {len(LEVEL_LETTERS)} levels")
    return [tuple(f"<{LEVEL_LETTERS[level]}_{int(c)}>" for level, c in enumerate(row)) for row in codes]


def code_statistics(codes: np.ndarray) -> dict:
    """Codes used and entropy (bits) per level; unique SIDs; collision groups and colliding items."""
    levels = []
    for level in range(codes.shape[1]):
        counts = np.bincount(codes[:, level])
        p = counts[counts > 0] / len(codes)
        levels.append({"codes_used": int((counts > 0).sum()), "entropy_bits": float(-(p * np.log2(p)).sum()),
                       "max_cluster": int(counts.max()), "min_cluster": int(counts[counts > 0].min())})
    groups = collision_groups(codes)
    return {"unique_sids": len({tuple(r) for r in codes}), "collision_groups": len(groups),
            "colliding_items": sum(len(g) for g in groups),
            "largest_collision_group": max((len(g) for g in groups), default=1), "levels": levels}
