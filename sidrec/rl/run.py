"""`cli.py rl`: GRPO from an SFT run (or any HF directory), in the same engine as SFT and eval.

A step takes `rl.prompts_per_step` prompts of a seeded per-epoch permutation, rolls out G completions each
with the jitted constrained beam search (the policy's own FSDP-sharded weights, no copy), scores them on
device, and applies one jitted shard_map update. Prompts are left-padded to a multiple of 64 tokens
(`evaluate.bucket_length`), so rollout and update compile once per length bucket. The run directory is a
sidrec run directory (tokenizer/, model_config.json, checkpoints/), so `cli.py eval` works on it; a
checkpoint holds policy, optimizer state, reference and the loader position, so a killed run resumes to
bit-identical parameters (rollouts are deterministic given the parameters).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from sidrec import build, evaluate, optim, parallel
from sidrec.checkpoint import Checkpointer, PreemptionGuard, restore_params
from sidrec.config import Config, replace
from sidrec.data import minionerec
from sidrec.decode import trie as trie_lib
from sidrec.errors import UserError
from sidrec.logging import RunLogger, format_metrics_table
from sidrec.model import hf, qwen2
from sidrec.rl import data as rl_data, grpo
from sidrec.rundir import RunDirLock
from sidrec.tokenizer import load_tokenizer

BEST_METRIC = "valid_ndcg"


@dataclasses.dataclass(frozen=True)
class PromptSet:
    """Tokenized prompts (kept whole here; truncated when batched) and their targets' SID ids."""

    prompt_ids: list[np.ndarray]
    target_ids: np.ndarray  # int32 [n, D]
    tasks: list[str]

    def __len__(self) -> int:
        return len(self.prompt_ids)


def prompt_set(examples: list[rl_data.RLExample]) -> PromptSet:
    return PromptSet([e.prompt_ids for e in examples], np.stack([e.target_ids for e in examples]),
                     [e.task for e in examples])


def prompt_length(prompts: PromptSet, ids: np.ndarray, max_prompt_len: int) -> int:
    """The padded length of these prompts (one length bucket per step: its micro-batches stack)."""
    return evaluate.bucket_length(max(min(len(prompts.prompt_ids[i]), max_prompt_len) for i in ids))


def prompt_batch(prompts: PromptSet, ids: np.ndarray, max_prompt_len: int, pad_id: int, length: int
                 ) -> dict[str, np.ndarray]:
    """Left-padded prompts [P, length] (each keeps its last `max_prompt_len` tokens, as TRL) + targets."""
    rows = [prompts.prompt_ids[i][-max_prompt_len:] for i in ids]
    tokens = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
        tokens[i, length - len(row):] = row
        mask[i, length - len(row):] = 1
    return {"prompt_tokens": tokens, "prompt_mask": mask, "target_ids": prompts.target_ids[ids]}


@dataclasses.dataclass
class PromptLoader:
    """Seeded per-epoch permutation of the prompts, `batch` per step (the last partial step is dropped,
    so every step has the same number of prompts); its position is checkpoint meta."""

    size: int
    batch: int
    seed: int
    epoch: int = 0
    step_in_epoch: int = 0

    @property
    def steps_per_epoch(self) -> int:
        return self.size // self.batch

    def next_ids(self) -> np.ndarray:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.size)
        ids = order[self.step_in_epoch * self.batch:(self.step_in_epoch + 1) * self.batch]
        self.step_in_epoch += 1
        if self.step_in_epoch == self.steps_per_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        return ids

    def state(self) -> dict:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch}


def load_start(cfg: Config, mesh, shardings_of) -> tuple[dict, qwen2.Qwen2Config, object, str]:
    """The policy at step 0: an SFT run's checkpoint or an HF directory, FSDP-sharded on `mesh`."""
    fsdp = mesh.shape[parallel.FSDP]
    if cfg.rl.sft_run_dir:
        tokenizer, model_cfg = build.load_run_description(cfg.rl.sft_run_dir, cfg.model.dtype)
        params, step = restore_params(cfg.rl.sft_run_dir, qwen2.abstract_params(model_cfg), cfg.rl.sft_which,
                                      shardings_of(model_cfg))
        return params, model_cfg, tokenizer, f"{cfg.rl.sft_which} checkpoint (step {step}) of {cfg.rl.sft_run_dir}"
    if cfg.model.hf_path:
        directory = build.resolve_hf_path(cfg.model.hf_path)
        tokenizer = load_tokenizer(cfg.model.tokenizer_path or directory)
        params, base = hf.load_model(directory, cfg.model.dtype)
        params, model_cfg = hf.resize_vocab(params, base, base.real_vocab_size,
                                            pad_to_multiple=build.vocab_multiple(fsdp))
        return jax.device_put(params, shardings_of(model_cfg)), model_cfg, tokenizer, f"Hugging Face directory {directory}"
    raise UserError("cli.py rl needs a starting model: --rl.sft-run-dir DIR (an SFT run) or --model.hf-path DIR")


def _texts(cfg: Config, catalogue, rows):
    options = rl_data.RLOptions(title_answer_leak=cfg.rl.title_answer_leak, seq_title_sample=cfg.rl.seq_title_sample,
                                seed=rl_data.UPSTREAM_DATASET_SEED)
    return [t for t in rl_data.training_texts(catalogue, rows, options) if t.task in cfg.rl.tasks]


def run_rl(cfg: Config) -> dict:
    """GRPO (resuming from the run directory's latest checkpoint); returns the run summary."""
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    parallel.maybe_initialize_distributed(cfg.mesh)
    with RunDirLock(run_dir, "cli.py rl"):
        return _rl(cfg, run_dir)


def _rl(cfg: Config, run_dir: Path) -> dict:
    is_main = jax.process_index() == 0
    say = print if is_main else (lambda _: None)
    mesh = parallel.make_mesh(cfg.mesh)
    n_devices = mesh.devices.size
    r = cfg.rl
    per_call = r.prompts_per_step // r.micro_batches
    if per_call % n_devices:
        raise UserError(f"--rl.prompts-per-step / --rl.micro-batches ({per_call}) must be a multiple of the "
                        f"{n_devices} devices")
    say(f"run dir: {run_dir.resolve()}")
    say(parallel.describe(mesh))

    def shardings_of(model_cfg):
        return parallel.shardings(mesh, parallel.param_partition_specs(qwen2.param_specs(model_cfg),
                                                                       mesh.shape[parallel.FSDP]))

    with parallel.main_process_first("run directory files"):
        catalogue = build.load_catalogue(cfg)
    params, model_cfg, tokenizer, source = load_start(cfg, mesh, shardings_of)
    evaluate.check_sid_vocabulary(catalogue, tokenizer, model_cfg, source)
    if is_main:
        build.save_run_description(cfg, tokenizer, model_cfg)

    started = time.perf_counter()
    train_texts = _texts(cfg, catalogue, minionerec.load_split(catalogue, "train"))
    train = prompt_set(rl_data.tokenize(train_texts, tokenizer))
    valid_rows = minionerec.load_split(catalogue, "valid")
    valid = prompt_set(rl_data.tokenize(rl_data.sid_dataset(catalogue, valid_rows), tokenizer))
    n_valid = min(len(valid), r.valid_max_samples or len(valid))
    loader = PromptLoader(size=len(train), batch=r.prompts_per_step, seed=cfg.seed)
    if loader.steps_per_epoch < 1:
        raise UserError(f"--rl.prompts-per-step ({r.prompts_per_step}) exceeds the {len(train)} RL training prompts")
    total_steps = r.max_steps if r.max_steps > 0 else max(1, math.ceil(r.epochs * loader.steps_per_epoch))
    counts = {task: train.tasks.count(task) for task in dict.fromkeys(train.tasks)}
    say(f"data: {catalogue.category}: {len(train)} RL prompts {counts} (title answer leak {r.title_answer_leak}), "
        f"{n_valid} validation prompts, built in {time.perf_counter() - started:.1f}s")
    say(f"batch: {r.prompts_per_step} prompts x {r.group_size} completions per step = {r.micro_batches} "
        f"micro-batch(es) of {per_call} prompts over {n_devices} devices; {loader.steps_per_epoch} steps/epoch, "
        f"{total_steps} steps; reward {r.reward_type}, loss {r.loss_type}, beta {r.beta}, dynamic sampling "
        f"{r.dynamic_sampling}, reference sync every {r.ref_sync_steps or 'never'}")
    say(f"model: {source}, {qwen2.count_params(model_cfg):,} parameters, compute {model_cfg.compute_dtype}")

    partition_specs = parallel.param_partition_specs(qwen2.param_specs(model_cfg), mesh.shape[parallel.FSDP])
    tx, optimizer_info = optim.build_optimizer(cfg.optim, qwen2.flat_specs(model_cfg), total_steps)
    trie = trie_lib.build_trie(catalogue.sid_tokens_of.values(), tokenizer)
    rollout = jax.jit(partial(grpo.rollout, model_cfg=model_cfg, trie=trie, group_size=r.group_size,
                              reward_type=r.reward_type))
    steps = grpo.compile_rl(model_cfg, tx, mesh, partition_specs, beta=r.beta, loss_type=r.loss_type,
                            eos_id=tokenizer.eos_id, ref_sync_alpha=r.ref_sync_alpha)

    def to_device(batch: dict) -> dict:
        """This process's rows of a batch every process built whole -> global arrays over all devices."""
        n, count, index = len(next(iter(batch.values()))), jax.process_count(), jax.process_index()
        mine = slice(index * n // count, (index + 1) * n // count)
        return parallel.global_batch(mesh, {k: v[mine] for k, v in batch.items()}, row_axis=0)

    def rollout_batches(prompts: PromptSet, ids: np.ndarray, params):
        outs, length = [], prompt_length(prompts, ids, r.max_prompt_len)
        for start in range(0, len(ids), per_call):
            b = to_device(prompt_batch(prompts, ids[start:start + per_call], r.max_prompt_len, tokenizer.pad_id, length))
            outs.append((b, rollout(params, b["prompt_tokens"], b["prompt_mask"], b["target_ids"])))
        return outs

    def validate(params) -> dict:
        ids = np.arange(n_valid)
        ids = np.concatenate([ids, np.zeros((-len(ids)) % per_call, np.int64)])  # filler rows, dropped below
        hits = np.concatenate([np.asarray(jax.device_get(out.hit)) for _, out in rollout_batches(valid, ids, params)])
        hits = hits[:n_valid]
        ranks = np.where(hits.any(1), hits.argmax(1), -1)
        ndcg = np.where(ranks >= 0, 1.0 / np.log2(np.maximum(ranks, 0) + 2.0), 0.0)
        return {f"valid/hr@{r.group_size}": float((ranks >= 0).mean()), f"valid/ndcg@{r.group_size}": float(ndcg.mean()),
                "valid/hr@1": float((ranks == 0).mean())}

    checkpoints = Checkpointer(run_dir / "checkpoints", keep_last=cfg.checkpoint.keep, best_metric=BEST_METRIC,
                               mode="max")

    def save_checkpoint(step: int, state, best: dict, metric: float | None) -> None:
        """The state plus what a resume needs: the loader's position, the best so far, the config."""
        checkpoints.save(step, state, {"loader": loader.state(), "best": best, "config": dataclasses.asdict(cfg)},
                         metric=metric)

    restored = checkpoints.restore_latest(steps.abstract_state)
    latest = None if restored is None else restored[0]
    if restored is not None:
        _, state, meta = restored
        loader.epoch, loader.step_in_epoch = meta["loader"]["epoch"], meta["loader"]["step_in_epoch"]
        best = meta["best"]
    else:
        state, best = steps.init_state(params), {"metric": -math.inf, "step": -1}
    del params
    step = int(jax.device_get(state.step))
    logger = RunLogger(dataclasses.asdict(cfg), run_dir, is_main=is_main, wandb_mode=cfg.wandb.mode,
                       project=cfg.wandb.project, name=cfg.wandb.name, total_steps=total_steps, start_step=step)
    logger.info(f"resumed from step {step}" if latest is not None else "starting from step 0")
    logger.info(optimizer_info.describe().splitlines()[0])
    if latest is None:
        first = validate(state.params)
        logger.log(0, first)
        logger.info(f"start: {first}")
        best = {**best, "start": first[f"valid/ndcg@{r.group_size}"]}
        if r.keep_start:  # the start is a candidate for "best" like any step
            best = {**best, "metric": best["start"], "step": 0}
            save_checkpoint(0, state, best, best["metric"])

    rollout_s = update_s = 0.0
    first_step, stop_reason = step, "finished"
    with PreemptionGuard(checkpoints) as guard:
        while step < total_steps:
            t0 = time.perf_counter()
            outs = rollout_batches(train, loader.next_ids(), state.params)
            jax.block_until_ready(outs)
            t1 = time.perf_counter()
            batch = update_batch(outs, r.dynamic_sampling)
            state, metrics = steps.update(state, batch)
            step += 1
            if r.ref_sync_steps and step % r.ref_sync_steps == 0:
                state = steps.sync_reference(state)
            metrics = jax.device_get({**metrics, **rollout_metrics(outs, tokenizer.eos_id)})
            t2 = time.perf_counter()
            if step > 1:  # the first step's times are mostly compilation
                rollout_s, update_s = rollout_s + t1 - t0, update_s + t2 - t1
            if not metrics["finite"]:
                raise UserError(f"step {step}: loss {float(metrics['loss'])} / gradient norm "
                                f"{float(metrics['grad_norm'])} is not finite; lower --optim.lr")
            lr = float(optimizer_info.learning_rates(step - 1)[optim.ADAMW if cfg.optim.name == "adamw" else optim.MUON])
            logger.log(step, {**{f"rl/{k}": float(v) for k, v in metrics.items() if k != "finite"},
                              "rl/rollout_s": t1 - t0, "rl/update_s": t2 - t1, "train/lr": lr})
            preempted = guard.should_stop(step)
            validate_now = (r.valid_every_steps > 0 and step % r.valid_every_steps == 0) or step == total_steps
            save = validate_now or preempted or (cfg.checkpoint.every_steps > 0 and step % cfg.checkpoint.every_steps == 0)
            metric = None
            if validate_now:
                values = validate(state.params)
                metric = values[f"valid/ndcg@{r.group_size}"]
                if metric > best["metric"]:
                    best = {**best, "metric": metric, "step": step}
                logger.log(step, values)
            if save:
                save_checkpoint(step, state, best, metric)
            if preempted:
                stop_reason = "preempted"
                logger.info(f"stop requested at step {step}: checkpoint saved, exiting cleanly")
                break
    checkpoints.wait()
    # Steps this invocation timed (its first, mostly compilation, is not; none when it resumed a finished run).
    timed = max(0, step - max(first_step, 1))
    summary = {"stop_reason": stop_reason, "steps": step, "total_steps": total_steps, "best_step": best["step"],
               f"best_valid_ndcg@{r.group_size}": best["metric"],
               f"start_valid_ndcg@{r.group_size}": best.get("start"),
               "rollout_s_per_step": rollout_s / timed if timed else None,
               "update_s_per_step": update_s / timed if timed else None,
               "rollout_prompts_per_s": r.prompts_per_step * timed / rollout_s if rollout_s else None}
    logger.write_summary(summary)
    logger.close()
    checkpoints.close()
    return summary


def update_batch(outs, dynamic_sampling: bool) -> dict:
    """Rollout outputs of each micro-batch -> the update's [A, p, ...] arrays (weights 0 drop groups)."""
    def stack(values):
        return jnp.stack(values)

    advantages = stack([out.advantages for _, out in outs])
    weights = jnp.ones_like(advantages)
    if dynamic_sampling:
        weights = jnp.broadcast_to(jnp.any(advantages != 0, axis=-1, keepdims=True), advantages.shape).astype(jnp.float32)
    return {"prompt_tokens": stack([b["prompt_tokens"] for b, _ in outs]),
            "prompt_mask": stack([b["prompt_mask"] for b, _ in outs]),
            "completions": stack([out.completions for _, out in outs]),
            "advantages": advantages, "weights": weights}


def rollout_metrics(outs, eos_id: int) -> dict:
    rewards = jnp.concatenate([out.rewards for _, out in outs])
    advantages = jnp.concatenate([out.advantages for _, out in outs])
    hit = jnp.concatenate([out.hit for _, out in outs])
    lengths = jnp.concatenate([grpo.completion_mask(out.completions, eos_id).sum(-1) for _, out in outs])
    return {"reward_mean": rewards.mean(), "reward_std": rewards.std(axis=-1, ddof=1).mean(),
            "group_hit_rate": hit.any(-1).mean(), "zero_advantage_groups": jnp.all(advantages == 0, axis=-1).mean(),
            "completion_length": lengths.mean()}


def run_rl_eval(cfg: Config) -> dict:
    """RL, then the test eval of its best checkpoint next to the SFT start's (and most-popular)."""
    summary = run_rl(cfg)
    if summary["stop_reason"] == "preempted":
        print("RL was preempted: rerun the same command to resume (evaluation skipped)")
        return summary
    if summary["best_step"] == 0 and jax.process_index() == 0:
        ndcg = summary[f"best_valid_ndcg@{cfg.rl.group_size}"]
        print(f"No RL step beat the start on valid (NDCG@{cfg.rl.group_size} {ndcg:.4f} "
              "at step 0): the run's best checkpoint is the start itself, evaluated below; "
              "--rl.keep-start False evaluates the best RL step instead")
    rl_metrics = evaluate.run_eval(replace(cfg, **{"model.hf_path": None}), checkpoint="best")  # the RL run's own
    if not cfg.rl.sft_run_dir:
        return summary
    start_file = Path(cfg.rl.sft_run_dir) / evaluate.METRICS_FILE
    start = json.loads(start_file.read_text()) if start_file.is_file() else None
    if start is None or start.get("n_samples") != rl_metrics["n_samples"]:
        start = evaluate.run_eval(dataclasses.replace(cfg, run_dir=cfg.rl.sft_run_dir), checkpoint=cfg.rl.sft_which)
    if jax.process_index() == 0:
        print("RL (columns HR@K, NDCG@K) vs its SFT start (the 'SFT start' columns):")
        print(format_metrics_table(rl_metrics, baseline=start, baseline_name="SFT start"))
    return summary
