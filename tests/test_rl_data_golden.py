"""RL datasets equal upstream rl.py's (shared/reference/golden_rl.json), plus the fixed (no-leak) prompts.

The golden file was made by upstream data.py (HEAD 81b4ba9) on data/Amazon; prompt_ids are TRL's (the
prompt alone, no special tokens) with tokenizers/qwen2.5 extended by the sorted SID tokens of BOTH
categories. Exact equality is the only tolerance. The synthetic tests at the end need no ../shared.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import numpy as np
import pytest

from sidrec.data import minionerec, synthetic
from sidrec.rl import data as rl_data
from sidrec.tokenizer import add_sid_tokens, load_tokenizer

SHARED = Path(__file__).parents[2] / "shared"
GOLDEN = SHARED / "reference" / "golden_rl.json"
CATEGORIES = ("Industrial_and_Scientific", "Office_Products")
needs_shared = pytest.mark.skipif(not GOLDEN.is_file(), reason=f"{SHARED} (MiniOneRec data + golden_rl.json) is absent")
UPSTREAM = rl_data.RLOptions()


@cache
def golden():
    return json.loads(GOLDEN.read_text())


@cache
def catalogue(category):
    return minionerec.load_catalogue(SHARED / "data", category)


@cache
def tokenizer():
    tokens = [t for category in CATEGORIES for t in catalogue(category).sid_tokens]
    return add_sid_tokens(load_tokenizer(SHARED / "tokenizers" / "qwen2.5"), tokens)


@cache
def datasets(category, options=UPSTREAM):
    """Our texts under golden_rl.json's dataset names."""
    cat = catalogue(category)
    train, valid = minionerec.load_split(cat, "train"), minionerec.load_split(cat, "valid")
    return {"SidDataset_train": rl_data.sid_dataset(cat, train, options.sid_sample, options.seed),
            "RLTitle2SidDataset": rl_data.title2sid_dataset(cat, options),
            "RLSeqTitle2SidDataset": rl_data.seq_title2sid_dataset(cat, train, options),
            "SidDataset_valid": rl_data.sid_dataset(cat, valid)}


def golden_examples(category, name):
    return golden()["categories"][category][name]["examples"]


@needs_shared
@pytest.mark.parametrize("category", CATEGORIES)
def test_dataset_counts_match_golden(category):
    ours = datasets(category)
    expected = golden()["categories"][category]
    assert set(ours) == set(expected)
    assert {name: len(texts) for name, texts in ours.items()} == {name: d["count"] for name, d in expected.items()}


@needs_shared
@pytest.mark.parametrize("category", CATEGORIES)
@pytest.mark.parametrize("name", ["SidDataset_train", "RLTitle2SidDataset", "RLSeqTitle2SidDataset", "SidDataset_valid"])
def test_every_golden_example_matches(category, name):
    """Prompt, completion and prompt ids of every listed row (including description->SID rows and the
    pandas-sampled order of RLSeqTitle2SidDataset); the target ids are the completion's SID tokens."""
    texts = datasets(category)[name]
    rows = golden_examples(category, name)
    examples = rl_data.tokenize([texts[row["index"]] for row in rows], tokenizer())
    for row, example in zip(rows, examples):
        where = (category, name, row["index"])
        assert example.prompt == row["prompt"], where
        assert example.completion == row["completion"], where
        assert example.prompt_ids.dtype == np.int32 and example.prompt_ids.tolist() == row["prompt_ids"], where
        assert "".join(example.target_sid) + "\n" == row["completion"], where
        assert example.target_ids.tolist() == [tokenizer().tokenizer.token_to_id(t) for t in example.target_sid], where


@needs_shared
@pytest.mark.parametrize("category", CATEGORIES)
def test_title_dataset_has_both_tasks_in_upstream_order(category):
    texts = datasets(category)["RLTitle2SidDataset"]
    tasks = [t.task for t in texts]
    n_titles = tasks.count("title2sid")
    assert n_titles == len(catalogue(category).title_to_sid)
    assert tasks == ["title2sid"] * n_titles + ["description2sid"] * (len(tasks) - n_titles)
    assert any(row["index"] >= n_titles for row in golden_examples(category, "RLTitle2SidDataset"))


@needs_shared
@pytest.mark.parametrize("category", CATEGORIES)
def test_training_texts_concatenate_the_three_datasets_in_rl_py_order(category):
    cat = catalogue(category)
    ours = rl_data.training_texts(cat, minionerec.load_split(cat, "train"))
    parts = datasets(category)
    assert ours == parts["SidDataset_train"] + parts["RLTitle2SidDataset"] + parts["RLSeqTitle2SidDataset"]


@needs_shared
@pytest.mark.parametrize("category", CATEGORIES)
def test_no_leak_title_prompts_end_at_response(category):
    """title_answer_leak=False: the same rows, the prompt cut at "### Response:\\n"; since SID tokens are
    whole added tokens, its ids are exactly the golden (leaky) ids without the trailing D SID ids."""
    fixed = datasets(category, rl_data.RLOptions(title_answer_leak=False))["RLTitle2SidDataset"]
    leaky = datasets(category)["RLTitle2SidDataset"]
    assert len(fixed) == len(leaky)
    assert all(f.prompt.endswith("### Response:\n") and f.prompt + "".join(f.target_sid) == leak.prompt
               and f.completion == leak.completion for f, leak in zip(fixed, leaky))
    rows = golden_examples(category, "RLTitle2SidDataset")
    examples = rl_data.tokenize([fixed[row["index"]] for row in rows], tokenizer())
    for row, example in zip(rows, examples):
        depth = len(example.target_sid)
        assert example.prompt_ids.tolist() == row["prompt_ids"][:-depth]
        assert row["prompt_ids"][-depth:] == example.target_ids.tolist()


@needs_shared
def test_sid_and_seq_datasets_never_leak():
    for name in ("SidDataset_train", "RLSeqTitle2SidDataset", "SidDataset_valid"):
        assert all(t.prompt.endswith("### Response:\n") for t in datasets(CATEGORIES[0])[name])


# ----------------------------------------------------------------------------------------------------
# Without ../shared: a synthetic catalogue


@pytest.fixture(scope="module")
def synthetic_catalogue(tmp_path_factory):
    root = synthetic.write_synthetic(tmp_path_factory.mktemp("data"), n_items=20, n_users=20, seed=4)
    return minionerec.load_catalogue(root, "Synthetic")


def test_no_leak_option_on_synthetic(synthetic_catalogue):
    leaky = rl_data.title2sid_dataset(synthetic_catalogue)
    fixed = rl_data.title2sid_dataset(synthetic_catalogue, rl_data.RLOptions(title_answer_leak=False))
    assert [t.task for t in fixed] == [t.task for t in leaky]
    for f, leak in zip(fixed, leaky):
        sid = "".join(f.target_sid)
        assert leak.prompt == f.prompt + sid and leak.prompt.endswith("### Response:\n" + sid)
        assert f.prompt.startswith("### User Input: \n") and f.prompt.endswith("\n\n### Response:\n")
        assert f.completion == leak.completion == sid + "\n"


def test_description_parsing_follows_upstream(tmp_path):
    path = tmp_path / "X.item.json"
    read = lambda d: rl_data.item_description(path, "7", {"title": "t", "description": d})
    assert read("['first', 'second']") == "first"
    assert read('["double quoted"]') == '["double quoted"]'   # upstream only unpacks "['...']"
    assert read("['broken']x']") == "['broken']x']"           # does not parse: verbatim
    assert read("[]") == "[]" and read("") == ""
    with pytest.raises(minionerec.DataError, match=r"X\.item\.json: key '7'.*description"):
        rl_data.item_description(path, "7", {"title": "t"})


def test_pandas_sample_order():
    assert rl_data.pandas_sample_order(5, -1, 0).tolist() == [0, 1, 2, 3, 4]
    order = rl_data.pandas_sample_order(50, 10_000, 0)  # clamped: a permutation of every row
    assert sorted(order.tolist()) == list(range(50)) and order.tolist() != list(range(50))
    assert rl_data.pandas_sample_order(50, 7, 0).tolist() == order[:7].tolist()


def test_upstream_reward_targets_last_writer_wins():
    def text(task, prompt, sid, history):
        tokens = tuple(f"<{c}_{sid}>" for c in "abc")
        return rl_data.RLText(task, prompt, "".join(tokens) + "\n", tokens, history)

    train = [text("sid", "p1", 1, "h1"), text("sid", "p1", 2, "h1"),      # same history, two next items
             text("title2sid", "p2", 3, "T"), text("seq_title2sid", "p3", 4, "T"),  # title == a title history
             text("sid", "p4", 5, "h4")]
    evaluation = [text("sid", "p4", 6, "h4")]                               # a train history seen in valid
    targets = [sid[0] for sid in rl_data.upstream_reward_targets(train, evaluation)]
    assert targets == ["<a_2>", "<a_2>", "<a_4>", "<a_4>", "<a_6>"]
