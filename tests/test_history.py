"""The user's same-day history as lists (``data.history``, features/history.py) and features of kind ``match`` that
count the candidate's id in them, in the graph (``MatchCount``) as in numpy (``match_counts``), trained and exported
for real on the synthetic log."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import synthetic
from conftest import train_run

from features.encoding import MatchCount, SplitValues
from features.history import history_lists
from features.logs import raw_inputs, read_log
from features.spec import ConfigError, FeatureSpec, parse_config
from features.vocab import match_counts
from ranking.export import export_run
from ranking.servable import load_servable
from ranking.signatures import RANK_CANDIDATES, SERVING_DEFAULT, split_request
from ranking.warmup import warmup_batches

HISTORY = {"order": "ts", "max_len": 3, "lists": [{"name": "seen", "column": "author"},
                                                   {"name": "clicked", "column": "author", "where": "click"}]}


def data_config():
    return parse_config({
        "data": {"log": "unused.csv", "time_column": "day", "user_column": "user", "item_column": "item",
                 "history": HISTORY},
        "features": [{"name": "author", "kind": "categorical", "vocab": {}},
                     {"name": "clicked", "kind": "match", "match": "author", "max_values": 3}],
        "tasks": [{"name": "click", "type": "binary", "label": "click"}]}).data


def frame() -> pd.DataFrame:
    """User 1 on day 0: authors 10, 11 and 12 (11 and 12 at the same time), 10, 13, 14; day 1: 15. User 2 between."""
    return pd.DataFrame({
        "user": [1, 1, 2, 1, 1, 1, 1, 1, 2],
        "day": [0, 0, 0, 0, 0, 0, 0, 1, 0],
        "ts": [1, 2, 2, 2, 3, 4, 5, 6, 9],
        "author": [10.0, 11.0, 99.0, 12.0, 10.0, 13.0, np.nan, 15.0, 98.0],  # a left-joined side column: floats
        "click": [0, 1, 1, 1, 0, 1, 1, 0, 0],
        "item": range(9),
    }).sample(frac=1.0, random_state=0)  # the rows' order must not matter


def test_lists_hold_strictly_earlier_rows_of_the_session_newest_first():
    df = frame()
    lists = {k: dict(zip(df.index, v)) for k, v in history_lists(df, data_config()).items()}
    assert [lists["seen"][i] for i in range(9)] == [
        "", "10", "", "10", "12,11,10", "10,12,11", "13,10,12", "", "99"]  # same-time rows never see each other;
    # max_len 3 keeps the newest; a missing author enters nothing; day 1 starts empty
    assert [lists["clicked"][i] for i in range(9)] == ["", "", "", "", "12,11", "12,11", "13,12,11", "", "99"]


def test_later_rows_change_nothing_earlier():
    df = frame()
    before = history_lists(df, data_config())
    later = df.assign(author=np.where(df["ts"] >= 4, 77.0, df["author"]), click=np.where(df["ts"] >= 4, 1, df["click"]))
    after = history_lists(later, data_config())
    early = (df["ts"] <= 4).to_numpy()
    for name in before:
        np.testing.assert_array_equal(after[name][early], before[name][early])


def test_a_missing_history_column_is_named():
    with pytest.raises(ConfigError, match=r"data.history.lists\[1\].where: column 'click'"):
        history_lists(frame().drop(columns="click"), data_config())


@pytest.mark.parametrize("ids", [np.array([10, 11, -1, 7, 3], np.int64),
                                 np.array(["10", "b", "", "7", "3"], dtype=object)])
def test_graph_count_equals_numpy_count(ids):
    lists = np.array(["10,12,10", "a,b,b,b", "", "7,8,9,7", " 3 "], dtype=object)  # the 4th 7 is past max_values 3
    spec = FeatureSpec(name="m", kind="match", match="x", max_values=3)
    graph = np.asarray(MatchCount()(SplitValues(",", 3)(lists), ids))
    np.testing.assert_array_equal(graph, match_counts(lists, ids, spec))
    want = [2, 2, 0, 1, 1] if ids.dtype == object else [2, 0, 0, 1, 1]
    np.testing.assert_array_equal(graph, want)


def test_match_spec_errors_name_the_feature():
    base = {"data": {"log": "l.csv", "time_column": "day", "user_column": "user", "item_column": "item"},
            "tasks": [{"name": "click", "type": "binary", "label": "click"}]}
    author = {"name": "author", "kind": "categorical", "vocab": {}}
    with pytest.raises(ConfigError, match=r"features\[2\] \('m'\): match 'user'"):
        parse_config({**base, "features": [author, {"name": "user", "kind": "categorical", "group": "user",
                                                    "vocab": {}}, {"name": "m", "kind": "match", "match": "user"}]})
    with pytest.raises(ConfigError, match=r"features\[1\] \('m'\): .*group must be 'item', got 'context'"):
        parse_config({**base, "features": [author, {"name": "m", "kind": "match", "match": "author",
                                                    "group": "context"}]})
    with pytest.raises(ConfigError, match="kind 'match' needs 'match'"):
        parse_config({**base, "features": [author, {"name": "m", "kind": "match"}]})


@pytest.fixture(scope="module", params=[None, ["click"]], ids=["bottom", "click_tower"])
def history_run(request, tmp_path_factory, synthetic_log):
    """Segments the user clicked earlier the same day, counted against the candidate's segment; into the shared
    bottom, or into click's tower only (its encoder then reads the candidate's segment apart from the bottom's)."""
    log = pd.read_csv(synthetic_log)
    path = tmp_path_factory.mktemp("hist") / "log.csv"
    synthetic.write_log(log.assign(ts=np.arange(len(log))), path)
    data = synthetic.config(path, ["segment", "user_id", "item_id"], ["click"], epochs=1).model_dump()
    data["data"]["history"] = {"order": "ts", "max_len": 20, "lists": [
        {"name": "segments_clicked", "column": "segment", "where": "click"}]}
    data["features"].append({"name": "segments_clicked", "kind": "match", "match": "segment", "max_values": 20,
                             "transform": "log1p", "towers": request.param})
    return train_run(parse_config(data, "history"), tmp_path_factory.mktemp("hist") / "r")


@pytest.fixture(scope="module")
def history_export(history_run, tmp_path_factory) -> tuple[pd.DataFrame, Path]:
    """``history_run``'s log as the trainer reads it (history lists attached) and the base path of its export as
    version 1 (export_run checks that its signatures agree); read and exported once for both tests that read them."""
    frame = read_log(history_run.config.data)
    base = tmp_path_factory.mktemp("hist_models") / "models"
    export_run(history_run.run_dir, base, verbose=False, warmup=warmup_batches(history_run.config, frame))
    return frame, base


def test_match_feature_trains_exports_and_serves_the_list_sent_once(history_run, history_export):
    config = history_run.config
    df, base_path = history_export
    df = df[df["day"] == df["day"].max()]
    user = df[df["segments_clicked"] != ""]["user_id"].value_counts().index[0]
    rows = raw_inputs(df[df["user_id"] == user].reset_index(drop=True), config.serving_features)
    sv = load_servable(base_path / "1")
    base = sv.predict(rows, SERVING_DEFAULT)["click"]
    fed = sv.predict({**rows, "segments_clicked": np.array([",".join([s] * 5) for s in rows["segment"]],
                                                           dtype=object)}, SERVING_DEFAULT)["click"]
    assert np.abs(fed - base).max() > 1e-4  # the count reaches the output
    one = {**rows, "segments_clicked": np.repeat(rows["segments_clicked"][:1], len(rows["segment"]))}
    ranked, repeated = split_request(one, config)  # one list for the request, repeated to every candidate
    np.testing.assert_allclose(sv.predict(ranked, RANK_CANDIDATES)["click"],
                               sv.predict(repeated, SERVING_DEFAULT)["click"], rtol=1e-5, atol=1e-6)


def test_the_service_takes_the_list_once_in_the_context(history_export, tmp_path):
    """Over real loopback gRPC: the list sent once in context_features is counted against every candidate, as
    serving_default does with the list repeated per row; a list of numbers is refused naming the field."""
    import grpc
    import yaml

    from serving.client import RankingClient, build_request
    from serving.codec import response_arrays
    from serving.config import parse_serving_config
    from serving.service import RankingService

    base = history_export[1]
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
        segments = np.array(["news", "sports", "music", "music"], dtype=object)
        items = np.array([1, 2, 3, 4], dtype=np.int64)
        history = "music,music,sports"
        got = response_arrays(client.send(build_request(
            {"user_id": 7}, items, {"segments_clicked": history}, {"segment": segments}, return_predictions=True)))
        want = sv.predict({"user_id": np.full(4, 7, np.int64), "item_id": items, "segment": segments,
                           "segments_clicked": np.array([history] * 4, dtype=object)}, SERVING_DEFAULT)["click"]
        np.testing.assert_allclose(got["click"][np.argsort(got["candidate_indices"])], want, rtol=2e-4, atol=1e-6)
        empty = response_arrays(client.send(build_request({"user_id": 7}, items, {}, {"segment": segments},
                                                          return_predictions=True)))
        assert not np.allclose(np.sort(empty["click"]), np.sort(got["click"]))  # the list reaches the model
        with pytest.raises(grpc.RpcError) as err:
            client.send(build_request({"user_id": 7}, items, {"segments_clicked": 3}, {"segment": segments}))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "context_features[segments_clicked]" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            client.send(build_request({"user_id": 7, "segments_clicked": "music"}, items, {}, {"segment": segments}))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "user_features[segments_clicked]" in err.value.details() and "context_features (one list" in \
            err.value.details()
        client.close()
    finally:
        svc.stop(1)


KUAIRAND = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "kuairand-pure"


def test_real_log_rows_of_one_request_share_their_lists_and_never_see_its_clicks():
    """The request boundary is (user, time_ms): the log has no request id, and rows sharing a user and a time_ms are
    the only ones certainly of one request (reports/history_request_boundary.md). On the real KuaiRand log (both
    files), with the video id as the listed value: every row of a request gets the same lists (32 requests have a
    duplicate row dated the next day at 00:00: they too), so a click on a row of the request never enters another
    row's list unless that video was also clicked in an earlier request."""
    df = pd.concat([pd.read_csv(KUAIRAND / f, usecols=["user_id", "video_id", "date", "time_ms", "is_click"]) for f in
                    ("log_standard_pure_20220425_to_20220430.csv", "log_standard_pure_20220501_to_20220504.csv")],
                   ignore_index=True)
    data = parse_config({
        "data": {"log": "unused.csv", "time_column": "date", "user_column": "user_id", "item_column": "video_id",
                 "history": {"order": "time_ms", "max_len": 1000, "lists": [
                     {"name": "seen", "column": "video_id"}, {"name": "clicked", "column": "video_id",
                                                               "where": "is_click"}]}},
        "features": [{"name": "video_id", "kind": "categorical", "vocab": {}}],
        "tasks": [{"name": "click", "type": "binary", "label": "is_click"}]}).data
    df = df.assign(**history_lists(df, data))
    request = df.groupby(["user_id", "time_ms"])
    multi = request["video_id"].transform("size").to_numpy() > 1
    assert multi.sum() > 10_000 and (multi & (df["is_click"].to_numpy() > 0)).sum() > 1_000  # not vacuous
    for name in ("seen", "clicked"):
        differ = int((request[name].transform("nunique") > 1).sum())
        assert differ == 0, f"{name}: {differ} rows hold a list another row of their request does not"
    clicks = df[df["is_click"] > 0]
    clicked_by_user = {u: (g["time_ms"].to_numpy(), g["video_id"].astype(str).to_numpy())
                       for u, g in clicks.groupby("user_id")}
    in_request = clicks.groupby(["user_id", "time_ms"])["video_id"].agg(lambda v: set(v.astype(str)))
    rows = df[multi & (df["clicked"] != "")]
    checked = 0
    for user, t, listed in rows[["user_id", "time_ms", "clicked"]].itertuples(index=False):
        own = in_request.get((user, t), set())
        times, videos = clicked_by_user[user]
        assert own & set(listed.split(",")) <= set(videos[times < t]), (user, t)  # only clicks of earlier requests
        checked += bool(own)
    assert checked > 100
