"""Token rows -> packed static batches: the tokenization cache, packing, and a resumable loader.

Batch format (what the train step consumes; numpy, one process's shard):
    tokens, segment_ids, positions: int32 [A, R, T]  (segment 0 = padding; positions restart at 0 in
        each packed example; examples are packed whole, never split)
    loss_pos, loss_tgt: int32 [A, L, M]  per local device: the index, into that device's rows flattened
        ([rows_per_device x T]), whose logits predict the target, and the target id (a label at
        example index t >= 1 is predicted at t - 1, HF's logits[:-1] vs labels[1:] shift)
    loss_w: float32 [A, L, M]  1 for a real target, 0 for padding
    n_targets, n_tokens: float32 scalars, GLOBAL counts of the whole optimizer step (all processes),
        so the step divides its summed cross-entropy by n_targets: the token mean over the global batch
        (upstream's loss).

Shapes. T = seq_len; R = L x rows_per_device rows per micro-batch, L = local devices (fixed, so memory
is fixed). One optimizer step takes `global_batch_size` examples (the last step of an epoch takes the
rest, as upstream's HF Trainer with drop_last=False), packs them first-fit-decreasing into as few rows
as possible (each row holding at most `targets_per_row(data, T)` loss targets), and carries them in
A = micro_batch_bucket(ceil(rows / (process_count x R))) micro-batches. The rows are then dealt to the
step's device micro-batches so that each gets about the same number of targets, and M =
target_slots_bucket(the largest number): the vocabulary head, the costliest part of a step at LLM
vocabularies, runs at M positions per device. So A and M vary from step to step over a few values
each (A to 4 significant bits: <= 12.5% padding, M to 3); each (A, M) is one compilation of the step.
A FIXED A would instead round every micro-batch up to whole rows per device, which at upstream's
batch sizes wastes up to a third of the slots; fixed target slots per row left half of them empty on
the CPU presets. `micro_batch_bound` bounds the distinct A from the lengths alone.

Every process computes the whole step plan (cheap: lengths only) so all agree on shapes, then builds
only its own rows: micro-batch a, process p holds global rows [a, p*R:(p+1)*R].
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import json
import math
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sidrec.config import ALL_TASKS, DataConfig
from sidrec.data import minionerec
from sidrec.data.minionerec import IGNORE_INDEX, PromptOptions, TokenizedExamples
from sidrec.errors import UserError
from sidrec.tokenizer import TokenizerInfo
from sidrec.util import round_up

CACHE_FORMAT = 1  # bump when the token rows' meaning changes
MIN_TARGET_BUCKET = 16

# ----------------------------------------------------------------------------------------------------
# Tokenization cache


def default_cache_dir() -> Path:
    return Path(os.environ.get("SIDREC_CACHE", Path.home() / ".cache" / "sidrec"))


def load_training_data(cfg: DataConfig, tokenizer: TokenizerInfo, cache_dir: str | Path,
                       seed: int = 42) -> TokenizedExamples:
    """The training mixture `cfg.tasks` (train split), tasks back to back in that order."""
    return concatenate(_cached_tasks(cfg, tokenizer, cache_dir, cfg.tasks, "train", seed))


def load_validation_data(cfg: DataConfig, tokenizer: TokenizerInfo, cache_dir: str | Path) -> TokenizedExamples:
    """sid_sft on the valid split (the first `cfg.valid_max_samples` rows; 0: all)."""
    [data] = _cached_tasks(cfg, tokenizer, cache_dir, ("sid_sft",), "valid", seed=42)
    return head(data, cfg.valid_max_samples) if cfg.valid_max_samples > 0 else data


def _cached_tasks(cfg: DataConfig, tokenizer: TokenizerInfo, cache_dir: str | Path, tasks: tuple[str, ...],
                  split: str, seed: int) -> list[TokenizedExamples]:
    """Token rows of each task, from `<cache_dir>/<category>.<task>.<split>.<key>.npz` when present.

    The key hashes the source files' bytes, the tokenizer (vocabulary, added SID tokens, EOS), the
    cutoff and the prompt options, so any change to them re-tokenizes instead of reusing stale rows.
    Missing tasks are built together (the CSV is parsed once) and saved.
    """
    unknown = [task for task in tasks if task not in ALL_TASKS]
    if unknown:
        raise minionerec.DataError(f"unknown task(s) {unknown}; choose from {list(ALL_TASKS)}")
    options = PromptOptions.from_config(cfg, seed)
    key = _cache_key(minionerec.resolve_paths(cfg.root, cfg.category), tokenizer, cfg.cutoff_len, options, split)
    paths = {task: Path(cache_dir) / f"{cfg.category}.{task}.{split}.{key}.npz" for task in tasks}
    missing = [task for task in tasks if not paths[task].is_file()]
    if missing:
        catalogue = minionerec.load_catalogue(cfg.root, cfg.category)
        rows = minionerec.load_split(catalogue, split) if set(missing) - {"sid_item_feat"} else []
        for task in missing:
            examples = minionerec.task_examples(task, catalogue, rows, options)
            _save_atomically(paths[task], minionerec.tokenize_examples(examples, tokenizer, cfg.cutoff_len))
    return [_load(paths[task]) for task in tasks]


def _cache_key(paths, tokenizer: TokenizerInfo, cutoff_len: int, options: PromptOptions, split: str) -> str:
    digest = hashlib.sha256()
    for file in paths.files():
        digest.update(hashlib.sha256(file.read_bytes()).digest())
    digest.update(tokenizer.tokenizer.to_str().encode())
    digest.update(json.dumps([CACHE_FORMAT, tokenizer.eos_id, cutoff_len, dataclasses.asdict(options),
                              split]).encode())
    return digest.hexdigest()[:16]


def _load(path: Path) -> TokenizedExamples:
    with np.load(path) as f:
        return TokenizedExamples(tokens=f["tokens"], labels=f["labels"], offsets=f["offsets"])


def _save_atomically(path: Path, data: TokenizedExamples) -> None:
    """Write to a temp file and rename, so a crash (or another process) never sees half a cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=path.name, suffix=".tmp", delete=False) as f:
        np.savez(f, tokens=data.tokens, labels=data.labels, offsets=data.offsets)
    os.replace(f.name, path)


def concatenate(parts: list[TokenizedExamples]) -> TokenizedExamples:
    starts = np.cumsum([0] + [len(p.tokens) for p in parts[:-1]])
    offsets = np.concatenate([[0]] + [p.offsets[1:] + s for p, s in zip(parts, starts)])
    return TokenizedExamples(tokens=np.concatenate([p.tokens for p in parts]),
                             labels=np.concatenate([p.labels for p in parts]), offsets=offsets)


def head(data: TokenizedExamples, n: int) -> TokenizedExamples:
    """The first `n` examples."""
    offsets = data.offsets[:n + 1]
    return TokenizedExamples(tokens=data.tokens[:offsets[-1]], labels=data.labels[:offsets[-1]], offsets=offsets)


def target_counts(data: TokenizedExamples) -> np.ndarray:
    """Labels each example contributes to the loss (a label at the example's first token has no logit)."""
    has_label = data.labels != IGNORE_INDEX
    has_label[data.offsets[:-1]] = False
    return np.add.reduceat(has_label.astype(np.int64), data.offsets[:-1])


# ----------------------------------------------------------------------------------------------------
# Packing


def pack_first_fit_decreasing(lengths: np.ndarray, seq_len: int, targets: np.ndarray | None = None,
                              max_targets: int | None = None) -> list[list[int]]:
    """Indices into `lengths` grouped into rows of at most `seq_len` tokens (longest first, first fit)
    and, when given, at most `max_targets` loss targets (so the loss needs logits at few positions)."""
    if len(lengths) and lengths.max() > seq_len:
        raise ValueError(f"an example of {lengths.max()} tokens does not fit a row of {seq_len}; "
                         "raise --data.seq-len or lower --data.cutoff-len")
    if targets is None:
        targets, max_targets = np.zeros_like(lengths), 0
    space = np.empty(0, dtype=np.int64)
    target_space = np.empty(0, dtype=np.int64)
    rows: list[list[int]] = []
    for i in np.argsort(-lengths, kind="stable"):
        fits = np.flatnonzero((space >= lengths[i]) & (target_space >= targets[i]))
        if len(fits):
            space[fits[0]] -= lengths[i]
            target_space[fits[0]] -= targets[i]
            rows[fits[0]].append(int(i))
        else:
            space = np.append(space, seq_len - lengths[i])
            target_space = np.append(target_space, max_targets - targets[i])
            rows.append([int(i)])
    return rows


def micro_batch_bucket(n: int) -> int:
    """`n` rounded up to 4 significant bits (1..16, 18, 20, .., 32, 36, ..): at most 12.5% padding."""
    shift = max(0, int(n).bit_length() - 4)
    return -(-int(n) >> shift) << shift


def target_slots_bucket(n: int) -> int:
    """M for a device micro-batch of `n` targets: n rounded up to 3 significant bits and to a multiple
    of 16 (at least 16). At most 25% padding, and few distinct values: each is a compilation of the
    step (4 bits measured 14-15 (A, M) pairs an epoch on the CPU presets against 9-10, for 3-6% fewer
    slots)."""
    shift = max(0, int(n).bit_length() - 3)
    return max(MIN_TARGET_BUCKET, round_up(-(-int(n) >> shift) << shift, 16))


def targets_per_row(data: TokenizedExamples, seq_len: int) -> int:
    """N, fixed for a dataset: the loss targets a row may hold (packing stops adding examples there).

    1.5 x the mixture's mean targets per full row, rounded up to a multiple of 16 (and at least the
    largest example's count): well below what the densest possible row could hold (Industrial, rows of
    1024: 208 instead of 512) at no cost in token utilisation (global batch 1024: 95.7% of slots hold
    tokens at N = 208, 95.9% at 256; 1.25x, N = 176, drops it to 89%). Rows of even target counts let
    `deal_rows` give every device about the same number, so few loss slots go unused.
    """
    counts = target_counts(data)
    mean_per_row = seq_len * float(counts.sum()) / float(data.lengths.sum())
    n = max(math.ceil(1.5 * mean_per_row), int(counts.max()), MIN_TARGET_BUCKET)
    return min(seq_len, round_up(n, 16))


@dataclass(frozen=True)
class Layout:
    """Rows of a micro-batch and where this process's sit (R = local devices x rows per device)."""

    seq_len: int  # T
    rows_per_device: int
    local_device_count: int = 1
    process_index: int = 0
    process_count: int = 1

    def __post_init__(self):
        if min(self.seq_len, self.rows_per_device, self.local_device_count, self.process_count) < 1:
            raise ValueError(f"{self}: sizes must be >= 1")
        if not 0 <= self.process_index < self.process_count:
            raise ValueError(f"process_index {self.process_index} not in [0, {self.process_count})")

    @property
    def rows_per_process(self) -> int:  # R
        return self.local_device_count * self.rows_per_device

    @property
    def rows_per_micro_batch(self) -> int:  # global rows of one micro-batch
        return self.process_count * self.rows_per_process


@dataclass(frozen=True)
class StepPlan:
    """One optimizer step: `rows[k]` lists the examples of global row k (k = (a * P + p) * R + r; empty
    for padding rows), so device micro-batch g holds rows [g * rows_per_device, (g + 1) * rows_per_device)."""

    rows: list[np.ndarray]
    num_micro_batches: int  # A
    target_slots: int  # M
    n_tokens: int
    n_targets: int


def plan_step(example_ids: np.ndarray, lengths: np.ndarray, targets: np.ndarray, layout: Layout,
              max_targets: int) -> StepPlan:
    """Pack the step's examples (ids into `lengths`/`targets`) into rows of at most `max_targets`
    targets, pick A, and deal the rows to the device micro-batches."""
    packed = [example_ids[row] for row in
              pack_first_fit_decreasing(lengths[example_ids], layout.seq_len, targets[example_ids], max_targets)]
    A = micro_batch_bucket(math.ceil(len(packed) / layout.rows_per_micro_batch))
    rows, most_targets = deal_rows(packed, [int(targets[row].sum()) for row in packed],
                                   A * layout.rows_per_micro_batch // layout.rows_per_device, layout.rows_per_device)
    return StepPlan(rows=rows, num_micro_batches=A, target_slots=target_slots_bucket(most_targets),
                    n_tokens=int(lengths[example_ids].sum()), n_targets=int(targets[example_ids].sum()))


def deal_rows(rows: list[np.ndarray], row_targets: list[int], groups: int,
              rows_per_group: int) -> tuple[list[np.ndarray], int]:
    """(rows laid out as `groups` consecutive groups of `rows_per_group`, empty rows filling the rest;
    the largest group's targets). Most targets first, each row goes to the group with the fewest
    targets so far that has room (ties: the lower group), so every device needs about the same loss
    slots. Rows are independent, so where they go never changes the step's loss or gradient."""
    heap = [(0, g) for g in range(groups)]  # (targets, group) of the groups with room
    members: list[list[int]] = [[] for _ in range(groups)]
    most = 0
    for i in sorted(range(len(rows)), key=lambda i: -row_targets[i]):  # stable: ties keep packing order
        total, g = heapq.heappop(heap)
        members[g].append(i)
        most = max(most, total + row_targets[i])
        if len(members[g]) < rows_per_group:
            heapq.heappush(heap, (total + row_targets[i], g))
    empty = np.empty(0, np.int64)
    laid_out = [rows[i] if i is not None else empty
                for group in members for i in group + [None] * (rows_per_group - len(group))]
    return laid_out, most


def build_batch(data: TokenizedExamples, plan: StepPlan, layout: Layout,
                target_slots: int | None = None) -> dict[str, np.ndarray]:
    """This process's shard of the step's batch, [A, R, ...] and [A, L, M] with M = `target_slots`
    (default: the plan's; validation passes one M for all its batches)."""
    A, R, T, L, rpd = (plan.num_micro_batches, layout.rows_per_process, layout.seq_len,
                       layout.local_device_count, layout.rows_per_device)
    M = target_slots or plan.target_slots
    if M < plan.target_slots:
        raise ValueError(f"{M} target slots cannot hold the plan's {plan.target_slots}")
    batch = {name: np.zeros((A, R, T), np.int32) for name in ("tokens", "segment_ids", "positions")}
    loss = {"loss_pos": np.zeros((A, L, M), np.int32), "loss_tgt": np.zeros((A, L, M), np.int32),
            "loss_w": np.zeros((A, L, M), np.float32)}
    for a in range(A):
        first_row = (a * layout.process_count + layout.process_index) * R
        for device in range(L):
            filled = 0
            for i in range(rpd):
                r = device * rpd + i
                filled = _fill_row(data, plan.rows[first_row + r], {name: array[a, r] for name, array in batch.items()},
                                   {name: array[a, device] for name, array in loss.items()}, i * T, filled)
    batch |= loss
    batch["n_targets"] = np.float32(plan.n_targets)
    batch["n_tokens"] = np.float32(plan.n_tokens)
    return batch


def _fill_row(data: TokenizedExamples, example_ids: np.ndarray, row: dict[str, np.ndarray],
              loss: dict[str, np.ndarray], offset: int, filled: int) -> int:
    """Write one row's examples; its targets go to the device's loss slots from `filled` on, their
    positions offset by the row's start in the device's flattened rows. Returns the slots filled."""
    start = 0
    for segment, i in enumerate(example_ids, 1):
        tokens, labels = data.example(i)
        end = start + len(tokens)
        row["tokens"][start:end] = tokens
        row["segment_ids"][start:end] = segment
        row["positions"][start:end] = np.arange(len(tokens))
        predicted = np.flatnonzero(labels[1:] != IGNORE_INDEX)  # label t + 1 is predicted at t
        n = len(predicted)
        loss["loss_pos"][filled:filled + n] = offset + start + predicted
        loss["loss_tgt"][filled:filled + n] = labels[predicted + 1]
        loss["loss_w"][filled:filled + n] = 1.0
        start, filled = end, filled + n
    return filled


def micro_batch_bound(lengths: np.ndarray, batch_size: int, layout: Layout) -> list[int]:
    """Every A a step over these lengths can get; their number bounds the step's compilations.

    Fewest rows: the smallest possible step's tokens in full rows. Most rows: in a first-fit packing
    every row but the last is more than T - (longest example) full and more than half full (two rows
    at most half full would have been merged).
    """
    T, n = layout.seq_len, len(lengths)
    ordered = np.sort(lengths)
    smallest_step = n % batch_size or min(batch_size, n)
    largest_tokens = int(ordered[-min(batch_size, n):].sum())
    fewest_rows = math.ceil(ordered[:smallest_step].sum() / T)
    most_rows = min(min(batch_size, n), largest_tokens // max(T // 2, T - int(ordered[-1]) + 1) + 1)
    per_micro_batch = layout.rows_per_micro_batch
    return sorted({micro_batch_bucket(math.ceil(rows / per_micro_batch))
                   for rows in range(fewest_rows, most_rows + 1)})


# ----------------------------------------------------------------------------------------------------
# Loader


class Loader:
    """Deterministic, resumable training batches: epoch e visits `default_rng((seed, e)).permutation`.

    Iterating yields this process's batch of every step, epoch after epoch, without end; `state()`
    (saved in checkpoints) names the next step to yield, and `Loader(..., state=s)` resumes exactly.
    """

    def __init__(self, data: TokenizedExamples, *, global_batch_size: int, layout: Layout, seed: int = 0,
                 state: dict | None = None):
        if len(data) == 0 or global_batch_size < 1:
            raise ValueError(f"need examples and a positive batch size (got {len(data)}, {global_batch_size})")
        self.data, self.layout, self.seed, self.global_batch_size = data, layout, seed, global_batch_size
        self.targets_per_row = targets_per_row(data, layout.seq_len)  # N, fixed for the run
        self.lengths, self.targets = data.lengths, target_counts(data)
        self.steps_per_epoch = math.ceil(len(data) / global_batch_size)
        self.epoch, self.step_in_epoch = 0, 0
        if state is not None:
            self.restore(state)

    def state(self) -> dict:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch}

    def restore(self, state: dict) -> None:
        epoch, step = int(state["epoch"]), int(state["step_in_epoch"])
        if epoch < 0 or not 0 <= step < self.steps_per_epoch:
            raise ValueError(f"loader state {state} does not fit {self.steps_per_epoch} steps per epoch; "
                             "was the checkpoint made with another dataset or batch size?")
        self.epoch, self.step_in_epoch = epoch, step

    def epoch_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng((self.seed, epoch)).permutation(len(self.data))

    def plan(self, epoch: int, step: int) -> StepPlan:
        B = self.global_batch_size
        ids = self.epoch_order(epoch)[step * B:(step + 1) * B]
        return plan_step(ids, self.lengths, self.targets, self.layout, self.targets_per_row)

    def epoch_plans(self, epoch: int) -> list[StepPlan]:
        order, B = self.epoch_order(epoch), self.global_batch_size
        return [plan_step(order[s * B:(s + 1) * B], self.lengths, self.targets, self.layout, self.targets_per_row)
                for s in range(self.steps_per_epoch)]

    def micro_batch_bound(self) -> list[int]:
        """Every A any epoch can produce (from the lengths alone): a bound on the step's compilations."""
        return micro_batch_bound(self.lengths, self.global_batch_size, self.layout)

    def upcoming_shapes(self, num_steps: int) -> list[tuple[int, int]]:
        """The distinct (A, M) of the next `num_steps` steps, exactly: the compilations the rest of a run needs."""
        shapes, epoch, step = set(), self.epoch, self.step_in_epoch
        for _ in range(num_steps):
            plan = self.plan(epoch, step)
            shapes.add((plan.num_micro_batches, plan.target_slots))
            epoch, step = (epoch + 1, 0) if step + 1 == self.steps_per_epoch else (epoch, step + 1)
        return sorted(shapes)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        while True:
            plan = self.plan(self.epoch, self.step_in_epoch)
            batch = build_batch(self.data, plan, self.layout)
            self.step_in_epoch += 1
            if self.step_in_epoch == self.steps_per_epoch:
                self.epoch, self.step_in_epoch = self.epoch + 1, 0
            yield batch


def valid_batches(data: TokenizedExamples, *, batch_size: int, layout: Layout) -> Iterator[dict[str, np.ndarray]]:
    """The validation set in file order, `batch_size` examples per batch, in the training format.

    Summing every batch's cross-entropy and dividing by the sum of their `n_targets` gives the
    token-mean validation loss (upstream's HF Trainer averages per-batch means instead; on sid_sft,
    where every row has the same number of targets, the two agree).
    """
    lengths, targets, max_targets = data.lengths, target_counts(data), targets_per_row(data, layout.seq_len)
    plans = [plan_step(np.arange(start, min(start + batch_size, len(data))), lengths, targets, layout, max_targets)
             for start in range(0, len(data), batch_size)]
    target_slots = max(plan.target_slots for plan in plans)  # one M: the eval step compiles once per A
    for plan in plans:
        yield build_batch(data, plan, layout, target_slots)


# ----------------------------------------------------------------------------------------------------
# Utilisation report: python -m sidrec.data.batching --root ../shared/data --category ...


def utilisation(plans: list[StepPlan], layout: Layout) -> float:
    """Real tokens / token slots of the batches (row tails, padding rows and micro-batches are waste)."""
    slots = sum(p.num_micro_batches for p in plans) * layout.rows_per_micro_batch * layout.seq_len
    return sum(p.n_tokens for p in plans) / slots


# ----------------------------------------------------------------------------------------------------
# Planning a run's batches


def grad_accum(global_batch_size: int, per_device_batch_size: int, n_devices: int) -> int:
    """Micro-batches per optimizer step: global batch / (per-device batch x devices)."""
    per_micro_batch = per_device_batch_size * n_devices
    if global_batch_size % per_micro_batch:
        raise UserError(f"--train.global-batch-size ({global_batch_size}) must be a multiple of "
                        f"--train.per-device-batch-size x devices ({per_device_batch_size} x {n_devices})")
    return global_batch_size // per_micro_batch


def rows_per_device(data: TokenizedExamples, *, seq_len: int, global_batch_size: int, micro_batches: int,
                    n_devices: int, seed: int, sample_steps: int = 16) -> int:
    """Packed rows per device per micro-batch, sized so a step's examples fill `micro_batches` micro-batches.

    Packing a few global batches of the data (in a seeded order) tells how many rows a step needs; the
    fullest one sets the size, so steps use `micro_batches` micro-batches (rarely one more).
    """
    lengths, targets = data.lengths, target_counts(data)
    max_targets = targets_per_row(data, seq_len)
    order = np.random.default_rng(seed).permutation(len(lengths))
    steps = [order[i:i + global_batch_size] for i in range(0, min(len(order), sample_steps * global_batch_size),
                                                            global_batch_size)]
    rows = max(len(pack_first_fit_decreasing(lengths[ids], seq_len, targets[ids], max_targets)) for ids in steps)
    return max(1, math.ceil(rows / (micro_batches * n_devices)))


def total_steps(epochs: float, max_steps: int, steps_per_epoch: int) -> int:
    """Optimizer steps of a run: max_steps when set (> 0), else the epochs' worth."""
    return max_steps if max_steps > 0 else max(1, math.ceil(epochs * steps_per_epoch))
