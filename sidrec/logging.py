"""Run logging: a progress bar on the console, wandb, local text logs, the run summary; MFU figures.

Metric names the train loop logs (any others are passed through to wandb as given):
    train/loss, train/lr (or train/lr/<group> per optimizer group), train/grad_norm,
    train/tokens_per_s, train/step_time_s, train/mfu, train/hfu, valid/loss, eval/<metric>/<k>.
train/mfu counts model FLOPs (`qwen2.flops_per_token`: 6N + attention per real token) over the devices'
peak; train/hfu the FLOPs the step executes (`qwen2.executed_train_flops`: padding slots included, the
vocabulary head only at targets), so a small model with a huge vocabulary is not overstated.
Only process 0 (`is_main`) prints or writes anything; the other processes' loggers are silent.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Self

from etils import epath
from tqdm.auto import tqdm

from sidrec.metrics import TOP_K

METRICS_FILE = "metrics.jsonl"
LOG_FILE = "log.txt"
SUMMARY_FILE = "run_summary.json"
WANDB_ID_FILE = "wandb_id"

# Dense bf16 peak FLOP/s of one device (chip), by the prefix of `jax.Device.device_kind`.
PEAK_FLOPS_BF16 = {
    "TPU v2": 45e12,
    "TPU v3": 123e12,
    "TPU v4": 275e12,
    "TPU v5": 459e12,  # v5p
    "TPU v5p": 459e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA A100": 312e12,
    "NVIDIA H100": 989e12,  # SXM
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H200": 989e12,
    "NVIDIA B200": 2250e12,
    "NVIDIA L4": 121e12,
}

# What the progress bar shows, in order: (metric name or prefix, label, format).
_BAR_FIELDS = (
    ("train/loss", "loss", "{:.4f}"),
    ("train/lr", "lr", "{:.2e}"),
    ("train/tokens_per_s", "tok/s", "{:,.0f}"),
    ("valid/loss", "valid", "{:.4f}"),
)


def peak_flops_for(device_kind: str, override: float = 0.0) -> float | None:
    """Peak bf16 FLOP/s of a `device_kind` device: `override` if > 0, else the table (None: unknown)."""
    if override > 0:
        return override
    kind = device_kind.lower()
    matches = [name for name in PEAK_FLOPS_BF16 if kind.startswith(name.lower())]
    # Longest prefix: "TPU v5 lite" (v5e) must not be read as "TPU v5" (v5p).
    return PEAK_FLOPS_BF16[max(matches, key=len)] if matches else None


def mfu(flops_per_step: float, step_time_s: float, n_devices: int,
        peak_flops_per_device: float | None) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s over the devices' peak (None: peak unknown)."""
    if not peak_flops_per_device or step_time_s <= 0:
        return None
    return flops_per_step / (step_time_s * n_devices * peak_flops_per_device)


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """{"eval": {"hr": {10: x}}} -> {"eval/hr/10": x}, with array scalars as Python numbers."""
    flat = {}
    for key, value in metrics.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten_metrics(value, name))
        else:
            flat[name] = value.item() if hasattr(value, "item") else value
    return flat


def format_metrics_table(metrics: Mapping, baseline: Mapping | None = None,
                         baseline_name: str = "baseline") -> str:
    """A markdown table of HR@K and NDCG@K ({hr: {k: ..}, ndcg: {k: ..}}; k as int or JSON str)."""
    ks = [k for k in TOP_K if _at_k(metrics, "hr", k) is not None]
    header = ["K", "HR@K", "NDCG@K"]
    if baseline is not None:
        header += [f"HR@K ({baseline_name})", f"NDCG@K ({baseline_name})"]
    rows = [header, ["---:"] * len(header)]
    for k in ks:
        row = [str(k), _cell(metrics, "hr", k), _cell(metrics, "ndcg", k)]
        if baseline is not None:
            row += [_cell(baseline, "hr", k), _cell(baseline, "ndcg", k)]
        rows.append(row)
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def _at_k(metrics: Mapping, name: str, k: int) -> float | None:
    values = metrics.get(name, {})
    return values.get(k, values.get(str(k)))


def _cell(metrics: Mapping, name: str, k: int) -> str:
    value = _at_k(metrics, name, k)
    return "-" if value is None else f"{value:.4f}"


class RunLogger:
    """Console progress bar, wandb and local logs of one run (process 0 only).

    Files in a local `run_dir`: `log.txt` (the `info` lines), `metrics.jsonl` (one line per `log`),
    `run_summary.json`, `wandb/` (offline runs; synced later with `wandb sync`) and `wandb_id`, so
    a resumed run keeps logging into the same wandb run. For a remote run_dir (gs://...) only the
    summary is written there; wandb then keeps its files in the working directory.
    """

    def __init__(self, config_dict: dict, run_dir: str | epath.PathLike, *, is_main: bool,
                 wandb_mode: str = "offline", project: str = "sidrec", name: str | None = None,
                 total_steps: int, start_step: int = 0):
        self._is_main = is_main
        self._run_dir = epath.Path(run_dir)
        self._local_dir = None if "://" in str(run_dir) else Path(run_dir)
        self._shown: dict[str, str] = {}
        self._bar = None
        self._wandb_run = None
        if not is_main:
            return
        if self._local_dir is not None:
            self._local_dir.mkdir(parents=True, exist_ok=True)
        if wandb_mode != "disabled":
            self._wandb_run = _start_wandb(config_dict, self._local_dir, wandb_mode, project, name)
        # total_steps 0 (an eval-only run): log files and wandb, no training bar.
        self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                         disable=total_steps == 0)

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Record `metrics` (flat or nested; arrays become numbers) as of optimizer step `step`."""
        if not self._is_main:
            return
        flat = flatten_metrics(metrics)
        self._append(METRICS_FILE, json.dumps({"step": step, **flat}))
        if self._wandb_run is not None:
            self._wandb_run.log(flat, step=step)
        self._shown.update(_bar_fields(flat))
        self._bar.set_postfix_str(", ".join(f"{k}={v}" for k, v in self._shown.items()), refresh=False)
        self._bar.update(max(0, step - self._bar.n))

    def info(self, message: str) -> None:
        """Print a line above the progress bar (and append it to log.txt)."""
        if not self._is_main:
            return
        tqdm.write(message)
        self._append(LOG_FILE, message)

    def write_summary(self, summary: dict) -> None:
        """Write `<run_dir>/run_summary.json` atomically (a reader never sees half a file)."""
        if not self._is_main:
            return
        write_json_atomically(self._run_dir / SUMMARY_FILE, summary)
        if self._wandb_run is not None:
            self._wandb_run.summary.update(flatten_metrics(summary))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._wandb_run is not None:
            self._wandb_run.finish()
        self._bar = self._wandb_run = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _append(self, file_name: str, line: str) -> None:
        # Opened per line: a killed run loses nothing and no handle outlives the logger.
        if self._local_dir is not None:
            with open(self._local_dir / file_name, "a") as file:
                file.write(line + "\n")


def write_json_atomically(path: epath.Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    temporary.write_text(json.dumps(value, indent=2) + "\n")
    temporary.replace(path)


def _bar_fields(flat: Mapping[str, Any]) -> dict[str, str]:
    fields = {}
    for prefix, label, spec in _BAR_FIELDS:
        # "train/lr" also matches the first per-group rate, "train/lr/<group>".
        name = next((n for n in flat if n == prefix or n.startswith(prefix + "/")), None)
        if name is not None and isinstance(flat[name], (int, float)):
            fields[label] = spec.format(flat[name])
    return fields


def _start_wandb(config_dict: dict, local_dir: Path | None, mode: str, project: str, name: str | None):
    import wandb  # lazily: tests and disabled runs never load or contact it

    run_id = _wandb_run_id(local_dir)
    return wandb.init(project=project, name=name, config=config_dict, mode=mode, id=run_id,
                      resume="allow", dir=None if local_dir is None else str(local_dir),
                      settings=wandb.Settings(quiet=True, console="off"))


def _wandb_run_id(local_dir: Path | None) -> str:
    """The run's wandb id, created once and reused when the run resumes."""
    new_id = uuid.uuid4().hex[:8]
    if local_dir is None:
        return new_id
    path = local_dir / WANDB_ID_FILE
    if not path.exists():
        path.write_text(new_id)
    return path.read_text().strip()
