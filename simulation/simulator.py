"""Seeded impression-log simulator with a planted truth: utility, examination per position x device, tasks.

U users, I items, D latent width, C candidates per request, P shown positions, V devices, N = requests x P rows.

    utility[u, i]   = <user[u], item[i]> / sqrt(D) + quality[i]
    attraction      = sigmoid(attraction_scale * utility + attraction_bias)      # P(click | examined)
    examination     = exam[v, p] = p ** -(position_bias * eta[v])                # 1 at the top, decays down the feed
    click           = examined AND attracted  ~ Bernoulli(exam[v, p] * attraction)
    like, share     ~ Bernoulli(sigmoid(bias + scale * utility)) on clicked rows, 0 otherwise
    watch_s         ~ exp(watch_log_mean + watch_scale * utility) * Exponential(1) on clicked rows, 0 otherwise

The logging policy shows, for each request, the P of C random candidates with the highest
``utility + promotion_boost * promoted[i] + Normal(0, policy_noise)`` in that order: better items sit higher, and so
do "promoted" items, whose promotion has no effect on attraction (a spurious signal a position-blind model learns).
The test log shows P random candidates in random order. The model sees noisy copies of the latent vectors and of
the quality, the item id and the promoted flag; the truth columns (``true_*``) are for evaluation only.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv


@dataclass(frozen=True)
class SimulationConfig:
    users: int = 2000
    items: int = 500
    latent_dim: int = 4
    candidates: int = 6  # C per request (= P: the policy orders, it does not select)
    positions: int = 6  # P shown per request
    devices: tuple[str, ...] = ("phone", "tv")
    device_share: tuple[float, ...] = (0.6, 0.4)
    examination_eta: tuple[float, ...] = (1.0, 0.5)  # per device: exam = p ** -(position_bias * eta)
    position_bias: float = 1.0  # strength of the position effect (0 = none)
    quality_sd: float = 0.7
    attraction_scale: float = 1.5
    attraction_bias: float = -2.5
    promoted_share: float = 0.3
    promotion_boost: float = 3.0  # logging policy: score bonus of promoted items (no effect on attraction)
    policy_noise: float = 0.5
    feature_noise: float = 0.2  # sd of the noise on the latent/quality features the model sees
    like_bias: float = -1.5
    like_scale: float = 1.0
    share_bias: float = -3.0
    share_scale: float = 1.0
    watch_log_mean: float = 3.0
    watch_scale: float = 0.5
    days: int = 5  # training log days 0..days-1 (the last validates); the test log is day ``days``

    def __post_init__(self):
        if len(self.device_share) != len(self.devices) or len(self.examination_eta) != len(self.devices):
            raise ValueError(f"SimulationConfig: device_share {self.device_share!r} and examination_eta "
                             f"{self.examination_eta!r} need one value per device {self.devices!r}")
        if not 1 <= self.positions <= self.candidates:
            raise ValueError(f"SimulationConfig: need 1 <= positions <= candidates, got positions={self.positions!r}"
                             f", candidates={self.candidates!r}")
        if self.position_bias < 0 or any(e < 0 for e in self.examination_eta):
            raise ValueError(f"SimulationConfig: position_bias and examination_eta must be >= 0, got "
                             f"{self.position_bias!r}, {self.examination_eta!r}")

    def examination(self) -> np.ndarray:
        """(V, P) planted examination probability of device v at position p + 1."""
        p = np.arange(1, self.positions + 1, dtype=np.float64)
        return p[None, :] ** -(self.position_bias * np.asarray(self.examination_eta)[:, None])

    def log_examination_offsets(self) -> dict[str, list[float]]:
        """Planted log-examination relative to position 1, per device: what a click-logit bias should approach."""
        return {d: np.log(row / row[0]).tolist() for d, row in zip(self.devices, self.examination())}


@dataclass
class World:
    """The latent state of users and items (drawn once per seed)."""

    user_vec: np.ndarray  # (U, D)
    item_vec: np.ndarray  # (I, D)
    quality: np.ndarray  # (I,)
    promoted: np.ndarray  # (I,) bool
    user_obs: np.ndarray  # (U, D) noisy copies the model sees
    item_obs: np.ndarray  # (I, D)
    quality_obs: np.ndarray  # (I,)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def make_world(cfg: SimulationConfig, rng: np.random.Generator) -> World:
    d = cfg.latent_dim
    user_vec = rng.normal(size=(cfg.users, d))
    item_vec = rng.normal(size=(cfg.items, d))
    quality = rng.normal(0.0, cfg.quality_sd, cfg.items)
    noise = cfg.feature_noise
    return World(user_vec, item_vec, quality, rng.random(cfg.items) < cfg.promoted_share,
                 user_vec + rng.normal(0, noise, user_vec.shape), item_vec + rng.normal(0, noise, item_vec.shape),
                 quality + rng.normal(0, noise, cfg.items))


def simulate_lists(cfg: SimulationConfig, world: World, requests: int, rng: np.random.Generator,
                   randomized: bool, day: np.ndarray | None = None, first_request: int = 0) -> pd.DataFrame:
    """``requests`` lists of P impressions; logged by the biased policy, or in random order if ``randomized``."""
    c, p, d = cfg.candidates, cfg.positions, cfg.latent_dim
    users = rng.integers(0, cfg.users, requests)
    device = rng.choice(len(cfg.devices), requests, p=np.asarray(cfg.device_share) / sum(cfg.device_share))
    cand = np.concatenate([np.argsort(rng.random((min(4096, requests - s), cfg.items)), axis=1)[:, :c]
                           for s in range(0, requests, 4096)])  # (R, C) distinct items per request
    utility = np.einsum("rd,rcd->rc", world.user_vec[users], world.item_vec[cand]) / np.sqrt(d) + world.quality[cand]
    if randomized:
        score = rng.random((requests, c))
    else:
        score = utility + cfg.promotion_boost * world.promoted[cand] + rng.normal(0, cfg.policy_noise, (requests, c))
    order = np.argsort(-score, axis=1)[:, :p]  # (R, P) shown candidates, best first
    shown = np.take_along_axis(cand, order, axis=1)
    util = np.take_along_axis(utility, order, axis=1)

    n = requests * p
    item, util = shown.reshape(n), util.reshape(n)
    user, dev = np.repeat(users, p), np.repeat(device, p)
    pos = np.tile(np.arange(1, p + 1), requests)
    attraction = _sigmoid(cfg.attraction_scale * util + cfg.attraction_bias)
    exam = cfg.examination()[dev, pos - 1]
    click = (rng.random(n) < exam) & (rng.random(n) < attraction)
    like = click & (rng.random(n) < _sigmoid(cfg.like_bias + cfg.like_scale * util))
    share = click & (rng.random(n) < _sigmoid(cfg.share_bias + cfg.share_scale * util))
    watch = np.where(click, np.exp(cfg.watch_log_mean + cfg.watch_scale * util) * rng.exponential(1.0, n), 0.0)

    cols = {
        "request_id": np.repeat(np.arange(first_request, first_request + requests), p),
        "day": np.repeat(day if day is not None else np.zeros(requests, np.int64), p),
        "user_id": user + 1,
        "item_id": item + 1,
        "device": np.asarray(cfg.devices, dtype=object)[dev],
        "position": pos,
    }
    cols.update({f"user_f{k}": world.user_obs[user, k].astype(np.float32) for k in range(d)})
    cols.update({f"item_f{k}": world.item_obs[item, k].astype(np.float32) for k in range(d)})
    cols.update({
        "item_quality": world.quality_obs[item].astype(np.float32),
        "item_promoted": world.promoted[item].astype(np.int64),
        "click": click.astype(np.int64), "like": like.astype(np.int64), "share": share.astype(np.int64),
        "watch_s": np.round(watch, 2),
        "true_utility": util, "true_attraction": attraction, "true_examination": exam,
        "true_click_prob": exam * attraction,
    })
    return pd.DataFrame(cols)


def simulate(cfg: SimulationConfig, rows: int, test_rows: int, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A training log of about ``rows`` impressions (biased policy, days 0..days-1) and a randomized test log of about
    ``test_rows`` (day ``days``). Same seed, same frames."""
    rng = np.random.default_rng(seed)
    world = make_world(cfg, rng)
    n_train, n_test = max(1, rows // cfg.positions), max(1, test_rows // cfg.positions)
    train = simulate_lists(cfg, world, n_train, rng, randomized=False, day=np.sort(rng.integers(0, cfg.days, n_train)))
    test = simulate_lists(cfg, world, n_test, rng, randomized=True, day=np.full(n_test, cfg.days),
                          first_request=n_train)
    return train, test


def planted_truth(cfg: SimulationConfig, seed: int, train: pd.DataFrame, test: pd.DataFrame) -> dict:
    return {
        "seed": seed,
        "config": asdict(cfg),
        "examination": {d: row.tolist() for d, row in zip(cfg.devices, cfg.examination())},
        "log_examination_offsets": cfg.log_examination_offsets(),
        "rows": {"train": len(train), "test": len(test)},
        "click_rate": {"train": float(train["click"].mean()), "test": float(test["click"].mean())},
        "columns": "true_utility, true_attraction (P(click | examined)), true_examination, true_click_prob per row",
    }


def write_simulation(out_dir: str | Path, cfg: SimulationConfig, rows: int, test_rows: int, seed: int = 0
                     ) -> dict[str, Path]:
    """Write ``train.csv``, ``test.csv`` and ``truth.json`` into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train, test = simulate(cfg, rows, test_rows, seed)
    paths = {"train": out / "train.csv", "test": out / "test.csv", "truth": out / "truth.json"}
    for name in ("train", "test"):
        frame = train if name == "train" else test
        pacsv.write_csv(pa.Table.from_pandas(frame, preserve_index=False), paths[name])
    paths["truth"].write_text(json.dumps(planted_truth(cfg, seed, train, test), indent=2))
    return paths
