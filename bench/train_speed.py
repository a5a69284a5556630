"""Train throughput: our jitted step vs a plain PyTorch loop over transformers' Qwen2ForCausalLM, cost
against batch size and row length, and the step's FLOP/s against the machine's own matmul FLOP/s.

    python -m bench.train_speed

Model: the industrial-cpu preset's from-scratch architecture (hidden 128, 2 layers) with upstream's
vocabulary (Qwen2.5 tokenizer + Industrial SID tokens, 152225 rows), on upstream's five-task
Industrial training mixture; fp32 on both sides.

Side by side, one optimizer step over the same examples (the first global batch of our loader):
ours packs them into rows of `seq_len` tokens; PyTorch gets them as upstream's Trainer does
(DataCollatorForSeq2Seq micro-batches of 4, loss / accumulation steps, clip 1.0, torch AdamW).
Batch preparation is outside the timed region on both sides; repeats alternate the two.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp

from bench import common, profile, render_readme
from presets.cpu import INDUSTRIAL_CPU
from sidrec import hugepages, parallel, train
from sidrec.config import replace
from sidrec.data import minionerec
from sidrec.model import attention, hf, qwen2

TORCH_MICRO_BATCH = 4  # upstream sft.py's default micro_batch_size (its sft.sh uses 16 on GPUs)


# Issue 15's second configuration: a wider, deeper model on the SID task alone (short examples).
SECOND = {"model.hidden_size": 256, "model.intermediate_size": 768, "model.num_layers": 4, "model.num_heads": 4,
          "model.num_kv_heads": 2, "model.head_dim": 64, "data.tasks": ("sid_sft",)}
SECOND_DESCRIPTION = "hidden 256, 4 layers, 4/2 heads, sid_sft examples only"
# glibc keeping freed memory for reuse: every allocation from the main heap (threads' arenas mmap large
# blocks and unmap them on free whatever the thresholds), never trimmed. By default XLA's per-step temp
# buffer (677 MB in the second configuration) and PyTorch's per-op tensors are fresh mmaps every step,
# so each page faults again (0.2 M faults a step for ours, 3.1 M for torch's, measured with getrusage).
REUSE_MEMORY_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}


def bench_config(seq_len: int, examples: int, optimizer: str = "adamw", impl: str = "optax", **overrides):
    """One optimizer step = `examples` examples in one micro-batch (no accumulation) of rows of seq_len."""
    shared = common.require_shared()
    return replace(
        INDUSTRIAL_CPU, run_dir=str(common.WORK_DIR / "train"),
        **{"model.tokenizer_path": str(shared / "tokenizers" / "qwen2.5"), "data.root": str(shared / "data"),
           "data.seq_len": seq_len, "train.global_batch_size": examples,
           "train.per_device_batch_size": examples, "optim.name": optimizer, "optim.impl": impl,
           "wandb.mode": "disabled", **overrides})


@dataclasses.dataclass
class OurStep:
    """A trainer's jitted step on its first batch, state carried (and donated) from call to call."""

    trainer: train.Trainer
    batch: dict
    state: dict
    stats: dict

    @classmethod
    def build(cls, cfg) -> OurStep:
        trainer = train.setup(cfg, say=lambda _: None)
        local = next(iter(trainer.loader))
        A, R, T = local["tokens"].shape
        stats = {"seq_len": T, "micro_batches": A, "rows": A * R, "target_slots": local["loss_pos"].size,
                 "examples": cfg.train.global_batch_size, "tokens": float(local["n_tokens"]),
                 "targets": float(local["n_targets"]), "slot_utilisation": float(local["n_tokens"]) / (A * R * T),
                 "max_segment_len": trainer.max_segment_len}
        return cls(trainer, parallel.global_batch(trainer.mesh, local), trainer.fresh_state(), stats)

    def __call__(self) -> None:
        self.state, metrics = self.trainer.compiled.train_step(self.state, self.batch)
        jax.block_until_ready(metrics)

    def hlo_text(self) -> str:
        return self.trainer.compiled.train_step.lower(self.state, self.batch).compile().as_text()


def executed_flops(model_cfg: qwen2.Qwen2Config, stats: dict) -> float:
    """`qwen2.executed_train_flops` of the step's slots."""
    return qwen2.executed_train_flops(model_cfg, stats["rows"] * stats["seq_len"],
                                      stats["target_slots"], stats["seq_len"],
                                      stats["max_segment_len"])


def dense_matmul_flops(sizes=(1024, 2048), repeats: int = 5) -> dict:
    """The machine's dense fp32 matmul FLOP/s: median of jnp.dot on square matrices, best size."""
    rates = {}
    for n in sizes:
        a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
        dot = jax.jit(jnp.dot)

        def run(dot=dot, a=a):
            dot(a, a).block_until_ready()

        run()
        rates[n] = 2 * n**3 / common.median([common.seconds(run) for _ in range(repeats)])
    return {"flops_per_s": max(rates.values()), "by_size": rates}


# ----------------------------------------------------------------------------------------------------
# PyTorch + transformers, as upstream trains


def torch_step(ours: OurStep):
    """Upstream's optimizer step over the same examples as `ours` (a blocking callable)."""
    import torch
    import transformers

    from bench import upstream

    trainer = ours.trainer
    cfg = trainer.cfg
    torch.manual_seed(cfg.seed)
    config = transformers.Qwen2Config(**hf.hf_config_dict(trainer.model_cfg, trainer.tokenizer, "float32"))
    model = transformers.Qwen2ForCausalLM(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=(cfg.optim.b1, cfg.optim.b2),
                                  eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
    shared = common.require_shared()
    catalogue = minionerec.load_catalogue(shared / "data", common.CATEGORY)
    tokenizer = upstream.hf_tokenizer(shared / "tokenizers" / "qwen2.5", list(catalogue.sid_tokens))
    ids = trainer.loader.epoch_order(0)[:cfg.train.global_batch_size]
    examples = [trainer.train_data.example(i) for i in ids]
    micro_batches = [upstream.collate(tokenizer, examples[i:i + TORCH_MICRO_BATCH])
                     for i in range(0, len(examples), TORCH_MICRO_BATCH)]
    positions = sum(mb["input_ids"].numel() for mb in micro_batches)

    def step():
        for micro_batch in micro_batches:
            (model(**micro_batch).loss / len(micro_batches)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, {"padded_positions": positions, "micro_batches": len(micro_batches)}


# ----------------------------------------------------------------------------------------------------
# The measurements


def side_by_side(seq_len: int, examples: int, repeats: int, **overrides) -> dict:
    """Our step and upstream's on the same examples, alternated, with one layer's attention timed."""
    ours = OurStep.build(bench_config(seq_len, examples, **overrides))
    ours()  # compile
    attention_times = attention_side_by_side(ours, repeats=5)
    torch_run, torch_stats = torch_step(ours)
    for warm_up in (ours, torch_run):  # first timed calls ran up to 45% (ours) and 30% (torch) slower
        warm_up()
    times = common.alternate({"ours": ours, "torch": torch_run}, repeats)
    ours_s, torch_s = common.median(times["ours"]), common.median(times["torch"])
    comparison = {
        "examples": examples, "tokens": ours.stats["tokens"], "ours_s": times["ours"], "torch_s": times["torch"],
        "torch_padded_positions": torch_stats["padded_positions"], "torch_micro_batches": torch_stats["micro_batches"],
        "ours_examples_per_s": examples / ours_s, "torch_examples_per_s": examples / torch_s,
        "ours_tokens_per_s": ours.stats["tokens"] / ours_s, "torch_tokens_per_s": ours.stats["tokens"] / torch_s,
        "speedup": torch_s / ours_s, "attention": attention_times}
    return comparison


def attention_side_by_side(ours: OurStep, repeats: int) -> dict:
    """One layer's attention, forward + backward, over the rows of the step's first micro-batch (its real
    packing): whole rows (`attention.whole_row`, what the step ran before block-local attention) against
    `attention.packed` with the run's lookback (its bias built once, outside the timing, as the step
    builds it once for all layers)."""
    cfg, local = ours.trainer.model_cfg, next(iter(ours.trainer.loader))
    segment_ids = jnp.asarray(local["segment_ids"][0])
    b, t = segment_ids.shape
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (b, t, cfg.num_kv_heads, cfg.q_per_kv, cfg.head_dim), cfg.dtype)
    k, v = (jax.random.normal(key, (b, t, cfg.num_kv_heads, cfg.head_dim), cfg.dtype) for key in keys[1:3])
    weights = jax.random.normal(keys[3], q.shape, cfg.dtype)
    real = (segment_ids != 0)[:, :, None, None, None]
    bias = attention.packed_bias(segment_ids, ours.trainer.max_segment_len)  # once per batch, as in the step
    forms = {
        "whole_rows": lambda q, k, v: attention.whole_row(q, k, v, visible=attention.visibility(segment_ids),
                                                         dtype=cfg.dtype),
        "packed": lambda q, k, v: attention.packed(q, k, v, bias=bias, dtype=cfg.dtype)}

    def timed(form):
        grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(jnp.where(real, form(q, k, v) * weights, 0.0)),
                                argnums=(0, 1, 2)))
        jax.block_until_ready(grad(q, k, v))
        return lambda: jax.block_until_ready(grad(q, k, v))

    times = common.alternate({name: timed(form) for name, form in forms.items()}, repeats)
    whole, packed = common.median(times["whole_rows"]), common.median(times["packed"])
    return {"rows": b, "seq_len": t, "max_segment_len": ours.trainer.max_segment_len,
            "keys_per_query": attention.keys_per_query(t, ours.trainer.max_segment_len),
            "whole_rows_s": whole, "packed_s": packed, "speedup": whole / packed}


def sweep_row(ours: OurStep, first_s: float, step_s: float, peak: float) -> dict:
    """tokens/s of one (seq_len, examples) point, and its FLOP/s as a fraction of the matmul peak:
    nominal (qwen2.flops_per_token x real tokens, the MFU convention) and executed (`executed_flops`)."""
    model_cfg, stats = ours.trainer.model_cfg, ours.stats
    nominal = qwen2.flops_per_token(model_cfg, stats["seq_len"]) * stats["tokens"] / step_s
    executed = executed_flops(model_cfg, stats) / step_s
    return {**stats, "first_step_s": first_s, "step_s": step_s, "tokens_per_s": stats["tokens"] / step_s,
            "examples_per_s": stats["examples"] / step_s, "nominal_flops_per_s": nominal,
            "executed_flops_per_s": executed, "nominal_fraction_of_matmul_peak": nominal / peak,
            "executed_fraction_of_matmul_peak": executed / peak}


def sweep(points: list[tuple[int, int]], repeats: int, peak: float) -> tuple[list[dict], dict]:
    """Sweep rows of (seq_len, examples) points; the last point is also profiled."""
    rows, profiled = [], None
    for i, (seq_len, examples) in enumerate(points):
        ours = OurStep.build(bench_config(seq_len, examples))
        first_s = common.seconds(ours)
        rows.append(sweep_row(ours, first_s, common.median([common.seconds(ours) for _ in range(repeats)]), peak))
        if i == len(points) - 1:
            profiled = profile.profile(ours, ours.hlo_text())
    return rows, profiled


def peak_memory(seq_len: int, examples: int, steps: int) -> dict:
    """Run in a fresh process: setup + `steps` training steps; this process's peak RSS."""
    ours = OurStep.build(bench_config(seq_len, examples))
    for _ in range(steps):
        ours()
    return {"seq_len": seq_len, "examples": examples, "steps": steps, "peak_rss_mb": common.peak_rss_mb()}


def report(side: dict | None, rows: list[dict], peak: dict, profiled: dict | None, memory: dict | None) -> str:
    lines = [f"dense fp32 matmul (jnp.dot): {peak['flops_per_s'] / 1e9:.1f} GFLOP/s"]
    if side:
        lines.append(common.table([
            {"what": "sidrec step (jit, packed)", "eps": side["ours_examples_per_s"], "tps": side["ours_tokens_per_s"],
             "s": common.median(side["ours_s"])},
            {"what": "PyTorch + transformers (upstream padding)", "eps": side["torch_examples_per_s"],
             "tps": side["torch_tokens_per_s"], "s": common.median(side["torch_s"])},
        ], [("what", f"one step of {side['examples']} examples", ""), ("eps", "examples/s", ".2f"),
            ("tps", "tokens/s", ".0f"), ("s", "median s", ".2f")]))
        lines.append(f"speedup {side['speedup']:.2f}x (goal >= 8x)")
        a = side["attention"]
        lines.append(f"one layer's attention fwd+bwd over its {a['rows']} rows of {a['seq_len']}: whole rows "
                     f"{a['whole_rows_s'] * 1e3:.0f} ms, block-local ({a['keys_per_query']:.0f} keys/query, "
                     f"examples <= {a['max_segment_len']}) {a['packed_s'] * 1e3:.0f} ms: {a['speedup']:.2f}x")
    lines.append(common.table(rows, [
        ("seq_len", "seq_len", "d"), ("examples", "examples", "d"), ("rows", "rows", "d"),
        ("targets", "targets", ".0f"), ("target_slots", "target slots", "d"), ("tokens_per_s", "tokens/s", ".0f"),
        ("step_s", "step s", ".2f"), ("first_step_s", "first step s", ".1f"),
        ("nominal_fraction_of_matmul_peak", "nominal/peak", ".0%"),
        ("executed_fraction_of_matmul_peak", "executed/peak", ".0%")]))
    if profiled:
        total = profiled["op_ms"]
        parts = ", ".join(f"{name} {ms / total:.0%}" for name, ms in list(profiled["parts_ms"].items())[:6])
        lines.append(f"profile of the last row: {parts}; matmuls {profiled['matmul_share']:.0%} of op time")
    if memory:
        lines.append(f"training peak RSS: {memory['peak_rss_mb']:.0f} MB ({memory['examples']} examples/step, "
                     f"rows of {memory['seq_len']})")
    return "\n".join(lines)


def main(side_by_side_examples: int = 16, seq_len: int = 1024, repeats: int = 5, sweep_repeats: int = 2,
         examples_sweep: tuple[int, ...] = (8, 32), seq_len_sweep: tuple[int, ...] = (512, 2048),
         memory_child: bool = False, reused_memory_child: bool = False, sweep_child: bool = False) -> None:
    """Side by side with PyTorch (needs torch), again in a process with `REUSE_MEMORY_ENV`, the tokens/s
    sweep (the side-by-side point plus `examples_sweep` at `seq_len` and `seq_len_sweep` at
    `side_by_side_examples`), FLOP/s against the matmul peak with a profile of the largest point, and
    the training peak RSS (a fresh process).

    memory_child: internal; measure only the training peak RSS here and print its JSON.
    reused_memory_child: internal; only the two side-by-side comparisons, as JSON (run with REUSE_MEMORY_ENV).
    sweep_child: internal; only the matmul peak, the sweep and its profile, as JSON.

    The sweep, its profile and the peak RSS run as `cli.py` runs (in processes with
    `hugepages.huge_page_env`, which cli.py re-executes itself with); the side-by-side comparisons in
    this process's environment, the same for both sides.
    """
    if memory_child:
        print(json.dumps(peak_memory(seq_len, side_by_side_examples, steps=1)))
        return
    points = {(seq_len, n) for n in examples_sweep} | {(t, side_by_side_examples) for t in seq_len_sweep}
    points.add((seq_len, side_by_side_examples))
    if sweep_child:
        peak = dense_matmul_flops()
        rows, profiled = sweep(sorted(points, key=lambda p: (p[1], p[0])), sweep_repeats, peak["flops_per_s"])
        print(json.dumps({"matmul_peak": peak, "sweep": rows, "profile_of_largest": profiled}))
        return
    if reused_memory_child:
        pairs = {"bench": side_by_side(seq_len, side_by_side_examples, repeats),
                 "second": side_by_side(seq_len, 32, repeats, **SECOND)}
        print(json.dumps({name: {key: pair[key] for key in ("ours_s", "torch_s", "speedup")}
                          for name, pair in pairs.items()}))
        return
    skipped = {}
    side, second, reused = None, None, None
    try:
        common.require_torch()
        side = side_by_side(seq_len, side_by_side_examples, repeats)
        second = side_by_side(seq_len, 32, repeats, **SECOND)
        reused = common.run_module("bench.train_speed", "--reused-memory-child", "--repeats", str(repeats),
                                   "--seq-len", str(seq_len), "--side-by-side-examples", str(side_by_side_examples),
                                   env=REUSE_MEMORY_ENV, timeout=2400)
    except common.BenchUnavailable as reason:
        skipped["side_by_side"] = str(reason)
    as_cli = hugepages.huge_page_env(os.environ)
    sizes = ("--seq-len", str(seq_len), "--side-by-side-examples", str(side_by_side_examples))
    swept = common.run_module("bench.train_speed", "--sweep-child", "--sweep-repeats", str(sweep_repeats),
                              "--examples-sweep", *map(str, examples_sweep), "--seq-len-sweep",
                              *map(str, seq_len_sweep), *sizes, env=as_cli, timeout=2400)
    peak, rows, profiled = swept["matmul_peak"], swept["sweep"], swept["profile_of_largest"]
    memory = common.run_module("bench.train_speed", "--memory-child", *sizes, env=as_cli)
    settings = {"model": "industrial-cpu preset architecture (hidden 128, 2 layers, 4 heads, 2 kv heads) with "
                "the Qwen2.5 + SID vocabulary (152225, padded to 152320), fp32",
                "data": f"{common.CATEGORY}, five-task training mixture", "torch_micro_batch": TORCH_MICRO_BATCH,
                "second_model": SECOND_DESCRIPTION, "reused_memory_env": REUSE_MEMORY_ENV,
                "sweep_env": as_cli, "skipped": skipped}
    common.write_result("train_speed", settings, {"matmul_peak": peak, "side_by_side": side,
                                                  "side_by_side_second": second,
                                                  "side_by_side_reused_memory": reused, "sweep": rows,
                                                  "profile_of_largest": profiled, "memory": memory})
    print(report(side, rows, peak, profiled, memory))
    if second:
        print(f"{SECOND_DESCRIPTION}, 32 examples: ours {second['ours_examples_per_s']:.2f} examples/s, torch "
              f"{second['torch_examples_per_s']:.2f}: speedup {second['speedup']:.2f}x (goal >= 8x)")
    if reused:
        print(render_readme.reused_memory_line(reused, {"bench": side, "second": second}, REUSE_MEMORY_ENV))
    for name, reason in skipped.items():
        print(f"skipped {name}: {reason}")


if __name__ == "__main__":
    import tyro

    tyro.cli(main)
