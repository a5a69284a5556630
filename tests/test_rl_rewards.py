"""Rewards and advantages equal upstream rl.py's on golden_rl.json's groups, plus prefix reward and errors.

Golden values are upstream's Python-float (float64) rewards and the advantage of the "ranking" reward;
we compare in float64 at rtol 1e-6 / atol 1e-7. Upstream's trainer itself holds rewards in float32
(torch.tensor(..., float32)), so float32 is checked too, at rtol 1e-5 / atol 1e-6 (float32 resolution
of mean and std over 16 values).
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sidrec.data.minionerec import load_catalogue, split_sid
from sidrec.errors import UserError
from sidrec.rl import rewards
from sidrec.tokenizer import add_sid_tokens, load_tokenizer

SHARED = Path(__file__).parents[2] / "shared"
GOLDEN = SHARED / "reference" / "golden_rl.json"
CATEGORIES = ("Industrial_and_Scientific", "Office_Products")
needs_shared = pytest.mark.skipif(not GOLDEN.is_file(), reason=f"{SHARED} (MiniOneRec data + golden_rl.json) is absent")
F64 = dict(rtol=1e-6, atol=1e-7)
F32 = dict(rtol=1e-5, atol=1e-6)


@cache
def golden_arrays():
    """Every golden case as ids: completions [B, G, D], targets [B, D] (tokenizer of both categories),
    and the expected arrays [B, G]."""
    golden = json.loads(GOLDEN.read_text())["rewards"]
    tokens = [t for c in CATEGORIES for t in load_catalogue(SHARED / "data", c).sid_tokens]
    vocab = add_sid_tokens(load_tokenizer(SHARED / "tokenizers" / "qwen2.5"), tokens).tokenizer
    ids = lambda text: [vocab.token_to_id(t) for t in split_sid(text.rstrip("\n"))]
    cases = golden["cases"]
    assert all(len(c["completions"]) == golden["num_generations"] for c in cases)
    expected = {key: np.array([c[key] for c in cases])
                for key in ("rule_reward", "ndcg_rule_reward", "ranking_reward", "advantage")}
    hit_rank = [c["hit_rank"] for c in cases]
    return (np.array([[ids(t) for t in c["completions"]] for c in cases], np.int32),
            np.array([ids(c["target"]) for c in cases], np.int32), expected, hit_rank)


@needs_shared
def test_golden_cases_cover_hits_at_several_ranks_and_misses():
    _, _, _, hit_rank = golden_arrays()
    assert None in hit_rank and {0, 15} <= set(hit_rank)


@needs_shared
@pytest.mark.parametrize(("reward_type", "key"), [("rule", "rule_reward"), ("ranking_only", "ndcg_rule_reward"),
                                                   ("ranking", "ranking_reward")])
def test_golden_rewards_float64(reward_type, key):
    completions, targets, expected, _ = golden_arrays()
    with jax.enable_x64(True):
        got = rewards.compute_rewards(reward_type, jnp.asarray(completions), jnp.asarray(targets), dtype=jnp.float64)
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(got), expected[key], **F64)


@needs_shared
def test_golden_advantages_float64():
    completions, targets, expected, _ = golden_arrays()
    with jax.enable_x64(True):
        ranking = rewards.compute_rewards("ranking", jnp.asarray(completions), jnp.asarray(targets), dtype=jnp.float64)
        np.testing.assert_allclose(np.asarray(rewards.group_advantages(ranking)), expected["advantage"], **F64)


@needs_shared
def test_golden_rewards_and_advantages_float32_under_jit():
    completions, targets, expected, hit_rank = golden_arrays()
    step = jax.jit(lambda c, t: (rewards.compute_rewards("ranking", c, t),
                                 rewards.group_advantages(rewards.compute_rewards("ranking", c, t)),
                                 rewards.exact_match(c, t)))
    ranking, advantage, hit = step(jnp.asarray(completions), jnp.asarray(targets))
    assert ranking.dtype == advantage.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(ranking), expected["ranking_reward"], **F32)
    np.testing.assert_allclose(np.asarray(advantage), expected["advantage"], **F32)
    hit = np.asarray(hit)
    assert [int(np.argmax(h)) if h.any() else None for h in hit] == hit_rank


# ----------------------------------------------------------------------------------------------------
# Without ../shared


TARGET = np.array([[1, 2, 3]], np.int32)
GROUP = np.array([[[1, 2, 3], [1, 2, 9], [1, 9, 3], [9, 2, 3]]], np.int32)  # exact, 2 levels, 1 level, none


def test_prefix_reward_credits_leading_levels_only():
    got = rewards.compute_rewards("prefix", jnp.asarray(GROUP), jnp.asarray(TARGET))
    np.testing.assert_allclose(np.asarray(got), [[1.0, 2 / 3, 1 / 3, 0.0]], rtol=1e-6)
    # no hit, still variance (the point of the prefix reward); rule gives a flat, signal-free group
    no_hit = GROUP[:, 1:]
    assert np.asarray(rewards.compute_rewards("prefix", no_hit, TARGET)).std() > 0
    assert not np.asarray(rewards.group_advantages(rewards.compute_rewards("rule", no_hit, TARGET))).any()


def test_valid_mask_turns_hits_into_misses():
    valid = jnp.asarray([[False, True, True, True]])
    assert np.asarray(rewards.compute_rewards("rule", GROUP, TARGET, valid)).tolist() == [[0.0] * 4]
    assert np.asarray(rewards.compute_rewards("prefix", GROUP, TARGET, valid))[0, 0] == 0.0
    assert not np.asarray(rewards.compute_rewards("ranking_only", GROUP, TARGET, valid)).any()


def test_ndcg_rule_reward_when_hit_is_not_first():
    group = GROUP[:, ::-1]  # the hit at rank 3 of 4
    penalties = -1 / np.log2(np.arange(4) + 2)
    penalties = penalties / -penalties.sum()
    expected = np.where(np.arange(4) == 3, 0.0, penalties)
    np.testing.assert_allclose(np.asarray(rewards.compute_rewards("ranking_only", group, TARGET))[0], expected, rtol=1e-6)
    np.testing.assert_allclose(float(rewards.ndcg_penalties(16).sum()), -1.0, rtol=1e-6)


def test_unknown_reward_type_is_a_user_error_naming_field_and_choices():
    with pytest.raises(UserError, match=r"--rl\.reward_type 'semantic' is not a reward type; choose from \['rule'"):
        rewards.compute_rewards("semantic", GROUP, TARGET)
    with pytest.raises(rewards.RewardError, match="--rl.reward-type 'nope'"):
        rewards.check_reward_type("nope", field="rl.reward-type")
    assert rewards.reward_types() == ("rule", "ranking", "ranking_only", "prefix")
    assert all(rewards.check_reward_type(name) == name for name in rewards.reward_types())


def test_group_of_one_is_refused():
    with pytest.raises(rewards.RewardError, match="num_generations"):
        rewards.group_advantages(jnp.ones((2, 1)))
