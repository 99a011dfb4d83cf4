"""``rankstage calibrate --from-run``: post-hoc calibration fitted on a run's next-day (validation) predictions and
shipped for the version exported from that run."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from calibration import posthoc
from calibration.fit import calibrate_from_run
from features.spec import ConfigError
from ranking.judging import load_judged
from ranking.runs import PREDICTIONS
from ranking.servable import load_metadata


def test_level_fitted_on_the_next_day_predictions_fixes_the_level(kuairand_model, tmp_path):
    config, base = kuairand_model
    run = Path(load_metadata(base / "1")["run"])
    judged = load_judged(run / PREDICTIONS)
    day = int(np.unique(judged["click"][3])[0])
    result = calibrate_from_run(run, base, None, [day], "platt", ["click", "long_view", "watch_time"], tmp_path)

    art = posthoc.load_artifact(tmp_path / "calibration.json")
    assert art["model"]["name"] == config.name and art["model"]["version"] == 1
    assert art["fitted_on"]["days"] == [day] and art["fitted_on"]["run"] == str(run)
    assert art["tasks"]["watch_time"]["method"] == "isotonic" and art["tasks"]["click"]["method"] == "platt"
    # on the fitted predictions themselves a Platt map with an intercept matches the mean exactly
    y, p = judged["click"][0], judged["click"][1]
    after = posthoc.calibrate({"click": p}, art)["click"]
    assert after.mean() == pytest.approx(y.mean(), rel=1e-3)
    # the exported version scored on that day through the streamed path gives the same level after the map
    for task in ("click", "long_view"):
        row = result["diagnostics"][task]
        assert row["after"]["predicted_mean"] == pytest.approx(row["after"]["observed_rate"], rel=0.01), task
        assert row["before"]["predicted_mean"] == pytest.approx(judged[task][1].mean(), rel=1e-4), task
    assert (tmp_path / "calibration.md").read_text().count("|") > 10
    assert (tmp_path / "reliability_click.png").stat().st_size > 1000


def test_a_version_exported_from_another_run_is_refused(kuairand_model, tmp_path):
    _, base = kuairand_model
    run = Path(load_metadata(base / "1")["run"])
    other = tmp_path / "other_run"
    shutil.copytree(run, other, ignore=shutil.ignore_patterns("tensorboard*"))
    with pytest.raises(ConfigError, match="--from-run .*other_run: model version .* was exported from run"):
        calibrate_from_run(other, base, None, None, "platt", None, tmp_path / "out")
    with pytest.raises(ConfigError, match="--from-run .*: no validation_predictions.npz"):
        calibrate_from_run(tmp_path, base, None, None, "platt", None, tmp_path / "out")


def test_unknown_task_is_named(kuairand_model, tmp_path):
    _, base = kuairand_model
    run = Path(load_metadata(base / "1")["run"])
    with pytest.raises(ConfigError, match=r"--tasks: \['clicks'\] not judged"):
        calibrate_from_run(run, base, None, None, "platt", ["clicks"], tmp_path)
    assert not (tmp_path / "calibration.json").exists()
