"""Input files as users have them (issue 16).

Files saved by spreadsheets and editors (UTF-8 with a BOM, CRLF or LF line endings, trailing blank
lines) load exactly like the originals. Files that cannot be used (bytes that are not UTF-8, JSON cut
short, info lines missing fields, csv item ids missing from the index, HF tensors of the wrong dtype,
damaged safetensors or tokenizer files, invalid config.json) end in one located error; through the CLI
that is exit code 2 and a single `error:` line.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from tiny import CLI, REPO

from sidrec.data import minionerec, synthetic
from sidrec.data.minionerec import DataError
from sidrec.model import hf
from sidrec.tokenizer import TokenizerError, load_tokenizer

FIXTURE_MODEL = REPO / "tests" / "fixtures" / "model" / "tied"
CATEGORY = "Synthetic"


@pytest.fixture
def root(tmp_path):
    return synthetic.write_synthetic(tmp_path / "data", n_items=12, n_users=12, seed=1)


def data_files(root):
    amazon = root / "Amazon"
    return {"index": amazon / "index" / f"{CATEGORY}.index.json",
            "item": amazon / "index" / f"{CATEGORY}.item.json",
            "info": next((amazon / "info").glob(f"{CATEGORY}_*.txt")),
            **{split: next((amazon / split).glob(f"{CATEGORY}_*.csv")) for split in minionerec.SPLITS}}


def load_everything(root):
    """The catalogue (less its paths) and every split's rows: what training and eval read."""
    catalogue = minionerec.load_catalogue(root, CATEGORY)
    fields = {f.name: getattr(catalogue, f.name) for f in dataclasses.fields(catalogue) if f.name != "paths"}
    return fields, {split: minionerec.load_split(catalogue, split) for split in minionerec.SPLITS}


def resave(path, *, bom=False, newline=None, blank_lines=0):
    """`path` as another tool would save it: a BOM, other line endings, blank lines at the end."""
    text = path.read_bytes().decode("utf-8").replace("\r\n", "\n")
    if newline is not None:
        text = text.replace("\n", newline)
    text += (newline or "\n") * blank_lines
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))


def line_of(path, predicate):
    """1-based number of the first line of `path` for which predicate(line) holds."""
    return next(i for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if predicate(line))


# ------------------------------------------------------------------------------------------------
# files that must load


@pytest.mark.parametrize("style", [
    dict(bom=True),
    dict(newline="\r\n"),
    dict(newline="\n"),
    dict(blank_lines=3),
    dict(bom=True, newline="\r\n", blank_lines=2),
], ids=["bom", "crlf", "lf", "trailing-blank-lines", "all-three"])
def test_spreadsheet_and_editor_files_load_like_the_originals(root, style):
    expected = load_everything(root)
    for path in data_files(root).values():
        resave(path, **style)
    assert load_everything(root) == expected


def test_a_bom_in_the_tokenizer_config_is_accepted(tmp_path):
    out = tmp_path / "tok"
    synthetic.train_bpe_tokenizer(["a few plain words"] * 4, sid_tokens=("<a_0>",), vocab_size=300, out_dir=out)
    expected = load_tokenizer(out).eos_token
    resave(out / "tokenizer_config.json", bom=True, newline="\r\n")
    assert load_tokenizer(out).eos_token == expected


# ------------------------------------------------------------------------------------------------
# files that cannot be used: one located error each


def test_bytes_that_are_not_utf8_name_the_file_and_line(root):
    path = data_files(root)["train"]
    lines = path.read_bytes().split(b"\n")
    lines[2] = lines[2].replace(b"Sensor", b"Sens\xe9r", 1)  # Latin-1 'é', as a spreadsheet might save it
    assert b"\xe9" in lines[2]
    path.write_bytes(b"\xef\xbb\xbf" + b"\n".join(lines))  # the BOM must not shift the reported offset
    offset = path.read_bytes().index(b"\xe9")
    with pytest.raises(DataError, match=rf"^{path}:3: byte 0xe9 at offset {offset} is not UTF-8 .*re-save"):
        load_everything(root)


def test_non_utf8_json_names_its_line(root):
    path = data_files(root)["item"]
    text = json.dumps(json.loads(path.read_text()), indent=2).encode()
    at = text.index(b"Valve")
    path.write_bytes(text[:at] + b"\xff" + text[at:])
    line = text.count(b"\n", 0, at) + 1
    with pytest.raises(DataError, match=rf"^{path}:{line}: byte 0xff at offset {at} is not UTF-8"):
        load_everything(root)


@pytest.mark.parametrize("name", ["index", "item"])
def test_json_cut_short_says_so(root, name):
    path = data_files(root)[name]
    text = json.dumps(json.loads(path.read_text()), indent=1)
    path.write_text(text[: len(text) * 2 // 3])
    with pytest.raises(DataError, match=rf"^{path}:\d+: not valid JSON .*cut short"):
        load_everything(root)


def test_json_with_a_syntax_error_is_not_called_cut_short(root):
    path = data_files(root)["index"]
    path.write_text(path.read_text().replace(",", ";", 1))
    with pytest.raises(DataError, match=rf"^{path}:1: not valid JSON .*fix the JSON syntax") as error:
        load_everything(root)
    assert "cut short" not in str(error.value)


@pytest.mark.parametrize("damage", ["drop-title-and-id", "drop-id", "no-tabs"])
def test_info_line_missing_fields_names_the_line(root, damage):
    path = data_files(root)["info"]
    lines = path.read_text().splitlines()
    sid, title, item_id = lines[4].split("\t")
    lines[4] = {"drop-title-and-id": sid, "drop-id": f"{sid}\t{title}", "no-tabs": f"{sid} {title} {item_id}"}[damage]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"^{path}:5: expected 'sid<TAB>title<TAB>item_id'.*fix or remove"):
        load_everything(root)


def edit_first_row(path, column, edit):
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    at = rows[0].index(column)
    rows[1][at] = edit(rows[1][at])
    with path.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)


@pytest.mark.parametrize("split", minionerec.SPLITS)
def test_csv_item_id_missing_from_the_index(root, split):
    path = data_files(root)[split]
    edit_first_row(path, "item_id", lambda _: "999999")
    with pytest.raises(DataError, match=rf"^{path}:2: item_id '999999' is not a key of .*index.json"):
        load_everything(root)


def test_csv_history_item_id_missing_from_the_index(root):
    path = data_files(root)["train"]
    edit_first_row(path, "history_item_id", lambda cell: re.sub(r"\d+", "888888", cell, count=1))
    with pytest.raises(DataError, match=rf"^{path}:2: history_item_id '888888' is not a key of .*index.json"):
        load_everything(root)


# ------------------------------------------------------------------------------------------------
# HF directories and tokenizers


def copy_model(tmp_path, root=None):
    """The tiny fixture model; with `root`, plus a tokenizer that knows root's SID tokens (as eval needs)."""
    directory = tmp_path / "model"
    shutil.copytree(FIXTURE_MODEL, directory)
    if root is not None:
        sid_tokens = minionerec.load_catalogue(root, CATEGORY).sid_tokens
        synthetic.train_bpe_tokenizer(["plain words"] * 4, sid_tokens=sid_tokens, vocab_size=300, out_dir=directory)
    return directory


def test_hf_tensor_of_an_integer_dtype_is_refused_by_name(tmp_path):
    directory = copy_model(tmp_path)
    tensors = load_file(directory / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.weight"
    tensors[name] = tensors[name].astype(np.int8)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(hf.CheckpointError, match=rf"^{directory}: .*1 problem.*{name} has dtype I8 .*quantized"):
        hf.load_model(directory)


def test_hf_tensor_of_the_wrong_shape_names_the_config_field(tmp_path):
    directory = copy_model(tmp_path)
    tensors = load_file(directory / "model.safetensors")
    name = "model.layers.0.mlp.down_proj.weight"
    tensors[name] = tensors[name][:, :-1].copy()
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(hf.CheckpointError, match=rf"{name} has shape .*config.json hidden_size x intermediate_size"):
        hf.load_model(directory)


def test_truncated_safetensors_is_one_error_naming_the_file(tmp_path):
    directory = copy_model(tmp_path)
    path = directory / "model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(hf.CheckpointError, match=rf"^{path}: cannot be read as safetensors .*download or export"):
        hf.load_model(directory)


def test_shard_index_naming_a_shard_that_lacks_the_tensor(tmp_path):
    directory = copy_model(tmp_path)
    tensors = load_file(directory / "model.safetensors")
    (directory / "model.safetensors").unlink()
    names = sorted(tensors)
    save_file({n: tensors[n] for n in names[1:]}, str(directory / "a.safetensors"), metadata={"format": "pt"})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": dict.fromkeys(names, "a.safetensors")}))
    with pytest.raises(hf.CheckpointError, match=rf"missing {names[0]}: the index lists it in a.safetensors"):
        hf.load_model(directory)


@pytest.mark.parametrize("field, value, message", [
    ("hidden_size", "48", "hidden_size must be a positive integer, got '48'"),
    ("num_hidden_layers", 0, "num_hidden_layers must be a positive integer, got 0"),
    ("rms_norm_eps", None, None),  # null means the default
    ("rope_theta", -1.0, "rope_theta must be a positive number"),
    ("tie_word_embeddings", "yes", "tie_word_embeddings must be true or false"),
])
def test_config_json_field_types(tmp_path, field, value, message):
    directory = copy_model(tmp_path)
    config = json.loads((directory / "config.json").read_text())
    config[field] = value
    (directory / "config.json").write_text(json.dumps(config))
    if message is None:
        hf.load_model(directory)
        return
    with pytest.raises(hf.CheckpointError, match=rf"^{directory / 'config.json'}: {message}.*fix config.json"):
        hf.load_model(directory)


def test_config_json_cut_short_or_not_an_object(tmp_path):
    directory = copy_model(tmp_path)
    path = directory / "config.json"
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    with pytest.raises(hf.CheckpointError, match=rf"^{path}:\d+: not valid JSON .*cut short"):
        hf.load_model(directory)
    path.write_text("[1, 2]")
    with pytest.raises(hf.CheckpointError, match=rf"^{path}: expected a JSON object"):
        hf.load_model(directory)


def test_damaged_tokenizer_files(tmp_path):
    out = tmp_path / "tok"
    synthetic.train_bpe_tokenizer(["a few plain words"] * 4, sid_tokens=(), vocab_size=300, out_dir=out)
    config = out / "tokenizer_config.json"
    config.write_bytes(config.read_bytes()[:-5])
    with pytest.raises(TokenizerError, match=rf"^{config}:\d+: not valid JSON .*cut short"):
        load_tokenizer(out)
    (out / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(TokenizerError, match=rf"^{out / 'tokenizer.json'}: cannot be read as a Hugging Face"):
        load_tokenizer(out)


# ------------------------------------------------------------------------------------------------
# through the CLI: exit code 2 and one `error:` line


def load_cli():
    if "sidrec_cli" not in sys.modules:  # registered first: dataclasses look their module up there
        spec = importlib.util.spec_from_file_location("sidrec_cli", REPO / "cli.py")
        sys.modules["sidrec_cli"] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules["sidrec_cli"]


def run_cli_in_process(capsys, args):
    code = load_cli().main(args)
    return code, capsys.readouterr().err


def assert_one_error_line(code, stderr, message):
    assert code == 2, stderr[-2000:]
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], stderr


def damage_csv_bytes(root):
    path = data_files(root)["test"]
    path.write_bytes(path.read_bytes().replace(b"Valve", b"Valv\xe9", 1))
    return f"{path}:"


def damage_index_cut_short(root):
    path = data_files(root)["index"]
    path.write_text(path.read_text()[:-10])
    return "cut short"


def damage_info_fields(root):
    path = data_files(root)["info"]
    lines = path.read_text().splitlines()
    lines[0] = lines[0].split("\t")[0]
    path.write_text("\n".join(lines) + "\n")
    return f"{path}:1: expected 'sid<TAB>title<TAB>item_id'"


def damage_test_item_id(root):
    path = data_files(root)["test"]
    edit_first_row(path, "item_id", lambda _: "999999")
    return f"{path}:2: item_id '999999'"


DATA_DAMAGE = {"non-utf8-csv": damage_csv_bytes, "index-cut-short": damage_index_cut_short,
               "info-missing-fields": damage_info_fields, "unknown-item-id": damage_test_item_id}


@pytest.mark.parametrize("damage", DATA_DAMAGE)
def test_cli_data_errors_are_one_line_exit_2(tmp_path, root, capsys, damage):
    model = copy_model(tmp_path, root)
    message = DATA_DAMAGE[damage](root)
    code, stderr = run_cli_in_process(capsys, [
        "eval", "--preset", "demo", "--run-dir", str(tmp_path / "run"), "--data.synthetic", "False",
        "--data.root", str(root), "--model.hf-path", str(model), "--wandb.mode", "disabled"])
    assert_one_error_line(code, stderr, message)


def test_cli_hf_dtype_error_is_one_line_exit_2_in_a_fresh_process(tmp_path, root):
    """One real subprocess, so nothing printed at import or by JAX slips past the assertion."""
    directory = copy_model(tmp_path, root)
    tensors = load_file(directory / "model.safetensors")
    tensors["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"].astype(np.int32)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    done = subprocess.run([*CLI, "eval", "--preset", "demo", "--run-dir", str(tmp_path / "run"),
                           "--data.synthetic", "False", "--data.root", str(root),
                           "--model.hf-path", str(directory), "--wandb.mode", "disabled"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert_one_error_line(done.returncode, done.stderr, "model.embed_tokens.weight has dtype I32")


def test_generation_config_never_changes_the_ranking(tmp_path, root, capsys):
    """Instruct checkpoints ship generation_config.json with sampling settings (top_k/top_p/temperature,
    upstream issues #49/#57); beam search here reads none of it, so the predictions are identical."""
    model = copy_model(tmp_path, root)

    def predictions(run):
        code, stderr = run_cli_in_process(capsys, [
            "eval", "--preset", "demo", "--run-dir", str(tmp_path / run), "--data.synthetic", "False",
            "--data.root", str(root), "--model.hf-path", str(model), "--wandb.mode", "disabled",
            "--eval.max-samples", "4", "--eval.num-beams", "8"])
        assert code == 0, stderr
        return json.loads((tmp_path / run / "eval_predictions.json").read_text())

    without = predictions("plain")
    (model / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "top_k": 20, "top_p": 0.8, "temperature": 0.7, "repetition_penalty": 1.05,
         "num_beams": 1, "length_penalty": 2.0}))
    assert predictions("instruct") == without
    # "input" is the user input inside the prompt (the demo preset uses the training wording)
    assert [r["input"] for r in without] == [e.input for e in minionerec.eval_examples(
        minionerec.load_catalogue(root, CATEGORY), "test", load_tokenizer(model), wording="training")[:4]]
