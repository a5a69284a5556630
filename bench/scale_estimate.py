"""Paper estimate at scale: FLOPs per optimizer step of Qwen2.5-1.5B on the Industrial mixture with our
packing (the industrial-v6e8-muon preset: global batch 1024, rows of 1024 tokens, 8 devices, remat),
and the step time it implies on a TPU v6e-8 at 40% and 60% utilisation, next to the seed port's
measured 4.05 s/step (every row padded to 512 tokens, full-vocabulary logits, about 17% MFU).

    python -m bench.scale_estimate

Token counts, rows and target slots come from the real packer (sidrec.data.batching) over one epoch.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from bench import common
from presets.qwen import INDUSTRIAL_V6E8_MUON
from sidrec import build
from sidrec.data import batching, minionerec
from sidrec.logging import PEAK_FLOPS_BF16
from sidrec.model import qwen2
from sidrec.tokenizer import add_sid_tokens, load_tokenizer

TPU_V6E_PEAK = PEAK_FLOPS_BF16["TPU v6e"]

DEVICES = 8
SEED_STEP_S = 4.05
SEED_ROW_LENGTH = 512
UTILISATIONS = (0.4, 0.6)
# Qwen2.5-1.5B's config.json, vocabulary extended by the Industrial SID tokens (152225 rows).
QWEN25_15B = dict(hidden_size=1536, intermediate_size=8960, num_layers=28, num_heads=12, num_kv_heads=2,
                  head_dim=128, rope_theta=1_000_000.0, tie_word_embeddings=True, compute_dtype="bfloat16",
                  remat=True)


def step_statistics(seq_len: int) -> dict:
    """Mean per-step tokens, rows, slots and targets of one epoch of the preset's loader."""
    shared = common.require_shared()
    cfg = INDUSTRIAL_V6E8_MUON
    catalogue = minionerec.load_catalogue(shared / "data", common.CATEGORY)
    tokenizer = add_sid_tokens(load_tokenizer(shared / "tokenizers" / "qwen2.5"), catalogue.sid_tokens)
    data_cfg = dataclasses.replace(cfg.data, root=str(shared / "data"), seq_len=seq_len)
    data = batching.load_training_data(data_cfg, tokenizer, common.WORK_DIR / "train" / "cache", seed=cfg.seed)
    cfg = dataclasses.replace(cfg, data=data_cfg)
    layout = batching.Layout(seq_len=seq_len, rows_per_device=batching.rows_per_device(
                                 data, seq_len=seq_len, global_batch_size=cfg.train.global_batch_size,
                                 micro_batches=batching.grad_accum(cfg.train.global_batch_size,
                                                                   cfg.train.per_device_batch_size, DEVICES),
                                 n_devices=DEVICES, seed=cfg.seed),
                             local_device_count=DEVICES)
    loader = batching.Loader(data, global_batch_size=cfg.train.global_batch_size, layout=layout, seed=cfg.seed)
    plans = loader.epoch_plans(0)
    slots_per_micro_batch = layout.rows_per_micro_batch * seq_len
    return {
        "steps_per_epoch": len(plans), "rows_per_device": layout.rows_per_device,
        "targets_per_row": loader.targets_per_row, "mean_example_tokens": float(np.mean(data.lengths)),
        "tokens": float(np.mean([p.n_tokens for p in plans])),
        "targets": float(np.mean([p.n_targets for p in plans])),
        "rows": float(np.mean([sum(len(row) > 0 for row in p.rows) for p in plans])),  # packed, not padding
        "micro_batches": float(np.mean([p.num_micro_batches for p in plans])),
        "token_slots": float(np.mean([p.num_micro_batches * slots_per_micro_batch for p in plans])),
        "target_slots": float(np.mean([p.num_micro_batches * DEVICES * p.target_slots for p in plans])),
        "vocab_size": tokenizer.tokenizer.get_vocab_size(),
        "max_segment_len": int(data.lengths.max()),
    }


def estimate(seq_len: int = 1024) -> dict:
    stats = step_statistics(seq_len)
    cfg = qwen2.Qwen2Config(vocab_size=qwen2.round_up(stats["vocab_size"], build.vocab_multiple(DEVICES)),
                            real_vocab_size=stats["vocab_size"], **QWEN25_15B)
    peak = DEVICES * TPU_V6E_PEAK
    model_flops = qwen2.flops_per_token(cfg, seq_len) * stats["tokens"]
    executed = qwen2.executed_train_flops(cfg, stats["token_slots"], stats["target_slots"], seq_len,
                                          stats["max_segment_len"])
    splash = dataclasses.replace(cfg, attention="splash")  # --model.attention splash
    executed_splash = qwen2.executed_train_flops(splash, stats["token_slots"], stats["target_slots"], seq_len,
                                                 stats["max_segment_len"])
    whole_rows = qwen2.executed_train_flops(cfg, stats["token_slots"], stats["target_slots"], seq_len)
    seed_tokens = INDUSTRIAL_V6E8_MUON.train.global_batch_size * SEED_ROW_LENGTH
    seed_flops = qwen2.flops_per_token(cfg, SEED_ROW_LENGTH) * seed_tokens
    return {
        "seq_len": seq_len,
        "model": {"params": qwen2.count_params(cfg), **QWEN25_15B, "vocab_size": cfg.vocab_size},
        "step": stats,
        "model_flops_per_step": model_flops,
        "executed_flops_per_step": executed,
        "step_s_at": {f"{u:.0%}": executed / (u * peak) for u in UTILISATIONS},
        "executed_flops_per_step_splash": executed_splash,
        "step_s_at_splash": {f"{u:.0%}": executed_splash / (u * peak) for u in UTILISATIONS},
        "executed_flops_per_step_whole_rows": whole_rows,
        "seed": {"step_s": SEED_STEP_S, "row_length": SEED_ROW_LENGTH, "flops_per_step": seed_flops,
                 "mfu": seed_flops / (SEED_STEP_S * peak)},
        "work_ratio_seed_over_ours": seed_flops / executed,
        "speedup_over_seed_at": {f"{u:.0%}": SEED_STEP_S * u * peak / executed for u in UTILISATIONS},
        "peak_flops": peak,
    }


def report(r: dict) -> str:
    s, seed = r["step"], r["seed"]
    rows = [{"what": f"seed port (rows padded to {seed['row_length']})", "tflop": seed["flops_per_step"] / 1e12,
             "time": f"{seed['step_s']:.2f} s measured ({seed['mfu']:.0%} MFU)"}]
    rows += [{"what": f"sidrec (packed rows of {r['seq_len']}, logits at targets)",
              "tflop": r["executed_flops_per_step"] / 1e12,
              "time": ", ".join(f"{t:.2f} s at {u}" for u, t in r["step_s_at"].items())},
             {"what": "sidrec, --model.attention splash", "tflop": r["executed_flops_per_step_splash"] / 1e12,
              "time": ", ".join(f"{t:.2f} s at {u}" for u, t in r["step_s_at_splash"].items())}]
    return "\n".join([
        f"Qwen2.5-1.5B ({r['model']['params'] / 1e9:.2f}B params), global batch 1024 on TPU v6e-8 "
        f"({r['peak_flops'] / 1e15:.2f} PFLOP/s bf16): per step {s['tokens']:,.0f} real tokens in "
        f"{s['rows']:.0f} rows ({s['token_slots']:,.0f} slots), {s['targets']:,.0f} targets "
        f"({s['target_slots']:,.0f} slots)",
        common.table(rows, [("what", "per optimizer step", ""), ("tflop", "TFLOP", ".0f"), ("time", "step time", "")]),
        f"model FLOPs (6N + attention per real token) {r['model_flops_per_step'] / 1e12:.0f} TFLOP; "
        f"seed / ours work {r['work_ratio_seed_over_ours']:.1f}x; speedup over the seed "
        + ", ".join(f"{x:.1f}x at {u}" for u, x in r["speedup_over_seed_at"].items()),
    ])


def main(seq_len: int = 1024) -> None:
    result = estimate(seq_len)
    common.write_result("scale_estimate", {"preset": "industrial-v6e8-muon", "devices": DEVICES,
                                           "seq_len": seq_len, "tpu_v6e_peak_flops": TPU_V6E_PEAK}, result)
    print(report(result))


if __name__ == "__main__":
    import tyro

    tyro.cli(main)
