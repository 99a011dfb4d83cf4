"""Features routed to task towers only (``FeatureSpec.towers``, ``data.statistics.towers``): they bypass the shared
bottom, so the other tasks' outputs cannot depend on them, and the exported signatures still agree."""

from __future__ import annotations

import numpy as np
import pytest
import synthetic
from conftest import train_run

from features.logs import raw_inputs
from features.spec import ConfigError, parse_config
from ranking.export import export_run
from ranking.servable import RANK_CANDIDATES_PACKED, load_servable, pack_inputs
from ranking.signatures import RANK_CANDIDATES, SERVING_DEFAULT, packed_layout, split_request

FEATURES = ["segment", "user_id", "item_id", "quality", "tags"]
TASKS = ["click", "like", "watch_time"]


def routed_config(log, **kwargs):
    """quality (item, numeric) -> like's tower; segment (made a user feature) -> like's and watch time's towers."""
    data = synthetic.config(log, FEATURES, TASKS, **kwargs).model_dump()
    for f in data["features"]:
        if f["name"] == "quality":
            f["towers"] = ["like"]
        if f["name"] == "segment":
            f.update(group="user", towers=["like", "watch_time"])
    return parse_config(data, "routed")


@pytest.fixture(scope="module")
def routed_run(tmp_path_factory, synthetic_log):
    return train_run(routed_config(synthetic_log, epochs=1, bias_tower=True), tmp_path_factory.mktemp("routed") / "r")


def one_user(frame, config) -> dict[str, np.ndarray]:
    user = frame["user_id"].value_counts().index[0]
    return raw_inputs(frame[frame["user_id"] == user].reset_index(drop=True), config.serving_features)


def test_routed_features_reach_only_their_towers(routed_run, validation_frame):
    config, serve = routed_run.config, routed_run.models.serve
    assert [f.name for f in config.bottom_features] == ["user_id", "item_id", "tags"]
    assert len(serve.get_layer("features").input) == 3
    rows = one_user(validation_frame, config)
    base = {k: np.asarray(v) for k, v in serve(rows, training=False).items()}
    changed = {k: np.asarray(v) for k, v in serve({**rows, "quality": rows["quality"] * 3 + 1}, training=False).items()}
    np.testing.assert_array_equal(changed["click"], base["click"])
    np.testing.assert_array_equal(changed["watch_time"], base["watch_time"])
    assert np.abs(changed["like"] - base["like"]).max() > 1e-6
    other = np.where(rows["segment"] == rows["segment"][0], "zz-unknown", rows["segment"]).astype(object)
    moved = {k: np.asarray(v) for k, v in serve({**rows, "segment": other}, training=False).items()}
    np.testing.assert_array_equal(moved["click"], base["click"])
    assert np.abs(moved["like"] - base["like"]).max() > 1e-6
    assert np.abs(moved["watch_time"] - base["watch_time"]).max() > 1e-6


def test_routed_export_signatures_agree(routed_run, validation_frame, tmp_path):
    """export_run's own checks pass (it raises otherwise); rank_candidates (user-side routed feature encoded once,
    broadcast) and its packed form equal serving_default on one user's real rows."""
    config = routed_run.config
    sv = load_servable(export_run(routed_run.run_dir, tmp_path / "models", verbose=False))
    assert {RANK_CANDIDATES, RANK_CANDIDATES_PACKED} <= set(sv.signatures)
    ranked, repeated = split_request(one_user(validation_frame, config), config)
    want = sv.predict(repeated, SERVING_DEFAULT)
    got = sv.predict(ranked, RANK_CANDIDATES)
    packed = sv.predict(pack_inputs(packed_layout(config), ranked), RANK_CANDIDATES_PACKED)
    assert len(want["click"]) > 1
    for task in TASKS:
        np.testing.assert_allclose(got[task], want[task], rtol=1e-5, atol=1e-5, err_msg=task)
        np.testing.assert_allclose(packed[task], got[task], rtol=1e-6, atol=1e-6, err_msg=task)


def test_tower_spec_errors_name_the_feature(synthetic_log):
    data = routed_config(synthetic_log).model_dump()
    data["features"][3]["towers"] = ["lik"]
    with pytest.raises(ConfigError, match=r"features\[3\] \('quality'\): towers \['lik'\] must name tasks"):
        parse_config(data, "bad")
    data = routed_config(synthetic_log).model_dump()
    for f in data["features"]:
        f["towers"] = ["click"]
    with pytest.raises(ConfigError, match="the shared bottom needs one"):
        parse_config(data, "bad")


def test_single_task_configs_send_orphaned_features_to_the_bottom(synthetic_log):
    config = routed_config(synthetic_log)
    click = config.with_tasks(["click"])
    assert {f.name for f in click.bottom_features} == set(FEATURES)
    like = config.with_tasks(["like"])
    assert [f.name for f in like.tower_features("like")] == ["segment", "quality"]


def test_statistics_towers_route_every_statistics_feature(synthetic_log, tmp_path):
    data = synthetic.config(synthetic_log, ["user_id", "item_id"], ["click", "like"]).model_dump()
    data["data"]["statistics"] = {"path": str(tmp_path), "windows": [1], "events": {"click": "click"},
                                  "keys": [{"name": "item", "columns": ["item_id"]}], "towers": ["like"]}
    config = parse_config(data, "stats")
    stats = [f for f in config.features if f.name.startswith("stat_")]
    assert stats and all(f.towers == ["like"] for f in stats)
    assert config.tower_features("like") == stats and config.tower_features("click") == []
    assert parse_config(config.model_dump(), "again") == config  # a dumped config lists them once
    assert all(f.towers is None for f in config.with_tasks(["click"]).features)
    data["data"]["statistics"]["towers"] = ["lik"]
    with pytest.raises(ConfigError, match=r"data.statistics.towers: \['lik'\] must name tasks"):
        parse_config(data, "bad stats")
