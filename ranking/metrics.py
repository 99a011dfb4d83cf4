"""Offline metrics for validation: AUC, user-grouped AUC, Spearman, bootstrap intervals. Inputs are (N,) arrays."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats import rankdata, spearmanr


def auc(y: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve via ranks (ties averaged); NaN if one class is absent."""
    y = np.asarray(y) > 0.5
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = rankdata(score)
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def grouped_auc(y: np.ndarray, score: np.ndarray, groups: np.ndarray) -> tuple[float, int]:
    """Impression-weighted mean of per-group AUC over groups holding both classes -> (gAUC, groups used)."""
    df = pd.DataFrame({"y": np.asarray(y) > 0.5, "s": score, "g": groups})
    total, weight, used = 0.0, 0, 0
    for _, part in df.groupby("g", sort=False):
        n_pos = int(part.y.sum())
        if 0 < n_pos < len(part):
            total += auc(part.y.to_numpy(), part.s.to_numpy()) * len(part)
            weight += len(part)
            used += 1
    return (total / weight if weight else float("nan")), used


def spearman(y: np.ndarray, score: np.ndarray) -> float:
    return float(spearmanr(y, score).statistic)


def bootstrap_ci(metric, *arrays: np.ndarray, reps: int = 200, seed: int = 0, level: float = 0.95
                 ) -> tuple[float, float]:
    """Percentile interval of ``metric(*arrays)`` over row resamples (NaN resamples dropped)."""
    rng = np.random.default_rng(seed)
    n = len(arrays[0])
    vals = []
    for _ in range(reps):
        idx = rng.integers(0, n, n)
        vals.append(metric(*(a[idx] for a in arrays)))
    vals = np.asarray(vals, dtype=float)
    vals = vals[np.isfinite(vals)]
    if not len(vals):
        return float("nan"), float("nan")
    lo = (1 - level) / 2
    return float(np.quantile(vals, lo)), float(np.quantile(vals, 1 - lo))


def paired_difference(metric, y: np.ndarray, a: np.ndarray, b: np.ndarray, reps: int = 200, seed: int = 0
                      ) -> dict:
    """``metric(y, a) - metric(y, b)`` for two models' predictions (N,) of the same rows, with a 95% interval from
    resampling rows jointly: far tighter than comparing two separate intervals, which ignores their correlation."""
    lo, hi = bootstrap_ci(lambda yy, aa, bb: metric(yy, aa) - metric(yy, bb), y, a, b, reps=reps, seed=seed)
    return {"difference": metric(y, a) - metric(y, b), "ci95": [lo, hi]}


def binary_report(y: np.ndarray, p: np.ndarray, users: np.ndarray, reps: int = 200) -> dict:
    a = auc(y, p)
    gauc, groups = grouped_auc(y, p, users)
    lo, hi = bootstrap_ci(auc, y, p, reps=reps)
    return {"auc": a, "auc_ci95": [lo, hi], "gauc": gauc, "gauc_users": groups, "positives": int(y.sum()),
            "rows": len(y), "observed_rate": float(np.mean(y)), "predicted_mean": float(np.mean(p))}


def regression_report(y: np.ndarray, pred: np.ndarray, unit: str, reps: int = 200) -> dict:
    ok = np.isfinite(y)
    y, pred = y[ok], pred[ok]
    rho = spearman(y, pred)
    lo, hi = bootstrap_ci(spearman, y, pred, reps=reps)
    return {"spearman": rho, "spearman_ci95": [lo, hi], f"mae_{unit}": float(np.mean(np.abs(pred - y))),
            f"observed_mean_{unit}": float(np.mean(y)), f"predicted_mean_{unit}": float(np.mean(pred)),
            "rows": int(len(y))}
