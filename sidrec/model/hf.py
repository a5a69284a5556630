"""Hugging Face interop without torch: config.json <-> Qwen2Config, safetensors <-> params,
the SID vocabulary extension on the weights, and export back to a directory transformers loads.

The HF tensor names come from the parameter declaration (`qwen2.param_specs`: each leaf names its
tensor and whether torch stores it transposed); the config.json fields from one table (`_HF_FIELDS`).
Loading and export both use them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers numpy's "bfloat16" so safetensors can read bf16 tensors)
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from sidrec.errors import UserError
from sidrec.model.qwen2 import (
    ARCHITECTURE_FIELDS,
    EMBEDDING,
    HEAD,
    TIED_HEAD_HF_NAME,
    Architecture,
    ArrayInfo,
    Params,
    Qwen2Config,
    Qwen2ConfigError,
    architecture_of,
    flat_specs,
)
from sidrec.textfile import read_json
from sidrec.tokenizer import TokenizerInfo, save_tokenizer
from sidrec.util import round_up


class CheckpointError(UserError):
    """A model directory that does not match what the config declares; names every bad tensor."""


def _path(name: str) -> tuple[str, ...]:
    return tuple(name.split("/"))


def _get(tree, path):
    for part in path:
        tree = tree[part]
    return tree


def _set(tree: dict, path, value) -> None:
    for part in path[:-1]:
        tree = tree.setdefault(part, {})
    tree[path[-1]] = value


def _expected_tensors(cfg: Qwen2Config) -> dict[str, tuple[str, ArrayInfo, int | None, tuple[int, ...]]]:
    """HF name -> (our path, declaration, layer index, HF shape) for every tensor a checkpoint must
    hold; derived from `qwen2.param_specs` (each ArrayInfo names its HF tensor)."""
    expected = {}
    for name, info in flat_specs(cfg).items():
        shape = info.shape[1:] if info.stacked else info.shape
        hf_shape = tuple(reversed(shape)) if info.hf_transposed else shape
        for i in (range(cfg.num_layers) if info.stacked else [None]):
            expected[info.hf_name.format(i=i)] = (name, info, i, hf_shape)
    return expected


# Where each logical axis's size comes from in config.json (named in shape mismatch messages).
_AXIS_SOURCE = {
    "vocab": "vocab_size",
    "embed": "hidden_size",
    "mlp": "intermediate_size",
    "q_heads": "num_attention_heads*head_dim",
    "kv_heads": "num_key_value_heads*head_dim",
}
# safetensors dtypes the loader reads (all converted to float32); others are refused by name.
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
_MAX_LISTED = 8  # problems spelled out in one message (the count says how many there are)


# ----------------------------------------------------------------------------------------------
# config.json


def load_hf_config(directory: str | Path) -> dict:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: not found; --model.hf-path must be a Hugging Face model directory")
    config = read_json(path, CheckpointError)
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object of model settings, got {type(config).__name__}; "
                              "point --model.hf-path at a Hugging Face model directory")
    return config


def _check_field_types(hf: dict, where: str) -> None:
    """Numbers where numbers belong: a string or a null would otherwise fail deep inside the model."""
    positive_ints = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings")
    for key in positive_ints:
        value = hf.get(key)
        required = key in _REQUIRED
        if (value is not None or required) and (type(value) is not int or value <= 0):
            raise CheckpointError(f"{where}: {key} must be a positive integer, got {value!r}; fix config.json")
    for key in ("rope_theta", "rms_norm_eps", "initializer_range"):
        value = hf.get(key)
        if value is not None and (type(value) not in (int, float) or value <= 0):
            raise CheckpointError(f"{where}: {key} must be a positive number, got {value!r}; fix config.json")
    if hf.get("tie_word_embeddings") not in (None, True, False):
        raise CheckpointError(f"{where}: tie_word_embeddings must be true or false, got "
                              f"{hf['tie_word_embeddings']!r}; fix config.json")
    for key in ("rope_parameters", "rope_scaling"):
        if hf.get(key) is not None and not isinstance(hf[key], dict):
            raise CheckpointError(f"{where}: {key} must be an object or null, got {hf[key]!r}; fix config.json")


def _rope_theta(hf: dict, where: str) -> float:
    """rope_theta at the top level (transformers 4) or inside rope_parameters / rope_scaling (5)."""
    theta = hf.get("rope_theta")
    for key in ("rope_parameters", "rope_scaling"):
        block = hf.get(key) or {}
        rope_type = block.get("rope_type", block.get("type", "default"))
        if rope_type != "default":
            raise CheckpointError(f"{where}: {key}.rope_type {rope_type!r} is not supported (only 'default' RoPE)")
        theta = block.get("rope_theta", theta)
    return float(10000.0 if theta is None else theta)


# Each Architecture field's config.json key and transformers' Qwen2Config default for it (None: the
# file must give it, or it is derived below). The one conversion table, both directions.
_HF_FIELDS = {
    "hidden_size": ("hidden_size", None),
    "intermediate_size": ("intermediate_size", None),
    "num_layers": ("num_hidden_layers", None),
    "num_heads": ("num_attention_heads", None),
    "num_kv_heads": ("num_key_value_heads", None),  # absent: num_heads (MHA)
    "head_dim": ("head_dim", None),                  # absent: hidden_size // num_heads
    "rope_theta": ("rope_theta", 10000.0),           # or inside rope_parameters (transformers 5)
    "rms_norm_eps": ("rms_norm_eps", 1e-6),
    "tie_word_embeddings": ("tie_word_embeddings", False),
    "max_position_embeddings": ("max_position_embeddings", 32768),
    "init_std": ("initializer_range", 0.02),
}
assert set(_HF_FIELDS) == set(ARCHITECTURE_FIELDS), "every Architecture field needs its config.json key"
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def config_from_hf(hf: dict, compute_dtype: str = "float32", remat: bool = False, *,
                   where: str = "config.json") -> Qwen2Config:
    """A Qwen2Config from a parsed config.json (absent fields: transformers' Qwen2Config defaults)."""
    if hf.get("model_type", "qwen2") != "qwen2":
        raise CheckpointError(f"{where}: model_type {hf['model_type']!r} is not supported (only 'qwen2')")
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{where}: hidden_act {hf['hidden_act']!r} is not supported (only 'silu')")
    if hf.get("use_sliding_window"):
        raise CheckpointError(f"{where}: use_sliding_window=true is not supported; set it to false")
    missing = [k for k in _REQUIRED if k not in hf]
    if missing:
        raise CheckpointError(f"{where}: missing field(s) {missing}")
    _check_field_types(hf, where)
    fields = {ours: hf.get(key) if hf.get(key) is not None else default for ours, (key, default) in _HF_FIELDS.items()}
    fields["num_kv_heads"] = fields["num_kv_heads"] or fields["num_heads"]
    fields["head_dim"] = fields["head_dim"] or fields["hidden_size"] // fields["num_heads"]
    fields["rope_theta"] = _rope_theta(hf, where)
    try:
        return Qwen2Config.build(Architecture(**fields), hf["vocab_size"], compute_dtype=compute_dtype, remat=remat)
    except Qwen2ConfigError as e:
        raise CheckpointError(f"{where}: {e}") from None


def hf_config_dict(cfg: Qwen2Config, tokenizer_info: TokenizerInfo, dtype: str) -> dict:
    """config.json for Qwen2ForCausalLM; vocab_size is the real vocabulary (padding rows dropped)."""
    architecture = architecture_of(cfg)
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": cfg.real_vocab_size,
        **{key: architecture[ours] for ours, (key, _) in _HF_FIELDS.items()},
        "hidden_act": "silu",
        "rope_scaling": None,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": cfg.num_layers,
        "attention_dropout": 0.0,
        "use_cache": True,
        "torch_dtype": dtype,
        "eos_token_id": tokenizer_info.eos_id,
        # No pad_token_id, as Qwen2.5's own config: transformers would make it the Embedding's
        # padding_idx and freeze that row's gradient in any later torch fine-tuning.
    }


# ----------------------------------------------------------------------------------------------
# safetensors -> params


@contextlib.contextmanager
def _open_safetensors(file: Path):
    """safe_open, with a damaged file (truncated, not safetensors) as one CheckpointError naming it."""
    try:
        handle = safe_open(file, framework="numpy")
    except Exception as e:  # SafetensorError, or an OSError
        raise CheckpointError(f"{file}: cannot be read as safetensors ({e}); the file is damaged or "
                              "incomplete: download or export the model again") from None
    with handle as f:
        yield f


def _checkpoint_files(directory: Path) -> dict[str, Path]:
    """Tensor name -> file, from model.safetensors or a sharded model.safetensors.index.json."""
    index = directory / "model.safetensors.index.json"
    single = directory / "model.safetensors"
    if index.is_file():
        content = read_json(index, CheckpointError)
        weight_map = content.get("weight_map") if isinstance(content, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise CheckpointError(f"{index}: no 'weight_map' object of tensor name -> shard file; "
                                  "download the index again")
        files = {name: directory / file for name, file in weight_map.items()}
        absent = sorted({str(f) for f in files.values() if not f.is_file()})
        if absent:
            raise CheckpointError(f"{index}: shard file(s) listed but not found: {absent}")
        return files
    if single.is_file():
        with _open_safetensors(single) as f:
            return dict.fromkeys(f.keys(), single)
    raise CheckpointError(f"{directory}: neither model.safetensors nor model.safetensors.index.json found")


def _read_headers(files: dict[str, Path]) -> dict[str, tuple[tuple[int, ...] | None, str | None]]:
    """Tensor name -> (shape, safetensors dtype) from the file headers; (None, None) for a tensor the
    index lists in a shard that does not hold it."""
    headers = {}
    for file in sorted(set(files.values())):
        with _open_safetensors(file) as f:
            held = set(f.keys())
            for name in sorted(held):
                if files.get(name) == file:  # a shard's tensors the index does not list are ignored
                    tensor = f.get_slice(name)
                    headers[name] = (tuple(tensor.get_shape()), tensor.get_dtype())
            for name in sorted(n for n, listed in files.items() if listed == file and n not in held):
                headers[name] = (None, None)
    return headers


def _axis_sources(info: ArrayInfo) -> str:
    axes = info.logical_axes[1:] if info.stacked else info.logical_axes
    return " x ".join(_AXIS_SOURCE.get(a, a) for a in (reversed(axes) if info.hf_transposed else axes))


def _header_problems(cfg: Qwen2Config, headers: dict, files: dict[str, Path]) -> list[str]:
    """Every tensor that is missing, misshapen, not floating point or not expected, by name."""
    expected = _expected_tensors(cfg)
    problems = []
    for name, (_, info, _, shape) in expected.items():
        if name not in headers:
            problems.append(f"missing {name} (expected shape {list(shape)})")
        elif headers[name][0] is None:
            problems.append(f"missing {name}: the index lists it in {files[name].name}, which does not hold it")
        elif headers[name][0] != shape:
            problems.append(f"{name} has shape {list(headers[name][0])}, expected {list(shape)} "
                            f"(config.json {_axis_sources(info)}; in {files[name].name})")
    for name, (shape, dtype) in headers.items():
        if shape is not None and dtype not in _FLOAT_DTYPES and (name in expected or name == TIED_HEAD_HF_NAME):
            problems.append(f"{name} has dtype {dtype} (in {files[name].name}); weights must be one of "
                            f"{'/'.join(_FLOAT_DTYPES)} (quantized checkpoints are not supported)")
    for name, (shape, _) in headers.items():
        if name in expected or (name == TIED_HEAD_HF_NAME and cfg.tie_word_embeddings) or shape is None:
            continue
        problems.append(f"unexpected tensor {name} (shape {list(shape)})")
    if cfg.tie_word_embeddings and headers.get(TIED_HEAD_HF_NAME, (None,))[0] is not None:
        embed_shape = (cfg.vocab_size, cfg.hidden_size)
        if headers[TIED_HEAD_HF_NAME][0] != embed_shape:
            problems.append(f"{TIED_HEAD_HF_NAME} has shape {list(headers[TIED_HEAD_HF_NAME][0])}, expected "
                            f"{list(embed_shape)} (tied to model.embed_tokens.weight)")
    return problems


def _place(array: np.ndarray, sharding):
    if sharding is None:
        return jnp.asarray(array)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def load_params(directory: str | Path, cfg: Qwen2Config, *, shardings=None) -> Params:
    """fp32 params from a HF Qwen2 directory; every tensor's shape is checked against cfg first.

    shardings: optional pytree of jax.sharding.Sharding matching the params; each process then only
    places the slices its devices own. A tied checkpoint that also stores lm_head.weight is accepted
    only if it equals the embedding (transformers would silently drop it; a different head means the
    checkpoint disagrees with its own tie_word_embeddings=true).
    """
    directory = Path(directory)
    files = _checkpoint_files(directory)
    headers = _read_headers(files)
    problems = _header_problems(cfg, headers, files)
    if problems:
        listed = problems[:_MAX_LISTED] + ([f"... and {len(problems) - _MAX_LISTED} more"]
                                           if len(problems) > _MAX_LISTED else [])
        weights = sorted({f.name for f in files.values()})
        raise CheckpointError(
            f"{directory}: checkpoint does not match its config ({len(problems)} problem(s)) in "
            f"{', '.join(weights[:3])}{' ...' if len(weights) > 3 else ''}: " + "; ".join(listed)
            + "; config.json and the weights must come from the same model (download or export it again)")
    files = {name: file for name, file in files.items() if headers.get(name, (None,))[0] is not None}
    with contextlib.ExitStack() as stack:
        handles = {file: stack.enter_context(_open_safetensors(file)) for file in set(files.values())}

        def read(name: str) -> np.ndarray:
            return handles[files[name]].get_tensor(name).astype(np.float32)

        params: dict = {}
        for name, info in flat_specs(cfg).items():
            orient = (lambda a: a.T) if info.hf_transposed else (lambda a: a)
            if info.stacked:
                value = np.stack([orient(read(info.hf_name.format(i=i))) for i in range(cfg.num_layers)])
            else:
                value = np.ascontiguousarray(orient(read(info.hf_name)))
            sharding = None if shardings is None else _get(shardings, _path(name))
            _set(params, _path(name), _place(value, sharding))
        tied_head_differs = (cfg.tie_word_embeddings and TIED_HEAD_HF_NAME in files
                             and not np.array_equal(read(TIED_HEAD_HF_NAME), read("model.embed_tokens.weight")))
        if tied_head_differs:
            raise CheckpointError(
                f"{directory}: config.json sets tie_word_embeddings=true but {TIED_HEAD_HF_NAME} differs from "
                "model.embed_tokens.weight; set tie_word_embeddings=false to load the separate head")
    return params


def load_model(directory: str | Path, compute_dtype: str = "float32", remat: bool = False,
               *, shardings=None) -> tuple[Params, Qwen2Config]:
    directory = Path(directory)
    cfg = config_from_hf(load_hf_config(directory), compute_dtype, remat, where=str(directory / "config.json"))
    return load_params(directory, cfg, shardings=shardings), cfg


# ----------------------------------------------------------------------------------------------
# SID vocabulary extension


def _resize_rows(table, old_rows: int, new_rows: int, padded_rows: int, key, noise_std: float):
    """Keep rows < min(old, new); added rows = mean of the old rows (+ noise); zero padding rows."""
    existing = table[:old_rows].astype(jnp.float32)
    added = max(new_rows - old_rows, 0)
    mean = jnp.mean(existing, axis=0)
    new = jnp.broadcast_to(mean, (added, table.shape[1]))
    if noise_std > 0:
        new = new + noise_std * jax.random.normal(key, new.shape, jnp.float32)
    padding = jnp.zeros((padded_rows - new_rows, table.shape[1]), jnp.float32)
    return jnp.concatenate([existing[:min(old_rows, new_rows)], new, padding], axis=0)


def resize_vocab(params: Params, cfg: Qwen2Config, new_vocab_size: int, *, key=None, noise_std: float = 0.0,
                 pad_to_multiple: int = 1) -> tuple[Params, Qwen2Config]:
    """Resize the vocabulary as transformers' resize_token_embeddings(new_vocab_size) with mean init.

    Rows < min(old, new) are kept (Qwen2.5 has spare rows 151665..151935 that SID tokens reuse, as
    upstream), added rows are the mean of the old real rows (transformers also adds noise with 1e-9 x
    their covariance, negligible; here noise is opt-in via noise_std), for the embedding and an untied
    head. Rows are then padded to a multiple of pad_to_multiple; padded rows are zero and their logits
    masked (real_vocab_size = new_vocab_size).
    """
    if noise_std > 0 and key is None:
        raise ValueError("resize_vocab: noise_std > 0 needs a PRNG key")
    padded = round_up(new_vocab_size, pad_to_multiple)
    embed_key, head_key = jax.random.split(key) if key is not None else (None, None)
    resized = dict(params)
    resized["embed"] = _resize_rows(params["embed"], cfg.real_vocab_size, new_vocab_size, padded,
                                    embed_key, noise_std)
    if not cfg.tie_word_embeddings:
        resized["lm_head"] = _resize_rows(params["lm_head"].T, cfg.real_vocab_size, new_vocab_size, padded,
                                          head_key, noise_std).T
    return resized, dataclasses.replace(cfg, vocab_size=padded, real_vocab_size=new_vocab_size)


# ----------------------------------------------------------------------------------------------
# params -> HF directory


def hf_state_dict(params: Params, cfg: Qwen2Config, dtype: str = "float32") -> dict[str, np.ndarray]:
    """Torch-layout numpy tensors (padded vocabulary rows dropped), as Qwen2ForCausalLM names them."""
    np_dtype = np.dtype(dtype)
    tensors = {}
    for hf_name, (name, info, layer, _) in _expected_tensors(cfg).items():
        value = np.asarray(_get(params, _path(name)))
        if info.role == EMBEDDING:
            value = value[:cfg.real_vocab_size]
        elif info.role == HEAD:
            value = value[:, :cfg.real_vocab_size]
        if layer is not None:
            value = value[layer]
        tensors[hf_name] = np.ascontiguousarray(value.T if info.hf_transposed else value).astype(np_dtype)
    return tensors


def _replace_directory(out_dir: Path, write) -> None:
    """Write into a temporary sibling, then swap it in: readers never see a half-written export."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        write(tmp)
        os.chmod(tmp, 0o755)
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / out_dir.name)
            os.replace(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def export(params: Params, cfg: Qwen2Config, tokenizer_info: TokenizerInfo, out_dir: str | Path, *,
           dtype: str = "float32") -> Path:
    """Write config.json, model.safetensors (torch layout, `dtype`) and the tokenizer to out_dir.

    transformers.AutoModelForCausalLM.from_pretrained(out_dir) loads it with no missing or unexpected
    keys. params must be addressable from this process (gather multi-host arrays first).
    """
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"export dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    out_dir = Path(out_dir)
    tensors = hf_state_dict(params, cfg, dtype)
    config = hf_config_dict(cfg, tokenizer_info, dtype)

    def write(directory: Path) -> None:
        save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
        (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_tokenizer(tokenizer_info, directory)

    _replace_directory(out_dir, write)
    return out_dir
