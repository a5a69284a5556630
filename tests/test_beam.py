"""Beam search: enumeration on a tiny vocabulary, transformers parity fixtures, decoding, bucketing."""

import importlib.util
import itertools
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sidrec.data.minionerec import eval_examples, load_catalogue, split_sid
from sidrec.decode.beam import DISALLOWED, beam_search
from sidrec.decode.trie import build_trie, trie_from_token_ids
from sidrec.evaluate import batch_prompts, bucket_length, decode_predictions
from sidrec.model import hf, qwen2
from sidrec.tokenizer import add_sid_tokens, load_tokenizer

NEWLINE, EOS = 3, 4


def _sequence_logprobs(params, cfg, prompt, suffixes) -> np.ndarray:
    """Sum of log p(token | everything before) over each suffix, by plain forward passes (no cache).

    Suffixes may differ in length: they are EOS-padded and only their own tokens are summed."""
    length = max(map(len, suffixes))
    tokens = jnp.array([prompt + list(s) + [EOS] * (length - len(s)) for s in suffixes])
    counted = jnp.arange(length) < jnp.array([len(s) for s in suffixes])[:, None]
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    logits = jax.jit(qwen2.forward, static_argnums=1)(params, cfg, tokens, jnp.ones_like(tokens), positions)
    logp = jax.nn.log_softmax(logits[:, len(prompt) - 1:-1], axis=-1)
    picked = jnp.take_along_axis(logp, tokens[:, len(prompt):, None], axis=-1)[..., 0]
    return np.asarray(jnp.where(counted, picked, 0.0).sum(axis=1))


@pytest.mark.parametrize("tied,vocab_size", [(True, 6), (False, 8)])
def test_unconstrained_search_wider_than_all_continuations_matches_enumeration(tied, vocab_size):
    # Depth-1 "SIDs" -> 3 generated tokens over a 6-token vocabulary (EOS among them): with 160 beams
    # nothing is pruned, so the finished set is every terminal sequence (EOS ends one early), ranked.
    # (Plain forward passes as the reference; HF parity below covers the constrained search.) Both head
    # layouts (tied embedding, lm_head); 8 has 2 padding entries that must never be generated or counted.
    cfg = qwen2.Qwen2Config(vocab_size=vocab_size, real_vocab_size=6, hidden_size=32, intermediate_size=64,
                            num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, tie_word_embeddings=tied,
                            init_std=0.3)
    params = jax.jit(qwen2.init_params, static_argnums=0)(cfg, jax.random.key(1))  # one compile, not one per op
    trie = trie_from_token_ids([[0]], NEWLINE, EOS)
    prompt = [1, 2, 0, 5]
    terminal = [[EOS]] + [[a, EOS] for a in range(6) if a != EOS]
    terminal += [[a, b, c] for a, b, c in itertools.product(range(6), repeat=3) if EOS not in (a, b)]
    assert len(terminal) == 156

    tokens = jnp.array([prompt])
    sequences, scores = map(np.asarray, beam_search(params, cfg, trie, tokens, jnp.ones_like(tokens),
                                                    num_beams=160, constrained=False))
    expected = _sequence_logprobs(params, cfg, prompt, terminal)
    order = np.argsort(-expected)
    padded = [s + [EOS] * (3 - len(s)) for s in terminal]
    np.testing.assert_array_equal(sequences[0, :156], np.array(padded)[order])
    # cached decoding vs plain forward, fp32: sums of 3 log-probs agree to ~1e-6
    np.testing.assert_allclose(scores[0, :156], expected[order], atol=1e-4)
    assert (scores[0, 156:] < -1e8).all()  # the 4 slots left are empty (HF: -1e9)



# ----------------------------------------------------------------------------------------------------
# Parity with transformers' beam search (fixtures from tests/fixtures/make_beam_fixtures.py)

SHARED = Path(__file__).parents[2] / "shared"
FIXTURES = Path(__file__).parent / "fixtures"
CATEGORY = "Industrial_and_Scientific"
needs_shared = pytest.mark.skipif(not (SHARED / "data" / "Amazon").is_dir(),
                                  reason="../shared (Industrial data + Qwen2.5 tokenizer) is not available")


def _fixture_module():
    spec = importlib.util.spec_from_file_location("make_beam_fixtures", FIXTURES / "make_beam_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def industrial(tmp_path_factory):
    """The tiny model of the fixtures (rebuilt from its numpy seed), the tokenizer and the catalogue."""
    recipe = _fixture_module()
    directory = tmp_path_factory.mktemp("tiny_qwen2")
    recipe.write_checkpoint(directory)
    params, cfg = hf.load_model(directory)
    catalogue = load_catalogue(SHARED / "data", CATEGORY)
    info = add_sid_tokens(load_tokenizer(SHARED / "tokenizers" / "qwen2.5"), catalogue.sid_tokens)
    reference = dict(np.load(FIXTURES / "beam" / "hf_beam_search.npz"))
    prompts = [row[row >= 0] for row in reference["prompts"]]
    return SimpleNamespace(params=params, cfg=cfg, catalogue=catalogue, info=info, reference=reference,
                           prompts=prompts, recipe=recipe,
                           trie=build_trie(catalogue.sid_tokens_of.values(), info))


def _run(env, trie, prompts, constrained: bool):
    """Our beam search over prompts in bucketed batches of the fixture's size -> (sequences, scores)."""
    sequences = np.zeros((len(prompts), env.recipe.NUM_BEAMS, trie.num_steps), np.int32)
    scores = np.zeros((len(prompts), env.recipe.NUM_BEAMS), np.float32)
    for batch in batch_prompts(prompts, env.recipe.BATCH_SIZE, env.info.eos_id):
        out = beam_search(env.params, env.cfg, trie, jnp.asarray(batch.tokens), jnp.asarray(batch.mask),
                          num_beams=env.recipe.NUM_BEAMS, constrained=constrained)
        real = batch.indices >= 0
        sequences[batch.indices[real]], scores[batch.indices[real]] = (np.asarray(x)[real] for x in out)
    return sequences, scores


def _assert_same_ranking(ours, our_scores, theirs, their_scores, prompt: int):
    """Identical lists in order, except swaps of entries whose (HF) scores differ by < 1e-4; scores
    within 1e-3 position by position (fp32 JAX vs fp32 torch: per-token log-probs agree to ~1e-5)."""
    where = f"prompt {prompt}"
    np.testing.assert_allclose(our_scores, their_scores, rtol=0, atol=1e-3, err_msg=where)
    for rank, sequence in enumerate(ours):
        if (sequence == theirs[rank]).all():
            continue
        found = np.flatnonzero((theirs == sequence).all(axis=1))
        # not found: a tie at the cut-off, where either side may keep a different last hypothesis
        other = their_scores[found[0]] if found.size else our_scores[rank]
        assert abs(other - their_scores[rank]) < 1e-4, f"{where}, rank {rank}: {sequence} vs {theirs[rank]}"


@needs_shared
@pytest.mark.parametrize("mode", ["constrained", "unconstrained"])
def test_matches_transformers_beam_search_on_industrial_prompts(industrial, mode):
    env = industrial
    sequences, scores = _run(env, env.trie, env.prompts, constrained=mode == "constrained")
    expected_sequences, expected_scores = env.reference[f"{mode}_sequences"], env.reference[f"{mode}_scores"]
    assert len(env.prompts) >= 32 and sequences.shape == expected_sequences.shape
    for prompt in range(len(env.prompts)):
        _assert_same_ranking(sequences[prompt], scores[prompt], expected_sequences[prompt],
                             expected_scores[prompt], prompt)
    # upstream's predict strings: transformers' batch_decode(skip_special_tokens) then split + strip
    assert decode_predictions(expected_sequences, env.info) == env.reference[f"{mode}_predict"].tolist()


@needs_shared
def test_fewer_sids_than_beams_ranks_off_trie_hypotheses_like_transformers(industrial):
    env = industrial
    info_lines = env.catalogue.paths.info.read_text().splitlines()
    small = [split_sid(line.split("\t")[0]) for line in info_lines[:env.recipe.SMALL_CATALOGUE]]
    trie = build_trie(small, env.info)
    prompts = env.prompts[:env.recipe.BATCH_SIZE]
    sequences, scores = _run(env, trie, prompts, constrained=True)
    expected_sequences, expected_scores = env.reference["small_sequences"], env.reference["small_scores"]
    valid = len(set(small))
    # the fixture does exercise the tail: every SID first, then hypotheses that left the trie
    assert (expected_scores[:, :valid] > DISALLOWED / 2).all() and (expected_scores[:, valid:] < DISALLOWED / 2).all()
    for prompt in range(len(prompts)):
        _assert_same_ranking(sequences[prompt], scores[prompt], expected_sequences[prompt],
                             expected_scores[prompt], prompt)
    # The tail ties at -1e6's fp32 spacing (0.0625), so its order is torch's vs XLA's tie-breaking.
    # It decodes to a SID, the newline and a stray token: e.g. '<a_23><b_32><c_151>\n招生'.
    assert decode_predictions(expected_sequences, env.info) == env.reference["small_predict"].tolist()


# ----------------------------------------------------------------------------------------------------
# Bucketing: a whole split compiles once per prompt-length bucket


def test_bucket_length_rounds_up_to_multiples_of_64():
    assert [bucket_length(n) for n in (1, 64, 65, 121, 128, 129)] == [64, 64, 128, 128, 128, 192]


def test_batches_group_by_bucket_left_pad_and_fill_the_last_batch():
    prompts = [[1] * 10, [2] * 70, [3] * 20, [4] * 130, [5] * 60]
    batches = batch_prompts(prompts, batch_size=2, pad_id=0)
    assert [b.tokens.shape for b in batches] == [(2, 64), (2, 64), (2, 128), (2, 192)]
    assert [b.indices.tolist() for b in batches] == [[0, 2], [4, -1], [1, -1], [3, -1]]
    tokens, mask = batches[0].tokens, batches[0].mask
    np.testing.assert_array_equal(tokens[1], [0] * 44 + [3] * 20)
    np.testing.assert_array_equal(mask[1], [0] * 44 + [1] * 20)
    filler = batches[1]  # its second row repeats the first so the shape stays static
    np.testing.assert_array_equal(filler.tokens[1], filler.tokens[0])


@needs_shared
def test_the_whole_industrial_test_set_compiles_once(industrial):
    env = industrial
    examples = eval_examples(env.catalogue, "test", env.info)
    batches = batch_prompts([e.prompt_ids for e in examples], env.recipe.BATCH_SIZE, env.info.eos_id)
    lengths = [len(e.prompt_ids) for e in examples]
    # 4533 prompts of 76..121 tokens: a single bucket (the bound is ceil(longest / 64) shapes)
    assert len(examples) == 4533 and (min(lengths), max(lengths)) == (76, 121)
    assert {b.tokens.shape for b in batches} == {(8, 128)} and len(batches) == 567

    def run(batch):
        jax.block_until_ready(beam_search(env.params, env.cfg, env.trie, jnp.asarray(batch.tokens),
                                          jnp.asarray(batch.mask), num_beams=50))
        return beam_search._cache_size()

    before = beam_search._cache_size()
    after_first = run(batches[0])
    assert after_first - before <= 1  # 0 when an earlier test already compiled this shape
    assert run(batches[-1]) == after_first  # the last, filler-completed batch reuses it
