"""How far can click GAUC go on the KuaiRand log? Features the log allows, judged within users.

For each held-out day D (Apr 30, Apr 29) and every impression, from events strictly before it:
  stale    as of the start of D's day (what the daily statistics snapshot serves): item, user and user x author
           impressions and smoothed click rates over all earlier days
  hourly   the same for item and user x author, counted up to the start of the impression's hour (an hourly
           refreshed snapshot, the freshest a near-line counter store would give)
  session  impressions the user had earlier the same day (feed depth)
  state    the user's last click, seconds since their previous impression, their click rate so far that day
  author history  the user's impressions and clicks of the candidate's author earlier the same day (what a
           request carrying the user's recent history would allow)

Then (0) each day's observed rates (how far the next day's level moves), (1) each feature's GAUC alone on D,
(2) a label shuffle within user-days, which shows that "click rate so far that day" ranks *against* the label
within a user-day for a reason unrelated to the user (the user's clicks that day are a fixed total: the more of
them came earlier, the fewer remain), and (3) LightGBM trained on the days before D (from Apr 26: Apr 25 has no
history) on the side-table features plus each set, judged by GAUC and AUC.

    .venv/bin/python scripts/click_gauc_ceiling.py --out reports/click_gauc_ceiling.md   # ~1 min on 2 cores

``--runs DIR ...`` (training run directories judged on the same day) adds each run's click GAUC and that of the mean
of their logits: what averaging trained models buys.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pandas as pd
from scipy.special import logit

from evaluation.metrics import auc, grouped_auc

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "kuairand-pure"
DAYS = (20220430, 20220429)
PRIOR, STRENGTH = 0.44, 20.0  # smoothing: the log's click rate, worth 20 impressions
HOUR_MS = 3_600_000
SIDE = ["tab", "hourmin", "video_duration", "upload_type", "video_type"]
STALE = ["si_n", "si_rate", "su_n", "su_rate", "sua_n", "sua_rate"]
HOURLY = ["hi_n", "hi_rate", "hua_n", "hua_rate"]
SESSION = ["depth"]
STATE = ["last_click", "gap_s", "rate_today"]
SEQUENCE = ["ua_seen_today", "ua_clicks_today"]


def _rate(clicks: np.ndarray, n: np.ndarray) -> np.ndarray:
    return (clicks + PRIOR * STRENGTH) / (n + STRENGTH)


def load() -> pd.DataFrame:
    """The log joined to the video side table, sorted by time, with every feature above."""
    log = pd.read_csv(DATA / "log_standard_pure_20220425_to_20220430.csv",
                      usecols=["user_id", "video_id", "date", "hourmin", "time_ms", "is_click", "tab", "is_like",
                               "long_view", "play_time_ms"])
    side = pd.read_csv(DATA / "video_features_basic_pure.csv",
                       usecols=["video_id", "author_id", "video_duration", "upload_type", "video_type"])
    log = log.merge(side, on="video_id", how="left").sort_values("time_ms", kind="stable").reset_index(drop=True)
    for c in ("upload_type", "video_type"):
        log[c] = log[c].astype("category")
    day = pd.to_datetime(log["date"].astype(str), format="%Y%m%d")
    log["day"] = (day - day.min()).dt.days
    for keys, name in ((["video_id"], "si"), (["user_id"], "su"), (["user_id", "author_id"], "sua")):
        daily = log.groupby(keys + ["day"]).agg(n=("is_click", "size"), c=("is_click", "sum")).reset_index()
        before = pd.concat([daily[daily["day"] < d].groupby(keys)[["n", "c"]].sum().reset_index().assign(day=d)
                            for d in range(log["day"].max() + 1)])
        m = log[keys + ["day"]].merge(before, on=keys + ["day"], how="left")
        n, c = m["n"].fillna(0).to_numpy(), m["c"].fillna(0).to_numpy()
        log[f"{name}_n"], log[f"{name}_rate"] = n, _rate(c, n)
    hour = (log["time_ms"] // HOUR_MS) * HOUR_MS
    for keys, name in ((["video_id"], "hi"), (["user_id", "author_id"], "hua")):
        n, c = np.zeros(len(log)), np.zeros(len(log))
        for _, rows in log.groupby(keys).indices.items():  # rows ascend in time (the frame is sorted)
            t, clicks = log["time_ms"].to_numpy()[rows], np.cumsum(log["is_click"].to_numpy()[rows])
            k = np.searchsorted(t, hour.to_numpy()[rows], side="left")  # events before the hour began
            n[rows], c[rows] = k, np.where(k > 0, clicks[np.maximum(k - 1, 0)], 0)
        log[f"{name}_n"], log[f"{name}_rate"] = n, _rate(c, n)
    by_user = log.groupby("user_id")
    log["last_click"] = by_user["is_click"].shift(1)
    log["gap_s"] = (log["time_ms"] - by_user["time_ms"].shift(1)) / 1000
    user_day = log.groupby(["user_id", "date"])
    log["depth"] = user_day.cumcount()
    log["rate_today"] = _rate(user_day["is_click"].cumsum() - log["is_click"], log["depth"])
    author_today = log.groupby(["user_id", "date", "author_id"])
    log["ua_seen_today"] = author_today.cumcount()
    log["ua_clicks_today"] = author_today["is_click"].cumsum() - log["is_click"]
    return log


def gauc(frame: pd.DataFrame, score: np.ndarray | pd.Series) -> float:
    return grouped_auc(frame["is_click"].to_numpy(), np.nan_to_num(np.asarray(score, float), nan=-1.0),
                       frame["user_id"].to_numpy())[0]


def ensemble(runs: list[str]) -> str:
    """Markdown: each run's click GAUC on its validation day, and the GAUC of the mean of the runs' logits."""
    preds = [np.load(Path(r) / "validation_predictions.npz") for r in runs]
    y, users = preds[0]["click/y"], preds[0]["click/user"]
    for r, p in zip(runs, preds):
        if not np.array_equal(p["click/y"], y) or not np.array_equal(p["click/user"], users):
            raise SystemExit(f"--runs: {r} was judged on other rows than {runs[0]}")
    logits = [logit(np.clip(p["click/p"], 1e-6, 1 - 1e-6)) for p in preds]
    lines = [f"| {r} | {grouped_auc(y, z, users)[0]:.4f} |" for r, z in zip(runs, logits)]
    mean = grouped_auc(y, np.mean(logits, axis=0), users)[0]
    return "\n".join(["| run | click GAUC |", "|---|---|", *lines, f"| mean of the {len(runs)} logits | {mean:.4f} |"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="reports/click_gauc_ceiling.md")
    parser.add_argument("--trees", type=int, default=300)
    parser.add_argument("--runs", nargs="*", default=[], help="run dirs with validation_predictions.npz")
    args = parser.parse_args()
    if args.runs:
        print(ensemble(args.runs))
        return
    log = load()
    lines = ["# How far can click GAUC go on this log?", "",
             "`.venv/bin/python scripts/click_gauc_ceiling.py` wrote this; its docstring defines every feature. "
             "GAUC: impression-weighted mean of per-user AUC on the held-out day (users with both outcomes).", "",
             "## Observed rates per day", "", "| day | impressions | click | like | long view | watch s |",
             "|---|---|---|---|---|---|"]
    for d, g in log.groupby("date"):
        lines.append(f"| {d} | {len(g)} | {g.is_click.mean():.4f} | {g.is_like.mean():.4f} | "
                     f"{g.long_view.mean():.4f} | {g.play_time_ms.mean() / 1000:.2f} |")
    lines += ["", "## Each feature alone", "", "| feature | " + " | ".join(map(str, DAYS)) + " |",
             "|---|" + "---|" * len(DAYS)]
    for col in STALE + HOURLY + SESSION + STATE + SEQUENCE + ["hourmin", "tab"]:
        lines.append(f"| {col} | " + " | ".join(f"{gauc(log[log.date == d], log.loc[log.date == d, col]):.4f}"
                                                  for d in DAYS) + " |")
    rng = np.random.default_rng(0)
    shuffled = []
    for d in DAYS:
        f = log[log.date == d].sort_values(["user_id", "time_ms"]).copy()
        f["is_click"] = f.groupby("user_id")["is_click"].transform(lambda s: rng.permutation(s.to_numpy()))
        g = f.groupby("user_id")
        shuffled.append(gauc(f, _rate(g["is_click"].cumsum() - f["is_click"], g.cumcount())))
    lines += ["", "Labels shuffled at random within each user's day, `rate_today` recomputed: GAUC "
              + " / ".join(f"{s:.4f}" for s in shuffled) + " (no user signal left, yet far below 0.5).", "",
              "## LightGBM on the days before (Apr 26 on), side-table features plus", "",
              "| features | " + " | ".join(f"{d} GAUC | {d} AUC" for d in DAYS) + " |",
              "|---|" + "---|---|" * len(DAYS)]
    sets = {"stale statistics": STALE, "+ hourly counters": STALE + HOURLY, "+ feed depth": STALE + SESSION,
            "+ hourly + depth": STALE + HOURLY + SESSION, "+ same-day author history": STALE + SEQUENCE,
            "+ hourly + depth + author history": STALE + HOURLY + SESSION + SEQUENCE,
            "+ user state": STALE + SESSION + STATE}
    for name, cols in sets.items():
        cells = []
        for d in DAYS:
            train, test = log[(log.date < d) & (log.day > 0)], log[log.date == d]
            model = lgb.LGBMClassifier(n_estimators=args.trees, learning_rate=0.05, num_leaves=31, random_state=0,
                                       verbose=-1).fit(train[SIDE + cols], train["is_click"])
            p = model.predict_proba(test[SIDE + cols])[:, 1]
            cells.append(f"{gauc(test, p):.4f} | {auc(test['is_click'].to_numpy(), p):.4f}")
            print(f"{name} {d}: {cells[-1]}", flush=True)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
