"""The TFRecord example schema: a real KuaiRand frame encoded and parsed back is the same frame, value for value;
its Parquet shard holds the same values with the same dtypes, and a Parquet file of another schema is named with
the column that differs."""

from __future__ import annotations

import numpy as np
import pytest

from features import examples
from features.spec import ConfigError


def test_real_rows_round_trip_through_the_example_records(kuairand_config, kuairand_frame, tmp_path):
    frame = kuairand_frame.iloc[:3000].reset_index(drop=True)
    columns = examples.frame_columns(frame, kuairand_config, examples.row_ids(2, 10, len(frame)))
    cols = examples.schema(kuairand_config, examples.key_kinds_of(columns))
    assert {f.name for f in kuairand_config.features} <= {c.name for c in cols}
    path = examples.write_shard(tmp_path / "part-0.tfrecord.gz", examples.encode(columns, cols))
    back = examples.read_columns([path], cols)
    assert not list(tmp_path.glob(".*.tmp"))
    for c in cols:
        want, got = columns[c.name], back[c.name]
        assert len(got) == len(frame), c.name
        if c.kind == "float":
            np.testing.assert_array_equal(got, want.astype(np.float32), err_msg=c.name)  # NaN equals NaN here
        elif c.kind == "int":
            np.testing.assert_array_equal(got, want.astype(np.int64), err_msg=c.name)
        else:
            assert got.tolist() == [str(v) for v in want], c.name
    assert back[examples.ROW][0] == (2 << examples.FILE_BITS) + 10
    assert np.isnan(back[examples.LABEL + "completion"]).sum() == np.isnan(columns[examples.LABEL + "completion"]).sum()


def test_an_epoch_from_shards_mixes_the_days_files(tmp_path):
    """Training reads shards in day order on disk; an epoch must not run from the first day to the last (a model
    then ends each epoch fitted to the last days). With no row shuffle (buffer 1) the first rows show which files
    the interleave opened first: with the files shuffled, epochs start on different files, and each epoch still
    holds every row once."""
    from ranking import shards

    cols = [examples.Column("file", "int")]
    files = []
    for i in range(12):  # 12 "days" of 50 rows, row value = its file
        path = tmp_path / f"date={20220401 + i}" / f"part-00000{examples.SUFFIX}"
        files.append(str(examples.write_shard(path, examples.encode({"file": np.full(50, i)}, cols))))
    source = shards.Source(cols, tuple(files))
    blocks = iter(shards.records(source, ["file"], block=50, shuffle_seed=7, shuffle_buffer=1, repeat=True))
    first_files, epochs = [], []
    for _ in range(3):
        epoch = np.concatenate([next(blocks)["file"].numpy() for _ in range(12)])
        epochs.append(epoch)
        first_files.append(set(epoch[:8].tolist()))
    for epoch in epochs:
        np.testing.assert_array_equal(np.bincount(epoch, minlength=12), np.full(12, 50))
    assert any(f - {0, 1, 2, 3} for f in first_files), first_files  # unshuffled: always files 0-3 first
    assert len({frozenset(f) for f in first_files}) > 1, first_files  # reshuffled every epoch


def test_a_parquet_shard_holds_the_records_values_column_for_column(kuairand_config, kuairand_frame, tmp_path):
    import pyarrow.parquet as pq

    frame = kuairand_frame.iloc[:3000].reset_index(drop=True)
    columns = examples.frame_columns(frame, kuairand_config, examples.row_ids(2, 10, len(frame)))
    cols = examples.schema(kuairand_config, examples.key_kinds_of(columns))
    records = examples.read_columns([examples.write_shard(tmp_path / "part-0.tfrecord.gz",
                                                          examples.encode(columns, cols))], cols)
    path = examples.write_parquet(tmp_path / "part-0.parquet", columns, cols)
    assert not list(tmp_path.glob(".*.tmp"))
    assert pq.read_schema(path).equals(examples.arrow_schema(cols))
    back = examples.read_parquet_columns([path], cols)
    assert list(back) == [c.name for c in cols]
    for c in cols:
        assert back[c.name].dtype == records[c.name].dtype, c.name
        np.testing.assert_array_equal(back[c.name], records[c.name], err_msg=c.name)  # NaN equals NaN here
    assert any(c.kind == "string" for c in cols) and isinstance(back[cols[-1].name], np.ndarray)
    # the replay's view: string features as fixed-width bytes, keys as str
    text = {c.name for c in cols if c.kind == "string" and c.name.startswith("key/")}
    as_read = examples.table_columns(pq.read_table(path), cols, text)
    for c in cols:
        if c.kind == "string" and c.name not in text:
            assert as_read[c.name].dtype.kind == "S", c.name
            assert as_read[c.name].tolist() == [v.encode() for v in records[c.name]], c.name


def test_a_parquet_shard_of_another_schema_is_named_with_the_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = [examples.Column("a", "int"), examples.Column("b", "float"), examples.Column("c", "string")]
    table = examples.arrow_table({"a": np.arange(3), "b": np.ones(3), "c": np.array(["x", "y", "z"], object)}, cols)
    assert examples.parquet_schema_error("f", table.schema, cols) is None
    assert examples.parquet_schema_error("f", table.drop_columns(["b"]).schema, cols) == \
        "f: no column 'b' (schema.json has it as float)"
    wrong = table.set_column(0, "a", table.column("a").cast(pa.float64()))
    assert examples.parquet_schema_error("f", wrong.schema, cols) == "f: column 'a' is double, schema.json says int64"
    pq.write_table(wrong, tmp_path / "part-0.parquet")
    with pytest.raises(ConfigError, match="part-0.parquet: column 'a' is double"):
        examples.read_parquet_columns([tmp_path / "part-0.parquet"], cols)
    nulls = table.set_column(1, "b", pa.array([1.0, None, 2.0], pa.float32()))
    pq.write_table(nulls, tmp_path / "nulls.parquet")
    assert examples.parquet_nulls_error("g", pq.read_metadata(tmp_path / "nulls.parquet"), cols) == \
        "g: column 'b' has nulls (the examples have none)"
    assert examples.parquet_nulls_error("g", pq.read_metadata(tmp_path / "part-0.parquet"), cols) is None
    with pytest.raises(ConfigError, match="column 'b' has 1 nulls"):
        examples.table_columns(nulls, cols)
