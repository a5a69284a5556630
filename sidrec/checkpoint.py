"""Checkpoints of a training run: Orbax async saves, keep the last K and the best, exact restore.

Layout: `<directory>/<step>/{state, meta, metrics}`. "state" is the pytree of jax arrays (params,
optimizer state, step; sharded across devices and processes), "meta" is small JSON (loader state,
rng, config, best metric, ...), "metrics" holds the ranking metric (Orbax's own item).

Orbax writes each step into `<step>.orbax-checkpoint-tmp-*` and renames it when committed (a
commit marker on GCS), so a save that crashed half-way is never listed; leftover temporary
directories are deleted when a `Checkpointer` opens the directory. Paths are local or gs://.

Multi-process: every process constructs the `Checkpointer` and calls `save`/`restore` with the
same arguments at the same steps; Orbax coordinates who writes what.
"""

from __future__ import annotations

import json
import logging
import math
import operator
import signal
from typing import Any, Literal, Self

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from sidrec.errors import UserError

PyTree = Any


class CheckpointError(UserError):
    """A checkpoint directory or request that cannot be used; the message says why and the fix."""


class NoCheckpointError(CheckpointError):
    """The directory holds no (such) checkpoint."""


class CheckpointMismatchError(CheckpointError):
    """The stored state differs in structure, shape or dtype from the tree it is restored into."""


class _DropMissingMetricWarning(logging.Filter):
    """Orbax warns on every save without a metric; periodic saves between validations have none."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "did not provide metrics" not in record.getMessage()


logging.getLogger("absl").addFilter(_DropMissingMetricWarning())

_MAX_LISTED_MISMATCHES = 20
RANKING_FILE = "ranking.json"


class Checkpointer:
    """Async Orbax checkpoints of one run directory: keep the last `keep_last` and the best.

    The best is ranked by the `metric` given to `save` (named `best_metric`, lower is better
    when `mode="min"`) and is kept even when it is older than the last `keep_last`. A writer that
    names its ranking records it in `<directory>/ranking.json`; a reader that names none (eval,
    export) ranks by what is recorded there (default: valid_loss, min), so "best" of an SFT run
    (lowest validation loss) and of an RL run (highest validation NDCG) both mean what their run meant.
    """

    def __init__(
        self,
        directory: str | epath.PathLike,
        *,
        keep_last: int = 2,
        keep_best: bool = True,
        best_metric: str | None = None,
        mode: Literal["min", "max"] | None = None,
    ):
        if keep_last < 1:
            raise CheckpointError(f"keep_last={keep_last}: keep at least the last checkpoint (>= 1)")
        if mode not in ("min", "max", None):
            raise CheckpointError(f"mode={mode!r}: choose 'min' or 'max'")
        # Orbax needs absolute paths; a relative local run dir (`runs/demo`) is resolved here.
        self._directory = epath.Path(directory) if "://" in str(directory) else epath.Path(directory).resolve()
        best_metric, mode = self._ranking(best_metric, mode)
        self._best_metric = best_metric
        self._manager = ocp.CheckpointManager(
            self._directory,
            options=_manager_options(keep_last, keep_best, best_metric, mode),
            handler_registry=_handler_registry(),
        )
        # Orbax cleans up half-written tmp directories in a thread started here and never waits for it
        # on close(): a process that exits right after (an early user error) died in that thread at
        # interpreter shutdown. The cleanup is a directory listing; wait for it now.
        await_cleanup = getattr(self._manager, "_maybe_await_cleanup_tmp_directory", None)
        if await_cleanup is not None:
            await_cleanup()

    @property
    def directory(self) -> epath.Path:
        return self._directory

    def _ranking(self, best_metric: str | None, mode: str | None) -> tuple[str, str]:
        """(metric, mode): as given (and recorded, by process 0), else as recorded, else valid_loss/min."""
        path = self._directory / RANKING_FILE
        recorded = json.loads(path.read_text()) if path.exists() else {}
        named = best_metric is not None or mode is not None
        best_metric = best_metric or recorded.get("metric", "valid_loss")
        mode = mode or recorded.get("mode", "min")
        if named and recorded != {"metric": best_metric, "mode": mode} and jax.process_index() == 0:
            self._directory.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"metric": best_metric, "mode": mode}) + "\n")
        return best_metric, mode

    def save(self, step: int, state: PyTree, meta: dict, *, metric: float | None = None) -> bool:
        """Start saving `state` and `meta` as `step`; returns once the arrays are copied off device.

        The write finishes in the background (`wait()` blocks until it is committed), so the
        caller may donate `state` to the next step right away. `metric` ranks the checkpoint for
        "best". Returns False, saving nothing, when `step` is already saved.
        """
        if step in self._manager.all_steps():
            return False
        _check_json(meta, step)
        metrics = None
        if metric is not None:
            metric = float(metric)
            if not math.isfinite(metric):
                raise CheckpointError(
                    f"step {step}: {self._best_metric}={metric} is not finite; a diverged state "
                    "must not be saved or ranked")
            metrics = {self._best_metric: metric}
        args = ocp.args.Composite(state=ocp.args.PyTreeSave(state), meta=ocp.args.JsonSave(meta))
        # force: the caller decides when to save; Orbax would otherwise skip steps older than the
        # latest one (e.g. after resuming from an explicitly chosen earlier checkpoint).
        return self._manager.save(step, args=args, metrics=metrics, force=True)

    def restore(self, step: int, abstract_state: PyTree, *,
                partial: bool = False) -> tuple[PyTree, dict]:
        """Restore `(state, meta)` of `step` straight into the shardings of `abstract_state`.

        `abstract_state` is a pytree of `jax.ShapeDtypeStruct` (or arrays) with `.sharding`; each
        process reads only its own shards. `partial=True` restores just the subtrees present in
        `abstract_state` (e.g. `{"params": ...}` for evaluation without optimizer state).
        """
        self._require_step(step)
        _check_shardings(abstract_state)
        stored = self._manager.item_metadata(step)["state"].tree
        mismatches = _mismatches(stored, abstract_state, partial=partial)
        if mismatches:
            raise CheckpointMismatchError(_mismatch_message(self._directory / str(step), mismatches))
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_state)
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(item=abstract_state, restore_args=restore_args,
                                         partial_restore=partial),
            meta=ocp.args.JsonRestore(),
        ))
        return restored["state"], restored["meta"]

    def restore_meta(self, step: int) -> dict:
        self._require_step(step)
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        """The step with the best metric; None when no checkpoint was saved with one."""
        return self._manager.best_step()

    def step_for(self, which: Literal["best", "last"]) -> int:
        """The step to restore for `which`; "best" falls back to the latest when none was ranked."""
        if which not in ("best", "last"):
            raise CheckpointError(f"which={which!r}: choose 'best' or 'last'")
        latest = self.latest_step()
        if latest is None:
            raise NoCheckpointError(
                f"{self._directory}: no checkpoints; train first (cli.py train) or point at the "
                "run directory that holds checkpoints/")
        best = self.best_step() if which == "best" else None
        return latest if best is None else best

    def reached_preemption(self, step: int) -> bool:
        """True at the step all processes agreed to save at after a preemption notice (multi-host)."""
        return self._manager.reached_preemption(step)

    def wait(self) -> None:
        """Block until pending saves are committed (raises if a background save failed)."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _require_step(self, step: int) -> None:
        if step not in self._manager.all_steps():
            raise NoCheckpointError(
                f"{self._directory}: no checkpoint for step {step}; available: {self.all_steps()}")


def _manager_options(keep_last: int, keep_best: bool, best_metric: str, mode: str):
    policies = ocp.checkpoint_managers
    rank = operator.itemgetter(best_metric)
    keep = [policies.LatestN(n=keep_last)]
    if keep_best:
        # BestN keeps the *last* n after sorting; reverse=True sorts descending so "min" keeps
        # the smallest. Unranked checkpoints are left to LatestN.
        keep.append(policies.BestN(get_metric_fn=rank, reverse=mode == "min", n=1,
                                   keep_checkpoints_without_metrics=False))
    return ocp.CheckpointManagerOptions(
        best_fn=rank,  # stores the metric with each step and ranks best_step()
        best_mode=mode,
        preservation_policy=policies.AnyPreservationPolicy(keep),
        cleanup_tmp_directories=True,
        enable_async_checkpointing=True,
    )


def _handler_registry():
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    registry.add("state", ocp.args.PyTreeSave, ocp.PyTreeCheckpointHandler)
    registry.add("state", ocp.args.PyTreeRestore, ocp.PyTreeCheckpointHandler)
    registry.add("meta", ocp.args.JsonSave, ocp.handlers.JsonCheckpointHandler)
    registry.add("meta", ocp.args.JsonRestore, ocp.handlers.JsonCheckpointHandler)
    return registry


def _check_json(meta: dict, step: int) -> None:
    # Fail in the caller's thread, not later in Orbax's background writer.
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"step {step}: meta is not JSON-serializable ({error}); "
                              "convert arrays to lists and dataclasses to dicts") from None


def _leaves_by_name(tree: PyTree) -> dict[str, Any]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path, simple=True, separator="/"): leaf for path, leaf in flat}


def _check_shardings(abstract_state: PyTree) -> None:
    unsharded = [name for name, leaf in _leaves_by_name(abstract_state).items()
                 if getattr(leaf, "sharding", None) is None]
    if unsharded:
        raise CheckpointError(
            f"restore target has leaves without a sharding: {unsharded[:_MAX_LISTED_MISMATCHES]}; "
            "build it with jax.ShapeDtypeStruct(shape, dtype, sharding=...)")


def _mismatches(stored: PyTree, target: PyTree, *, partial: bool) -> list[str]:
    """Human-readable differences between the stored tree metadata and the target tree."""
    stored_leaves, target_leaves = _leaves_by_name(stored), _leaves_by_name(target)
    found = [f"{name}: in the target, not in the checkpoint"
             for name in target_leaves if name not in stored_leaves]
    if not partial:
        found += [f"{name}: in the checkpoint, not in the target"
                  for name in stored_leaves if name not in target_leaves]
    for name, want in target_leaves.items():
        have = stored_leaves.get(name)
        if have is None:
            continue
        if tuple(have.shape) != tuple(want.shape):
            found.append(f"{name}: shape {tuple(have.shape)} in the checkpoint, "
                         f"{tuple(want.shape)} in the target")
        elif np.dtype(have.dtype) != np.dtype(want.dtype):
            found.append(f"{name}: dtype {np.dtype(have.dtype)} in the checkpoint, "
                         f"{np.dtype(want.dtype)} in the target")
    return found


def _mismatch_message(step_dir: epath.Path, mismatches: list[str]) -> str:
    listed = mismatches[:_MAX_LISTED_MISMATCHES]
    more = len(mismatches) - len(listed)
    header = (f"{step_dir} does not match the state it is restored into ({len(mismatches)} "
              "difference(s)); restore with the config the run was trained with "
              "(restore_meta(step)['config']) or start a fresh run directory:")
    lines = [header]
    lines += [f"  - {line}" for line in listed]
    if more:
        lines.append(f"  ... and {more} more")
    return "\n".join(lines)


class PreemptionGuard:
    """Turns SIGTERM/SIGINT into a flag the train loop polls, so it can save and exit cleanly.

        with PreemptionGuard(checkpointer) as guard:
            for step in ...:
                ...
                if guard.should_stop(step):
                    checkpointer.save(step, state, meta); checkpointer.wait(); break

    A second signal while the first is pending acts as if no guard were installed (a second
    Ctrl-C interrupts at once). With several processes the signal handlers are left alone: a flag
    set on one process only would make the processes disagree on when to stop, so there
    `should_stop` relies on JAX's preemption service, which agrees on one step for all.
    """

    def __init__(self, checkpointer: Checkpointer | None = None,
                 signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT)):
        self._checkpointer = checkpointer
        self._signals = signals
        self._previous: dict[int, Any] = {}
        self._requested = False

    def __enter__(self) -> Self:
        self._requested = False
        if jax.process_count() == 1:
            self._previous = {sig: signal.signal(sig, self._on_signal) for sig in self._signals}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, _installable(handler))
        self._previous = {}

    @property
    def requested(self) -> bool:
        """A stop signal arrived since the guard was entered."""
        return self._requested

    def should_stop(self, step: int) -> bool:
        """Stop (after saving) now: a signal arrived, or all hosts reached a preemption point."""
        if self._requested:
            return True
        return self._checkpointer is not None and self._checkpointer.reached_preemption(step)

    def _on_signal(self, signum: int, frame) -> None:
        if not self._requested:
            self._requested = True
            return
        signal.signal(signum, _installable(self._previous[signum]))
        signal.raise_signal(signum)


def _installable(handler):
    # signal.signal returns None for handlers installed from C; the default is the closest.
    return signal.SIG_DFL if handler is None else handler


def restore_params(run_dir: str | epath.PathLike, abstract_params: PyTree, which: Literal["best", "last"],
                   sharding) -> tuple[PyTree, int]:
    """The parameters of a run's best/last checkpoint (no optimizer state), placed with one sharding or a
    tree of them; `abstract_params` is the tree of jax.ShapeDtypeStruct (`qwen2.abstract_params(cfg)`)."""
    if isinstance(sharding, jax.sharding.Sharding):
        sharding = jax.tree.map(lambda _: sharding, abstract_params)
    with Checkpointer(epath.Path(run_dir) / "checkpoints") as checkpoints:
        step = checkpoints.step_for(which)
        abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_params,
                                sharding)
        state, _ = checkpoints.restore(step, {"params": abstract}, partial=True)
    return state["params"], step
