"""Eval throughput: our jitted trie-constrained beam search vs transformers `generate` with upstream's
constraint processor, on the same random Qwen2 with the real vocabulary (Qwen2.5 + Industrial SID tokens
= 152225 rows) and the same Industrial test prompts: the tiny model of tests/fixtures/make_beam_fixtures.py
(hidden 32, where the vocabulary dominates) and a larger one drawn the same way (hidden 896, 4 layers,
where the transformer body weighs in).

    python -m bench.eval_speed                 # side by side (needs torch), the floor, the full test set
    python -m bench.eval_speed --no-side-by-side

Side by side: 50 beams, 8 prompts per call, both sides in one process, repeats interleaved; the
figure is the ratio of median prompts/s. Our first call (compilation) is timed separately.

Floor (tiny model): the work no beam search can skip, timed from this machine's rates for those
primitives alone: the prompt prefill (our jitted prefill alone), and per step and running beam the
head matmul over the real vocabulary and one exp per vocabulary entry (the best rates of `jnp.dot` and
`jnp.exp` alone on [beams, width] blocks, widths 1k..8k). Our time is reported
as the floor's fraction of it, with the profile's ops next to the floor's parts.

Then, in a fresh process (its own peak RSS), our search over the whole test split: prompts/s with and
without compilation, the number of compilations, peak memory.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from bench import common, profile
from sidrec import evaluate
from sidrec.data import minionerec
from sidrec.decode import beam, trie as trie_lib
from sidrec.model import hf, qwen2
from sidrec.tokenizer import TokenizerInfo, add_sid_tokens, load_tokenizer

NUM_BEAMS = 50
BATCH_SIZE = 8
UPSTREAM_MAX_NEW_TOKENS = 256  # upstream's evaluate.py; generation stops once every beam is finished


@dataclasses.dataclass(frozen=True)
class Ours:
    params: dict
    model_cfg: object
    tokenizer: TokenizerInfo
    trie: trie_lib.SidTrie
    examples: list


def model_config(name: str) -> dict:
    """HF config.json of the bench's models: "tiny" is the fixture's; "larger" has Qwen2.5-0.5B's width
    (hidden 896, 14 / 2 heads, MLP 4864) with 4 layers, the same vocabulary and the same weight draw."""
    tiny = common.load_fixture_module("make_beam_fixtures").HF_CONFIG
    if name == "tiny":
        return tiny
    return tiny | {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 4,
                   "num_attention_heads": 14, "num_key_value_heads": 2}


def describe(config: dict) -> str:
    return (f"hidden {config['hidden_size']}, {config['num_hidden_layers']} layers, "
            f"{config['num_attention_heads']}/{config['num_key_value_heads']} heads, vocab {config['vocab_size']}, fp32")


def model_dir(name: str = "tiny") -> Path:
    """The random Qwen2 as a Hugging Face directory (written once into the work dir)."""
    directory = common.WORK_DIR / f"{name}-qwen2-industrial"
    if not (directory / "model.safetensors").is_file():
        common.load_fixture_module("make_beam_fixtures").write_checkpoint(directory, model_config(name))
    return directory


def load_ours(name: str = "tiny") -> Ours:
    shared = common.require_shared()
    params, model_cfg = hf.load_model(model_dir(name))
    catalogue = minionerec.load_catalogue(shared / "data", common.CATEGORY)
    tokenizer = add_sid_tokens(load_tokenizer(shared / "tokenizers" / "qwen2.5"), catalogue.sid_tokens)
    trie = trie_lib.build_trie(catalogue.sid_tokens_of.values(), tokenizer)
    return Ours(params, model_cfg, tokenizer, trie, minionerec.eval_examples(catalogue, "test", tokenizer))


def search(ours: Ours, batches: list[evaluate.PromptBatch]) -> np.ndarray:
    """Generated suffixes [calls, batch, W, G] of every batch (blocks until done)."""
    return np.stack([np.asarray(beam.beam_search(ours.params, ours.model_cfg, ours.trie, b.tokens, b.mask,
                                                 num_beams=NUM_BEAMS)[0]) for b in batches])


# ----------------------------------------------------------------------------------------------------
# Side by side


def upstream_generate(prompts: list[np.ndarray], name: str = "tiny"):
    """A function running transformers generate + upstream's processor over `prompts` in batches of 8;
    it returns upstream's predict strings [n, W] and the seconds spent inside the processor."""
    import torch
    import transformers

    from bench import upstream

    fixture = common.load_fixture_module("make_beam_fixtures")
    shared = common.require_shared()
    hf_config = model_config(name)
    config = transformers.Qwen2Config(**{k: v for k, v in hf_config.items() if k != "architectures"})
    model = transformers.Qwen2ForCausalLM(config).eval()
    model.load_state_dict({k: torch.tensor(v) for k, v in fixture.tiny_state_dict(config=hf_config).items()},
                          strict=False)
    model.tie_weights()
    sids = upstream.info_sids(shared / "data", common.CATEGORY)
    tokenizer = upstream.hf_tokenizer(shared / "tokenizers" / "qwen2.5",
                                      sorted({"<" + t for s in sids for t in s.split("<")[1:]}))
    eos = tokenizer.eos_token_id
    allowed = upstream.allowed_tokens_table(sids, lambda text: tokenizer(text).input_ids, eos)
    generation = transformers.GenerationConfig(
        num_beams=NUM_BEAMS, num_return_sequences=NUM_BEAMS, length_penalty=0.0, do_sample=False,
        max_new_tokens=UPSTREAM_MAX_NEW_TOKENS, pad_token_id=eos, eos_token_id=eos, top_k=None, top_p=None)

    def run() -> tuple[list[list[str]], float]:
        """(predict strings per prompt, seconds spent inside upstream's processor)."""
        predicts, processor_s = [], 0.0
        for start in range(0, len(prompts), BATCH_SIZE):
            batch = prompts[start:start + BATCH_SIZE]
            width = max(map(len, batch))
            tokens = torch.tensor([[eos] * (width - len(p)) + p.tolist() for p in batch])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
            constraint = upstream.UpstreamConstraint(allowed, NUM_BEAMS)
            with torch.no_grad():
                out = model.generate(tokens, attention_mask=mask, generation_config=generation,
                                     logits_processor=transformers.LogitsProcessorList([constraint]))
            processor_s += constraint.seconds
            texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
            texts = [text.split("Response:\n")[-1].strip() for text in texts]
            predicts += [texts[i:i + NUM_BEAMS] for i in range(0, len(texts), NUM_BEAMS)]
        return predicts, processor_s

    return run


def side_by_side(ours: Ours, num_prompts: int, repeats: int, name: str = "tiny") -> dict:
    prompts = [e.prompt_ids for e in ours.examples[:num_prompts]]
    batches = evaluate.batch_prompts(prompts, BATCH_SIZE, ours.tokenizer.pad_id)
    compile_s = common.seconds(lambda: search(ours, batches[:1]))
    hf_run = upstream_generate(prompts, name)
    results = {"ours": None, "hf": None}

    def ours_run():
        results["ours"] = search(ours, batches)

    def hf_timed():
        results["hf"] = hf_run()

    times = common.alternate({"ours": ours_run, "hf": hf_timed}, repeats)
    ours_predicts = evaluate.decode_predictions(results["ours"].reshape(-1, *results["ours"].shape[2:]),
                                            ours.tokenizer)
    indices = np.concatenate([b.indices for b in batches])
    ours_by_prompt = {int(i): p for i, p in zip(indices, ours_predicts) if i >= 0}
    hf_predicts, processor_s = results["hf"]
    same_top1 = np.mean([ours_by_prompt[i][0] == hf_predicts[i][0] for i in range(len(prompts))])
    same_all = np.mean([ours_by_prompt[i] == hf_predicts[i] for i in range(len(prompts))])
    ours_s, hf_s = common.median(times["ours"]), common.median(times["hf"])
    one_call = batches[:1]
    hlo = beam.beam_search.lower(ours.params, ours.model_cfg, ours.trie, one_call[0].tokens, one_call[0].mask,
                                 num_beams=NUM_BEAMS).compile().as_text()
    return {
        "model": describe(model_config(name)), "prompts": len(prompts), "calls": len(batches), "repeats": repeats,
        "ours_first_call_s": compile_s, "ours_s": times["ours"], "hf_s": times["hf"],
        "ours_prompts_per_s": len(prompts) / ours_s, "hf_prompts_per_s": len(prompts) / hf_s,
        "speedup": hf_s / ours_s, "hf_processor_share": processor_s / times["hf"][-1],
        "top1_agreement": float(same_top1), "all_50_agreement": float(same_all),
        "ours_profile_one_call": profile.profile(lambda: search(ours, one_call), hlo),
    }


# ----------------------------------------------------------------------------------------------------
# The floor


def _call_s(fn, repeats: int = 10) -> float:
    """Median seconds of one blocking call of fn (run once first: compilation)."""
    jax.block_until_ready(fn())
    return common.median([common.seconds(lambda: jax.block_until_ready(fn())) for _ in range(repeats)])


def primitive_rates(rows: int, dim: int) -> tuple[float, float]:
    """(seconds per matmul FLOP, seconds per exp) of `jnp.dot` [rows, dim] x [dim, width] and `jnp.exp`
    [rows, width] alone, each at its fastest width (blocks from L2-sized to the chunk we work in)."""
    rng = np.random.default_rng(0)
    dot, exp = jax.jit(jnp.dot), jax.jit(jnp.exp)
    flop_s, exp_s = [], []
    for width in (1024, 2048, 4096, 8192):
        hidden, head, logits = (jnp.asarray(rng.normal(size=shape), jnp.float32)
                                for shape in ((rows, dim), (dim, width), (rows, width)))
        flop_s.append(_call_s(lambda a=hidden, b=head: dot(a, b), 30) / (2 * rows * dim * width))
        exp_s.append(_call_s(lambda x=logits: exp(x), 30) / (rows * width))
    return min(flop_s), min(exp_s)


def floor(ours: Ours) -> dict:
    """One beam-search call (8 prompts) against the work it cannot skip, timed from primitive rates."""
    cfg, steps = ours.model_cfg, ours.trie.num_steps
    batch = evaluate.batch_prompts([e.prompt_ids for e in ours.examples[:BATCH_SIZE]], BATCH_SIZE,
                                   ours.tokenizer.pad_id)[0]
    d, v, rows = cfg.hidden_size, cfg.real_vocab_size, BATCH_SIZE * NUM_BEAMS
    s_per_flop, s_per_exp = primitive_rates(rows, d)
    prefill = jax.jit(qwen2.prefill, static_argnums=1, static_argnames=("num_beams", "max_new_tokens"))
    prefill_s = _call_s(lambda: prefill(ours.params, cfg, batch.tokens, batch.mask, num_beams=NUM_BEAMS,
                                        max_new_tokens=steps - 1))
    beam_rows = BATCH_SIZE + (steps - 1) * rows  # step 0 continues one beam per prompt
    parts = {"prefill": prefill_s, "head matmul": beam_rows * 2 * d * v * s_per_flop,
             "exp": beam_rows * v * s_per_exp}
    ours_s = _call_s(lambda: search(ours, [batch]))
    hlo = beam.beam_search.lower(ours.params, cfg, ours.trie, batch.tokens, batch.mask,
                                 num_beams=NUM_BEAMS).compile().as_text()
    floor_s = sum(parts.values())
    return {
        "prompts_per_call": BATCH_SIZE, "steps": steps, "beam_rows": beam_rows,
        "matmul_gflop_per_s": 1e-9 / s_per_flop, "exp_ns": 1e9 * s_per_exp, "floor_parts_s": parts,
        "floor_s": floor_s, "ours_s": ours_s, "fraction_of_floor": floor_s / ours_s,
        "floor_prompts_per_s": BATCH_SIZE / floor_s,
        "ours_profile_one_call": profile.profile(lambda: search(ours, [batch]), hlo, repeats=3),
    }


# ----------------------------------------------------------------------------------------------------
# The full test split (run in a fresh process)


def full_test_set(batch_size: int, max_prompts: int) -> dict:
    ours = load_ours()
    if max_prompts > 0:
        ours = dataclasses.replace(ours, examples=ours.examples[:max_prompts])
    batches = evaluate.batch_prompts([e.prompt_ids for e in ours.examples], batch_size, ours.tokenizer.pad_id)
    started = time.perf_counter()
    compiled, steady_s, steady_prompts, call_s = set(), 0.0, 0, []
    for batch in batches:
        call_s.append(common.seconds(lambda batch=batch: search(ours, [batch])))
        if batch.tokens.shape[1] in compiled:  # the first call of a length bucket compiles
            steady_s += call_s[-1]
            steady_prompts += int((batch.indices >= 0).sum())
        compiled.add(batch.tokens.shape[1])
    total_s = time.perf_counter() - started
    n = len(ours.examples)
    return {
        "prompts": n, "batch_size": batch_size, "calls": len(batches), "length_buckets": sorted(compiled),
        "compilations": beam.beam_search._cache_size(), "total_s": total_s,
        "prompts_per_s": n / total_s,
        "prompts_per_s_after_compile": steady_prompts / steady_s if steady_s else None,
        "median_call_s": common.median(call_s), "peak_rss_mb": common.peak_rss_mb(),
    }


def report(side: dict | None, larger: dict | None, bound: dict | None, full: dict | None) -> str:
    lines = []
    for result in (side, larger):
        if not result:
            continue
        lines.append(f"{result['model']}:")
        lines.append(common.table([
            {"what": "sidrec beam_search (jit)", "pps": result["ours_prompts_per_s"], "s": common.median(result["ours_s"])},
            {"what": "transformers generate + upstream processor", "pps": result["hf_prompts_per_s"],
             "s": common.median(result["hf_s"])},
        ], [("what", "constrained, 50 beams, batch 8", ""), ("pps", "prompts/s", ".2f"), ("s", "median s", ".2f")]))
        lines.append(f"speedup {result['speedup']:.1f}x on {result['prompts']} prompts (goal >= 20x); same top-1 "
                     f"{result['top1_agreement']:.0%}, same 50 predictions {result['all_50_agreement']:.0%}")
    if bound:
        parts = ", ".join(f"{k} {1e3 * v:.0f} ms" for k, v in bound["floor_parts_s"].items())
        ops = ", ".join(f"{k} {v:.0f} ms" for k, v in profile.ops_by_source(bound["ours_profile_one_call"]).items())
        lines.append(f"floor of one call: {1e3 * bound['floor_s']:.0f} ms ({parts}); ours {1e3 * bound['ours_s']:.0f} ms "
                     f"= {bound['fraction_of_floor']:.0%} of the floor's speed; our ops: {ops}")
    if full:
        lines.append(f"test split: {full['prompts']} prompts in {full['total_s']:.0f} s = "
                     f"{full['prompts_per_s']:.1f} prompts/s ({full['prompts_per_s_after_compile']:.1f} after "
                     f"compilation), {full['compilations']} compilation(s) for buckets {full['length_buckets']}, "
                     f"peak RSS {full['peak_rss_mb']:.0f} MB")
    return "\n".join(lines)


def main(side_by_side_prompts: int = 16, repeats: int = 3, larger_prompts: int = 8, larger_repeats: int = 2,
         full_batch_size: int = BATCH_SIZE, full_max_prompts: int = -1, run_side_by_side: bool = True,
         run_full_test_set: bool = True, child: bool = False) -> None:
    """Side by side with transformers (needs torch) on the tiny and the larger model, the floor, then the
    test split in a fresh process.

    larger_prompts: prompts for the larger model's side by side (0: skip it).
    full_max_prompts: only the first prompts of the test split (-1: all 4533).
    child: internal; run only the test split here and print its JSON.
    """
    if child:
        print(json.dumps(full_test_set(full_batch_size, full_max_prompts)))
        return
    # The child first: Linux carries a forking process's peak RSS into the child (execve keeps maxrss).
    full = None
    if run_full_test_set:
        full = common.run_module("bench.eval_speed", "--child", "--full-batch-size", str(full_batch_size),
                                 "--full-max-prompts", str(full_max_prompts))
    side = larger = None
    skipped = {}
    ours = load_ours()
    bound = floor(ours)
    if run_side_by_side:
        try:
            common.require_torch()
            side = side_by_side(ours, side_by_side_prompts, repeats)
            if larger_prompts:
                larger = side_by_side(load_ours("larger"), larger_prompts, larger_repeats, "larger")
        except common.BenchUnavailable as reason:
            skipped["side_by_side"] = str(reason)
    settings = {"num_beams": NUM_BEAMS, "batch_size": BATCH_SIZE, "model": "tests/fixtures/make_beam_fixtures.py "
                f"tiny Qwen2 ({describe(model_config('tiny'))})", "larger_model": describe(model_config("larger")),
                "category": common.CATEGORY, "upstream_max_new_tokens": UPSTREAM_MAX_NEW_TOKENS,
                "side_by_side_prompts": side_by_side_prompts, "repeats": repeats, "larger_prompts": larger_prompts,
                "larger_repeats": larger_repeats, "full_max_prompts": full_max_prompts, "skipped": skipped}
    common.write_result("eval_speed", settings, {"side_by_side": side, "larger_model": larger, "floor": bound,
                                                 "full_test_set": full})
    print(report(side, larger, bound, full))
    for name, reason in skipped.items():
        print(f"skipped {name}: {reason}")


if __name__ == "__main__":
    import tyro

    tyro.cli(main)
