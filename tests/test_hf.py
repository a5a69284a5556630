"""sidrec.model.hf: config.json parsing, safetensors loading (single, sharded, broken), SID vocabulary
extension against upstream's golden ids, and export round trips (optionally through transformers)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from tokenizers import Tokenizer
from tokenizers.models import WordLevel

from sidrec.model import hf, qwen2
from sidrec.tokenizer import add_sid_tokens, describe, load_tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "model"
SHARED = Path(__file__).parents[2] / "shared"
NAMES = ("tied", "untied")

forward = jax.jit(qwen2.forward, static_argnums=1)


def reference_batch(name):
    ref = np.load(FIXTURES / name / "reference.npz")
    mask = ref["mask"]
    return ref["tokens"], mask, np.maximum(np.cumsum(mask, axis=1) - 1, 0)


def read_tensors(directory: Path) -> dict[str, np.ndarray]:
    return load_file(directory / "model.safetensors")


def checkpoint_with(directory: Path, name: str, tensors: dict[str, np.ndarray]) -> Path:
    """directory: fixture `name`'s config.json with a model.safetensors holding exactly `tensors`."""
    directory.mkdir()
    shutil.copy(FIXTURES / name / "config.json", directory)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


def tiny_tokenizer():
    vocab = {"<unk>": 0, "\n": 1, "<|endoftext|>": 2, "<|im_end|>": 3}
    return describe(Tokenizer(WordLevel(vocab, unk_token="<unk>")), "<|im_end|>")


def assert_same_params(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ----------------------------------------------------------------------------------------------
# config.json


def test_config_from_transformers5_file():
    cfg = hf.config_from_hf(hf.load_hf_config(FIXTURES / "tied"), "bfloat16", True)
    assert (cfg.vocab_size, cfg.real_vocab_size, cfg.hidden_size, cfg.num_layers) == (320, 320, 64, 2)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (4, 2, 16)
    assert cfg.rope_theta == 1e6  # from rope_parameters (transformers 5 layout)
    assert cfg.tie_word_embeddings and cfg.compute_dtype == "bfloat16" and cfg.remat
    untied = hf.config_from_hf(hf.load_hf_config(FIXTURES / "untied"))
    assert not untied.tie_word_embeddings and untied.rms_norm_eps == 1e-5 and untied.head_dim == 8


def test_config_from_transformers4_layout_and_defaults():
    qwen25_like = {"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960,
                   "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
                   "rope_theta": 1000000.0, "rope_scaling": None, "tie_word_embeddings": True,
                   "use_sliding_window": False, "sliding_window": 32768}
    cfg = hf.config_from_hf(qwen25_like)
    assert (cfg.head_dim, cfg.rope_theta, cfg.tie_word_embeddings) == (128, 1e6, True)
    minimal = {k: qwen25_like[k] for k in ("vocab_size", "hidden_size", "intermediate_size",
                                           "num_hidden_layers", "num_attention_heads")}
    cfg = hf.config_from_hf(minimal)
    # transformers' Qwen2Config defaults: untied, MHA, rope_theta 10000, eps 1e-6.
    assert (cfg.tie_word_embeddings, cfg.num_kv_heads, cfg.rope_theta, cfg.rms_norm_eps) == (False, 12, 1e4, 1e-6)


@pytest.mark.parametrize("change, drop, message", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, (), "rope_scaling.rope_type 'yarn'"),
    ({"use_sliding_window": True}, (), "use_sliding_window"),
    ({"model_type": "llama"}, (), "model_type 'llama'"),
    ({}, ("hidden_size",), "missing field(s) ['hidden_size']"),
    ({"num_key_value_heads": 4}, (), "num_heads (6) must be a multiple of num_kv_heads (4)"),
])
def test_unsupported_configs_are_refused(change, drop, message):
    config = {k: v for k, v in hf.load_hf_config(FIXTURES / "untied").items() if k not in drop} | change
    with pytest.raises(hf.CheckpointError) as error:
        hf.config_from_hf(config, where="x/config.json")
    assert str(error.value).startswith("x/config.json: ") and message in str(error.value)


def test_missing_config_names_the_file(tmp_path):
    with pytest.raises(hf.CheckpointError, match=r"config\.json: not found"):
        hf.load_model(tmp_path)


# ----------------------------------------------------------------------------------------------
# Loading


@pytest.mark.parametrize("name", NAMES)
def test_loaded_params_are_the_checkpoint_tensors_in_our_layout(name):
    params, cfg = hf.load_model(FIXTURES / name)
    tensors = read_tensors(FIXTURES / name)
    np.testing.assert_array_equal(params["layers"]["wq"][1], tensors["model.layers.1.self_attn.q_proj.weight"].T)
    np.testing.assert_array_equal(params["layers"]["bk"][0], tensors["model.layers.0.self_attn.k_proj.bias"])
    np.testing.assert_array_equal(params["layers"]["w_down"][0], tensors["model.layers.0.mlp.down_proj.weight"].T)
    np.testing.assert_array_equal(params["final_norm"], tensors["model.norm.weight"])
    assert ("lm_head" in params) == (not cfg.tie_word_embeddings) == ("lm_head.weight" in tensors)
    assert jax.tree.map(lambda a: a.shape, params) == jax.tree.map(lambda a: a.shape, qwen2.abstract_params(cfg))


def test_sharded_checkpoint_loads_like_a_single_file(tmp_path):
    tensors = read_tensors(FIXTURES / "untied")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, shard_names in shards.items():
        save_file({n: tensors[n] for n in shard_names}, str(tmp_path / file), metadata={"format": "pt"})
    weight_map = {n: file for file, shard_names in shards.items() for n in shard_names}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    shutil.copy(FIXTURES / "untied" / "config.json", tmp_path)
    assert_same_params(hf.load_model(tmp_path)[0], hf.load_model(FIXTURES / "untied")[0])


def test_bad_checkpoint_lists_every_problem_by_tensor_name(tmp_path):
    tensors = read_tensors(FIXTURES / "untied")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.0.self_attn.k_proj.bias"] = np.zeros(7, np.float32)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.zeros(4, np.float32)
    tensors["model.layers.2.input_layernorm.weight"] = np.ones(48, np.float32)  # config says 2 layers
    directory = checkpoint_with(tmp_path / "bad", "untied", tensors)
    with pytest.raises(hf.CheckpointError) as error:
        hf.load_model(directory)
    message = str(error.value)
    assert str(directory) in message and "4 problem(s)" in message
    assert "missing model.layers.1.mlp.up_proj.weight (expected shape [96, 48])" in message
    assert "model.layers.0.self_attn.k_proj.bias has shape [7], expected [16]" in message
    assert "unexpected tensor model.layers.0.self_attn.rotary_emb.inv_freq" in message
    assert "unexpected tensor model.layers.2.input_layernorm.weight" in message


def test_bfloat16_checkpoint_loads_as_float32(tmp_path):
    import ml_dtypes

    tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in read_tensors(FIXTURES / "tied").items()}
    params, _ = hf.load_model(checkpoint_with(tmp_path / "bf16", "tied", tensors))
    assert params["embed"].dtype == jnp.float32
    np.testing.assert_array_equal(params["embed"], tensors["model.embed_tokens.weight"].astype(np.float32))


def test_tied_checkpoint_with_a_stored_head(tmp_path):
    tensors = read_tensors(FIXTURES / "tied")
    same = dict(tensors, **{"lm_head.weight": tensors["model.embed_tokens.weight"].copy()})
    assert_same_params(hf.load_model(checkpoint_with(tmp_path / "same", "tied", same))[0],
                       hf.load_model(FIXTURES / "tied")[0])
    different = dict(tensors, **{"lm_head.weight": tensors["model.embed_tokens.weight"] + 1})
    with pytest.raises(hf.CheckpointError, match="lm_head.weight differs from model.embed_tokens.weight"):
        hf.load_model(checkpoint_with(tmp_path / "different", "tied", different))


# ----------------------------------------------------------------------------------------------
# SID vocabulary extension


def test_resize_vocab_keeps_old_rows_and_initialises_new_rows_with_the_mean():
    cfg = qwen2.Qwen2Config(vocab_size=10, real_vocab_size=10, hidden_size=4, intermediate_size=8, num_layers=1,
                            num_heads=2, num_kv_heads=1, head_dim=2, tie_word_embeddings=False)
    rng = np.random.default_rng(0)
    params = {"embed": rng.normal(size=(10, 4)).astype(np.float32),
              "lm_head": rng.normal(size=(4, 10)).astype(np.float32)}  # resize_vocab touches only these
    grown, grown_cfg = hf.resize_vocab(params, cfg, 13, pad_to_multiple=8)
    assert (grown_cfg.vocab_size, grown_cfg.real_vocab_size) == (16, 13)
    embed, head = np.asarray(grown["embed"]), np.asarray(grown["lm_head"])
    np.testing.assert_array_equal(embed[:10], params["embed"])
    np.testing.assert_allclose(embed[10:13], np.broadcast_to(np.mean(params["embed"], axis=0), (3, 4)), rtol=1e-6)
    np.testing.assert_allclose(head[:, 10:13].T, np.broadcast_to(np.mean(params["lm_head"], axis=1), (3, 4)),
                               rtol=1e-6)
    assert (embed[13:] == 0).all() and (head[:, 13:] == 0).all()
    shrunk, shrunk_cfg = hf.resize_vocab(params, cfg, 6)
    np.testing.assert_array_equal(shrunk["embed"], params["embed"][:6])
    assert shrunk_cfg.vocab_size == shrunk_cfg.real_vocab_size == 6
    noisy, _ = hf.resize_vocab(params, cfg, 13, key=jax.random.key(1), noise_std=0.1)
    assert not np.allclose(noisy["embed"][10], noisy["embed"][11])
    with pytest.raises(ValueError, match="PRNG key"):
        hf.resize_vocab(params, cfg, 13, noise_std=0.1)


@pytest.mark.parametrize("category", ["Industrial_and_Scientific", "Office_Products"])
def test_sid_vocabulary_extension_matches_upstream(category):
    golden_path = SHARED / "reference" / "golden_sft_examples.json"
    index_path = SHARED / "data" / "Amazon" / "index" / f"{category}.index.json"
    if not (golden_path.is_file() and index_path.is_file()):
        pytest.skip(f"shared reference material absent ({SHARED}); clone with ../shared to run this check")
    golden = json.loads(golden_path.read_text())["categories"][category]
    sid_tokens = {t for item in json.loads(index_path.read_text()).values() for t in item}
    info = add_sid_tokens(load_tokenizer(SHARED / "tokenizers" / "qwen2.5"), sid_tokens)
    vocab = info.tokenizer.get_vocab_size(with_added_tokens=True)
    assert vocab == golden["vocab_size"] == {"Industrial_and_Scientific": 152225, "Office_Products": 152265}[category]
    assert {t: info.tokenizer.token_to_id(t) for t in golden["sid_token_ids"]} == golden["sid_token_ids"]

    # Qwen2.5-1.5B shapes in the vocabulary axis (151936 rows), a toy width.
    cfg = qwen2.Qwen2Config(vocab_size=151936, real_vocab_size=151936, hidden_size=4, intermediate_size=8,
                            num_layers=1, num_heads=2, num_kv_heads=1, head_dim=2, tie_word_embeddings=True)
    embed = jax.random.normal(jax.random.key(0), (151936, 4))
    params = {"embed": embed}
    grown, grown_cfg = hf.resize_vocab(params, cfg, vocab, pad_to_multiple=128)
    assert grown_cfg.real_vocab_size == vocab and grown_cfg.vocab_size % 128 == 0
    # SID ids below 151936 reuse Qwen's spare rows (as upstream); the rest start at the mean.
    reused = [i for i in golden["sid_token_ids"].values() if i < 151936]
    added = [i for i in golden["sid_token_ids"].values() if i >= 151936]
    assert len(reused) == 151936 - 151665 and len(added) == vocab - 151936
    np.testing.assert_array_equal(grown["embed"][:151936], embed)
    np.testing.assert_allclose(grown["embed"][np.array(added)],
                               np.broadcast_to(np.mean(np.asarray(embed), axis=0), (len(added), 4)), atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Export


@pytest.mark.parametrize("name", NAMES)
def test_export_round_trip_is_exact(tmp_path, name):
    params, cfg = hf.load_model(FIXTURES / name)
    out = hf.export(params, cfg, tiny_tokenizer(), tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json",
                                                     "tokenizer_config.json"]
    assert set(read_tensors(out)) == set(read_tensors(FIXTURES / name))  # tied: no lm_head.weight
    again, again_cfg = hf.load_model(out)
    assert again_cfg == cfg
    assert_same_params(again, params)
    tokens, mask, positions = reference_batch(name)
    np.testing.assert_array_equal(forward(again, again_cfg, tokens, mask, positions),
                                  forward(params, cfg, tokens, mask, positions))
    assert not [p for p in tmp_path.iterdir() if p.name != "export"]  # no temporary directories left


def test_export_drops_padded_rows_and_replaces_an_existing_directory(tmp_path):
    params, cfg = hf.load_model(FIXTURES / "untied")
    grown, grown_cfg = hf.resize_vocab(params, cfg, cfg.vocab_size + 5, pad_to_multiple=64)
    assert grown_cfg.vocab_size == 320
    out = tmp_path / "export"
    out.mkdir()
    (out / "stale.txt").write_text("from an earlier export")
    hf.export(grown, grown_cfg, tiny_tokenizer(), out, dtype="bfloat16")
    assert not (out / "stale.txt").exists()
    config = json.loads((out / "config.json").read_text())
    assert (config["vocab_size"], config["torch_dtype"], config["eos_token_id"]) == (305, "bfloat16", 3)
    again, again_cfg = hf.load_model(out)
    assert (again_cfg.vocab_size, again_cfg.real_vocab_size) == (305, 305)
    np.testing.assert_array_equal(again["lm_head"], np.asarray(grown["lm_head"][:, :305]).astype(jnp.bfloat16)
                                  .astype(np.float32))


@pytest.mark.torch
@pytest.mark.parametrize("name", NAMES)
def test_transformers_loads_the_export_with_no_key_warnings(tmp_path, name):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    params, cfg = hf.load_model(FIXTURES / name)
    params, cfg = hf.resize_vocab(params, cfg, cfg.vocab_size + 3, pad_to_multiple=32)  # padding dropped
    out = hf.export(params, cfg, tiny_tokenizer(), tmp_path / "export")
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True,
                                                                    attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    tokens, mask, positions = reference_batch(name)
    with torch.no_grad():
        theirs = model(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask),
                       position_ids=torch.tensor(positions, dtype=torch.long)).logits.numpy()
    ours = np.asarray(forward(params, cfg, tokens, mask, positions))[..., :cfg.real_vocab_size]
    assert theirs.shape == ours.shape
    assert np.abs(theirs - ours)[mask == 1].max() <= 1e-4  # fp32 vs fp32, as in test_model
