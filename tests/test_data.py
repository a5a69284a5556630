"""MiniOneRec tasks on a small synthetic catalogue: catalogue semantics, quirk flags, truncation."""

import json
import random

import numpy as np
import pytest

from sidrec.config import ALL_TASKS, DataConfig
from sidrec.data import minionerec, synthetic
from sidrec.data.minionerec import PromptOptions


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    root = synthetic.write_synthetic(tmp_path_factory.mktemp("data"), n_items=40, n_users=40, seed=3)
    return minionerec.load_catalogue(root, "Synthetic")


@pytest.fixture(scope="module")
def train_rows(catalogue):
    return minionerec.load_split(catalogue, "train")


@pytest.fixture(scope="module")
def tokenizer(catalogue, train_rows):
    texts = [e.instruction + e.prompt + e.target
             for e in minionerec.training_examples(catalogue, ALL_TASKS, train_rows)]
    return synthetic.train_bpe_tokenizer(texts, catalogue.sid_tokens, vocab_size=400)


def test_root_may_be_amazon_itself(catalogue):
    again = minionerec.load_catalogue(catalogue.paths.amazon, "Synthetic")
    assert again.sid_of == catalogue.sid_of and again.paths == catalogue.paths


def test_catalogue_fields(catalogue):
    assert catalogue.depth == 3
    assert catalogue.item_ids == tuple(str(i) for i in range(40))
    assert catalogue.sid_tokens == tuple(sorted({t for s in catalogue.sid_tokens_of.values() for t in s}))
    assert catalogue.valid_sids == set(catalogue.sid_of.values())
    assert all(minionerec.split_sid(sid) == catalogue.sid_tokens_of[i] for i, sid in catalogue.sid_of.items())


def test_shared_sid_maps_to_last_item_in_index_order(tmp_path):
    """Upstream builds sid2title with a dict over index order: the last item sharing a SID wins,
    and the SID keeps the position of its first item (dict insertion order)."""
    root = synthetic.write_synthetic(tmp_path, n_items=12, n_users=12, seed=0)
    index_path = root / "Amazon" / "index" / "Synthetic.index.json"
    index = json.loads(index_path.read_text())
    index["5"] = index["2"]
    index_path.write_text(json.dumps(index))
    catalogue = minionerec.load_catalogue(root, "Synthetic")
    shared = catalogue.sid_of["2"]
    assert catalogue.sid_to_title[shared] == catalogue.titles["5"]
    assert list(catalogue.sid_to_title).index(shared) == 2
    questions = minionerec.task_examples("sid_item_feat", catalogue, [])
    assert len(questions) == len(catalogue.sid_to_title) + len(catalogue.title_to_sid) == 11 + 12


def test_answer_leak_flag(catalogue):
    leaked = minionerec.task_examples("sid_item_feat", catalogue, [])
    clean = minionerec.task_examples("sid_item_feat", catalogue, [], PromptOptions(answer_leak=False))
    for with_leak, without in zip(leaked, clean):
        answer = with_leak.target[:-1]
        assert with_leak.prompt == without.prompt + answer
        assert without.prompt.endswith("### Response:\n") and with_leak.target == without.target


def test_typos_flag(catalogue, train_rows):
    def text(options):
        return "".join(e.instruction + e.prompt for e in minionerec.task_examples("sft_data", catalogue,
                                                                                  train_rows, options))

    upstream = text(PromptOptions(instruction_random=False))
    fixed = text(PromptOptions(instruction_random=False, typos=False))
    assert "recetenly" in upstream and "palyed" in upstream and "Synthetics before" in upstream
    assert "recetenly" not in fixed and "palyed" not in fixed and "Synthetics" not in fixed
    assert "recently" in fixed and "has played the following Synthetic before" in fixed


def test_instruction_choice(catalogue, train_rows):
    """Upstream: random.seed(seed), then random.randint(0, 10) per row in file order."""
    examples = minionerec.task_examples("sft_data", catalogue, train_rows, PromptOptions(seed=7))
    instructions = [i.format(category="Synthetic") for i in minionerec.SFT_DATA_INSTRUCTIONS]
    chosen = [instructions.index(e.instruction[len(minionerec.PREAMBLE):-3]) for e in examples]
    random.seed(7)
    assert chosen == [random.randint(0, 10) for _ in examples]
    fixed = minionerec.task_examples("sft_data", catalogue, train_rows, PromptOptions(instruction_random=False))
    assert {e.instruction for e in fixed} == {minionerec.SFT_DATA_HEADER.format(instruction=instructions[0])}


def test_options_from_config():
    cfg = DataConfig(upstream_answer_leak=False, upstream_typos=True, upstream_instruction_random=False)
    assert PromptOptions.from_config(cfg, seed=3) == PromptOptions(False, True, False, 3)


def test_labels_mask_instruction_and_prompt(catalogue, train_rows, tokenizer):
    example = minionerec.task_examples("sid_sft", catalogue, train_rows)[0]
    data = minionerec.tokenize_examples([example], tokenizer, cutoff_len=512)
    tokens, labels = data.example(0)
    encode = lambda s: tokenizer.tokenizer.encode(s, add_special_tokens=False).ids
    context = encode(example.instruction) + encode(example.prompt)
    answer = encode(example.target) + [tokenizer.eos_id]
    assert tokens.tolist() == context + answer
    assert labels.tolist() == [-100] * len(context) + answer
    assert tokens.dtype == labels.dtype == np.int32


def test_truncation_keeps_last_tokens(catalogue, train_rows, tokenizer):
    examples = minionerec.task_examples("sft_data", catalogue, train_rows)[:20]
    full = minionerec.tokenize_examples(examples, tokenizer, cutoff_len=10_000)
    cut = minionerec.tokenize_examples(examples, tokenizer, cutoff_len=24)
    assert full.lengths.max() > 24 and cut.lengths.max() == 24
    for i in range(len(examples)):
        for whole, kept in zip(full.example(i), cut.example(i)):
            assert kept.tolist() == whole[-24:].tolist()


def test_eval_examples(catalogue, tokenizer):
    examples = minionerec.eval_examples(catalogue, "test", tokenizer)
    rows = minionerec.load_split(catalogue, "test")
    assert len(examples) == len(rows)
    first = examples[0]
    assert first.prompt.endswith("### Response:\n") and "given the following chronological" in first.prompt
    assert first.target == rows[0].item_sid + "\n"
    assert tokenizer.tokenizer.decode(first.prompt_ids.tolist(), skip_special_tokens=False) == first.prompt
