"""HR@K and NDCG@K of ranked SID predictions, with the semantics of upstream MiniOneRec's calc.py.

Knows only strings. For each sample, predictions are ranked best first; calc.py strips `"` and newlines
from each prediction and `" \\n"` from the target, finds the FIRST exact match at rank r (0-based), and
adds HR@K += 1 and NDCG@K += 1 / log2(r + 2) for every K > r. Predictions that are not catalogue SIDs
are counted as invalid while scanning, up to and including the first match (the scan stops there).
The beam count is taken from the first sample, and K runs over the values not above it.

Files: `eval_predictions.json` is a list of {"input", "output", "predict", "scores"}: upstream
evaluate.py's records ("input" the user-input text of EvalSidDataset, not the whole prompt; "output" the
target SID + "\n"; "predict" best first) plus our beam scores, so the two files diff record by record;
calc.py reads "predict" and "output". The metrics file is the dict `compute_metrics` returns.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections import Counter
from collections.abc import Container, Iterable, Sequence
from pathlib import Path

from sidrec.errors import UserError

TOP_K = (1, 3, 5, 10, 20, 50)


class MetricsError(UserError):
    """Predictions that cannot be scored; the message names the sample and the fix."""


def clean_prediction(text: str) -> str:
    return text.strip('"\n').strip()


def clean_target(output: str | Sequence[str]) -> str:
    """calc.py reads a list-valued output (a title task) by its first element."""
    if isinstance(output, list):
        return output[0].strip('"').strip(" ")
    return output.strip(' \n"')


def first_hit_rank(predictions: Sequence[str], target: str, valid_sids: Container[str]) -> tuple[int | None, int]:
    """(rank of the first prediction equal to target or None, invalid predictions scanned up to it)."""
    invalid = 0
    for rank, prediction in enumerate(predictions):
        invalid += prediction not in valid_sids
        if prediction == target:
            return rank, invalid
    return None, invalid


def compute_metrics(predictions: list[dict], valid_sids: Container[str],
                    ks: Iterable[int] = TOP_K) -> dict:
    """Metrics of records {"output", "predict": [best first], ...} against the catalogue's SID strings.

    Returns {"hr": {"K": ..}, "ndcg": {"K": ..}, "topk": [K..], "n_samples", "n_beams",
    "invalid_prediction_count"}; the K keys are strings so the dict equals its JSON round trip.
    """
    if not predictions:
        raise MetricsError("no predictions to score: the evaluated split is empty (check --eval.split and "
                           "--eval.max-samples)")
    n_beams = len(predictions[0]["predict"])
    topk = [k for k in ks if k <= n_beams]
    hits = {k: 0.0 for k in topk}
    discounted = {k: 0.0 for k in topk}
    invalid_count = 0
    for index, record in enumerate(predictions):
        target = clean_target(record["output"])
        if target not in valid_sids:
            raise MetricsError(f"sample {index}: target {target!r} is not a catalogue SID; the split and the "
                               "catalogue (info/ file) do not belong together (check --data.category)")
        rank, invalid = first_hit_rank([clean_prediction(p) for p in record["predict"]], target, valid_sids)
        invalid_count += invalid
        for k in topk:
            if rank is not None and rank < k:
                hits[k] += 1
                discounted[k] += 1 / math.log(rank + 2)  # natural log, rescaled below as calc.py does
    n = len(predictions)
    return {
        "hr": {str(k): hits[k] / n for k in topk},
        "ndcg": {str(k): discounted[k] / n / (1.0 / math.log(2)) for k in topk},
        "topk": topk,
        "n_samples": n,
        "n_beams": n_beams,
        "invalid_prediction_count": invalid_count,
    }


def prediction_records(inputs: Sequence[str], outputs: Sequence[str], predicts: Sequence[Sequence[str]],
                       scores: Sequence[Sequence[float]]) -> list[dict]:
    """The eval_predictions.json records, one per prompt."""
    return [{"input": i, "output": o, "predict": list(p), "scores": [float(s) for s in sc]}
            for i, o, p, sc in zip(inputs, outputs, predicts, scores, strict=True)]


def write_predictions(path: str | Path, records: list[dict]) -> None:
    _write_json_atomically(Path(path), records)


def write_metrics(path: str | Path, metrics: dict) -> None:
    _write_json_atomically(Path(path), metrics)


def _write_json_atomically(path: Path, value) -> None:
    """Write to a temporary file next to `path`, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as f:
            json.dump(value, f, indent=4, ensure_ascii=False)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def most_popular_baseline(train_targets: Iterable[str], eval_targets: Iterable[str], valid_sids: Container[str],
                          num_beams: int = 50) -> dict:
    """Metrics of recommending every user the `num_beams` most frequent train targets (SID strings),
    most frequent first (ties: first seen first): the floor a recommender must clear."""
    ranked = [sid for sid, _ in Counter(train_targets).most_common(num_beams)]
    return compute_metrics([{"output": target + "\n", "predict": ranked} for target in eval_targets], valid_sids)
