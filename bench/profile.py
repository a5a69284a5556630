"""Where a jitted function's time goes: a jax.profiler trace, each executed HLO op attributed to the
model's named scope (sidrec.model.qwen2 wraps blocks in jax.named_scope) and to the forward or
backward pass, using the op_name metadata of the compiled HLO."""

from __future__ import annotations

import collections
import gzip
import json
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

import jax

SCOPES = ("embed", "attention", "mlp", "final_norm", "logits")
_WRAPPERS = re.compile(r"^(?:\w+\()+|\)+$")
_OP_NAME = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name=\"([^\"]*)\"")


def op_names(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> its op_name metadata (the jax source path, named scopes included)."""
    return {m.group(1): m.group(2) for m in map(_OP_NAME.match, hlo_text.splitlines()) if m}


def classify(op_name: str) -> tuple[str, str, bool]:
    """(scope, pass, is_matmul) of one op; ops outside the model's scopes are 'other' (loss, optimizer,
    beam bookkeeping)."""
    # A scope opened at a transformation's top level is written inside it: `jvp(logits)`.
    parts = [_WRAPPERS.sub("", part) for part in op_name.split("/")]
    scope = next((s for s in reversed(parts) if s in SCOPES), "other")
    backward = "transpose(" in op_name
    return scope, "backward" if backward else "forward", "dot_general" in op_name


def short_source(op_name: str) -> str:
    """The readable tail of an op_name: what follows the innermost jit/loop wrapper."""
    return op_name.rsplit("closed_call/", 1)[-1].split(")/", 1)[-1] if op_name else "?"


def top_ops_line(result: dict, n: int = 3) -> str:
    """'45% reduce_sum, 30% logits/...d,dv->...v/dot_general, ...' for the busiest ops."""
    return ", ".join(f"{op['ms'] / result['op_ms']:.0%} `{short_source(op['source'])}`"
                     for op in result["top_ops"][:n])


def ops_by_source(profile_result: dict) -> dict[str, float]:
    """Milliseconds per call of the profile's busiest ops, summed by their source op (dot_general, exp...)."""
    totals: dict[str, float] = {}
    for op in profile_result["top_ops"]:
        name = short_source(op["source"]).rsplit("/", 1)[-1]
        totals[name] = totals.get(name, 0.0) + op["ms"]
    return dict(sorted(totals.items(), key=lambda item: -item[1]))


def profile(run: Callable[[], object], hlo_text: str, repeats: int = 1, top: int = 8) -> dict:
    """Run `run` (blocking) `repeats` times under the profiler; milliseconds per run by scope/pass,
    the share spent in matmuls, and the busiest ops."""
    names = op_names(hlo_text)
    with tempfile.TemporaryDirectory() as directory:
        jax.profiler.start_trace(directory)
        try:
            for _ in range(repeats):
                run()
        finally:
            jax.profiler.stop_trace()
        [trace_file] = Path(directory).glob("**/*.trace.json.gz")
        events = json.loads(gzip.decompress(trace_file.read_bytes()))["traceEvents"]
    by_op: collections.Counter = collections.Counter()
    for event in events:
        if event.get("ph") == "X" and "hlo_op" in event.get("args", {}):
            by_op[event["args"]["hlo_op"]] += event["dur"] / 1e3 / repeats
    by_part: collections.Counter = collections.Counter()
    matmul_ms = 0.0
    for op, ms in by_op.items():
        scope, pass_, is_matmul = classify(names.get(op, ""))
        by_part[f"{scope} ({pass_})"] += ms
        matmul_ms += ms if is_matmul else 0.0
    total = sum(by_op.values())
    return {
        "op_ms": total,
        "matmul_share": matmul_ms / total if total else 0.0,
        "parts_ms": dict(by_part.most_common()),
        "top_ops": [{"op": op, "ms": ms, "source": names.get(op, "")} for op, ms in by_op.most_common(top)],
    }
