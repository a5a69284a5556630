"""Token ids and labels of every upstream task equal MiniOneRec's own (shared/reference/golden_sft_examples.json).

The golden file was produced by upstream's data.py with the Qwen2.5 tokenizer extended by the sorted
SID tokens; nobody here wrote it. Exact equality is the only tolerance.
"""

import json
from functools import cache
from pathlib import Path

import pytest

from sidrec.data import minionerec
from sidrec.tokenizer import add_sid_tokens, load_tokenizer

SHARED = Path(__file__).parents[2] / "shared"
GOLDEN = SHARED / "reference" / "golden_sft_examples.json"
TEMPLATES = SHARED / "reference" / "minionerec_templates.json"

pytestmark = pytest.mark.skipif(not GOLDEN.is_file(), reason=f"{SHARED} (MiniOneRec data + golden ids) is absent")
CATEGORIES = ("Industrial_and_Scientific", "Office_Products")


@cache
def golden():
    return json.loads(GOLDEN.read_text())


@cache
def setup(category):
    catalogue = minionerec.load_catalogue(SHARED / "data", category)
    tokenizer = add_sid_tokens(load_tokenizer(SHARED / "tokenizers" / "qwen2.5"), catalogue.sid_tokens)
    splits = {split: minionerec.load_split(catalogue, split) for split in minionerec.SPLITS}
    return catalogue, tokenizer, splits


def golden_datasets(category):
    for name, dataset in golden()["categories"][category]["datasets"].items():
        task, _, split = name.partition("(")
        yield task, split.rstrip(")") or "train", dataset


@pytest.mark.parametrize("category", CATEGORIES)
def test_vocabulary_matches_upstream(category):
    catalogue, tokenizer, _ = setup(category)
    expected = golden()["categories"][category]
    assert tokenizer.eos_id == expected["eos_token_id"]
    assert tokenizer.tokenizer.get_vocab_size() == expected["vocab_size"]
    assert {t: tokenizer.tokenizer.token_to_id(t) for t in catalogue.sid_tokens} == expected["sid_token_ids"]


@pytest.mark.parametrize("category", CATEGORIES)
def test_sft_tasks_match_golden_ids_and_labels(category):
    catalogue, tokenizer, splits = setup(category)
    checked = set()
    for task, split, dataset in golden_datasets(category):
        if task == "eval_sid":
            continue
        examples = minionerec.task_examples(task, catalogue, splits[split])
        assert len(examples) == dataset["n_rows"], (task, split)
        rows = dataset["rows"]
        tokenized = minionerec.tokenize_examples([examples[r["index"]] for r in rows], tokenizer, cutoff_len=512)
        for i, row in enumerate(rows):
            tokens, labels = tokenized.example(i)
            assert tokens.tolist() == row["input_ids"], (task, split, row["index"])
            assert labels.tolist() == row["labels"], (task, split, row["index"])
        checked.add(task)
    assert checked == set(minionerec.ALL_TASKS)


@pytest.mark.parametrize("category", CATEGORIES)
def test_eval_prompts_match_golden(category):
    catalogue, tokenizer, splits = setup(category)
    [(_, split, dataset)] = [d for d in golden_datasets(category) if d[0] == "eval_sid"]
    examples = minionerec.eval_examples(catalogue, split, tokenizer)
    assert len(examples) == dataset["n_rows"]
    for row in dataset["rows"]:
        example = examples[row["index"]]
        assert example.prompt_ids.tolist() == row["input_ids"]
        assert example.prompt == row["text"]
        # upstream's eval_predictions.json "input": EvalSidDataset.get_history's text, inside the prompt
        history = ", ".join(splits[split][row["index"]].history_sids)
        assert example.input == minionerec.EVAL_SID_INPUT.format(history=history)
        assert f"### User Input: \n{example.input}\n\n### Response:\n" in example.prompt
        assert example.target == splits[split][row["index"]].item_sid + "\n"


def test_templates_are_upstream_strings():
    """Our constants against the reference's strings (whitespace included)."""
    reference = json.loads(TEMPLATES.read_text())
    tasks = reference["tasks"]
    assert minionerec.HEADER == reference["header"]
    assert minionerec.SFT_DATA_HEADER == reference["sft_data_header"]
    assert minionerec.PROMPT == reference["prompt"].format(input="{input}", output="")
    assert minionerec.SFT_DATA_INSTRUCTIONS == tuple(tasks["sft_data"]["instructions"])
    assert minionerec.SFT_DATA_INPUT.format(category="{category}", history="{history_titles}") == \
        tasks["sft_data"]["input"]
    assert minionerec.EVAL_SID_INPUT.format(history="{history_sids}") == tasks["eval_sid"]["input"]
    assert minionerec.CATEGORY_PHRASES.items() >= reference["category_phrase"].items()
