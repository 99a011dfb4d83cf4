"""The global time-cut protocol on real MovieLens-100K (cut 1998-03-01): nothing at or after T trains, and the
popularity behind logQ, the most-popular baseline and the unknown-user fallback counts only events before T,
checked against counts made directly from the raw ratings file."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from tiny_retrieval import ROOT, tiny_retrieval_config

from features.spec import ConfigError
from retrieval.spec import parse_retrieval_config

T = 888710400  # 1998-03-01 00:00 UTC, the test_from of configs/retrieval_ml100k.yaml


@pytest.fixture(scope="module")
def time_cut_config():
    data = tiny_retrieval_config("retrieval_ml100k.yaml", "ml100k time cut", max_feature_dim=8).model_dump(mode="json")
    data["data"].update(split="time_cut", test_from=T)
    return parse_retrieval_config(data, "ml100k time cut")


def _raw_counts(t: int) -> tuple[pd.Series, pd.Series]:
    """Ratings per item strictly before ``t`` and at or after it, straight from the RecBole file (every rating is
    a positive)."""
    raw = pd.read_csv(ROOT / "../shared/data/ml-100k/ml-100k.inter", sep="\t")
    before = raw["timestamp:float"] < t
    return raw[before].groupby("item_id:token").size(), raw[~before].groupby("item_id:token").size()


def _top(counts: pd.Series, n: int) -> list[int]:
    """The ``n`` most counted ids, ties by id (as ``popular_items`` breaks them)."""
    return [int(i) for i in counts.sort_index().sort_values(ascending=False, kind="stable").index[:n]]


def test_time_cut_trains_before_t_and_counts_popularity_before_t(time_cut_config):
    from retrieval.data import build_data, item_sampling_probability
    from retrieval.export import popular_items
    from retrieval.train import fit

    data = build_data(time_cut_config)
    assert data.window["split"] == "time_cut" and data.window["test_from"] == T
    assert data.train.times.max() < T and data.train_events["timestamp"].max() < T
    assert data.test.times.min() >= T and len(data.test.users) > 100
    assert (data.train.inputs["history"] >= 0).any()  # history of training rows: only training events
    counts, after = _raw_counts(T)
    assert len(data.train.items) == counts.sum()
    expected = counts.reindex(data.catalog.ids, fill_value=0).to_numpy(np.float64)
    expected /= expected.sum()
    np.testing.assert_allclose(item_sampling_probability(data.train.items, data.catalog), expected, rtol=1e-12)

    trained = fit(time_cut_config, data)  # logQ and the exported fallback read this probability
    np.testing.assert_allclose(trained.item_probability, expected, rtol=1e-12)
    fallback = popular_items(trained, data.catalog.ids, n=20)
    assert fallback == _top(counts.reindex(data.catalog.ids, fill_value=0), 20)
    everything = counts.reindex(data.catalog.ids, fill_value=0) + after.reindex(data.catalog.ids, fill_value=0)
    assert fallback != _top(everything, 20)  # counting post-T events would change the fallback (test can fail)


def test_until_with_leave_last_out_is_refused(time_cut_config):
    data = time_cut_config.model_dump(mode="json")
    data["data"].update(split="leave_last_out", until=T)
    with pytest.raises(ConfigError, match=r"data.until: applies only to split 'time_cut' \(got until=888710400"):
        parse_retrieval_config(data, "until.yaml")
