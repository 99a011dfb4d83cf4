"""Batches of whole user-day lists for the pairwise loss (``training.pairwise_task``)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ranking.datasets import list_ids, make_list_dataset


def test_list_batches_keep_lists_together_and_reshuffle_each_epoch():
    rng = np.random.default_rng(0)
    lists = rng.integers(0, 40, 400)  # 40 lists of ~10 rows, rows interleaved
    x = {"row": np.arange(400), "list": lists}
    y = {"click": np.stack([np.arange(400), lists], 1).astype(np.float32)}
    ds = make_list_dataset(x, y, lists, batch_size=64, seed=3)
    epochs = []
    for _ in range(2):
        rows, changes = [], 0
        for bx, by in ds:
            assert np.array_equal(bx["row"].numpy(), by["click"][:, 0].numpy().astype(int))  # x and y aligned
            b = bx["list"].numpy()
            rows += bx["row"].numpy().tolist()
            changes += int(np.sum(b[1:] != b[:-1]))
        assert sorted(rows) == list(range(400))  # every row once per epoch
        assert changes <= 39  # each list's rows are contiguous: the list changes once per boundary
        epochs.append(rows)
    assert epochs[0] != epochs[1]  # the lists' order is reshuffled each epoch


def test_list_ids_are_user_day_pairs():
    frame = pd.DataFrame({"user": [1, 1, 2, 1, 2], "day": [5, 5, 5, 6, 5]})

    class Data:
        user_column, time_column = "user", "day"

    ids = list_ids(frame, type("C", (), {"data": Data})())
    assert ids[0] == ids[1] and ids[2] == ids[4] and len(set(ids.tolist())) == 3
