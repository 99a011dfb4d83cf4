"""One rule for a calibration artifact wherever it is applied (serving, replay, tune-fusion): it must have been
fitted for the model's name and version and name only its outputs (``calibration.posthoc.check_artifact``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from calibration import posthoc
from features.spec import ConfigError
from ranking.servable import load_metadata
from rankstage.cli import build_parser

PLATT = {"method": "platt", "a": 1.0, "b": 0.0}


def artifact(name: str, version: int, tasks: tuple[str, ...] = ("click",)) -> dict:
    return posthoc.make_artifact({t: PLATT for t in tasks}, model={"name": name, "version": version},
                                 fitted_on={}, version="test")


def test_check_artifact_by_hand():
    ok = artifact("ranker", 3)
    assert posthoc.check_artifact(ok, "ranker", 3, ["click", "like"], "c.json") is ok
    assert posthoc.check_artifact(ok, "ranker", "3", ["click"], "c.json") is ok  # a version read from a dir name
    with pytest.raises(ConfigError, match=r"c.json: fitted for model 'ranker' version 3 .*not for 'ranker' version "
                                          r"4; refit it"):
        posthoc.check_artifact(ok, "ranker", 4, ["click"], "c.json")
    with pytest.raises(ConfigError, match=r"fitted for model 'ranker' version 3 .*not for 'other' version 3"):
        posthoc.check_artifact(ok, "other", 3, ["click"], "c.json")
    with pytest.raises(ConfigError, match=r"fitted for model None version None"):
        posthoc.check_artifact({**ok, "model": {}}, "ranker", 3, ["click"], "c.json")
    with pytest.raises(ConfigError, match=r"c.json: tasks \['like'\] are not outputs of the model \(outputs: "
                                          r"\['click'\]\)"):
        posthoc.check_artifact(artifact("ranker", 3, ("click", "like")), "ranker", 3, ["click"], "c.json")


@pytest.fixture()
def replay_env(exported, tmp_path) -> tuple[Path, Path, dict, int]:
    """(base path, fusion config naming calibration.json beside it, the version's metadata, a day of the log)."""
    base, version_dir = exported
    meta = load_metadata(version_dir)
    fusion = tmp_path / "fusion.yaml"
    fusion.write_text(yaml.safe_dump({"version": "t1", "calibration": "calibration.json", "profiles": {
        "feed": {"formula": "weighted_sum", "weights": {"click": 1.0}}}}))
    return base, fusion, meta, int(meta["training_window"]["validation_periods"][0])


def run(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


def test_replay_refuses_an_artifact_of_another_version(replay_env, tmp_path):
    base, fusion, meta, day = replay_env
    name, version = meta["model_name"], meta["version"]
    replay = ["replay", "--model-base-path", str(base), "--fusion", str(fusion), "--day", str(day), "--reps", "10",
              "--out", str(tmp_path / "replay")]
    posthoc.save_artifact(artifact(name, version + 1), tmp_path / "calibration.json")  # the config's, by default
    with pytest.raises(ConfigError, match=rf"calibration artifact {tmp_path}/calibration.json: fitted for model "
                                          rf"'{name}' version {version + 1} .*not for '{name}' version {version}"):
        run(replay)
    other = posthoc.save_artifact(artifact("other_model", version), tmp_path / "other.json")  # --calibration
    with pytest.raises(ConfigError, match=rf"{other}: fitted for model 'other_model'"):
        run([*replay, "--calibration", str(other)])
    bad_task = posthoc.save_artifact(artifact(name, version, ("click", "long_view")), tmp_path / "task.json")
    with pytest.raises(ConfigError, match=r"tasks \['long_view'\] are not outputs of the model"):
        run([*replay, "--calibration", str(bad_task)])
    assert not (tmp_path / "replay").exists()
    posthoc.save_artifact(artifact(name, version), tmp_path / "calibration.json")  # fitted for this version: replays
    run(replay)
    assert json.loads((tmp_path / "replay" / "replay.json").read_text())["model"]["version"] == version


def test_tune_fusion_refuses_an_artifact_of_another_version(replay_env, tmp_path):
    base, fusion, meta, day = replay_env
    periods = meta["training_window"]["periods"]
    posthoc.save_artifact(artifact(meta["model_name"], meta["version"] + 1), tmp_path / "calibration.json")
    with pytest.raises(ConfigError, match=rf"version {meta['version'] + 1} .*not for '{meta['model_name']}' "
                                          rf"version {meta['version']}"):
        run(["tune-fusion", "--model-base-path", str(base), "--fusion", str(fusion), "--tune-day", str(periods[-1]),
             "--eval-day", str(day), "--trials", "2", "--reps", "10", "--out", str(tmp_path / "tune")])
    assert not (tmp_path / "tune" / "fusion_tuned.yaml").exists()
