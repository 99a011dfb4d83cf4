"""Bootstrap intervals over a unit (rows, users, lists): percentile intervals of a metric and of a weighted mean of
per-unit values. Paired differences resample both sides' units jointly (see ``evaluation.metrics``)."""

from __future__ import annotations

import numpy as np

UNIT_REPS = 1000  # bootstrap resamples over users / lists (cheap: per-unit values are computed once)


def bootstrap_ci(metric, *arrays: np.ndarray, reps: int = 200, seed: int = 0, level: float = 0.95
                 ) -> tuple[float, float]:
    """Percentile interval of ``metric(*arrays)`` over resamples of the arrays' rows (NaN resamples dropped).
    The rows are the unit resampled: impressions, users or lists, whatever the arrays hold one value per."""
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


def _weighted_mean(v: np.ndarray, w: np.ndarray) -> float:
    return float(np.dot(v, w) / w.sum()) if len(v) else float("nan")


def mean_over_units(values: np.ndarray, weights: np.ndarray | None = None, reps: int = UNIT_REPS, seed: int = 0
                    ) -> tuple[float, list[float], int]:
    """(Weighted) mean of per-unit values (U,) over the finite ones, its 95% interval over unit resamples, and U."""
    values = np.asarray(values, np.float64)
    w = np.ones(len(values)) if weights is None else np.asarray(weights, np.float64)
    ok = np.isfinite(values)
    v, w = values[ok], w[ok]
    if not len(v):
        return float("nan"), [float("nan"), float("nan")], 0
    lo, hi = bootstrap_ci(_weighted_mean, v, w, reps=reps, seed=seed)
    return _weighted_mean(v, w), [lo, hi], int(len(v))
