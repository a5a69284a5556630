"""Evaluation refuses bad inputs with one clear line (exit 2): an HF directory without a tokenizer, a
model whose vocabulary lacks the catalogue's SID tokens, a target SID that is not in the catalogue."""

import csv
import shutil
import subprocess

import pytest
from tiny import CLI, REPO

from sidrec.data import minionerec, synthetic
from sidrec.data.minionerec import DataError

FIXTURE_MODEL = REPO / "tests" / "fixtures" / "model" / "tied"


@pytest.fixture
def data_root(tmp_path):
    return synthetic.write_synthetic(tmp_path / "data", n_items=12, n_users=12, seed=1)


def evaluate(tmp_path, data_root, hf_dir):
    return subprocess.run([*CLI, "eval", "--preset", "demo", "--run-dir", str(tmp_path / "run"),
                           "--data.synthetic", "False", "--data.root", str(data_root),
                           "--model.hf-path", str(hf_dir), "--wandb.mode", "disabled"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)


def assert_one_line_error(done, message):
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], done.stderr


def test_hf_directory_without_tokenizer(tmp_path, data_root):
    hf_dir = tmp_path / "model"
    shutil.copytree(FIXTURE_MODEL, hf_dir)  # config.json + model.safetensors, no tokenizer.json
    assert_one_line_error(evaluate(tmp_path, data_root, hf_dir), f"{hf_dir}/tokenizer.json: no tokenizer.json")


def test_model_whose_vocabulary_lacks_the_sid_tokens(tmp_path, data_root):
    hf_dir = tmp_path / "model"
    shutil.copytree(FIXTURE_MODEL, hf_dir)
    texts = ["plain words without any semantic ids"] * 4
    synthetic.train_bpe_tokenizer(texts, sid_tokens=(), vocab_size=300, out_dir=hf_dir)
    assert_one_line_error(evaluate(tmp_path, data_root, hf_dir), "SID tokens")


def test_target_sid_not_in_the_catalogue(data_root):
    [path] = (data_root / "Amazon" / "test").glob("Synthetic_*.csv")
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    rows[1][rows[0].index("item_sid")] = "<a_99><b_99><c_99>"
    with path.open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    catalogue = minionerec.load_catalogue(data_root, "Synthetic")
    with pytest.raises(DataError, match=rf"{path}:2: .*'<a_99><b_99><c_99>'"):
        minionerec.eval_examples(catalogue, "test", tokenizer=None)
