"""`rankstage logs import`: the KuaiRand CSVs become day-partitioned Parquet shards equal to the CSV row for row (in
the original order within a day); a bad value is one line naming file, row, column and value, exit code 2, and
nothing is left behind."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest

from features.logfiles import import_csv, iter_batches, log_files, needed_columns, partition_day
from features.logs import read_log
from features.spec import load_config
from rankstage.cli import main

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "kuairand-pure"
CSVS = [DATA / "log_standard_pure_20220425_to_20220430.csv", DATA / "log_standard_pure_20220501_to_20220504.csv"]


@pytest.fixture(scope="module")
def config():
    cfg = load_config(ROOT / "configs" / "kuairand.yaml", [], None)
    joins = [j.model_copy(update={"path": str(ROOT / j.path)}) for j in cfg.data.joins]
    return cfg.model_copy(update={"data": cfg.data.model_copy(update={"joins": joins})})


def test_import_equals_the_csv_row_for_row(tmp_path, config):
    out = tmp_path / "log"
    # small blocks and parts: days straddle CSV blocks and span several parts
    done = import_csv(config, CSVS, out, part_rows=7000, block_mb=1.0, progress=False)
    files = log_files(str(out))
    assert done["rows"] == 94_784 + 76_887 and done["days"] == 10 and done["files"] == len(files)
    assert all(f.parent.name.startswith("date=") and f.name.startswith("part-") for f in files)
    batches = list(iter_batches(files))
    for i, _, b in batches:  # every row is in its day's partition
        assert set(b.column("date").to_pylist()) == {int(partition_day(files[i]))}
    back = pa.Table.from_batches([b for _, _, b in batches]).to_pandas()
    csv = pd.concat([pacsv.read_csv(p).to_pandas() for p in CSVS], ignore_index=True)
    assert list(back.columns) == list(csv.columns) and len(back) == len(csv)
    for day, rows in csv.groupby("date", sort=True):  # each day: the CSV's rows of that day, in their order
        got = back[back["date"] == day].reset_index(drop=True)
        pd.testing.assert_frame_equal(got, rows.reset_index(drop=True), check_dtype=False)
    # typed by the config: ids int64, numbers (labels, time_ms) float64; columns it does not read as inferred
    dtypes = dict(back.dtypes.astype(str))
    assert (dtypes["user_id"], dtypes["is_click"], dtypes["date"], dtypes["is_hate"]) == ("int64", "float64", "int64",
                                                                                         "int64")
    assert len([f for f in files if partition_day(f) == "20220425"]) > 1
    # the joined frame (side tables, same-day history lists, point-in-time statistics) of the directory is the
    # CSVs' one with rows grouped by day: 4.6% of KuaiRand's rows are stamped with the next day inside a day's rows
    data = config.data
    from_csv = read_log(data.model_copy(update={"log": [str(p) for p in CSVS]}))
    from_dir = read_log(data.model_copy(update={"log": str(out)}))
    pd.testing.assert_frame_equal(from_dir, from_csv.sort_values("date", kind="stable").reset_index(drop=True),
                                  check_dtype=False)


def _bad_csv(tmp_path, row: int, column: str, value: str) -> Path:
    lines = CSVS[0].read_text().splitlines()[:3001]
    header = lines[0].split(",")
    cells = lines[row].split(",")
    cells[header.index(column)] = value
    lines[row] = ",".join(cells)
    path = tmp_path / "bad.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(("row", "column", "value", "what"), [
    (2500, "is_click", "x", "a number"),
    (1200, "video_id", "12.5", "an integer"),
    (2999, "date", "20220431", "a date (an integer YYYYMMDD)"),
    (1, "user_id", "", "an integer"),
])
def test_a_bad_value_is_one_line_and_leaves_nothing(tmp_path, config, capsys, row, column, value, what):
    path = _bad_csv(tmp_path, row, column, value)
    out = tmp_path / "log"
    cfg = tmp_path / "config.yaml"
    cfg.write_text((ROOT / "configs" / "kuairand.yaml").read_text().replace("../shared/data", str(ROOT.parent /
                                                                                                   "shared" / "data")))
    shown = repr(value) if value else "''"
    assert main(["logs", "import", "--config", str(cfg), "--out", str(out), "--block-mb", "0.05", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"rankstage logs: error: {path}: row {row}, column {column!r}: value {shown} is not {what}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.csv", "config.yaml"]  # no DIR, no temporary dir


def test_existing_out_is_refused_unless_overwrite_and_missing_column_named(tmp_path, config):
    path = _bad_csv(tmp_path, 1, "is_click", "1")
    out = tmp_path / "log"
    out.mkdir()
    with pytest.raises(FileExistsError, match="exists"):
        import_csv(config, [path], out, progress=False)
    assert import_csv(config, [path], out, overwrite=True, progress=False)["rows"] == 3000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.csv", "log"]
    pd.read_csv(path).drop(columns=["is_like"]).to_csv(tmp_path / "short.csv", index=False)
    with pytest.raises(Exception, match=r"short.csv: column 'is_like' missing"):
        import_csv(config, [tmp_path / "short.csv"], tmp_path / "log2", progress=False)
    assert not (tmp_path / "log2").exists()


def test_needed_columns_of_kuairand(config):
    needed = needed_columns(config)
    assert needed["date"] == "time" and needed["user_id"] == "int" and needed["is_click"] == "number"
    assert needed["duration_ms"] == "number" and needed["time_ms"] == "number" and needed["tab"] == "int"
    assert "author_id" in needed and "authors_seen_today" not in needed and not any(c.startswith("stat_")
                                                                                     for c in needed)


def test_a_short_row_is_named(tmp_path, config):
    path = tmp_path / "short_row.csv"
    path.write_text("\n".join(CSVS[0].read_text().splitlines()[:2000] + ["1,2,3"]) + "\n")
    with pytest.raises(Exception, match=r"^" + str(path) + r": row 2000: 3 values, expected 19: '1,2,3'$"):
        import_csv(config, [path], tmp_path / "log", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["short_row.csv"]


def test_append_adds_new_days_and_refuses_a_day_already_there(tmp_path, config):
    out = tmp_path / "log"
    import_csv(config, [CSVS[0]], out, progress=False)
    before = {f: f.stat().st_mtime_ns for f in log_files(str(out))}
    import_csv(config, [CSVS[1]], out, append=True, progress=False)
    files = log_files(str(out))
    assert len(files) == 10 and all(before[f] == f.stat().st_mtime_ns for f in before)  # nothing rewritten
    with pytest.raises(Exception, match=r"--append: .*date=20220501 exists"):
        import_csv(config, [CSVS[1]], out, append=True, progress=False)
    assert log_files(str(out)) == files and sorted(p.name for p in tmp_path.iterdir()) == ["log"]
