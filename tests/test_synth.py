"""`rankstage logs synth`: schema and day partitioning, determinism by seed, the planted structure learnable on the
last day (truth and a simple learner beat point-in-time popularity; the position-bias curve falls), and
configs/synthetic_scale.yaml reads the log."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from features.logfiles import iter_batches, log_files, partition_day
from features.logs import raw_inputs, read_log, task_labels
from features.spec import load_config
from features.synth import COLUMNS, SynthConfig, learnability, write_synthetic
from rankstage.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "log"
    done = write_synthetic(out, SynthConfig(rows=200_000, days=5, seed=3), part_rows=15_000, progress=False)
    return out, done


def test_schema_and_day_partitions(synth):
    out, done = synth
    files = log_files(str(out))
    assert done["rows"] == 200_000 and done["files"] == len(files) == 5 * 3  # 40k a day in parts of 15k
    assert sorted({partition_day(f) for f in files}) == [f"202301{d:02d}" for d in range(1, 6)]
    assert (out / "side" / "users.parquet").exists() and (out / "side" / "videos.parquet").exists()
    table = pa.Table.from_batches([b for _, _, b in iter_batches(files)])
    assert tuple(table.schema.names) == COLUMNS and all(t == pa.int64() for t in table.schema.types)
    frame = table.to_pandas()
    for _, rows in frame.groupby("date"):
        assert len(rows) == 40_000 and rows["time_ms"].is_monotonic_increasing  # parts in order within a day
    assert frame["position"].between(1, 10).all() and set(frame["is_click"]) == {0, 1}
    assert frame["user_id"].max() < 200_000 // 40 and frame["video_id"].max() < 200_000 // 100
    # a request is a user's rows at one time_ms: positions 1..k
    first = frame.groupby(["user_id", "time_ms"])["position"].agg(["min", "count", "max"])
    assert (first["min"] == 1).mean() > 0.99 and (first["max"] == first["count"]).mean() > 0.99


def test_planted_structure_is_learnable(synth):
    check = learnability(synth[0])
    assert check["rows"] == 40_000
    assert check["auc_truth"] > check["auc_popularity"] + 0.08, check
    assert check["auc_learner"] > check["auc_popularity"] + 0.02, check
    ctr = check["ctr_by_position"]
    assert ctr[1] > ctr[2] > ctr[4] > ctr[8] and ctr[1] > 1.8 * ctr[10], ctr


def test_deterministic_by_seed_and_read_by_the_config(tmp_path, capsys):
    args = ["logs", "synth", "--rows", "20000", "--days", "3"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    assert main([*args, "--out", str(tmp_path / "c"), "--seed", "1"]) == 0
    assert main([*args, "--out", str(tmp_path / "a")]) == 2  # exists
    assert "exists" in capsys.readouterr().err

    def read(name):
        return pa.Table.from_batches([b for _, _, b in iter_batches(log_files(str(tmp_path / name)))])

    assert read("a").equals(read("b")) and not read("a").equals(read("c"))
    # the side tables follow --set data.log ({log}/side/... in the config)
    config = load_config(ROOT / "configs" / "synthetic_scale.yaml", [f"data.log={tmp_path / 'a'}"], None)
    assert config.data.joins[0].path == str(tmp_path / "a" / "side" / "users.parquet")
    frame = read_log(config.data)
    assert len(frame) == 20_000 and "stat_item_click_rate_1d" in frame and "user_segment" in frame
    inputs, labels = raw_inputs(frame, config.features), task_labels(frame, config.tasks)
    assert set(np.unique(inputs["position"])) == set(range(1, 11)) and 0.1 < labels["click"].mean() < 0.6
