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
