"""Evaluation run: eval prompts -> constrained beam search -> predictions file -> calc.py metrics.

The model is a run's checkpoint (best or last) or any Hugging Face directory (`--model.hf-path`, e.g.
the official MiniOneRec Industrial_ckpt). Prompts are grouped by padded length (one compilation per
length bucket) into batches of `eval.batch_size` per device, split over every device of every
process; parameters are replicated (beam search is batch-parallel).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

from sidrec import build, metrics, parallel
from sidrec.checkpoint import restore_params
from sidrec.config import Config
from sidrec.data import minionerec
from sidrec.decode import beam, trie as trie_lib
from sidrec.errors import UserError
from sidrec.logging import RunLogger, format_metrics_table
from sidrec.model import hf, qwen2
from sidrec.tokenizer import TokenizerInfo, load_tokenizer
from sidrec.util import round_up

PREDICTIONS_FILE = "eval_predictions.json"
METRICS_FILE = "eval_predictions.metrics.json"
BASELINE_FILE = "most_popular.metrics.json"
BUCKET_MULTIPLE = 64   # prompt lengths are padded up to a multiple of this (one compilation each)


def load_for_eval(cfg: Config, mesh, which: str) -> tuple[dict, qwen2.Qwen2Config, TokenizerInfo, str]:
    """Replicated params, model config, tokenizer and a description of where they came from."""
    replicated = NamedSharding(mesh, P())
    if cfg.model.hf_path:
        directory = build.resolve_hf_path(cfg.model.hf_path)
        tokenizer = load_tokenizer(cfg.model.tokenizer_path or directory)
        params, model_cfg = hf.load_model(directory, cfg.eval.dtype)
        return jax.device_put(params, replicated), model_cfg, tokenizer, f"Hugging Face directory {directory}"
    tokenizer, model_cfg = build.load_run_description(cfg.run_dir, cfg.eval.dtype)
    params, step = restore_params(cfg.run_dir, qwen2.abstract_params(model_cfg), which, replicated)
    return params, model_cfg, tokenizer, f"{which} checkpoint (step {step}) of {cfg.run_dir}"


def check_sid_vocabulary(catalogue: minionerec.Catalogue, tokenizer: TokenizerInfo,
                         model_cfg: qwen2.Qwen2Config, where: str) -> None:
    """The model must know every SID token of the catalogue (else it never trained on SIDs)."""
    missing = [t for t in catalogue.sid_tokens if tokenizer.tokenizer.token_to_id(t) is None]
    if missing:
        raise UserError(f"{where}: the tokenizer lacks {len(missing)} of the catalogue's "
                        f"{len(catalogue.sid_tokens)} SID tokens (e.g. {missing[0]}); evaluate a model "
                        f"fine-tuned on {catalogue.category} SIDs")
    top = max(tokenizer.tokenizer.token_to_id(t) for t in catalogue.sid_tokens)
    if top >= model_cfg.real_vocab_size:
        raise UserError(f"{where}: SID token id {top} is outside the model's vocabulary "
                        f"({model_cfg.real_vocab_size} rows); the weights were not resized for the SIDs")


def run_eval(cfg: Config, checkpoint: str | None = None) -> dict:
    """Evaluate and write eval_predictions.json + eval_predictions.metrics.json into the run dir."""
    parallel.maybe_initialize_distributed(cfg.mesh)
    mesh = parallel.make_mesh(cfg.mesh)
    is_main = jax.process_index() == 0
    say = print if is_main else (lambda _: None)
    run_dir = Path(cfg.run_dir)
    say(f"run dir: {run_dir.resolve()}")
    say(parallel.describe(mesh))

    with parallel.main_process_first("synthetic data"):  # a fresh --data.synthetic run dir is written once
        catalogue = build.load_catalogue(cfg)
    params, model_cfg, tokenizer, source = load_for_eval(cfg, mesh, checkpoint or cfg.eval.which)
    check_sid_vocabulary(catalogue, tokenizer, model_cfg, source)
    examples = minionerec.eval_examples(catalogue, cfg.eval.split, tokenizer, cfg.data.eval_wording)
    if cfg.eval.max_samples > 0:  # 0: all
        examples = examples[:cfg.eval.max_samples]
    trie = trie_lib.build_trie(catalogue.sid_tokens_of.values(), tokenizer)
    per_call = cfg.eval.batch_size * mesh.devices.size
    batches = batch_prompts([e.prompt_ids for e in examples], per_call, tokenizer.pad_id)
    buckets = sorted({b.tokens.shape[1] for b in batches})
    mode = "constrained" if cfg.eval.constrained else "unconstrained (pure)"
    say(f"model: {source}, compute {model_cfg.compute_dtype}")
    say(f"eval: {len(examples)} {cfg.eval.split} prompts of {catalogue.category}, {cfg.eval.num_beams} beams "
        f"{mode}, {per_call} prompts per call in {len(batches)} calls, prompt-length buckets {buckets} "
        f"(one compilation each)")

    sequences, scores = _search_all(params, model_cfg, trie, batches, mesh, cfg, show=is_main)
    predicts = decode_predictions(sequences, tokenizer)
    records = metrics.prediction_records([e.input for e in examples], [e.target for e in examples],
                                         predicts, scores.tolist())
    result = metrics.compute_metrics(records, catalogue.valid_sids)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        metrics.write_predictions(run_dir / PREDICTIONS_FILE, records)
        metrics.write_metrics(run_dir / METRICS_FILE, result)
        # Most-popular (the train split's most frequent targets) on the same prompts: a sanity floor.
        baseline = metrics.most_popular_baseline(
            (row.item_sid for row in minionerec.load_split(catalogue, "train")),
            (e.target.strip() for e in examples), catalogue.valid_sids, cfg.eval.num_beams)
        metrics.write_metrics(run_dir / BASELINE_FILE, baseline)
        say(format_metrics_table(result, baseline=baseline, baseline_name="most-popular"))
        say(f"invalid predictions (before the first hit): {result['invalid_prediction_count']}; "
            f"wrote {run_dir / PREDICTIONS_FILE} and {run_dir / METRICS_FILE}")
        logger = RunLogger(dataclasses.asdict(cfg), run_dir, is_main=True, wandb_mode=cfg.wandb.mode,
                           project=cfg.wandb.project, name=cfg.wandb.name, total_steps=0)
        logger.log(0, {"eval": {"hr": result["hr"], "ndcg": result["ndcg"]}})
        logger.close()
    return result


def _search_all(params, model_cfg, trie, batches, mesh, cfg: Config, *, show: bool):
    """Run every batch; returns (sequences [n, W, G], scores [n, W]) in the input order."""
    n = sum(int((b.indices >= 0).sum()) for b in batches)
    sequences = np.zeros((n, cfg.eval.num_beams, trie.num_steps), np.int32)
    scores = np.zeros((n, cfg.eval.num_beams), np.float32)
    rows = NamedSharding(mesh, P(parallel.BATCH_AXES))
    process_rows = slice(jax.process_index() * len(batches[0].indices) // jax.process_count(),
                         (jax.process_index() + 1) * len(batches[0].indices) // jax.process_count())
    started = time.perf_counter()
    with tqdm(total=n, unit="prompt", disable=not show, dynamic_ncols=True) as bar:
        for batch in batches:
            tokens, mask = (jax.make_array_from_process_local_data(rows, a[process_rows])
                            for a in (batch.tokens, batch.mask))
            out_sequences, out_scores = beam.beam_search(params, model_cfg, trie, tokens, mask,
                                                         num_beams=cfg.eval.num_beams,
                                                         constrained=cfg.eval.constrained)
            out_sequences, out_scores = multihost_utils.process_allgather((out_sequences, out_scores),
                                                                          tiled=True)
            keep = batch.indices >= 0
            sequences[batch.indices[keep]] = np.asarray(out_sequences)[keep]
            scores[batch.indices[keep]] = np.asarray(out_scores)[keep]
            bar.update(int(keep.sum()))
            bar.set_postfix(prompts_per_s=f"{bar.n / (time.perf_counter() - started):.1f}")
    return sequences, scores


# ----------------------------------------------------------------------------------------------------
# Decoding the searched suffixes


def decode_predictions(sequences, tokenizer: TokenizerInfo) -> list[list[str]]:
    """Generated suffixes [B, W, G] -> upstream's "predict" strings (best first) for each prompt.

    As upstream's evaluate.py: decode with special tokens (EOS) skipped, keep what follows the last
    "Response:\\n", strip whitespace. A valid SID comes out as e.g. '<a_1><b_2><c_3>'.
    """
    sequences = np.asarray(sequences)
    texts = tokenizer.tokenizer.decode_batch(sequences.reshape(-1, sequences.shape[-1]).tolist(),
                                             skip_special_tokens=True)
    texts = [text.split("Response:\n")[-1].strip() for text in texts]
    width = sequences.shape[1]
    return [texts[i:i + width] for i in range(0, len(texts), width)]


# ----------------------------------------------------------------------------------------------------
# Prompt batches by length bucket: a whole split compiles once per bucket.


def bucket_length(n: int, multiple: int = BUCKET_MULTIPLE) -> int:
    """Padded prompt length: n rounded up to a multiple (at most max_len / multiple compilations)."""
    return max(multiple, round_up(n, multiple))


@dataclass(frozen=True)
class PromptBatch:
    indices: np.ndarray  # int64 [batch]: position of each row in the input list; -1 for filler rows
    tokens: np.ndarray   # int32 [batch, bucket] left-padded
    mask: np.ndarray     # int32 [batch, bucket] 1 on real tokens


def batch_prompts(prompts: Sequence[Sequence[int]], batch_size: int, pad_id: int,
                  multiple: int = BUCKET_MULTIPLE) -> list[PromptBatch]:
    """Group prompts by length bucket into left-padded batches of exactly `batch_size` rows.

    Within a bucket prompts keep their order; a bucket's last batch is completed with copies of its
    first prompt (index -1, results to be dropped) so that every call has one of few static shapes.
    """
    by_bucket: dict[int, list[int]] = {}
    for index, prompt in enumerate(prompts):
        by_bucket.setdefault(bucket_length(len(prompt), multiple), []).append(index)
    batches = []
    for length, members in sorted(by_bucket.items()):
        for start in range(0, len(members), batch_size):
            indices = members[start:start + batch_size]
            rows = [prompts[i] for i in indices]
            filler = batch_size - len(rows)
            tokens = np.full((batch_size, length), pad_id, np.int32)
            mask = np.zeros((batch_size, length), np.int32)
            for row, prompt in enumerate(rows + [rows[0]] * filler):
                tokens[row, length - len(prompt):] = prompt
                mask[row, length - len(prompt):] = 1
            batches.append(PromptBatch(np.array(indices + [-1] * filler, np.int64), tokens, mask))
    return batches
