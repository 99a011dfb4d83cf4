"""Fusion formulas (fusion/formulas.py) and the fusion config (fusion/config.py): hand-worked values, monotonicity
on random grids, and bad configs rejected with errors naming the field. C candidates."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from features.spec import ConfigError, load_config
from fusion.config import dump_fusion_config, load_fusion_config, parse_fusion_config
from fusion.formulas import click_multiplier, fuse, weighted_product, weighted_sum

ROOT = Path(__file__).resolve().parents[1]
TASKS = [t.name for t in load_config(ROOT / "configs" / "kuairand.yaml").tasks]  # the spec says which exist
TERMS = {"click": np.array([0.5, 0.2]), "like": np.array([0.1, 0.5]), "watch_time": np.array([10.0, 30.0])}


def test_weighted_sum_by_hand():
    # 2 * 0.5 + 0.1 * 10 = 2.0 ; 2 * 0.2 + 0.1 * 30 = 3.4
    np.testing.assert_allclose(weighted_sum(TERMS, {"click": 2.0, "watch_time": 0.1}), [2.0, 3.4])


def test_click_multiplier_by_hand():
    # 0.5 * (1 + 2 * 0.1) = 0.6 ; 0.2 * (1 + 2 * 0.5) = 0.4
    np.testing.assert_allclose(click_multiplier(TERMS, {"like": 2.0}), [0.6, 0.4])


def test_weighted_product_by_hand():
    # (1 + 0.5)^1 * (1 + 0.1 * 10)^2 = 1.5 * 4 = 6 ; (1 + 0.2) * (1 + 3)^2 = 19.2
    got = weighted_product(TERMS, {"click": 1.0, "watch_time": 0.1}, {"watch_time": 2.0})
    np.testing.assert_allclose(got, [6.0, 19.2])


def test_weighted_product_default_exponent_is_one_and_negative_exponent_penalises():
    np.testing.assert_allclose(weighted_product(TERMS, {"like": 1.0}), [1.1, 1.5])
    np.testing.assert_allclose(weighted_product(TERMS, {"like": 1.0}, {"like": -1.0}), [1 / 1.1, 1 / 1.5])


def test_fuse_dispatches_and_rejects_unknown_formula_and_missing_terms():
    np.testing.assert_allclose(fuse(TERMS, "weighted_sum", {"like": 1.0}), TERMS["like"])
    with pytest.raises(ValueError, match="'weighted_max'"):
        fuse(TERMS, "weighted_max", {"like": 1.0})
    with pytest.raises(KeyError, match="'share'"):
        fuse(TERMS, "weighted_sum", {"share": 1.0})


@pytest.mark.parametrize("formula", ["weighted_sum", "click_multiplier", "weighted_product"])
def test_raising_one_probability_never_lowers_a_score_with_positive_weights(formula):
    rng = np.random.default_rng(0)
    tasks = ["click", "like", "long_view", "completion", "watch_time"]
    for _ in range(50):
        c = 200
        terms = {t: rng.uniform(0, 1, c) for t in tasks}
        terms["watch_time"] = rng.exponential(30, c)
        weights = {t: float(rng.uniform(0.01, 5)) for t in tasks}
        weights["watch_time"] = float(rng.uniform(1e-3, 0.2))
        exponents = {t: float(rng.uniform(0.01, 3)) for t in tasks} if formula == "weighted_product" else None
        base = fuse(terms, formula, weights, exponents)
        for t in tasks:
            raised = dict(terms)
            raised[t] = terms[t] + rng.uniform(0, 1, c) * (100 if t == "watch_time" else 1 - terms[t])
            assert np.all(fuse(raised, formula, weights, exponents) >= base - 1e-12 * np.abs(base)), (formula, t)


@pytest.mark.parametrize("name", ["fusion.yaml", "fusion_tuned.yaml"])
def test_shipped_fusion_config_loads_and_profiles_score(name):
    config = load_fusion_config(ROOT / "configs" / name, TASKS)
    assert config.version and config.default_profile in config.profiles
    terms = {t: np.array([0.3, 0.6]) for t in ("click", "like", "long_view", "completion")}
    terms["watch_time"] = np.array([5.0, 50.0])
    for name, profile in config.profiles.items():
        s = profile.score(terms)
        assert s.shape == (2,) and np.all(np.isfinite(s)), name
        assert s[1] > s[0], name  # candidate 2 is better on every term


def test_config_round_trips_through_yaml(tmp_path):
    config = load_fusion_config(ROOT / "configs" / "fusion.yaml", TASKS)
    (tmp_path / "f.yaml").write_text(dump_fusion_config(config))
    assert load_fusion_config(tmp_path / "f.yaml", TASKS) == config


def _profile(**changes):
    p = {"formula": "weighted_product", "weights": {"click": 1.0, "watch_time": 0.05}}
    p.update(changes)
    return {"version": "v1", "profiles": {"feed": p}}


@pytest.mark.parametrize("data, field, value", [
    (_profile(weights={"clik": 1.0}), "profiles.feed.weights.clik", "unknown task 'clik'"),
    (_profile(formula="weighted_max"), "profiles.feed.formula", "got 'weighted_max'"),
    (_profile(weights={"click": float("nan")}), "profiles.feed.weights.click", "got nan"),
    (_profile(exponents={"click": float("inf")}), "profiles.feed.exponents.click", "got inf"),
    (_profile(weights={"click": "lots"}), "profiles.feed.weights.click", "got 'lots'"),
    (_profile(weights={"click": -1.0}), "profiles.feed.weights.click", "got -1.0"),
    (_profile(formula="weighted_sum", exponents={"click": 2.0}), "profiles.feed.exponents", "weighted_sum"),
    (_profile(exponents={"like": 2.0}), "profiles.feed.exponents.like", "no weight"),
    (_profile(weights={}), "profiles.feed.weights", "at least 1"),
    (_profile(colour="red"), "profiles.feed.colour", "Extra inputs"),
    ({"profiles": {}}, "version", "Field required"),
    ({**_profile(), "default_profile": "main"}, "default_profile", "'main' is not a profile"),
])
def test_bad_configs_are_rejected_naming_field_and_value(data, field, value):
    with pytest.raises(ConfigError) as err:
        parse_fusion_config(data, "f.yaml", TASKS)
    msg = str(err.value)
    assert "f.yaml" in msg and f"{field}:" in msg and value in msg, msg


def test_task_names_are_checked_against_the_models_tasks_and_files_name_their_path(tmp_path):
    with pytest.raises(ConfigError, match="unknown task 'watch_time' \\(known: click, like\\)"):
        parse_fusion_config(_profile(), "f.yaml", tasks=("click", "like"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nprofiles: [")
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML"):
        load_fusion_config(bad, TASKS)
    with pytest.raises(ConfigError, match="not found"):
        load_fusion_config(tmp_path / "absent.yaml", TASKS)
    config = parse_fusion_config(_profile(), "f.yaml", TASKS)
    with pytest.raises(ConfigError, match="--profile: 'tab2'"):
        config.profile("tab2")
