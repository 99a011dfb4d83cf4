"""The server-side feature join against training's join on the real KuaiRand config, tables and Apr 30 log rows.

Training's inputs for a logged row are ``raw_inputs`` of the log left-joined with the side tables
(``read_log`` / ``join_side_tables``); serving gets only the ids and the context and must produce the same arrays.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from features.logs import join_side_tables, load_side_tables, raw_column, raw_inputs, read_log, read_table
from features.spec import ConfigError, FeatureSpec, RankstageConfig, load_config, parse_config
from features.statistics import write_snapshot
from serving.features import FeatureTables

ROOT = Path(__file__).resolve().parent.parent
DAY = 20220430
LISTS = ("match", "sequence")  # the kinds of the user's history lists, which the gateway sends once per request


def with_data(config: RankstageConfig, features: list[dict] | None = None, **data: object) -> RankstageConfig:
    """The config with ``data`` fields replaced (and features appended)."""
    dump = config.model_dump()
    dump["data"].update(data)
    dump["features"] += features or []
    return parse_config(dump, "test config")


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> RankstageConfig:
    """configs/kuairand.yaml with its paths made absolute (tests may run from anywhere)."""
    cfg = load_config(ROOT / "configs" / "kuairand.yaml")
    cfg = with_data(cfg, log=str(ROOT / cfg.data.log[0]),  # Apr 25-30, the first of its two files
                    joins=[{**j.model_dump(), "path": str(ROOT / j.path)} for j in cfg.data.joins],
                    statistics={**cfg.data.statistics.model_dump(), "path": str(tmp_path_factory.mktemp("stats"))})
    history = read_log(cfg.data, statistics=False)
    write_snapshot(history[history[cfg.data.time_column] < DAY], cfg.data)  # what serving holds on Apr 30
    return cfg


@pytest.fixture(scope="module")
def day(config) -> pd.DataFrame:
    """Apr 30 as training reads it: the log joined with the side tables."""
    log = read_log(config.data)
    return log[log[config.data.time_column] == DAY].reset_index(drop=True)


@pytest.fixture(scope="module")
def raw_day(config) -> pd.DataFrame:
    """Apr 30 rows of the bare log (ids, context and labels only), to join with variants of the side tables."""
    log = read_table(config.data.log)
    return log[log[config.data.time_column] == DAY].reset_index(drop=True)


@pytest.fixture(scope="module")
def tables(config) -> FeatureTables:
    return FeatureTables.load(config)


def serve_rows(tables: FeatureTables, config: RankstageConfig, rows: pd.DataFrame,
               features: list[FeatureSpec] | None = None) -> dict[str, np.ndarray]:
    """Assemble ``rows`` as the gateway would send them: one request per (user, context), carrying only the user
    id, the context values and the candidates' item ids; the outputs put back in row order, (N,) each."""
    features = features or config.serving_features
    user, item = config.data.user_column, config.data.item_column
    # sent by the gateway: the context, and the user's history lists (one per request)
    context = [f for f in config.serving_features if f.group == "context" or (f.kind in LISTS and f in features)]
    out: dict[str, list] = {f.name: [None] * len(rows) for f in features}
    for _, group in rows.groupby([user, *[f.source for f in context]], sort=False):
        request = {user: group[user].to_numpy()[:1], **{f.name: raw_column(group, f)[:1] for f in context}}
        candidates = {item: group[item].to_numpy()}
        req, cand = tables.assemble(features, request, candidates, len(group))
        for f in features:
            values = cand[f.name] if f.name in cand else req[f.name]
            assert values.shape == ((len(group),) if f.name in cand else (1,)), f.name
            for pos, v in zip(group.index, np.broadcast_to(values, (len(group),))):
                out[f.name][pos] = v
    return {f.name: np.array(out[f.name], dtype=_dtype(f)) for f in features}


def side_features(config: RankstageConfig) -> list[FeatureSpec]:
    """The serving features of the side tables and the request: all but the statistics (checked by
    tests/test_statistics.py and by the tests here that join the whole log) and the history lists (derived from the
    whole log, sent by the gateway)."""
    stats = {f["name"] for f in config.data.statistics.feature_specs()} if config.data.statistics else set()
    return [f for f in config.serving_features if f.name not in stats and f.kind not in LISTS]


def _dtype(f: FeatureSpec) -> type:
    return {"int": np.int64, "string": object, "float": np.float32}[f.raw_dtype]


def assert_same_inputs(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert got.keys() == expected.keys()
    for name, values in expected.items():
        assert got[name].dtype == values.dtype, name
        np.testing.assert_array_equal(got[name], values, err_msg=name)


def test_one_users_list_matches_training(config, day, tables):
    """The Apr 30 user with the most impressions, all of them as one candidate list (context of the first one)."""
    user, item = config.data.user_column, config.data.item_column
    rows = day[day[user] == day[user].value_counts().index[0]].reset_index(drop=True)
    assert len(rows) >= 20
    context = {"tab": rows["tab"].to_numpy()[:1], "hourmin": rows["hourmin"].to_numpy()[:1],
               **{f.name: raw_column(rows, f)[:1] for f in config.serving_features if f.kind in LISTS}}
    request = {user: rows[user].to_numpy()[:1], **context}
    req, cand = tables.assemble(config.serving_features, request, {item: rows[item].to_numpy()}, len(rows))
    groups = {f.name: f.group for f in config.serving_features}
    assert set(req) == {n for n, g in groups.items() if g in ("user", "context")}
    assert set(cand) == {n for n, g in groups.items() if g == "item"}
    got = {**{n: np.repeat(v, len(rows)) for n, v in req.items()}, **cand}  # user features broadcast
    expected = raw_inputs(rows.assign(**{k: v[0] for k, v in context.items()}), config.serving_features)
    assert_same_inputs(got, expected)
    assert req["user_active_degree"][0] != ""  # the table was really read
    assert np.isfinite(cand["video_duration"]).any() and (cand["author_id"] >= 0).all()


def test_random_sample_matches_training(config, day, tables):
    rows = day.sample(500, random_state=0).reset_index(drop=True)
    assert_same_inputs(serve_rows(tables, config, rows), raw_inputs(rows, config.serving_features))


def test_missing_marker_is_missing_as_in_training(config, raw_day, tmp_path):
    """-124 in the user table: the real is_live_streamer ones, plus a float and a string column rewritten to -124."""
    users = read_table(config.data.joins[0].path)
    marked = users.loc[users["is_live_streamer"] == -124, "user_id"]
    user_id = int(raw_day.loc[raw_day["user_id"].isin(marked), "user_id"].iloc[0])  # logged on Apr 30
    users.loc[users["user_id"] == user_id, ["follow_user_num", "onehot_feat4"]] = -124
    path = tmp_path / "users.csv"
    users.to_csv(path, index=False)
    cfg = with_data(config, joins=[{**config.data.joins[0].model_dump(), "path": str(path)},
                                   config.data.joins[1].model_dump()])
    rows = raw_day[raw_day["user_id"] == user_id].reset_index(drop=True)
    expected = raw_inputs(join_side_tables(rows, load_side_tables(cfg.data)), side_features(cfg))
    got = serve_rows(FeatureTables.load(cfg), cfg, rows, side_features(cfg))
    assert_same_inputs(got, expected)
    assert (got["is_live_streamer"] == -1).all()  # int categorical -> -1
    assert np.isnan(got["follow_user_num"]).all()  # numeric -> NaN (the graph fills the default)
    assert (got["onehot_feat4"] == -1).all()


def missing(f: FeatureSpec, values: np.ndarray) -> np.ndarray:
    if f.raw_dtype == "int":
        return values == -1
    if f.raw_dtype == "string":
        return values == ""
    return np.isnan(values)


def test_unknown_ids_are_missing_not_errors(config, day, tables):
    user, item = config.data.user_column, config.data.item_column
    known = day[item].to_numpy()[:3]
    items = np.array([10**12, *known, -1], dtype=np.int64)
    request = {user: np.array([10**12]), "tab": np.array([1]), "hourmin": np.array([3])}
    req, cand = tables.assemble(config.serving_features, request, {item: items}, len(items))
    by_name = {f.name: f for f in config.serving_features}
    for name, values in req.items():
        if name not in ("user_id", "tab", "hourmin"):
            assert missing(by_name[name], values).all(), name
    rows = day.iloc[:3]
    per_user = {f"stat_{k.name}_" for k in config.data.statistics.keys if user in k.columns}  # e.g. user x author
    lists = {lst.name for lst in config.data.history.lists} if config.data.history else set()
    for name, values in cand.items():
        if name in lists:  # the request's history lists: no side table holds them, not sent here -> empty
            assert missing(by_name[name], values).all(), name
        elif name.startswith(tuple(per_user)):  # candidate statistics keyed on the user too: an unknown user has none
            assert missing(by_name[name], values).all(), name
        elif name != item:
            assert missing(by_name[name], values[[0, -1]]).all(), name
            np.testing.assert_array_equal(values[1:-1], raw_column(rows, by_name[name]), err_msg=name)
    # no user id at all: the user side is missing too (the service rejects such a request before this)
    req, _ = tables.assemble(config.serving_features, {"tab": np.array([1])}, {item: known}, 3)
    assert req["user_active_degree"][0] == "" and req["is_video_author"][0] == -1 and req["hourmin"][0] == -1


def test_inline_values_override_the_tables(config, day, tables):
    user, item = config.data.user_column, config.data.item_column
    counts = day[user].value_counts()
    rows = day[day[user] == counts.index[0]].iloc[:5]
    request = {user: rows[user].to_numpy()[:1], "tab": np.array([1]), "hourmin": np.array([3]),
               "user_active_degree": np.array(["sent inline"], dtype=object),
               "register_days": np.array([7.0], np.float32)}
    duration = np.arange(5, dtype=np.float32) * 1000
    candidates = {item: rows[item].to_numpy(), "video_duration": duration}
    req, cand = tables.assemble(config.serving_features, request, candidates, 5)
    assert req["user_active_degree"].tolist() == ["sent inline"] and req["register_days"].tolist() == [7.0]
    np.testing.assert_array_equal(cand["video_duration"], duration)
    expected = raw_inputs(rows, config.serving_features)  # everything not sent still comes from the tables
    np.testing.assert_array_equal(req["follow_user_num"], expected["follow_user_num"][:1])
    np.testing.assert_array_equal(cand["server_width"], expected["server_width"])


def test_rewritten_table_is_seen_by_a_fresh_load(config, day, tmp_path):
    users = read_table(config.data.joins[0].path)
    path = tmp_path / "users.csv"
    users.to_csv(path, index=False)
    cfg = with_data(config, joins=[{**config.data.joins[0].model_dump(), "path": str(path)},
                                   config.data.joins[1].model_dump()])
    old = FeatureTables.load(cfg)
    assert not old.changed()
    assert old.fingerprint()[0] == (str(path), path.stat().st_mtime_ns, path.stat().st_size)
    user_id = int(day["user_id"].iloc[0])
    users.loc[users["user_id"] == user_id, "user_active_degree"] = "rewritten_on_disk"
    users.to_csv(path, index=False)
    assert old.changed()
    new = FeatureTables.load(cfg)
    assert not new.changed() and new.fingerprint() != old.fingerprint()
    request = {"user_id": np.array([user_id])}
    candidates = {"video_id": day["video_id"].to_numpy()[:2]}
    before = old.assemble(cfg.serving_features, request, candidates, 2)[0]["user_active_degree"]
    after = new.assemble(cfg.serving_features, request, candidates, 2)[0]["user_active_degree"]
    assert after.tolist() == ["rewritten_on_disk"] and before.tolist() != after.tolist()  # old snapshot unchanged
    path.unlink()
    assert new.changed()  # a removed table counts as changed (the reload then fails and is refused)


def test_side_table_without_its_key_column_is_refused(config, tmp_path):
    path = tmp_path / "users.csv"
    read_table(config.data.joins[0].path).drop(columns=["user_id"]).to_csv(path, index=False)
    cfg = with_data(config, joins=[{**config.data.joins[0].model_dump(), "path": str(path)},
                                   config.data.joins[1].model_dump()])
    with pytest.raises(ConfigError, match=r"key 'user_id' missing in .*users\.csv"):
        FeatureTables.load(cfg)


def test_chained_join_and_duplicate_keys_match_training(config, raw_day, tmp_path):
    """An author table keyed by the video table's author_id, with a duplicated author (the first row wins), -124
    markers, and a string feature read from an integer column that the marker turns into floats ("2", not "2.0")."""
    videos = read_table(config.data.joins[1].path)
    authors = pd.DataFrame({"author_id": videos["author_id"].unique()})
    authors["author_fans"] = (authors["author_id"] % 997).astype(float)
    authors["author_level"] = authors["author_id"] % 3 + 1
    authors.loc[authors.index[::50], "author_fans"] = -124  # missing markers
    authors.loc[authors.index[1::7], "author_level"] = -124
    dup = authors.iloc[:20].assign(author_fans=-5.0, author_level=99)
    authors = pd.concat([authors.iloc[10:], dup])  # authors 10..19 twice: the first row (the real one) is kept
    path = tmp_path / "authors.csv"
    authors.to_csv(path, index=False)
    cfg = with_data(config, joins=[*[j.model_dump() for j in config.data.joins],
                                   {"path": str(path), "key": "author_id", "missing_values": [-124]}],
                    features=[{"name": "author_fans", "kind": "numeric", "group": "item"},
                              {"name": "author_level", "kind": "categorical", "dtype": "string", "group": "item",
                               "vocab": {}}])
    rows = raw_day.sample(300, random_state=1).reset_index(drop=True)
    expected = raw_inputs(join_side_tables(rows, load_side_tables(cfg.data)), side_features(cfg))
    tables = FeatureTables.load(cfg)
    got = serve_rows(tables, cfg, rows, side_features(cfg))
    assert_same_inputs(got, expected)
    assert set(got["author_level"]) == {"1", "2", "3", ""}  # no "2.0", no duplicate's 99
    assert np.isnan(got["author_fans"]).any() and not (got["author_fans"] == -5).any()
    # an unknown video has no author id, so no author features either
    _, cand = tables.assemble(cfg.serving_features, {"user_id": rows["user_id"].to_numpy()[:1]},
                              {"video_id": np.array([10**12])}, 1)
    assert cand["author_level"].tolist() == [""] and np.isnan(cand["author_fans"]).all()


def test_statistics_tables_of_different_as_of_are_refused(config, tmp_path):
    """One snapshot, one day: the user table rewritten as of another day (a half-published snapshot) is refused,
    the error naming each table with its as_of; a consistent snapshot loads and reports its day."""
    stats = Path(config.data.statistics.path)
    moved = tmp_path / "stats"
    shutil.copytree(stats, moved)
    user = pd.read_parquet(moved / "user.parquet")
    user.assign(as_of="20220429").to_parquet(moved / "user.parquet", index=False)
    cfg = with_data(config, statistics={**config.data.statistics.model_dump(), "path": str(moved)})
    with pytest.raises(ConfigError) as err:
        FeatureTables.load(cfg)
    message = str(err.value)
    assert f"{moved / 'user.parquet'} as of 20220429" in message, message
    assert f"{moved / 'item.parquet'} as of 20220430" in message, message
    assert f"{moved / 'user_author.parquet'} as of 20220430" in message, message
    assert FeatureTables.load(config).as_of == "20220430"
