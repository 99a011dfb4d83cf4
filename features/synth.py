"""A synthetic impression log of any size with structure a model can learn (`rankstage logs synth`), for scale runs
that must still show learning.

The log has KuaiRand's columns (user_id, video_id, author_id, date, time_ms, tab, is_click, is_like, long_view,
play_time_ms, duration_ms) plus the display ``position`` (1..10 within a request: a user's rows at one ``time_ms``).
``write_synthetic`` writes it as ``DIR/date=YYYYMMDD/part-NNNNN.parquet`` (``features/logfiles.py``), block by block,
with the side tables in ``DIR/side/`` (``users.parquet``, ``videos.parquet``) and the planted truth in
``DIR/truth/``. Memory does not grow with the rows beyond the id spaces, which are proportional to them (a user per
``ROWS_PER_USER`` rows, a video per ``ROWS_PER_VIDEO``). ``configs/synthetic_scale.yaml`` reads it.

Planted, in the click logit (N rows, K latent dimensions):

    logit = base + affinity(user, video) + quality(video, day) - position_bias * log2(position) + tab_effect[tab]

- affinity: ``<u, v>`` of K-dim latent factors, scaled to standard deviation ``affinity``. A user's factors are its
  segment's centre plus noise, a video's its category's centre plus noise: part of the affinity is visible through
  the side columns ``user_segment`` x ``video_category``, the rest only through the ids.
- popularity drift: a video's quality moves linearly over the days (``q0 + slope * (t - 0.5)``, t in [0, 1]), and
  so does how often it is shown (exposure ∝ exp(quality + a fixed reach)): yesterday's CTR of a video predicts
  today's, the all-time one less well.
- position bias: ``position_bias * log2(position)`` off the logit; shown positions do not depend on the video.

Likes, long views and watch time follow the click and the affinity. ``learnability`` is the quick check that a scale
run's log still carries the structure (``benchmarks/bench_synth.py`` runs it after measuring throughput).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from features.logfiles import DayWriters

ROWS_PER_USER = 40
ROWS_PER_VIDEO = 100
BLOCK_ROWS = 1 << 18
DAY_MS = 86_400_000
COLUMNS = ("user_id", "video_id", "author_id", "date", "time_ms", "tab", "position", "is_click", "is_like",
           "long_view", "play_time_ms", "duration_ms")


@dataclass(frozen=True)
class SynthConfig:
    """What ``write_synthetic`` plants; ``rows`` over ``days`` days from ``start`` (YYYY-MM-DD)."""

    rows: int
    days: int
    seed: int = 0
    start: str = "2023-01-01"
    factors: int = 8  # K
    segments: int = 8  # user segments (side column user_segment)
    categories: int = 12  # video categories (side column video_category)
    list_size: int = 10  # candidates per request: positions 1..list_size
    base: float = -0.6  # click logit intercept
    affinity: float = 1.2  # standard deviation of the affinity term in the click logit
    quality_sd: float = 0.5  # of a video's quality at the middle of the period
    drift_sd: float = 1.0  # of a video's quality change over the whole period
    position_bias: float = 0.45  # click logit - position_bias * log2(position)

    def __post_init__(self):
        if self.rows < 1 or self.days < 1:
            raise ValueError(f"rows and days must be >= 1 (got rows={self.rows}, days={self.days})")


@dataclass
class Planted:
    """The id spaces and their planted parameters (sizes U users, V videos)."""

    user_seg: np.ndarray  # (U,) int
    user_factors: np.ndarray  # (U, K)
    user_cdf: np.ndarray  # (U,) cumulative activity: who makes requests
    video_cat: np.ndarray  # (V,) int
    video_factors: np.ndarray  # (V, K)
    author: np.ndarray  # (V,) int
    duration_ms: np.ndarray  # (V,) int
    q0: np.ndarray  # (V,) quality at the middle of the period
    slope: np.ndarray  # (V,) quality change over the period
    reach: np.ndarray  # (V,) fixed part of the exposure logit
    tab_effect: np.ndarray  # (4,)
    scale: float  # of <u, v> to an affinity of standard deviation config.affinity


def plant(config: SynthConfig) -> Planted:
    rng = np.random.default_rng(config.seed)
    n_users = max(200, config.rows // ROWS_PER_USER)
    n_videos = max(100, config.rows // ROWS_PER_VIDEO)
    k = config.factors
    seg_centres = rng.normal(0, 1, (config.segments, k))
    cat_centres = rng.normal(0, 1, (config.categories, k))
    user_seg = rng.integers(0, config.segments, n_users)
    video_cat = rng.integers(0, config.categories, n_videos)
    user_factors = seg_centres[user_seg] + 0.7 * rng.normal(0, 1, (n_users, k))  # (U, K)
    video_factors = cat_centres[video_cat] + 0.7 * rng.normal(0, 1, (n_videos, k))  # (V, K)
    activity = rng.lognormal(0, 1, n_users)
    return Planted(
        user_seg=user_seg, user_factors=user_factors, user_cdf=np.cumsum(activity) / activity.sum(),
        video_cat=video_cat, video_factors=video_factors,
        author=rng.integers(0, max(20, n_videos // 10), n_videos),
        duration_ms=np.clip(rng.lognormal(np.log(30_000), 0.6, n_videos), 3_000, 300_000).astype(np.int64),
        q0=rng.normal(0, config.quality_sd, n_videos), slope=rng.normal(0, config.drift_sd, n_videos),
        reach=rng.normal(0, 1.2, n_videos), tab_effect=rng.normal(0, 0.2, 4),
        scale=config.affinity / np.sqrt(k * 1.49**2))  # each factor's variance is 1 + 0.7^2


def _day_position(config: SynthConfig, day: int) -> float:
    return day / (config.days - 1) - 0.5 if config.days > 1 else 0.0


def quality(planted: Planted, config: SynthConfig, day: int) -> np.ndarray:
    """(V,) the videos' planted quality on day number ``day`` (0-based)."""
    return planted.q0 + planted.slope * _day_position(config, day)


def truth_logit(planted: Planted, config: SynthConfig, user: np.ndarray, video: np.ndarray, day: np.ndarray
                ) -> np.ndarray:
    """(N,) the planted click logit without position and tab: affinity + quality of the day."""
    affinity = np.einsum("nk,nk->n", planted.user_factors[user], planted.video_factors[video]) * planted.scale
    q = planted.q0[video] + planted.slope[video] * (day / max(1, config.days - 1) - 0.5 if config.days > 1 else 0)
    return config.base + affinity + q


def _block(planted: Planted, config: SynthConfig, day: int, date: int, n: int, span: tuple[float, float],
           rng: np.random.Generator, video_cdf: np.ndarray) -> pa.Table:
    """``n`` rows of requests made in the fraction ``span`` of day number ``day``."""
    p = config.list_size
    n_req = -(-n // p)
    users = np.minimum(np.searchsorted(planted.user_cdf, rng.random(n_req)), len(planted.user_cdf) - 1)
    times = (np.int64(pd.Timestamp(str(date)).value // 1_000_000)
             + (np.sort(rng.uniform(*span, n_req)) * DAY_MS).astype(np.int64))
    tabs = rng.integers(0, 4, n_req)
    user = np.repeat(users, p)[:n]
    position = np.tile(np.arange(1, p + 1), n_req)[:n]
    video = np.minimum(np.searchsorted(video_cdf, rng.random(n)), len(video_cdf) - 1)
    tab = np.repeat(tabs, p)[:n]
    affinity = np.einsum("nk,nk->n", planted.user_factors[user], planted.video_factors[video]) * planted.scale
    q = quality(planted, config, day)[video]
    logit = config.base + affinity + q - config.position_bias * np.log2(position) + planted.tab_effect[tab]
    click = rng.random(n) < 1 / (1 + np.exp(-logit))
    like = click & (rng.random(n) < 1 / (1 + np.exp(-(-2.5 + 0.8 * affinity + 0.3 * q))))
    ratio = 1 / (1 + np.exp(-(0.9 * affinity + 0.4 * q - 0.2 + rng.normal(0, 1, n))))  # share of the video watched
    duration = planted.duration_ms[video]
    play = (duration * ratio * np.where(click, 1.0, 0.25)).astype(np.int64)  # unclicked rows autoplay briefly
    cols = {"user_id": user, "video_id": video, "author_id": planted.author[video],
            "date": np.full(n, date, np.int64), "time_ms": np.repeat(times, p)[:n], "tab": tab, "position": position,
            "is_click": click, "is_like": like, "long_view": play >= 0.5 * duration, "play_time_ms": play,
            "duration_ms": duration}
    return pa.table({c: pa.array(np.asarray(cols[c]).astype(np.int64)) for c in COLUMNS})


def side_tables(planted: Planted) -> dict[str, pd.DataFrame]:
    """users (user_id, user_segment, user_active_degree, follow_user_num, register_days) and videos (video_id,
    video_category, video_duration, tag) as ``DIR/side/`` holds them."""
    rng = np.random.default_rng(12345)
    n_users, n_videos = len(planted.user_seg), len(planted.video_cat)
    activity = np.diff(planted.user_cdf, prepend=0.0)
    degree = np.array(["low_active", "middle_active", "full_active", "high_active"])[
        np.searchsorted(np.quantile(activity, [0.25, 0.5, 0.75]), activity)]
    users = pd.DataFrame({"user_id": np.arange(n_users), "user_segment": planted.user_seg,
                          "user_active_degree": degree, "follow_user_num": rng.poisson(50 * activity * n_users / 4),
                          "register_days": rng.integers(1, 2000, n_users)})
    tags = rng.integers(0, 40, n_videos)
    videos = pd.DataFrame({"video_id": np.arange(n_videos), "video_category": planted.video_cat,
                           "video_duration": planted.duration_ms,
                           "tag": [f"{c},{t}" for c, t in zip(planted.video_cat, tags, strict=True)]})
    return {"users": users, "videos": videos}


def write_synthetic(out: str | Path, config: SynthConfig, overwrite: bool = False, part_rows: int = 1_000_000,
                    progress: bool = True) -> dict:
    """Write the synthetic log of ``config`` to ``out`` (see the module docstring); a temporary directory beside it
    is renamed at the end. Returns {"rows", "days", "files", "users", "items", "seconds"}."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"--out {out} exists (pass --overwrite to replace it)")
    t0 = last = time.perf_counter()
    planted = plant(config)
    tmp = out.parent / f".{out.name}.writing-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "side").mkdir(parents=True)
    (tmp / "truth").mkdir()
    try:
        for name, frame in side_tables(planted).items():
            frame.to_parquet(tmp / "side" / f"{name}.parquet", index=False)
        _write_truth(tmp / "truth", planted, config)
        start = pd.Timestamp(config.start)
        writers, total = None, 0
        for day in range(config.days):
            date = int((start + pd.Timedelta(days=day)).strftime("%Y%m%d"))
            exposure = np.exp(quality(planted, config, day) + planted.reach)
            video_cdf = np.cumsum(exposure) / exposure.sum()
            n_day = config.rows // config.days + (day < config.rows % config.days)
            per_block = BLOCK_ROWS - BLOCK_ROWS % config.list_size
            n_blocks = max(1, -(-n_day // per_block))
            for b in range(n_blocks):
                n = min(per_block, n_day - b * per_block)
                if n <= 0:
                    break
                rng = np.random.default_rng([config.seed, day, b])
                table = _block(planted, config, day, date, n, (b / n_blocks, (b + 1) / n_blocks), rng, video_cdf)
                writers = writers or DayWriters(tmp, table.schema, part_rows)
                writers.write(str(date), table)
                total += n
                now = time.perf_counter()
                if progress and now - last >= 1.0:
                    last = now
                    print(f"logs synth: {total:,} rows, {total / (now - t0):,.0f} rows/s", file=sys.stderr)
            if writers:  # the days are written in order: close this one's part
                writers.close()
    except BaseException:
        if writers:
            writers.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    seconds = time.perf_counter() - t0
    return {"rows": total, "days": config.days, "files": len(list(out.glob("date=*/*.parquet"))),
            "users": len(planted.user_seg),
            "items": len(planted.video_cat), "seconds": seconds}


def _write_truth(path: Path, planted: Planted, config: SynthConfig) -> None:
    k = config.factors
    pq.write_table(pa.table({"user_id": np.arange(len(planted.user_seg)),
                             **{f"u{j}": planted.user_factors[:, j] for j in range(k)}}), path / "users.parquet")
    pq.write_table(pa.table({"video_id": np.arange(len(planted.video_cat)), "q0": planted.q0, "slope": planted.slope,
                             "reach": planted.reach, **{f"v{j}": planted.video_factors[:, j] for j in range(k)}}),
                   path / "videos.parquet")
    (path / "truth.json").write_text(json.dumps({"config": asdict(config), "scale": planted.scale,
                                                 "tab_effect": planted.tab_effect.tolist()}, indent=1))


def read_config(out: str | Path) -> SynthConfig:
    """The ``SynthConfig`` a synthetic log was written with (``DIR/truth/truth.json``)."""
    return SynthConfig(**json.loads((Path(out) / "truth" / "truth.json").read_text())["config"])


def learnability(out: str | Path, prior: float = 20.0) -> dict:
    """The quick check on a synthetic log's last day (click AUC): the planted truth (affinity + quality, no position),
    a popularity baseline (the video's smoothed CTR of the previous day, or of all previous days: the better of the
    two), and a logistic regression trained on the earlier days (from the second on) over one-hot user_segment x
    video_category and tab plus both popularity features as logits (point in time: day d sees days < d only; no
    position, so it has to win on affinity and drift). Also the click rate by position over the whole log."""
    from scipy import sparse
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score as auc

    from features.logs import read_table

    out = Path(out)
    config = read_config(out)
    planted = plant(config)
    log = read_table(out, columns=["user_id", "video_id", "date", "tab", "position", "is_click"])
    side = pd.read_parquet(out / "side" / "users.parquet")
    days = np.sort(log["date"].unique())
    if len(days) < 3:
        raise ValueError(f"learnability needs 3 days or more (got {len(days)})")
    day_index = np.searchsorted(days, log["date"].to_numpy())
    log["day"] = day_index
    global_ctr = log["is_click"].mean()
    per_day = log.groupby(["day", "video_id"])["is_click"].agg(["sum", "count"]).reset_index()
    feats = []
    for d in range(1, len(days)):
        prev = per_day[per_day["day"] == d - 1].set_index("video_id")
        past = per_day[per_day["day"] < d].groupby("video_id")[["sum", "count"]].sum()
        rows = log[log["day"] == d]
        vid = rows["video_id"]
        ctr_1d = ((prev["sum"].reindex(vid).fillna(0).to_numpy() + prior * global_ctr)
                  / (prev["count"].reindex(vid).fillna(0).to_numpy() + prior))
        ctr_all = ((past["sum"].reindex(vid).fillna(0).to_numpy() + prior * global_ctr)
                   / (past["count"].reindex(vid).fillna(0).to_numpy() + prior))
        feats.append(rows.assign(ctr_1d=ctr_1d, ctr_all=ctr_all))
    frame = pd.concat(feats, ignore_index=True).merge(side[["user_id", "user_segment"]], on="user_id", how="left")
    frame["cross"] = frame["user_segment"] * config.categories + planted.video_cat[frame["video_id"].to_numpy()]
    train, test = frame[frame["day"] < len(days) - 1], frame[frame["day"] == len(days) - 1]

    def design(rows: pd.DataFrame) -> sparse.csr_matrix:  # one-hot segment x category and tab, logit popularity
        n = len(rows)
        onehot = sparse.csr_matrix((np.ones(2 * n), (np.repeat(np.arange(n), 2), np.stack(
            [rows["cross"].to_numpy(), n_cross + rows["tab"].to_numpy()], 1).ravel())), shape=(n, n_cross + 4))
        pops = np.log(rows[["ctr_1d", "ctr_all"]].to_numpy() / (1 - rows[["ctr_1d", "ctr_all"]].to_numpy()))
        return sparse.hstack([onehot, sparse.csr_matrix(pops)]).tocsr()

    n_cross = config.segments * config.categories
    model = LogisticRegression(C=1.0, max_iter=500).fit(design(train), train["is_click"].to_numpy())
    y = test["is_click"].to_numpy()
    truth = truth_logit(planted, config, test["user_id"].to_numpy(), test["video_id"].to_numpy(),
                        test["day"].to_numpy())
    popularity = {"ctr_1d": auc(y, test["ctr_1d"].to_numpy()), "ctr_all": auc(y, test["ctr_all"].to_numpy())}
    by_position = log.groupby("position")["is_click"].mean()
    return {"day": int(days[-1]), "rows": int(len(test)), "auc_truth": auc(y, truth),
            "auc_popularity": max(popularity.values()), "auc_popularity_by_window": popularity,
            "auc_learner": auc(y, model.decision_function(design(test))),
            "ctr_by_position": {int(k): float(v) for k, v in by_position.items()}}
