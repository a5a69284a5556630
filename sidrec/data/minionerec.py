"""MiniOneRec data: the files, the five upstream SFT tasks, and the evaluation prompts.

Layout (upstream's `data/Amazon`): `{train,valid,test}/<Category>_*.csv`, `info/<Category>_*.txt`
(lines `sid<TAB>title<TAB>item_id`), `index/<Category>.index.json` (item id -> SID tokens) and
`index/<Category>.item.json` (item id -> {"title", ...}). CSV list cells are Python literals.
Files are read as users have them: UTF-8 with or without a BOM, LF or CRLF line endings, blank lines
in info/ and the CSVs skipped; bytes that are not UTF-8 are a DataError naming the file and line.

Every task is built exactly as upstream's data.py (HEAD 81b4ba9): the instruction, the prompt and the
target (+EOS) are tokenized separately and concatenated, labels are -100 on instruction and prompt, and
rows longer than `cutoff_len` keep their LAST tokens. Three upstream quirks are reproduced by default,
each switched off by a `DataConfig` flag (see `PromptOptions`).

SIDs may have any depth (upstream joins exactly the first three tokens; with depth-3 data, the only
data it supports, the two agree).
"""

from __future__ import annotations

import ast
import csv
import io
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sidrec.config import ALL_TASKS, DataConfig
from sidrec.errors import UserError
from sidrec.textfile import read_json, read_text
from sidrec.tokenizer import TokenizerInfo

SPLITS = ("train", "valid", "test")
CSV_COLUMNS = ("user_id", "history_item_title", "item_title", "history_item_id", "item_id",
               "history_item_sid", "item_sid")
IGNORE_INDEX = -100

# Upstream sft.py maps the category to the phrase used inside prompts; others are used verbatim.
CATEGORY_PHRASES = {
    "Industrial_and_Scientific": "industrial and scientific items",
    "Office_Products": "office products",
    "Toys_and_Games": "toys and games",
    "Sports": "sports and outdoors",
    "Books": "books",
}

# Exact upstream strings (shared/reference/minionerec_templates.json). Whitespace is significant.
PREAMBLE = ("Below is an instruction that describes a task, paired with an input that provides further "
            "context. Write a response that appropriately completes the request. \n\n### Instruction:\n")
HEADER = PREAMBLE + "{instruction}\n\n"
SFT_DATA_HEADER = PREAMBLE + "{instruction}\n \n"  # upstream's sft_data has a stray space here
PROMPT = "### User Input: \n{input}\n\n### Response:\n"

SID_SFT_INSTRUCTION = "Can you predict the next possible item that the user may expect?"
SID_SFT_INPUT = ("The user has interacted with items {history} in chronological order. "
                 "Can you predict the next possible item that the user may expect?")
EVAL_SID_INPUT = ("Can you predict the next possible item the user may expect, given the following "
                  "chronological interaction history: {history}")
ITEM_FEAT_INSTRUCTION = "Answer the question about item identification."
SID2TITLE_INPUT = 'What is the title of item "{sid}"?'
TITLE2SID_INPUT = "Which item has the title: {title}?"
FUSION_INSTRUCTION = "Can you recommend the next item for the user based on their interaction history?"
FUSION_INPUT = ("The user has sequentially interacted with items {history}. Can you recommend the next "
                "item for him? Tell me the title of the item")
TITLE2SID_SEQ_INSTRUCTION = ("Based on the user's historical interaction with item titles, predict the "
                             "semantic ID of the next item they may expect.")
TITLE2SID_SEQ_INPUT = ("The user has interacted with the following {category} items in chronological "
                       "order: {history}. Can you predict the next item the user may expect?")
SFT_DATA_INPUT = "The user has palyed the following {category}s before: {history}"
SFT_DATA_INSTRUCTIONS = (
    "Given a list of {category} the user recetenly enjoy, please write a new {category} that the user may bought",
    "Considering the {category} that has recently captured the user's interest, kindly create a compilation of other {category} that the user might have played prior to this.",
    "Based on the user's current gaming preference, please draft a list of potential {category} they may have experienced beforehand.",
    "Reflecting on the {category} the user has taken pleasure in recently, we request that you formulate a list of {category} that may have preceded the user's current enjoyment.",
    "In light of the recent gaming enjoyment expressed by the user, please assemble a list of {category} that could potentially include past titles the user has engaged with.",
    "Taking into account the {category} that has lately provided enjoyment to the user, please put together an inventory of {category} the user might have explored previously.",
    "Given the user's newfound enjoyment of a particular {category}, would you kindly generate a roster of other {category} that might resonate with their past gaming experiences?",
    "In response to the user's recent fondness for a specific {category}, we seek your assistance in listing possible {category} the user may have delighted in earlier.",
    "With respect to the {category} currently enjoyed by the user, please compile a suggestive list of {category} they may have played in the past.",
    "Bearing in mind the {category} that the user has recently been enthralled by, please construct a catalog of other {category} that the user potentially partook in beforehand.",
    "In relation to the user's recent entertainment with a given {category}, it would be appreciated if you could curate a list of {category} that might form part of the user's previous gaming history.",
)
# upstream_typos=False rewrites these (the "{category}s" one avoids "itemss" / "productss").
TYPO_FIXES = (("recetenly", "recently"), ("palyed", "played"), ("{category}s ", "{category} "))

_SID_TOKEN = re.compile(r"<[^<>]+>")


class DataError(UserError):
    """A data file that cannot be used; the message names the file, the line or key, and the fix."""


# ----------------------------------------------------------------------------------------------------
# Files and catalogue


@dataclass(frozen=True)
class DataPaths:
    amazon: Path
    category: str
    splits: Mapping[str, Path]  # "train" | "valid" | "test" -> csv
    info: Path
    index: Path
    item: Path

    def files(self) -> tuple[Path, ...]:
        """Every source file, in a fixed order (the tokenization cache hashes them)."""
        return (*self.splits.values(), self.info, self.index, self.item)


def resolve_paths(root: str | Path, category: str) -> DataPaths:
    """Find the category's files under `root` (a directory holding `Amazon/`, or `Amazon/` itself)."""
    root = Path(root)
    amazon = root / "Amazon" if (root / "Amazon").is_dir() else root
    if not (amazon / "index").is_dir():
        raise DataError(f"{root}: no Amazon/index directory here; set --data.root to the directory "
                        "holding Amazon/ (e.g. ../shared/data) or to Amazon/ itself")
    index = amazon / "index" / f"{category}.index.json"
    item = amazon / "index" / f"{category}.item.json"
    for path in (index, item):
        if not path.is_file():
            known = sorted(p.name.split(".")[0] for p in (amazon / "index").glob("*.index.json"))
            raise DataError(f"{path}: not found; --data.category {category!r} is not in {amazon} "
                            f"(categories there: {known})")
    return DataPaths(amazon=amazon, category=category,
                     splits={split: _one_file(amazon / split, f"{category}_*.csv") for split in SPLITS},
                     info=_one_file(amazon / "info", f"{category}_*.txt"), index=index, item=item)


def _one_file(directory: Path, pattern: str) -> Path:
    matches = sorted(directory.glob(pattern))
    if len(matches) != 1:
        found = "no file" if not matches else f"{len(matches)} files ({[m.name for m in matches]})"
        raise DataError(f"{directory}: expected exactly one file matching {pattern!r}, found {found}")
    return matches[0]


@dataclass(frozen=True)
class Catalogue:
    """The items of one category. Mappings keep upstream's dict orders (the item-feature task uses them)."""

    paths: DataPaths
    item_ids: tuple[str, ...]                 # index.json order
    titles: Mapping[str, str]                 # item id -> title (item.json)
    sid_tokens_of: Mapping[str, tuple[str, ...]]  # item id -> SID tokens
    sid_of: Mapping[str, str]                 # item id -> SID string (tokens joined)
    sid_to_title: Mapping[str, str]           # shared SIDs: the last item in index order wins
    title_to_sid: Mapping[str, str]           # shared titles: the last item in index order wins
    valid_sids: frozenset[str]                # from info/ (what a prediction may be)
    sid_tokens: tuple[str, ...]               # every distinct SID token, sorted (for add_sid_tokens)
    depth: int

    @property
    def category(self) -> str:
        return self.paths.category


def load_catalogue(root: str | Path, category: str) -> Catalogue:
    paths = resolve_paths(root, category)
    index = _read_json_object(paths.index)
    items = _read_json_object(paths.item)
    sid_tokens_of = {item_id: _index_sid(paths.index, item_id, value) for item_id, value in index.items()}
    depth = _common_depth(paths.index, sid_tokens_of)
    titles = {item_id: _item_title(paths.item, item_id, items.get(item_id)) for item_id in index}
    sid_of = {item_id: "".join(tokens) for item_id, tokens in sid_tokens_of.items()}
    sid_to_title, title_to_sid = {}, {}
    for item_id in index:
        sid_to_title[sid_of[item_id]] = titles[item_id]
        title_to_sid[titles[item_id]] = sid_of[item_id]
    return Catalogue(
        paths=paths, item_ids=tuple(index), titles=titles, sid_tokens_of=sid_tokens_of, sid_of=sid_of,
        sid_to_title=sid_to_title, title_to_sid=title_to_sid,
        valid_sids=_read_info_sids(paths.info, depth),
        sid_tokens=tuple(sorted({t for tokens in sid_tokens_of.values() for t in tokens})), depth=depth)


def split_sid(sid: str) -> tuple[str, ...] | None:
    """'<a_1><b_2>' -> ('<a_1>', '<b_2>'); None when the string is not a sequence of <...> tokens."""
    tokens = tuple(_SID_TOKEN.findall(sid))
    return tokens if tokens and "".join(tokens) == sid else None


def _read_json_object(path: Path) -> dict:
    value = read_json(path, DataError)
    if not isinstance(value, dict) or not value:
        raise DataError(f"{path}: expected a non-empty JSON object keyed by item id")
    return value


def _index_sid(path: Path, item_id: str, value) -> tuple[str, ...]:
    if (not isinstance(value, list) or not value
            or not all(isinstance(t, str) and split_sid(t) == (t,) for t in value)):
        raise DataError(f"{path}: key {item_id!r}: expected a list of SID tokens like "
                        f'["<a_1>", "<b_2>", "<c_3>"], got {value!r}')
    return tuple(value)


def _common_depth(path: Path, sid_tokens_of: Mapping[str, tuple[str, ...]]) -> int:
    first_id, first = next(iter(sid_tokens_of.items()))
    for item_id, tokens in sid_tokens_of.items():
        if len(tokens) != len(first):
            raise DataError(f"{path}: key {item_id!r} has a SID of depth {len(tokens)} but key "
                            f"{first_id!r} has depth {len(first)}; all SIDs must have the same depth")
    return len(first)


def _item_title(path: Path, item_id: str, features) -> str:
    if not isinstance(features, dict) or not isinstance(features.get("title"), str):
        raise DataError(f"{path}: key {item_id!r} (listed in the index) needs an entry with a string "
                        '"title"')
    return features["title"]


def _read_info_sids(path: Path, depth: int) -> frozenset[str]:
    sids = set()
    # newline=None: "\n", "\r\n" and "\r" all end a line (as open() does); blank lines are skipped
    for line_no, line in enumerate(io.StringIO(read_text(path, DataError), newline=None), 1):
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        fields = line.split("\t")
        tokens = split_sid(fields[0])
        if len(fields) != 3 or tokens is None or len(tokens) != depth:
            raise DataError(f"{path}:{line_no}: expected 'sid<TAB>title<TAB>item_id' with a SID of "
                            f"depth {depth} (SIDs of the index), got {line.rstrip()[:120]!r}; fix or "
                            "remove that line")
        sids.add(fields[0])
    if not sids:
        raise DataError(f"{path}: no items")
    return frozenset(sids)


# ----------------------------------------------------------------------------------------------------
# Split files


@dataclass(frozen=True)
class Interaction:
    """One CSV row: a user's history (oldest first) and the next item."""

    line: int
    history_titles: tuple[str, ...]
    history_item_ids: tuple[str, ...]
    history_sids: tuple[str, ...]
    item_title: str
    item_id: str
    item_sid: str


def load_split(catalogue: Catalogue, split: str) -> list[Interaction]:
    """Rows of `<split>/<category>_*.csv` in file order, checked against the catalogue."""
    path = catalogue.paths.splits[split]
    # newline="": the csv module handles "\r\n" itself (and newlines inside quoted cells); DictReader
    # skips blank lines
    reader = csv.DictReader(io.StringIO(read_text(path, DataError), newline=""))
    try:
        missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise DataError(f"{path}:1: missing column(s) {missing}; MiniOneRec CSVs have columns "
                            f"{list(CSV_COLUMNS)}")
        rows = [_interaction(path, reader.line_num, record, catalogue) for record in reader]
    except csv.Error as err:
        raise DataError(f"{path}:{reader.line_num}: not valid CSV ({err}); fix the quoting on that "
                        "line") from None
    if not rows:
        raise DataError(f"{path}: the {split} split has no rows; check the file or --data.root")
    return rows


def _interaction(path: Path, line: int, record: dict, catalogue: Catalogue) -> Interaction:
    where = f"{path}:{line}"
    if None in record or any(record[c] is None for c in CSV_COLUMNS):
        raise DataError(f"{where}: wrong number of fields (expected {len(CSV_COLUMNS)})")
    titles = _list_cell(where, record, "history_item_title", str)
    item_ids = tuple(str(i) for i in _list_cell(where, record, "history_item_id", (int, str)))
    sids = _list_cell(where, record, "history_item_sid", str)
    if not len(titles) == len(item_ids) == len(sids):
        raise DataError(f"{where}: history columns have different lengths "
                        f"(titles {len(titles)}, ids {len(item_ids)}, sids {len(sids)})")
    for sid in (*sids, record["item_sid"]):
        if sid not in catalogue.sid_to_title:
            raise DataError(f"{where}: SID {sid!r} is not in {catalogue.paths.index.name}; the CSV and "
                            "the index must come from the same SID assignment")
    for column, ids in (("history_item_id", item_ids), ("item_id", (record["item_id"],))):
        unknown = [i for i in ids if i not in catalogue.sid_of]
        if unknown:
            raise DataError(f"{where}: {column} {unknown[0]!r} is not a key of {catalogue.paths.index}; "
                            "the CSV and the index must come from the same dataset (regenerate one of them)")
    return Interaction(line=line, history_titles=titles, history_item_ids=item_ids, history_sids=sids,
                       item_title=record["item_title"], item_id=record["item_id"],
                       item_sid=record["item_sid"])


def _list_cell(where: str, record: dict, column: str, element_type) -> tuple:
    """Parse a Python list literal safely (ast.literal_eval, never eval)."""
    try:
        value = ast.literal_eval(record[column])
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        value = None
    if not isinstance(value, list) or not all(isinstance(v, element_type) for v in value):
        raise DataError(f"{where}: column {column!r} must be a Python list literal like "
                        f"{'[12, 40]' if column == 'history_item_id' else repr(['...'])}, "
                        f"got {record[column][:80]!r}")
    return tuple(value)


# ----------------------------------------------------------------------------------------------------
# Text examples (the five SFT tasks and the eval prompts)


@dataclass(frozen=True)
class TextExample:
    instruction: str  # header with the instruction: tokenized on its own, no loss
    prompt: str       # "### User Input: ... ### Response:\n" (+ the leaked answer): no loss
    target: str       # what the model learns (EOS is appended at tokenization)


@dataclass(frozen=True)
class PromptOptions:
    """Upstream quirks, all reproduced by default (`DataConfig.upstream_*`).

    answer_leak: upstream's sid_item_feat prompt already ends with the answer
        ("### Response:\\n{answer}", then the target "{answer}\\n"); False ends the prompt at
        "### Response:\\n" like every other task.
    typos: keep upstream's sft_data wording; False writes "recently" for "recetenly" (instruction 0),
        "played" for "palyed" and drops the "s" appended to the category phrase ("itemss",
        "productss") in the sft_data input.
    instruction_random: sft_data's instruction is chosen per row by Python's `random` seeded with
        `seed` (upstream: random.seed(42), then random.randint(0, 10) per row in file order); False
        always uses the first instruction.
    """

    answer_leak: bool = True
    typos: bool = True
    instruction_random: bool = True
    seed: int = 42

    @classmethod
    def from_config(cls, cfg: DataConfig, seed: int = 42) -> PromptOptions:
        return cls(answer_leak=cfg.upstream_answer_leak, typos=cfg.upstream_typos,
                   instruction_random=cfg.upstream_instruction_random, seed=seed)


def category_phrase(category: str) -> str:
    return CATEGORY_PHRASES.get(category, category)


def task_examples(task: str, catalogue: Catalogue, rows: list[Interaction],
                  options: PromptOptions = PromptOptions()) -> list[TextExample]:
    """The examples of one upstream SFT task on `rows` (sid_item_feat reads the catalogue instead)."""
    if task == "sid_item_feat":
        return _item_feat_examples(catalogue, options)
    if task == "sft_data":
        return _sft_data_examples(rows, category_phrase(catalogue.category), options)
    builders = {"sid_sft": _sid_sft, "fusion_seq_rec": _fusion_seq_rec,
                "title_history2sid": _title_history2sid}
    if task not in builders:
        raise DataError(f"unknown task {task!r}; choose from {list(ALL_TASKS)}")
    return [builders[task](row, catalogue) for row in rows]


def _example(instruction: str, task_input: str, target: str, header: str = HEADER) -> TextExample:
    return TextExample(header.format(instruction=instruction), PROMPT.format(input=task_input), target)


def _sid_sft(row: Interaction, catalogue: Catalogue) -> TextExample:
    history = ", ".join(row.history_sids)
    return _example(SID_SFT_INSTRUCTION, SID_SFT_INPUT.format(history=history), row.item_sid + "\n")


def _fusion_seq_rec(row: Interaction, catalogue: Catalogue) -> TextExample:
    history = ", ".join(row.history_sids)
    title = catalogue.sid_to_title[row.item_sid]  # upstream: via the SID, not the CSV's item_title
    return _example(FUSION_INSTRUCTION, FUSION_INPUT.format(history=history), title + "\n")


def _title_history2sid(row: Interaction, catalogue: Catalogue) -> TextExample:
    history = ", ".join(f'"{title}"' for title in row.history_titles)
    task_input = TITLE2SID_SEQ_INPUT.format(category=category_phrase(catalogue.category), history=history)
    return _example(TITLE2SID_SEQ_INSTRUCTION, task_input, catalogue.sid_of[row.item_id] + "\n")


def _sft_data_examples(rows: list[Interaction], category: str, options: PromptOptions) -> list[TextExample]:
    fix = (lambda s: s) if options.typos else _fix_typos
    instructions = [fix(text).format(category=category) for text in SFT_DATA_INSTRUCTIONS]
    task_input = fix(SFT_DATA_INPUT)
    rng = random.Random(options.seed)  # same stream as upstream's global random.seed(seed)
    examples = []
    for row in rows:
        choice = rng.randint(0, len(instructions) - 1) if options.instruction_random else 0
        history = ",\t".join(f'"{title}"' for title in row.history_titles)
        examples.append(_example(instructions[choice], task_input.format(category=category, history=history),
                                 f'"{row.item_title}"\n', header=SFT_DATA_HEADER))
    return examples


def _fix_typos(text: str) -> str:
    for typo, fixed in TYPO_FIXES:
        text = text.replace(typo, fixed)
    return text


def _item_feat_examples(catalogue: Catalogue, options: PromptOptions) -> list[TextExample]:
    """All sid->title questions (distinct SIDs), then all title->sid questions (distinct titles)."""
    questions = [(SID2TITLE_INPUT.format(sid=sid), title) for sid, title in catalogue.sid_to_title.items()]
    questions += [(TITLE2SID_INPUT.format(title=title), sid) for title, sid in catalogue.title_to_sid.items()]
    leak = (lambda answer: answer) if options.answer_leak else (lambda answer: "")
    return [TextExample(HEADER.format(instruction=ITEM_FEAT_INSTRUCTION),
                        PROMPT.format(input=question) + leak(answer), answer + "\n")
            for question, answer in questions]


def training_examples(catalogue: Catalogue, tasks: tuple[str, ...], rows: list[Interaction],
                      options: PromptOptions = PromptOptions()) -> list[TextExample]:
    """The training mixture: each task's examples on `rows` (the train split), tasks in `tasks` order."""
    return [example for task in tasks for example in task_examples(task, catalogue, rows, options)]


@dataclass(frozen=True)
class EvalExample:
    prompt: str             # instruction + prompt text, ending with "### Response:\n"
    prompt_ids: np.ndarray  # int32, unpadded and untruncated (upstream's eval inputs)
    target: str             # the next item's SID + "\n" (upstream's "output" field)
    input: str              # the user input inside the prompt (upstream's "input" field, get_all())


def eval_examples(catalogue: Catalogue, split: str, tokenizer: TokenizerInfo,
                  wording: str = "upstream") -> list[EvalExample]:
    """Evaluation prompts. "upstream": EvalSidDataset's wording, which differs from the sid_sft prompt
    the model trained on (a pretrained LLM bridges the two; a small model from scratch does not);
    "training": the sid_sft training prompt itself (the `--data.eval-wording training` fix)."""
    template = {"upstream": EVAL_SID_INPUT, "training": SID_SFT_INPUT}[wording]
    rows = load_split(catalogue, split)
    inputs = [template.format(history=", ".join(row.history_sids)) for row in rows]
    texts = [_example(SID_SFT_INSTRUCTION, text, row.item_sid + "\n") for text, row in zip(inputs, rows)]
    encoded = _encode_unique(tokenizer, [t.instruction for t in texts] + [t.prompt for t in texts])
    n = len(texts)
    return [EvalExample(prompt=t.instruction + t.prompt,
                        prompt_ids=np.asarray(encoded[i] + encoded[n + i], dtype=np.int32), target=t.target,
                        input=inputs[i])
            for i, t in enumerate(texts)]


# ----------------------------------------------------------------------------------------------------
# Tokenization (upstream semantics)


@dataclass(frozen=True)
class TokenizedExamples:
    """Token rows back to back: example i is tokens[offsets[i]:offsets[i + 1]] (same for labels)."""

    tokens: np.ndarray   # int32 [total]
    labels: np.ndarray   # int32 [total]; IGNORE_INDEX (-100) on instruction and prompt
    offsets: np.ndarray  # int64 [n + 1]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        span = slice(self.offsets[i], self.offsets[i + 1])
        return self.tokens[span], self.labels[span]


def tokenize_examples(examples: list[TextExample], tokenizer: TokenizerInfo,
                      cutoff_len: int) -> TokenizedExamples:
    """Upstream's rows: ids(instruction) + ids(prompt) + ids(target) + [EOS], the last `cutoff_len` kept."""
    n = len(examples)
    encoded = _encode_unique(tokenizer, [e.instruction for e in examples] + [e.prompt for e in examples]
                             + [e.target for e in examples])
    token_rows, label_rows = [], []
    for i in range(n):
        context = encoded[i] + encoded[n + i]
        answer = encoded[2 * n + i] + [tokenizer.eos_id]
        token_rows.append((context + answer)[-cutoff_len:])
        label_rows.append(([IGNORE_INDEX] * len(context) + answer)[-cutoff_len:])
    offsets = np.zeros(n + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(r) for r in token_rows])
    flat = lambda rows: np.fromiter((t for r in rows for t in r), dtype=np.int32, count=int(offsets[-1]))
    return TokenizedExamples(tokens=flat(token_rows), labels=flat(label_rows), offsets=offsets)


def _encode_unique(tokenizer: TokenizerInfo, texts: list[str]) -> list[list[int]]:
    """Encode each distinct string once (instructions repeat on every row), without special tokens."""
    unique = list(dict.fromkeys(texts))
    ids = dict(zip(unique, (e.ids for e in tokenizer.tokenizer.encode_batch(unique, add_special_tokens=False))))
    return [ids[t] for t in texts]
