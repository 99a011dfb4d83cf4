"""Point-in-time statistics features: no look-ahead, smoothing, spec validation, and training == serving join.

A small synthetic log (6 days, 40 users, 30 videos of 8 authors) with a video side table giving each video's author.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from features.logs import raw_inputs, read_log
from features.spec import ConfigError, RankstageConfig, parse_config
from features.statistics import (
    DAY,
    attach_statistics,
    daily_sums,
    day_numbers,
    join_statistics,
    snapshot_as_of,
    statistics_tables,
    table_as_of,
    write_snapshot,
)
from serving.features import FeatureTables

DAYS = [20220425, 20220426, 20220427, 20220428, 20220429, 20220430]
STATISTICS = {"path": "unused", "windows": [1, 3], "prior_strength": 4,
              "events": {"click": "is_click", "like": "is_like"},
              "watch_time": {"column": "play_time_ms", "scale": 0.001},
              "keys": [{"name": "user", "columns": ["user_id"], "group": "user"},
                       {"name": "item", "columns": ["video_id"]},
                       {"name": "user_author", "columns": ["user_id", "author_id"]}]}


def make_log(seed: int = 0, rows_per_day: int = 300) -> pd.DataFrame:
    """(N,) impressions with an ``impression`` id; users and videos drawn with skew so some repeat a lot."""
    rng = np.random.default_rng(seed)
    n = rows_per_day * len(DAYS)
    return pd.DataFrame({
        "impression": np.arange(n),
        "user_id": rng.zipf(1.5, n) % 40,
        "video_id": rng.zipf(1.3, n) % 30,
        "date": np.repeat(DAYS, rows_per_day),
        "is_click": (rng.random(n) < 0.4).astype(int),
        "is_like": (rng.random(n) < 0.05).astype(int),
        "play_time_ms": rng.exponential(20_000, n).round(),
    })


def videos() -> pd.DataFrame:
    return pd.DataFrame({"video_id": np.arange(30), "author_id": np.arange(30) % 8 + 100})


def config_for(log_path: Path, video_path: Path, stats_path: Path, **statistics: object) -> RankstageConfig:
    return parse_config({
        "data": {"log": str(log_path), "joins": [{"path": str(video_path), "key": "video_id"}],
                 "time_column": "date", "user_column": "user_id", "item_column": "video_id",
                 "statistics": {**STATISTICS, "path": str(stats_path), **statistics}},
        "features": [{"name": "user_id", "kind": "categorical", "group": "user", "vocab": {}},
                     {"name": "video_id", "kind": "categorical", "vocab": {}}],
        "tasks": [{"name": "click", "type": "binary", "label": "is_click"}],
    }, "test config")


def with_stats(log: pd.DataFrame, config: RankstageConfig) -> pd.DataFrame:
    """``attach_statistics`` of a log joined with the video table, rows sorted by impression id."""
    joined = log.merge(videos(), on="video_id", how="left")
    return attach_statistics(joined, config.data).sort_values("impression").reset_index(drop=True)


@pytest.fixture()
def config(tmp_path) -> RankstageConfig:
    return config_for(tmp_path / "log.csv", tmp_path / "videos.csv", tmp_path / "stats", warmup_days=1)


def stat_columns(config: RankstageConfig) -> list[str]:
    return [f.name for f in config.features if f.name.startswith("stat_")]


def test_events_on_or_after_the_day_change_nothing(config):
    log = make_log()
    day = DAYS[3]
    before = with_stats(log, config)
    changed = log.copy()
    later = changed["date"] >= day
    changed.loc[later, "is_click"] = 1 - changed.loc[later, "is_click"]  # every later label flipped
    changed.loc[later, "play_time_ms"] *= 7
    extra = changed[later].assign(impression=changed["impression"] + 10_000)  # and later impressions doubled
    after = with_stats(pd.concat([changed, extra], ignore_index=True), config)
    after = after[after["impression"] < 10_000].reset_index(drop=True)
    cols = stat_columns(config)
    on_day = before["date"] == day
    pd.testing.assert_frame_equal(before.loc[on_day, cols], after.loc[on_day, cols])
    assert before.loc[on_day, cols].notna().any().all()  # the day has statistics to compare
    # and the check can fail: the next day's statistics do see the change
    next_day = before["date"] == DAYS[4]
    assert not np.allclose(before.loc[next_day, "stat_user_click_1d"], after.loc[next_day, "stat_user_click_1d"])


def test_windows_count_exactly_the_previous_days(config):
    log = make_log().merge(videos(), on="video_id")
    out = with_stats(make_log(), config)
    day = DAYS[4]
    user = int(out.loc[out["date"] == day, "user_id"].iloc[0])
    row = out[(out["date"] == day) & (out["user_id"] == user)].iloc[0]
    mine = log[log["user_id"] == user]
    assert row["stat_user_impressions_1d"] == (mine["date"] == DAYS[3]).sum()
    in_3d = mine["date"].isin(DAYS[1:4])
    assert row["stat_user_impressions_3d"] == in_3d.sum()
    assert row["stat_user_click_3d"] == mine.loc[in_3d, "is_click"].sum()


def test_rates_are_smoothed_toward_the_windows_global_rate(config):
    # day 1: user 1 sees one clicked impression; users 2..5 see 25 impressions each, 5 clicked (global 0.2 + ...)
    rows = [(1, 1)] + [(u, int(i < 5)) for u in range(2, 6) for i in range(25)]
    log = pd.DataFrame({"user_id": [u for u, _ in rows], "is_click": [c for _, c in rows], "is_like": 0,
                        "play_time_ms": 1000.0, "video_id": 0, "author_id": 100, "date": DAYS[0]})
    stats = config.data.statistics
    key = stats.keys[0]
    daily = daily_sums(log.assign(**{DAY: day_numbers(log["date"], stats.date_format)}), stats, key)
    table = table_as_of(daily, stats, key, int(day_numbers(pd.Series([DAYS[1]]), stats.date_format)[0]))
    table = table.set_index("user_id")
    prior = 21 / 101
    m = stats.prior_strength
    np.testing.assert_allclose(table.loc[1, "stat_user_click_rate_1d"], (1 + m * prior) / (1 + m), rtol=1e-6)
    # few impressions: near the prior, far from the raw rate 1.0; many impressions: near the id's own rate 0.2
    assert abs(table.loc[1, "stat_user_click_rate_1d"] - prior) < 0.2
    np.testing.assert_allclose(table.loc[2, "stat_user_click_rate_1d"], (5 + m * prior) / (25 + m), rtol=1e-6)
    np.testing.assert_allclose(table.loc[2, "stat_user_watch_s_1d"], 1.0, rtol=1e-6)


def test_first_day_is_kept_by_default_and_dropped_with_warmup(tmp_path):
    config = config_for(tmp_path / "l.csv", tmp_path / "v.csv", tmp_path / "s", warmup_days=1)
    assert with_stats(make_log(), config)["date"].min() == DAYS[1]
    keep = config_for(tmp_path / "l.csv", tmp_path / "v.csv", tmp_path / "s")
    first = with_stats(make_log(), keep)
    assert first["date"].min() == DAYS[0]
    day0 = first[first["date"] == DAYS[0]]
    assert day0["stat_user_impressions_3d"].isna().all()  # no history: missing, as an unknown id is at serving


@pytest.mark.parametrize("change, message", [
    ({"windows": [0, 3]}, "data.statistics.windows: windows must be distinct whole days >= 1, got [0, 3]"),
    ({"windows": [3, 3]}, "got [3, 3]"),
    ({"events": {"click-rate": "is_click"}}, "event names must be identifiers, got 'click-rate'"),
    ({"events": {}}, "data.statistics.events"),
    ({"prior_strength": -1}, "data.statistics.prior_strength"),
    ({"keys": [{"name": "user", "columns": ["user_id"]}, {"name": "user", "columns": ["video_id"]}]},
     "keys: duplicate names ['user']"),
    ({"keys": [{"name": "ua", "columns": ["user_id", "user_id"]}]}, "key columns must be distinct"),
    ({"keys": [{"name": "user", "columns": ["user_id"], "group": "context"}]}, "data.statistics.keys[0].group"),
    ({"wndows": [1]}, "data.statistics.wndows: Extra inputs are not permitted"),
])
def test_spec_errors_name_the_field_and_value(tmp_path, change, message):
    with pytest.raises(ConfigError) as err:
        config_for(tmp_path / "l.csv", tmp_path / "v.csv", tmp_path / "s", **change)
    assert message in str(err.value)


def test_statistics_features_are_generated_once_and_round_trip(config):
    names = stat_columns(config)
    assert len(names) == 3 * 2 * 6  # keys x windows x (impressions, click, click rate, like, like rate, watch)
    assert "stat_user_author_click_rate_3d" in names
    groups = {f.name: f.group for f in config.features}
    assert groups["stat_user_click_3d"] == "user" and groups["stat_item_click_3d"] == "item"
    again = parse_config(config.model_dump(), "dumped")
    assert again == config
    clash = config.model_dump()
    clash["features"] = [*clash["features"][:2], {"name": "stat_user_click_1d", "kind": "numeric"}]
    with pytest.raises(ConfigError, match=r"features\[2\]: name 'stat_user_click_1d' is a feature of data.stat"):
        parse_config(clash, "clash")


def reference_statistics(log: pd.DataFrame, rows: pd.DataFrame, config: RankstageConfig) -> dict[str, np.ndarray]:
    """The statistics features of ``rows`` (N,) computed from ``log`` (joined with the videos) without
    ``features.statistics``: per row, key and window w, a plain loop over the log rows of the w calendar days before
    the row's day with that key; rates smoothed toward the same days' global rate, mean watch seconds likewise. A
    key with no impression in any window is absent from the table: every column missing."""
    stats = config.data.statistics
    m = stats.prior_strength
    dates = pd.to_datetime(log["date"].astype(str), format="%Y%m%d")
    values: dict[str, list[float]] = {}
    for key in stats.keys:
        for row in rows.to_dict("records"):
            day = pd.to_datetime(str(int(row["date"])), format="%Y%m%d")
            cells = {}
            for w in stats.windows:
                past = log[(dates >= day - pd.Timedelta(days=w)) & (dates < day)]  # days d - w .. d - 1
                mine = past[np.logical_and.reduce([past[c] == row[c] for c in key.columns])]
                n = len(mine)
                cells[f"impressions_{w}d"] = float(n)
                for event, column in stats.events.items():
                    k, prior = mine[column].sum(), past[column].sum() / len(past)
                    cells[f"{event}_{w}d"] = float(k)
                    cells[f"{event}_rate_{w}d"] = (k + m * prior) / (n + m) if n else np.nan
                secs, prior = mine["play_time_ms"].sum() / 1000, past["play_time_ms"].sum() / 1000 / len(past)
                cells[f"watch_s_{w}d"] = (secs + m * prior) / (n + m) if n else np.nan
            absent = all(cells[f"impressions_{w}d"] == 0 for w in stats.windows)
            for name, value in cells.items():
                values.setdefault(f"stat_{key.name}_{name}", []).append(np.nan if absent else value)
    return {name: np.asarray(v) for name, v in values.items()}


def test_training_features_equal_the_serving_join(tmp_path, config):
    """Training's statistics of a day and the ones serving joins from that day's snapshot both equal the statistics
    counted by hand from the log (``reference_statistics``): a shared error in ``table_as_of`` cannot pass."""
    log = make_log(seed=3)
    log.to_csv(tmp_path / "log.csv", index=False)
    videos().to_csv(tmp_path / "videos.csv", index=False)
    day = DAYS[-1]
    training = read_log(config.data)
    training = training[training["date"] == day].reset_index(drop=True)
    history = read_log(config.data, statistics=False)
    write_snapshot(history[history["date"] < day], config.data)  # the snapshot serving holds on that day
    tables = FeatureTables.load(config)
    features = config.serving_features
    expected = raw_inputs(training, features)
    served = {f.name: np.empty(len(training), np.float32) for f in features if f.name.startswith("stat_")}
    for user, group in training.groupby("user_id"):  # one request per user, the day's videos as candidates
        req, cand = tables.assemble(features, {"user_id": np.array([user])},
                                    {"video_id": group["video_id"].to_numpy()}, len(group))
        for name in served:
            served[name][group.index] = cand[name] if name in cand else np.repeat(req[name], len(group))
    by_hand = reference_statistics(log.merge(videos(), on="video_id", how="left"), training, config)
    assert sorted(by_hand) == sorted(served)
    for name, values in served.items():
        np.testing.assert_allclose(values, by_hand[name], rtol=1e-6, err_msg=f"served {name}")
        np.testing.assert_allclose(expected[name], by_hand[name], rtol=1e-6, err_msg=f"training {name}")
        np.testing.assert_array_equal(values, expected[name], err_msg=name)
    assert np.isfinite(served["stat_user_author_click_rate_3d"]).sum() > 10  # the composite join matched rows
    assert np.isnan(served["stat_user_author_click_rate_3d"]).any()  # and left unknown pairs missing


def test_kuairand_training_features_equal_the_serving_join(tmp_path):
    """configs/kuairand_stats.yaml on the real log: Apr 30 rows of 150 users, served from the Apr 30 snapshot (Apr
    25-29), equal training's statistics columns; the author comes from the video side table (a chained key)."""
    root = Path(__file__).resolve().parent.parent
    dump = parse_config(yaml.safe_load((root / "configs" / "kuairand_stats.yaml").read_text())
                        ).model_dump()
    dump["data"]["log"] = str(root / dump["data"]["log"])
    for j in dump["data"]["joins"]:
        j["path"] = str(root / j["path"])
    dump["data"]["statistics"]["path"] = str(tmp_path / "stats")
    config = parse_config(dump, "kuairand stats")
    day = 20220430
    log = read_log(config.data)
    rows = log[(log["date"] == day) & log["user_id"].isin(log.loc[log["date"] == day, "user_id"].unique()[:150])]
    rows = rows.reset_index(drop=True)
    history = read_log(config.data, statistics=False)
    write_snapshot(history[history["date"] < day], config.data)
    tables = FeatureTables.load(config)
    stat_features = [f for f in config.serving_features if f.name.startswith("stat_")]
    expected = raw_inputs(rows, stat_features)
    served = {f.name: np.empty(len(rows), np.float32) for f in stat_features}
    for user, group in rows.groupby("user_id"):
        req, cand = tables.assemble(config.serving_features, {"user_id": np.array([user])},
                                    {"video_id": group["video_id"].to_numpy()}, len(group))
        for name in served:
            served[name][group.index] = cand[name] if name in cand else np.repeat(req[name], len(group))
    for name, values in served.items():
        np.testing.assert_array_equal(values, expected[name], err_msg=name)
    assert np.isfinite(served["stat_item_click_rate_3d"]).mean() > 0.5


def test_chunks_joined_with_the_tables_equal_the_whole_log(config):
    """Replay joins the statistics per chunk of the log with tables of the whole log: the same values."""
    log = make_log(seed=5).merge(videos(), on="video_id", how="left")
    whole = attach_statistics(log, config.data.model_copy(update={
        "statistics": config.data.statistics.model_copy(update={"warmup_days": 0})}))
    tables = statistics_tables(log, config.data)
    chunks = pd.concat([join_statistics(log.iloc[i:i + 257], tables, config.data) for i in range(0, len(log), 257)],
                       ignore_index=True)
    pd.testing.assert_frame_equal(chunks[whole.columns], whole)


def test_an_older_snapshot_never_replaces_a_newer_one(tmp_path, config, capsys):
    """A run with an earlier ``data.until`` writes an older snapshot to the path serving reloads from: the newer
    tables stay (bytes unchanged) unless ``replace_newer``, and stderr says which file was kept and why."""
    log = make_log(seed=7).merge(videos(), on="video_id", how="left")
    newest = write_snapshot(log, config.data)
    assert newest and {snapshot_as_of(p) for p in newest} == {"20220501"}
    before = {p: p.read_bytes() for p in newest}
    older = log[log["date"] < DAYS[-1]]
    assert write_snapshot(older, config.data) == []
    assert {p: p.read_bytes() for p in newest} == before
    assert "kept: it is as of 20220501, newer than this one (20220430)" in capsys.readouterr().err
    replaced = write_snapshot(older, config.data, replace_newer=True)
    assert sorted(replaced) == sorted(newest) and {snapshot_as_of(p) for p in replaced} == {"20220430"}
    assert write_snapshot(log, config.data) == replaced  # a newer one replaces an older one as before
    assert snapshot_as_of(tmp_path / "absent.parquet") is None
