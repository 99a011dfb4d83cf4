"""Fusion formulas: the per-task predictions of C candidates -> one (C,) ranking score. Pure numpy, vectorised.

C candidates. ``terms`` maps a task name to its (C,) values: corrected (and optionally calibrated) probabilities,
watch time in seconds or completion in [0, 1]. The same functions rank candidates in replay, tuning and serving.

    weighted_sum       s = Σ_i w_i · x_i
    click_multiplier   s = x_click · (1 + Σ_i w_i · x_i)
    weighted_product   s = Π_i (1 + w_i · x_i) ^ a_i        (w_i >= 0; computed in log space)
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

FORMULAS = ("weighted_sum", "click_multiplier", "weighted_product")


def _term(terms: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    if name not in terms:
        raise KeyError(f"fusion term {name!r} is not among the predictions {sorted(terms)}")
    return np.asarray(terms[name], dtype=np.float64)


def _candidates(terms: Mapping[str, np.ndarray], names) -> tuple[int, ...]:
    shapes = {np.shape(terms[n]) for n in names if n in terms}
    if len(shapes) > 1:
        raise ValueError(f"fusion terms have different shapes {sorted(shapes)}")
    return shapes.pop() if shapes else np.shape(next(iter(terms.values())))


def weighted_sum(terms: Mapping[str, np.ndarray], weights: Mapping[str, float]) -> np.ndarray:
    """(C,) Σ_i w_i · x_i."""
    out = np.zeros(_candidates(terms, weights), dtype=np.float64)
    for name, w in weights.items():
        out += float(w) * _term(terms, name)
    return out


def click_multiplier(terms: Mapping[str, np.ndarray], weights: Mapping[str, float], click: str = "click"
                     ) -> np.ndarray:
    """(C,) x_click · (1 + Σ_i w_i · x_i): click gates the candidate, the other behaviours boost it."""
    return _term(terms, click) * (1.0 + weighted_sum(terms, weights))


def weighted_product(terms: Mapping[str, np.ndarray], weights: Mapping[str, float],
                     exponents: Mapping[str, float] | None = None) -> np.ndarray:
    """(C,) Π_i (1 + w_i · x_i)^a_i with a_i = exponents.get(i, 1); weights must be >= 0 (bases stay >= 1)."""
    exponents = exponents or {}
    log_score = np.zeros(_candidates(terms, weights), dtype=np.float64)
    for name, w in weights.items():
        if w < 0:
            raise ValueError(f"weighted_product: weight of {name!r} must be >= 0, got {w!r}")
        x = np.maximum(_term(terms, name), 0.0)  # probabilities, seconds and ratios are >= 0
        log_score += float(exponents.get(name, 1.0)) * np.log1p(float(w) * x)
    return np.exp(log_score)


def fuse(terms: Mapping[str, np.ndarray], formula: str, weights: Mapping[str, float],
         exponents: Mapping[str, float] | None = None) -> np.ndarray:
    """Dispatch on the formula name of a fusion profile -> (C,) scores (higher ranks first)."""
    if formula == "weighted_sum":
        return weighted_sum(terms, weights)
    if formula == "click_multiplier":
        return click_multiplier(terms, weights)
    if formula == "weighted_product":
        return weighted_product(terms, weights, exponents)
    raise ValueError(f"unknown fusion formula {formula!r} (known: {', '.join(FORMULAS)})")
