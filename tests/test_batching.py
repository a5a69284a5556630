"""Packed batches: format against HF's shifted-label loss, loader determinism/resume/sharding, cache."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from sidrec.config import ALL_TASKS, DataConfig
from sidrec.data import batching, minionerec, synthetic
from sidrec.data.batching import Layout, Loader
from sidrec.data.minionerec import IGNORE_INDEX, TokenizedExamples

ID_BASE = 100_000  # example i starts with token ID_BASE + i, so a batch tells which examples it holds


def make_data(n=150, seed=0, max_len=60):
    """Random token rows; each starts with its own id token; a random prefix is masked as prompt."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, max_len, size=n)
    tokens, labels = [], []
    for i, length in enumerate(lengths):
        row = np.concatenate([[ID_BASE + i], rng.integers(1, 1000, size=length - 1)])
        label = row.copy()
        label[:rng.integers(1, length)] = IGNORE_INDEX
        tokens.append(row)
        labels.append(label)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return TokenizedExamples(np.concatenate(tokens).astype(np.int32), np.concatenate(labels).astype(np.int32),
                             offsets)


def examples_in(batch):
    """Example ids of a batch shard, in row order (segment starts: position 0 of a real segment)."""
    starts = (batch["positions"] == 0) & (batch["segment_ids"] > 0)
    return (batch["tokens"][starts] - ID_BASE).tolist()


def reference_targets(data, example_ids):
    """HF semantics on the packed row: labels of the concatenation, shifted by one, but no target may
    cross into a new example (its first label has no logit of its own)."""
    labels = np.concatenate([np.where(np.arange(len(lab)) == 0, IGNORE_INDEX, lab)
                             for lab in (data.example(i)[1] for i in example_ids)])
    positions = np.flatnonzero(labels[1:] != IGNORE_INDEX)
    return positions.tolist(), labels[positions + 1].tolist()


def test_first_fit_decreasing_packs_everything_once():
    lengths = np.random.default_rng(1).integers(1, 50, size=300)
    rows = batching.pack_first_fit_decreasing(lengths, 64)
    assert sorted(i for row in rows for i in row) == list(range(300))
    assert all(lengths[row].sum() <= 64 for row in rows)
    assert len(rows) <= 2 * lengths.sum() / 64 + 1  # first fit: at most one row half empty
    with pytest.raises(ValueError, match="does not fit a row of 10"):
        batching.pack_first_fit_decreasing(np.array([11]), 10)


def test_micro_batch_bucket():
    buckets = [batching.micro_batch_bucket(n) for n in range(1, 2000)]
    assert buckets[:16] == list(range(1, 17))
    assert all(0 <= b - n < n / 8 for n, b in enumerate(buckets, 1))  # <= 12.5% padding
    assert len(set(buckets)) == 16 + 7 * 8  # exact up to 16, then 8 values per octave up to 2048


def test_batch_rows_match_hf_shifted_labels():
    data = make_data()
    layout = Layout(seq_len=128, rows_per_device=3, local_device_count=2)
    loader = Loader(data, global_batch_size=40, layout=layout, seed=5)
    batch = next(iter(loader))
    A, R, T = batch["tokens"].shape
    M = loader.plan(0, 0).target_slots
    assert (R, T) == (6, 128) and batch["loss_pos"].shape == (A, 2, M)
    assert {k: v.dtype for k, v in batch.items()} == {
        "tokens": np.int32, "segment_ids": np.int32, "positions": np.int32, "loss_pos": np.int32,
        "loss_tgt": np.int32, "loss_w": np.float32, "n_targets": np.float32, "n_tokens": np.float32}
    seen = 0
    for a in range(A):
        for device in range(2):
            want_positions, want_targets = [], []
            for i in range(3):  # the device's rows, flattened: row i starts at i * T
                r = device * 3 + i
                ids = examples_in({k: batch[k][a, r] for k in ("tokens", "positions", "segment_ids")})
                width = sum(data.lengths[ids])
                assert batch["tokens"][a, r, :width].tolist() == np.concatenate(
                    [data.example(i)[0] for i in ids] or [[]]).tolist()
                assert (batch["segment_ids"][a, r, width:] == 0).all() and (batch["tokens"][a, r, width:] == 0).all()
                assert batch["positions"][a, r, :width].tolist() == [p for i in ids for p in range(data.lengths[i])]
                positions, targets = reference_targets(data, ids) if ids else ([], [])
                want_positions += [i * T + p for p in positions]
                want_targets += targets
                seen += len(ids)
            n = len(want_positions)
            assert n <= M
            assert batch["loss_pos"][a, device, :n].tolist() == want_positions
            assert batch["loss_tgt"][a, device, :n].tolist() == want_targets
            assert batch["loss_w"][a, device].tolist() == [1.0] * n + [0.0] * (M - n)
    assert seen == 40
    assert batch["n_targets"] == batch["loss_w"].sum() == batching.target_counts(data)[
        loader.epoch_order(0)[:40]].sum()


def test_target_slots_bucket():
    buckets = [batching.target_slots_bucket(n) for n in range(1, 5000)]
    assert all(b % 16 == 0 and b >= max(n, 16) for n, b in enumerate(buckets, 1))
    assert all(b - n <= max(n / 4, 15) for n, b in enumerate(buckets, 1))  # <= 25% (or < 16) padding
    assert sorted(set(buckets))[:8] == [16, 32, 48, 64, 80, 96, 112, 128]
    assert sorted(set(b for b in buckets if 1024 < b <= 2048)) == [1280, 1536, 1792, 2048]  # 4 per octave


def test_deal_rows_places_every_row_once_and_balances_the_groups():
    rows = [np.array([i]) for i in range(7)]
    laid_out, most = batching.deal_rows(rows, [9, 1, 8, 2, 7, 3, 0], groups=3, rows_per_group=3)
    assert len(laid_out) == 9
    groups = [[int(r[0]) for r in laid_out[g * 3:(g + 1) * 3] if len(r)] for g in range(3)]
    assert sorted(i for g in groups for i in g) == list(range(7))
    assert groups == [[0, 1, 6], [2, 3], [4, 5]]  # totals 10, 10, 10: most targets first, fewest so far
    assert most == 10
    # Full groups take no more rows: 4 rows of 5 targets and 2 groups of 2 rows.
    laid_out, most = batching.deal_rows([np.array([i]) for i in range(4)], [5, 5, 5, 5], groups=2, rows_per_group=2)
    assert most == 10 and all(len(r) for r in laid_out)


def test_device_loss_slots_are_mostly_used():
    # Per-row slots (N per row) held half of them empty on the five-task mixtures; per-device slots
    # after dealing hold most, on a mixture of target-sparse long and target-dense short examples.
    rng = np.random.default_rng(0)
    lengths = np.where(rng.random(3000) < 0.5, rng.integers(100, 200, 3000), rng.integers(10, 40, 3000))
    targets = np.where(lengths >= 100, 4, lengths // 2)
    layout = Layout(seq_len=512, rows_per_device=4, local_device_count=2)
    used = slots = 0
    for step in range(20):
        ids = np.arange(step * 128, (step + 1) * 128)
        plan = batching.plan_step(ids, lengths, targets, layout, max_targets=96)
        groups = plan.num_micro_batches * 2
        used += plan.n_targets
        slots += groups * plan.target_slots
        per_group = [sum(int(targets[row].sum()) for row in plan.rows[g * 4:(g + 1) * 4]) for g in range(groups)]
        assert max(per_group) <= plan.target_slots
    assert used / slots > 0.7


def test_targets_per_row_bounds_every_row():
    data = make_data(n=400)
    layout = Layout(seq_len=96, rows_per_device=1)
    loader = Loader(data, global_batch_size=64, layout=layout)
    worst = max(int(batching.target_counts(data)[row].sum()) for e in range(3) for plan in loader.epoch_plans(e)
                for row in plan.rows)
    assert worst <= loader.targets_per_row < 4 * worst


def collect(loader, steps):
    iterator = iter(loader)
    return [next(iterator) for _ in range(steps)]


def test_epochs_are_permutations_with_exact_batch_sizes():
    data = make_data(n=150)
    loader = Loader(data, global_batch_size=32, layout=Layout(seq_len=128, rows_per_device=2), seed=3)
    assert loader.steps_per_epoch == 5
    epochs = [[examples_in(b) for b in collect(loader, 5)] for _ in range(2)]
    for steps in epochs:
        assert [len(s) for s in steps] == [32, 32, 32, 32, 22]  # the last step takes the rest
        assert sorted(i for s in steps for i in s) == list(range(150))
    assert epochs[0] != epochs[1]
    assert loader.state() == {"epoch": 2, "step_in_epoch": 0}


def test_order_depends_only_on_seed_and_epoch():
    data = make_data()
    layout = Layout(seq_len=128, rows_per_device=2)
    first = Loader(data, global_batch_size=32, layout=layout, seed=3)
    assert np.array_equal(first.epoch_order(1), Loader(data, global_batch_size=32, layout=layout, seed=3).epoch_order(1))
    assert not np.array_equal(first.epoch_order(1), Loader(data, global_batch_size=32, layout=layout, seed=4).epoch_order(1))


def test_resume_mid_epoch_yields_identical_batches():
    data = make_data()
    layout = Layout(seq_len=128, rows_per_device=2, local_device_count=2)
    uninterrupted = collect(Loader(data, global_batch_size=32, layout=layout, seed=9), 12)
    interrupted = Loader(data, global_batch_size=32, layout=layout, seed=9)
    collect(interrupted, 7)
    state = interrupted.state()
    assert state == {"epoch": 1, "step_in_epoch": 2}
    resumed = collect(Loader(data, global_batch_size=32, layout=layout, seed=9, state=dict(state)), 5)
    for expected, got in zip(uninterrupted[7:], resumed):
        assert expected.keys() == got.keys()
        assert all(np.array_equal(expected[k], got[k]) for k in expected)
    with pytest.raises(ValueError, match="does not fit 5 steps per epoch"):
        interrupted.restore({"epoch": 0, "step_in_epoch": 5})


def test_two_processes_cover_each_example_once_with_equal_shapes():
    data = make_data(n=150)
    loaders = [Loader(data, global_batch_size=32, seed=2,
                      layout=Layout(seq_len=64, rows_per_device=1, local_device_count=2, process_index=p,
                                    process_count=2)) for p in range(2)]
    per_process = [collect(loader, loaders[0].steps_per_epoch) for loader in loaders]
    covered = []
    for step, (mine, theirs) in enumerate(zip(*per_process)):
        assert mine["tokens"].shape == theirs["tokens"].shape and mine["tokens"].shape[1] == 2
        assert mine["tokens"].shape[0] in loaders[0].micro_batch_bound()
        assert mine["n_targets"] == theirs["n_targets"] == mine["loss_w"].sum() + theirs["loss_w"].sum()
        ids = examples_in(mine) + examples_in(theirs)
        assert sorted(ids) == sorted(loaders[0].epoch_order(0)[step * 32:(step + 1) * 32].tolist())
        assert set(examples_in(mine)).isdisjoint(examples_in(theirs))
        covered += ids
    assert sorted(covered) == list(range(150))


def test_shapes_stay_within_bound_and_utilisation_is_high():
    data = make_data(n=2000, max_len=200)
    layout = Layout(seq_len=256, rows_per_device=1, local_device_count=2)
    loader = Loader(data, global_batch_size=256, layout=layout)
    plans = [p for e in range(3) for p in loader.epoch_plans(e)]
    bound = loader.micro_batch_bound()
    seen = {p.num_micro_batches for p in plans}
    assert seen <= set(bound) and len(seen) <= 4
    assert loader.upcoming_shapes(3 * loader.steps_per_epoch) == sorted(
        {(p.num_micro_batches, p.target_slots) for p in plans})
    assert batching.utilisation(plans, layout) > 0.85


def test_valid_batches_visit_the_split_in_order():
    data = make_data(n=70)
    batches = list(batching.valid_batches(data, batch_size=32, layout=Layout(seq_len=128, rows_per_device=2)))
    assert len(batches) == 3
    assert sorted(i for b in batches for i in examples_in(b)) == list(range(70))
    assert sorted(examples_in(batches[0])) == list(range(32))
    assert sum(float(b["n_targets"]) for b in batches) == batching.target_counts(data).sum()


def test_concatenate_and_head():
    a, b = make_data(n=5, seed=1), make_data(n=7, seed=2)
    both = batching.concatenate([a, b])
    assert len(both) == 12
    assert all(np.array_equal(both.example(5 + i)[0], b.example(i)[0]) for i in range(7))
    first = batching.head(both, 3)
    assert len(first) == 3 and np.array_equal(first.example(2)[1], a.example(2)[1])


@pytest.fixture(scope="module")
def synthetic_setup(tmp_path_factory):
    root = synthetic.write_synthetic(tmp_path_factory.mktemp("data"), n_items=30, n_users=30, seed=2)
    catalogue = minionerec.load_catalogue(root, "Synthetic")
    rows = minionerec.load_split(catalogue, "train")
    texts = [e.instruction + e.prompt + e.target for e in minionerec.training_examples(catalogue, ALL_TASKS, rows)]
    tokenizer = synthetic.train_bpe_tokenizer(texts, catalogue.sid_tokens, vocab_size=400)
    return DataConfig(root=str(root), category="Synthetic", cutoff_len=256), tokenizer


def test_tokenization_cache_is_reused_and_invalidated(synthetic_setup, tmp_path, monkeypatch):
    cfg, tokenizer = synthetic_setup
    cold = batching.load_training_data(cfg, tokenizer, tmp_path)
    assert len(list(tmp_path.glob("Synthetic.*.train.*.npz"))) == len(ALL_TASKS)
    expected = minionerec.tokenize_examples(
        minionerec.training_examples(minionerec.load_catalogue(cfg.root, cfg.category), ALL_TASKS,
                                     minionerec.load_split(minionerec.load_catalogue(cfg.root, cfg.category), "train")),
        tokenizer, cfg.cutoff_len)
    assert all(np.array_equal(getattr(cold, k), getattr(expected, k)) for k in ("tokens", "labels", "offsets"))

    def no_tokenizing(*_):
        raise AssertionError("re-tokenized although the cache is warm")

    monkeypatch.setattr(minionerec, "tokenize_examples", no_tokenizing)
    warm = batching.load_training_data(cfg, tokenizer, tmp_path)
    assert all(np.array_equal(getattr(cold, k), getattr(warm, k)) for k in ("tokens", "labels", "offsets"))
    monkeypatch.undo()
    changed = batching.load_training_data(dataclasses.replace(cfg, upstream_typos=False), tokenizer, tmp_path)
    assert len(list(tmp_path.glob("Synthetic.*.train.*.npz"))) == 2 * len(ALL_TASKS)
    assert not np.array_equal(changed.tokens, cold.tokens)
    assert not list(tmp_path.glob("*.tmp"))


def test_validation_data_and_subset_mixture(synthetic_setup, tmp_path):
    cfg, tokenizer = synthetic_setup
    valid = batching.load_validation_data(dataclasses.replace(cfg, valid_max_samples=5), tokenizer, tmp_path)
    assert len(valid) == 5
    only_sid = batching.load_training_data(dataclasses.replace(cfg, tasks=("sid_sft",)), tokenizer, tmp_path)
    assert len(only_sid) == len(minionerec.load_split(minionerec.load_catalogue(cfg.root, cfg.category), "train"))
    with pytest.raises(minionerec.DataError, match="unknown task"):
        batching.load_training_data(dataclasses.replace(cfg, tasks=("nope",)), tokenizer, tmp_path)


SHARED = Path(__file__).parents[2] / "shared"


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "data").is_dir(), reason=f"{SHARED} (MiniOneRec data) is absent")
def test_industrial_mixture_utilisation(tmp_path):
    from sidrec.tokenizer import add_sid_tokens, load_tokenizer

    cfg = DataConfig(root=str(SHARED / "data"))
    catalogue = minionerec.load_catalogue(cfg.root, cfg.category)
    tokenizer = add_sid_tokens(load_tokenizer(SHARED / "tokenizers" / "qwen2.5"), catalogue.sid_tokens)
    data = batching.load_training_data(cfg, tokenizer, tmp_path)
    for devices, rows in ((1, 2), (8, 1), (8, 2)):
        layout = Layout(seq_len=1024, rows_per_device=rows, local_device_count=devices)
        loader = Loader(data, global_batch_size=1024, layout=layout, seed=42)
        assert batching.utilisation(loader.epoch_plans(0), layout) >= 0.85
