"""K-means on device (JAX): k-means++ seeding, Lloyd iterations, and a size-balanced variant.

Every function is jitted with static shapes and driven by an explicit PRNG key, so a seed fixes the
result. Distances are squared Euclidean, computed as |x|^2 - 2 x.c + |c|^2 in float32.

Balanced clustering (upstream's `rqkmeans_constrained.py` uses k-means-constrained: every cluster holds
floor(n/K) or ceil(n/K) items) replaces Lloyd's nearest-centre step with a capacitated assignment:
items propose to their nearest centre that still has room, each centre accepts its closest proposals up
to its room, and the rest propose again (a vectorised greedy; every round accepts at least one item).
It runs twice: first every centre gets room floor(n/K), then the r = n mod K items left over go one to a
centre. Sizes are exactly floor or ceil by construction; the assignment is greedy, not the min-cost
flow k-means-constrained solves (bench/sids_speed.py compares both on the same embeddings).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

SWAP_ROUNDS = 2         # exchange rounds inside each balanced Lloyd step (cheap, most of the gain)
FINAL_SWAP_ROUNDS = 100  # ... and for the returned assignment (until no exchange helps)


def squared_distances(x: jax.Array, centres: jax.Array) -> jax.Array:
    """[n, k] squared Euclidean distances (clamped at 0 against rounding)."""
    d = jnp.sum(x * x, 1, keepdims=True) - 2.0 * x @ centres.T + jnp.sum(centres * centres, 1)[None, :]
    return jnp.maximum(d, 0.0)


@partial(jax.jit, static_argnames="k")
def kmeans_plus_plus(key: jax.Array, x: jax.Array, k: int) -> jax.Array:
    """k initial centres: the first uniformly, each next one with probability proportional to the
    squared distance to the nearest centre chosen so far (Arthur & Vassilvitskii 2007)."""
    n = x.shape[0]
    first_key, key = jax.random.split(key)
    first = jax.random.randint(first_key, (), 0, n)
    centres = jnp.zeros((k, x.shape[1]), x.dtype).at[0].set(x[first])
    nearest = jnp.sum((x - x[first]) ** 2, 1)

    def add(i, state):
        centres, nearest = state
        weights = nearest / jnp.maximum(nearest.sum(), 1e-30)
        # all points identical to chosen centres (weights 0): fall back to a uniform choice
        logits = jnp.where(nearest.sum() > 0, jnp.log(jnp.maximum(weights, 1e-38)), 0.0)
        pick = jax.random.categorical(jax.random.fold_in(key, i), logits)
        nearest = jnp.minimum(nearest, jnp.sum((x - x[pick]) ** 2, 1))
        return centres.at[i].set(x[pick]), nearest

    centres, _ = jax.lax.fori_loop(1, k, add, (centres, nearest))
    return centres


def _update_centres(x: jax.Array, assign: jax.Array, centres: jax.Array, distances: jax.Array) -> jax.Array:
    """Means of the clusters; an empty cluster takes the point farthest from its own centre (the
    e-th empty one the e-th farthest), so K codes stay in use."""
    k = centres.shape[0]
    sums = jax.ops.segment_sum(x, assign, num_segments=k)
    counts = jax.ops.segment_sum(jnp.ones_like(assign, x.dtype), assign, num_segments=k)
    means = sums / jnp.maximum(counts, 1.0)[:, None]
    empty = counts == 0
    own = jnp.take_along_axis(distances, assign[:, None], 1)[:, 0]
    farthest = jnp.argsort(-own)
    rank = jnp.clip(jnp.cumsum(empty) - 1, 0, x.shape[0] - 1)
    return jnp.where(empty[:, None], x[farthest[rank]], means)


def _capacitated_assign(distances: jax.Array, room: jax.Array, taken: jax.Array,
                        assign: jax.Array) -> jax.Array:
    """Greedy assignment of the items not yet `taken` to centres with `room` left (see module doc).

    Stops when every item is taken or no centre has room. Returns the updated assignment."""
    n, k = distances.shape

    def not_done(state):
        taken, room, _ = state
        return jnp.any(~taken) & jnp.any(room > 0)

    def one_round(state):
        taken, room, assign = state
        masked = jnp.where(room[None, :] > 0, distances, jnp.inf)
        choice = jnp.where(taken, k, jnp.argmin(masked, 1))        # k: "not proposing"
        dist = jnp.where(taken, jnp.inf, jnp.min(masked, 1))
        order = jnp.lexsort((dist, choice))                        # by centre, closest first
        sorted_choice = choice[order]
        first = jnp.searchsorted(sorted_choice, sorted_choice, side="left")
        rank_sorted = jnp.arange(n) - first
        rank = jnp.zeros(n, jnp.int32).at[order].set(rank_sorted.astype(jnp.int32))
        room_of = jnp.concatenate([room, jnp.zeros(1, room.dtype)])[choice]
        accept = (~taken) & (rank < room_of)
        accepted_per_centre = jax.ops.segment_sum(accept.astype(room.dtype), jnp.where(accept, choice, 0),
                                                  num_segments=k)
        return taken | accept, room - accepted_per_centre, jnp.where(accept, choice, assign)

    _, _, assign = jax.lax.while_loop(not_done, one_round, (taken, room, assign))
    return assign


def _improve_by_swaps(distances: jax.Array, assign: jax.Array, max_rounds: int) -> jax.Array:
    """Exchange pairs of items between clusters while that lowers the total distance (sizes unchanged).

    Each round every item finds the partner whose exchange gains most; pairs that choose each other
    swap, all at once (such pairs are disjoint). Stops after a round without a swap or max_rounds."""
    n = distances.shape[0]
    items = jnp.arange(n)

    def has_swaps(state):
        _, rounds, swapped = state
        return swapped & (rounds < max_rounds)

    def one_round(state):
        assign, rounds, _ = state
        own = distances[items, assign]
        cross = distances[:, assign]                                  # [i, j]: d(i, cluster of j)
        gain = own[:, None] + own[None, :] - cross - cross.T
        gain = jnp.where(assign[:, None] == assign[None, :], -jnp.inf, gain)
        partner = jnp.argmax(gain, 1)
        mutual = (partner[partner] == items) & (jnp.max(gain, 1) > 1e-6 * jnp.maximum(own, 1e-30))
        return jnp.where(mutual, assign[partner], assign), rounds + 1, jnp.any(mutual)

    assign, _, _ = jax.lax.while_loop(has_swaps, one_round, (assign, 0, True))
    return assign


def balanced_assign(distances: jax.Array, swap_rounds: int = 0) -> jax.Array:
    """Assignment of n items to k centres with floor(n/k) or ceil(n/k) items each: greedy by distance,
    then up to `swap_rounds` rounds of pairwise exchanges."""
    n, k = distances.shape
    base = n // k
    assign = jnp.full(n, -1, jnp.int32)
    none = jnp.zeros(n, bool)
    assign = _capacitated_assign(distances, jnp.full(k, base, jnp.int32), none, assign)
    assign = _capacitated_assign(distances, jnp.ones(k, jnp.int32), assign >= 0, assign)
    return _improve_by_swaps(distances, assign, swap_rounds) if swap_rounds else assign


@partial(jax.jit, static_argnames=("k", "iterations", "balanced", "swap_rounds", "final_swap_rounds"))
def kmeans(key: jax.Array, x: jax.Array, k: int, iterations: int, balanced: bool = False,
           swap_rounds: int = SWAP_ROUNDS, final_swap_rounds: int = FINAL_SWAP_ROUNDS
           ) -> tuple[jax.Array, jax.Array]:
    """(centres [k, d], assignment [n]) after k-means++ seeding and at most `iterations` Lloyd steps
    (fewer once a step leaves every assignment unchanged); the returned assignment is for the final
    centres (nearest centre, or balanced with up to final_swap_rounds exchange rounds; swap_rounds in
    each Lloyd step)."""
    if balanced:
        assign_step = partial(balanced_assign, swap_rounds=swap_rounds)
        final_step = partial(balanced_assign, swap_rounds=final_swap_rounds)
    else:
        assign_step = final_step = lambda d: jnp.argmin(d, 1).astype(jnp.int32)
    centres = kmeans_plus_plus(key, x, k)

    def not_converged(state):
        i, _, _, changed = state
        return (i < iterations) & changed

    def step(state):
        i, centres, previous, _ = state
        distances = squared_distances(x, centres)
        assign = assign_step(distances)
        return i + 1, _update_centres(x, assign, centres, distances), assign, jnp.any(assign != previous)

    start = (0, centres, jnp.full(x.shape[0], -1, jnp.int32), True)
    _, centres, _, _ = jax.lax.while_loop(not_converged, step, start)
    return centres, final_step(squared_distances(x, centres))
