"""Item embeddings for SID construction: one float32 row per item, in index.json order.

Three sources:
- `hf`: a Hugging Face Qwen2-family directory through our own forward, masked mean-pool of the final
  hidden states (upstream rq/text2emb/amazon_text2emb.py: `AutoModel(...).last_hidden_state`, which is
  after the final norm), batched and jitted over the mesh like eval;
- `npy`: the user's own `[items, dim]` array, rows aligned with index.json's item order (upstream's
  `<Cat>.emb-qwen-td.npy` is sorted by integer item id, which is the same order for its files);
- `tfidf`: the OFFLINE FALLBACK for machines without a pretrained model: TF-IDF of the same text, reduced
  by truncated SVD (scikit-learn) and L2-normalised. It knows words, not meaning; SIDs from it are a
  baseline, not a substitute for an LLM embedding.

The text of an item is upstream's: `clean_text(title)` and `clean_text(description)` joined by a space
("unknown item" when both are empty).
"""

from __future__ import annotations

import html
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from sidrec import parallel
from sidrec.data.minionerec import Catalogue, DataError
from sidrec.errors import UserError

_TAG = re.compile(r"</?\w+[^>]*>")
_QUOTES_NEWLINES = re.compile(r'["\n\r]*')


def clean_text(raw) -> str:
    """Upstream rq/text2emb/utils.py clean_text, transcribed: unescape HTML, drop tags, double quotes
    and newlines, end with one '.' (so an empty field becomes "."), and return "" for texts of 2000
    characters or more."""
    if isinstance(raw, list):
        text = " ".join(_QUOTES_NEWLINES.sub("", _TAG.sub("", html.unescape(r))).strip() for r in raw)
    else:
        text = str(raw)[1:-1].strip() if isinstance(raw, dict) else str(raw).strip()
        text = _QUOTES_NEWLINES.sub("", _TAG.sub("", html.unescape(text)))
    index = -1
    while -index < len(text) and text[index] == ".":
        index -= 1
    index += 1
    text = text + "." if index == 0 else text[:index] + "."
    return "" if len(text) >= 2000 else text


def item_texts(catalogue: Catalogue, features: dict[str, dict]) -> list[str]:
    """Upstream's embedding text per item (index.json order): title and description, cleaned."""
    texts = []
    for item_id in catalogue.item_ids:
        data = features.get(item_id) or {}
        # item.json descriptions are the string of a Python list ("['...']"): cleaned as that string
        parts = [t for t in (clean_text(data[k]).strip() for k in ("title", "description")
                             if data.get(k) is not None) if t]
        texts.append(" ".join(parts) if parts else "unknown item")
    return texts


def tfidf_embeddings(texts: list[str], dim: int, seed: int) -> np.ndarray:
    """[items, dim] float32: word uni+bigram TF-IDF (sublinear tf), truncated SVD, rows L2-normalised."""
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer

    matrix = TfidfVectorizer(ngram_range=(1, 2), min_df=2 if len(texts) >= 50 else 1, sublinear_tf=True,
                             max_features=200_000).fit_transform(texts)
    dim = min(dim, matrix.shape[1] - 1, len(texts) - 1)
    if dim < 1:
        raise UserError(f"the item texts have too few distinct words ({matrix.shape[1]}) for a TF-IDF embedding")
    reduced = TruncatedSVD(n_components=dim, random_state=seed, algorithm="randomized", n_iter=7).fit_transform(matrix)
    norms = np.linalg.norm(reduced, axis=1, keepdims=True)
    return (reduced / np.maximum(norms, 1e-12)).astype(np.float32)


def npy_embeddings(path: str | Path, n_items: int) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: not found; --sids.embeddings-npy must be a .npy file of [items, dim] floats")
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as err:
        raise UserError(f"{path}: not a readable .npy array ({err})") from None
    if array.ndim != 2 or array.shape[0] != n_items or not np.issubdtype(array.dtype, np.floating):
        raise UserError(f"{path}: expected a float array of shape [{n_items}, dim] (one row per item of the "
                        f"index, in its order), got {array.dtype} {list(array.shape)}")
    if not np.isfinite(array).all():
        bad = int(np.flatnonzero(~np.isfinite(array).all(1))[0])
        raise UserError(f"{path}: row {bad} holds NaN or inf; regenerate the embeddings")
    return array.astype(np.float32)


def _mean_pool(params, model_cfg, tokens, mask):
    from sidrec.model import qwen2

    positions = jnp.maximum(jnp.cumsum(mask, 1) - 1, 0)
    hidden = qwen2.forward_hidden(params, model_cfg, tokens, mask, positions).astype(jnp.float32)
    weights = mask[..., None].astype(jnp.float32)
    return (hidden * weights).sum(1) / jnp.maximum(weights.sum(1), 1e-9)


def hf_embeddings(directory: str | Path, texts: list[str], *, mesh, batch_size: int, max_len: int,
                  dtype: str = "float32") -> np.ndarray:
    """[items, hidden] float32 masked mean-pool of the final hidden states of an HF Qwen2 directory."""
    from sidrec.evaluate import batch_prompts
    from sidrec.model import hf
    from sidrec.tokenizer import load_tokenizer

    directory = Path(directory)
    tokenizer = load_tokenizer(directory)
    params, model_cfg = hf.load_model(directory, dtype)
    params = jax.device_put(params, NamedSharding(mesh, P()))
    ids = [e.ids[:max_len] or [tokenizer.eos_id]
           for e in tokenizer.tokenizer.encode_batch(texts, add_special_tokens=False)]
    per_call = batch_size * mesh.devices.size
    rows = NamedSharding(mesh, P(parallel.BATCH_AXES))
    pool = jax.jit(_mean_pool, static_argnums=1)
    out = np.zeros((len(texts), model_cfg.hidden_size), np.float32)
    for batch in batch_prompts(ids, per_call, tokenizer.pad_id):
        tokens, mask = (jax.device_put(a, rows) for a in (batch.tokens, batch.mask))
        pooled = np.asarray(pool(params, model_cfg, tokens, mask))
        keep = batch.indices >= 0
        out[batch.indices[keep]] = pooled[keep]
    return out


def read_item_features(catalogue: Catalogue) -> dict[str, dict]:
    """item.json as a dict (the catalogue keeps only titles); descriptions stay raw strings."""
    from sidrec.textfile import read_json

    value = read_json(catalogue.paths.item, DataError)
    return {k: v if isinstance(v, dict) else {} for k, v in value.items()}

