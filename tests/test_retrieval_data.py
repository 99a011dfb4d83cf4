"""Retrieval spec errors and the history feature (strictly before the query time), on small hand-made logs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from features.spec import ConfigError
from retrieval.data import MISSING_INT, history_before
from retrieval.spec import load_retrieval_config, parse_retrieval_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _base() -> dict:
    return load_retrieval_config(CONFIGS / "retrieval_ml100k.yaml").model_dump(mode="json")


@pytest.mark.parametrize("name", ["retrieval_ml100k.yaml", "retrieval_kuairand.yaml"])
def test_shipped_configs_load(name):
    config = load_retrieval_config(CONFIGS / name)
    assert config.item_id_feature.source == config.data.item_column


@pytest.mark.parametrize(("edit", "expected"), [
    (lambda d: d["query_features"][1].update(kind="catgorical"), "query_features[1].kind"),
    (lambda d: d["query_features"][1].update(kind="catgorical"), "'catgorical'"),
    (lambda d: d["model"].update(temperature=0), "model.temperature"),
    (lambda d: d["history"].update(length=-3), "history.length"),
    (lambda d: d["history"].update(length=-3), "-3"),
    (lambda d: d["query_features"][0].update(group="item"), "query_features[0] 'user_id': group must be 'user' or "
                                                            "'context', got 'item'"),
    (lambda d: d["candidate_features"].pop(0), "the item id 'item_id' must be a categorical feature"),
    (lambda d: d["data"].update(split="time_cut", test_from=None), "data.test_from: split 'time_cut' needs the cut"),
    (lambda d: d["data"].update(split="timecut"), "data.split"),
    (lambda d: d["data"].update(until=888710400), "data.until: applies only to split 'time_cut' (got until=888710400 "
                                                  "with split 'leave_last_out'"),
    (lambda d: d["data"].update(split="time_cut", until=5), "data.until: 5 is before data.test_from 888710400"),
    (lambda d: d["training"].update(optimizer="sgdd"), "training.optimizer"),
    (lambda d: d["model"].update(mixed_negatives="many"), "model.mixed_negatives"),
])
def test_config_errors_name_field_and_value(edit, expected):
    data = _base()
    edit(data)
    with pytest.raises(ConfigError, match="invalid config test.yaml") as err:
        parse_retrieval_config(data, "test.yaml")
    assert expected in str(err.value)


def _events(rng: np.random.Generator, n: int = 400) -> pd.DataFrame:
    return pd.DataFrame({"user": rng.integers(0, 12, n), "item": rng.integers(0, 50, n),
                         "t": rng.integers(0, 100, n)})


def _history(events: pd.DataFrame, users, times, length=5) -> np.ndarray:
    return history_before(events, "user", "item", "t", np.asarray(users), np.asarray(times), length)


def test_history_by_hand():
    ev = pd.DataFrame({"user": [1, 1, 1, 1, 2, 2], "item": [10, 11, 12, 13, 20, 21], "t": [5, 3, 7, 7, 1, 9]})
    got = _history(ev, [1, 1, 1, 2, 3], [7, 8, 3, 9, 100], length=3)
    expected = [[10, 11, MISSING_INT],  # t=7: only events at t < 7, most recent first
                [13, 12, 10],          # t=8: both t=7 events (ties by item id, larger first as most recent)
                [MISSING_INT] * 3,     # t=3: nothing strictly before
                [20, MISSING_INT, MISSING_INT],
                [MISSING_INT] * 3]     # unknown user
    np.testing.assert_array_equal(got, expected)


def test_history_ignores_later_events_and_row_order():
    """Shuffling the log and rewriting every event at or after a query's time leaves its history unchanged."""
    rng = np.random.default_rng(0)
    ev = _events(rng)
    users = np.arange(14)  # two users without events
    times = rng.integers(0, 100, len(users))
    before = _history(ev, users, times)
    assert (before != MISSING_INT).sum() > 20  # the check below is not vacuous

    changed = ev.sample(frac=1.0, random_state=1).reset_index(drop=True)
    query_time = dict(zip(users, times))
    later = changed["t"].to_numpy() >= changed["user"].map(query_time).to_numpy()
    assert later.sum() > 50
    changed.loc[later, "item"] = rng.integers(1000, 2000, int(later.sum()))  # later events: other items
    extra = pd.DataFrame({"user": users, "item": 5000, "t": times})  # and new events exactly at query time
    np.testing.assert_array_equal(_history(pd.concat([changed, extra]), users, times), before)

    earlier = ev["t"].to_numpy() < ev["user"].map(query_time).to_numpy()
    moved = ev.copy()
    moved.loc[earlier, "item"] += 7  # a change before the query time does change the history (test can fail)
    assert not np.array_equal(_history(moved, users, times), before)
