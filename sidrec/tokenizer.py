"""Tokenizer loading and the SID vocabulary extension (upstream: `tokenizer.add_tokens(sorted(sids))`).

We use the `tokenizers` library directly (no transformers): `tokenizer.json` holds everything the
fast tokenizer needs; `tokenizer_config.json` (when present) names the EOS token.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Tokenizer

from sidrec.errors import UserError
from sidrec.textfile import read_json


class TokenizerError(UserError):
    """A tokenizer directory that cannot be used; the message names the file and the fix."""


@dataclass(frozen=True)
class TokenizerInfo:
    tokenizer: Tokenizer
    eos_token: str
    eos_id: int
    newline_id: int
    pad_id: int


def load_tokenizer(directory: str | Path) -> TokenizerInfo:
    """Load `<directory>/tokenizer.json`; EOS from tokenizer_config.json (default `<|im_end|>`)."""
    directory = Path(directory)
    path = directory / "tokenizer.json"
    if not path.is_file():
        raise TokenizerError(
            f"{path}: no tokenizer.json; point --model.tokenizer-path (or --model.hf-path) at a "
            "directory with a Hugging Face fast tokenizer")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as err:  # the tokenizers library raises a bare Exception for a damaged file
        raise TokenizerError(f"{path}: cannot be read as a Hugging Face fast tokenizer ({err}); the file "
                             "is damaged or incomplete: download or export it again") from None
    eos_token = "<|im_end|>"
    config_path = directory / "tokenizer_config.json"
    if config_path.is_file():
        settings = read_json(config_path, TokenizerError)
        eos = settings.get("eos_token") if isinstance(settings, dict) else None
        if isinstance(eos, dict):
            eos = eos.get("content")
        eos_token = eos or eos_token
    return describe(tokenizer, eos_token, where=str(directory))


def describe(tokenizer: Tokenizer, eos_token: str, where: str = "tokenizer") -> TokenizerInfo:
    eos_id = tokenizer.token_to_id(eos_token)
    if eos_id is None:
        raise TokenizerError(f"{where}: EOS token {eos_token!r} is not in the vocabulary")
    newline = tokenizer.encode("\n", add_special_tokens=False).ids
    if len(newline) != 1:
        raise TokenizerError(f"{where}: '\\n' must be a single token, got ids {newline}")
    pad_id = tokenizer.token_to_id("<|endoftext|>")
    return TokenizerInfo(tokenizer, eos_token, eos_id, newline[0], eos_id if pad_id is None else pad_id)


def add_sid_tokens(info: TokenizerInfo, sid_tokens) -> TokenizerInfo:
    """Add the SID tokens missing from the vocabulary in Python `sorted()` order, as upstream.

    Ids start at the current vocabulary size (151665 for Qwen2.5). Tokens already present (an official
    MiniOneRec checkpoint's tokenizer) are left alone, so the call is idempotent.
    """
    tokenizer = info.tokenizer
    missing = [t for t in sorted(set(sid_tokens)) if tokenizer.token_to_id(t) is None]
    if missing:
        tokenizer.add_tokens([AddedToken(t, normalized=True, special=False) for t in missing])
    return info


def save_tokenizer(info: TokenizerInfo, directory: str | Path) -> None:
    """Write tokenizer.json + tokenizer_config.json (what transformers' AutoTokenizer reads)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    info.tokenizer.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": info.eos_token,
        "pad_token": info.tokenizer.id_to_token(info.pad_id),
        "add_bos_token": False,
        "model_max_length": 131072,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
