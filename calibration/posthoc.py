"""Post-hoc calibration per task, fitted on held-out logs and applied after the down-sampling correction.

Two methods, both stored as plain numbers so serving needs neither scikit-learn nor this module's fitting code:
- ``isotonic``: a non-decreasing step-interpolated map p -> p' (scikit-learn's IsotonicRegression, kept as its
  thresholds ``x``, ``y``; applied with ``np.interp``, which is how IsotonicRegression predicts with clipping).
- ``platt``: p' = sigmoid(a · logit(p) + b), a logistic regression on the logit (a = 1/T is temperature scaling
  plus a bias). Keeps the order of candidates, so it never creates ties the way isotonic steps can.

The artifact is a versioned JSON file beside the fusion config:
    {"format": "rankstage.calibration/1", "version": "...", "model": {...}, "fitted_on": {...},
     "tasks": {"click": {"method": "isotonic", "x": [...], "y": [...]}, "like": {"method": "platt", "a": .., "b": ..}}}
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np

from features.spec import ConfigError, read_document

FORMAT = "rankstage.calibration/1"
METHODS = ("isotonic", "platt")
_EPS = 1e-7


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1 - _EPS)
    return np.log(p) - np.log1p(-p)


def fit_isotonic(p: np.ndarray, y: np.ndarray, y_max: float | None = 1.0) -> dict:
    """(N,) predictions, (N,) labels in [0, y_max] -> {"method": "isotonic", "x": [...], "y": [...]}.

    ``y_max=None`` for values without an upper bound (watch seconds): the map then gives the mean observed value
    per increasing step of the prediction, which keeps the ranking and fixes the level."""
    from sklearn.isotonic import IsotonicRegression

    iso = IsotonicRegression(y_min=0.0, y_max=y_max, out_of_bounds="clip").fit(p, y)
    return {"method": "isotonic", "x": iso.X_thresholds_.tolist(), "y": iso.y_thresholds_.tolist()}


def fit_platt(p: np.ndarray, y: np.ndarray) -> dict:
    """(N,) predictions, (N,) labels -> {"method": "platt", "a": .., "b": ..} by maximum likelihood on logit(p)."""
    from scipy.optimize import minimize

    z, y = _logit(p), np.asarray(y, dtype=np.float64)

    def nll(theta):
        s = theta[0] * z + theta[1]
        loss = np.mean(np.logaddexp(0.0, s) - y * s)
        r = 1.0 / (1.0 + np.exp(-s)) - y
        return loss, np.array([np.mean(r * z), np.mean(r)])

    res = minimize(nll, np.array([1.0, 0.0]), jac=True, method="L-BFGS-B")
    return {"method": "platt", "a": float(res.x[0]), "b": float(res.x[1])}


def fit(method: str, p: np.ndarray, y: np.ndarray, probability: bool = True) -> dict:
    """Fit one task's map; values that are not probabilities (watch seconds) only take ``isotonic``."""
    if not probability and method != "isotonic":
        raise ConfigError(f"calibration method: {method!r} needs probabilities; use 'isotonic' for values in "
                          "other units (watch time)")
    if method == "isotonic":
        return fit_isotonic(p, y, 1.0 if probability else None)
    if method == "platt":
        return fit_platt(p, y)
    raise ConfigError(f"calibration method: unknown {method!r} (known: {', '.join(METHODS)})")


def apply(params: dict, p: np.ndarray) -> np.ndarray:
    """(...) predictions -> (...) calibrated predictions with one task's fitted parameters."""
    p = np.asarray(p, dtype=np.float64)
    if params["method"] == "isotonic":
        return np.interp(p, params["x"], params["y"])
    if params["method"] == "platt":
        return 1.0 / (1.0 + np.exp(-(params["a"] * _logit(p) + params["b"])))
    raise ConfigError(f"calibration: unknown method {params['method']!r} (known: {', '.join(METHODS)})")


def calibrate(outputs: dict[str, np.ndarray], artifact: dict | None) -> dict[str, np.ndarray]:
    """Apply an artifact's per-task maps to (C,) outputs; tasks the artifact does not name pass through."""
    if not artifact:
        return dict(outputs)
    tasks = artifact["tasks"]
    return {t: apply(tasks[t], v) if t in tasks else v for t, v in outputs.items()}


def make_artifact(params: dict[str, dict], model: dict, fitted_on: dict, version: str | None = None) -> dict:
    version = version or dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    return {"format": FORMAT, "version": version, "model": model, "fitted_on": fitted_on, "tasks": params}


def save_artifact(artifact: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(artifact, indent=1))
    return path


def check_artifact(artifact: dict, model_name: str, version: int | str, tasks: list[str] | tuple[str, ...],
                   path: str | Path) -> dict:
    """``artifact`` if it was fitted for model ``model_name`` version ``version`` and names only its output ``tasks``;
    else a ConfigError naming the file and both values. The one rule serving, replay and tuning apply."""
    fitted = artifact.get("model") or {}
    if str(fitted.get("name")) != str(model_name) or str(fitted.get("version")) != str(version):
        raise ConfigError(f"calibration artifact {path}: fitted for model {fitted.get('name')!r} version "
                          f"{fitted.get('version')!r} (model.name, model.version), not for {model_name!r} version "
                          f"{version}; refit it (rankstage calibrate) for this version")
    unknown = [t for t in artifact.get("tasks", {}) if t not in tasks]
    if unknown:
        raise ConfigError(f"calibration artifact {path}: tasks {unknown} are not outputs of the model "
                          f"(outputs: {list(tasks)})")
    return artifact


def load_artifact(path: str | Path) -> dict:
    """Read and check a calibration artifact; errors name the field and the value."""
    path = Path(path)
    art = read_document(path, "calibration artifact", "json")
    if not isinstance(art, dict):
        raise ConfigError(f"calibration artifact {path}: expected a JSON object, got {type(art).__name__}")
    if art.get("format") != FORMAT:
        raise ConfigError(f"calibration artifact {path}: format {art.get('format')!r}, expected {FORMAT!r}")
    for task, params in art.get("tasks", {}).items():
        method = params.get("method")
        if method not in METHODS:
            raise ConfigError(f"calibration artifact {path}: tasks.{task}.method {method!r} (known: {METHODS})")
        nums = params["x"] + params["y"] if method == "isotonic" else [params["a"], params["b"]]
        if not np.all(np.isfinite(nums)):
            raise ConfigError(f"calibration artifact {path}: tasks.{task} has non-finite parameters")
    return art
