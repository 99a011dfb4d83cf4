"""The feature spec (features/spec.py) and the log readers that apply it (features/logs.py).

Every invalid config must give a ConfigError whose message names the field and quotes the bad value.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from features.logs import evaluation_labels, raw_column, task_label, task_labels, time_split
from features.spec import ConfigError, FeatureSpec, TaskSpec, load_config, parse_config

ROOT = Path(__file__).resolve().parents[1]


def small_config() -> dict:
    """A valid config: ids, a numeric, a bucketized and a multi-valued feature, position x device bias tower."""
    return {
        "name": "tiny",
        "data": {"log": "log.csv", "joins": [{"path": "items.csv", "key": "item", "missing_values": [-124]}],
                 "time_column": "day", "user_column": "user", "item_column": "item"},
        "features": [
            {"name": "user", "kind": "categorical", "group": "user", "vocab": {"min_count": 2}},
            {"name": "item", "kind": "categorical", "hash_bins": 64},
            {"name": "duration", "kind": "numeric", "transform": "log1p", "default": 30.0},
            {"name": "hour", "kind": "bucketized", "group": "context", "boundaries": [6.0, 12.0, 18.0]},
            {"name": "tags", "kind": "multi_valued", "vocab": {}, "max_values": 4},
            {"name": "position", "kind": "categorical", "group": "bias", "bias": True, "vocab": {}},
            {"name": "device", "kind": "categorical", "dtype": "string", "group": "bias", "bias": True,
             "vocab": {}},
        ],
        "tasks": [
            {"name": "click", "type": "binary", "label": "is_click"},
            {"name": "like", "type": "binary", "label": "is_like", "condition": "click", "loss_weight": 0.5},
            {"name": "watch_time", "type": "watch_time", "label": "play_ms", "scale": 0.001, "max_value": 600},
        ],
        "model": {"num_experts": 2, "expert_units": [8], "bottom_units": [16], "tower_units": [4],
                  "bias_tower": {"position": "position", "device": "device", "tasks": ["click"]}},
        "training": {"negative_sampling": {"task": "click", "keep_fraction": 0.5}},
    }


def config_error(data: dict) -> str:
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    return str(err.value)


def test_small_config_parses():
    cfg = parse_config(small_config())
    assert [f.name for f in cfg.model_features] == ["user", "item", "duration", "hour", "tags"]
    assert [(f.name, f.group) for f in cfg.serving_bias_features] == [("device", "context")]  # position: never
    assert cfg.serving_features == cfg.model_features + cfg.serving_bias_features
    assert [f.name for f in cfg.bias_features] == ["position", "device"]
    assert [f.raw_dtype for f in cfg.features] == ["int", "int", "float", "float", "string", "int", "string"]
    assert cfg.tasks[1].condition == "click" and cfg.tasks[1].loss_weight == 0.5
    assert cfg.data.joins[0].key == "item"


def test_unknown_feature_kind():
    data = small_config()
    data["features"][2]["kind"] = "catgorical"
    msg = config_error(data)
    assert "features[2].kind" in msg and "'catgorical'" in msg


def test_oov_dropout_must_be_below_one_and_not_on_bias_features():
    data = small_config()
    data["features"][0]["vocab"]["oov_dropout"] = 1.0
    msg = config_error(data)
    assert "features[0].vocab.oov_dropout" in msg and "1.0" in msg
    data = small_config()
    data["features"][5]["vocab"]["oov_dropout"] = 0.2
    msg = config_error(data)
    assert "'position'" in msg and "oov_dropout" in msg and "0.2" in msg
    data = small_config()
    data["features"][0]["vocab"]["oov_dropout"] = 0.1
    data["features"][4]["vocab"]["oov_dropout"] = 0.2
    assert parse_config(data).features[4].vocab.oov_dropout == 0.2


def test_duplicate_feature_names():
    data = small_config()
    data["features"].append({"name": "item", "kind": "numeric"})
    msg = config_error(data)
    assert "features" in msg and "duplicate names ['item']" in msg


def test_duplicate_task_names():
    data = small_config()
    data["tasks"].append({"name": "click", "type": "binary", "label": "is_click2"})
    msg = config_error(data)
    assert "tasks" in msg and "duplicate names ['click']" in msg


def test_task_condition_naming_an_unknown_task():
    data = small_config()
    data["tasks"][1]["condition"] = "clik"
    msg = config_error(data)
    assert "task 'like'" in msg and "condition 'clik'" in msg


def test_task_condition_must_be_binary():
    data = small_config()
    data["tasks"][1]["condition"] = "watch_time"
    assert "condition 'watch_time'" in config_error(data)


def test_bias_tower_position_naming_a_non_bias_feature():
    data = small_config()
    data["model"]["bias_tower"]["position"] = "item"
    msg = config_error(data)
    assert "model.bias_tower.position" in msg and "'item'" in msg


def test_bias_tower_position_naming_a_missing_feature():
    data = small_config()
    data["model"]["bias_tower"]["device"] = "os"
    msg = config_error(data)
    assert "model.bias_tower.device" in msg and "'os'" in msg


def test_negative_loss_weight():
    data = small_config()
    data["tasks"][0]["loss_weight"] = -1.0
    msg = config_error(data)
    assert "tasks[0].loss_weight" in msg and "-1.0" in msg


@pytest.mark.parametrize("boundaries", [[6.0, 18.0, 12.0], [6.0, 6.0], [], [1.0, float("inf")]])
def test_bucket_boundaries_must_be_finite_and_strictly_increasing(boundaries):
    data = small_config()
    data["features"][3]["boundaries"] = boundaries
    msg = config_error(data)
    assert "features[3]" in msg and "'hour'" in msg and "boundaries" in msg and repr(boundaries) in msg


@pytest.mark.parametrize(("path", "value", "field"), [
    (("model", "gate_dropout"), 1.0, "model.gate_dropout"),
    (("model", "num_experts"), -1, "model.num_experts"),
    (("training", "negative_sampling", "keep_fraction"), 0.0, "training.negative_sampling.keep_fraction"),
    (("data", "validation_periods"), 0, "data.validation_periods"),
    (("model", "bias_tower", "position_dropout"), 1.5, "model.bias_tower.position_dropout"),
])
def test_out_of_range_numbers_name_the_field_and_value(path, value, field):
    data = small_config()
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    msg = config_error(data)
    assert field in msg and repr(value) in msg


def test_unknown_field_is_rejected():
    data = small_config()
    data["features"][0]["embeding_dim"] = 8
    msg = config_error(data)
    assert "features[0].embeding_dim" in msg


def test_join_key_field_is_key_not_on():
    data = small_config()
    data["data"]["joins"][0] = {"path": "items.csv", "on": "item"}
    msg = config_error(data)
    assert "data.joins[0].on" in msg and "data.joins[0].key" in msg


def test_bias_feature_must_feed_the_bias_tower():
    data = small_config()
    data["model"]["bias_tower"]["device"] = None
    msg = config_error(data)
    assert "['device']" in msg and "bias_tower" in msg


def test_load_config_bad_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nfeatures: [unclosed\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value) and "not valid YAML" in str(err.value)


def test_load_config_missing_file(tmp_path):
    path = tmp_path / "nowhere.yaml"
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "not found" in str(err.value) and str(path) in str(err.value)


def test_load_config_top_level_must_be_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping.*got list"):
        load_config(path)


def test_load_config_errors_name_the_file(tmp_path):
    import yaml

    data = small_config()
    data["tasks"][0]["loss_weight"] = -2.0
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value) and "tasks[0].loss_weight" in str(err.value)


def test_real_kuairand_config_loads():
    cfg = load_config(ROOT / "configs" / "kuairand.yaml")
    assert [t.name for t in cfg.tasks] == ["click", "like", "collect", "share", "long_view", "watch_time",
                                           "completion"]
    assert cfg.bias_features == []
    watch = {t.name: t for t in cfg.tasks}["watch_time"]
    assert (watch.type, watch.scale, watch.max_value) == ("watch_time", 0.001, 60)
    assert {f.name: f for f in cfg.features}["tag"].kind == "multi_valued"
    assert cfg.data.joins[0].key == "user_id" and cfg.data.joins[0].missing_values == [-124]


def test_default_config_counts_the_same_day_authors():
    cfg = load_config(ROOT / "configs" / "kuairand.yaml")
    matches = [f for f in cfg.features if f.kind == "match"]
    assert [(f.name, f.match, f.group, f.towers) for f in matches] == [
        ("authors_seen_today", "author_id", "item", None), ("authors_clicked_today", "author_id", "item", None)]
    assert [(lst.name, lst.column, lst.where) for lst in cfg.data.history.lists] == [
        ("authors_seen_today", "author_id", None), ("authors_clicked_today", "author_id", "is_click"),
        ("clicked_videos", ["video_id", "author_id", "tag", "play_time_ms / duration_ms"], ["is_click", "long_view"])]


def test_default_config_attends_over_the_cross_day_behaviour_sequence():
    cfg = load_config(ROOT / "configs" / "kuairand.yaml")
    events = {lst.name: lst for lst in cfg.data.history.lists}["clicked_videos"]
    assert (events.scope, events.max_len, events.age) == ("all", 20, True)
    sequence = {f.name: f for f in cfg.features}["clicked_videos"]
    assert sequence.kind == "sequence" and sequence.group == "user"
    assert [fld.target for fld in sequence.sequence.fields][:3] == ["video_id", "author_id", "tag"]
    without = load_config(ROOT / "configs" / "kuairand_nosequence.yaml")
    assert "clicked_videos" not in {f.name for f in without.features}


def test_with_tasks_drops_conditions_on_removed_tasks():
    cfg = parse_config(small_config()).with_tasks(["like", "watch_time"])
    assert [t.name for t in cfg.tasks] == ["like", "watch_time"]
    assert cfg.tasks[0].condition is None
    assert cfg.model.bias_tower.tasks == []
    assert cfg.training.negative_sampling.task is None  # sampling was on click, which is gone: no sampling
    with pytest.raises(ConfigError, match="'share'"):
        parse_config(small_config()).with_tasks(["share"])


def test_with_tasks_moves_early_stopping_off_a_dropped_task():
    data = small_config()
    data["training"]["early_stopping_metric"] = "click/gauc"
    cfg = parse_config(data)
    assert cfg.with_tasks(["click", "like"]).training.early_stopping_metric == "click/gauc"
    assert cfg.with_tasks(["like"]).training.early_stopping_metric == "like/gauc"
    assert cfg.with_tasks(["watch_time"]).training.early_stopping_metric == "watch_time/ndcg@5"
    assert parse_config(small_config()).with_tasks(["like"]).training.early_stopping_metric == "val_loss"


# -------------------------------------------------------------------------------------------- features/logs


def test_binary_label_with_value_2_names_task_and_value():
    task = TaskSpec(name="click", type="binary", label="is_click")
    df = pd.DataFrame({"is_click": [0, 1, 2, 1]})
    with pytest.raises(ConfigError) as err:
        task_label(df, task)
    msg = str(err.value)
    assert "task 'click'" in msg and "value 2.0 (row 2)" in msg


def test_watch_time_label_is_scaled_and_clipped():
    task = TaskSpec(name="watch_time", type="watch_time", label="ms", scale=0.001, max_value=5.0)
    y = task_label(pd.DataFrame({"ms": [0, 1500, 9000]}), task)
    np.testing.assert_allclose(y, [0.0, 1.5, 5.0])
    with pytest.raises(ConfigError, match="task 'watch_time'.*value -3.0"):
        task_label(pd.DataFrame({"ms": [1.0, -3.0]}), task)


def test_evaluation_labels_keep_real_seconds_above_the_training_cap():
    data = small_config()
    data["tasks"] = [{"name": "click", "type": "binary", "label": "click"},
                     {"name": "watch_time", "type": "watch_time", "label": "ms", "scale": 0.001, "max_value": 5.0}]
    frame = pd.DataFrame({"click": [1, 0, 1], "ms": [0, 1500, 9000]})
    config = parse_config(data)
    np.testing.assert_allclose(task_labels(frame, config.tasks)["watch_time"], [0.0, 1.5, 5.0])
    np.testing.assert_allclose(evaluation_labels(frame, config)["watch_time"], [0.0, 1.5, 9.0])
    np.testing.assert_array_equal(evaluation_labels(frame, config)["click"], [1, 0, 1])


def test_completion_label_expression_clips_and_marks_non_finite_as_nan():
    task = TaskSpec(name="completion", type="completion", label="play / dur")
    y = task_label(pd.DataFrame({"play": [5.0, 30.0, 3.0], "dur": [10.0, 20.0, 0.0]}), task)
    np.testing.assert_allclose(y, [0.5, 1.0, np.nan])


def test_missing_column_names_feature_and_column():
    feature = FeatureSpec(name="author", kind="categorical", column="author_id", vocab={})
    with pytest.raises(ConfigError) as err:
        raw_column(pd.DataFrame({"user_id": [1, 2]}), feature)
    assert "feature 'author'" in str(err.value) and "column 'author_id'" in str(err.value)


@pytest.mark.parametrize("bad", ["abc", "1.5"])
def test_int_categorical_with_non_integer_string_names_the_feature(bad):
    feature = FeatureSpec(name="user", kind="categorical", vocab={})
    with pytest.raises(ConfigError) as err:
        raw_column(pd.DataFrame({"user": ["3", bad, "7"]}), feature)
    assert "feature 'user'" in str(err.value) and repr(bad) in str(err.value)


def test_int_categorical_rejects_fractional_floats():
    feature = FeatureSpec(name="user", kind="categorical", vocab={})
    with pytest.raises(ConfigError, match=r"feature 'user': value 2\.5 is not an integer id"):
        raw_column(pd.DataFrame({"user": [1.0, 2.5]}), feature)


def test_int_categorical_accepts_whole_floats_and_maps_missing_to_minus_one():
    feature = FeatureSpec(name="user", kind="categorical", vocab={})
    out = raw_column(pd.DataFrame({"user": [3.0, np.nan, 12.0]}), feature)
    assert out.dtype == np.int64 and out.tolist() == [3, -1, 12]


def test_string_categorical_from_whole_floats():
    feature = FeatureSpec(name="music", kind="categorical", dtype="string", vocab={})
    out = raw_column(pd.DataFrame({"music": [3.0, np.nan, 12.0]}), feature)
    assert out.tolist() == ["3", "", "12"]


def test_time_split_never_mixes_periods():
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"day": rng.permutation(np.repeat([20220425, 20220426, 20220427, 20220428, 20220429], 7)),
                       "x": np.arange(35)})
    data = small_config()
    data["data"]["time_column"] = "day"
    data["data"]["validation_periods"] = 2
    train, val = time_split(df, parse_config(data))
    assert len(train) + len(val) == len(df)
    assert sorted(train.x.tolist() + val.x.tolist()) == list(range(35))
    assert val.day.min() >= train.day.max()
    assert set(train.day) == {20220425, 20220426, 20220427} and set(val.day) == {20220428, 20220429}


def test_time_split_until_keeps_later_days_out_of_both_sides():
    df = pd.DataFrame({"day": np.repeat([20220425, 20220426, 20220427, 20220428], 3), "x": np.arange(12)})
    data = small_config()
    data["data"]["time_column"] = "day"
    data["data"]["until"] = 20220427
    train, val = time_split(df, parse_config(data))
    assert set(train.day) == {20220425, 20220426} and set(val.day) == {20220427}
    data["data"]["until"] = "yesterday"
    with pytest.raises(ConfigError, match="data.until: 'yesterday'"):
        time_split(df, parse_config(data))


def test_time_split_needs_training_periods():
    df = pd.DataFrame({"day": [1, 1, 2, 2]})
    data = small_config()
    data["data"]["validation_periods"] = 2
    with pytest.raises(ConfigError, match="data.validation_periods: 2"):
        time_split(df, parse_config(data))



def test_cli_config_errors_are_one_line_naming_the_file(tmp_path, capsys):
    from rankstage.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    for path, expected in ((bad, "is not valid YAML"), (listed, "expected a mapping"),
                           (tmp_path / "nope.yaml", "config file not found")):
        assert main(["train", "--config", str(path), "--out", str(tmp_path / "run")]) == 2
        err = capsys.readouterr().err
        assert expected in err and str(path) in err and "Traceback" not in err


def test_pairwise_task_must_be_a_binary_task_and_follows_with_tasks():
    data = small_config()
    data["training"]["pairwise_task"] = "watch_time"
    assert "training.pairwise_task: 'watch_time' is not a binary task" in config_error(data)
    data["training"]["pairwise_task"] = "click"
    cfg = parse_config(data)
    assert cfg.with_tasks(["click"]).training.pairwise_task == "click"
    assert cfg.with_tasks(["like"]).training.pairwise_task is None
