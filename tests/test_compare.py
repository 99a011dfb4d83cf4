"""The model comparison: every variant judged on the same rows, and paired differences that agree with the
separate metrics; runs trained before predictions were saved are rescored from their weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import synthetic
from conftest import TRUTH

from evaluation import metrics
from features.spec import load_config
from ranking.compare import compare, compare_runs, paired_differences
from ranking.judging import load_judged
from ranking.runs import PREDICTIONS


def test_paired_difference_by_hand():
    y = np.array([0, 0, 1, 1, 0, 1, 0, 1], float)
    perfect, reversed_ = y + 0.1 * np.arange(8), -y
    # one misordered pair: the positive at row 2 (1.2) drops just below the top negative (row 6, 0.6), above the
    # others -> 15 of 16 pairs ordered, AUC 15/16 against 1
    one_swap = perfect.copy()
    one_swap[2] = perfect[6] - 0.05
    d = metrics.paired_difference(metrics.auc, y, perfect, one_swap, reps=200)
    assert d["difference"] == pytest.approx(1 / 16)
    lo, hi = d["ci95"]
    assert 0 <= lo <= d["difference"] <= hi  # the swap can only lose: no resample favours one_swap
    assert metrics.paired_difference(metrics.auc, y, one_swap, perfect, reps=200)["difference"] == \
        pytest.approx(-1 / 16)
    d = metrics.paired_difference(metrics.auc, y, perfect, reversed_, reps=200)
    assert d["difference"] == pytest.approx(1.0)
    assert d["ci95"][0] > 0.9  # every resample holding both classes: AUC 1 vs 0


def test_paired_differences_are_the_base_minus_each_model_known_worse_by_construction(tmp_path):
    # three models of the same validation rows: the base sees the labels through a little noise, "noisy" through
    # more, "blind" not at all; every paired difference (base minus other) equals scikit-learn's and is positive
    from sklearn.metrics import roc_auc_score

    config = synthetic.config(tmp_path / "log.csv", ["segment"], ["click", "watch_time"])
    rng = np.random.default_rng(3)
    n = 3000
    users, days = rng.integers(0, 150, n), rng.integers(0, 2, n)
    click = (rng.random(n) < 0.3).astype(float)
    watch = rng.exponential(10.0, n)
    noise = rng.random((3, n))

    def judged(sharpness: float) -> dict:
        return {"click": (click, sharpness * click + noise[0], users, days),
                "watch_time": (watch, sharpness * np.log1p(watch) + noise[1], users, days)}

    paired = paired_differences(config, {"base": judged(2.0), "noisy": judged(0.3), "blind": judged(0.0)}, "base")
    assert set(paired) == {"noisy", "blind"}
    for other, sharpness in (("noisy", 0.3), ("blind", 0.0)):
        p_click = sharpness * click + noise[0]
        assert paired[other]["click"]["auc"]["difference"] == pytest.approx(
            roc_auc_score(click, 2.0 * click + noise[0]) - roc_auc_score(click, p_click), abs=1e-12)
        for task, names in (("click", ("auc", "gauc", "ndcg@5")), ("watch_time", ("spearman", "ndcg@5"))):
            assert set(paired[other][task]) == set(names)
            for name in names:
                d = paired[other][task][name]
                assert d["ci95"][0] > 0, (other, task, name)  # the base is better, beyond resampling noise
    # the blinder model loses more
    for task, name in (("click", "gauc"), ("watch_time", "spearman"), ("watch_time", "ndcg@5")):
        assert paired["blind"][task][name]["difference"] > paired["noisy"][task][name]["difference"], (task, name)
    with pytest.raises(ValueError, match="'click': base and other were judged on different rows"):
        other = judged(1.0)
        other["click"] = (click[::-1], *other["click"][1:])
        paired_differences(config, {"base": judged(2.0), "other": other}, "base")


@pytest.fixture(scope="module")
def small_compare(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    log = synthetic.write_log(synthetic.generate_log(24_000, TRUTH, seed=1), root / "log.csv")
    config = synthetic.config(log, ["segment", "quality"], ["click", "watch_time"], epochs=1, batch_size=1024)
    out = root / "report"
    return config, out, compare(config, out)


def test_compare_judges_every_model_on_the_same_rows(small_compare):
    config, out, results = small_compare
    assert set(results) == {"mmoe", "shared_bottom", "ple", "plain_mmoe", "single_task", "lightgbm"}
    runs = {"mmoe": "mmoe", "shared_bottom": "shared_bottom", "ple": "ple", "lightgbm": "lightgbm",
            "single_click": "single_click", "plain_mmoe": "plain_mmoe"}
    judged = {name: load_judged(out / "runs" / d / PREDICTIONS) for name, d in runs.items()}
    y_click = judged["mmoe"]["click"][0]
    assert len(y_click) > 1000
    for name, j in judged.items():
        assert np.array_equal(j["click"][0], y_click), name
    assert set(judged["single_click"]) == {"click"}
    gbdt = json.loads((out / "runs" / "lightgbm" / "metrics.json").read_text())
    assert set(gbdt["num_trees"]) == {"click", "watch_time"}
    assert all(1 <= n < gbdt["max_trees"] for n in gbdt["num_trees"].values())  # stopped on the validation day


def test_paired_differences_agree_with_the_separate_metrics(small_compare):
    config, out, results = small_compare
    report = json.loads((out / "compare.json").read_text())
    paired = report["paired_vs_mmoe"]
    assert set(paired) == {"shared_bottom", "ple", "plain_mmoe", "single_task", "lightgbm"}
    assert load_config(out / "runs" / "ple" / "config.yaml").model.ple is not None
    metrics_of = {"click": ("auc", "gauc", "ndcg@5"), "watch_time": ("spearman", "ndcg@5")}
    for other in paired:
        for task, names in metrics_of.items():
            assert set(paired[other][task]) == set(names), (other, task)
            for name in names:
                d = paired[other][task][name]
                assert d["difference"] == pytest.approx(results["mmoe"][task][name] - results[other][task][name],
                                                        abs=1e-9), (other, task, name)
                lo, hi = d["ci95"]
                assert lo <= d["difference"] <= hi
    table = (out / "compare.md").read_text()
    assert "mmoe − lightgbm" in table
    for row in ("| click | AUC |", "| click | GAUC |", "| click | NDCG@5 |", "| watch_time | Spearman |",
                "| watch_time | NDCG@5 |"):
        assert table.count(row) == 2, row  # in the metrics table and in the paired differences


def test_the_plain_peer_is_deepctrs_mmoe_on_the_same_inputs(kuairand_config):
    """DeepCTR's MMOE defaults on the default config: no statistics, history lists or bias features; every
    categorical a 16-d embedding; 4 experts of 256-128, towers of 64, no shared bottom; 2 epochs at batch 512."""
    from ranking.compare import plain_mmoe

    plain = plain_mmoe(kuairand_config)
    assert plain.data.statistics is None and plain.data.history is None
    kept = {f.name for f in kuairand_config.features if not f.name.startswith("stat_") and f.kind != "match"}
    assert {f.name for f in plain.features} == kept and len(kept) < len(kuairand_config.features)
    assert {f.embedding_dim for f in plain.features if f.kind in ("categorical", "multi_valued")} == {16}
    m, tr = plain.model, plain.training
    assert (m.bottom_units, m.num_experts, m.expert_units, m.tower_units, m.gate_dropout) == ([], 4, [256, 128], [64],
                                                                                             0.0)
    assert not m.bias_tower.tasks and (tr.epochs, tr.batch_size, tr.learning_rate) == (2, 512, 1e-3)
    assert {t.loss_weight for t in plain.tasks} == {1.0}
    assert [t.name for t in plain.tasks] == [t.name for t in kuairand_config.tasks]


def test_a_run_without_saved_predictions_is_rescored_from_its_weights(small_compare):
    config, out, _ = small_compare
    path = out / "runs" / "mmoe" / PREDICTIONS
    before = load_judged(path)
    weights = out / "runs" / "mmoe" / "model.weights.h5"
    trained_at = weights.stat().st_mtime_ns
    path.unlink()
    compare(config, out, single_task=False, gbdt=False, plain=False)
    assert weights.stat().st_mtime_ns == trained_at  # the finished run was reused, not trained again
    after = load_judged(path)
    for task, (y, p, u, d) in before.items():
        assert np.array_equal(after[task][0], y) and np.array_equal(after[task][2], u)
        assert np.array_equal(after[task][3], d)
        np.testing.assert_allclose(after[task][1], p, rtol=1e-5, atol=1e-6)


def test_compare_runs_pairs_finished_runs_against_the_first(small_compare, tmp_path):
    config, out, results = small_compare
    report = compare_runs({"a": out / "runs" / "mmoe", "b": out / "runs" / "shared_bottom"}, tmp_path)
    paired = json.loads((tmp_path / "compare.json").read_text())["paired_vs_a"]
    d = paired["b"]["click"]["gauc"]["difference"]
    assert d == pytest.approx(results["mmoe"]["click"]["gauc"] - results["shared_bottom"]["click"]["gauc"], abs=1e-9)
    assert "a − b" in report and report == (tmp_path / "compare.md").read_text()
