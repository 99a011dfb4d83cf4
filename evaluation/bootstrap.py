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


# ---------------------------------------------------------------- Poisson bootstrap from sums (mergeable)
# Each unit carries K Poisson(1) weights drawn from a hash of its key (a counter-based generator: weight r of unit
# h is a function of (h, r) only), so the resample does not depend on which worker saw the unit or in what order;
# a replicate's mean is sum_u w_ur v_u / sum_u w_ur, and both sums add across workers.

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_POISSON1_CDF = np.cumsum([np.exp(-1.0) / np.prod(np.arange(1, k + 1, dtype=np.float64)) for k in range(24)])
# A weight is the number of CDF values <= u, u = x / 2^53 for a 53-bit integer x: the number of thresholds
# ceil(cdf * 2^53) <= x (exact: x / 2^53 and cdf * 2^53 are exact in float64). Looked up by x's top _CELL_BITS bits:
# a cell that no threshold splits has one weight (_CELL_WEIGHT); only x in the few split cells are searched.
_THRESHOLDS = np.ceil(_POISSON1_CDF * 2.0 ** 53).astype(np.uint64)
_CELL_BITS = 16
_CELL_LOW = np.arange(2 ** _CELL_BITS, dtype=np.uint64) << np.uint64(53 - _CELL_BITS)  # each cell's smallest x
_CELL_WEIGHT = np.searchsorted(_THRESHOLDS, _CELL_LOW, side="right").astype(np.float64)
_CELL_SPLIT = np.searchsorted(_THRESHOLDS, _CELL_LOW + np.uint64(2 ** (53 - _CELL_BITS) - 1),
                              side="right") != _CELL_WEIGHT


def mix64(x: np.ndarray, inplace: bool = False) -> np.ndarray:
    """splitmix64's finaliser on uint64 values (wrapping arithmetic): a bijection that scrambles every bit.
    ``inplace``: overwrite ``x`` (a uint64 array) instead of a copy."""
    x = x if inplace else np.array(x, dtype=np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


def poisson_weights(unit_hash: np.ndarray, reps: int) -> np.ndarray:
    """(U,) uint64 unit hashes -> (U, reps) Poisson(1) resampling weights, a function of (hash, replicate) only."""
    h = np.asarray(unit_hash, np.uint64)[:, None]
    with np.errstate(over="ignore"):
        r = (np.arange(1, reps + 1, dtype=np.uint64) * _GOLDEN)[None, :]
        x = mix64(h ^ r, inplace=True)
        x += _GOLDEN
        x = mix64(x, inplace=True)
    x >>= np.uint64(11)  # (U, reps) 53-bit integers: u = x / 2^53 uniform in [0, 1)
    cell = x >> np.uint64(53 - _CELL_BITS)
    w = _CELL_WEIGHT[cell]  # = searchsorted(_POISSON1_CDF, u, side="right") in half the time (1M-row replay: ~1 s)
    split = _CELL_SPLIT[cell]
    if split.any():
        w[split] = np.searchsorted(_THRESHOLDS, x[split], side="right")
    return w


def weighted_sums(values: np.ndarray, weights: np.ndarray) -> tuple[int, float, np.ndarray, np.ndarray]:
    """(U,) per-unit values and their (U, K) weights -> (units with a finite value, their sum, (K,) weighted sums,
    (K,) weight totals): what a Poisson bootstrap of the mean keeps, and adds across workers."""
    v = np.asarray(values, np.float64)
    ok = np.isfinite(v)
    v, w = v[ok], weights[ok]
    return int(ok.sum()), float(v.sum()), v @ w, w.sum(axis=0)


def bootstrap_sums(values: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, ...]:
    """``weighted_sums`` of C cells at once: (U, C) per-unit values (NaN: undefined for that unit) and the units'
    (U, K) Poisson weights -> per cell: units with a finite value (C,), their sum (C,), (C, K) weighted sums and
    (C, K) weight totals, in two matrix products for all C cells (one ``weighted_sums`` per cell copies the (U, K)
    weights of its finite units: 17 of 108 s of the Beam replay at 1M rows). The weight totals are summed once per
    distinct pattern of defined units (P of them: every ranking shares a metric's)."""
    ok = np.isfinite(values)  # (U, C)
    v = np.where(ok, values, 0.0)
    first: dict[bytes, int] = {}
    which = np.array([first.setdefault(ok[:, c].tobytes(), len(first)) for c in range(ok.shape[1])], np.int64)
    patterns = ok[:, np.unique(which, return_index=True)[1]]  # (U, P) one column per distinct pattern
    totals = patterns.T.astype(np.float64) @ weights  # (P, K)
    return ok.sum(axis=0), v.sum(axis=0), v.T @ weights, totals[which]


def interval_from_sums(rep_sums: np.ndarray, rep_weights: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the replicate means rep_sums / rep_weights (replicates of weight 0 dropped)."""
    ok = rep_weights > 0
    if not ok.any():
        return float("nan"), float("nan")
    vals = rep_sums[ok] / rep_weights[ok]
    lo = (1 - level) / 2
    return float(np.quantile(vals, lo)), float(np.quantile(vals, 1 - lo))
