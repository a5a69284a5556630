"""A small synthetic catalogue in MiniOneRec's layout and a BPE tokenizer trained on it.

Items have 3-level SIDs `<a_i><b_j><c_k>`: a = product family (its noun is in the title), b = style
within the family (its adjective is in the title), c = the item within (family, style). Users follow
a Markov chain: each item has three likely successors, mostly from its own family, so the next item
is predictable from the history (a tiny model learns it in minutes) while popularity alone is weak.
Rows are built as upstream's: one per user position (history = the previous <= 10 items), all rows
ordered by time and cut 80/10/10 into train/valid/test.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from sidrec.data.minionerec import DataError
from sidrec.tokenizer import (
    TokenizerInfo,
    add_sid_tokens,
    describe,
    save_tokenizer,
)

NOUNS = ("Valve", "Sensor", "Clamp", "Filter", "Pump", "Gauge", "Cable", "Drill", "Switch", "Glove",
         "Tape", "Beaker", "Funnel", "Magnet", "Spring", "Nozzle", "Relay", "Wrench", "Lamp", "Fuse",
         "Hinge", "Bracket", "Pipette", "Scale")
ADJECTIVES = ("Brass", "Steel", "Compact", "Heavy Duty", "Digital", "Flexible", "Precision", "Mini",
              "Industrial", "Coated", "Sterile", "Insulated", "Portable", "Magnetic", "Clear", "Rugged")
MAX_HISTORY = 10
SUCCESSORS = 3
SUCCESSOR_WEIGHTS = np.array([0.6, 0.25, 0.15])
FOLLOW_CHAIN = 0.85   # probability that the next item is one of the current item's successors
SAME_FAMILY = 0.8     # probability that a successor shares the item's family (SID prefix a)
SPLIT_FRACTIONS = (0.8, 0.1)  # train, valid; test gets the rest
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_end|>")
_PIECE_BREAK = re.compile(r"\n|,\s")
_SID_TOKEN = re.compile(r"<[^<>\s]+>")


def write_synthetic(out_root: str | Path, *, n_items: int, n_users: int, seed: int,
                    category: str = "Synthetic") -> Path:
    """Write `<out_root>/Amazon/...` (all of it or nothing) and return `out_root`. Same seed, same bytes."""
    if n_items < 8 or n_users < 10:
        raise ValueError(f"synthetic catalogue needs >= 8 items and >= 10 users (got {n_items}, {n_users})")
    rng = np.random.default_rng(seed)
    sids, titles = _make_items(n_items, rng)
    successors = _make_successors(sids, rng)
    rows = _user_rows(successors, n_users, rng)
    out_root = Path(out_root)
    if (out_root / "Amazon").exists():
        raise DataError(f"{out_root / 'Amazon'} already exists; remove it or write elsewhere")
    out_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_root, prefix=".Amazon-"))
    try:
        _write_layout(staging, category, sids, titles, rows)
        staging.rename(out_root / "Amazon")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_root


def _make_items(n_items: int, rng: np.random.Generator) -> tuple[list[tuple[str, ...]], list[str]]:
    """Families (a) of styles (b) of items (c); titles name the family's noun and the style's adjective."""
    n_families = max(2, round(n_items ** (1 / 3)))
    n_styles = max(2, round((n_items / n_families) ** 0.5))
    family = rng.integers(n_families, size=n_items)
    style = rng.integers(n_styles, size=n_items)
    in_group = Counter()
    sids, titles = [], []
    for a, b in zip(family, style):
        c = in_group[a, b]
        in_group[a, b] += 1
        sids.append((f"<a_{a}>", f"<b_{b}>", f"<c_{c}>"))
        titles.append(f"{_word(ADJECTIVES, b)} {_word(NOUNS, a)} {chr(65 + c % 26)}{100 + 7 * c + a}")
    return sids, titles


def _word(words: tuple[str, ...], index: int) -> str:
    return words[index % len(words)] + (f" {index // len(words) + 1}" if index >= len(words) else "")


def _make_successors(sids: list[tuple[str, ...]], rng: np.random.Generator) -> np.ndarray:
    """[n_items, SUCCESSORS] item ids, most from the same family."""
    families: dict[str, list[int]] = {}
    for item, sid in enumerate(sids):
        families.setdefault(sid[0], []).append(item)
    n = len(sids)
    return np.array([[rng.choice(families[sid[0]]) if rng.random() < SAME_FAMILY else rng.integers(n)
                      for _ in range(SUCCESSORS)] for sid in sids])


def _user_rows(successors: np.ndarray, n_users: int, rng: np.random.Generator) -> list[tuple[float, int, list[int], int]]:
    """(time, user, history item ids, next item id) for every position of every user, in time order."""
    n_items = len(successors)
    popularity = 1.0 / (np.arange(n_items) + 5.0)
    popularity = rng.permutation(popularity / popularity.sum())
    rows = []
    for user in range(n_users):
        length = int(rng.integers(5, 21))
        items = [int(rng.choice(n_items, p=popularity))]
        while len(items) < length:
            follow = rng.random() < FOLLOW_CHAIN
            items.append(int(rng.choice(successors[items[-1]], p=SUCCESSOR_WEIGHTS) if follow
                             else rng.choice(n_items, p=popularity)))
        times = rng.random() + np.cumsum(rng.exponential(0.05, size=length))
        rows += [(float(times[t]), user, items[max(0, t - MAX_HISTORY):t], items[t]) for t in range(1, length)]
    return sorted(rows, key=lambda row: row[0])


def _write_layout(amazon: Path, category: str, sids, titles, rows) -> None:
    sid_strings = ["".join(sid) for sid in sids]
    (amazon / "index").mkdir()
    (amazon / "info").mkdir()
    index = {str(i): list(sid) for i, sid in enumerate(sids)}
    items = {str(i): {"title": title, "description": f"['{title}, made for lab and workshop use.']",
                      "brand": title.split()[0], "categories": ""} for i, title in enumerate(titles)}
    (amazon / "index" / f"{category}.index.json").write_text(json.dumps(index))
    (amazon / "index" / f"{category}.item.json").write_text(json.dumps(items, indent=2))
    (amazon / "info" / f"{category}_5_synthetic.txt").write_text(
        "".join(f"{sid}\t{title}\t{i}\n" for i, (sid, title) in enumerate(zip(sid_strings, titles))))
    n_train = int(len(rows) * SPLIT_FRACTIONS[0])
    n_valid = int(len(rows) * SPLIT_FRACTIONS[1])
    splits = {"train": rows[:n_train], "valid": rows[n_train:n_train + n_valid], "test": rows[n_train + n_valid:]}
    for split, split_rows in splits.items():
        (amazon / split).mkdir()
        with (amazon / split / f"{category}_5_synthetic.csv").open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["user_id", "history_item_title", "item_title", "history_item_id", "item_id",
                             "history_item_sid", "item_sid"])
            for _, user, history, item in split_rows:
                writer.writerow([f"U{user}", repr([titles[i] for i in history]), titles[item], repr(history),
                                 item, repr([sid_strings[i] for i in history]), sid_strings[item]])


def train_bpe_tokenizer(texts: list[str], sid_tokens, vocab_size: int = 1024,
                        out_dir: str | Path | None = None) -> TokenizerInfo:
    """A byte-level BPE trained on `texts` (SID tokens stripped: they are added whole afterwards, in
    sorted order as upstream), with `<|endoftext|>` (pad) and `<|im_end|>` (EOS); saved to `out_dir`."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(_distinct_pieces(texts), trainer)
    info = add_sid_tokens(describe(tokenizer, "<|im_end|>", where="trained BPE"), sid_tokens)
    if out_dir is not None:
        save_tokenizer(info, out_dir)
    return info


def _distinct_pieces(texts: list[str]) -> list[str]:
    """Lines and list items, each once and without SID tokens: the same merges as the full corpus
    (prompts repeat templates and titles), from a corpus ~100x smaller, so training takes a second."""
    pieces = dict.fromkeys(piece for text in texts for piece in _PIECE_BREAK.split(text))
    return list(dict.fromkeys(_SID_TOKEN.sub("", piece) for piece in pieces))
