"""The upstream MiniOneRec PyTorch pieces the side-by-side benchmarks run (needs torch + transformers).

- `UpstreamConstraint`: upstream's ConstrainedLogitsProcessor (the -1e6 mask version), as
  upstream states it (the fixture script tests/fixtures/make_beam_fixtures.py imports it from here):
  log-softmax, then a per-beam mask built in a Python loop; step 0 is keyed by the prompt's last 3
  tokens ('### Response:\\n'), later steps by the generated suffix.
- `allowed_tokens_table`: upstream's prefix -> allowed-next-tokens dict over the info/ SIDs.
- `collate`: transformers' DataCollatorForSeq2Seq as upstream's sft.py configures it (pad to the
  longest row of the micro-batch, rounded up to a multiple of 8; labels padded with -100; padding on
  the left as upstream sets `tokenizer.padding_side = "left"`).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import LogitsProcessor


class UpstreamConstraint(LogitsProcessor):
    """`seconds` accumulates the time spent in the processor (the benchmark reports its share)."""

    def __init__(self, allowed: dict[tuple[int, ...], list[int]], num_beams: int):
        self.allowed, self.num_beams, self.count, self.seconds = allowed, num_beams, 0, 0.0

    def __call__(self, input_ids, scores):
        started = time.perf_counter()
        scores = torch.nn.functional.log_softmax(scores, dim=-1)
        mask = torch.full_like(scores, -1000000)
        for row, sent in enumerate(input_ids):
            key = sent[-3:] if self.count == 0 else sent[-self.count:]
            tokens = self.allowed.get(tuple(key.tolist()), [])
            if tokens:
                mask[row, tokens] = 0
        self.count += 1
        scores = scores + mask
        self.seconds += time.perf_counter() - started
        return scores


def allowed_tokens_table(sids: list[str], encode, eos_id: int) -> dict[tuple[int, ...], list[int]]:
    """Upstream's hash dict: `encode(text) -> ids` of '### Response:\\n<sid>\\n' plus EOS, keyed by
    the 3 header tokens at step 0 and by the generated suffix afterwards."""
    allowed: dict[tuple[int, ...], set[int]] = {}
    for sid in sids:
        ids = encode(f"### Response:\n{sid}\n") + [eos_id]
        for i in range(3, len(ids)):
            allowed.setdefault(tuple(ids[:i]) if i == 3 else tuple(ids[3:i]), set()).add(ids[i])
    return {key: sorted(tokens) for key, tokens in allowed.items()}


def info_sids(data_root: Path, category: str) -> list[str]:
    """The SIDs of upstream's info/ file (first column), the catalogue its evaluate.py constrains to."""
    info_path = next((data_root / "Amazon" / "info").glob(f"{category}_*.txt"))
    return [line.split("\t")[0].strip() for line in info_path.read_text().splitlines()]


def hf_tokenizer(directory: Path, sid_tokens: list[str]):
    """Upstream's tokenizer: the base one + the sorted SID tokens, pad = EOS, padding on the left."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    tokenizer.add_tokens(sorted(sid_tokens))
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def collate(tokenizer, examples: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Upstream's micro-batch from (input_ids, labels) pairs."""
    collator = transformers.DataCollatorForSeq2Seq(tokenizer, pad_to_multiple_of=8, return_tensors="pt",
                                                   padding=True)
    return collator([{"input_ids": tokens.tolist(), "attention_mask": [1] * len(tokens),
                      "labels": labels.tolist()} for tokens, labels in examples])
