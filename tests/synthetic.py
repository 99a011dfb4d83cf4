"""Seeded synthetic impression logs with a planted truth, in the CSV format the trainer reads.

N rows, S segments, P positions, V devices. Each row is one impression logged by a policy that shows high-CTR
segments higher up the feed, so position and segment are confounded (as in real logs):

    click ~ Bernoulli(sigmoid(logit(ctr[segment]) + examination[device, position]))
    examination[v, p] = -position_decay[v] * (p - 1)          # 0 at the top, decaying down the feed
    watch_ms = 1000 * watch_mean_s[segment] * lift(click) * Exponential(1)
    like ~ Bernoulli(like_rate) on clicked rows, 0 otherwise

``lift`` is ``click_watch_lift`` for clicks and (1 - lift p) / (1 - p) otherwise (p the row's click probability),
so clicks watch longer yet E[watch seconds | segment, position, device] = watch_mean_s[segment] exactly. With
``position_decay`` all zero, ctr[segment] is the segment's true click rate at every position.
The feature spec for these columns is ``config()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv

from features.spec import RankstageConfig, parse_config


@dataclass(frozen=True)
class PlantedTruth:
    segments: tuple[str, ...] = ("news", "sports", "music")
    ctr: tuple[float, ...] = (0.05, 0.1, 0.2)  # click probability per segment at position 1
    watch_mean_s: tuple[float, ...] = (5.0, 20.0, 60.0)  # mean watch seconds per segment
    devices: tuple[str, ...] = ("phone", "tv")
    device_share: tuple[float, ...] = (0.6, 0.4)
    positions: int = 8  # positions are 1..P
    position_decay: tuple[float, ...] = (0.0, 0.0)  # per device: click-logit drop per position step
    policy_concentration: tuple[float, ...] = (0.0, 0.2, 0.4)  # per segment: how strongly shown near the top
    click_watch_lift: float = 2.0
    like_rate: float = 0.3
    users: int = 500
    items: int = 2000
    days: int = 8
    quality_missing: float = 0.01  # fraction of NaN in the numeric feature

    def __post_init__(self):
        s, v = len(self.segments), len(self.devices)
        for name, n in (("ctr", s), ("watch_mean_s", s), ("policy_concentration", s), ("device_share", v),
                        ("position_decay", v)):
            if len(getattr(self, name)) != n:
                raise ValueError(f"PlantedTruth.{name}: expected {n} values, got {getattr(self, name)!r}")
        if self.click_watch_lift * max(self.ctr) >= 1:
            raise ValueError(f"PlantedTruth: click_watch_lift {self.click_watch_lift} x max ctr {max(self.ctr)} "
                             "must be < 1 so non-clicks keep a positive watch time")

    def examination(self) -> np.ndarray:
        """(V, P) planted click-logit effect of device v at position p + 1."""
        steps = np.arange(self.positions, dtype=np.float64)
        return -np.asarray(self.position_decay)[:, None] * steps[None, :]

    def watch_mean(self, segment: str) -> float:
        return self.watch_mean_s[self.segments.index(segment)]

    def click_rate(self, segment: str) -> float:
        """True CTR of ``segment`` at position 1 (everywhere when there is no position effect)."""
        return self.ctr[self.segments.index(segment)]


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def generate_log(rows: int, truth: PlantedTruth = PlantedTruth(), seed: int = 0) -> pd.DataFrame:
    """``rows`` impressions drawn from ``truth`` under the logging policy; same seed, same frame."""
    rng = np.random.default_rng(seed)
    seg = rng.integers(0, len(truth.segments), rows)
    dev = rng.choice(len(truth.devices), rows, p=np.asarray(truth.device_share) / sum(truth.device_share))
    # logging policy: P(position = p | segment) proportional to exp(-concentration[segment] * (p - 1))
    steps = np.arange(truth.positions)
    policy = np.exp(-np.asarray(truth.policy_concentration)[:, None] * steps[None, :])  # (S, P)
    cdf = np.cumsum(policy / policy.sum(axis=1, keepdims=True), axis=1)
    pos0 = np.minimum((rng.random(rows)[:, None] > cdf[seg]).sum(axis=1), truth.positions - 1)

    ctr = np.asarray(truth.ctr)
    p_click = _sigmoid(np.log(ctr / (1 - ctr))[seg] + truth.examination()[dev, pos0])
    click = rng.random(rows) < p_click
    lift = np.where(click, truth.click_watch_lift, (1 - truth.click_watch_lift * p_click) / (1 - p_click))
    watch_ms = np.round(1000.0 * np.asarray(truth.watch_mean_s)[seg] * lift * rng.exponential(1.0, rows))
    like = click & (rng.random(rows) < truth.like_rate)

    quality = rng.normal(0.0, 1.0, rows).astype(np.float32)
    quality[rng.random(rows) < truth.quality_missing] = np.nan
    n_tags = rng.integers(0, 3, rows)
    first, second = ("t" + pd.Series(rng.integers(0, 20, rows)).astype(str) for _ in range(2))
    tags = np.where(n_tags == 0, "", np.where(n_tags == 1, first, first + "," + second))
    return pd.DataFrame({
        "user_id": rng.integers(1, truth.users + 1, rows),
        "item_id": rng.integers(1, truth.items + 1, rows),
        "day": rng.integers(0, truth.days, rows),
        "segment": np.asarray(truth.segments, dtype=object)[seg],
        "position": pos0 + 1,
        "device": np.asarray(truth.devices, dtype=object)[dev],
        "quality": quality,
        "tags": tags,
        "click": click.astype(np.int64),
        "watch_ms": watch_ms.astype(np.int64),
        "like": like.astype(np.int64),
    })


def write_log(frame: pd.DataFrame, path: str | Path) -> Path:
    """Write ``frame`` as CSV (NaN as an empty field), readable by ``features.logs.read_log``."""
    path = Path(path)
    pacsv.write_csv(pa.Table.from_pandas(frame, preserve_index=False), path)
    return path


FEATURES = {
    "segment": {"name": "segment", "kind": "categorical", "dtype": "string", "vocab": {}},
    "user_id": {"name": "user_id", "kind": "categorical", "group": "user", "vocab": {"min_count": 2}},
    "item_id": {"name": "item_id", "kind": "categorical", "hash_bins": 512},
    "quality": {"name": "quality", "kind": "numeric"},
    "tags": {"name": "tags", "kind": "multi_valued", "vocab": {}, "max_values": 2},
    "position": {"name": "position", "kind": "categorical", "group": "bias", "bias": True, "vocab": {}},
    "device": {"name": "device", "kind": "categorical", "dtype": "string", "group": "bias", "bias": True,
               "vocab": {}},
}
TASKS = {
    "click": {"name": "click", "type": "binary", "label": "click"},
    "like": {"name": "like", "type": "binary", "label": "like", "condition": "click"},
    "watch_time": {"name": "watch_time", "type": "watch_time", "label": "watch_ms", "scale": 0.001},
}


def config(log: str | Path, features: list[str], tasks: list[str], *, epochs: int = 2, batch_size: int = 256,
           learning_rate: float = 1e-3, keep_fraction: float = 1.0, bias_tower: bool = False,
           position_dropout: float = 0.1, gate_dropout: float = 0.1, seed: int = 0) -> RankstageConfig:
    """A tiny ranker over the synthetic columns; ``bias_tower`` adds position x device for click."""
    features = list(features) + (["position", "device"] if bias_tower else [])
    model = {"embedding_dim": 8, "bottom_units": [32], "num_experts": 2, "expert_units": [16],
             "gate_dropout": gate_dropout, "tower_units": [16], "dropout": 0.0,
             "bias_tower": {"tasks": ["click"] if bias_tower else [], "position_dropout": position_dropout}}
    if bias_tower:
        model["bias_tower"].update(position="position", device="device")
    return parse_config({
        "name": "synthetic",
        "data": {"log": str(log), "time_column": "day", "user_column": "user_id", "item_column": "item_id",
                 "validation_periods": 1},
        "features": [FEATURES[f] for f in features],
        "tasks": [TASKS[t] for t in tasks],
        "model": model,
        "training": {"batch_size": batch_size, "epochs": epochs, "learning_rate": learning_rate,
                     "early_stopping_patience": 1, "negative_sampling": {"task": "click", "keep_fraction":
                                                                          keep_fraction}, "seed": seed},
    }, source="tests/synthetic.py")
