"""Checkpoints of a training run: Orbax async saves, keep the last K and the best, exact restore.

Layout: `<directory>/<step>/{state, meta, metrics}`. "state" is the pytree of jax arrays (params,
optimizer state, step; sharded across devices and processes), "meta" is small JSON (loader state,
rng, config, best metric, ...), "metrics" holds the ranking metric (Orbax's own item).

Orbax writes each step into `<step>.orbax-checkpoint-tmp-*` and renames it when committed (a
commit marker on GCS), so a save that crashed half-way is never listed; leftover temporary
directories are deleted when a `Checkpointer` opens the directory. Paths are local or gs://.

Intact: Orbax's commit (the rename) says a step was written to the end; it cannot say the files
are still what was written. So each save also stores, in meta, a 32-bit fingerprint of every array
(its bits times odd position weights, summed with wrap-around: exact integer arithmetic, so it does
not depend on the sharding or the reduction order), and every restore recomputes and compares it.
`restore_latest` walks back from the newest step past damaged ones (unreadable, truncated, missing
files, wrong fingerprint), renames each to `<step>.damaged` (Orbax ignores such names) and warns.

Multi-process: every process constructs the `Checkpointer` and calls `save`/`restore` with the
same arguments at the same steps; Orbax coordinates who writes what.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import shutil
import signal
import sys
from pathlib import Path
from typing import Any, Literal, Self

import jax
import jax.numpy as jnp
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


class DamagedCheckpointError(CheckpointError):
    """A committed step that cannot be read back as it was written (truncated, missing, altered files)."""


class DiskFullError(CheckpointError):
    """A save ran out of space; the steps saved before it are intact."""


class _QuietOrbaxLogs(logging.Filter):
    """Drops Orbax log records the Checkpointer reports better itself: the warning on every save without
    a metric (periodic saves between validations have none) and the tracebacks its writer threads log
    for a full disk (`DiskFullError` says it in one line)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "did not provide metrics" in message or "No space left on device" in message:
            return False
        return not (record.exc_info and _is_disk_full(record.exc_info[1]))


logging.getLogger("absl").addFilter(_QuietOrbaxLogs())

_MAX_LISTED_MISMATCHES = 20
RANKING_FILE = "ranking.json"
FINGERPRINT_KEY = "_fingerprint"  # in meta: {leaf name: uint32 fingerprint of its array}


class Checkpointer:
    """Async Orbax checkpoints of one run directory: keep the last `keep_last` and the best.

    The best is ranked by the `metric` given to `save` (named `best_metric`, lower is better
    when `mode="min"`) and is kept even when it is older than the last `keep_last`. A writer that
    names its ranking records it in `<directory>/ranking.json`; a reader that names none (eval,
    export) ranks by what is recorded there (default: valid_loss, min), so "best" of an SFT run
    (lowest validation loss) and of an RL run (highest validation NDCG) both mean what their run meant.
    """

    _saving: tuple[int, int] | None = None  # (step, bytes) of the last save started

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
            metrics = {self._best_metric: metric, "step": step}  # the step breaks ties: see _manager_options
        nbytes = _nbytes(state)
        free = _free_bytes(self._directory)
        if not _all_processes_agree(free is None or nbytes <= free):
            self._saving = (step, nbytes)
            self._raise_if_disk_full(OSError(errno.ENOSPC, "No space left on device"))
        meta = {**meta, FINGERPRINT_KEY: fingerprints(state)}
        args = ocp.args.Composite(state=ocp.args.PyTreeSave(state), meta=ocp.args.JsonSave(meta))
        try:
            # force: the caller decides when to save; Orbax would otherwise skip steps older than the
            # latest one (e.g. after resuming from an explicitly chosen earlier checkpoint).
            started = self._manager.save(step, args=args, metrics=metrics, force=True)
        except Exception as error:  # also a failure of the previous async save, raised here
            self._raise_if_disk_full(error)
            raise
        self._saving = (step, nbytes)
        return started

    def restore(self, step: int, abstract_state: PyTree, *,
                partial: bool = False) -> tuple[PyTree, dict]:
        """Restore `(state, meta)` of `step` straight into the shardings of `abstract_state`.

        `abstract_state` is a pytree of `jax.ShapeDtypeStruct` (or arrays) with `.sharding`; each
        process reads only its own shards. `partial=True` restores just the subtrees present in
        `abstract_state` (e.g. `{"params": ...}` for evaluation without optimizer state).
        """
        self._require_step(step)
        _check_shardings(abstract_state)
        step_dir = self._directory / str(step)
        with _damage_reported(step_dir):
            stored = self._manager.item_metadata(step)["state"].tree
        mismatches = _mismatches(stored, abstract_state, partial=partial)
        if mismatches:
            raise CheckpointMismatchError(_mismatch_message(step_dir, mismatches))
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_state)
        with _damage_reported(step_dir):
            restored = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(item=abstract_state, restore_args=restore_args,
                                             partial_restore=partial),
                meta=ocp.args.JsonRestore(),
            ))
        state, meta = restored["state"], restored["meta"]
        if not isinstance(meta, dict):
            raise DamagedCheckpointError(f"{step_dir}: meta is not a JSON object")
        _verify_fingerprints(step_dir, state, meta.pop(FINGERPRINT_KEY, None))
        return state, meta

    def restore_latest(self, abstract_state: PyTree, *, say=None) -> tuple[int, PyTree, dict] | None:
        """`(step, state, meta)` of the newest intact step, None when there is no step at all.

        Damaged steps newer than it are renamed `<step>.damaged` (so the run can save that step
        again) and reported through `say` (default: stderr, process 0). When every step is damaged
        nothing is renamed and one `DamagedCheckpointError` names the directory and each reason.
        """
        say = say or _warn
        damaged = []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                state, meta = self.restore(step, abstract_state)
                reason = None
            except DamagedCheckpointError as error:
                reason = str(error)
            if _all_processes_agree(reason is None):
                self._set_aside([s for s, _ in damaged])
                for s, why in damaged:
                    say(f"warning: checkpoint step {s} is damaged and was moved to {s}.damaged; resuming "
                        f"from step {step} instead ({why})")
                return step, state, meta
            damaged.append((step, reason or "unreadable on another process"))
        if damaged:
            reasons = "; ".join(why for _, why in damaged)
            raise DamagedCheckpointError(
                f"{self._directory}: no intact checkpoint ({reasons}); move that directory away (or pass "
                "a new --run-dir) to start over")
        return None

    def restore_meta(self, step: int) -> dict:
        self._require_step(step)
        with _damage_reported(self._directory / str(step)):
            meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        meta.pop(FINGERPRINT_KEY, None)
        return meta

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
        try:
            self._manager.wait_until_finished()
        except Exception as error:
            self._raise_if_disk_full(error)
            raise

    def _raise_if_disk_full(self, error: BaseException) -> None:
        if not _is_disk_full(error):
            return
        # The half-written `<step>.orbax-checkpoint-tmp*` is deleted when the rerun opens the directory
        # (removing it here could race writer threads that are still running).
        step, nbytes = self._saving or (None, 0)
        self._manager.reload()
        intact = [s for s in self.all_steps() if s != step]
        kept = f"step {intact[-1]} is intact" if intact else "no earlier step was saved"
        raise DiskFullError(
            f"{self._directory}: no space left on device while saving step {step} (its arrays need "
            f"{_gib(nbytes)}, {_free_space(self._directory)} free); {kept}: free space (or move the run "
            "directory) and rerun the same command to resume") from None

    def _set_aside(self, steps: list[int]) -> None:
        """Rename damaged steps `<step>.damaged` (process 0), so they are neither listed nor in the way."""
        if not steps:
            return
        if jax.process_index() == 0:
            for step in steps:
                target = self._directory / f"{step}.damaged"
                n = 1
                while target.exists():
                    target, n = self._directory / f"{step}.damaged-{n}", n + 1
                (self._directory / str(step)).rename(target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("sidrec checkpoint set aside")
        self._manager.reload()

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

    def rank(metrics: dict) -> tuple:
        """Sort key, better last; of equal metrics the earliest step is best (as a training loop's strict
        `metric > best` picks it; Orbax's stable sort would pick the latest). Old checkpoints lack "step"."""
        step = metrics.get("step", 0)
        return metrics[best_metric], (-step if mode == "max" else step)
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


def _leaf_bits(x: jax.Array) -> jax.Array:
    """Each element's bits as uint32 (64-bit dtypes: two words per element)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    if x.dtype.itemsize == 8:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _leaf_fingerprint(x: jax.Array) -> jax.Array:
    """sum(bits * (2654435761 * position + 1)) mod 2**32: any changed element or moved value changes it
    (odd weights are invertible mod 2**32); exact, so every sharding and reduction order agrees."""
    bits = _leaf_bits(jnp.asarray(x))
    position, stride = jnp.zeros_like(bits), 1
    for axis in reversed(range(bits.ndim)):
        iota = jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis, out_sharding=bits.aval.sharding)
        position, stride = position + iota * jnp.uint32(stride % 2**32), stride * bits.shape[axis]
    return jnp.sum(bits * (position * jnp.uint32(2654435761) + jnp.uint32(1)), dtype=jnp.uint32)


_fingerprint_tree = jax.jit(lambda tree: jax.tree.map(_leaf_fingerprint, tree))


def fingerprints(tree: PyTree) -> dict[str, int]:
    """{leaf name: uint32 fingerprint} of a pytree of (possibly sharded, multi-process) arrays."""
    return {name: int(value) for name, value in _leaves_by_name(jax.device_get(_fingerprint_tree(tree))).items()}


def _verify_fingerprints(step_dir: epath.Path, state: PyTree, saved: dict | None) -> None:
    if saved is None:  # saved before fingerprints existed
        return
    now = fingerprints(state)
    changed = [name for name, value in now.items() if name in saved and saved[name] != value]
    if changed:
        listed = ", ".join(changed[:_MAX_LISTED_MISMATCHES])
        raise DamagedCheckpointError(f"{step_dir}: {len(changed)} array(s) read back differ from what was saved "
                                     f"({listed}); its files changed after the save")


class _damage_reported:
    """Turns any failure to read a committed step into one DamagedCheckpointError naming it."""

    def __init__(self, step_dir: epath.Path):
        self._step_dir = step_dir

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback) -> bool:
        if error is None or isinstance(error, CheckpointError) or not isinstance(error, Exception):
            return False
        first_line = (str(error).strip().splitlines() or [""])[0][:300]
        raise DamagedCheckpointError(
            f"{self._step_dir}: unreadable ({type(error).__name__}: {first_line})") from error


def _all_processes_agree(ok: bool) -> bool:
    """True when `ok` holds on every process (a damaged shard may be read by one process only)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils
    return bool(np.all(multihost_utils.process_allgather(np.array(ok))))


def _warn(message: str) -> None:
    if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)


def _is_disk_full(error: BaseException | None) -> bool:
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if getattr(error, "errno", None) == errno.ENOSPC or "No space left on device" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def _nbytes(tree: PyTree) -> int:
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)
               if hasattr(x, "shape") and not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key))


def _gib(nbytes: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= size:
            return f"{nbytes / size:.1f} {unit}"
    return f"{int(nbytes)} B"


def _free_bytes(directory: epath.Path) -> int | None:
    """Free bytes on the local disk holding `directory` (or its nearest existing parent); None if remote."""
    if "://" in str(directory):
        return None
    path = Path(str(directory))
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def _free_space(directory: epath.Path) -> str:
    free = _free_bytes(directory)
    return "unknown" if free is None else _gib(free)


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
        try:
            state, _ = checkpoints.restore(step, {"params": abstract}, partial=True)
        except DamagedCheckpointError as error:
            other = "last" if which == "best" else "best"
            hint = (f"--eval.which {other} (step {checkpoints.step_for(other)})"
                    if checkpoints.step_for(other) != step else "another run (or resume training to save a new step)")
            raise DamagedCheckpointError(f"{error}; the {which} checkpoint cannot be used: evaluate {hint}") from None
    return state["params"], step
