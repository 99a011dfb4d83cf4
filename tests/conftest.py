"""Shared fixtures: one synthetic log with a planted truth, and the training runs several tests read.

Training is session-scoped and only happens when a test asks for it; each run is a real ``ranking.train.train``
run directory, plus the in-memory models ``fit`` returned (to compare reloads against).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import time

# TFRS (retrieval tests) needs tf-keras, chosen before TensorFlow's first import; Keras 3 is unaffected
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import synthetic

import ranking.train
from features.logs import read_log
from features.spec import RankstageConfig
from ranking.model import RankingModels
from ranking.warmup import warmup_batches

# ctr high enough that every position x device cell of the bias tower sees a few hundred clicks
TRUTH = synthetic.PlantedTruth(ctr=(0.2, 0.35, 0.5), watch_mean_s=(5.0, 20.0, 60.0), position_decay=(0.25, 0.1),
                               click_watch_lift=1.5)
LOG_ROWS = 150_000


@dataclass
class Trained:
    config: RankstageConfig
    run_dir: Path
    models: RankingModels  # the in-memory models training ended with (what was saved)


def train_run(config: RankstageConfig, out: Path) -> Trained:
    """``ranking.train.train`` into ``out``, keeping the in-memory models its ``fit`` returned."""
    captured: dict[str, RankingModels] = {}
    real_fit = ranking.train.fit

    def spy(*args, **kwargs):
        result = real_fit(*args, **kwargs)
        captured["models"] = result[0]
        return result

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ranking.train, "fit", spy)
        run_dir = ranking.train.train(config, out, verbose=False)
    return Trained(config, run_dir, captured["models"])


def run_shared(tmp_path_factory, name: str) -> Path:
    """``<root>/<name>`` under a temp root that every xdist process of this run shares (the run's own directory;
    without xdist, this process's), for what is built once per run."""
    root = tmp_path_factory.getbasetemp()
    return (root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root) / name


def built_once(path: Path, build: Callable[[Path], object]) -> Path:
    """``build(path)`` in the first process of the run to get here, under a file lock; the others wait for it and
    reuse ``path``. A build that raised leaves no mark, so the next process builds (and fails) again."""
    path.parent.mkdir(parents=True, exist_ok=True)
    done = path.with_name(path.name + ".done")
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not done.exists():
            shutil.rmtree(path, ignore_errors=True)
            build(path)
            done.touch()
    return path


@pytest.fixture(scope="session")
def truth() -> synthetic.PlantedTruth:
    return TRUTH


@pytest.fixture(scope="session")
def synthetic_log(tmp_path_factory) -> Path:
    """150k impressions over 8 days (the last is validation), planted truth ``TRUTH``."""
    path = tmp_path_factory.mktemp("data") / "impressions.csv"
    return synthetic.write_log(synthetic.generate_log(LOG_ROWS, TRUTH, seed=0), path)


@pytest.fixture(scope="session")
def full_run(tmp_path_factory, synthetic_log) -> Trained:
    """Every kind of synthetic feature, three tasks, bias tower, click down-sampling; 1 epoch."""
    config = synthetic.config(synthetic_log, ["segment", "user_id", "item_id", "quality", "tags"],
                              ["click", "like", "watch_time"], epochs=1, keep_fraction=0.5, bias_tower=True)
    return train_run(config, tmp_path_factory.mktemp("runs") / "full")


@pytest.fixture(scope="session")
def synthetic_frame(synthetic_log) -> pd.DataFrame:
    """The synthetic log read the way the trainer reads it (every synthetic config has the same ``data``)."""
    return read_log(synthetic.config(synthetic_log, ["segment"], ["click"]).data)


@pytest.fixture(scope="session")
def validation_frame(synthetic_frame):
    """The validation (last) day of the synthetic log, read the way the trainer reads it."""
    frame = synthetic_frame
    return frame[frame["day"] == frame["day"].max()].reset_index(drop=True)


@pytest.fixture(scope="session")
def synthetic_warmup(full_run, synthetic_frame) -> list[dict[str, np.ndarray]]:
    """``full_run``'s warmup batches, for ``export_run(..., warmup=...)`` of it or of a variant with the same serving
    features, so that each export does not read the log again."""
    return warmup_batches(full_run.config, synthetic_frame)


@pytest.fixture(scope="session")
def watch_run(tmp_path_factory, synthetic_log) -> Trained:
    """Segment is the only serving feature; click and watch time. Batch 2048: at batch 256 Adam's step noise
    alone moves the served watch time of a segment by up to ~9% from one epoch to the next."""
    config = synthetic.config(synthetic_log, ["segment"], ["click", "watch_time"], epochs=6, batch_size=2048)
    return train_run(config, tmp_path_factory.mktemp("runs") / "watch")


@pytest.fixture(scope="session")
def bias_run(tmp_path_factory, synthetic_log) -> Trained:
    """Segment plus the position x device bias tower on click; lr 3e-3 so the biases (up to -1.75) are reached."""
    config = synthetic.config(synthetic_log, ["segment"], ["click"], epochs=6, batch_size=1024, learning_rate=3e-3,
                              bias_tower=True)
    return train_run(config, tmp_path_factory.mktemp("runs") / "bias")


@pytest.fixture(scope="session")
def exported(tmp_path_factory, full_run, synthetic_warmup):
    """Version 1 of ``full_run`` exported under a fresh model base path -> (base path, version dir)."""
    from ranking.export import export_run

    base = tmp_path_factory.mktemp("models") / "synthetic"
    version_dir = export_run(full_run.run_dir, base, verbose=False, warmup=synthetic_warmup)
    return base, version_dir


KUAIRAND = Path(__file__).resolve().parent.parent / "configs" / "kuairand.yaml"


@pytest.fixture(scope="session")
def kuairand_config(tmp_path_factory) -> RankstageConfig:
    """configs/kuairand.yaml made small: KuaiRand-Pure Apr 25-29 (validated on Apr 30), 1 epoch, narrow layers, two
    bottom layers (the rank_candidates cut is exercised below a deeper bottom), without its behaviour sequence;
    absolute data paths, statistics snapshots written outside the checkout (in the run's shared temp root:
    ``kuairand_model`` publishes them once)."""
    from features.spec import load_config, parse_config

    root = KUAIRAND.parent.parent
    data = load_config(KUAIRAND).model_dump()
    data["model"].update(bottom_units=[64, 32], num_experts=2, expert_units=[32], tower_units=[16])
    # half of click's negatives kept: the served click is corrected (p = a q / ((1 - q) + a q)), so the service tests'
    # hand-written correction is exercised, not a no-op at a = 1 as in configs/kuairand.yaml
    data["training"].update(epochs=1, batch_size=4096, negative_sampling={"task": "click", "keep_fraction": 0.5})
    # the behaviour sequence has its own tests (test_sequence.py, test_feature_pipeline.py on the shipped config); the
    # service tests here send the same-day lists only, as a gateway without a session store would
    sequences = {f["name"] for f in data["features"] if f["kind"] == "sequence"}
    data["features"] = [f for f in data["features"] if f["name"] not in sequences]
    if data["data"]["history"]:
        data["data"]["history"]["lists"] = [h for h in data["data"]["history"]["lists"] if h["name"] not in sequences]
    # the first of the config's two files only (Apr 25-30): the suite's minutes, not the shipped model's quality
    data["data"] = {**data["data"], "log": str(root / data["data"]["log"][0]),
                    "joins": [{**j, "path": str(root / j["path"])} for j in data["data"]["joins"]]}
    if data["data"]["statistics"]:  # the snapshot training writes and serving joins, outside the checkout
        data["data"]["statistics"]["path"] = str(run_shared(tmp_path_factory, "kuairand_stats"))
    return parse_config(data, "kuairand tiny")


@pytest.fixture(scope="session")
def kuairand_frame(kuairand_config) -> pd.DataFrame:
    """The KuaiRand log with side tables, history lists and statistics joined, as ``read_log`` gives it (read once
    per session; tests must not modify it)."""
    return read_log(kuairand_config.data)


@pytest.fixture(scope="session")
def kuairand_model(tmp_path_factory, kuairand_config, kuairand_frame):
    """``kuairand_config`` trained and exported as version 1 -> (config, base path), once per test run: the first
    xdist process to ask trains, the other reuses its export (and its published statistics). Tests must not modify
    the base path; those that add versions copy it first."""
    from ranking.export import export_run

    config = kuairand_config

    def build(out: Path) -> None:
        cwd = os.getcwd()
        os.chdir(KUAIRAND.parent.parent)  # the config's paths are relative to the project root
        try:
            run = ranking.train.train(config, out / "run", verbose=False,
                                      publish_statistics=True)  # to the shared path the tests serve from
            export_run(run, out / "models", verbose=False, warmup=warmup_batches(config, kuairand_frame))
        finally:
            os.chdir(cwd)

    return config, built_once(run_shared(tmp_path_factory, "kuairand_model"), build) / "models"


def wait_for(predicate, timeout_s: float = 30.0) -> bool:
    """Poll ``predicate`` every 50 ms until it holds (True) or ``timeout_s`` passes (False)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False
