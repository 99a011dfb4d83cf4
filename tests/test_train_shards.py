"""Training from TFRecord shards (``ranking.shards`` + ``ranking.loop``) on a real KuaiRand subset: one worker from
shards against the in-memory path, and two loopback workers (``rankstage train --workers 2``) killed mid-epoch and
restarted, which must resume from the checkpoint and end within noise of one worker. Real processes, real shards
(written by ``tests/shard_fixture.py``, a stand-in for the feature pipeline); plus the TF map against the numpy
reference.

Noise: the runs differ in row order (a shuffle buffer over interleaved files vs every row shuffled; per-worker file
shards), so their metrics agree within seed noise, not exactly; click AUC within 0.01.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import shard_fixture
import yaml

from features import examples
from features.logs import task_labels
from features.spec import ConfigError, parse_config
from ranking import shards
from ranking.sampling import initial_logits, targets
from ranking.tasks import watch_time_weight_scale

ROOT = Path(__file__).resolve().parent.parent
AUC_NOISE = 0.01


DAYS = (20220428, 20220429, 20220430)  # train Apr 28-29, validate Apr 30: ~51k impressions


@pytest.fixture(scope="module")
def small_config(tmp_path_factory, kuairand_config):
    """``kuairand_config`` on the raw log's rows of ``DAYS`` (a CSV of its own, so the in-memory path and the shards
    read the same rows), one epoch at batch 2048 (the killed run dies mid-epoch and resumes inside it)."""
    from features.logs import read_table

    log = read_table(kuairand_config.data.log)
    path = tmp_path_factory.mktemp("log") / "kuairand_3days.csv"
    log[log[kuairand_config.data.time_column].isin(DAYS)].to_csv(path, index=False)
    data = kuairand_config.model_dump()
    data["data"]["log"] = str(path)
    data["data"]["statistics"]["path"] = str(tmp_path_factory.mktemp("stats"))
    data["training"].update(epochs=1, batch_size=2048)
    return parse_config(data, "kuairand shards")


@pytest.fixture(scope="module")
def small_frame(small_config):
    from features.logs import read_log

    return read_log(small_config.data)


@pytest.fixture(scope="module")
def example_dir(tmp_path_factory, small_config, small_frame):
    return shard_fixture.write_examples(small_frame, small_config, tmp_path_factory.mktemp("examples"))


@pytest.fixture(scope="module")
def config_file(tmp_path_factory, small_config):
    path = tmp_path_factory.mktemp("config") / "kuairand.yaml"
    path.write_text(yaml.safe_dump(small_config.model_dump(), sort_keys=False))
    return path


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "rankstage.cli", "train", *args]


def run_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}


def click_auc(run: Path) -> float:
    return json.loads((run / "metrics.json").read_text())["tasks"]["click"]["auc"]


@pytest.fixture(scope="module")
def one_worker_run(tmp_path_factory, example_dir, config_file):
    out = tmp_path_factory.mktemp("runs") / "one"
    done = subprocess.run(cli("--config", str(config_file), "--out", str(out), "--examples", str(example_dir)),
                          env=run_env(), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def test_the_target_map_equals_the_numpy_reference(small_config, small_frame):
    """The TF map's kept rows and [target, weight] equal ``ranking.sampling.targets`` on the same kept rows, and the
    streaming label summary gives ``initial_logits`` and ``watch_time_weight_scale``."""
    frame = small_frame.iloc[:20000].reset_index(drop=True)
    source = shards.memory_source(frame, small_config)
    summary = shards.label_summary(source, small_config, block=3000)  # several blocks
    tm = shards.TargetMap(small_config, summary.weight_scales())
    batch = next(iter(shards.records(source, tm.columns(), 20000)))
    kept, _ = (a.numpy() for a in tm.keep(batch))
    _, y_tf = tm(batch)
    labels = {k: v[kept] for k, v in task_labels(frame, small_config.tasks).items()}
    a = small_config.training.negative_sampling.keep_fraction
    neg = labels["click"] == 0
    assert 0.3 < kept[frame["is_click"].to_numpy() == 0].mean() < 0.7  # about a of the negatives kept
    assert kept[frame["is_click"].to_numpy() == 1].all()
    row_weight = np.where(neg, 1 / a, 1.0)
    scales = {"watch_time": watch_time_weight_scale(labels["watch_time"])}
    want = targets(small_config, labels, row_weight, scales)
    for task, y in want.items():
        np.testing.assert_allclose(y_tf[task].numpy(), y, rtol=1e-5, atol=1e-6, err_msg=task)
    assert summary.kept == int(kept.sum()) and summary.rows == len(frame)
    assert summary.weight_scales()["watch_time"] == pytest.approx(scales["watch_time"], rel=1e-9)
    for task, prior in initial_logits(small_config, labels, row_weight).items():
        assert summary.priors(small_config)[task] == pytest.approx(prior, rel=1e-6, abs=1e-9), task


def test_pairwise_training_from_shards_is_refused_naming_the_field(small_config, example_dir):
    data = small_config.model_dump()
    data["training"]["pairwise_task"] = "click"
    from ranking.train import train

    with pytest.raises(ConfigError, match="training.pairwise_task"):
        train(parse_config(data, "pairwise"), example_dir.parent / "pairwise_run", examples=example_dir,
              verbose=False)


def test_one_worker_from_shards_matches_the_in_memory_path(tmp_path, small_config, one_worker_run):
    from ranking.train import train

    memory = train(small_config, tmp_path / "memory", verbose=False)
    a, b = json.loads((one_worker_run / "metrics.json").read_text()), json.loads((memory / "metrics.json").read_text())
    assert set(a) == set(b) and set(a["tasks"]) == set(b["tasks"])
    assert {k: set(v) for k, v in a["tasks"].items()} == {k: set(v) for k, v in b["tasks"].items()}
    print(f"click AUC shards {click_auc(one_worker_run):.4f}, in memory {click_auc(memory):.4f}")
    assert abs(click_auc(one_worker_run) - click_auc(memory)) < AUC_NOISE
    for name in ("config.yaml", "stats.json", "artifacts.json", "model.weights.h5", "history.json",
                 "validation_predictions.npz"):
        assert (one_worker_run / name).exists(), name
    assert not (one_worker_run / "checkpoints").exists()  # removed once the run is written
    with np.load(one_worker_run / "validation_predictions.npz") as got, np.load(memory / "validation_predictions.npz") \
            as want:
        assert sorted(got.files) == sorted(want.files)
        for k in got.files:  # the same validation rows in the same (log) order
            if not k.endswith("/p"):
                np.testing.assert_allclose(got[k].astype(np.float64), want[k].astype(np.float64), rtol=1e-6,
                                           err_msg=k)
    art_a, art_b = (json.loads((r / "artifacts.json").read_text()) for r in (one_worker_run, memory))
    # the same rows before sampling; the kept rows follow a keyed hash of key/row, and the feature pipeline (which
    # ranking.train runs without --examples) numbers rows by file and position where the fixture numbers the subset
    ra, rb = art_a["rows"], art_b["rows"]
    assert ra["train_before_sampling"] == rb["train_before_sampling"] and ra["validation"] == rb["validation"]
    assert abs(ra["train"] - rb["train"]) <= 0.01 * rb["train"], (ra, rb)
    assert art_a["train_periods"] == art_b["train_periods"]
    assert art_a["validation_periods"] == art_b["validation_periods"]


def test_more_workers_than_shard_files_is_refused(tmp_path, example_dir, config_file):
    done = subprocess.run(cli("--config", str(config_file), "--out", str(tmp_path / "many"), "--examples",
                              str(example_dir), "--workers", "11"), env=run_env(), cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode != 0
    assert "at least one shard file per worker" in done.stdout + done.stderr


def test_two_loopback_workers_killed_and_resumed_match_one(tmp_path, example_dir, config_file, one_worker_run):
    """``--workers 2``: SIGKILL worker 1 once a mid-epoch checkpoint exists; the same command then resumes (its epoch
    / step counter continues), both workers train the rest of the epoch and the chief writes a run within noise of
    the one-worker run, with the same metrics. (One two-worker run serves both checks: an uninterrupted one cost the
    suite another ~70 s and differs only in starting at step 0.)"""
    out = tmp_path / "resumed"
    args = cli("--config", str(config_file), "--out", str(out), "--examples", str(example_dir), "--workers", "2",
               "--checkpoint-every", "2")
    proc = subprocess.Popen(args, env=run_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    lines, pids = [], {}
    deadline = time.monotonic() + 300
    killed = False
    os.set_blocking(proc.stdout.fileno(), False)
    while proc.poll() is None and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line:
            lines.append(line)
            if line.startswith("[launcher] worker") and " pid " in line:
                pids[int(line.split()[2])] = int(line.split()[4])
            continue
        index = out / "checkpoints" / "checkpoint"
        if not killed and index.exists() and "ckpt-" in index.read_text():
            os.kill(pids[1], signal.SIGKILL)
            killed = True
        time.sleep(0.05)
    proc.wait(60)
    lines += proc.stdout.readlines()
    text = "".join(lines)
    assert killed, text[-3000:]
    assert proc.returncode != 0, text[-3000:]  # the launcher reports the killed worker
    assert "epoch 2:" not in text  # killed in epoch 1
    assert not (out / "metrics.json").exists()
    again = subprocess.run(args, env=run_env(), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-3000:]
    resumed = [ln for ln in again.stdout.splitlines() if "resumed from" in ln]
    assert resumed, again.stdout[-3000:]
    # "[worker 0] resumed from .../ckpt-N: epoch E, step S of T"
    epoch, step = int(resumed[0].split("epoch ")[1].split(",")[0]), int(resumed[0].split("step ")[1].split()[0])
    assert (epoch, step) > (1, 0), resumed[0]
    assert step % 2 == 0
    print(f"resumed at epoch {epoch} step {step}; click AUC {click_auc(out):.4f}, one worker "
          f"{click_auc(one_worker_run):.4f}")
    assert abs(click_auc(out) - click_auc(one_worker_run)) < AUC_NOISE
    assert "on 2 worker(s)" in again.stdout
    assert set(json.loads((out / "metrics.json").read_text())) == set(
        json.loads((one_worker_run / "metrics.json").read_text()))
    assert not list(out.glob(".checkpoints-*"))  # the other worker's temporary checkpoints are gone


def test_example_layout_errors_name_the_directory(tmp_path):
    with pytest.raises(ConfigError, match="schema.json"):
        shards.read_layout(tmp_path)
    layout = shards.Layout(tmp_path, [examples.Column("x", "int")], {})
    with pytest.raises(ConfigError, match="date=20220101"):
        layout.files(["20220101"])
