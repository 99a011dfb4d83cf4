"""Post-hoc calibration (calibration/posthoc.py), diagnostics (calibration/diagnostics.py) and the output pipeline
(calibration/outputs.py): hand-worked values, planted miscalibration recovered, artifact checks. N rows."""

from __future__ import annotations

import json

import numpy as np
import pytest

from calibration import posthoc
from calibration.diagnostics import expected_calibration_error, reliability_plot, reliability_table
from calibration.downsampling import correct_downsampling
from calibration.outputs import calibrated_outputs, correct_outputs
from features.spec import ConfigError


def _miscalibrated(n: int, seed: int, power: float = 2.0):
    """True p ~ U(0.02, 0.98), y ~ Bernoulli(p); the 'model' predicts p**power (overconfident low)."""
    rng = np.random.default_rng(seed)
    p = rng.uniform(0.02, 0.98, n)
    return p**power, (rng.uniform(size=n) < p).astype(float)


def test_ece_by_hand():
    # bin of 0.1: mean 0.1, rate 0.5 -> 0.4 x 2/4 ; bin of 0.9: mean 0.9, rate 1 -> 0.1 x 2/4 ; total 0.25
    p, y = np.array([0.1, 0.1, 0.9, 0.9]), np.array([0, 1, 1, 1])
    assert expected_calibration_error(p, y, bins=10) == pytest.approx(0.25)
    t = reliability_table(p, y, bins=10)
    assert t["count"][1] == 2 and t["observed"][9] == 1.0 and np.isnan(t["predicted"][5])


def test_isotonic_reduces_ece_on_a_held_out_sample():
    q_fit, y_fit = _miscalibrated(20000, seed=1)
    q, y = _miscalibrated(20000, seed=2)
    params = posthoc.fit("isotonic", q_fit, y_fit)
    before, after = expected_calibration_error(q, y), expected_calibration_error(posthoc.apply(params, q), y)
    assert before > 0.1 and after < 0.03, (before, after)
    assert np.all(np.diff(posthoc.apply(params, np.linspace(0, 1, 101))) >= 0)  # monotone map


def test_platt_recovers_a_planted_temperature_and_keeps_the_order():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 1.5, 50000)
    y = (rng.uniform(size=z.size) < 1 / (1 + np.exp(-z))).astype(float)
    q = 1 / (1 + np.exp(-(2.0 * z + 0.5)))  # overconfident and shifted: true map is a = 0.5, b = -0.25
    params = posthoc.fit("platt", q, y)
    assert params["a"] == pytest.approx(0.5, abs=0.03) and params["b"] == pytest.approx(-0.25, abs=0.05)
    out = posthoc.apply(params, q)
    assert np.array_equal(np.argsort(out, kind="stable"), np.argsort(q, kind="stable"))
    assert expected_calibration_error(out, y) < 0.3 * expected_calibration_error(q, y)


def test_calibration_is_applied_after_the_downsampling_correction():
    sampling = {"click": {"method": "correct_downsampling", "kept_fraction": 0.25},
                "watch_time": {"method": "importance_weighted", "kept_fraction": 0.25}}
    raw = {"click": np.array([0.2, 0.5, 0.8]), "watch_time": np.array([3.0, 10.0, 40.0])}
    corrected = correct_outputs(raw, sampling)
    np.testing.assert_allclose(corrected["click"], correct_downsampling(raw["click"], 0.25))
    np.testing.assert_allclose(corrected["watch_time"], raw["watch_time"])  # not a probability: untouched
    art = {"tasks": {"click": {"method": "platt", "a": 1.0, "b": np.log(2.0)}}}  # doubles the odds
    got = calibrated_outputs(raw, sampling, art)["click"]
    odds = corrected["click"] / (1 - corrected["click"])
    np.testing.assert_allclose(got / (1 - got), 2 * odds)


def test_artifact_round_trip_and_bad_artifacts_rejected(tmp_path):
    q, y = _miscalibrated(2000, seed=3)
    art = posthoc.make_artifact({"click": posthoc.fit("isotonic", q, y), "like": posthoc.fit("platt", q, y)},
                                model={"name": "ranker", "version": 1}, fitted_on={"days": [20220429]},
                                version="v7")
    path = posthoc.save_artifact(art, tmp_path / "calibration.json")
    loaded = posthoc.load_artifact(path)
    assert loaded["version"] == "v7"
    np.testing.assert_allclose(posthoc.calibrate({"click": q}, loaded)["click"],
                               posthoc.calibrate({"click": q}, art)["click"])
    bad = dict(loaded, tasks={"click": {"method": "spline"}})
    path.write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match="tasks.click.method 'spline'"):
        posthoc.load_artifact(path)
    path.write_text(json.dumps(dict(loaded, format="other/1")))
    with pytest.raises(ConfigError, match="format 'other/1'"):
        posthoc.load_artifact(path)
    with pytest.raises(ConfigError, match="unknown 'spline'"):
        posthoc.fit("spline", q, y)


def test_reliability_plot_writes_a_png(tmp_path):
    q, y = _miscalibrated(500, seed=4)
    path = reliability_plot({"before": (q, y), "after": (np.sqrt(q), y)}, tmp_path / "r.png", "click")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_watch_seconds_isotonic_fixes_the_level_and_keeps_the_order():
    """A capped watch-time model: served seconds = min-like compression of the true mean. Isotonic without an
    upper bound maps them back to the observed mean per step; binned error is in seconds, and Platt is refused."""
    rng = np.random.default_rng(3)
    mean = rng.lognormal(2.5, 0.8, 40000)  # true E[t] per row, seconds
    t = rng.exponential(mean)
    served = 30 * (1 - np.exp(-mean / 30))  # under-estimates, monotone in the true mean
    fit_rows, test_rows = slice(0, 20000), slice(20000, None)
    params = posthoc.fit("isotonic", served[fit_rows], t[fit_rows], probability=False)
    after = posthoc.apply(params, served[test_rows])
    assert max(params["y"]) > 30  # not clipped to [0, 1] or to the cap
    assert abs(after.mean() - t[test_rows].mean()) < 0.05 * t[test_rows].mean() < abs(served[test_rows].mean()
                                                                                        - t[test_rows].mean())
    order = np.argsort(served[test_rows], kind="stable")
    assert np.all(np.diff(after[order]) >= 0)
    before_err = expected_calibration_error(served[test_rows], t[test_rows], probability=False)
    after_err = expected_calibration_error(after, t[test_rows], probability=False)
    assert after_err < 0.3 * before_err, (before_err, after_err)
    with pytest.raises(ConfigError, match="'platt' needs probabilities"):
        posthoc.fit("platt", served, t, probability=False)


def test_equal_count_bins_by_hand():
    p, y = np.array([1.0, 2.0, 3.0, 4.0]), np.array([2.0, 2.0, 3.0, 7.0])
    t = reliability_table(p, y, bins=2, probability=False)
    np.testing.assert_allclose(t["count"], [2, 2])
    np.testing.assert_allclose(t["predicted"], [1.5, 3.5])
    np.testing.assert_allclose(t["observed"], [2.0, 5.0])
    assert expected_calibration_error(p, y, bins=2, probability=False) == pytest.approx(0.5 * 0.5 + 0.5 * 1.5)
