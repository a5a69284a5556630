"""GRPO rewards and advantages as pure jnp functions on token ids, usable inside jit.

Upstream (rl.py) decodes each completion to text and compares strings; our rollouts are trie-constrained
beam searches whose hypotheses are SID token ids already, and SID tokens are whole added tokens, so
"the decoded text equals the target SID" is "the D token ids equal the target's". Shapes: completions
[B, G, D] (G = group size = num_generations, the beams of one prompt in beam order, best first; D = SID
depth), targets [B, D], an optional `valid` [B, G] mask (False: a hypothesis that is not a SID, e.g. a
dead beam; it never matches). Rewards come back [B, G] in `dtype`.

Reward types (rl.py's `reward_type`; "prefix" is ours):
- "rule": 1 for the exact target, else 0 (rule_reward).
- "ranking_only": ndcg_rule_reward. When the group holds the target, every wrong completion at beam rank
  i gets -(1/log2(i+2)) / sum_{j<G} 1/log2(j+2) (a high-ranked mistake costs most) and the hit gets 0;
  a group without the target gets 0 everywhere.
- "ranking": rule + ndcg_rule (upstream's list of two reward functions, summed with weight 1 each).
- "prefix": partial credit by SID level, see `prefix_reward`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sidrec.errors import UserError

REWARD_TYPES = ("rule", "ranking", "ranking_only", "prefix")
ADVANTAGE_EPS = 1e-4  # upstream: (r - mean) / (std + 1e-4)


class RewardError(UserError):
    """An unusable reward setting; the message names the field and the choices."""


def reward_types() -> tuple[str, ...]:
    """The valid values of the RL reward type (for config validation and --help)."""
    return REWARD_TYPES


def check_reward_type(reward_type: str, field: str = "rl.reward_type") -> str:
    """Return `reward_type` if known, else raise RewardError naming `field` and the choices."""
    if reward_type not in REWARD_TYPES:
        raise RewardError(f"--{field} {reward_type!r} is not a reward type; choose from {list(REWARD_TYPES)} "
                          "(upstream's 'semantic' and 'sasrec' need external models and are not provided)")
    return reward_type


def matched_levels(completion_ids: jax.Array, target_ids: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """int32 [B, G]: how many leading SID levels of each completion equal the target's (0..D)."""
    equal = completion_ids == target_ids[:, None, :]
    levels = jnp.sum(jnp.cumprod(equal.astype(jnp.int32), axis=-1), axis=-1)
    return levels if valid is None else jnp.where(valid, levels, 0)


def exact_match(completion_ids: jax.Array, target_ids: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """bool [B, G]: the completion is the target SID."""
    return matched_levels(completion_ids, target_ids, valid) == completion_ids.shape[-1]


def rule_reward(completion_ids, target_ids, valid=None, dtype=jnp.float32) -> jax.Array:
    """1 for the exact target SID, 0 otherwise (upstream's rule_reward)."""
    return exact_match(completion_ids, target_ids, valid).astype(dtype)


def ndcg_penalties(group_size: int, dtype=jnp.float32) -> jax.Array:
    """[G]: -(1/log2(i+2)) / sum_j 1/log2(j+2), computed in float64 as upstream (Python floats) then cast."""
    discounts = 1.0 / np.log2(np.arange(group_size, dtype=np.float64) + 2.0)
    return jnp.asarray(-discounts / discounts.sum(), dtype=dtype)


def ndcg_rule_reward(completion_ids, target_ids, valid=None, dtype=jnp.float32) -> jax.Array:
    """Upstream's ndcg_rule_reward: in a group holding the target, wrong completions pay their rank's
    share of the NDCG discount (so the policy learns to rank the hit first); groups without it get 0."""
    hit = exact_match(completion_ids, target_ids, valid)
    penalties = jnp.where(hit, 0.0, ndcg_penalties(hit.shape[-1], dtype))
    return jnp.where(jnp.any(hit, axis=-1, keepdims=True), penalties, 0.0).astype(dtype)


def prefix_reward(completion_ids, target_ids, valid=None, dtype=jnp.float32) -> jax.Array:
    """(leading SID levels equal to the target's) / D: 1 for the exact item, 1/D per matched level.

    Why: SID levels are residual-quantiser codes, coarse to fine, so a shared prefix means the same coarse
    cluster (a semantically near item) and deserves some credit; a level after the first mismatch refines a
    different cluster and means nothing, so credit stops there. Equal 1/D steps keep the reward in [0, 1]
    with the hit at 1, as "rule". Unlike "rule", a group of constrained beams without the hit (most groups
    early in training) still has reward variance, hence a learning signal.
    """
    return (matched_levels(completion_ids, target_ids, valid) / completion_ids.shape[-1]).astype(dtype)


def compute_rewards(reward_type: str, completion_ids, target_ids, valid=None, dtype=jnp.float32) -> jax.Array:
    """[B, G] rewards of `reward_type` (a static Python string; validated here, before any tracing)."""
    check_reward_type(reward_type)
    if completion_ids.ndim != 3 or target_ids.shape != (completion_ids.shape[0], completion_ids.shape[2]):
        raise ValueError(f"expected completions [B, G, D] and targets [B, D], got {completion_ids.shape} and "
                         f"{target_ids.shape}")
    args = (completion_ids, target_ids, valid, dtype)
    if reward_type == "rule":
        return rule_reward(*args)
    if reward_type == "ranking":
        return rule_reward(*args) + ndcg_rule_reward(*args)
    if reward_type == "ranking_only":
        return ndcg_rule_reward(*args)
    return prefix_reward(*args)


def group_advantages(rewards: jax.Array, eps: float = ADVANTAGE_EPS) -> jax.Array:
    """GRPO advantages [B, G]: (r - group mean) / (group std, unbiased (ddof=1), + eps), as upstream (torch's
    .std() is unbiased). A group of equal rewards gets 0 everywhere."""
    if rewards.shape[-1] < 2:
        raise RewardError(f"num_generations (the group size) must be >= 2 for GRPO advantages, got {rewards.shape[-1]}")
    mean = jnp.mean(rewards, axis=-1, keepdims=True)
    std = jnp.std(rewards, axis=-1, keepdims=True, ddof=1)
    return (rewards - mean) / (std + eps)
