"""``rankstage calibrate --from-run``: post-hoc calibration fitted on the run's next-day (validation) rows as the
version exported from that run predicts them, and shipped for that version; a refit version (which trained on those
days) is refused, as is any fit day inside a version's training window."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import synthetic

import ranking.train
from calibration import posthoc
from features.spec import ConfigError
from fusion.calibrate import calibrate_command, calibrate_from_run
from ranking.judging import load_judged
from ranking.runs import PREDICTIONS
from ranking.servable import load_metadata


@pytest.fixture(scope="module")
def refit_version(tmp_path_factory, synthetic_log) -> tuple[Path, Path]:
    """A real refit run on the synthetic log (1 epoch, segment -> click), exported -> (run dir, base path)."""
    from ranking.export import export_run

    config = synthetic.config(synthetic_log, ["segment"], ["click"], epochs=1, batch_size=2048)
    run = ranking.train.train(config, tmp_path_factory.mktemp("runs") / "refit", refit=True, verbose=False)
    base = tmp_path_factory.mktemp("models") / "refit"
    export_run(run, base, verbose=False)
    return run, base


def test_level_fitted_on_the_next_day_predictions_fixes_the_level(kuairand_model, tmp_path):
    config, base = kuairand_model
    run = Path(load_metadata(base / "1")["run"])
    judged = load_judged(run / PREDICTIONS)
    day = int(np.unique(judged["click"][3])[0])
    result = calibrate_from_run(run, base, None, [day], "platt", ["click", "long_view", "watch_time"], tmp_path)

    art = posthoc.load_artifact(tmp_path / "calibration.json")
    assert art["model"]["name"] == config.name and art["model"]["version"] == 1
    assert art["fitted_on"]["days"] == [day] and art["fitted_on"]["run"] == str(run)
    assert art["fitted_on"]["predictions"] == f"model {config.name} version 1, out of sample"
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
    with pytest.raises(ConfigError, match="--from-run .*: no artifacts.json"):
        calibrate_from_run(tmp_path, base, None, None, "platt", None, tmp_path / "out")


def test_unknown_task_is_named(kuairand_model, tmp_path):
    _, base = kuairand_model
    run = Path(load_metadata(base / "1")["run"])
    with pytest.raises(ConfigError, match=r"--tasks: \['clicks'\] not tasks of the model"):
        calibrate_from_run(run, base, None, None, "platt", ["clicks"], tmp_path)
    assert not (tmp_path / "calibration.json").exists()


def test_a_refit_version_is_refused_and_told_what_to_run(refit_version, tmp_path):
    """The refit version trained on the validation day: neither its predictions there (in sample) nor the non-refit
    model's (another model) may fit the map it ships with."""
    run, base = refit_version
    window = load_metadata(base / "1")["training_window"]
    assert window["refit"] and window["validation_periods"]
    with pytest.raises(ConfigError, match=r"--from-run .*refit on the run's validation days \[\d+\].* in sample.*"
                                          r"rankstage calibrate --fit-day D .*or train without --refit"):
        calibrate_from_run(run, base, None, None, "platt", None, tmp_path)
    assert not (tmp_path / "calibration.json").exists()


def test_fit_days_inside_the_training_window_are_refused(kuairand_model, refit_version, tmp_path):
    """--fit-day on a day the version trained on is refused, for a refit version's validation day as for any
    training day; the message names the days."""
    _, base = kuairand_model
    trained = load_metadata(base / "1")["training_window"]["periods"]
    with pytest.raises(ConfigError, match=rf"--fit-day \[{trained[-1]}\]: model version .* trained on these days"):
        calibrate_command(base, None, [trained[-1]], None, "platt", None, tmp_path)
    _, refit_base = refit_version
    val = load_metadata(refit_base / "1")["training_window"]["validation_periods"]
    with pytest.raises(ConfigError, match=rf"--fit-day \[{val[0]}\]: model version .* trained on these days"):
        calibrate_command(refit_base, None, val, None, "platt", None, tmp_path)
    assert not (tmp_path / "calibration.json").exists()
