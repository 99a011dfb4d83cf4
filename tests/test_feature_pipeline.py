"""The Beam feature pipeline against the in-memory path: on the bundled KuaiRand log (statistics and history lists)
its examples are ``frame_columns(read_log(...))`` row for row and column for column, its Parquet shards hold its
TFRecord shards' rows file for file, its feature stats are ``build_stats`` of ``time_split``'s rows, its snapshot is
``snapshot_tables``'; bad input fails in one line and leaves no output directory."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from features import examples, pipeline
from features.logs import raw_inputs, read_log, time_split
from features.pipeline import build_features
from features.spec import ConfigError, parse_config
from features.statistics import snapshot_tables
from features.vocab import build_stats, load_stats
from rankstage.cli import main


@pytest.fixture(scope="module")
def built(kuairand_config, tmp_path_factory):
    out = tmp_path_factory.mktemp("features") / "kuairand"
    # two passes over disjoint users: the path a log larger than one pass takes, and equal to one pass's result;
    # the daily sums summed as they arrive (every input past the summed frame's size), as a large log's are
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline._SumFrames, "MIN_PENDING", 1)
        manifest = build_features(kuairand_config, out, verbose=False, buckets=8, batch_rows=16384, passes=2,
                                  formats=("tfrecord", "parquet"))
    return out, manifest


def _config_with_log(config, log):
    data = config.model_dump()
    data["data"]["log"] = str(log)
    return parse_config(data, "test")


def test_examples_equal_the_in_memory_frame_row_for_row(kuairand_config, kuairand_frame, built):
    out, manifest = built
    frame = kuairand_frame
    want = examples.frame_columns(frame, kuairand_config, examples.row_ids(0, 0, len(frame)))
    cols = [examples.Column(**c) for c in json.loads((out / "schema.json").read_text())]
    assert cols == examples.schema(kuairand_config, examples.key_kinds_of(want))
    days = sorted(p.name for p in (out / "examples").iterdir())
    assert days == [f"date={d}" for d in sorted(frame[kuairand_config.data.time_column].unique())]
    got = examples.read_columns(sorted((out / "examples").glob("date=*/*" + examples.SUFFIX)), cols)
    for d in days:  # a day's directory holds that day's rows only
        day = examples.read_columns(sorted((out / "examples" / d).glob("*" + examples.SUFFIX)), cols)[examples.DAY]
        assert set(day.tolist()) == {int(d.split("=")[1])}
    order = np.argsort(got[examples.ROW], kind="stable")
    got = {k: v[order] for k, v in got.items()}
    np.testing.assert_array_equal(got[examples.ROW], want[examples.ROW])  # every row once, none added
    assert any(c.name.startswith("stat_") for c in cols) and "authors_clicked_today" in got
    for c in cols:
        if c.kind == "float":
            np.testing.assert_array_equal(got[c.name], want[c.name].astype(np.float32), err_msg=c.name)  # NaN == NaN
        elif c.kind == "int":
            np.testing.assert_array_equal(got[c.name], want[c.name].astype(np.int64), err_msg=c.name)
        else:
            assert got[c.name].tolist() == [str(v) for v in want[c.name]], c.name
    rows = frame[kuairand_config.data.time_column].value_counts()
    assert manifest["rows_per_day"] == {str(k): int(v) for k, v in sorted(rows.items())}
    assert json.loads((out / "manifest.json").read_text()) == manifest


def test_the_parquet_shards_hold_the_tfrecord_shards_rows_file_for_file(built):
    import pyarrow.parquet as pq
    import tensorflow as tf

    out, manifest = built
    assert manifest["formats"] == ["tfrecord", "parquet"]
    cols = [examples.Column(**c) for c in json.loads((out / "schema.json").read_text())]
    records = sorted((out / "examples").glob("date=*/part-*" + examples.SUFFIX))
    parquet = [f.with_name(f.name.removesuffix(examples.SUFFIX) + examples.PARQUET_SUFFIX) for f in records]
    assert len(records) > 10 and sorted((out / "examples").glob("date=*/part-*" + examples.PARQUET_SUFFIX)) == \
        sorted(parquet)
    names = [str(f) for f in records]  # the file of every record, in one pipeline: as many rows in each file
    files = tf.data.Dataset.from_tensor_slices(np.arange(len(names))).flat_map(
        lambda i: tf.data.TFRecordDataset(tf.gather(names, i), "GZIP").map(lambda _: i))
    counts = np.bincount(np.concatenate([b.numpy() for b in files.batch(1 << 16)]), minlength=len(names))
    assert [pq.read_metadata(g).num_rows for g in parquet] == counts.tolist()
    want, got = examples.read_columns(records, cols), examples.read_parquet_columns(parquet, cols)
    assert len(want[examples.ROW]) == sum(manifest["rows_per_day"].values())
    for c in cols:  # the same rows in the same order, the same dtypes
        assert got[c.name].dtype == want[c.name].dtype, c.name
        np.testing.assert_array_equal(got[c.name], want[c.name], err_msg=c.name)  # NaN == NaN


def test_unknown_shard_formats_are_refused_before_any_work(kuairand_config, tmp_path):
    with pytest.raises(ConfigError, match="--formats tfrecord,orc: expected one or more of tfrecord,parquet"):
        build_features(kuairand_config, tmp_path / "out", verbose=False, formats=("tfrecord", "orc"))
    assert not (tmp_path / "out").exists()


def test_feature_stats_equal_build_stats_of_the_time_split(kuairand_config, kuairand_frame, built):
    out, manifest = built
    train, val = time_split(kuairand_frame, kuairand_config)
    col = kuairand_config.data.time_column
    assert manifest["train_days"] == sorted(train[col].unique().tolist())
    assert manifest["validation_days"] == sorted(val[col].unique().tolist())
    for name, rows in (("train", train), ("window", pd.concat([train, val], ignore_index=True))):
        want = build_stats(raw_inputs(rows, kuairand_config.features), kuairand_config.features)
        got = load_stats(out / "stats" / f"{name}.json")
        assert list(got) == list(want)
        for f, w in want.items():
            assert got[f].vocabulary == w.vocabulary, (name, f)
            np.testing.assert_allclose([got[f].mean, got[f].std], [w.mean, w.std], rtol=1e-9, err_msg=f"{name} {f}")
        assert any(w.vocabulary for w in want.values()) and any(w.std != 1.0 for w in want.values())


def test_snapshot_equals_snapshot_tables(kuairand_config, built):
    out, _ = built
    want = snapshot_tables(read_log(kuairand_config.data, statistics=False), kuairand_config.data)
    assert sorted(p.stem for p in (out / "statistics").glob("*.parquet")) == sorted(want)
    for name, table in want.items():
        pd.testing.assert_frame_equal(pd.read_parquet(out / "statistics" / f"{name}.parquet"), table)


def test_a_log_missing_a_column_fails_in_one_line_and_leaves_no_output(kuairand_config, tmp_path):
    log = pd.read_csv(kuairand_config.data.log, nrows=3000).drop(columns=["is_click"])
    log.to_csv(tmp_path / "log.csv", index=False)
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "features"
    with pytest.raises(ConfigError) as err:
        build_features(_config_with_log(kuairand_config, tmp_path / "log.csv"), out, verbose=False)
    message = str(err.value)
    assert "'is_click'" in message and "\n" not in message
    assert not out.exists() and list((tmp_path / "out").iterdir()) == []  # no temporary directory either


def test_a_bad_value_a_worker_meets_fails_in_one_line_and_leaves_no_output(kuairand_config, tmp_path):
    """Past the driver's sample: the error is raised inside the pipeline and comes back as the same one line."""
    log = pd.read_csv(kuairand_config.data.log).iloc[::15].reset_index(drop=True)  # every day, ~6,300 rows
    log.loc[5000, "is_like"] = 2
    log.to_csv(tmp_path / "log.csv", index=False)
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "features"
    with pytest.raises(ConfigError) as err:
        build_features(_config_with_log(kuairand_config, tmp_path / "log.csv"), out, verbose=False, buckets=2)
    message = str(err.value)
    assert message.startswith("task 'like': binary label 'is_like' has value 2.0") and "\n" not in message
    assert not out.exists() and list((tmp_path / "out").iterdir()) == []


def test_the_snapshot_is_as_of_the_day_after_data_until(kuairand_config, tmp_path):
    """Days after ``data.until`` are written as examples (to judge on) but stay out of the snapshot serving joins,
    as in ``rankstage statistics`` (``ranking.train.write_statistics_snapshot``)."""
    log = pd.read_csv(kuairand_config.data.log).iloc[::10].reset_index(drop=True)  # every day, ~9,500 rows
    log.to_csv(tmp_path / "log.csv", index=False)
    config = _config_with_log(kuairand_config, tmp_path / "log.csv")
    data = config.model_dump()
    days = sorted(log[config.data.time_column].unique())
    data["data"]["until"] = int(days[-2])
    config = parse_config(data, "test")
    out = tmp_path / "features"
    manifest = build_features(config, out, verbose=False, buckets=2, passes=1)
    assert str(days[-1]) in manifest["rows_per_day"]  # the later day's examples are there
    window = read_log(config.data, statistics=False)
    want = snapshot_tables(window[window[config.data.time_column] <= days[-2]], config.data)
    assert want and sorted(p.stem for p in (out / "statistics").glob("*.parquet")) == sorted(want)
    for name, table in want.items():
        pd.testing.assert_frame_equal(pd.read_parquet(out / "statistics" / f"{name}.parquet"), table)


def _sequence_config(base, tmp_path):
    """configs/kuairand.yaml as it ships (a ``scope: all`` behaviour sequence, which needs every earlier day's rows)
    on ``base``'s data paths."""
    from features.spec import load_config

    data = load_config(Path(__file__).resolve().parent.parent / "configs" / "kuairand.yaml").model_dump()
    data["data"].update(log=base.data.log, joins=[j.model_dump() for j in base.data.joins])
    data["data"]["statistics"]["path"] = str(tmp_path / "stats")
    return parse_config(data, "sequence test")


@pytest.mark.parametrize("which", ["default", "sequence"])
def test_a_warm_starts_day_selection_writes_that_days_examples_of_the_full_build(kuairand_config, tmp_path, which):
    """``days`` (a warm start's ``DaySelect``): only the selected day's examples, equal to the full build's rows of
    that day column for column: its statistics features still sum every earlier day (the tables are computed for
    the selected days only, so a wrong day there would change them) and a ``scope: all`` sequence still holds the
    events of earlier days."""
    from features.pipeline import DaySelect

    log = pd.read_csv(kuairand_config.data.log).iloc[::10].reset_index(drop=True)  # every day, ~9,500 rows
    log.to_csv(tmp_path / "log.csv", index=False)
    config = _config_with_log(kuairand_config, tmp_path / "log.csv")
    if which == "sequence":
        config = _sequence_config(config, tmp_path)
    col = config.data.time_column
    day = int(sorted(log[col].unique())[-2])  # a day with earlier days (statistics) and a later one (not written)
    full = build_features(config, tmp_path / "full", verbose=False, buckets=2, passes=1)
    one = build_features(config, tmp_path / "one", verbose=False, buckets=2, passes=1,
                         days=DaySelect(col, values=(day,)))
    assert list(one["rows_per_day"]) == [str(day)] and one["rows_per_day"][str(day)] == full["rows_per_day"][str(day)]
    _assert_same_day(tmp_path / "one", tmp_path / "full", day, which == "sequence")


def _assert_same_day(got_dir: Path, want_dir: Path, day, sequence: bool) -> None:
    """The examples of ``day`` under ``got_dir`` equal ``want_dir``'s, row for row (by row id), column for column."""
    cols = [examples.Column(**c) for c in json.loads((want_dir / "schema.json").read_text())]
    got, want = ({k: v[np.argsort(x[examples.ROW], kind="stable")] for k, v in x.items()}
                 for x in (examples.read_columns(sorted((d / "examples" / f"date={day}").glob(
                     "*" + examples.SUFFIX)), cols) for d in (got_dir, want_dir)))
    stat = [c.name for c in cols if c.name.startswith("stat_")]
    assert stat and np.isfinite(want[stat[0]]).any()  # the day has statistics to get wrong
    if sequence:
        assert any(v for v in want["clicked_videos"].tolist())  # the day has earlier events to lose
    assert len(got[examples.ROW]) == len(want[examples.ROW]) > 0
    for c in cols:
        if c.kind == "float":
            np.testing.assert_array_equal(got[c.name], want[c.name], err_msg=c.name)
        else:
            assert got[c.name].tolist() == want[c.name].tolist(), c.name


@pytest.mark.parametrize("which", ["default", "sequence"])
def test_a_build_from_the_previous_builds_state_equals_the_full_build(kuairand_config, tmp_path, which):
    """A daily build from the state of the build before it (``state_from``, ``features.carry``) reads only the new
    day's rows, yet writes the full build's examples of that day: statistics from the carried daily sums of the
    last 3 days, a ``scope: all`` sequence from the carried context rows, and the statistics snapshot of the whole
    log through that day. Chained twice (the second from the first's state), with other bucket counts and two
    passes, so the state is re-split by the new build's buckets."""
    from features.pipeline import DaySelect

    log = pd.read_csv(kuairand_config.data.log).iloc[::10].reset_index(drop=True)
    log.to_csv(tmp_path / "log.csv", index=False)
    config = _config_with_log(kuairand_config, tmp_path / "log.csv")
    if which == "sequence":
        config = _sequence_config(config, tmp_path)
    col = config.data.time_column
    days = [int(d) for d in sorted(log[col].unique())]

    def through(day):
        data = config.model_dump()
        data["data"]["until"] = day
        return parse_config(data, f"through {day}")

    build_features(config, tmp_path / "full", verbose=False, buckets=2, passes=1)
    build_features(through(days[-3]), tmp_path / "base", verbose=False, buckets=2, passes=1)
    prev = tmp_path / "base"
    for i, day in enumerate(days[-2:]):
        out = tmp_path / f"day{i}"
        if i == 0:
            got = build_features(through(day), out, verbose=False, buckets=3, passes=1,
                                 days=DaySelect(col, values=(day,)), state_from=prev)
        else:  # the command line's, every day after the state's by default
            config_file = tmp_path / "config.yaml"
            config_file.write_text(yaml.safe_dump(config.model_dump(), sort_keys=False))
            assert main(["features", "build", "--config", str(config_file), "--out", str(out), "--buckets", "3",
                         "--passes", "2", "--state-from", str(prev)]) == 0
            got = json.loads((out / "manifest.json").read_text())
        assert got["rows_per_day"] == {str(day): int((log[col] == day).sum())}
        assert got["state_from"] == str(prev / "state")
        _assert_same_day(out, tmp_path / "full", day, which == "sequence")
        window = read_log(config.data, statistics=False)  # the snapshot serving joins, as of the day after
        want = snapshot_tables(window[window[col] <= day], config.data)
        assert want and sorted(p.stem for p in (out / "statistics").glob("*.parquet")) == sorted(want)
        for name, table in want.items():
            pd.testing.assert_frame_equal(pd.read_parquet(out / "statistics" / f"{name}.parquet"), table)
        prev = out
    with pytest.raises(ConfigError, match=f"not after {days[-1]}"):  # its rows are summed in the state already
        build_features(config, tmp_path / "again", verbose=False, days=DaySelect(col, values=(days[-1],)),
                       state_from=prev)
    other = config.model_dump()
    other["data"]["statistics"]["windows"] = [1, 7]
    with pytest.raises(ConfigError, match=r"written for other data.statistics: statistics.windows\[1\]: state 3, "
                                          "this 7"):
        build_features(parse_config(other, "other windows"), tmp_path / "other", verbose=False, state_from=prev)
    with pytest.raises(ConfigError, match=f"no rows after {days[-1]}"):  # the state of the whole log: nothing new
        build_features(config, tmp_path / "none", verbose=False, state_from=tmp_path / "full")
    assert not any((tmp_path / d).exists() for d in ("again", "other", "none"))


def test_a_warm_start_builds_its_day_from_its_parents_state(kuairand_config, tmp_path):
    """``rankstage train --warm-start``: a parent refit through day d - 1 carries its build's state; the child's
    build names it, reads day d alone and writes the full build's examples of d (the shipped sequence config)."""
    from ranking.train import train

    log = pd.read_csv(kuairand_config.data.log).iloc[::10].reset_index(drop=True)
    log.to_csv(tmp_path / "log.csv", index=False)
    config = _sequence_config(_config_with_log(kuairand_config, tmp_path / "log.csv"), tmp_path)
    small = config.model_dump()
    small["model"].update(bottom_units=[32], num_experts=2, expert_units=[16], tower_units=[8])
    small["training"].update(epochs=1, batch_size=4096)
    col = config.data.time_column
    days = [int(d) for d in sorted(log[col].unique())]

    def through(day):
        d = json.loads(json.dumps(small))
        d["data"]["until"] = day
        return parse_config(d, f"through {day}")

    parent = train(through(days[-2]), tmp_path / "parent", refit=True, verbose=False)
    child = train(through(days[-1]), tmp_path / "child", verbose=False, warm_start=parent)
    manifest = json.loads((child / "features" / "manifest.json").read_text())
    assert manifest["state_from"] == str(parent / "features" / "state")
    assert manifest["rows_per_day"] == {str(days[-1]): int((log[col] == days[-1]).sum())}
    build_features(through(days[-1]), tmp_path / "full", verbose=False, buckets=2, passes=1)
    _assert_same_day(child / "features", tmp_path / "full", days[-1], sequence=True)
