"""`cli.py sids`: item text -> embeddings -> residual quantisation -> dedup -> a data root + report."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from sidrec import build, parallel
from sidrec.config import Config
from sidrec.data import minionerec
from sidrec.sids import embed, files, quantize, raw, rqvae

REPORT_FILE = "sids_report.json"


def item_embeddings(cfg: Config, catalogue) -> tuple[np.ndarray, str]:
    s = cfg.sids
    if s.embeddings == "npy":
        return embed.npy_embeddings(s.embeddings_npy, len(catalogue.item_ids)), f"npy {s.embeddings_npy}"
    texts = embed.item_texts(catalogue, embed.read_item_features(catalogue))
    if s.embeddings == "hf":
        mesh = parallel.make_mesh(cfg.mesh)
        directory = build.resolve_hf_path(cfg.model.hf_path)
        x = embed.hf_embeddings(directory, texts, mesh=mesh, batch_size=s.embed_batch_size,
                                max_len=s.embed_max_len, dtype=cfg.model.dtype)
        return x, f"hf {directory} (masked mean-pool of the final hidden states)"
    return (embed.tfidf_embeddings(texts, s.tfidf_dim, cfg.seed),
            f"tfidf (OFFLINE FALLBACK: TF-IDF uni+bigrams, truncated SVD to {s.tfidf_dim}, L2-normalised)")


def build_sids(cfg: Config, catalogue, x: np.ndarray) -> tuple[list[tuple[str, ...]], dict]:
    """SID tokens per item (index order) and the report's quantisation part."""
    s = cfg.sids
    extra = {}
    if s.method == "rqvae":
        settings = rqvae.RQVAESettings(layers=s.rqvae_layers, e_dim=s.rqvae_e_dim, codes=(s.codes,) * s.levels,
                                       lr=s.rqvae_lr, epochs=s.rqvae_epochs, batch_size=s.rqvae_batch_size,
                                       warmup_epochs=min(50, s.rqvae_epochs // 10), eval_every=min(50, s.rqvae_epochs),
                                       kmeans_iterations=s.kmeans_iterations)
        quantized, latents, summary = rqvae.train_rqvae(x, settings, cfg.seed)
        x = latents  # the quantised space: dedup and the residual statistics live there
        extra = {"rqvae": {k: v for k, v in summary.items() if k != "history"}}
    else:
        quantized = quantize.residual_kmeans(x, (s.codes,) * s.levels, iterations=s.kmeans_iterations,
                                             balanced=s.method == "rqkmeans-balanced", seed=cfg.seed)
    before = quantize.code_statistics(quantized.codes)
    moved = 0
    if s.dedup == "extra-level" and before["collision_groups"]:
        codes = quantize.add_extra_level(quantized.codes)
    elif s.dedup == "sinkhorn":
        codes, moved = quantize.sinkhorn_dedup(x, quantized, rounds=s.sinkhorn_rounds, epsilon=s.sinkhorn_epsilon)
    else:
        codes = quantized.codes
    after = quantize.code_statistics(codes)
    report = {"residual_mse_per_level": list(quantized.residual_mse),
              "relative_residual_per_level": [m / float(np.mean(x * x)) for m in quantized.residual_mse],
              "before_dedup": before, "after_dedup": after, "moved_by_nearest_free_code": moved, **extra}
    return quantize.sid_tokens(codes), report


def run_sids(cfg: Config) -> dict:
    if cfg.sids.items is None:
        return _run(cfg, build.load_catalogue(cfg))
    with tempfile.TemporaryDirectory(prefix="sidrec-raw-") as staging:
        root = raw.stage(cfg.sids.items, cfg.sids.interactions, cfg.data.category, Path(staging))
        print(f"raw inputs: {cfg.sids.items} and {cfg.sids.interactions}")
        return _run(cfg, minionerec.load_catalogue(root, cfg.data.category))


def _run(cfg: Config, catalogue) -> dict:
    started = time.perf_counter()
    s = cfg.sids
    out = Path(s.out)
    amazon = out / "Amazon"
    if amazon.exists() and not s.overwrite:  # checked before the work, not after it
        raise quantize.SidsError(f"{amazon}: already exists; choose another --sids.out or pass --sids.overwrite True")
    print(f"items: {len(catalogue.item_ids)} of {catalogue.category} from {catalogue.paths.index}")
    x, source = item_embeddings(cfg, catalogue)
    embedded = time.perf_counter()
    print(f"embeddings: {list(x.shape)} from {source}, {embedded - started:.1f} s")
    tokens, quant_report = build_sids(cfg, catalogue, x)
    quantized = time.perf_counter()
    files.write_data_root(catalogue, dict(zip(catalogue.item_ids, tokens)), out, overwrite=s.overwrite)
    report = {
        "category": catalogue.category, "items": len(catalogue.item_ids), "method": s.method,
        "levels": s.levels, "codes_per_level": s.codes, "dedup": s.dedup, "seed": cfg.seed,
        "embeddings": source, "embedding_dim": int(x.shape[1]),
        "sid_depth": len(tokens[0]), **quant_report,
        "wall_s": {"embeddings": embedded - started, "quantisation": quantized - embedded,
                   "total": time.perf_counter() - started},
        "data_root": str(out),
    }
    tmp = out / f".{REPORT_FILE}.tmp"
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, out / REPORT_FILE)
    print(format_report(report))
    print(f"wrote {amazon} and {out / REPORT_FILE}; train on it with --data.root {out}")
    return report


def format_report(report: dict) -> str:
    b, a = report["before_dedup"], report["after_dedup"]
    lines = [f"{report['method']}, {report['levels']} x {report['codes_per_level']} codes, dedup {report['dedup']}: "
             f"{report['items']} items, unique SIDs {b['unique_sids']} -> {a['unique_sids']}, collision groups "
             f"{b['collision_groups']} -> {a['collision_groups']} (largest {b['largest_collision_group']}), "
             f"SID depth {report['sid_depth']}",
             "| level | codes used | entropy (bits) | cluster sizes | residual MSE | residual / signal |",
             "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for level, stats in enumerate(b["levels"]):
        lines.append(f"| {level + 1} | {stats['codes_used']} | {stats['entropy_bits']:.2f} | "
                     f"{stats['min_cluster']}-{stats['max_cluster']} | {report['residual_mse_per_level'][level]:.3g} | "
                     f"{report['relative_residual_per_level'][level]:.3f} |")
    w = report["wall_s"]
    lines.append(f"wall time: embeddings {w['embeddings']:.1f} s, quantisation {w['quantisation']:.1f} s, "
                 f"total {w['total']:.1f} s")
    return "\n".join(lines)
