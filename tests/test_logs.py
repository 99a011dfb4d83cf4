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
