"""Bad inputs fail early with a DataError that names the file and the line (or key)."""

import csv
import json

import pytest

from sidrec.data import minionerec, synthetic
from sidrec.data.minionerec import DataError


@pytest.fixture
def root(tmp_path):
    return synthetic.write_synthetic(tmp_path / "data", n_items=12, n_users=12, seed=1)


def split_file(root, split):
    [path] = (root / "Amazon" / split).glob("Synthetic_*.csv")
    return path


def rewrite_csv(path, edit):
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    rows = edit(rows)
    with path.open("w", newline="") as f:
        csv.writer(f).writerows(rows)


def load(root, split="train"):
    return minionerec.load_split(minionerec.load_catalogue(root, "Synthetic"), split)


def test_data_error_is_a_value_error():
    assert issubclass(DataError, ValueError)


def test_missing_directory(tmp_path):
    with pytest.raises(DataError, match=rf"{tmp_path / 'nowhere'}: no Amazon/index directory.*--data.root"):
        minionerec.load_catalogue(tmp_path / "nowhere", "Synthetic")


def test_missing_category(root):
    with pytest.raises(DataError, match=r"Office_Products\.index\.json: not found.*categories there: \['Synthetic'\]"):
        minionerec.load_catalogue(root, "Office_Products")


def test_csv_missing_column(root):
    path = split_file(root, "train")
    rewrite_csv(path, lambda rows: [row[:-1] for row in rows])
    with pytest.raises(DataError, match=rf"{path}:1: missing column\(s\) \['item_sid'\]"):
        load(root)


def test_malformed_list_cell(root):
    path = split_file(root, "train")

    def break_row_3(rows):
        rows[3][5] = rows[3][5][:-1]  # history_item_sid loses its closing bracket
        return rows

    rewrite_csv(path, break_row_3)
    with pytest.raises(DataError, match=rf"{path}:4: column 'history_item_sid' must be a Python list literal"):
        load(root)


def test_list_cell_is_never_evaluated(root):
    path = split_file(root, "train")

    def inject(rows):
        rows[1][5] = "__import__('os').getcwd()"
        return rows

    rewrite_csv(path, inject)
    with pytest.raises(DataError, match=rf"{path}:2: column 'history_item_sid'"):
        load(root)


def test_history_sid_not_in_index(root):
    path = split_file(root, "valid")

    def unknown_sid(rows):
        rows[2][5] = repr(["<a_99><b_99><c_99>"] * len(json.loads(rows[2][3])))
        return rows

    rewrite_csv(path, unknown_sid)
    with pytest.raises(DataError, match=rf"{path}:3: SID '<a_99><b_99><c_99>' is not in Synthetic\.index\.json"):
        load(root, "valid")


def test_sids_of_mixed_depth(root):
    path = root / "Amazon" / "index" / "Synthetic.index.json"
    index = json.loads(path.read_text())
    index["7"] = index["7"][:2]
    path.write_text(json.dumps(index))
    with pytest.raises(DataError, match=rf"{path}: key '7' has a SID of depth 2 but key '0' has depth 3"):
        minionerec.load_catalogue(root, "Synthetic")


def test_empty_split(root):
    path = split_file(root, "test")
    rewrite_csv(path, lambda rows: rows[:1])
    with pytest.raises(DataError, match=rf"{path}: the test split has no rows"):
        load(root, "test")


def test_synthetic_refuses_to_overwrite(root):
    with pytest.raises(DataError, match="already exists"):
        synthetic.write_synthetic(root, n_items=12, n_users=12, seed=1)
