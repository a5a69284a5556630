"""Text and JSON files as users have them: UTF-8 with or without a BOM, any line ending.

Bytes that are not UTF-8 and JSON that is cut short or malformed end in one error naming the file and
line; callers pass the UserError subclass of their layer (DataError, CheckpointError, ...).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from sidrec.errors import UserError

_BOM = b"\xef\xbb\xbf"


def read_text(path: Path, error: type[UserError] = UserError) -> str:
    """The file decoded as UTF-8 (a leading BOM dropped); line endings are left to the caller."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        # utf-8-sig reports offsets after the BOM it stripped; count lines in the original bytes
        start = err.start + (len(_BOM) if data.startswith(_BOM) else 0)
        line = data.count(b"\n", 0, start) + 1
        raise error(f"{path}:{line}: byte 0x{data[start]:02x} at offset {start} is not UTF-8 "
                    f"({err.reason}); re-save the file as UTF-8") from None


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    seen = set()
    for key, _ in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen.add(key)
    return dict(pairs)


def _line_of_second(text: str, key: str) -> int:
    hits = [m.start() for m in re.finditer(re.escape(json.dumps(key)) + r"\s*:", text)]
    return text.count("\n", 0, hits[1]) + 1 if len(hits) > 1 else 1


def read_json(path: Path, error: type[UserError] = UserError) -> object:
    """The parsed JSON value; a syntax error names the line and says whether the file was cut short; a
    key repeated in one object (json would silently keep the last: two items with one id) is an error."""
    text = read_text(path, error)
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except _DuplicateKey as dup:
        key = dup.args[0]
        raise error(f"{path}:{_line_of_second(text, key)}: key {key!r} appears twice in one object; "
                    "keys (item ids) must be unique: remove or renumber the duplicate") from None
    except json.JSONDecodeError as err:
        hint = ("the file ends early, it was probably cut short: download or regenerate it"
                if not text[err.pos:].strip() else "fix the JSON syntax there")
        raise error(f"{path}:{err.lineno}: not valid JSON ({err.msg}); {hint}") from None
