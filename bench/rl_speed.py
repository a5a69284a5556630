"""RL step throughput: the GRPO rollout (trie-constrained beam search, 16 completions per prompt) and the
update (policy + reference log-probs, k3 KL, one AdamW step), ours vs a TRL-style torch step, on the same
tiny Qwen2 with the real vocabulary (tests/fixtures/make_beam_fixtures.py, 152225 rows) and the same
Industrial RL prompts (upstream's SidDataset on the train split); then a v6e-8 estimate of one
upstream-sized step (rl.sh: 64 prompts x 16 completions, Qwen2.5-1.5B).

    python -m bench.rl_speed

The torch side is what upstream's ReReTrainer does per step: transformers `generate(num_beams=16,
num_return_sequences=16, length_penalty=0)` with upstream's constraint processor and max 128 new tokens,
rewards in Python on the decoded strings; the update runs policy and reference over every completion
with its own copy of the prompt (TRL's `_get_per_token_logps` with `logits_to_keep`), the per-sequence
token-mean loss, backward, clip 0.3 and AdamW. Ours: `grpo.rollout` (one jit) and `grpo.make_update`
(prompt run once per group). Update work is counted the same way on both sides: the tokens of every
completion's sequence (its real prompt tokens + completion tokens up to EOS), the work TRL does.
"""

from __future__ import annotations

import copy
from functools import partial

import jax
import numpy as np

from bench import common, eval_speed
from bench.scale_estimate import DEVICES, QWEN25_15B, TPU_V6E_PEAK, UTILISATIONS
from presets.rl import INDUSTRIAL_V6E8_GRPO, UPSTREAM_OPTIM
from sidrec import build, optim, parallel
from sidrec.config import MeshConfig
from sidrec.data import minionerec
from sidrec.model import qwen2
from sidrec.rl import data as rl_data, grpo, run as rl_run
from sidrec.tokenizer import add_sid_tokens, load_tokenizer

GROUP = 16
PROMPTS_PER_CALL = 8
MAX_PROMPT_LEN = 512
UPSTREAM_MAX_COMPLETION = 128  # rl.sh --max_completion_length
BETA = 1e-3
# TPU v6e per chip (Google's published figures): HBM bandwidth, ICI bandwidth (3,584 Gbit/s).
TPU_V6E_HBM_BYTES_PER_S = 1.64e12
TPU_V6E_ICI_BYTES_PER_S = 448e9


def load() -> tuple[eval_speed.Ours, rl_run.PromptSet]:
    ours = eval_speed.load_ours()
    catalogue = minionerec.load_catalogue(common.require_shared() / "data", common.CATEGORY)
    texts = rl_data.sid_dataset(catalogue, minionerec.load_split(catalogue, "train"))
    return ours, rl_run.prompt_set(rl_data.tokenize(texts, ours.tokenizer))


# ----------------------------------------------------------------------------------------------------
# Ours


class OurStep:
    def __init__(self, ours: eval_speed.Ours, prompts: rl_run.PromptSet, ids: np.ndarray):
        cfg, self.eos = ours.model_cfg, ours.tokenizer.eos_id
        mesh = parallel.make_mesh(MeshConfig(data=1, fsdp=1), jax.devices()[:1])
        specs = parallel.param_partition_specs(qwen2.param_specs(cfg), 1)
        tx, _ = optim.build_optimizer(UPSTREAM_OPTIM, qwen2.flat_specs(cfg), total_steps=100)
        length = rl_run.prompt_length(prompts, ids, MAX_PROMPT_LEN)
        self.batch = rl_run.prompt_batch(prompts, ids, MAX_PROMPT_LEN, ours.tokenizer.pad_id, length)
        self.rollout_fn = jax.jit(partial(grpo.rollout, model_cfg=cfg, trie=ours.trie, group_size=GROUP,
                                          reward_type="ranking"))
        steps = grpo.compile_rl(cfg, tx, mesh, specs, beta=BETA, loss_type="grpo", eos_id=self.eos, ref_sync_alpha=0.6)
        self.update_fn = steps.update
        self.state = steps.init_state(ours.params)
        self.out = self.metrics = None

    def rollout(self):
        self.out = jax.block_until_ready(self.rollout_fn(self.state.params, self.batch["prompt_tokens"],
                                                         self.batch["prompt_mask"], self.batch["target_ids"]))

    def update(self):
        batch = rl_run.update_batch([(self.batch, self.out)], dynamic_sampling=False)
        self.state, self.metrics = jax.block_until_ready(self.update_fn(self.state, batch))

    def completions(self) -> list[list[tuple[int, ...]]]:
        """Each prompt's completions in beam order, up to and including EOS."""
        comps, mask = np.asarray(self.out.completions), np.asarray(grpo.completion_mask(self.out.completions, self.eos))
        return [[tuple(c[m]) for c, m in zip(cs, ms)] for cs, ms in zip(comps, mask)]


# ----------------------------------------------------------------------------------------------------
# TRL-style torch


class TorchStep:
    def __init__(self, ours: eval_speed.Ours, prompts: rl_run.PromptSet, ids: np.ndarray):
        import torch
        import transformers

        from bench import upstream

        fixture = common.load_fixture_module("make_beam_fixtures")
        shared = common.require_shared()
        config = transformers.Qwen2Config(**{k: v for k, v in fixture.HF_CONFIG.items() if k != "architectures"})
        self.model = transformers.Qwen2ForCausalLM(config)
        self.model.load_state_dict({k: torch.tensor(v) for k, v in fixture.tiny_state_dict().items()}, strict=False)
        self.model.tie_weights()
        self.ref = copy.deepcopy(self.model).eval()
        sids = upstream.info_sids(shared / "data", common.CATEGORY)
        self.tokenizer = upstream.hf_tokenizer(shared / "tokenizers" / "qwen2.5",
                                               sorted({"<" + t for s in sids for t in s.split("<")[1:]}))
        self.eos = self.tokenizer.eos_token_id
        self.allowed = upstream.allowed_tokens_table(sids, lambda text: self.tokenizer(text).input_ids, self.eos)
        self.generation = transformers.GenerationConfig(
            num_beams=GROUP, num_return_sequences=GROUP, length_penalty=0.0, do_sample=False,
            max_new_tokens=UPSTREAM_MAX_COMPLETION, pad_token_id=self.eos, eos_token_id=self.eos, top_k=None, top_p=None)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=UPSTREAM_OPTIM.lr, weight_decay=0.0)
        rows = [prompts.prompt_ids[i][-MAX_PROMPT_LEN:] for i in ids]
        width = max(map(len, rows))
        self.prompt = torch.tensor([[self.eos] * (width - len(r)) + r.tolist() for r in rows])
        self.prompt_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        self.targets = ["".join(tokens) for tokens in _target_tokens(prompts, ids, ours)]
        self.torch, self.upstream = torch, upstream
        self.completion_ids = self.advantages = None

    def rollout(self):
        torch = self.torch
        constraint = self.upstream.UpstreamConstraint(self.allowed, GROUP)
        self.model.eval()
        with torch.no_grad():
            out = self.model.generate(self.prompt, attention_mask=self.prompt_mask, generation_config=self.generation,
                                      logits_processor=[constraint])
        self.completion_ids = out[:, self.prompt.shape[1]:]
        texts = self.tokenizer.batch_decode(self.completion_ids, skip_special_tokens=True)
        self.advantages = torch.tensor(np.concatenate([
            _python_advantages([t.strip() for t in texts[i * GROUP:(i + 1) * GROUP]], target)
            for i, target in enumerate(self.targets)]), dtype=torch.float32)

    def completion_mask(self):
        is_eos = self.completion_ids == self.eos
        return (is_eos.cumsum(1) - is_eos.int()) == 0

    def update(self):
        torch = self.torch
        self.model.train()
        prompt = self.prompt.repeat_interleave(GROUP, 0)
        prompt_mask = self.prompt_mask.repeat_interleave(GROUP, 0)
        mask = self.completion_mask()
        input_ids = torch.cat([prompt, self.completion_ids], 1)
        attention = torch.cat([prompt_mask, mask.long()], 1)
        keep = self.completion_ids.shape[1]

        def per_token_logps(model):
            logits = model(input_ids=input_ids, attention_mask=attention, logits_to_keep=keep + 1).logits[:, :-1]
            return torch.stack([row.log_softmax(-1).gather(-1, ids[:, None])[:, 0]  # TRL's selective_log_softmax
                                for row, ids in zip(logits.float(), self.completion_ids)])

        with torch.no_grad():
            ref = per_token_logps(self.ref)
        logp = per_token_logps(self.model)
        kl = torch.exp(ref - logp) - (ref - logp) - 1
        per_token = -(torch.exp(logp - logp.detach()) * self.advantages[:, None] - BETA * kl)
        m = mask.float()
        loss = ((per_token * m).sum(1) / m.sum(1).clamp(min=1)).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), UPSTREAM_OPTIM.clip_norm)
        self.optimizer.step()
        self.optimizer.zero_grad()

    def completions(self) -> list[list[tuple[int, ...]]]:
        ids, mask = self.completion_ids.numpy(), self.completion_mask().numpy()
        rows = [tuple(c[m]) for c, m in zip(ids, mask)]
        return [rows[i * GROUP:(i + 1) * GROUP] for i in range(len(rows) // GROUP)]


def _target_tokens(prompts: rl_run.PromptSet, ids: np.ndarray, ours: eval_speed.Ours) -> list[list[str]]:
    return [[ours.tokenizer.tokenizer.id_to_token(int(t)) for t in prompts.target_ids[i]] for i in ids]


def _python_advantages(completions: list[str], target: str) -> np.ndarray:
    """Upstream's rule + ndcg_rule reward on strings, then (r - mean) / (std + 1e-4)."""
    hit = np.array([c == target for c in completions], np.float64)
    discount = 1.0 / np.log2(np.arange(len(completions)) + 2.0)
    ndcg = -discount / discount.sum() * (1.0 - hit) if hit.any() else np.zeros(len(completions))
    reward = hit + ndcg
    return (reward - reward.mean()) / (reward.std(ddof=1) + 1e-4)


# ----------------------------------------------------------------------------------------------------
# Side by side


def side_by_side(repeats: int) -> dict:
    """Both from the same weights: the first rollouts compared (ours compiles), then timed alternately."""
    ours_data, prompts = load()
    ids = np.arange(PROMPTS_PER_CALL)
    ours, theirs = OurStep(ours_data, prompts, ids), TorchStep(ours_data, prompts, ids)
    first_rollout_s = common.seconds(ours.rollout)
    theirs.rollout()
    same_groups = float(np.mean([a == b for a, b in zip(ours.completions(), theirs.completions())]))
    first_update_s = common.seconds(ours.update)
    theirs.update()
    times = common.alternate({"ours_rollout": ours.rollout, "torch_rollout": theirs.rollout,
                              "ours_update": ours.update, "torch_update": theirs.update}, repeats)
    ours_mask = np.asarray(grpo.completion_mask(ours.out.completions, ours.eos))
    tokens = {"ours": int(np.asarray(ours.batch["prompt_mask"]).sum()) * GROUP + int(ours_mask.sum()),
              "torch": int(theirs.prompt_mask.sum()) * GROUP + int(theirs.completion_mask().sum())}
    med = {k: common.median(v) for k, v in times.items()}
    rollout_pps = {side: PROMPTS_PER_CALL / med[f"{side}_rollout"] for side in ("ours", "torch")}
    update_tps = {side: tokens[side] / med[f"{side}_update"] for side in ("ours", "torch")}
    return {
        "prompts": PROMPTS_PER_CALL, "group": GROUP, "repeats": repeats, "times_s": times,
        "ours_first_rollout_s": first_rollout_s, "ours_first_update_s": first_update_s,
        "same_groups": same_groups, "update_sequence_tokens": tokens,
        "completion_tokens": float(ours_mask.sum() / (PROMPTS_PER_CALL * GROUP)),
        "rollout_prompts_per_s": rollout_pps, "update_tokens_per_s": update_tps,
        "rollout_speedup": rollout_pps["ours"] / rollout_pps["torch"],
        "update_speedup": update_tps["ours"] / update_tps["torch"],
        "step_speedup": (med["torch_rollout"] + med["torch_update"]) / (med["ours_rollout"] + med["ours_update"]),
    }


# ----------------------------------------------------------------------------------------------------
# v6e-8 estimate of one upstream-sized step


def prompt_statistics() -> dict:
    """Per-step prompt lengths of the industrial-v6e8-grpo mixture (Qwen2.5 tokenizer + SID tokens)."""
    shared = common.require_shared()
    cfg = INDUSTRIAL_V6E8_GRPO
    catalogue = minionerec.load_catalogue(shared / "data", common.CATEGORY)
    tokenizer = add_sid_tokens(load_tokenizer(shared / "tokenizers" / "qwen2.5"), catalogue.sid_tokens)
    options = rl_data.RLOptions(title_answer_leak=cfg.rl.title_answer_leak, seq_title_sample=cfg.rl.seq_title_sample,
                                seed=rl_data.UPSTREAM_DATASET_SEED)
    texts = rl_data.training_texts(catalogue, minionerec.load_split(catalogue, "train"), options)
    prompts = rl_run.prompt_set(rl_data.tokenize([t for t in texts if t.task in cfg.rl.tasks], tokenizer))
    loader = rl_run.PromptLoader(size=len(prompts), batch=cfg.rl.prompts_per_step, seed=cfg.seed)
    lengths = np.array([min(len(p), cfg.rl.max_prompt_len) for p in prompts.prompt_ids])
    buckets = [rl_run.prompt_length(prompts, loader.next_ids(), cfg.rl.max_prompt_len)
               for _ in range(loader.steps_per_epoch)]
    return {"prompts": len(prompts), "mean_prompt_tokens": float(lengths.mean()),
            "mean_bucket": float(np.mean(buckets)), "vocab_size": tokenizer.tokenizer.get_vocab_size(),
            "prompts_per_step": cfg.rl.prompts_per_step, "group": cfg.rl.group_size}


def estimate(completion_tokens: float) -> dict:
    """FLOPs and bytes of one step: rollout prefill (compute), decode (weights read and all-gathered per
    token: bandwidth), update (policy forward+backward with remat + reference forward over each prompt once
    and every completion; the head only at completion tokens). The TRL-style update's work for comparison:
    every completion carries its own prompt."""
    s = prompt_statistics()
    cfg = qwen2.Qwen2Config(vocab_size=qwen2.round_up(s["vocab_size"], build.vocab_multiple(DEVICES)),
                            real_vocab_size=s["vocab_size"], **QWEN25_15B)
    n, g, c, prompt = s["prompts_per_step"], s["group"], completion_tokens, s["mean_bucket"]
    matmul, head = 2 * qwen2.layer_matmul_params(cfg), 2 * cfg.hidden_size * cfg.vocab_size

    def attention(length):
        return 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * length

    prefill = n * prompt * (matmul + attention(prompt)) + n * head
    decode_flops = n * g * c * (matmul + attention(prompt + c) + head)
    weight_bytes = 2 * qwen2.count_params(cfg)
    decode_s = c * max(weight_bytes / TPU_V6E_HBM_BYTES_PER_S,
                       weight_bytes * (DEVICES - 1) / DEVICES / TPU_V6E_ICI_BYTES_PER_S)
    forward = n * prompt * (matmul + attention(prompt)) + n * g * c * (matmul + attention(prompt + c) + head)
    update = forward * (4 if cfg.remat else 3) + forward
    trl_forward = n * g * (prompt + c) * (matmul + attention(prompt + c)) + n * g * c * head
    peak = DEVICES * TPU_V6E_PEAK
    return {
        "prompts": s, "completion_tokens": c, "model_params": qwen2.count_params(cfg),
        "rollout_flops": prefill + decode_flops, "update_flops": update, "trl_update_flops": 4 * trl_forward,
        "decode_bound_s": decode_s,
        "step_s_at": {f"{u:.0%}": (prefill + update) / (u * peak) + decode_s for u in UTILISATIONS},
        "update_work_ratio_trl_over_ours": 4 * trl_forward / update,
    }


def report(side: dict | None, est: dict) -> str:
    lines = []
    if side:
        rows = [{"what": "sidrec (jit rollout, prompt once per group)", "pps": side["rollout_prompts_per_s"]["ours"],
                 "tps": side["update_tokens_per_s"]["ours"]},
                {"what": "TRL-style torch", "pps": side["rollout_prompts_per_s"]["torch"],
                 "tps": side["update_tokens_per_s"]["torch"]}]
        lines += [common.table(rows, [("what", f"{side['prompts']} prompts x {side['group']}", ""),
                                      ("pps", "rollout prompts/s", ".2f"), ("tps", "update tokens/s", ",.0f")]),
                  f"rollout {side['rollout_speedup']:.1f}x, update {side['update_speedup']:.1f}x, whole step "
                  f"{side['step_speedup']:.1f}x; same groups {side['same_groups']:.0%}"]
    lines.append(f"v6e-8, {est['prompts']['prompts_per_step']} prompts x {est['prompts']['group']}: rollout "
                 f"{est['rollout_flops'] / 1e12:.0f} TFLOP + decode >= {est['decode_bound_s'] * 1e3:.0f} ms, update "
                 f"{est['update_flops'] / 1e12:.0f} TFLOP (TRL-style {est['trl_update_flops'] / 1e12:.0f}); step "
                 + ", ".join(f"{t:.2f} s at {u}" for u, t in est["step_s_at"].items()))
    return "\n".join(lines)


def main(repeats: int = 3, run_side_by_side: bool = True) -> None:
    side, skipped = None, {}
    if run_side_by_side:
        try:
            common.require_torch()
            side = side_by_side(repeats)
        except common.BenchUnavailable as reason:
            skipped["side_by_side"] = str(reason)
    completion = side["completion_tokens"] if side else 5.0  # 3 SID tokens, newline, EOS
    est = estimate(completion)
    settings = {"group": GROUP, "prompts_per_call": PROMPTS_PER_CALL, "beta": BETA, "optimizer": "AdamW 1e-5, clip 0.3",
                "model": "tests/fixtures/make_beam_fixtures.py tiny Qwen2 (hidden 32, 2 layers, vocab 152225, fp32)",
                "category": common.CATEGORY, "upstream_max_completion": UPSTREAM_MAX_COMPLETION, "repeats": repeats,
                "tpu_v6e": {"peak_flops": TPU_V6E_PEAK, "hbm_bytes_per_s": TPU_V6E_HBM_BYTES_PER_S,
                            "ici_bytes_per_s": TPU_V6E_ICI_BYTES_PER_S}, "skipped": skipped}
    common.write_result("rl_speed", settings, {"side_by_side": side, "v6e8_estimate": est})
    print(report(side, est))
    for name, reason in skipped.items():
        print(f"skipped {name}: {reason}")


if __name__ == "__main__":
    import tyro

    tyro.cli(main)
