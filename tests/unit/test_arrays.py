"""Per-image arrays written once and read back in RAM or from disk, batch for batch the same."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from tasks.ml.arrays import ArrayStore, Budget, StoreWriter, budget_bytes

KEY = {"what": "features", "manifest": "abc"}


def _batches(rows: int = 10, batch: int = 4):
    rng = np.random.default_rng(0)
    features = rng.normal(size=(rows, 3, 2)).astype("float32")
    extra = rng.integers(0, 255, size=(rows, 5), dtype=np.uint8)
    labels = np.arange(rows, dtype=np.int32)
    for start in range(0, rows, batch):
        stop = start + batch
        yield features[start:stop], extra[start:stop], labels[start:stop]


def _epochs(store: ArrayStore, shuffle: bool, epochs: int = 2):
    ds = store.dataset(3, shuffle=shuffle, seed=7)
    return [[(tuple(a.numpy() for a in x), y.numpy()) for x, y in ds] for _ in range(epochs)]


def test_a_store_reads_back_what_was_written_from_ram_or_disk_alike(tmp_path):
    store = ArrayStore.write(tmp_path / "s", _batches(), KEY)
    assert store.rows == 10 and [c.shape for c in store.columns] == [(3, 2), (5,), ()]
    assert store.nbytes == 10 * (3 * 2 * 4 + 5 + 4)
    on_disk = _epochs(store, shuffle=True)
    in_ram = ArrayStore.open(tmp_path / "s", KEY)
    assert in_ram is not None and in_ram.hold(Budget(store.nbytes))
    assert not store.hold(Budget(store.nbytes - 1))  # one byte short: stays on disk
    held = _epochs(in_ram, shuffle=True)
    for disk_epoch, ram_epoch in zip(on_disk, held, strict=True):
        for (dx, dy), (rx, ry) in zip(disk_epoch, ram_epoch, strict=True):
            np.testing.assert_array_equal(dy, ry)
            for a, b in zip(dx, rx, strict=True):
                np.testing.assert_array_equal(a, b)
    # each epoch a new order of all ten rows; the rows keep their values
    orders = [np.concatenate([y for _, y in epoch]).tolist() for epoch in on_disk]
    assert sorted(orders[0]) == list(range(10)) and orders[0] != orders[1]
    everything = {int(y): x[0][i] for x, ys in on_disk[0] for i, y in enumerate(ys)}
    features = np.concatenate([f for f, _, _ in _batches()])
    for label, row in everything.items():
        np.testing.assert_array_equal(row, features[label])


def test_unshuffled_batches_keep_the_written_order_and_one_column_is_not_a_tuple(tmp_path):
    rows = [(np.ones((4, 2), "float32") * i, np.full(4, i, "int32")) for i in range(3)]
    store = ArrayStore.write(tmp_path / "s", rows, KEY)
    batches = list(store.dataset(5, shuffle=False, seed=0))
    assert [len(y) for _, y in batches] == [5, 5, 2]
    assert np.concatenate([y.numpy() for _, y in batches]).tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert batches[0][0].shape == (5, 2)  # the one feature column itself


def test_a_store_of_other_inputs_or_half_written_is_not_found(tmp_path):
    ArrayStore.write(tmp_path / "s", _batches(), KEY)
    assert ArrayStore.open(tmp_path / "s", {**KEY, "manifest": "other"}) is None
    assert ArrayStore.open(tmp_path / "missing", KEY) is None

    class Killed(Exception):
        pass

    with pytest.raises(Killed), StoreWriter(tmp_path / "s", {**KEY, "manifest": "new"}) as writer:
        writer.append(next(_batches()))
        raise Killed
    # the finished store is untouched and no partial one is left beside it
    kept = ArrayStore.open(tmp_path / "s", KEY)
    assert kept is not None and kept.rows == 10
    assert sorted(os.listdir(tmp_path)) == ["s"]
    assert json.loads((tmp_path / "s" / "meta.json").read_text())["rows"] == 10
    kept.remove()
    assert not (tmp_path / "s").exists()


def test_columns_of_different_lengths_are_refused_and_nothing_is_written(tmp_path):
    features, labels = np.zeros((8, 3), "float32"), np.zeros(4, "int32")
    with pytest.raises(ValueError, match=r"a batch's columns have \[8, 4\] rows; one each"):
        ArrayStore.write(tmp_path / "s", [(features, labels)], KEY)
    assert list(tmp_path.iterdir()) == []


def test_the_budget_is_shared_and_auto_is_a_quarter_of_memory():
    budget = Budget(100)
    assert budget.take(60) and not budget.take(41) and budget.take(40) and not budget.take(1)
    assert budget_bytes(0) == 0 and budget_bytes(3) == 3 << 20
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert 0 < budget_bytes("auto") <= memory // 4
