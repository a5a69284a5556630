"""SID construction, side by side with upstream's implementations of the same methods, on the same
embeddings (Industrial, the TF-IDF fallback embedding so no pretrained model is needed):

- residual k-means, 3 levels x 256 codes: ours (`cli.py sids --sids.method rqkmeans`, JAX) vs upstream
  rqkmeans_faiss.py's `faiss.ResidualQuantizer(d, 3, 8)` (Train_default, max_beam_size 1);
- balanced residual k-means: ours (`rqkmeans-balanced`: sizes floor/ceil of n/K) vs upstream
  rqkmeans_constrained.py's `KMeansConstrained(size_min=n//K-1, size_max=n//K+1, n_init=3, max_iter=100, tol=1e-4)`
  per level (upstream's settings; `--constrained-n-init 1` for a shorter run);
- RQ-VAE: ours (`--sids.method rqvae`, JAX, one jitted scan per epoch) vs upstream's rqvae.py training
  restated in PyTorch (bench/upstream_rqvae.py), same MLP, epochs, full-catalogue batch, lr, warmup and
  evaluation period (the `industrial-cpu-sids-rqvae` preset's MLP; `--rqvae-epochs` sets both sides).

Reported per method: wall time (ours includes compilation, as a user's single run does), residual MSE
after the last level, unique SIDs before dedup, cluster sizes; for RQ-VAE the best collision rate, its
epoch and the reconstruction MSE of the parameters kept. Needs `pip install -e '.[sids-bench]'` (the
RQ-VAE side also torch; skipped without it).

    python -m bench.sids_speed [--constrained-n-init 3] [--dim 256] [--rqvae-epochs 1000]
"""

from __future__ import annotations

import time

import numpy as np

from bench import common


def _ours(x: np.ndarray, balanced: bool, iterations: int) -> dict:
    """First call (what a single `cli.py sids` pays, compilation included) and a second, warm one."""
    from sidrec.sids import quantize

    walls = []
    for _ in range(2):
        started = time.perf_counter()
        q = quantize.residual_kmeans(x, (256, 256, 256), iterations=iterations, balanced=balanced, seed=42)
        walls.append(time.perf_counter() - started)
    return {**_summary(x, q.codes, q.codebooks, walls[0]), "warm_wall_s": walls[1]}


def _summary(x: np.ndarray, codes: np.ndarray, codebooks, wall: float) -> dict:
    from sidrec.sids import quantize

    reconstruction = sum(cb[codes[:, level]] for level, cb in enumerate(codebooks))
    stats = quantize.code_statistics(codes)
    return {"wall_s": wall, "residual_mse": float(np.mean((x - reconstruction) ** 2)),
            "unique_sids": stats["unique_sids"], "collision_groups": stats["collision_groups"],
            "cluster_sizes": [[lv["min_cluster"], lv["max_cluster"]] for lv in stats["levels"]]}


def _faiss(x: np.ndarray) -> dict:
    import faiss

    started = time.perf_counter()
    rq = faiss.ResidualQuantizer(x.shape[1], 3, 8)
    rq.train_type = faiss.ResidualQuantizer.Train_default
    rq.max_beam_size = 1
    rq.train(np.ascontiguousarray(x))
    codes = rq.compute_codes(np.ascontiguousarray(x)).astype(np.int32)  # 8 bits a level: one byte each
    wall = time.perf_counter() - started
    books = faiss.vector_to_array(rq.codebooks).astype(np.float32).reshape(3, 256, x.shape[1])
    return _summary(x, codes, list(books), wall)


def _constrained(x: np.ndarray, n_init: int) -> dict:
    from k_means_constrained import KMeansConstrained

    n, k = len(x), 256
    started = time.perf_counter()
    residual, codes, books = x.copy(), [], []
    for level in range(3):
        seed = int(np.random.RandomState(42 + level).randint(0, 2**31 - 1))  # upstream's per-level seed
        model = KMeansConstrained(n_clusters=k, size_min=max(1, n // k - 1), size_max=n // k + 1, max_iter=100,
                                  tol=1e-4, random_state=seed, n_init=n_init,
                                  n_jobs=1)  # upstream 16; joblib workers get read-only arrays it cannot use
        labels = model.fit_predict(residual)
        codes.append(labels.astype(np.int32))
        books.append(model.cluster_centers_.astype(np.float32))
        residual = residual - books[-1][labels]
    wall = time.perf_counter() - started
    return _summary(x, np.stack(codes, 1), books, wall)


RQVAE_LAYERS = (512, 256, 128, 64)  # the industrial-cpu-sids-rqvae preset's MLP


def _rqvae_settings(epochs: int):
    from sidrec.sids import rqvae

    # as sidrec/sids/run.py derives them for `cli.py sids --sids.method rqvae`
    return rqvae.RQVAESettings(layers=RQVAE_LAYERS, epochs=epochs, warmup_epochs=min(50, epochs // 10),
                               eval_every=min(50, epochs))


def _rqvae_side(summary: dict, codes: np.ndarray, wall: float) -> dict:
    from sidrec.sids import quantize

    return {"wall_s": wall, "best_collision_rate": summary["best_collision_rate"], "best_epoch": summary["best_epoch"],
            "reconstruction_mse": summary["reconstruction_mse"],
            "unique_sids": quantize.code_statistics(codes)["unique_sids"]}


def _rqvae_ours(x: np.ndarray, epochs: int) -> dict:
    from sidrec.sids import rqvae

    started = time.perf_counter()
    quantized, _, summary = rqvae.train_rqvae(x, _rqvae_settings(epochs), seed=42, log=lambda _: None)
    return _rqvae_side(summary, quantized.codes, time.perf_counter() - started)


def _rqvae_torch(x: np.ndarray, epochs: int) -> dict:
    from bench import upstream_rqvae

    s = _rqvae_settings(epochs)
    fit = upstream_rqvae.train(x, s.layers, s.e_dim, s.codes, s.epochs, s.lr, s.batch_size, s.warmup_epochs,
                               s.eval_every, seed=42, beta=s.beta, quant_loss_weight=s.quant_loss_weight,
                               kmeans_iterations=s.kmeans_iterations)
    return _rqvae_side(fit, fit["codes"], fit["wall_s"])


def _rqvae(x: np.ndarray, epochs: int) -> dict | None:
    try:
        import torch  # noqa: F401
    except ImportError:
        print("rqvae: skipped, torch not installed (pip install -e '.[torch]')")
        return None
    sides = {"ours": _rqvae_ours(x, epochs), "torch": _rqvae_torch(x, epochs)}
    sides["speedup"] = sides["torch"]["wall_s"] / sides["ours"]["wall_s"]
    print("rqvae: " + "; ".join(f"{name} {sides[name]['wall_s']:.1f} s, best collision rate "
                                f"{sides[name]['best_collision_rate']:.4f} at epoch {sides[name]['best_epoch']}, "
                                f"reconstruction MSE {sides[name]['reconstruction_mse']:.3g}" for name in ("ours", "torch"))
          + f"; ours {sides['speedup']:.2f}x faster")
    return sides


def main(dim: int = 256, iterations: int = 20, constrained_n_init: int = 3, rqvae_epochs: int = 1000) -> None:
    """dim: TF-IDF SVD dimensions; iterations: our Lloyd steps per level; constrained_n_init: upstream's 3;
    rqvae_epochs: RQ-VAE epochs on both sides (the CPU preset's 1000; upstream's rqvae.sh 10000)."""
    common.require_shared()
    try:
        import faiss  # noqa: F401
        import k_means_constrained  # noqa: F401
    except ImportError as err:
        raise common.BenchUnavailable(f"{err.name} not installed (pip install -e '.[sids-bench]')") from None
    from sidrec.data import minionerec
    from sidrec.sids import embed

    catalogue = minionerec.load_catalogue(common.SHARED / "data", common.CATEGORY)
    x = embed.tfidf_embeddings(embed.item_texts(catalogue, embed.read_item_features(catalogue)), dim, seed=42)
    results = {"items": len(x), "dim": int(x.shape[1]),
               "rqkmeans": {"ours": _ours(x, False, iterations), "faiss": _faiss(x)},
               "balanced": {"ours": _ours(x, True, iterations), "k_means_constrained": _constrained(x, constrained_n_init)}}
    for method, sides in (("rqkmeans", results["rqkmeans"]), ("balanced", results["balanced"])):
        names = list(sides)
        sides["speedup"] = sides[names[1]]["wall_s"] / sides[names[0]]["wall_s"]
        print(f"{method}: " + "; ".join(f"{name} {sides[name]['wall_s']:.1f} s, residual MSE "
                                        f"{sides[name]['residual_mse']:.3g}, unique {sides[name]['unique_sids']}, sizes "
                                        f"{sides[name]['cluster_sizes']}" for name in names)
              + f"; ours {sides['speedup']:.2f}x faster (warm: {sides['ours']['warm_wall_s']:.1f} s)")
    if (rqvae_sides := _rqvae(x, rqvae_epochs)) is not None:
        results["rqvae"] = rqvae_sides
    common.write_result("sids_speed", {"category": common.CATEGORY, "embedding": f"tfidf {dim}",
                                       "levels": 3, "codes": 256, "our_iterations": iterations,
                                       "constrained_n_init": constrained_n_init,
                                       "rqvae_layers": list(RQVAE_LAYERS), "rqvae_epochs": rqvae_epochs}, results)


if __name__ == "__main__":
    import tyro

    try:
        tyro.cli(main)
    except common.BenchUnavailable as reason:
        print(f"sids_speed skipped: {reason}")
