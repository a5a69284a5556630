"""Semantic IDs for a catalogue (`cli.py sids`): each writes a data root that `--data.root` trains on.

The cpu presets use the offline TF-IDF fallback embedding (no pretrained model needed); give a Qwen
embedding model with `--sids.embeddings hf --model.hf-path DIR` for upstream's recipe.
"""

import dataclasses

from presets.cpu import INDUSTRIAL_CPU, OFFICE_CPU
from presets.demo import DEMO
from sidrec.config import Config, SidsConfig


def _sids(base: Config, name: str, description: str, sids: SidsConfig) -> Config:
    return dataclasses.replace(base, description=description, run_dir=f"runs/{name}",
                               sids=dataclasses.replace(sids, out=f"runs/{name}"))


# upstream rqkmeans_constrained.py: balanced clusters, 256 codes a level, colliding items get a 4th token
BALANCED = SidsConfig(method="rqkmeans-balanced", levels=3, codes=256, dedup="extra-level", embeddings="tfidf")
# upstream rqkmeans_faiss.py's algorithm (plain residual k-means) with rqvae's Sinkhorn collision handling
PLAIN = SidsConfig(method="rqkmeans", levels=3, codes=256, dedup="sinkhorn", embeddings="tfidf")

PRESETS = {
    "industrial-cpu-sids": _sids(INDUSTRIAL_CPU, "industrial-cpu-sids",
                                 "SIDs for Industrial: TF-IDF fallback embeddings, balanced RQ-KMeans 3x256, "
                                 "4th-token dedup (CPU, ~1 min)", BALANCED),
    "office-cpu-sids": _sids(OFFICE_CPU, "office-cpu-sids",
                             "SIDs for Office: TF-IDF fallback embeddings, balanced RQ-KMeans 3x256, "
                             "4th-token dedup (CPU, ~1 min)", BALANCED),
    "industrial-sids-rqkmeans": _sids(INDUSTRIAL_CPU, "industrial-sids-rqkmeans",
                                      "SIDs for Industrial: plain RQ-KMeans 3x256, Sinkhorn dedup (TF-IDF "
                                      "unless --sids.embeddings hf/npy)", PLAIN),
    # upstream rqvae.sh's recipe (10000 full-batch epochs of a 2048-...-64 MLP) is hours on 2 cores; the CPU
    # preset trains a smaller MLP for 1000 epochs
    "industrial-cpu-sids-rqvae": _sids(INDUSTRIAL_CPU, "industrial-cpu-sids-rqvae",
                                       "SIDs for Industrial: RQ-VAE 3x256 (MLP 512-256-128-64, 1000 epochs), "
                                       "Sinkhorn dedup, TF-IDF fallback embeddings (CPU)",
                                       dataclasses.replace(PLAIN, method="rqvae", rqvae_layers=(512, 256, 128, 64),
                                                           rqvae_epochs=1000)),
    "demo-sids": _sids(DEMO, "demo-sids", "SIDs for the demo's synthetic catalogue: balanced RQ-KMeans 3x8",
                       dataclasses.replace(BALANCED, codes=8, tfidf_dim=32)),
}
