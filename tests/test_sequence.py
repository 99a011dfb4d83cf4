"""Behaviour sequences: the user's past positive events across days (``data.history`` lists with ``scope: all``,
several columns and ``age``), point-in-time in pandas and in the Beam pipeline; the target-attention layer (padding
masked, shapes, the item features' embedding tables shared); a model with a sequence trained, exported and served,
``rank_candidates`` (keys once per request) equal to ``serving_default``."""

from __future__ import annotations

import json

import keras
import numpy as np
import pandas as pd
import pytest
import synthetic
from conftest import train_run

from features.history import history_lists
from features.logs import raw_inputs, read_log
from features.spec import ConfigError, parse_config
from ranking.export import export_run
from ranking.layers.target_attention import TargetAttention
from ranking.model import build_models
from ranking.servable import load_servable
from ranking.signatures import RANK_CANDIDATES, SERVING_DEFAULT, rank_candidates_signature, split_request
from ranking.warmup import warmup_batches

EVENTS = {"name": "events", "column": ["item", "author", "watch / 1000"], "where": ["click", "long"],
          "scope": "all", "max_len": 2, "age": True}


def data_config(lists=(EVENTS,)):
    return parse_config({
        "data": {"log": "unused.csv", "time_column": "day", "user_column": "user", "item_column": "item",
                 "history": {"order": "ts", "max_len": 50, "lists": list(lists)}},
        "features": [{"name": "item", "kind": "categorical", "vocab": {}},
                     {"name": "author", "kind": "categorical", "vocab": {}}],
        "tasks": [{"name": "click", "type": "binary", "label": "click"}]}).data


def frame() -> pd.DataFrame:
    """User 1 over three days (ts in ms), user 2 between; rows 1 and 2 are one request (same ts)."""
    return pd.DataFrame({
        "user": [1, 1, 1, 2, 1, 1, 1, 1],
        "day": [0, 0, 0, 0, 1, 1, 2, 2],
        "ts": [1000, 5000, 5000, 6000, 90000, 95000, 200000, 200000],
        "item": [10, 11, 12, 99, 13, 14, 15, 16],
        "author": [7.0, 8.0, 9.0, 9.0, 7.0, np.nan, 7.0, 7.0],  # a left-joined side column: floats
        "click": [1, 0, 0, 1, 0, 1, 0, 1],
        "long": [0, 1, 0, 0, 0, 0, 0, 0],
        "watch": [1500, 30000, 250, 10, 0, 2000, 0, 0],
    }).sample(frac=1.0, random_state=1)  # the rows' order must not matter


def by_row(df: pd.DataFrame, lists: dict) -> dict[str, list[str]]:
    return {k: [dict(zip(df.index, v))[i] for i in range(len(df))] for k, v in lists.items()}


def test_events_span_days_newest_first_with_fields_and_age_at_the_request():
    df = frame()
    got = by_row(df, history_lists(df, data_config()))["events"]
    assert got == [
        "",
        "10:7:1.5:4000", "10:7:1.5:4000",  # one request: neither sees the other (row 1 long-viewed, row 2 not)
        "",  # user 2's first
        "11:8:30:85000,10:7:1.5:89000",  # the previous day's events, aged at this request
        "11:8:30:90000,10:7:1.5:94000",  # row 4 neither clicked nor long-viewed
        "14::2:105000,11:8:30:195000", "14::2:105000,11:8:30:195000"]  # a missing author is ""; max_len 2 kept
    session = by_row(df, history_lists(df, data_config([{**EVENTS, "scope": "session"}])))["events"]
    assert session[4] == "" and session[5] == ""  # the default scope starts each day empty


def test_across_days_the_order_is_the_time_not_the_date():
    """A row dated the next day but stamped before an event of the previous day (7 user-days of KuaiRand's ten) does
    not see that later event; a row after both sees them by time."""
    df = pd.DataFrame({"user": [3, 3, 3], "day": [0, 1, 1], "ts": [50000, 40000, 60000], "item": [30, 31, 32],
                       "author": [7.0, 8.0, 9.0], "click": [1, 1, 0], "long": [0, 0, 0], "watch": [1000, 2000, 0]})
    got = history_lists(df, data_config())["events"].tolist()
    assert got == ["31:8:2:10000", "", "30:7:1:10000,31:8:2:20000"]


def test_later_events_change_nothing_and_an_earlier_one_appears():
    """Every event at or after a row's request changed (items, authors, labels): that row's list is unchanged;
    one event strictly before it changed: it shows in the list."""
    df = frame()
    before = history_lists(df, data_config())["events"]
    for cut in sorted(df["ts"].unique()):
        late = (df["ts"] >= cut).to_numpy()
        changed = df.assign(item=np.where(late, 55, df["item"]), author=np.where(late, 66.0, df["author"]),
                            click=np.where(late, 1 - df["click"], df["click"]), long=np.where(late, 1, df["long"]),
                            watch=np.where(late, 123456, df["watch"]))
        after = history_lists(changed, data_config())["events"]
        at = (df["ts"] == cut).to_numpy()
        assert after[at].tolist() == before[at].tolist(), cut
    earlier = df.assign(item=np.where(df["ts"] == 95000, 77, df["item"]))  # user 1's clicked day-1 event
    got = history_lists(earlier, data_config())["events"][(df["ts"] == 200000).to_numpy()]
    assert got.tolist() == ["77::2:105000,11:8:30:195000"] * 2


def test_history_and_sequence_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"data.history.lists\[0\].where: column 'long'"):
        history_lists(frame().drop(columns="long"), data_config())
    with pytest.raises(ConfigError, match=r"data.history.lists\[0\].column: column 'nope / 2'"):
        history_lists(frame(), data_config([{**EVENTS, "column": ["item", "nope / 2"]}]))
    base = {"data": {"log": "l.csv", "time_column": "day", "user_column": "user", "item_column": "item",
                     "history": {"order": "ts", "lists": [EVENTS]}},
            "tasks": [{"name": "click", "type": "binary", "label": "click"}]}
    item = {"name": "item", "kind": "categorical", "vocab": {}}
    user = {"name": "user", "kind": "categorical", "group": "user", "vocab": {}}
    seq = {"name": "events", "kind": "sequence", "group": "user",
           "sequence": {"fields": [{"target": "item"}, {"boundaries": [1.0]}, {"boundaries": [1.0, 10.0]},
                                   {"boundaries": [60000.0]}]}}
    parse_config({**base, "features": [item, user, seq]})  # the valid one
    with pytest.raises(ConfigError, match=r"features\[2\]\.sequence\.fields\[0\]\.target: 'user' must name"):
        parse_config({**base, "features": [item, user, {**seq, "sequence": {"fields": [{"target": "user"}] * 4}}]})
    with pytest.raises(ConfigError, match=r"\('events'\)\.sequence\.fields: 2 fields, but data.history list "
                                          r"'events' writes 4"):
        parse_config({**base, "features": [item, user, {**seq, "sequence": {"fields": [{"target": "item"}] * 2}}]})
    with pytest.raises(ConfigError, match="group must be 'user', got 'item'"):
        parse_config({**base, "features": [item, user, {**seq, "group": "item"}]})
    with pytest.raises(ConfigError, match="exactly one of 'target' or 'boundaries'"):
        parse_config({**base, "features": [item, user, {**seq, "sequence": {"fields": [{"target": "item"}, {}]}}]})
    with pytest.raises(ConfigError, match=r"fields\[0\] must have a 'target'"):
        parse_config({**base, "features": [item, user, {**seq, "sequence": {"fields": [{"boundaries": [1.0]}]}}]})


def _reference(layer: TargetAttention, query, keys, valid) -> np.ndarray:
    """numpy DIN pooling with the layer's weights (softmax over the valid events if the layer has it)."""
    w = [np.asarray(v) for v in layer.weights]
    wq, wk, hidden, (wo, bo) = w[0], w[1], list(zip(w[2:-2:2], w[3:-2:2])), w[-2:]
    q, k = query @ wq, keys @ wk  # (B, D), (B, L, D)
    qs = np.broadcast_to(q[:, None, :], k.shape)
    h = np.concatenate([qs, k, qs - k, qs * k], axis=-1)
    for kernel, bias in hidden:
        h = np.maximum(h @ kernel + bias, 0)
    a = (h @ wo + bo)[..., 0]  # (B, L)
    if layer.softmax:
        e = np.exp(a - a.max(axis=1, keepdims=True)) * valid
        a = e / np.maximum(e.sum(axis=1, keepdims=True), 1e-30)
    a = a * valid
    return np.einsum("bl,bld->bd", a, k)


@pytest.mark.parametrize("softmax", [False, True])
def test_attention_masks_padding_matches_numpy_and_broadcasts_one_request(softmax):
    rng = np.random.default_rng(0)
    layer = TargetAttention(6, [5, 3], softmax=softmax)
    query = rng.normal(size=(4, 3)).astype(np.float32)  # (B, D_q)
    keys = rng.normal(size=(4, 7, 5)).astype(np.float32)  # (B, L, D_k)
    valid = (rng.random((4, 7)) < 0.6).astype(np.float32)
    valid[2] = 0  # a user with no events
    out = np.asarray(layer(query, keys, valid))
    assert out.shape == (4, 6)
    np.testing.assert_allclose(out, _reference(layer, query, keys, valid), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(out[2], 0)
    padded = np.where(valid[..., None] > 0, keys, rng.normal(size=keys.shape) * 100).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(layer(query, padded, valid)), out)  # padded events change nothing
    one = np.asarray(layer.attend(query, layer.project_keys(keys[:1]), valid[:1]))  # keys of batch 1 broadcast
    np.testing.assert_allclose(one, np.asarray(layer(query, np.repeat(keys[:1], 4, 0), np.repeat(valid[:1], 4, 0))),
                               rtol=1e-5, atol=1e-6)
    again = TargetAttention.from_config(layer.get_config())
    assert again.get_config() == layer.get_config()


SEQ_LIST = {"name": "clicked_events", "column": ["item_id", "segment", "tags", "watch_ms / 1000"],
            "where": "click", "scope": "all", "max_len": 8, "age": True}
SEQ_FEATURE = {"name": "clicked_events", "kind": "sequence", "group": "user", "max_values": 8,
               "sequence": {"fields": [{"target": "item_id"}, {"target": "segment"}, {"target": "tags"},
                                       {"boundaries": [1.0, 5.0, 20.0]}, {"boundaries": [1000.0, 30000.0]}],
                            "units": [8]}}


def sequence_config(log):
    data = synthetic.config(log, ["segment", "user_id", "item_id", "tags"], ["click"], epochs=1).model_dump()
    data["data"]["history"] = {"order": "ts", "lists": [SEQ_LIST]}
    data["features"].append(SEQ_FEATURE)
    return parse_config(data, "sequence")


@pytest.fixture(scope="module")
def sequence_log(tmp_path_factory) -> str:
    log = synthetic.generate_log(30_000, seed=3)
    log = log.assign(user_id=log["user_id"] % 200 + 1).sort_values("day", kind="stable")  # long histories
    return str(synthetic.write_log(log.assign(ts=np.arange(len(log)) * 1000), tmp_path_factory.mktemp("seq") / "l.csv"))


def test_the_sequence_shares_the_item_features_embedding_tables(sequence_log):
    config = sequence_config(sequence_log)
    frame = read_log(config.data)
    from features.vocab import build_stats

    models = build_models(config, build_stats(raw_inputs(frame, config.features), config.features))
    m = models.serve
    tables = sorted(layer.name for layer in m.layers if isinstance(layer, keras.layers.Embedding))
    assert tables == ["clicked_events_field3_embedding", "clicked_events_field4_embedding", "item_id_embedding",
                      "segment_embedding", "tags_embedding", "user_id_embedding"]  # no table of the sequence's own
    item = m.get_layer("item_id_embedding")
    rows = raw_inputs(frame.iloc[-64:], config.serving_features)
    base = np.asarray(m(rows)["click"])
    seen = sorted({int(t.split(":")[0]) for s in rows["clicked_events"] for t in s.split(",") if t})
    lookup = m.get_layer("item_id_lookup")  # hash buckets: those of no candidate
    idx = np.setdiff1d(np.asarray(lookup(np.array(seen, np.int64))), np.asarray(lookup(rows["item_id"])))
    assert len(idx) > 10
    old = item.embeddings.numpy()
    item.embeddings.assign(np.where(np.isin(np.arange(len(old)), idx)[:, None], old + 1.0, old))
    try:  # rows of ids only in the sequences moved: the sequence reads item_id's own table
        assert np.abs(np.asarray(m(rows)["click"]) - base).max() > 1e-4
    finally:
        item.embeddings.assign(old)


@pytest.fixture(scope="module")
def sequence_export(sequence_log, tmp_path_factory):
    """``sequence_config`` trained one epoch and exported as version 1 (export_run checks its signatures agree on
    the warmup rows) -> (config, the log as the trainer reads it, base path)."""
    config = sequence_config(sequence_log)
    run = train_run(config, tmp_path_factory.mktemp("seq_run") / "r")
    frame = read_log(config.data)
    base = tmp_path_factory.mktemp("seq_models") / "models"
    export_run(run.run_dir, base, verbose=False, warmup=warmup_batches(config, frame))
    return config, frame, base


def test_rank_candidates_computes_the_sequence_once_and_equals_serving_default(sequence_export):
    config, frame, base = sequence_export
    sv = load_servable(base / "1")
    day = frame[frame["day"] == frame["day"].max()]
    user = day[day["clicked_events"].str.count(",") >= 5]["user_id"].value_counts().index[0]
    rows = raw_inputs(day[day["user_id"] == user].reset_index(drop=True), config.serving_features)
    ranked, repeated = split_request(rows, config)  # the first row's sequence for the request, repeated per row
    assert ranked["clicked_events"].shape == (1,) and rank_candidates_signature(config)["clicked_events"].shape == [1]
    got = sv.predict(ranked, RANK_CANDIDATES)["click"]
    np.testing.assert_allclose(got, sv.predict(repeated, SERVING_DEFAULT)["click"], rtol=1e-5, atol=1e-6)
    empty = {**ranked, "clicked_events": np.array([""], dtype=object)}
    assert np.abs(sv.predict(empty, RANK_CANDIDATES)["click"] - got).max() > 1e-5  # the sequence reaches the score
    for bad in ["x:y:z,,:::::::,9:notanumber:t1:1e400:-5", ",,,", "1:2:3:4:5:6:7:8"]:  # malformed: no crash
        out = sv.predict({**ranked, "clicked_events": np.array([bad], dtype=object)}, RANK_CANDIDATES)["click"]
        assert np.isfinite(out).all() and out.shape == got.shape


KUAIRAND_SEQUENCE = {"name": "clicked_videos", "column": ["video_id", "author_id", "tag", "play_time_ms / duration_ms"],
                     "where": ["is_click", "long_view"], "scope": "all", "max_len": 20, "age": True}


def test_the_pipeline_builds_the_same_sequences_as_the_frame(kuairand_config, tmp_path):
    """A KuaiRand subset over all ten days (every 25th user of both files): the Beam pipeline's examples, in two
    passes over disjoint users, carry the in-memory frame's sequence strings row for row."""
    from features import examples
    from features.pipeline import build_features

    root = synthetic.Path(kuairand_config.data.joins[0].path).parent
    log = pd.concat([pd.read_csv(root / f) for f in ("log_standard_pure_20220425_to_20220430.csv",
                                                   "log_standard_pure_20220501_to_20220504.csv")], ignore_index=True)
    path = tmp_path / "subset.csv"
    log[log["user_id"] % 25 == 0].to_csv(path, index=False)
    data = kuairand_config.model_dump()
    data["data"].update(log=str(path), statistics=None)
    data["data"]["history"]["lists"].append(KUAIRAND_SEQUENCE)
    data["features"] = [f for f in data["features"] if not f["name"].startswith("stat_")] + [
        {"name": "clicked_videos", "kind": "sequence", "group": "user", "max_values": 20, "sequence": {"fields": [
            {"target": "video_id"}, {"target": "author_id"}, {"target": "tag"}, {"boundaries": [0.3, 1.0]},
            {"boundaries": [3.6e6, 8.64e7]}]}}]
    config = parse_config(data, "kuairand sequence subset")
    frame = read_log(config.data)
    want = examples.frame_columns(frame, config, examples.row_ids(0, 0, len(frame)))
    out = tmp_path / "features"
    build_features(config, out, verbose=False, buckets=4, batch_rows=4096, passes=2)
    cols = [examples.Column(**c) for c in json.loads((out / "schema.json").read_text())]
    got = examples.read_columns(sorted((out / "examples").glob("date=*/*" + examples.SUFFIX)), cols)
    order = np.argsort(got[examples.ROW], kind="stable")
    got = {k: v[order] for k, v in got.items()}
    np.testing.assert_array_equal(got[examples.ROW], want[examples.ROW])
    assert got["clicked_videos"].tolist() == [str(v) for v in want["clicked_videos"]]
    days = frame["date"].to_numpy()
    assert (frame["clicked_videos"][days == days.max()] != "").mean() > 0.5  # later days carry earlier days' events
    assert frame["clicked_videos"].str.contains(":", regex=False).any()


def test_the_service_takes_the_sequence_once_in_the_context(sequence_export, tmp_path):
    """Over loopback gRPC: the sequence sent once in context_features scores every candidate as serving_default does
    with it repeated per row; a list of numbers is refused naming the field."""
    import grpc
    import yaml

    from serving.client import RankingClient, build_request
    from serving.codec import response_arrays
    from serving.config import parse_serving_config
    from serving.service import RankingService

    _, _, base = sequence_export
    sv = load_servable(base / "1")
    fusion = tmp_path / "fusion.yaml"
    fusion.write_text(yaml.safe_dump({"version": "f1", "default_profile": "c", "profiles": {
        "c": {"formula": "weighted_sum", "weights": {"click": 1.0}}}}))
    svc = RankingService(parse_serving_config({
        "model": {"base_path": str(base), "backend": "in_process"}, "fusion": str(fusion),
        "server": {"port": 0, "metrics_port": 0, "drain_s": 1}, "reload": {"interval_s": 0.5}}))
    port = svc.start()
    try:
        assert svc.wait_until_ready(60)
        client = RankingClient(f"127.0.0.1:{port}", timeout_s=10)
        items = np.array([1, 2, 3, 4], dtype=np.int64)
        cand = {"segment": np.array(["news", "sports", "music", "music"], dtype=object),
                "tags": np.array(["t1", "", "t2,t3", "t4"], dtype=object)}
        events = "3:music:t2:12:5000,9:news::0.5:90000,1:sports:t1:3:400000"
        got = response_arrays(client.send(build_request(
            {"user_id": 7}, items, {"clicked_events": events}, cand, return_predictions=True)))
        want = sv.predict({"user_id": np.full(4, 7, np.int64), "item_id": items, **cand,
                           "clicked_events": np.array([events] * 4, dtype=object)}, SERVING_DEFAULT)["click"]
        np.testing.assert_allclose(got["click"][np.argsort(got["candidate_indices"])], want, rtol=2e-4, atol=1e-6)
        with pytest.raises(grpc.RpcError) as err:
            client.send(build_request({"user_id": 7}, items, {"clicked_events": 3}, cand))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "context_features[clicked_events]" in err.value.details()
        client.close()
    finally:
        svc.stop(1)
