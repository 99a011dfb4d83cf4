"""Log readers: CSV and Parquet give the same joined frame; unknown formats and missing files are clear errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from features.logs import read_log, read_table
from features.spec import ConfigError, DataConfig


def _write(tmp_path, fmt: str) -> DataConfig:
    log = pd.DataFrame({"user_id": [1, 2, 1, 3], "item_id": [10, 11, 12, 10], "day": [1, 1, 2, 2],
                        "click": [1, 0, 0, 1]})
    users = pd.DataFrame({"user_id": [1, 2, 2], "age": [30, -124, 41], "click": [9, 9, 9]})
    paths = {}
    for name, frame in (("log", log), ("users", users)):
        paths[name] = tmp_path / f"{name}.{fmt}"
        frame.to_parquet(paths[name]) if fmt == "parquet" else frame.to_csv(paths[name], index=False)
    return DataConfig(log=str(paths["log"]), joins=[{"path": str(paths["users"]), "key": "user_id",
                                                     "missing_values": [-124]}],
                      time_column="day", user_column="user_id", item_column="item_id")


def test_csv_and_parquet_read_and_join_alike(tmp_path):
    csv, parquet = read_log(_write(tmp_path, "csv")), read_log(_write(tmp_path, "parquet"))
    pd.testing.assert_frame_equal(csv, parquet, check_dtype=False)
    # left join keeps every impression; the side table's duplicate key keeps its first row; -124 becomes NaN;
    # the log's own "click" wins over the side table's column of the same name
    assert len(csv) == 4
    np.testing.assert_array_equal(csv["click"], [1, 0, 0, 1])
    age = csv["age"].to_numpy(dtype=float)
    assert age[0] == 30 and age[2] == 30  # user 1
    assert np.isnan(age[1])  # user 2: first row's -124 is the missing marker
    assert np.isnan(age[3])  # user 3: not in the side table


def test_unknown_format_and_missing_file_are_named(tmp_path):
    (tmp_path / "log.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"unknown format '\.json'"):
        read_table(tmp_path / "log.json")
    with pytest.raises(ConfigError, match="data file not found: .*nope.csv"):
        read_table(tmp_path / "nope.csv")


def test_a_log_of_many_files_reads_as_the_one_file_in_order(tmp_path):
    """A day-partitioned directory, a glob and a list of files give read_log / iter_log_chunks the frame of the one
    file they were cut from (days out of name order on purpose: the partition day orders them)."""
    from features.logs import iter_log_chunks

    data = _write(tmp_path, "csv")
    whole = read_table(data.log)
    parts = tmp_path / "parts"
    for day, rows in whole.groupby("day"):
        (parts / f"date=2022010{day}").mkdir(parents=True)
        rows.iloc[:1].to_parquet(parts / f"date=2022010{day}" / "part-00000.parquet", index=False)
        rows.iloc[1:].to_parquet(parts / f"date=2022010{day}" / "part-00001.parquet", index=False)
    csvs = [tmp_path / "b_day1.csv", tmp_path / "a_day2.csv"]
    for path, (_, rows) in zip(csvs, whole.groupby("day"), strict=True):
        rows.to_csv(path, index=False)
    expected = read_log(data)
    for spec in (str(parts), str(parts / "date=*" / "*.parquet"), [str(p) for p in csvs]):
        got = read_log(data.model_copy(update={"log": spec}))
        pd.testing.assert_frame_equal(got, expected, check_dtype=False)
        streamed = pd.concat(list(iter_log_chunks(spec)), ignore_index=True)
        pd.testing.assert_frame_equal(streamed, whole, check_dtype=False)
    assert DataConfig.model_validate({**data.model_dump(), "log": [str(p) for p in csvs]}).log == [str(p) for p in csvs]
    with pytest.raises(ConfigError, match="glob .* matches no"):
        read_table(str(tmp_path / "none" / "*.parquet"))


def test_a_join_path_under_the_log_follows_it():
    base = {"time_column": "day", "user_column": "user_id", "item_column": "item_id"}
    data = DataConfig(log="runs/x", joins=[{"path": "{log}/side/users.parquet", "key": "user_id"},
                                           {"path": "items.csv", "key": "item_id"}], **base)
    assert [j.path for j in data.joins] == ["runs/x/side/users.parquet", "items.csv"]
    with pytest.raises(ValueError, match=r"joins\[0\].path: '\{log\}/u.csv' needs data.log to be one directory"):
        DataConfig(log=["a.csv", "b.csv"], joins=[{"path": "{log}/u.csv", "key": "user_id"}], **base)
