"""Fitting post-hoc calibration per task and judging it: pure functions over (N,) arrays of predictions and labels.

"Before" is the model output after the down-sampling correction; "after" adds the post-hoc map. Fit on days the
model did not train on, and judge on a different day, or the "after" numbers are optimistic. Loading a model and
scoring a log (``rankstage calibrate``) is ``fusion.calibrate``'s.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from calibration import diagnostics, posthoc


def fit_tasks(predictions: dict[str, np.ndarray], labels: dict[str, np.ndarray], tasks: list[str], method: str,
              units: dict[str, str | None] | None = None) -> dict[str, dict]:
    """Per task, fit ``method`` on (N,) corrected predictions and labels (rows with a NaN label skipped); tasks
    whose ``units`` entry is not None (watch time: "seconds") are fitted isotonic, without an upper bound."""
    units = units or {}
    params = {}
    for t in tasks:
        ok = np.isfinite(labels[t])
        unit = units.get(t)
        params[t] = posthoc.fit("isotonic" if unit else method, predictions[t][ok], labels[t][ok], unit is None)
    return params


def trained_days(training_window: dict | None) -> set[str]:
    """The days a version trained on, as strings, from its metadata's ``training_window``: ``periods``, which a
    refit run's window already extends with ``validation_periods`` (listed again here for older metadata)."""
    window = training_window or {}
    days = [*window.get("periods", []), *(window.get("validation_periods", []) if window.get("refit") else [])]
    return {str(d) for d in days}


def in_sample_days(days: list, training_window: dict | None) -> list:
    """The ``days`` a version with this ``training_window`` trained on: its predictions there are in sample."""
    trained = trained_days(training_window)
    return sorted(d for d in days if str(d) in trained)


def task_units(task_types: dict[str, str]) -> dict[str, str | None]:
    """The unit of each task's served value: None for probabilities (binary tasks, completion ratio), else seconds."""
    return {t: "seconds" if kind == "watch_time" else None for t, kind in task_types.items()}


def diagnose(predictions: dict[str, np.ndarray], labels: dict[str, np.ndarray], artifact: dict, out: Path,
             bins: int = 15, units: dict[str, str | None] | None = None) -> dict[str, dict]:
    """Per task: ECE and predicted mean vs observed rate before and after; writes reliability_<task>.png.
    Tasks with a unit (watch seconds) are binned by prediction quantiles and their ECE is in that unit."""
    units = units or {}
    after = posthoc.calibrate(predictions, artifact)
    rows = {}
    for t in artifact["tasks"]:
        ok = np.isfinite(labels[t])
        p0, p1, y = predictions[t][ok], after[t][ok], labels[t][ok]
        prob = units.get(t) is None
        rows[t] = {"before": diagnostics.summary(p0, y, bins, prob), "after": diagnostics.summary(p1, y, bins, prob),
                   "unit": units.get(t) or "probability"}
        diagnostics.reliability_plot({"before": (p0, y), f"after ({artifact['tasks'][t]['method']})": (p1, y)},
                                     out / f"reliability_{t}.png", f"{t}: reliability", bins, units.get(t))
    return rows


def format_diagnostics(rows: dict[str, dict], title: str) -> str:
    """``diagnose``'s rows as a markdown table under ``title``."""
    lines = [f"## {title}", "", "| task | rows | positives | observed rate / mean | predicted mean before -> after | "
             "ECE before -> after |", "|---|---|---|---|---|---|"]
    for t, r in rows.items():
        b, a = r["before"], r["after"]
        unit = r.get("unit", "probability")
        positives = f"{b['positives']:.0f}" if unit == "probability" else "-"
        ece = f"{b['ece']:.4f} -> {a['ece']:.4f}" + ("" if unit == "probability" else f" {unit}")
        lines.append(f"| {t} | {b['rows']} | {positives} | {b['observed_rate']:.4f} | "
                     f"{b['predicted_mean']:.4f} -> {a['predicted_mean']:.4f} | {ece} |")
    return "\n".join(lines) + "\n"
