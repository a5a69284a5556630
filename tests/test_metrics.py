"""calc.py semantics on hand-made predictions; expected numbers worked out by hand below."""

import json
import math

import pytest

from sidrec.metrics import (
    MetricsError,
    compute_metrics,
    prediction_records,
    write_metrics,
    write_predictions,
)

CATALOGUE = {f"<a_{i}><b_{i}>" for i in range(60)}
BAD = "<a_999><b_1>"  # not a catalogue SID


def sid(i: int) -> str:
    return f"<a_{i}><b_{i}>"


def ranked(*overrides: tuple[int, str], start: int = 10) -> list[str]:
    """50 valid non-target predictions (sid(start)...), with some positions overridden."""
    predictions = [sid(start + i) for i in range(50)]
    for rank, text in overrides:
        predictions[rank] = text
    return predictions


SAMPLES = [
    # hit at rank 0
    {"output": sid(0) + "\n", "predict": ranked((0, sid(0)))},
    # hit at rank 3 (written the way a model may emit it), one invalid before it and one after (not counted)
    {"output": sid(1) + "\n", "predict": ranked((1, BAD), (3, f'"{sid(1)}"\n'), (10, BAD))},
    # hit at rank 49 with two invalid before it
    {"output": sid(2) + "\n", "predict": ranked((7, BAD), (8, "garbage"), (49, sid(2)))},
    # the first sample's target again, predicted twice: the first match (rank 5) counts
    {"output": sid(0) + "\n", "predict": ranked((5, sid(0)), (7, sid(0)))},
    # a miss: all three invalid predictions count
    {"output": sid(3) + "\n", "predict": ranked((0, BAD), (20, BAD), (49, BAD))},
    # a list-valued output (calc.py takes its first element), hit at rank 1
    {"output": [sid(4)], "predict": ranked((1, sid(4)))},
]


def test_hand_made_predictions_reproduce_calc_py():
    metrics = compute_metrics(SAMPLES, CATALOGUE)
    n = 6  # first-hit ranks: 0, 3, 49, 5, miss, 1
    d = lambda r: 1 / math.log2(r + 2)
    expected_hr = {"1": 1 / n, "3": 2 / n, "5": 3 / n, "10": 4 / n, "20": 4 / n, "50": 5 / n}
    expected_ndcg = {
        "1": d(0) / n,
        "3": (d(0) + d(1)) / n,
        "5": (d(0) + d(1) + d(3)) / n,
        "10": (d(0) + d(1) + d(3) + d(5)) / n,
        "20": (d(0) + d(1) + d(3) + d(5)) / n,
        "50": (d(0) + d(1) + d(3) + d(5) + d(49)) / n,
    }
    assert metrics["hr"] == expected_hr  # exact: counts over n
    # calc.py divides by ln(r + 2) and rescales by ln 2: equal to 1/log2(r + 2) up to rounding.
    assert metrics["ndcg"] == pytest.approx(expected_ndcg, rel=1e-12)
    assert metrics["topk"] == [1, 3, 5, 10, 20, 50]
    assert (metrics["n_samples"], metrics["n_beams"]) == (6, 50)
    assert metrics["invalid_prediction_count"] == 0 + 1 + 2 + 0 + 3 + 0


def test_fewer_beams_than_the_largest_k_drop_those_ks():
    samples = [{"output": sid(0) + "\n", "predict": ranked((12, sid(0)))[:20]}]
    metrics = compute_metrics(samples, CATALOGUE)
    assert metrics["topk"] == [1, 3, 5, 10, 20] and metrics["n_beams"] == 20
    assert metrics["hr"] == {"1": 0.0, "3": 0.0, "5": 0.0, "10": 0.0, "20": 1.0}


def test_unscorable_inputs_are_clear_errors():
    with pytest.raises(MetricsError, match="split is empty"):
        compute_metrics([], CATALOGUE)
    with pytest.raises(MetricsError, match=r"sample 1: target '<a_77><b_77>' is not a catalogue SID"):
        compute_metrics([SAMPLES[0], {"output": "<a_77><b_77>\n", "predict": ranked()}], CATALOGUE)


def test_files_load_as_calc_py_reads_them(tmp_path):
    records = prediction_records(["prompt 0", "prompt 1"], [sid(0) + "\n", sid(1) + "\n"],
                                 [SAMPLES[0]["predict"], SAMPLES[1]["predict"]], [[-1.5] * 50, [-2.0] * 50])
    path = tmp_path / "run" / "eval_predictions.json"
    write_predictions(path, records)
    loaded = json.loads(path.read_text())
    # calc.py: json.load, then sample["predict"] (a list of strings) and sample["output"] (a string)
    assert loaded == records
    assert all(isinstance(p, str) for sample in loaded for p in sample["predict"])
    assert set(loaded[0]) == {"input", "output", "predict", "scores"}

    metrics = compute_metrics(loaded, CATALOGUE)
    metrics_path = tmp_path / "run" / "eval_predictions.metrics.json"
    write_metrics(metrics_path, metrics)
    assert json.loads(metrics_path.read_text()) == metrics
    assert sorted(p.name for p in metrics_path.parent.iterdir()) == [
        "eval_predictions.json", "eval_predictions.metrics.json"]  # no temporary files left


def test_a_failed_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "eval_predictions.metrics.json"
    write_metrics(path, {"n_samples": 1})
    with pytest.raises(TypeError):
        write_metrics(path, {"n_samples": object()})
    assert json.loads(path.read_text()) == {"n_samples": 1}
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
