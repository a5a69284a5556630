"""Training: the jitted optimizer step (FSDP via shard_map, grad accumulation by scan) and the loop.

The step sees a global batch laid out as [A, R, ...] (A accumulation micro-batches of R packed rows,
rows split over every device). Loss is the token mean over the WHOLE global batch, as upstream: each
micro-batch contributes its summed cross-entropy, the sum is divided once by the batch's target count.
The update is committed only when the loss and gradient norm are finite, so a NaN never reaches a
checkpoint; the loop then stops with a clear message and a non-zero exit.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from sidrec import build, optim, parallel
from sidrec.checkpoint import Checkpointer, PreemptionGuard
from sidrec.config import Config
from sidrec.data import batching
from sidrec.errors import UserError
from sidrec.logging import RunLogger, mfu, peak_flops_for
from sidrec.model import qwen2
from sidrec.rundir import RunDirLock

MICRO_BATCH_KEYS = ("tokens", "segment_ids", "positions", "loss_pos", "loss_tgt", "loss_w")


class NonFiniteLossError(UserError):
    """Loss or gradients became NaN/inf; the state was not updated and nothing was saved."""


# ----------------------------------------------------------------------------------------------------
# Loss and step (pure; built once per run)


def cross_entropy_sum(params, model_cfg: qwen2.Qwen2Config, micro_batch, *, unshard=None, max_segment_len=None):
    """Summed token cross-entropy (fp32) at the loss slots of one (local) micro-batch: rows [r, T] and
    slots [1, M] into those rows flattened (sidrec.data.batching); no packed example is longer than
    max_segment_len (None: unknown)."""
    hidden = qwen2.forward_hidden(params, model_cfg, micro_batch["tokens"], micro_batch["segment_ids"],
                                  micro_batch["positions"], unshard=unshard, max_segment_len=max_segment_len)
    cross_entropy = qwen2.cross_entropy_at(params, model_cfg, hidden, micro_batch["loss_pos"], micro_batch["loss_tgt"],
                                           unshard=unshard)
    return jnp.sum(cross_entropy * micro_batch["loss_w"])


def make_global_ce_sum(model_cfg, mesh, partition_specs, max_segment_len=None) -> Callable:
    """`f(params, micro_batch) -> summed CE over all devices` (`parallel.summed_over_devices`)."""

    def local(unshard, params, micro_batch):
        return cross_entropy_sum(params, model_cfg, micro_batch, unshard=unshard, max_segment_len=max_segment_len)

    return parallel.summed_over_devices(local, mesh, partition_specs, MICRO_BATCH_KEYS)


def make_train_step(model_cfg, tx: optax.GradientTransformation, mesh, partition_specs,
                    max_segment_len=None) -> Callable:
    """`step(state, batch) -> (state, metrics)` over a TrainState."""
    global_ce_sum = make_global_ce_sum(model_cfg, mesh, partition_specs, max_segment_len)

    def step(state, batch):
        params = state.params
        micro_batches = {k: batch[k] for k in MICRO_BATCH_KEYS}
        n_targets = jnp.maximum(batch["n_targets"], 1.0)
        # The mean taken inside the differentiated function: its 1/n rides on the cotangents (the loss's
        # own VJP scales by them anyway) instead of a pass over every gradient (13 ms of a CPU bench step).
        grad_fn = jax.value_and_grad(lambda params, micro_batch: global_ce_sum(params, micro_batch) / n_targets)

        def accumulate(carry, micro_batch):
            loss_sum, grad_sum = carry
            loss, grads = grad_fn(params, micro_batch)
            return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        (loss, grads), _ = jax.lax.scan(accumulate, (jnp.zeros((), jnp.float32), zeros), micro_batches)
        grad_norm = optax.tree_utils.tree_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def apply(state):
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            return TrainState(params=optax.apply_updates(state.params, updates), opt_state=opt_state,
                              step=state.step + 1)

        # A non-finite step leaves the state as it was. A cond, not a select of new and old: selecting
        # rewrites every parameter and moment array (6% of a CPU bench step with a 152k vocabulary).
        new_state = jax.lax.cond(finite, apply, lambda state: state, state)
        return new_state, {"loss": loss, "grad_norm": grad_norm, "finite": finite}

    return step


def make_eval_loss(model_cfg, mesh, partition_specs, max_segment_len=None) -> Callable:
    """`f(params, batch) -> summed CE of a [A, R, ...] batch` (validation; no gradients)."""
    global_ce_sum = make_global_ce_sum(model_cfg, mesh, partition_specs, max_segment_len)

    def eval_loss(params, batch):
        micro_batches = {k: batch[k] for k in MICRO_BATCH_KEYS}
        sums = jax.lax.map(lambda mb: global_ce_sum(params, mb), micro_batches)
        return jnp.sum(sums)

    return eval_loss


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """What an optimizer step carries and a checkpoint stores (besides the loader's JSON meta)."""

    params: Any
    opt_state: Any
    step: jax.Array  # int32 scalar: optimizer steps taken


@dataclasses.dataclass(frozen=True)
class CompiledSteps:
    """A run's jitted functions, with one fixed set of shardings in and out, so the train step
    compiles once per batch shape."""

    init_state: Callable[[Any], TrainState]                     # params -> state
    train_step: Callable[[TrainState, dict], tuple[TrainState, dict]]  # state donated
    eval_loss_sum: Callable[[Any, dict], jax.Array]             # (params, batch) -> summed CE
    state_shardings: TrainState
    abstract_state: TrainState                                  # ShapeDtypeStructs with shardings (restore target)


def compile_steps(model_cfg, tx, mesh, partition_specs, max_segment_len=None) -> CompiledSteps:
    """The jitted steps; max_segment_len bounds every packed example (training and validation), so
    attention looks back no further (None: whole rows)."""
    param_shardings = parallel.shardings(mesh, partition_specs)

    def init_state(params) -> TrainState:
        return TrainState(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32))

    abstract_params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                   qwen2.abstract_params(model_cfg), param_shardings)
    state_shardings = jax.jit(init_state).lower(abstract_params).compile().output_shardings
    abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                  jax.eval_shape(init_state, abstract_params), state_shardings)
    replicated = NamedSharding(mesh, P())
    return CompiledSteps(
        init_state=jax.jit(init_state, in_shardings=(param_shardings,), out_shardings=state_shardings),
        train_step=jax.jit(make_train_step(model_cfg, tx, mesh, partition_specs, max_segment_len),
                           donate_argnums=0, out_shardings=(state_shardings, replicated)),
        eval_loss_sum=jax.jit(make_eval_loss(model_cfg, mesh, partition_specs, max_segment_len),
                              out_shardings=replicated),
        state_shardings=state_shardings, abstract_state=abstract_state)


# ----------------------------------------------------------------------------------------------------
# The run


@dataclasses.dataclass
class Progress:
    """Loop bookkeeping kept in checkpoint meta (next to the loader state) so a resume continues it."""

    best_loss: float = math.inf
    best_step: int = -1
    bad_validations: int = 0
    last_valid_loss: float | None = None

    def after_validation(self, loss: float, step: int) -> Progress:
        improved = loss < self.best_loss
        return Progress(best_loss=min(loss, self.best_loss), best_step=step if improved else self.best_step,
                        bad_validations=0 if improved else self.bad_validations + 1, last_valid_loss=loss)


@dataclasses.dataclass
class Trainer:
    """Everything a run needs, built once by `setup` (also used by tests and benchmarks)."""

    cfg: Config
    mesh: Any
    model_cfg: qwen2.Qwen2Config
    tokenizer: Any
    train_data: Any
    valid_data: Any
    layout: Any
    loader: Any
    total_steps: int
    param_shardings: Any
    compiled: CompiledSteps
    optimizer_info: Any
    max_segment_len: int  # the longest training or validation example: attention looks back this far

    def fresh_state(self) -> TrainState:
        params = build.initial_params(self.cfg, self.model_cfg, build.vocab_multiple(self.fsdp), self.param_shardings)
        return self.compiled.init_state(params)

    @property
    def fsdp(self) -> int:
        return self.mesh.shape[parallel.FSDP]

    def validation_loss(self, params) -> float:
        sums, n_targets = [], 0.0
        for batch in batching.valid_batches(self.valid_data, batch_size=self.cfg.train.global_batch_size,
                                            layout=self.layout):
            sums.append(self.compiled.eval_loss_sum(params, parallel.global_batch(self.mesh, batch)))
            n_targets += float(batch["n_targets"])
        return float(sum(jax.device_get(sums))) / max(n_targets, 1.0)  # one host sync, not one per batch


def setup(cfg: Config, say: Callable[[str], None] = print) -> Trainer:
    """Mesh, data, model config and the compiled steps (joins a multi-process run first)."""
    parallel.maybe_initialize_distributed(cfg.mesh)
    if cfg.model.attention == "splash" and jax.default_backend() != "tpu":
        raise UserError(f"--model.attention splash runs on TPU only (a Pallas Mosaic kernel); this backend is "
                        f"{jax.default_backend()}: use --model.attention xla")
    mesh = parallel.make_mesh(cfg.mesh)
    fsdp, n_devices = mesh.shape[parallel.FSDP], mesh.devices.size
    # Fails early when the batch does not divide over the devices.
    accum = batching.grad_accum(cfg.train.global_batch_size, cfg.train.per_device_batch_size, n_devices)
    say(f"run dir: {Path(cfg.run_dir).resolve()}")
    say(parallel.describe(mesh))

    started = time.perf_counter()
    # Process 0 writes the run directory's shared files (synthetic data, tokenizer, token cache); the
    # others then read them, so they never race to create them and all use the same tokenizer.
    with parallel.main_process_first("run directory files"):
        catalogue = build.load_catalogue(cfg)
        tokenizer = build.build_tokenizer(cfg, catalogue)
        model_cfg = build.model_config(cfg, tokenizer, build.vocab_multiple(fsdp))
        build.save_run_description(cfg, tokenizer, model_cfg)
        data_cfg = dataclasses.replace(cfg.data, root=str(build.data_root(cfg)))
        cache_dir = Path(cfg.run_dir) / "cache"
        train_data = batching.load_training_data(data_cfg, tokenizer, cache_dir, seed=cfg.seed)
        valid_data = batching.load_validation_data(data_cfg, tokenizer, cache_dir)
    rows = batching.rows_per_device(train_data, seq_len=cfg.data.seq_len, global_batch_size=cfg.train.global_batch_size,
                                    micro_batches=accum, n_devices=n_devices, seed=cfg.seed)
    layout = batching.Layout(seq_len=cfg.data.seq_len, rows_per_device=rows,
                             local_device_count=jax.local_device_count(),
                             process_index=jax.process_index(), process_count=jax.process_count())
    loader = batching.Loader(train_data, global_batch_size=cfg.train.global_batch_size, layout=layout,
                             seed=cfg.seed)
    total_steps = batching.total_steps(cfg.train.epochs, cfg.train.max_steps, loader.steps_per_epoch)
    say(f"data: {catalogue.category} from {data_cfg.root}: {len(train_data)} training examples "
        f"({', '.join(cfg.data.tasks)}; mean {float(np.mean(train_data.lengths)):.0f} tokens), {len(valid_data)} "
        f"validation examples, loaded and tokenized in {time.perf_counter() - started:.1f}s")
    say(f"batch: {cfg.train.global_batch_size} examples/step = {cfg.train.per_device_batch_size} per device x "
        f"{n_devices} devices x {accum} micro-batches, packed into {layout.rows_per_device} row(s) of "
        f"{layout.seq_len} tokens per device per micro-batch; {loader.steps_per_epoch} steps/epoch, "
        f"{total_steps} steps in all")

    max_segment_len = int(max(train_data.lengths.max(), valid_data.lengths.max()))
    specs = qwen2.param_specs(model_cfg)
    partition_specs = parallel.param_partition_specs(specs, fsdp)
    tx, optimizer_info = optim.build_optimizer(cfg.optim, qwen2.flat_specs(model_cfg), total_steps)
    say(f"model: {qwen2.count_params(model_cfg):,} parameters, vocab {model_cfg.real_vocab_size} "
        f"(padded to {model_cfg.vocab_size}), compute {model_cfg.compute_dtype}, remat {model_cfg.remat}, "
        f"attention {model_cfg.attention} (looking back <= {max_segment_len} tokens, the longest example)")
    return Trainer(cfg=cfg, mesh=mesh, model_cfg=model_cfg, tokenizer=tokenizer, train_data=train_data,
                   valid_data=valid_data, layout=layout, loader=loader, total_steps=total_steps,
                   param_shardings=parallel.shardings(mesh, partition_specs),
                   compiled=compile_steps(model_cfg, tx, mesh, partition_specs, max_segment_len),
                   optimizer_info=optimizer_info, max_segment_len=max_segment_len)


@dataclasses.dataclass(frozen=True)
class Due:
    """The periodic actions due after an optimizer step."""

    validate: bool
    save: bool
    preempted: bool


def due_after(cfg: Config, step: int, total_steps: int, *, end_of_epoch: bool, preempted: bool) -> Due:
    """Validate at epoch ends, every `valid_every_steps` and at the end; save whenever validating, every
    `checkpoint.every_steps` and when preempted."""
    def every(n: int) -> bool:
        return n > 0 and step % n == 0

    validate = end_of_epoch or every(cfg.train.valid_every_steps) or step == total_steps
    return Due(validate=validate, save=validate or preempted or every(cfg.checkpoint.every_steps),
               preempted=preempted)


def resume_or_start(trainer: Trainer, checkpoints: Checkpointer) -> tuple[TrainState, Progress, bool]:
    """The latest checkpoint's state (the loader repositioned), or a fresh one; (state, progress, resumed)."""
    cfg = trainer.cfg
    latest = checkpoints.latest_step()
    if latest is None:
        return trainer.fresh_state(), Progress(), False
    if not cfg.checkpoint.resume:
        raise UserError(f"{cfg.run_dir}: already holds checkpoints (latest step {latest}); pass "
                        "--checkpoint.resume True to continue it or choose a new --run-dir")
    _, state, meta = checkpoints.restore_latest(trainer.compiled.abstract_state)
    trainer.loader.restore(meta["loader"])
    return state, Progress(**meta["progress"]), True


def run_train(cfg: Config) -> dict:
    """Train (resuming from the run directory's latest checkpoint); returns the run summary."""
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    parallel.maybe_initialize_distributed(cfg.mesh)  # before asking which process this is
    with RunDirLock(run_dir, "cli.py train"):
        return _train(cfg, run_dir)


def _train(cfg: Config, run_dir: Path) -> dict:
    is_main = jax.process_index() == 0
    trainer = setup(cfg, say=print if is_main else (lambda _: None))
    checkpoints = Checkpointer(cfg.checkpoint.resume_from or run_dir / "checkpoints", keep_last=cfg.checkpoint.keep,
                               best_metric="valid_loss", mode="min")
    state, progress, resumed = resume_or_start(trainer, checkpoints)
    step = int(jax.device_get(state.step))

    logger = RunLogger(dataclasses.asdict(cfg), run_dir, is_main=is_main, wandb_mode=cfg.wandb.mode,
                       project=cfg.wandb.project, name=cfg.wandb.name, total_steps=trainer.total_steps,
                       start_step=step)
    logger.info(f"resumed from step {step} (epoch {trainer.loader.epoch})" if resumed else "starting from step 0")
    logger.info(trainer.optimizer_info.describe())
    shapes = trainer.loader.upcoming_shapes(trainer.total_steps - step)
    logger.info(f"step shapes (micro-batches, loss slots per device): {shapes}: {len(shapes)} compilation(s) of "
                f"the train step for the {trainer.total_steps - step} remaining steps")
    meter = _Meter(trainer, logger)
    started = time.perf_counter()
    stop_reason = "finished"
    with PreemptionGuard(checkpoints) as guard:
        batches = iter(trainer.loader)
        while step < trainer.total_steps:
            batch = next(batches)
            state, metrics = trainer.compiled.train_step(state, parallel.global_batch(trainer.mesh, batch))
            meter.push(step, metrics, float(batch["n_tokens"]), meter.executed_flops(batch))
            step += 1
            due = due_after(cfg, step, trainer.total_steps, end_of_epoch=trainer.loader.step_in_epoch == 0,
                            preempted=guard.should_stop(step))
            if due.save:
                meter.flush()  # raises on a non-finite loss before anything is saved
            metric = None
            if due.validate:
                metric = trainer.validation_loss(state.params)
                progress = progress.after_validation(metric, step)
                logger.log(step, {"valid/loss": metric, "valid/best_loss": progress.best_loss,
                                  "train/epoch": trainer.loader.epoch})
            if due.save:
                meta = {"loader": trainer.loader.state(), "progress": dataclasses.asdict(progress),
                        "config": dataclasses.asdict(cfg)}
                checkpoints.save(step, state, meta, metric=metric)
            if due.preempted:
                stop_reason = "preempted"
                logger.info(f"stop requested at step {step}: checkpoint saved, exiting cleanly")
                break
            patience = cfg.train.early_stopping_patience
            if due.validate and patience > 0 and progress.bad_validations >= patience:
                stop_reason = "early_stopping"
                logger.info(f"early stopping at step {step}: no improvement in {patience} validations")
                break
        meter.flush()
    checkpoints.wait()
    summary = {
        "stop_reason": stop_reason, "steps": step, "total_steps": trainer.total_steps,
        "epochs": step / trainer.loader.steps_per_epoch, "final_train_loss": meter.last_loss,
        "final_valid_loss": progress.last_valid_loss, "best_valid_loss": progress.best_loss,
        "best_step": progress.best_step, "train_time_s": time.perf_counter() - started,
        **meter.summary(),
    }
    logger.write_summary(summary)
    logger.close()
    checkpoints.close()
    return summary


class _Meter:
    """Turns step metrics into log lines one step late, so the host never waits on the device
    between dispatches; `flush` waits for the last one (before validation, saving and exit)."""

    def __init__(self, trainer: Trainer, logger: RunLogger):
        self.trainer, self.logger = trainer, logger
        self.pending: list = []
        self.last_time = time.perf_counter()
        self.last_loss: float | None = None
        self.tokens = 0.0
        self.busy_s = 0.0
        self.steps = 0
        self.first_step: int | None = None
        device = trainer.mesh.devices.flat[0]
        self.peak = peak_flops_for(device.device_kind, trainer.cfg.peak_flops_per_device)
        self.flops_per_token = qwen2.flops_per_token(trainer.model_cfg, trainer.cfg.data.seq_len)

    def executed_flops(self, batch: dict) -> float:
        """What the step computes over this batch's slots, all processes (`qwen2.executed_train_flops`)."""
        processes = jax.process_count()
        return qwen2.executed_train_flops(self.trainer.model_cfg, batch["tokens"].size * processes,
                                          batch["loss_pos"].size * processes, batch["tokens"].shape[-1],
                                          self.trainer.max_segment_len)

    def push(self, step: int, metrics, n_tokens: float, executed_flops: float) -> None:
        if self.first_step is None:
            self.first_step = step
        self.pending.append((step, metrics, n_tokens, executed_flops))
        if len(self.pending) > 1:
            self._report(*self.pending.pop(0))

    def flush(self) -> None:
        while self.pending:
            self._report(*self.pending.pop(0))

    def _report(self, step: int, metrics, n_tokens: float, executed_flops: float) -> None:
        metrics = jax.device_get(metrics)
        now = time.perf_counter()
        step_time, self.last_time = now - self.last_time, now
        if not metrics["finite"]:
            raise NonFiniteLossError(
                f"step {step}: loss {float(metrics['loss'])} / gradient norm {float(metrics['grad_norm'])} is "
                "not finite; the update was skipped and no checkpoint was written after it. Lower "
                "--optim.lr, check the data, or use --model.dtype float32")
        self.last_loss = float(metrics["loss"])
        if step > self.first_step:  # the first step's time is mostly compilation
            self.tokens += n_tokens
            self.busy_s += step_time
            self.steps += 1
        if step % self.trainer.cfg.train.log_every_steps:
            return
        lrs = self.trainer.optimizer_info.learning_rates(step)
        out = {"train/loss": self.last_loss, "train/grad_norm": float(metrics["grad_norm"]),
               "train/tokens_per_s": n_tokens / step_time, "train/step_time_s": step_time,
               **{f"train/lr/{group}": float(lr) for group, lr in lrs.items()}}
        devices = self.trainer.mesh.devices.size
        utilisation = mfu(self.flops_per_token * n_tokens, step_time, devices, self.peak)
        if utilisation is not None:  # model FLOPs (6N per real token) and executed ("hardware") FLOPs
            out["train/mfu"] = utilisation
            out["train/hfu"] = mfu(executed_flops, step_time, devices, self.peak)
        self.logger.log(step, out)

    def summary(self) -> dict:
        return {"tokens_per_s": self.tokens / self.busy_s if self.busy_s else None,
                "steps_timed": self.steps}
