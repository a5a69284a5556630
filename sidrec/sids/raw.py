"""Raw inputs for `cli.py sids`: an items file and interaction csvs, no SIDs yet.

- Items (`--sids.items`): `.json` keyed by item id as upstream's item.json ({"<id>": {"title", "description",
  ...}}), `.jsonl` with one {"item_id", "title", "description"} object a line, or `.csv` with columns
  item_id,title[,description]. Every item needs a non-empty title; ids must be unique.
- Interactions (`--sids.interactions DIR`): `DIR/{train,valid,test}/<Category>_*.csv` in upstream's column
  layout (user_id, history_item_id as a list literal, item_id; history_item_title / item_title are filled
  from the items when absent; SID columns, when present, are replaced).

They are staged as an upstream-layout data root with one placeholder SID per item (`<a_N>`, N the item's
position) so that the loader checks them exactly like shipped data; the SID writer then replaces every
SID. Items come out in the items file's order.
"""

from __future__ import annotations

import ast
import csv
import io
import json
from pathlib import Path

from sidrec.data.minionerec import CSV_COLUMNS, SPLITS, DataError
from sidrec.textfile import read_json, read_text

REQUIRED_INTERACTION_COLUMNS = ("user_id", "history_item_id", "item_id")


def read_items(path: str | Path) -> dict[str, dict]:
    """Item id -> features (at least a non-empty "title"), in file order."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: not found; --sids.items must be an items file (.json, .jsonl or .csv)")
    if path.suffix == ".json":
        value = read_json(path, DataError)
        if not isinstance(value, dict):
            raise DataError(f"{path}: expected a JSON object keyed by item id (as upstream's <Category>.item.json)")
        items = [(str(k), v, None) for k, v in value.items()]
    elif path.suffix == ".jsonl":
        items = []
        for line_no, line in enumerate(read_text(path, DataError).splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{line_no}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict) or "item_id" not in record:
                raise DataError(f'{path}:{line_no}: expected an object with "item_id" and "title"')
            items.append((str(record.pop("item_id")), record, line_no))
    elif path.suffix == ".csv":
        reader = csv.DictReader(io.StringIO(read_text(path, DataError), newline=""))
        if not {"item_id", "title"} <= set(reader.fieldnames or ()):
            raise DataError(f"{path}:1: needs columns item_id and title (and optionally description), got "
                            f"{reader.fieldnames}")
        items = [(row.pop("item_id"), row, reader.line_num) for row in reader]
    else:
        raise DataError(f"{path}: unknown items format {path.suffix!r}; use .json, .jsonl or .csv")
    features: dict[str, dict] = {}
    for item_id, record, line_no in items:
        where = f"{path}:{line_no}" if line_no else f"{path}: key {item_id!r}"
        if item_id in features:
            raise DataError(f"{where}: item id {item_id!r} appears twice; item ids must be unique")
        if not isinstance(record, dict) or not isinstance(record.get("title"), str) or not record["title"].strip():
            raise DataError(f"{where}: item {item_id!r} has no title; every item needs a non-empty title")
        features[item_id] = record
    if not features:
        raise DataError(f"{path}: no items; the catalogue is empty")
    return features


def stage(items_path: str | Path, interactions: str | Path, category: str, root: Path) -> Path:
    """Write `root/Amazon/...` with placeholder SIDs; returns root (for minionerec.load_catalogue)."""
    features = read_items(items_path)
    placeholder = {item_id: f"<a_{n}>" for n, item_id in enumerate(features)}
    amazon = root / "Amazon"
    for sub in ("index", "info", *SPLITS):
        (amazon / sub).mkdir(parents=True, exist_ok=True)
    (amazon / "index" / f"{category}.index.json").write_text(json.dumps({i: [s] for i, s in placeholder.items()}))
    (amazon / "index" / f"{category}.item.json").write_text(json.dumps(features, indent=2))
    clean = {i: " ".join(f["title"].split()) for i, f in features.items()}  # no tabs or newlines in info lines
    (amazon / "info" / f"{category}_items.txt").write_text(
        "".join(f"{placeholder[i]}\t{clean[i]}\t{i}\n" for i in features))
    for split in SPLITS:
        source = _one_csv(Path(interactions), split, category)
        (amazon / split / source.name).write_text(_staged_csv(source, features, placeholder), encoding="utf-8")
    return root


def _one_csv(interactions: Path, split: str, category: str) -> Path:
    found = sorted((interactions / split).glob(f"{category}_*.csv"))
    if len(found) != 1:
        raise DataError(f"{interactions / split}: expected exactly one {category}_*.csv ({len(found)} found); "
                        "--sids.interactions holds train/, valid/ and test/ as upstream's data/Amazon")
    return found[0]


def _staged_csv(path: Path, features: dict[str, dict], placeholder: dict[str, str]) -> str:
    rows = list(csv.reader(io.StringIO(read_text(path, DataError), newline="")))
    header = rows[0] if rows else []
    missing = [c for c in REQUIRED_INTERACTION_COLUMNS if c not in header]
    if missing:
        raise DataError(f"{path}:1: missing column(s) {missing}; interaction csvs need {list(REQUIRED_INTERACTION_COLUMNS)}")
    out_header = header + [c for c in CSV_COLUMNS if c not in header]
    at = {c: out_header.index(c) for c in CSV_COLUMNS}
    text = io.StringIO(newline="")
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(out_header)
    for line_no, row in enumerate(rows[1:], 2):
        if not row:
            continue
        if len(row) != len(header):
            raise DataError(f"{path}:{line_no}: {len(row)} fields, the header has {len(header)}")
        row = row + [""] * (len(out_header) - len(header))
        history = _ids(path, line_no, row[at["history_item_id"]], features)
        target = _ids(path, line_no, f"[{row[at['item_id']]!r}]", features)[0]
        if "history_item_title" not in header:
            row[at["history_item_title"]] = str([features[i]["title"] for i in history])
        if "item_title" not in header:
            row[at["item_title"]] = features[target]["title"]
        row[at["history_item_sid"]] = str([placeholder[i] for i in history])
        row[at["item_sid"]] = placeholder[target]
        writer.writerow(row)
    return text.getvalue()


def _ids(path: Path, line_no: int, cell: str, features: dict) -> list[str]:
    try:
        value = ast.literal_eval(cell)
    except (ValueError, SyntaxError):
        raise DataError(f"{path}:{line_no}: history_item_id {cell[:80]!r} is not a list literal like [3, 17]") from None
    ids = [str(i) for i in (value if isinstance(value, list) else [value])]
    unknown = [i for i in ids if i not in features]
    if unknown:
        raise DataError(f"{path}:{line_no}: item id {unknown[0]!r} is not in the items file; every interaction "
                        "must name a known item")
    return ids
