"""The synthetic catalogue: layout, determinism, structure a model can learn, tokenizer, baseline."""

from collections import Counter, defaultdict

import pytest

from sidrec.config import ALL_TASKS
from sidrec.data import minionerec, synthetic
from sidrec.metrics import most_popular_baseline
from sidrec.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return synthetic.write_synthetic(tmp_path_factory.mktemp("data"), n_items=200, n_users=600, seed=5)


@pytest.fixture(scope="module")
def catalogue(root):
    return minionerec.load_catalogue(root, "Synthetic")


@pytest.fixture(scope="module")
def splits(catalogue):
    return {split: minionerec.load_split(catalogue, split) for split in minionerec.SPLITS}


def file_bytes(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted((root / "Amazon").rglob("*")) if p.is_file()}


def test_deterministic_from_seed(root, tmp_path):
    same = synthetic.write_synthetic(tmp_path / "same", n_items=200, n_users=600, seed=5)
    other = synthetic.write_synthetic(tmp_path / "other", n_items=200, n_users=600, seed=6)
    assert file_bytes(same) == file_bytes(root)
    assert file_bytes(other) != file_bytes(root)
    assert not list(tmp_path.glob("*/.Amazon-*"))  # no staging directory left behind


def test_layout_is_minionerec(catalogue, splits):
    assert catalogue.depth == 3 and len(catalogue.item_ids) == 200
    assert len(set(catalogue.sid_of.values())) == 200 and len(set(catalogue.titles.values())) == 200
    sizes = {split: len(rows) for split, rows in splits.items()}
    total = sum(sizes.values())
    assert abs(sizes["train"] / total - 0.8) < 0.01 and abs(sizes["valid"] / total - 0.1) < 0.01
    for rows in splits.values():
        for row in rows:
            assert 1 <= len(row.history_sids) <= synthetic.MAX_HISTORY
            assert row.history_sids == tuple(catalogue.sid_of[i] for i in row.history_item_ids)
            assert row.item_title == catalogue.titles[row.item_id]


def test_titles_name_their_sid_prefix(catalogue):
    nouns_of_family = defaultdict(set)
    for item, sid in catalogue.sid_tokens_of.items():
        nouns_of_family[sid[0]] |= {w for w in catalogue.titles[item].split() if w in synthetic.NOUNS}
    assert all(len(nouns) == 1 for nouns in nouns_of_family.values())
    assert len({next(iter(n)) for n in nouns_of_family.values()}) == len(nouns_of_family)


def test_next_item_is_learnable_and_beats_most_popular(catalogue, splits):
    """A bigram count model (last item -> next) clearly beats popularity: there is signal to learn."""
    follows = defaultdict(Counter)
    for row in splits["train"]:
        follows[row.history_sids[-1]][row.item_sid] += 1
    popular = [sid for sid, _ in Counter(r.item_sid for r in splits["train"]).most_common()]
    test = splits["test"]
    hits = sum(row.item_sid in ([s for s, _ in follows[row.history_sids[-1]].most_common(10)] + popular)[:10]
               for row in test)
    baseline = most_popular_baseline((r.item_sid for r in splits["train"]), (r.item_sid for r in test),
                                     catalogue.valid_sids)
    assert hits / len(test) > 2 * baseline["hr"]["10"]
    same_family = sum(row.item_sid[:row.item_sid.index(">") + 1] == row.history_sids[-1][:row.history_sids[-1].index(">") + 1]
                      for row in splits["train"]) / len(splits["train"])
    assert same_family > 0.6


def test_most_popular_baseline_is_popularity_hit_rate(catalogue, splits):
    metrics = most_popular_baseline((r.item_sid for r in splits["train"]), (r.item_sid for r in splits["valid"]),
                                    catalogue.valid_sids)
    popular = [sid for sid, _ in Counter(r.item_sid for r in splits["train"]).most_common(50)]
    valid = splits["valid"]
    for k in (1, 10, 50):
        assert metrics["hr"][str(k)] == pytest.approx(sum(r.item_sid in popular[:k] for r in valid) / len(valid))
    assert metrics["n_samples"] == len(valid) and metrics["n_beams"] == 50


def test_bpe_tokenizer(catalogue, splits, tmp_path):
    texts = [e.instruction + e.prompt + e.target
             for e in minionerec.training_examples(catalogue, ALL_TASKS, splits["train"])]
    info = synthetic.train_bpe_tokenizer(texts, catalogue.sid_tokens, vocab_size=600, out_dir=tmp_path)
    vocab = info.tokenizer.get_vocab_size()
    assert vocab <= 600 + len(catalogue.sid_tokens)
    ids = [info.tokenizer.token_to_id(t) for t in catalogue.sid_tokens]
    assert ids == list(range(vocab - len(ids), vocab))  # appended in sorted order, as upstream
    assert info.tokenizer.id_to_token(info.eos_id) == "<|im_end|>"
    assert info.tokenizer.id_to_token(info.pad_id) == "<|endoftext|>"
    sample = texts[-1]
    encoded = info.tokenizer.encode(sample, add_special_tokens=False).ids
    assert len(encoded) < len(sample) / 2  # real merges, not bytes
    assert info.tokenizer.decode(encoded) == sample
    reloaded = load_tokenizer(tmp_path)
    assert reloaded.eos_id == info.eos_id
    assert reloaded.tokenizer.encode(sample, add_special_tokens=False).ids == encoded
