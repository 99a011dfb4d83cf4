"""Offline metrics for validation. Inputs are (N,) arrays over the rows a task is judged on.

Global: AUC, Spearman. Within-user, what a ranker is for: GAUC (impression-weighted mean of per-user AUC over users
holding both outcomes, grouped by raw user id) and NDCG@k over user-day lists (lists of >= ``min_len`` rows ranked by
the prediction, gain = label, so graded for watch time and completion; mean over lists with a positive gain). Each
comes with a bootstrap 95% interval over its unit (rows, users, lists) and a paired difference between two models'
predictions of the same rows, resampling the units jointly.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats import rankdata, spearmanr

from evaluation.bootstrap import UNIT_REPS, bootstrap_ci, mean_over_units
from evaluation.lists import group_lists, list_ndcg, rank

NDCG_K = 5  # cut-off of list NDCG in reports
MIN_LIST = 5  # shortest user-day list NDCG counts


def auc(y: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve via ranks (ties averaged); NaN if one class is absent."""
    y = np.asarray(y) > 0.5
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = rankdata(score)
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def per_user_auc(y: np.ndarray, score: np.ndarray, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per user holding both outcomes (users in sorted id order): AUC (U,) (ties count 1/2, as in ``auc``) and the
    user's impressions (U,). Users with one outcome only have no AUC and are left out."""
    y = np.asarray(y) > 0.5
    codes = pd.factorize(np.asarray(users), sort=True, use_na_sentinel=False)[0]  # a missing id is one user
    r = pd.Series(np.asarray(score, np.float64)).groupby(codes).rank(method="average").to_numpy()  # within user
    n = np.bincount(codes).astype(np.float64)
    n_pos = np.bincount(codes, weights=y)
    rank_sum = np.bincount(codes, weights=np.where(y, r, 0.0))
    ok = (n_pos > 0) & (n_pos < n)
    n_pos, n, rank_sum = n_pos[ok], n[ok], rank_sum[ok]
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * (n - n_pos)), n


def grouped_auc(y: np.ndarray, score: np.ndarray, groups: np.ndarray) -> tuple[float, int]:
    """Impression-weighted mean of per-group AUC over groups holding both classes -> (GAUC, groups used)."""
    a, w = per_user_auc(y, score, groups)
    return (float(np.average(a, weights=w)) if len(a) else float("nan")), int(len(a))


def per_list_ndcg(gain: np.ndarray, score: np.ndarray, users: np.ndarray, days: np.ndarray, k: int = NDCG_K,
                  min_len: int = MIN_LIST) -> np.ndarray:
    """NDCG@k (L,) of every user-day list of >= ``min_len`` rows, ranked by descending ``score``; NaN for a list
    without a positive gain. Ties follow ``evaluation.lists``' one rule (tied rows share their mean gain)."""
    lists = group_lists([users, days], np.arange(len(gain)), min_len)
    if not len(lists.lengths):
        return np.zeros(0)
    return list_ndcg(rank(lists, score), gain, k)


def spearman(y: np.ndarray, score: np.ndarray) -> float:
    return float(spearmanr(y, score).statistic)


def paired_difference(metric, y: np.ndarray, a: np.ndarray, b: np.ndarray, reps: int = 200, seed: int = 0
                      ) -> dict:
    """``metric(y, a) - metric(y, b)`` for two models' predictions (N,) of the same rows, with a 95% interval from
    resampling rows jointly: far tighter than comparing two separate intervals, which ignores their correlation."""
    lo, hi = bootstrap_ci(lambda yy, aa, bb: metric(yy, aa) - metric(yy, bb), y, a, b, reps=reps, seed=seed)
    return {"difference": metric(y, a) - metric(y, b), "ci95": [lo, hi]}


def paired_gauc(y: np.ndarray, a: np.ndarray, b: np.ndarray, users: np.ndarray, reps: int = UNIT_REPS,
                seed: int = 0) -> dict:
    """GAUC(a) - GAUC(b) on the same rows, 95% interval resampling users jointly. The users counted and their
    weights depend on the labels only, so the difference is the weighted mean of per-user differences."""
    auc_a, w = per_user_auc(y, a, users)
    auc_b, _ = per_user_auc(y, b, users)
    d, ci, n = mean_over_units(auc_a - auc_b, w, reps=reps, seed=seed)
    return {"difference": d, "ci95": ci, "users": n}


def paired_ndcg(gain: np.ndarray, a: np.ndarray, b: np.ndarray, users: np.ndarray, days: np.ndarray,
                k: int = NDCG_K, min_len: int = MIN_LIST, reps: int = UNIT_REPS, seed: int = 0) -> dict:
    """NDCG@k(a) - NDCG@k(b) over the same user-day lists, 95% interval resampling lists jointly."""
    d = per_list_ndcg(gain, a, users, days, k, min_len) - per_list_ndcg(gain, b, users, days, k, min_len)
    mean, ci, n = mean_over_units(d, reps=reps, seed=seed)
    return {"difference": mean, "ci95": ci, "lists": n}


def ranking_report(y: np.ndarray, p: np.ndarray, users: np.ndarray, days: np.ndarray, binary: bool,
                   reps: int = UNIT_REPS) -> dict:
    """Within-user metrics: GAUC (binary tasks) and NDCG@5 over user-day lists, each with its 95% interval."""
    out = {}
    if binary:
        a, w = per_user_auc(y, p, users)
        out["gauc"], out["gauc_ci95"], out["gauc_users"] = mean_over_units(a, w, reps=reps)
    key = f"ndcg@{NDCG_K}"
    out[key], out[f"{key}_ci95"], out[f"{key}_lists"] = mean_over_units(per_list_ndcg(y, p, users, days), reps=reps)
    return out


def binary_report(y: np.ndarray, p: np.ndarray, users: np.ndarray, days: np.ndarray, reps: int = 200) -> dict:
    a = auc(y, p)
    lo, hi = bootstrap_ci(auc, y, p, reps=reps)
    return {"auc": a, "auc_ci95": [lo, hi], **ranking_report(y, p, users, days, binary=True),
            "positives": int(y.sum()), "rows": len(y), "observed_rate": float(np.mean(y)),
            "predicted_mean": float(np.mean(p))}


def regression_report(y: np.ndarray, pred: np.ndarray, users: np.ndarray, days: np.ndarray, unit: str,
                      reps: int = 200) -> dict:
    ok = np.isfinite(y)
    y, pred, users, days = y[ok], pred[ok], users[ok], days[ok]
    rho = spearman(y, pred)
    lo, hi = bootstrap_ci(spearman, y, pred, reps=reps)
    return {"spearman": rho, "spearman_ci95": [lo, hi], **ranking_report(y, pred, users, days, binary=False),
            f"mae_{unit}": float(np.mean(np.abs(pred - y))), f"observed_mean_{unit}": float(np.mean(y)),
            f"predicted_mean_{unit}": float(np.mean(pred)), "rows": int(len(y))}


def paired_report(y: np.ndarray, a: np.ndarray, b: np.ndarray, users: np.ndarray, days: np.ndarray, binary: bool,
                  reps: int = 200) -> dict[str, dict]:
    """Model a minus model b on the same rows, per metric of the reports: "auc" (binary) or "spearman", "gauc"
    (binary), "ndcg@5" -> {"difference", "ci95"}."""
    out = {"auc": paired_difference(auc, y, a, b, reps=reps)} if binary else \
        {"spearman": paired_difference(spearman, y, a, b, reps=reps)}
    if binary:
        out["gauc"] = paired_gauc(y, a, b, users)
    out[f"ndcg@{NDCG_K}"] = paired_ndcg(y, a, b, users, days)
    return out


def ranking_metric(name: str, y: np.ndarray, p: np.ndarray, users: np.ndarray, days: np.ndarray) -> float:
    """One metric by its report name ("auc", "gauc", "ndcg@5"), without an interval: for model selection."""
    if name == "auc":
        return auc(y, p)
    if name == "gauc":
        return grouped_auc(y, p, users)[0]
    if name == f"ndcg@{NDCG_K}":
        v = per_list_ndcg(y, p, users, days)
        v = v[np.isfinite(v)]
        return float(np.mean(v)) if len(v) else float("nan")
    raise ValueError(f"ranking_metric: unknown metric {name!r}; expected auc, gauc or ndcg@{NDCG_K}")
