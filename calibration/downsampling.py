"""Negative down-sampling and its correction: pure numpy, one implementation for training, replay and serving.

If negatives of a binary task are kept with probability a (positives with 1), the model learns
q = p / (p + a (1 - p)), so the true probability is p = a q / ((1 - q) + a q).
"""

from __future__ import annotations

import numpy as np


def _check_rate(a: float) -> float:
    a = float(a)
    if not 0 < a <= 1:
        raise ValueError(f"kept fraction of negatives must be in (0, 1], got {a!r}")
    return a


def correct_downsampling(q: np.ndarray, a: float) -> np.ndarray:
    """(...) probabilities learned on down-sampled data -> (...) probabilities on the full traffic."""
    a = _check_rate(a)
    q = np.asarray(q, dtype=np.float64)
    return a * q / ((1.0 - q) + a * q)


def apply_downsampling(p: np.ndarray, a: float) -> np.ndarray:
    """Inverse of ``correct_downsampling``: what a model trained with kept fraction ``a`` would predict."""
    a = _check_rate(a)
    p = np.asarray(p, dtype=np.float64)
    return p / (p + a * (1.0 - p))

