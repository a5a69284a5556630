"""The RL (GRPO) datasets of upstream rl.py, built from our Catalogue and split rows.

Upstream (MiniOneRec HEAD 81b4ba9, rl.py + data.py) trains on the concatenation, in this order, of

- SidDataset(train): history of SIDs -> next SID (the sid_sft wording);
- RLTitle2SidDataset: every distinct title -> its SID, then every distinct description -> its SID;
- RLSeqTitle2SidDataset(train, sample=10000): history of titles -> next SID, rows drawn with pandas'
  `DataFrame.sample(n, random_state=0)`;

and validates on SidDataset(valid). Each row is a TRL prompt/completion pair: the prompt is
`### User Input: \\n{input}\\n\\n### Response:\\n` WITHOUT the instruction header the SFT tasks carry, the
completion is `{SID}\\n`. TRL tokenizes the prompt alone, without special tokens; that is `prompt_ids`.

Two upstream details that matter here (see `RLOptions`): the datasets use their default seed 0, not
rl.py's seed 42; and RLTitle2SidDataset's prompts already end with the answer SID (the same leak as the
SFT sid_item_feat task), reproduced by default. Upstream's rewards do not read the completion column:
they look the target up by prompt text in dictionaries filled by every dataset, the last writer winning
(`upstream_reward_targets`).
"""

from __future__ import annotations

import ast
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sidrec.data.minionerec import (
    PROMPT,
    SID_SFT_INPUT,
    TITLE2SID_INPUT,
    Catalogue,
    DataError,
    Interaction,
    _encode_unique,
    _read_json_object,
    split_sid,
)
from sidrec.tokenizer import TokenizerError, TokenizerInfo

# Exact upstream strings (data.py). Whitespace and quotes are significant.
DESCRIPTION2SID_INPUT = 'An item can be described as follows: "{description}". Which item is it describing?'
SEQ_TITLE2SID_INPUT = ("Given the title sequence of user historical interactive items: {titles}, can you recommend "
                       "a suitable next item for the user?")

TASKS = ("sid", "title2sid", "description2sid", "seq_title2sid")
UPSTREAM_SEQ_TITLE_SAMPLE = 10000  # rl.py: RLSeqTitle2SidDataset(train_file, ..., sample=10000)
UPSTREAM_DATASET_SEED = 0          # rl.py never passes seed= to its datasets: their default, 0


@dataclass(frozen=True)
class RLOptions:
    """How the RL datasets are drawn; the defaults are upstream's rl.py.

    title_answer_leak: upstream's RLTitle2SidDataset prompts end with the answer already written after
        "### Response:\\n" (then the completion repeats it); False ends the prompt at "### Response:\\n" like
        the other two datasets. (Upstream's constrained beam search then misbehaves on these prompts: its
        processor keys the first step on the prompt's last three tokens, here the answer's SID tokens,
        whose trie entry allows only "\\n"; every later step finds no entry and is unconstrained.)
    sid_sample, title_sample, seq_title_sample: rows kept per dataset (<= 0: all, in file / catalogue
        order). SidDataset and RLSeqTitle2SidDataset draw like pandas `DataFrame.sample(n, random_state=seed)`;
        RLTitle2SidDataset like `random.seed(seed); random.sample(rows, n)`. Upstream's pandas refuses a
        sample larger than the file (rl.py's 10000 exceeds the reconstructed train split); we take
        min(sample, rows), which is a full permutation of the rows (as golden_rl.json records).
    seed: the datasets' seed (upstream: their default 0, not rl.py's 42).
    """

    title_answer_leak: bool = True
    sid_sample: int = -1
    title_sample: int = -1
    seq_title_sample: int = UPSTREAM_SEQ_TITLE_SAMPLE
    seed: int = UPSTREAM_DATASET_SEED


@dataclass(frozen=True)
class RLText:
    """One upstream dataset row, as text."""

    task: str                       # one of TASKS
    prompt: str                     # "### User Input: \n...\n\n### Response:\n" (+ the leaked SID, title tasks)
    completion: str                 # the target SID + "\n" (upstream's "completion" column)
    target_sid: tuple[str, ...]     # the completion's SID tokens
    history: str                    # upstream's prompt2history value: the key its reward looks the target up by


@dataclass(frozen=True)
class RLExample:
    """An RL prompt ready for rollouts: TRL's prompt ids and the target SID as token ids."""

    task: str
    prompt: str
    completion: str
    prompt_ids: np.ndarray          # int32 [P]: the prompt alone, no special tokens, untruncated
    target_sid: tuple[str, ...]     # SID tokens, e.g. ("<a_1>", "<b_2>", "<c_3>")
    target_ids: np.ndarray          # int32 [D]: their token ids


# ----------------------------------------------------------------------------------------------------
# The three datasets


def sid_dataset(catalogue: Catalogue, rows: Sequence[Interaction], sample: int = -1,
                seed: int = UPSTREAM_DATASET_SEED) -> list[RLText]:
    """SidDataset: the user's SIDs (", "-joined) -> the next SID; used on train and, for validation, valid."""
    del catalogue  # the rows already carry SIDs; the argument keeps the three builders alike
    return [_text("sid", SID_SFT_INPUT.format(history=", ".join(row.history_sids)), row.item_sid,
                  history="::".join(row.history_sids))
            for row in _sampled(rows, sample, seed)]


def title2sid_dataset(catalogue: Catalogue, options: RLOptions = RLOptions()) -> list[RLText]:
    """RLTitle2SidDataset: every distinct title -> SID, then every distinct description -> SID.

    Titles and descriptions shared by several items keep their first position in index order and the
    last such item's SID (Python dict semantics, as upstream's title2sid / description2sid).
    """
    questions = [("title2sid", TITLE2SID_INPUT.format(title=title), title, sid)
                 for title, sid in catalogue.title_to_sid.items()]
    questions += [("description2sid", DESCRIPTION2SID_INPUT.format(description=description), description, sid)
                  for description, sid in description_to_sid(catalogue).items()]
    if 0 < options.title_sample < len(questions):
        questions = random.Random(options.seed).sample(questions, options.title_sample)
    return [_text(task, question, sid, history=key, leak=options.title_answer_leak)
            for task, question, key, sid in questions]


def seq_title2sid_dataset(catalogue: Catalogue, rows: Sequence[Interaction],
                          options: RLOptions = RLOptions()) -> list[RLText]:
    """RLSeqTitle2SidDataset: the user's titles (quoted, ", "-joined) -> the next SID (the CSV's item_sid)."""
    del catalogue
    return [_text("seq_title2sid", SEQ_TITLE2SID_INPUT.format(titles=", ".join(f'"{t}"' for t in row.history_titles)),
                  row.item_sid, history="::".join(row.history_titles))
            for row in _sampled(rows, options.seq_title_sample, options.seed)]


def training_texts(catalogue: Catalogue, train_rows: Sequence[Interaction],
                   options: RLOptions = RLOptions()) -> list[RLText]:
    """rl.py's training set before its HF-datasets shuffle(seed=42): the three datasets concatenated."""
    return (sid_dataset(catalogue, train_rows, options.sid_sample, options.seed)
            + title2sid_dataset(catalogue, options)
            + seq_title2sid_dataset(catalogue, train_rows, options))


def _text(task: str, question: str, sid: str, history: str, leak: bool = False) -> RLText:
    return RLText(task=task, prompt=PROMPT.format(input=question) + (sid if leak else ""), completion=sid + "\n",
                  target_sid=split_sid(sid), history=history)


def _sampled(rows: Sequence[Interaction], sample: int, seed: int) -> list[Interaction]:
    return [rows[i] for i in pandas_sample_order(len(rows), sample, seed)]


def pandas_sample_order(n_rows: int, sample: int, seed: int) -> np.ndarray:
    """Row positions chosen by pandas `DataFrame.sample(sample, random_state=seed)`, in its order.

    pandas draws `np.random.RandomState(seed).choice(n_rows, size, replace=False)`, which for the legacy
    generator is `permutation(n_rows)[:size]` (stable across numpy versions). `sample <= 0`: every row in
    file order (upstream skips the call). A sample above `n_rows` is clamped (see `RLOptions`).
    """
    if sample <= 0:
        return np.arange(n_rows)
    return np.random.RandomState(seed).permutation(n_rows)[:min(sample, n_rows)]


# ----------------------------------------------------------------------------------------------------
# Item descriptions (index/<Category>.item.json "description")


def description_to_sid(catalogue: Catalogue) -> dict[str, str]:
    """Description -> SID in index order (the last item with a description wins; "" is a description too)."""
    items = _read_json_object(catalogue.paths.item)
    mapping = {}
    for item_id in catalogue.item_ids:
        mapping[item_description(catalogue.paths.item, item_id, items[item_id])] = catalogue.sid_of[item_id]
    return mapping


def item_description(path, item_id: str, features: dict) -> str:
    """An item's description as upstream reads it: a cell written like "['first', ...]" becomes its first
    element (upstream eval()s it; we literal_eval, never eval); anything else, including '["..."]' cells
    and cells that do not parse, is used verbatim."""
    description = features.get("description")
    if not isinstance(description, str):
        raise DataError(f"{path}: key {item_id!r} needs a string \"description\" (may be empty) for the RL "
                        f"description->SID task, got {type(description).__name__}")
    if description.startswith("['") and description.endswith("']"):
        try:
            parsed = ast.literal_eval(description)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return description
        if parsed:
            first = parsed[0]
            if not isinstance(first, str):  # upstream would fail later (the value is a dict key and a prompt)
                raise DataError(f"{path}: key {item_id!r}: \"description\" parses to a list whose first element "
                                f"is not a string ({first!r:.60})")
            return first
    return description


# ----------------------------------------------------------------------------------------------------
# Tokenization and reward targets


def tokenize(texts: Sequence[RLText], tokenizer: TokenizerInfo) -> list[RLExample]:
    """TRL's prompt ids (no special tokens, no chat template) and the target SID's token ids."""
    prompt_ids = _encode_unique(tokenizer, [t.prompt for t in texts])
    sid_ids = _sid_token_ids({token for t in texts for token in t.target_sid}, tokenizer)
    return [RLExample(task=t.task, prompt=t.prompt, completion=t.completion,
                      prompt_ids=np.asarray(ids, dtype=np.int32), target_sid=t.target_sid,
                      target_ids=np.array([sid_ids[token] for token in t.target_sid], dtype=np.int32))
            for t, ids in zip(texts, prompt_ids)]


def sid_id_matrix(sids: Sequence[tuple[str, ...]], tokenizer: TokenizerInfo) -> np.ndarray:
    """int32 [N, D]: token ids of SIDs given as token tuples (e.g. `upstream_reward_targets`' output)."""
    ids = _sid_token_ids({token for sid in sids for token in sid}, tokenizer)
    return np.array([[ids[token] for token in sid] for sid in sids], dtype=np.int32)


def _sid_token_ids(tokens: set[str], tokenizer: TokenizerInfo) -> dict[str, int]:
    ids = {token: tokenizer.tokenizer.token_to_id(token) for token in sorted(tokens)}
    missing = [token for token, i in ids.items() if i is None]
    if missing:
        raise TokenizerError(f"SID token {missing[0]!r} (and {len(missing) - 1} more) is not in the tokenizer's "
                             "vocabulary; extend it with add_sid_tokens or use the SFT checkpoint's tokenizer")
    return ids


def upstream_reward_targets(train: Sequence[RLText], evaluation: Sequence[RLText] = ()) -> list[tuple[str, ...]]:
    """The SID upstream's reward compares each `train` row's completions with (not always its own target).

    rl.py merges every dataset's prompt -> history and history -> target dicts (train datasets in order,
    then the eval SidDataset), the last writer winning. Rows with the same history but different next
    items all score against the last one; a title2sid prompt whose title is also some user's one-item
    title history scores against that user's next item; a train history that recurs in valid scores
    against the valid target.
    """
    prompt_to_history, history_to_target = {}, {}
    for text in (*train, *evaluation):
        prompt_to_history[text.prompt] = text.history
        history_to_target[text.history] = text.target_sid
    return [history_to_target[prompt_to_history[text.prompt]] for text in train]
