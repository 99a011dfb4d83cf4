"""The TFRecord example schema: a real KuaiRand frame encoded and parsed back is the same frame, value for value."""

from __future__ import annotations

import numpy as np

from features import examples


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
