"""Publishing a statistics snapshot: a reader of the published path sees the old table or the new one, whole; two
publishers never share a temporary file; ``train`` writes its snapshot into the run directory and leaves the one a
service reads alone unless asked to publish."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from test_statistics import STATISTICS, make_log, videos

import ranking.train
from features.spec import RankstageConfig, parse_config
from features.statistics import snapshot_as_of, write_snapshot


def tiny_config(tmp_path: Path) -> RankstageConfig:
    """test_statistics' 6-day log as a one-epoch ranker on user and video ids, statistics in the shared bottom."""
    make_log(seed=2).to_csv(tmp_path / "log.csv", index=False)
    videos().to_csv(tmp_path / "videos.csv", index=False)
    return parse_config({
        "name": "tiny",
        "data": {"log": str(tmp_path / "log.csv"), "joins": [{"path": str(tmp_path / "videos.csv"), "key": "video_id"}],
                 "time_column": "date", "user_column": "user_id", "item_column": "video_id",
                 "statistics": {**STATISTICS, "path": str(tmp_path / "published")}},
        "features": [{"name": "user_id", "kind": "categorical", "group": "user", "vocab": {}},
                     {"name": "video_id", "kind": "categorical", "vocab": {}}],
        "tasks": [{"name": "click", "type": "binary", "label": "is_click"}],
        "model": {"embedding_dim": 4, "bottom_units": [8], "num_experts": 0, "tower_units": [4]},
        "training": {"epochs": 1, "batch_size": 512},
    }, "tiny statistics ranker")


def history(tmp_path: Path) -> pd.DataFrame:
    return pd.read_csv(tmp_path / "log.csv").merge(videos(), on="video_id", how="left")


def test_a_reader_holding_the_published_table_reads_the_old_one_whole(tmp_path):
    config = tiny_config(tmp_path)
    log = history(tmp_path)
    [target] = [p for p in write_snapshot(log[log["date"] < 20220429], config.data) if p.name == "user.parquet"]
    held = pq.ParquetFile(target)  # a server in the middle of reading it
    old_rows = held.metadata.num_rows
    write_snapshot(log, config.data)  # a newer snapshot published meanwhile
    old = held.read().to_pandas()
    assert len(old) == old_rows and set(old["as_of"]) == {"20220429"}
    new = pd.read_parquet(target)
    assert set(new["as_of"]) == {"20220501"} and len(new) >= len(old)
    assert sorted(p.name for p in target.parent.iterdir()) == ["item.parquet", "user.parquet", "user_author.parquet"]


def test_interleaved_publishers_leave_whole_tables(tmp_path, monkeypatch):
    """Publisher B publishes while A has written its first table's temporary file but not renamed it yet (a sweep
    run and `rankstage statistics`, say). With one shared temporary name, B renames A's slot away and A's rename
    fails; with a temporary file per publisher both succeed, and each path holds one whole table."""
    config = tiny_config(tmp_path)
    log = history(tmp_path)
    real = pd.DataFrame.to_parquet
    calls = []

    def write_then_let_b_publish(self, path, *args, **kwargs):
        real(self, path, *args, **kwargs)
        calls.append(Path(path))
        if len(calls) == 1:  # A's user table is written, not yet renamed: B publishes a whole snapshot now
            write_snapshot(log[log["date"] < 20220429], config.data)

    monkeypatch.setattr(pd.DataFrame, "to_parquet", write_then_let_b_publish)
    written = write_snapshot(log, config.data)  # A
    assert len(calls) == 6 and len(set(calls)) == 6  # six temporary files, none shared
    assert {p.name: snapshot_as_of(p) for p in written} == {  # A renamed last: its snapshot, whole
        "user.parquet": "20220501", "item.parquet": "20220501", "user_author.parquet": "20220501"}
    for p in written:
        assert set(pd.read_parquet(p)["as_of"]) == {"20220501"}
    assert sorted(p.name for p in written[0].parent.iterdir()) == sorted(p.name for p in written)  # no temporaries


def test_a_failed_write_leaves_the_published_table_and_no_temporary(tmp_path):
    from features.statistics import publish_table

    target = tmp_path / "user.parquet"
    publish_table(pd.DataFrame({"user_id": [1, 2]}), target)
    before = target.read_bytes()
    with pytest.raises((TypeError, ValueError)):
        publish_table(pd.DataFrame({"x": [object()]}), target)  # pyarrow cannot write an object column
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["user.parquet"]


def test_train_leaves_the_published_snapshot_alone(tmp_path):
    config = tiny_config(tmp_path)
    published = Path(config.data.statistics.path)
    log = history(tmp_path)
    older = write_snapshot(log[log["date"] < 20220429], config.data)  # what a service serves: Apr 29's
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in older}
    assert {snapshot_as_of(p) for p in older} == {"20220429"}

    run = ranking.train.train(config, tmp_path / "run", verbose=False)
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in older} == before  # untouched
    in_run = sorted((run / ranking.train.STATISTICS).glob("*.parquet"))
    assert [p.name for p in in_run] == ["item.parquet", "user.parquet", "user_author.parquet"]
    assert {snapshot_as_of(p) for p in in_run} == {"20220501"}  # the run's own, newest snapshot
    assert sorted(p.name for p in published.iterdir()) == sorted(p.name for p in older)

    ranking.train.train(config, tmp_path / "run2", verbose=False, publish_statistics=True)  # asked: it publishes
    assert {snapshot_as_of(p) for p in older} == {"20220501"}
