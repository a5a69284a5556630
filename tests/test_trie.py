"""The SID trie against upstream's own construction: a dict from generated prefix to allowed tokens,
built (as MiniOneRec's evaluate.py does) by tokenizing "### Response:\\n" + SID + "\\n" and appending EOS."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sidrec.decode.trie import (
    INVALID_NODE,
    ROOT_NODE,
    TrieError,
    build_trie,
    candidates,
    trie_from_token_ids,
)
from sidrec.tokenizer import add_sid_tokens, load_tokenizer

SHARED = Path(__file__).parents[2] / "shared"
TOKENIZER_DIR = SHARED / "tokenizers" / "qwen2.5"
INFO = SHARED / "data" / "Amazon" / "info" / "Industrial_and_Scientific_5_2016-10-2018-11.txt"
needs_shared = pytest.mark.skipif(not INFO.is_file() or not TOKENIZER_DIR.is_dir(),
                                  reason="../shared (Industrial data + Qwen2.5 tokenizer) is not available")


def _split(sid: str) -> tuple[str, ...]:
    return tuple("<" + part for part in sid.split("<")[1:])


@pytest.fixture(scope="module")
def industrial():
    sids = [line.split("\t")[0].strip() for line in INFO.read_text().splitlines()]
    info = add_sid_tokens(load_tokenizer(TOKENIZER_DIR), {t for sid in sids for t in _split(sid)})
    return sids, info


def _upstream_allowed(sids, info) -> dict[tuple[int, ...], set[int]]:
    """Generated prefix (token ids after '### Response:\\n') -> allowed next tokens, upstream's way."""
    allowed = {}
    for sid in sids:
        ids = info.tokenizer.encode(f"### Response:\n{sid}\n", add_special_tokens=False).ids + [info.eos_id]
        for i in range(3, len(ids)):
            allowed.setdefault(tuple(ids[3:i]), set()).add(ids[i])
    return allowed


@needs_shared
def test_every_prefix_allows_exactly_upstreams_tokens(industrial):
    sids, info = industrial
    trie = build_trie([_split(s) for s in sids], info)
    expected = _upstream_allowed(sids, info)
    frontier = {(): ROOT_NODE}
    seen = 0
    for level in range(trie.num_steps):
        prefixes = list(frontier)
        tokens, slots, children, valid = map(np.asarray, candidates(trie, jnp.array([frontier[p] for p in prefixes]),
                                                                    level))
        np.testing.assert_array_equal(np.asarray(trie.tokens)[slots[valid]], tokens[valid])
        next_frontier = {}
        for row, prefix in enumerate(prefixes):
            assert set(tokens[row][valid[row]].tolist()) == expected[prefix], prefix
            for token, child in zip(tokens[row][valid[row]], children[row][valid[row]]):
                next_frontier[prefix + (int(token),)] = int(child)
        seen += len(prefixes)
        frontier = next_frontier
    assert seen == len(expected)  # every upstream prefix was reached
    leaves = np.asarray(candidates(trie, jnp.array(list(frontier.values())))[3])
    assert len(frontier) == 3670 and not leaves.any()  # distinct SIDs; a full suffix allows nothing more
    assert trie.level_fanout[0] == 48 and trie.level_fanout[3:] == (1, 1)
    assert trie.num_nodes == len(expected) + 3670  # root and inner prefixes + leaves


def test_padding_and_invalid_node_are_masked():
    trie = trie_from_token_ids([[5, 7], [5, 8], [6, 7], [5, 7]], newline_id=1, eos_id=2)
    assert trie.level_fanout == (2, 2, 1, 1)
    tokens, _, children, valid = candidates(trie, jnp.array([[ROOT_NODE, INVALID_NODE]]), 0)
    np.testing.assert_array_equal(tokens, [[[5, 6], [0, 0]]])
    np.testing.assert_array_equal(valid, [[[True, True], [False, False]]])
    first_6 = int(children[0, 0, 1])
    tokens, _, children, valid = candidates(trie, jnp.array([first_6]), 1)  # '6' has one child of two slots
    np.testing.assert_array_equal(tokens, [[7, 0]])
    np.testing.assert_array_equal(valid, [[True, False]])
    assert int(children[0, 1]) == INVALID_NODE


def test_candidates_inside_jit_with_a_traced_level_pads_to_the_widest_level():
    trie = trie_from_token_ids([[5, 7], [5, 8], [5, 9], [6, 7]], newline_id=1, eos_id=2)

    @jax.jit
    def walk(path):
        node = jnp.array(ROOT_NODE)
        for token in path:
            tokens, _, children, valid = candidates(trie, node)
            node = jnp.where(valid & (tokens == token), children, INVALID_NODE).max()
        return candidates(trie, node)

    tokens, _, _, valid = walk(jnp.array([5, 9, 1]))
    assert tokens.shape == (3,) and trie.max_fanout == 3
    np.testing.assert_array_equal(np.asarray(tokens)[np.asarray(valid)], [2])  # after '\n' only EOS
    _, _, _, valid = walk(jnp.array([6, 9, 1]))  # '6 9' is not a SID
    assert not np.asarray(valid).any()


@needs_shared
def test_bad_catalogues_fail_with_clear_errors(industrial):
    _, info = industrial
    with pytest.raises(TrieError, match="no SIDs"):
        build_trie([], info)
    with pytest.raises(TrieError, match="has depth 3 but '<a_223><b_80>' has depth 2"):
        build_trie([("<a_223>", "<b_80>"), ("<a_223>", "<b_80>", "<c_165>")], info)
    with pytest.raises(TrieError, match="'<z_1>' is not in the tokenizer's vocabulary"):
        build_trie([("<a_223>", "<z_1>", "<c_165>")], info)
