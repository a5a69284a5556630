"""The README's performance section, generated from bench/results/*.json.

    python -m bench.render_readme

Writes bench/README_SECTION.md and, when README.md holds the markers below, replaces the text between
them, so the README's figures are always those of the latest JSON files.
"""

from __future__ import annotations

from pathlib import Path

from bench import common, profile

START, END = "<!-- bench:start -->", "<!-- bench:end -->"
README = common.ROOT / "README.md"
SECTION = Path(__file__).resolve().parent / "README_SECTION.md"


def verdict(value: float, goal: float) -> str:
    return "met" if value >= goal else "not met"


def goals(eval_r: dict | None, train_r: dict | None) -> list[str]:
    rows = []
    res = eval_r and eval_r["results"]
    side, bound = res and res["side_by_side"], res and res.get("floor")
    if side:
        rows.append({"goal": "eval: beam search vs transformers generate >= 20x", "value": f"{side['speedup']:.1f}x",
                     "verdict": verdict(side["speedup"], 20)})
    if side and bound:
        ceiling = bound["floor_prompts_per_s"] / side["hf_prompts_per_s"]
        # The alternative goal counts only where the floor itself rules 20x out.
        met = side["speedup"] >= 20 or (ceiling < 20 and bound["fraction_of_floor"] >= 0.8)
        rows.append({"goal": "eval: or >= 80% of the floor's speed where the floor rules 20x out",
                     "value": f"{bound['fraction_of_floor']:.0%} of the floor; the floor allows {ceiling:.1f}x",
                     "verdict": "met" if met else "not met"})
    reused = (train_r and train_r["results"].get("side_by_side_reused_memory")) or {}
    for key, name, label in (("side_by_side", "bench", "bench model"),
                             ("side_by_side_second", "second", "hidden 256, 4 layers, sid_sft")):
        side = train_r and train_r["results"].get(key)
        if side:
            also = f" ({reused[name]['speedup']:.2f}x with glibc reusing memory)" if name in reused else ""
            rows.append({"goal": f"train: step vs PyTorch loop >= 8x ({label})",
                         "value": f"{side['speedup']:.2f}x{also}", "verdict": verdict(side["speedup"], 8)})
    if train_r:
        largest = train_r["results"]["sweep"][-1]
        rows.append({"goal": "train: FLOP/s >= 50% of measured matmul FLOP/s (largest CPU config)",
                     "value": f"{largest['executed_fraction_of_matmul_peak']:.0%} executed "
                              f"({largest['nominal_fraction_of_matmul_peak']:.0%} nominal)",
                     "verdict": verdict(largest["executed_fraction_of_matmul_peak"], 0.5)})
    if not rows:
        return []
    return ["### Goals", "", common.table(rows, [("goal", "goal", ""), ("value", "measured", ""),
                                                 ("verdict", "", "")]), ""]


def _side_by_side_lines(side: dict, label: str) -> list[str]:
    return [common.table([
        {"what": "sidrec `beam_search` (one jit)", "pps": side["ours_prompts_per_s"]},
        {"what": "transformers `generate` + upstream constraint processor", "pps": side["hf_prompts_per_s"]},
    ], [("what", f"{label}: same {side['prompts']} prompts, median of {side['repeats']}", ""),
        ("pps", "prompts/s", ".2f")]), "",
        f"Speedup **{side['speedup']:.1f}x**; the two agree on {side['top1_agreement']:.0%} of top-1 and "
        f"{side['all_50_agreement']:.0%} of the full 50-prediction lists; transformers spends "
        f"{side['hf_processor_share']:.0%} of its time in upstream's processor.", ""]


def eval_section(r: dict) -> list[str]:
    res = r["results"]
    side, larger, bound, full = res["side_by_side"], res.get("larger_model"), res.get("floor"), res["full_test_set"]
    out = ["### Evaluation: constrained beam search, 50 beams, batch 8", "",
           f"Models: {r['settings']['model']}, and a larger one drawn the same way "
           f"({r['settings'].get('larger_model', '-')}); {r['settings']['category']} test prompts.", ""]
    if side:
        out += _side_by_side_lines(side, "tiny model")
    if larger:
        out += _side_by_side_lines(larger, "larger model")
    if bound:
        parts = bound["floor_parts_s"]
        ops = eval_ops(bound["ours_profile_one_call"])
        out += [f"Floor of one call (8 prompts, {bound['steps']} steps, {bound['beam_rows']} beam rows through the "
                f"head), tiny model: the prefill alone plus the head matmul and one exp per vocabulary entry per "
                f"beam row, at this machine's best rates for `jnp.dot` ({bound['matmul_gflop_per_s']:.0f} GFLOP/s) "
                f"and `jnp.exp` ({bound['exp_ns']:.2f} ns) alone.", "",
                common.table([{"what": k, "ms": 1e3 * v} for k, v in parts.items()]
                             + [{"what": "**floor**", "ms": 1e3 * bound["floor_s"]},
                                {"what": "**sidrec beam_search**", "ms": 1e3 * bound["ours_s"]}],
                             [("what", "one call", ""), ("ms", "ms", ".0f")]), "",
                f"Ours runs at **{bound['fraction_of_floor']:.0%}** of the floor's speed; at the floor itself it "
                f"would do {bound['floor_prompts_per_s']:.1f} prompts/s"
                + (f", {bound['floor_prompts_per_s'] / side['hf_prompts_per_s']:.1f}x transformers" if side else "")
                + f". Our ops, one call profiled (ms): {ops}.", ""]
    if full:
        out += [f"Test split, its first {full['prompts']} prompts (`python -m bench.eval_speed` alone runs all of "
                f"them): {full['prompts_per_s']:.1f} prompts/s including "
                f"compilation ({full['total_s']:.0f} s), {full['prompts_per_s_after_compile']:.1f} prompts/s after; "
                f"{full['compilations']} compilation(s) for prompt-length buckets {full['length_buckets']}; "
                f"peak RSS {full['peak_rss_mb']:.0f} MB.", ""]
    return out


def eval_ops(profile_result: dict) -> str:
    return ", ".join(f"`{name}` {ms:.0f}" for name, ms in profile.ops_by_source(profile_result).items())


def sweep_env_sentence(env: dict | None) -> str:
    """How the sweep's processes ran: as cli.py runs (sidrec.hugepages), which the side-by-side does not."""
    if not env:
        return " The sweep ran in this machine's default environment (no huge-page tunable applies here)."
    return (" The sweep and its profile ran as `cli.py` runs, with `" + " ".join(f"{k}={v}" for k, v in env.items())
            + "` (`sidrec.hugepages`: transparent huge pages for XLA's per-step temporaries); the side-by-side "
            "comparisons above ran without it, for both sides.")


def reused_memory_line(reused: dict, default: dict, env: dict) -> str:
    """Both contenders again with glibc reusing freed memory (`env`: train_speed.REUSE_MEMORY_ENV),
    against the default allocator's side-by-side run."""
    parts = []
    for name, label in (("bench", "bench model"), ("second", "second configuration")):
        ours, torch = common.median(reused[name]["ours_s"]), common.median(reused[name]["torch_s"])
        ours_default, torch_default = common.median(default[name]["ours_s"]), common.median(default[name]["torch_s"])
        parts.append(f"{label}: ours {ours:.2f} s ({ours / ours_default - 1:+.0%}), PyTorch {torch:.2f} s "
                     f"({torch / torch_default - 1:+.0%}), speedup {reused[name]['speedup']:.2f}x")
    return ("With glibc reusing freed memory (`" + " ".join(f"{k}={v}" for k, v in env.items())
            + "`, both in one process; change against the default allocator's run above): " + "; ".join(parts) + ".")


def train_section(r: dict) -> list[str]:
    res = r["results"]
    side, rows, peak = res["side_by_side"], res["sweep"], res["matmul_peak"]
    out = ["### Training step", "", f"Model: {r['settings']['model']}; data: {r['settings']['data']}.", ""]
    if side:
        out += [common.table([
            {"what": "sidrec step (packed rows, logits at targets)", "eps": side["ours_examples_per_s"],
             "tps": side["ours_tokens_per_s"]},
            {"what": f"PyTorch + transformers (upstream padding, micro-batch {r['settings']['torch_micro_batch']})",
             "eps": side["torch_examples_per_s"], "tps": side["torch_tokens_per_s"]},
        ], [("what", f"one AdamW step, same {side['examples']} examples", ""), ("eps", "examples/s", ".2f"),
            ("tps", "tokens/s", ".0f")]), "", f"Speedup **{side['speedup']:.2f}x**.", ""]
    a = side.get("attention")
    if a:
        out += [f"Attention of one layer, forward + backward, over the step's {a['rows']} packed rows of "
                f"{a['seq_len']}: over whole rows {a['whole_rows_s'] * 1e3:.0f} ms; block-local "
                f"(sidrec.model.attention.packed: {a['keys_per_query']:.0f} keys per query, enough for the "
                f"longest example, {a['max_segment_len']} tokens) {a['packed_s'] * 1e3:.0f} ms, "
                f"**{a['speedup']:.2f}x**.", ""]
    second = res.get("side_by_side_second")
    if second:
        out += [f"Second configuration ({r['settings']['second_model']}), {second['examples']} examples a step: "
                f"ours {second['ours_examples_per_s']:.2f} examples/s, PyTorch {second['torch_examples_per_s']:.2f}; "
                f"speedup **{second['speedup']:.2f}x**.", ""]
    reused = res.get("side_by_side_reused_memory")
    if reused and side and second:
        out += [reused_memory_line(reused, {"bench": side, "second": second}, r["settings"]["reused_memory_env"]), ""]
    out += [f"Cost against batch and row length; FLOP/s as a fraction of this machine's dense fp32 matmul "
            f"({peak['flops_per_s'] / 1e9:.1f} GFLOP/s, `jnp.dot`). *Nominal* counts "
            "`qwen2.flops_per_token` (6N + attention) per real token, the MFU convention; *executed* counts "
            "what the step computes (every row slot, the vocabulary head only at target slots, 4x forward there: "
            "the chunked loss recomputes its logits in the backward; attention's scores 3.5x forward: its "
            "backward recomputes them)." + sweep_env_sentence(r["settings"].get("sweep_env")), "",
            common.table(rows, [
                ("seq_len", "row length", "d"), ("examples", "examples/step", "d"), ("rows", "rows", "d"),
                ("targets", "targets", ".0f"), ("target_slots", "target slots", "d"), ("tokens_per_s", "tokens/s", ".0f"),
                ("step_s", "step s", ".2f"), ("first_step_s", "first step s (compile)", ".1f"),
                ("nominal_fraction_of_matmul_peak", "nominal / peak", ".0%"),
                ("executed_fraction_of_matmul_peak", "executed / peak", ".0%")]), ""]
    prof = res["profile_of_largest"]
    if prof:
        parts = ", ".join(f"{name} {ms / prof['op_ms']:.0%}" for name, ms in list(prof["parts_ms"].items())[:6])
        out += [f"Profile of the largest configuration (share of op time): {parts}; matmuls are "
                f"{prof['matmul_share']:.0%} of it.", ""]
    if res["memory"]:
        m = res["memory"]
        out += [f"Training peak RSS: {m['peak_rss_mb']:.0f} MB ({m['examples']} examples/step, rows of "
                f"{m['seq_len']}).", ""]
    return out


def muon_section(r: dict) -> list[str]:
    s = r["settings"]
    return ["### Muon overhead", "", f"Same model, {s['examples']} examples in rows of {s['seq_len']}.", "",
            common.table(r["results"]["optimizers"], [
                ("optimizer", "optimizer", ""), ("step_s", "step s", ".2f"), ("step_ratio", "step / AdamW", ".2f"),
                ("update_s", "update alone s", ".3f"), ("update_ratio", "update / AdamW", ".2f")]), ""]


def scale_section(r: dict) -> list[str]:
    res = r["results"]
    step, seed = res["step"], res["seed"]
    return ["### At scale: Qwen2.5-1.5B, global batch 1024, TPU v6e-8 (estimate)", "",
            f"One optimizer step on the Industrial mixture packs {step['tokens']:,.0f} real tokens into "
            f"{step['rows']:.0f} rows of {res['seq_len']} ({step['token_slots']:,.0f} slots) with "
            f"{step['targets']:,.0f} loss targets ({step['target_slots']:,.0f} target slots).", "",
            common.table([
                {"what": f"seed port (every row padded to {seed['row_length']}, full logits)",
                 "tflop": seed["flops_per_step"] / 1e12,
                 "time": f"{seed['step_s']:.2f} s measured ({seed['mfu']:.0%} MFU)"},
                {"what": "sidrec (packing, logits at targets, remat, block-local attention)",
                 "tflop": res["executed_flops_per_step"] / 1e12,
                 "time": ", ".join(f"{t:.2f} s at {u}" for u, t in res["step_s_at"].items())},
                {"what": "sidrec, `--model.attention splash`",
                 "tflop": res["executed_flops_per_step_splash"] / 1e12,
                 "time": ", ".join(f"{t:.2f} s at {u}" for u, t in res["step_s_at_splash"].items())},
            ], [("what", "per optimizer step", ""), ("tflop", "TFLOP", ".0f"), ("time", "step time", "")]), "",
            f"Attention looks back at most {step['max_segment_len']} tokens (the longest example); over whole "
            f"rows the step would execute {res['executed_flops_per_step_whole_rows'] / 1e12:.0f} TFLOP. Splash "
            "skips the kernel's blocks beyond the diagonal and the lookback (compiled here only in Pallas' "
            "interpret mode; not run on a TPU).", "",
            f"Work ratio seed / ours {res['work_ratio_seed_over_ours']:.1f}x; implied speedup over the seed "
            + ", ".join(f"{x:.1f}x at {u}" for u, x in res["speedup_over_seed_at"].items()) + " utilisation.", ""]


def rl_section(r: dict) -> list[str]:
    side, est = r["results"]["side_by_side"], r["results"]["v6e8_estimate"]
    out = ["### RL step: GRPO rollout and update", "",
           f"Model: {r['settings']['model']}; {r['settings']['category']} RL prompts (upstream's SidDataset on "
           "train), 16 completions each; AdamW, beta 1e-3. Torch: transformers `generate` (16 beams, upstream's "
           "processor, rewards on decoded strings), then policy and reference over every completion with its own "
           "prompt (TRL's `_get_per_token_logps`), loss, backward, clip, AdamW. Update tokens count every "
           "completion's sequence (prompt + completion), the same on both sides.", ""]
    if side:
        out += [common.table([
            {"what": "sidrec (`grpo.rollout` one jit; update runs each prompt once per group)",
             "pps": side["rollout_prompts_per_s"]["ours"], "tps": side["update_tokens_per_s"]["ours"]},
            {"what": "TRL-style torch", "pps": side["rollout_prompts_per_s"]["torch"],
             "tps": side["update_tokens_per_s"]["torch"]},
        ], [("what", f"same {side['prompts']} prompts x {side['group']}, median of {side['repeats']}", ""),
            ("pps", "rollout prompts/s", ".2f"), ("tps", "update tokens/s", ",.0f")]), "",
            f"Rollout **{side['rollout_speedup']:.1f}x**, update **{side['update_speedup']:.1f}x**, whole step "
            f"**{side['step_speedup']:.1f}x**; the two roll out the same groups for {side['same_groups']:.0%} of "
            f"the prompts. First call (compilation): rollout {side['ours_first_rollout_s']:.1f} s, update "
            f"{side['ours_first_update_s']:.1f} s.", ""]
    p = est["prompts"]
    out += [f"v6e-8 estimate, one upstream-sized step ({p['prompts_per_step']} prompts x {p['group']} completions, "
            f"Qwen2.5-1.5B, prompts padded to {p['mean_bucket']:.0f} tokens on average, "
            f"{est['completion_tokens']:.0f} completion tokens): rollout {est['rollout_flops'] / 1e12:.0f} TFLOP "
            f"plus {est['completion_tokens']:.0f} decode steps bound by reading and all-gathering the weights "
            f"(>= {est['decode_bound_s'] * 1e3:.0f} ms), update {est['update_flops'] / 1e12:.0f} TFLOP (a TRL-style "
            f"update, every completion with its own prompt: {est['trl_update_flops'] / 1e12:.0f} TFLOP, "
            f"{est['update_work_ratio_trl_over_ours']:.1f}x); step "
            + ", ".join(f"{t:.2f} s at {u}" for u, t in est["step_s_at"].items()) + " utilisation.", ""]
    return out


def sids_section(r: dict) -> list[str]:
    res, st = r["results"], r["settings"]
    rows = []
    for method, ours_name, theirs, label in (("rqkmeans", "ours", "faiss", "faiss ResidualQuantizer (rqkmeans_faiss.py)"),
                                             ("balanced", "ours", "k_means_constrained",
                                              f"KMeansConstrained, n_init {st['constrained_n_init']} (rqkmeans_constrained.py)")):
        for name, what in ((ours_name, f"sidrec `{'rqkmeans' if method == 'rqkmeans' else 'rqkmeans-balanced'}`"),
                           (theirs, label)):
            side = res[method][name]
            rows.append({"what": what, "wall": side["wall_s"], "mse": side["residual_mse"], "unique": side["unique_sids"],
                         "sizes": ", ".join(f"{a}-{b}" for a, b in side["cluster_sizes"])})
    return ["### SID construction: residual k-means vs upstream's implementations", "",
            f"{res['items']} Industrial items, the same TF-IDF fallback embeddings ({res['dim']} dims), 3 levels x 256 "
            f"codes, before dedup; ours runs {st['our_iterations']} Lloyd steps a level, compilation included.", "",
            common.table(rows, [("what", "method", ""), ("wall", "wall s", ".1f"), ("mse", "residual MSE", ".3g"),
                                ("unique", "unique SIDs", "d"), ("sizes", "cluster sizes per level", "")]), "",
            f"Wall time ratio (theirs / ours, ours with compilation): residual k-means {res['rqkmeans']['speedup']:.2f}x "
            f"vs faiss, balanced {res['balanced']['speedup']:.2f}x vs k-means-constrained (values below 1: ours is "
            f"slower); ours warm (compiled): {res['rqkmeans']['ours']['warm_wall_s']:.1f} s and "
            f"{res['balanced']['ours']['warm_wall_s']:.1f} s.", "", *rqvae_lines(res.get("rqvae"), st)]


def rqvae_lines(sides: dict | None, st: dict) -> list[str]:
    if sides is None:
        return ["RQ-VAE: not measured (torch not installed).", ""]
    rows = [{"what": what, "wall": sides[name]["wall_s"], "rate": sides[name]["best_collision_rate"],
             "epoch": sides[name]["best_epoch"], "mse": sides[name]["reconstruction_mse"],
             "unique": sides[name]["unique_sids"]}
            for name, what in (("ours", "sidrec `rqvae` (JAX, a jitted scan per epoch)"),
                               ("torch", "upstream rqvae.py + trainer.py, restated in PyTorch"))]
    dims = "-".join(str(d) for d in (st["embedding"].split()[-1], *st["rqvae_layers"], 32))
    return [f"RQ-VAE, same embeddings: MLP {dims}, 3 x 256 codes, {st['rqvae_epochs']} full-batch "
            "epochs (upstream rqvae.sh runs 10000 with a 2048-1024-512-256-128-64 MLP), AdamW 1e-3, collision rate "
            "measured every 50 epochs, the lowest kept; wall time includes k-means initialisation (and our compilation).", "",
            common.table(rows, [("what", "implementation", ""), ("wall", "wall s", ".1f"),
                                ("rate", "best collision rate", ".4f"), ("epoch", "at epoch", "d"),
                                ("mse", "reconstruction MSE", ".3g"), ("unique", "unique SIDs", "d")]), "",
            f"Wall time ratio (torch / ours): **{sides['speedup']:.2f}x**. The two start from different random "
            "weights and k-means initialisations (JAX and torch generators), so collision rates agree in size, "
            "not digit for digit.", ""]


def machine_line(results: list[dict]) -> str:
    machines = [r["machine"] for r in results]

    def values(key: str) -> str:  # results may come from different days and package versions
        return " / ".join(dict.fromkeys(str(m[key]) for m in machines if key in m))

    dates = sorted(m["date"][:10] for m in machines)
    versions = ", ".join(f"{k} {values(k)}" for k in ("jax", "torch", "transformers") if values(k))
    loads = ", ".join(str(m["load_average_1m"]) for m in machines)
    when = dates[0] if dates[0] == dates[-1] else f"{dates[0]} to {dates[-1]}"
    isa = f", {values('vector_isa')}" if values("vector_isa") else ""
    return (f"Measured on {values('cpu')} ({values('cores')} cores{isa}; 1-minute load average {loads} as each result "
            f"was written), {versions}, {when}; figures are medians. `just bench` regenerates this section "
            "from bench/results/*.json.")


def render() -> str:
    results = {name: common.read_result(name) for name in ("eval_speed", "train_speed", "muon_overhead",
                                                           "scale_estimate", "rl_speed", "sids_speed")}
    present = [r for r in results.values() if r]
    if not present:
        return "No benchmark results yet: run `just bench`."
    out = ["## Performance", "", machine_line(present), ""]
    out += goals(results["eval_speed"], results["train_speed"])
    sections = (("eval_speed", eval_section), ("train_speed", train_section), ("muon_overhead", muon_section),
                ("scale_estimate", scale_section), ("rl_speed", rl_section),
                ("sids_speed", sids_section))
    for name, section in sections:
        if results[name]:
            out += section(results[name])
    return "\n".join(out).rstrip() + "\n"


def main() -> None:
    text = render()
    SECTION.write_text(text)
    if README.is_file() and START in (readme := README.read_text()) and END in readme:
        head, rest = readme.split(START, 1)
        README.write_text(f"{head}{START}\n{text}{END}{rest.split(END, 1)[1]}")
        print(f"updated the performance section of {README}")
    else:
        print(f"wrote {SECTION}; add {START} / {END} to README.md to have it updated there")


if __name__ == "__main__":
    main()
