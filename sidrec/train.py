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
from functools import partial
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

MICRO_BATCH_KEYS = ("tokens", "segment_ids", "positions", "loss_pos", "loss_tgt", "loss_w")


class NonFiniteLossError(UserError):
    """Loss or gradients became NaN/inf; the state was not updated and nothing was saved."""


# ----------------------------------------------------------------------------------------------------
# Loss and step (pure; built once per run)


def cross_entropy_sum(params, model_cfg: qwen2.Qwen2Config, micro_batch, *, unshard=None):
    """Summed token cross-entropy (fp32) at the label positions of one (local) micro-batch."""
    hidden = qwen2.forward_hidden(params, model_cfg, micro_batch["tokens"], micro_batch["segment_ids"],
                                  micro_batch["positions"], unshard=unshard)
    logits = qwen2.logits_at(params, model_cfg, hidden, micro_batch["loss_pos"], unshard=unshard)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, micro_batch["loss_tgt"][..., None], axis=-1)[..., 0]
    return jnp.sum((log_z - target_logit) * micro_batch["loss_w"])


def make_global_ce_sum(model_cfg, mesh, param_specs) -> Callable:
    """`f(params, micro_batch) -> summed CE over all devices`, FSDP through shard_map."""
    unshard = parallel.make_unshard(param_specs)
    row_spec = {k: P(parallel.BATCH_AXES) for k in MICRO_BATCH_KEYS}

    def local(params, micro_batch):
        return jax.lax.psum(cross_entropy_sum(params, model_cfg, micro_batch, unshard=unshard),
                            parallel.BATCH_AXES)

    return jax.shard_map(local, mesh=mesh, in_specs=(param_specs, row_spec), out_specs=P())


def make_train_step(model_cfg, tx: optax.GradientTransformation, mesh, param_specs) -> Callable:
    """`step(state, batch) -> (state, metrics)`; state = {"params", "opt_state", "step"}."""
    global_ce_sum = make_global_ce_sum(model_cfg, mesh, param_specs)
    grad_fn = jax.value_and_grad(global_ce_sum)

    def step(state, batch):
        params = state["params"]
        micro_batches = {k: batch[k] for k in MICRO_BATCH_KEYS}

        def accumulate(carry, micro_batch):
            loss_sum, grad_sum = carry
            loss, grads = grad_fn(params, micro_batch)
            return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        (loss_sum, grad_sum), _ = jax.lax.scan(accumulate, (jnp.zeros((), jnp.float32), zeros),
                                               micro_batches)
        n_targets = jnp.maximum(batch["n_targets"], 1.0)
        loss = loss_sum / n_targets
        grads = jax.tree.map(lambda g: g / n_targets, grad_sum)
        grad_norm = optax.global_norm(grads)
        updates, new_opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = partial(jax.tree.map, lambda new, old: jnp.where(finite, new, old))
        new_state = {"params": keep(new_params, params),
                     "opt_state": keep(new_opt_state, state["opt_state"]),
                     "step": state["step"] + finite.astype(jnp.int32)}
        return new_state, {"loss": loss, "grad_norm": grad_norm, "finite": finite}

    return step


def make_eval_loss(model_cfg, mesh, param_specs) -> Callable:
    """`f(params, batch) -> summed CE of a [A, R, ...] batch` (validation; no gradients)."""
    global_ce_sum = make_global_ce_sum(model_cfg, mesh, param_specs)

    def eval_loss(params, batch):
        micro_batches = {k: batch[k] for k in MICRO_BATCH_KEYS}
        sums = jax.lax.map(lambda mb: global_ce_sum(params, mb), micro_batches)
        return jnp.sum(sums)

    return eval_loss


@dataclasses.dataclass(frozen=True)
class StateFunctions:
    """The jitted functions over the train state {"params", "opt_state", "step"}, with one fixed set of
    shardings in and out, so the step compiles once per batch shape."""

    init: Callable        # params -> state
    step: Callable        # (state, batch) -> (state, metrics); state donated
    eval_loss: Callable   # (params, batch) -> summed CE
    shardings: Any
    abstract: Any         # ShapeDtypeStructs with shardings (restore target)


def compile_state_functions(model_cfg, tx, mesh, param_specs) -> StateFunctions:
    param_shardings = parallel.shardings(mesh, param_specs)

    def init_state(params):
        return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}

    abstract_params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                   qwen2.abstract_params(model_cfg), param_shardings)
    shardings = jax.jit(init_state).lower(abstract_params).compile().output_shardings
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            jax.eval_shape(init_state, abstract_params), shardings)
    replicated = NamedSharding(mesh, P())
    return StateFunctions(
        init=jax.jit(init_state, in_shardings=(param_shardings,), out_shardings=shardings),
        step=jax.jit(make_train_step(model_cfg, tx, mesh, param_specs), donate_argnums=0,
                     out_shardings=(shardings, replicated)),
        eval_loss=jax.jit(make_eval_loss(model_cfg, mesh, param_specs), out_shardings=replicated),
        shardings=shardings, abstract=abstract)


# ----------------------------------------------------------------------------------------------------
# The run


@dataclasses.dataclass
class Progress:
    """Loop bookkeeping kept in checkpoint meta (next to the loader state) so a resume continues it."""

    best_loss: float = math.inf
    best_step: int = -1
    bad_validations: int = 0
    last_valid_loss: float | None = None


def vocab_multiple(fsdp_size: int) -> int:
    """Vocabulary rows are padded for fast matmuls and an even fsdp split (padded logits are masked)."""
    return math.lcm(128, fsdp_size)


def grad_accum(cfg: Config, n_devices: int) -> int:
    """Micro-batches per optimizer step: global batch / (per-device batch x devices)."""
    per_micro_batch = cfg.train.per_device_batch_size * n_devices
    if cfg.train.global_batch_size % per_micro_batch:
        raise UserError(f"--train.global-batch-size ({cfg.train.global_batch_size}) must be a multiple of "
                        f"--train.per-device-batch-size x devices ({cfg.train.per_device_batch_size} x "
                        f"{n_devices})")
    return cfg.train.global_batch_size // per_micro_batch


def rows_per_device(cfg: Config, data, n_devices: int, sample_steps: int = 16) -> int:
    """Packed rows per device per micro-batch, sized so a step's examples fill `grad_accum` micro-batches.

    Packing a few global batches of the data (in a seeded order) tells how many rows a step needs; the
    fullest one sets the size, so steps use `grad_accum` micro-batches (rarely one more).
    """
    lengths, targets = data.lengths, batching.target_counts(data)
    max_targets = batching.targets_per_row(data, cfg.data.seq_len)
    order = np.random.default_rng(cfg.seed).permutation(len(lengths))
    batch = cfg.train.global_batch_size
    steps = [order[i:i + batch] for i in range(0, min(len(order), sample_steps * batch), batch)]
    rows = max(len(batching.pack_first_fit_decreasing(lengths[ids], cfg.data.seq_len, targets[ids], max_targets))
               for ids in steps)
    return max(1, math.ceil(rows / (grad_accum(cfg, n_devices) * n_devices)))


def plan_total_steps(cfg: Config, steps_per_epoch: int) -> int:
    if cfg.train.max_steps > 0:
        return cfg.train.max_steps
    return max(1, math.ceil(cfg.train.epochs * steps_per_epoch))


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
    state: StateFunctions
    optimizer_info: Any

    def fresh_state(self):
        params = build.initial_params(self.cfg, self.model_cfg, vocab_multiple(self.fsdp), self.param_shardings)
        return self.state.init(params)

    @property
    def fsdp(self) -> int:
        return self.mesh.shape[parallel.FSDP]

    def validation_loss(self, params) -> float:
        sums, n_targets = [], 0.0
        for batch in batching.valid_batches(self.valid_data, batch_size=self.cfg.train.global_batch_size,
                                            layout=self.layout):
            sums.append(self.state.eval_loss(params, parallel.global_batch(self.mesh, batch)))
            n_targets += float(batch["n_targets"])
        return float(sum(jax.device_get(sums))) / max(n_targets, 1.0)  # one host sync, not one per batch


def setup(cfg: Config, say: Callable[[str], None] = print) -> Trainer:
    parallel.maybe_initialize_distributed(cfg.mesh)
    mesh = parallel.make_mesh(cfg.mesh)
    fsdp, n_devices = mesh.shape[parallel.FSDP], mesh.devices.size
    accum = grad_accum(cfg, n_devices)  # fails early when the batch does not divide over the devices
    say(f"run dir: {Path(cfg.run_dir).resolve()}")
    say(parallel.describe(mesh))

    started = time.perf_counter()
    # Process 0 writes the run directory's shared files (synthetic data, tokenizer, token cache); the
    # others then read them, so they never race to create them and all use the same tokenizer.
    with parallel.main_process_first("run directory files"):
        catalogue = build.load_catalogue(cfg)
        tokenizer = build.build_tokenizer(cfg, catalogue)
        model_cfg = build.model_config(cfg, tokenizer, vocab_multiple(fsdp))
        build.save_run_description(cfg, tokenizer, model_cfg)
        data_cfg = dataclasses.replace(cfg.data, root=str(build.data_root(cfg)))
        cache_dir = Path(cfg.run_dir) / "cache"
        train_data = batching.load_training_data(data_cfg, tokenizer, cache_dir, seed=cfg.seed)
        valid_data = batching.load_validation_data(data_cfg, tokenizer, cache_dir)
    mean_length = float(np.mean(train_data.lengths))
    layout = batching.Layout(seq_len=cfg.data.seq_len,
                             rows_per_device=rows_per_device(cfg, train_data, n_devices),
                             local_device_count=jax.local_device_count(),
                             process_index=jax.process_index(), process_count=jax.process_count())
    loader = batching.Loader(train_data, global_batch_size=cfg.train.global_batch_size, layout=layout,
                             seed=cfg.seed)
    total_steps = plan_total_steps(cfg, loader.steps_per_epoch)
    say(f"data: {catalogue.category} from {data_cfg.root}: {len(train_data)} training examples "
        f"({', '.join(cfg.data.tasks)}; mean {mean_length:.0f} tokens), {len(valid_data)} validation "
        f"examples, loaded and tokenized in {time.perf_counter() - started:.1f}s")
    say(f"batch: {cfg.train.global_batch_size} examples/step = {cfg.train.per_device_batch_size} per device x "
        f"{n_devices} devices x {accum} micro-batches, packed into {layout.rows_per_device} row(s) of "
        f"{layout.seq_len} tokens per device per micro-batch; {loader.steps_per_epoch} steps/epoch, "
        f"{total_steps} steps in all")

    abstract = qwen2.abstract_params(model_cfg)
    param_specs = parallel.param_partition_specs(qwen2.logical_axes(model_cfg), abstract, fsdp)
    param_shardings = parallel.shardings(mesh, param_specs)
    tx, optimizer_info = optim.build_optimizer(cfg.optim, abstract, total_steps)
    say(f"model: {qwen2.count_params(model_cfg):,} parameters, vocab {model_cfg.real_vocab_size} "
        f"(padded to {model_cfg.vocab_size}), compute {model_cfg.compute_dtype}, remat {model_cfg.remat}")

    state_fns = compile_state_functions(model_cfg, tx, mesh, param_specs)
    return Trainer(cfg=cfg, mesh=mesh, model_cfg=model_cfg, tokenizer=tokenizer, train_data=train_data,
                   valid_data=valid_data, layout=layout, loader=loader, total_steps=total_steps,
                   param_shardings=param_shardings, state=state_fns, optimizer_info=optimizer_info)


def run_train(cfg: Config) -> dict:
    """Train (resuming from the run directory's latest checkpoint); returns the run summary."""
    parallel.maybe_initialize_distributed(cfg.mesh)  # before asking which process this is
    is_main = jax.process_index() == 0
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    trainer = setup(cfg, say=print if is_main else (lambda _: None))
    run_dir = Path(cfg.run_dir)
    checkpoints = Checkpointer(cfg.checkpoint.resume_from or run_dir / "checkpoints",
                               keep_last=cfg.checkpoint.keep)
    progress = Progress()
    resume_step = checkpoints.latest_step()
    if resume_step is not None and not cfg.checkpoint.resume:
        raise UserError(f"{run_dir}: already holds checkpoints (latest step {resume_step}); pass "
                        "--checkpoint.resume True to continue it or choose a new --run-dir")
    if resume_step is not None:
        state, meta = checkpoints.restore(resume_step, trainer.state.abstract)
        trainer.loader.restore(meta["loader"])
        progress = Progress(**meta["progress"])
    else:
        state = trainer.fresh_state()
    step = int(jax.device_get(state["step"]))

    logger = RunLogger(dataclasses.asdict(cfg), run_dir, is_main=is_main, wandb_mode=cfg.wandb.mode,
                       project=cfg.wandb.project, name=cfg.wandb.name, total_steps=trainer.total_steps,
                       start_step=step)
    logger.info(f"resumed from step {step} (epoch {trainer.loader.epoch})" if resume_step is not None
                else "starting from step 0")
    logger.info(trainer.optimizer_info.describe())
    shapes = trainer.loader.upcoming_micro_batches(trainer.total_steps - step)
    logger.info(f"step shapes: micro-batches per step in {shapes}: {len(shapes)} compilation(s) of the train "
                f"step for the {trainer.total_steps - step} remaining steps")
    meter = _Meter(trainer, logger)
    started = time.perf_counter()
    stop_reason = "finished"
    with PreemptionGuard(checkpoints) as guard:
        batches = iter(trainer.loader)
        while step < trainer.total_steps:
            batch = next(batches)
            state, metrics = trainer.state.step(state, parallel.global_batch(trainer.mesh, batch))
            meter.push(step, metrics, float(batch["n_tokens"]))
            step += 1
            end_of_epoch = trainer.loader.step_in_epoch == 0
            every = cfg.train.valid_every_steps
            validate = end_of_epoch or (every > 0 and step % every == 0) or step == trainer.total_steps
            preempted = guard.should_stop(step)
            save = (validate or preempted or step == trainer.total_steps
                    or (cfg.checkpoint.every_steps > 0 and step % cfg.checkpoint.every_steps == 0))
            if validate or save:
                meter.flush()  # raises on a non-finite loss before anything is saved
            metric = None
            if validate:
                metric = trainer.validation_loss(state["params"])
                improved = metric < progress.best_loss
                progress = dataclasses.replace(
                    progress, last_valid_loss=metric, best_loss=min(metric, progress.best_loss),
                    best_step=step if improved else progress.best_step,
                    bad_validations=0 if improved else progress.bad_validations + 1)
                logger.log(step, {"valid/loss": metric, "valid/best_loss": progress.best_loss,
                                  "train/epoch": trainer.loader.epoch})
            if save:
                meta = {"loader": trainer.loader.state(), "progress": dataclasses.asdict(progress),
                        "config": dataclasses.asdict(cfg)}
                checkpoints.save(step, state, meta, metric=metric)
            if preempted:
                stop_reason = "preempted"
                logger.info(f"stop requested at step {step}: checkpoint saved, exiting cleanly")
                break
            patience = cfg.train.early_stopping_patience
            if validate and patience > 0 and progress.bad_validations >= patience:
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

    def push(self, step: int, metrics, n_tokens: float) -> None:
        if self.first_step is None:
            self.first_step = step
        self.pending.append((step, metrics, n_tokens))
        if len(self.pending) > 1:
            self._report(*self.pending.pop(0))

    def flush(self) -> None:
        while self.pending:
            self._report(*self.pending.pop(0))

    def _report(self, step: int, metrics, n_tokens: float) -> None:
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
        utilisation = mfu(self.flops_per_token * n_tokens, step_time, self.trainer.mesh.devices.size, self.peak)
        if utilisation is not None:
            out["train/mfu"] = utilisation
        self.logger.log(step, out)

    def summary(self) -> dict:
        return {"tokens_per_s": self.tokens / self.busy_s if self.busy_s else None,
                "steps_timed": self.steps}
