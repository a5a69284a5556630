"""Write a complete MiniOneRec data root for new SIDs: `<out>/Amazon/{index,info,train,valid,test}`.

The rest of sidrec (and upstream) reads these files unchanged (`--data.root <out>`):
- `index/<Cat>.index.json`: item id -> list of SID tokens, in the input's key order, serialised as
  upstream's (json.dumps with default separators, one line);
- `index/<Cat>.item.json`: copied byte for byte;
- `info/<Cat>_*.txt`: each line's first field (the SID) replaced, title and item id kept, same order;
- `{train,valid,test}/<Cat>_*.csv`: `history_item_sid` (a Python list literal, as pandas wrote it) and
  `item_sid` recomputed from `history_item_id` / `item_id`; every other field keeps its value and, for
  files written with minimal quoting as upstream's are, its bytes (line endings and a BOM kept too).

Everything is written into a temporary directory beside the output and renamed into place at the end,
so a killed run never leaves a half-written data root.
"""

from __future__ import annotations

import ast
import csv
import io
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

from sidrec.data.minionerec import SPLITS, Catalogue, DataError
from sidrec.textfile import read_text


def write_data_root(catalogue: Catalogue, sid_tokens_of: Mapping[str, tuple[str, ...]], out: str | Path,
                    overwrite: bool = False) -> Path:
    """Write `out/Amazon/...` for `catalogue` with the new SIDs; returns `out/Amazon`."""
    out = Path(out)
    amazon = out / "Amazon"
    if amazon.exists() and not overwrite:
        raise DataError(f"{amazon}: already exists; choose another --sids.out or pass --sids.overwrite True")
    missing = [i for i in catalogue.item_ids if i not in sid_tokens_of]
    if missing:
        raise DataError(f"no new SID for {len(missing)} item id(s) of {catalogue.paths.index} (e.g. {missing[0]!r})")
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".sids-", dir=out))
    try:
        _write_all(catalogue, sid_tokens_of, staging / "Amazon")
        if amazon.exists():
            shutil.rmtree(amazon)
        os.replace(staging / "Amazon", amazon)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return amazon


def _write_all(catalogue: Catalogue, sid_tokens_of: Mapping[str, tuple[str, ...]], amazon: Path) -> None:
    paths = catalogue.paths
    sid_of = {item_id: "".join(sid_tokens_of[item_id]) for item_id in catalogue.item_ids}
    index_out = amazon / "index" / paths.index.name
    index_out.parent.mkdir(parents=True)
    index_out.write_text(json.dumps({i: list(sid_tokens_of[i]) for i in catalogue.item_ids}), encoding="utf-8")
    shutil.copyfile(paths.item, amazon / "index" / paths.item.name)
    (amazon / "info").mkdir()
    (amazon / "info" / paths.info.name).write_bytes(_rewrite_info(paths.info, sid_of))
    for split in SPLITS:
        source = paths.splits[split]
        (amazon / split).mkdir()
        (amazon / split / source.name).write_bytes(_rewrite_csv(source, sid_of))


def _bom_and_newline(path: Path) -> tuple[bytes, str]:
    data = path.read_bytes()
    bom = b"\xef\xbb\xbf" if data.startswith(b"\xef\xbb\xbf") else b""
    return bom, "\r\n" if b"\r\n" in data else "\n"


def _rewrite_info(path: Path, sid_of: Mapping[str, str]) -> bytes:
    bom, newline = _bom_and_newline(path)
    lines = []
    for line_no, line in enumerate(read_text(path, DataError).splitlines(), 1):
        if not line.strip():
            lines.append(line)
            continue
        _, title, item_id = line.split("\t")  # the catalogue has checked every line's shape
        if item_id not in sid_of:
            raise DataError(f"{path}:{line_no}: item id {item_id!r} is not a key of the index; the info file "
                            "and the index must come from the same dataset")
        lines.append(f"{sid_of[item_id]}\t{title}\t{item_id}")
    return bom + (newline.join(lines) + newline).encode("utf-8")


def _rewrite_csv(path: Path, sid_of: Mapping[str, str]) -> bytes:
    bom, newline = _bom_and_newline(path)
    rows = list(csv.reader(io.StringIO(read_text(path, DataError), newline="")))
    header = rows[0]
    column = {name: header.index(name) for name in ("history_item_id", "item_id", "history_item_sid", "item_sid")}
    for row in rows[1:]:
        if not row:
            continue
        history = ast.literal_eval(row[column["history_item_id"]])
        row[column["history_item_sid"]] = str([sid_of[str(i)] for i in history])
        row[column["item_sid"]] = sid_of[row[column["item_id"]]]
    text = io.StringIO(newline="")
    csv.writer(text, lineterminator=newline).writerows(rows)
    return bom + text.getvalue().encode("utf-8")
