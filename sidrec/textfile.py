"""Text and JSON files as users have them: UTF-8 with or without a BOM, any line ending.

Bytes that are not UTF-8 and JSON that is cut short or malformed end in one error naming the file and
line; callers pass the UserError subclass of their layer (DataError, CheckpointError, ...).
"""

from __future__ import annotations

import json
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


def read_json(path: Path, error: type[UserError] = UserError) -> object:
    """The parsed JSON value; a syntax error names the line and says whether the file was cut short."""
    text = read_text(path, error)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        hint = ("the file ends early, it was probably cut short: download or regenerate it"
                if not text[err.pos:].strip() else "fix the JSON syntax there")
        raise error(f"{path}:{err.lineno}: not valid JSON ({err.msg}); {hint}") from None
