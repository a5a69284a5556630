"""What every benchmark shares: paths, the machine description, timing, peak memory, tables, results.

A benchmark module exposes `main()`, prints a short table and writes `bench/results/<name>.json`:
{"name", "machine", "settings", "results"}. Figures are medians over repeats; side-by-side runs
alternate the two contenders repeat by repeat, so load from other processes hits both alike.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
RESULTS = Path(__file__).resolve().parent / "results"
WORK_DIR = ROOT / "runs" / "bench"
"""Scratch space (git-ignored): token caches and the tiny checkpoints the benches write."""
CATEGORY = "Industrial_and_Scientific"


class BenchUnavailable(RuntimeError):
    """A benchmark cannot run here (missing ../shared or optional packages); the message says why."""


def require_shared() -> Path:
    if not (SHARED / "data" / "Amazon").is_dir():
        raise BenchUnavailable(f"{SHARED}: reference data missing (benchmarks run on ../shared/data/Amazon)")
    return SHARED


def require_torch() -> None:
    missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        raise BenchUnavailable(f"{' and '.join(missing)} not installed (pip install -e '.[torch]')")


def load_fixture_module(name: str):
    """A committed fixture script (tests/fixtures/<name>.py) as a module, to reuse its definitions."""
    path = ROOT / "tests" / "fixtures" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def machine() -> dict:
    """Where the figures were measured: they only compare with figures from the same description."""
    import jax

    info = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "vector_isa": _vector_isa(),  # one "AMD EPYC" name: jnp.dot at 193 and at 62-74 GFLOP/s
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    for module in ("torch", "transformers"):
        if importlib.util.find_spec(module) is not None:
            info[module] = __import__(module).__version__
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _vector_isa() -> str:
    """The widest x86 vector extension the CPU reports (matmul and exp rates roughly follow it)."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return platform.machine()
    words = set(flags.split(":", 1)[1].split())
    return next((name for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX"))
                 if flag in words), platform.machine())


def seconds(fn: Callable[[], object]) -> float:
    """Wall time of one call (fn must block until its work is done)."""
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def alternate(contenders: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Time each contender `repeats` times, interleaved (A B A B ...), so noise hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            times[name].append(seconds(fn))
    return times


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_module(module: str, *args: str, timeout: float = 1200, env: dict[str, str] | None = None) -> dict:
    """Run `python -m <module> <args>` in a fresh process (own peak RSS, own XLA flags; `env` added to
    this one's environment) and return the JSON it prints on its last stdout line."""
    done = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})
    if done.returncode != 0:
        raise RuntimeError(f"{module} {' '.join(args)} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def write_result(name: str, settings: dict, results: dict) -> Path:
    """bench/results/<name>.json, written atomically (a crash never leaves half a file)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"name": name, "machine": machine(), "settings": settings, "results": results}
    with tempfile.NamedTemporaryFile("w", dir=RESULTS, suffix=".tmp", delete=False) as f:
        json.dump(payload, f, indent=2)
        f.write("\n")
    os.chmod(f.name, 0o644)  # NamedTemporaryFile creates 0600
    os.replace(f.name, path)
    return path


def read_result(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> str:
    """A markdown table; columns are (key, header, format spec), rows dicts (missing keys print '-')."""
    def cell(row, key, spec):
        value = row.get(key)
        return "-" if value is None else format(value, spec)

    lines = ["| " + " | ".join(header for _, header, _ in columns) + " |",
             "|" + "|".join(" ---: " if spec else " --- " for _, _, spec in columns) + "|"]
    lines += ["| " + " | ".join(cell(row, key, spec) for key, _, spec in columns) + " |" for row in rows]
    return "\n".join(lines)
