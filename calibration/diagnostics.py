"""Calibration diagnostics per task: expected calibration error, predicted mean vs observed rate, reliability plot.

N rows; B bins of the prediction: equal-width over [0, 1] for probabilities, equal-count (quantiles of the
prediction) for values in other units (watch seconds), where the error is then in those units.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def reliability_table(p: np.ndarray, y: np.ndarray, bins: int = 15, probability: bool = True
                      ) -> dict[str, np.ndarray]:
    """(N,) predictions and labels -> per bin (B,): count, mean prediction, observed rate (NaN for empty bins)."""
    p, y = np.asarray(p, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if probability:
        idx = np.clip((p * bins).astype(int), 0, bins - 1)
    else:  # equal-count bins by rank: ties split evenly, the same for any monotone rescaling of p
        idx = np.minimum((np.argsort(np.argsort(p, kind="stable"), kind="stable") * bins) // max(len(p), 1), bins - 1)
    count = np.bincount(idx, minlength=bins).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.bincount(idx, weights=p, minlength=bins) / count
        rate = np.bincount(idx, weights=y, minlength=bins) / count
    return {"count": count, "predicted": mean_p, "observed": rate}


def expected_calibration_error(p: np.ndarray, y: np.ndarray, bins: int = 15, probability: bool = True) -> float:
    """Σ_b (n_b / N) |mean prediction_b − observed rate_b| over the bins of ``reliability_table``."""
    t = reliability_table(p, y, bins, probability)
    ok = t["count"] > 0
    return float(np.sum(t["count"][ok] * np.abs(t["predicted"][ok] - t["observed"][ok])) / t["count"].sum())


def summary(p: np.ndarray, y: np.ndarray, bins: int = 15, probability: bool = True) -> dict:
    return {"ece": expected_calibration_error(p, y, bins, probability), "predicted_mean": float(np.mean(p)),
            "observed_rate": float(np.mean(y)), "rows": int(len(y)), "positives": float(np.sum(y))}


def reliability_plot(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: str | Path, title: str,
                     bins: int = 15, unit: str | None = None) -> Path:
    """One PNG: a reliability curve per named (predictions, labels) pair, e.g. {"before": .., "after": ..};
    ``unit`` (e.g. "seconds") for values that are not probabilities."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    top = 0.0
    for name, (p, y) in curves.items():
        t = reliability_table(p, y, bins, unit is None)
        ok = t["count"] > 0
        ece = expected_calibration_error(p, y, bins, unit is None)
        ax.plot(t["predicted"][ok], t["observed"][ok], "o-", ms=3, label=f"{name} (ECE {ece:.4g})")
        top = max(top, np.nanmax(t["predicted"][ok]), np.nanmax(t["observed"][ok]))
    top = (min(1.0, top * 1.05 + 1e-3)) if unit is None else top * 1.05
    ax.plot([0, top], [0, top], "k:", lw=1, label="perfect")
    xlabel, ylabel = ("mean predicted probability", "observed rate") if unit is None else \
        (f"mean prediction ({unit}), equal-count bins", f"observed mean ({unit})")
    ax.set(xlim=(0, top), ylim=(0, top), xlabel=xlabel, ylabel=ylabel, title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
