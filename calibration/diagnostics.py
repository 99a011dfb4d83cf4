"""Calibration diagnostics per task: expected calibration error, predicted mean vs observed rate, reliability plot.

N rows; B equal-width bins of the predicted probability over [0, 1].
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def reliability_table(p: np.ndarray, y: np.ndarray, bins: int = 15) -> dict[str, np.ndarray]:
    """(N,) predictions and labels -> per bin (B,): count, mean prediction, observed rate (NaN for empty bins)."""
    p, y = np.asarray(p, dtype=np.float64), np.asarray(y, dtype=np.float64)
    idx = np.clip((p * bins).astype(int), 0, bins - 1)
    count = np.bincount(idx, minlength=bins).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.bincount(idx, weights=p, minlength=bins) / count
        rate = np.bincount(idx, weights=y, minlength=bins) / count
    return {"count": count, "predicted": mean_p, "observed": rate}


def expected_calibration_error(p: np.ndarray, y: np.ndarray, bins: int = 15) -> float:
    """Σ_b (n_b / N) |mean prediction_b − observed rate_b| over equal-width bins."""
    t = reliability_table(p, y, bins)
    ok = t["count"] > 0
    return float(np.sum(t["count"][ok] * np.abs(t["predicted"][ok] - t["observed"][ok])) / t["count"].sum())


def summary(p: np.ndarray, y: np.ndarray, bins: int = 15) -> dict:
    return {"ece": expected_calibration_error(p, y, bins), "predicted_mean": float(np.mean(p)),
            "observed_rate": float(np.mean(y)), "rows": int(len(y)), "positives": float(np.sum(y))}


def reliability_plot(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: str | Path, title: str,
                     bins: int = 15) -> Path:
    """One PNG: a reliability curve per named (predictions, labels) pair, e.g. {"before": .., "after": ..}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    top = 0.0
    for name, (p, y) in curves.items():
        t = reliability_table(p, y, bins)
        ok = t["count"] > 0
        ece = expected_calibration_error(p, y, bins)
        ax.plot(t["predicted"][ok], t["observed"][ok], "o-", ms=3, label=f"{name} (ECE {ece:.4f})")
        top = max(top, np.nanmax(t["predicted"][ok]), np.nanmax(t["observed"][ok]))
    top = min(1.0, top * 1.05 + 1e-3)
    ax.plot([0, top], [0, top], "k:", lw=1, label="perfect")
    ax.set(xlim=(0, top), ylim=(0, top), xlabel="mean predicted probability", ylabel="observed rate", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
