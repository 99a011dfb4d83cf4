"""LightGBM given a behaviour sequence as counts (``ranking.baselines.gbdt.sequence_counts``): values worked out by
hand on a few events (an empty sequence, a candidate absent from it, malformed and padded events, more events than
``max_values``), a plain per-row reference on the synthetic sequence log, and ``run_gbdt`` training on a sequence
config and reporting."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from test_sequence import sequence_config, sequence_log  # noqa: F401 (sequence_log: a fixture)

from features.logs import MISSING_INT, raw_inputs, read_log, time_split
from ranking.baselines.gbdt import RECENT_EVENTS, fit_gbdt, gbdt_frame, predict_gbdt, run_gbdt

NAN = float("nan")
SEQ = "clicked_events"  # fields: item_id, segment, tags (targets), watch seconds, age ms (the last, data.history's)
THREE = "5:a:t1:0.5:1000,7:a:t2:1.5:5000,5:b:t1::90000"
TEN = ",".join(f"5:a:t1:1:{k}" for k in range(1, 11))  # newest first; max_values is 8


def hand_frame() -> pd.DataFrame:
    return pd.DataFrame({
        "segment": ["a", "a", "c", "a", "a"],
        "user_id": [1, 2, 3, 4, 5],
        "item_id": [5, 5, 8, 9, 5],
        "tags": ["t1", "t1,t9", "t9,t1", "", "t1"],
        SEQ: ["", THREE, THREE, ":a:t1:2:10, 9:a:t1:x:20 ,9:a", TEN],
    })


# per row of ``hand_frame``: (len, item, item recent, segment, segment recent, tags, tags recent,
#                             watch mean, watch newest, age mean, age newest)
WANT = [
    (0, 0, 0, 0, 0, 0, 0, NAN, NAN, NAN, NAN),  # empty
    (3, 2, 2, 2, 2, 2, 2, 1.0, 0.5, 32000.0, 1000.0),  # the third event's watch is "": the mean of two
    (3, 0, 0, 0, 0, 0, 0, 1.0, 0.5, 32000.0, 1000.0),  # candidate absent; its first tag t9 is in no event
    # the first event has no id (not an event); "x" is not a number; "9:a" lacks fields; the candidate has no tag
    (2, 2, 2, 2, 2, 0, 0, NAN, NAN, 20.0, 20.0),
    (8, 8, RECENT_EVENTS, 8, RECENT_EVENTS, 8, RECENT_EVENTS, 1.0, 1.0, 4.5, 1.0),  # cut at max_values
]
COLUMNS = [f"{SEQ}_len"] + [f"{SEQ}_{t}_{k}" for t in ("item_id", "segment", "tags") for k in ("count", "recent")] + [
    f"{SEQ}_{f}_{k}" for f in ("field3", "age") for k in ("mean", "newest")]


def test_sequence_counts_by_hand():
    x, _ = gbdt_frame(hand_frame(), sequence_config("unused.csv"))
    assert SEQ not in x.columns and [c for c in x.columns if c.startswith(SEQ)] == COLUMNS
    np.testing.assert_array_equal(x[COLUMNS].to_numpy(), np.array(WANT, dtype=np.float64))
    assert x["tags"].tolist() == ["t1", "t1", "t9", "", "t1"]  # the other features as before


def reference(text: str, item: int, segment: str, tags: str, max_values: int = 8) -> list[float]:
    """``WANT``'s row for one impression, event by event."""
    events = [(e.strip().split(":") + [""] * 5)[:5] for e in text.strip().split(",")[:max_values]]
    events = [e for e in events if e[0]]
    first_tag = tags.strip().split(",")[0]
    out: list[float] = [len(events)]
    for j, want in enumerate(["" if item == MISSING_INT else str(item), segment, first_tag]):
        hits = [bool(want) and e[j] == want for e in events]
        out += [sum(hits), sum(hits[:RECENT_EVENTS])]
    for j in (3, 4):
        vals = []
        for e in events:
            try:
                vals.append(float(e[j]))
            except ValueError:
                vals.append(NAN)
        finite = [v for v in vals if np.isfinite(v)]
        out += [np.mean(finite) if finite else NAN, vals[0] if vals and np.isfinite(vals[0]) else NAN]
    return out


def test_sequence_counts_match_a_per_row_reference_on_the_synthetic_log(sequence_log):  # noqa: F811
    config = sequence_config(sequence_log)
    frame = read_log(config.data)
    raw = raw_inputs(frame, config.serving_features)
    want = np.array([reference(*r) for r in zip(raw[SEQ], raw["item_id"], raw["segment"], raw["tags"])])
    x, _ = gbdt_frame(frame, config)
    np.testing.assert_allclose(x[COLUMNS].to_numpy(), want, rtol=1e-12)
    assert (want[:, 0] == 0).any() and (want[:, 0] == 8).any()  # empty and full sequences among the rows
    assert (want[:, 1] > 0).any() and (want[:, 3] > 0).any() and (want[:, 5] > 0).any()  # each target matched


def test_run_gbdt_trains_and_reports_on_a_sequence_config(sequence_log, tmp_path):  # noqa: F811
    config = sequence_config(sequence_log)
    report = run_gbdt(config, tmp_path, num_trees=40, verbose=False)
    assert 0.5 < report["click"]["auc"] < 1 and 1 <= report["click"]["num_trees"] <= 40
    assert json.loads((tmp_path / "metrics.json").read_text())["num_trees"] == {"click": report["click"]["num_trees"]}
    train_df, val_df = time_split(read_log(config.data), config)
    fitted = fit_gbdt(config, train_df, val_df, num_trees=40, threads=1, verbose=False)
    booster = fitted.models["click"].booster_
    assert set(COLUMNS) <= set(booster.feature_name())
    pred = predict_gbdt(fitted, config, val_df.iloc[:100])["click"]
    assert pred.shape == (100,) and ((pred > 0) & (pred < 1)).all()
    np.testing.assert_allclose(predict_gbdt(fitted, config, val_df)["click"][:100], pred)  # rows scored alone


@pytest.mark.parametrize("text", [",,,", "1:2:3:4:5:6:7:8", "x:y:z,,:::::::,9:notanumber:t1:1e400:-5"])
def test_malformed_sequences_give_finite_counts(text):
    frame = hand_frame().assign(**{SEQ: text})
    x, _ = gbdt_frame(frame, sequence_config("unused.csv"))
    counts = x[[c for c in COLUMNS if not c.endswith(("mean", "newest"))]].to_numpy()
    assert np.isfinite(counts).all() and (counts >= 0).all() and (counts <= 8).all()
