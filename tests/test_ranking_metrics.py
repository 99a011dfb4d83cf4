"""Within-user ranking metrics against values worked out by hand: GAUC (users with both outcomes, impression
weighted), NDCG@5 over user-day lists (ties at their expected gain), bootstrap intervals over users / lists, and
paired differences."""

from __future__ import annotations

import numpy as np
import pytest

from evaluation import metrics


def test_gauc_by_hand_excludes_a_user_with_one_outcome():
    # user a: 4 rows, positives scored 0.9 and 0.2, negatives 0.5 and 0.1 -> pairs won 3 of 4 -> 0.75
    # user b: 2 rows, the positive below the negative -> 0.0
    # user c: 3 rows, all negative -> excluded, however it is scored
    y = np.array([1, 0, 1, 0, 1, 0, 0, 0, 0])
    p = np.array([0.9, 0.5, 0.2, 0.1, 0.3, 0.4, 0.99, 0.0, 0.5])
    users = np.array(["a", "a", "a", "a", "b", "b", "c", "c", "c"])
    gauc, used = metrics.grouped_auc(y, p, users)
    assert used == 2
    assert gauc == pytest.approx((0.75 * 4 + 0.0 * 2) / 6)
    aucs, weights = metrics.per_user_auc(y, p, users)
    np.testing.assert_allclose(aucs, [0.75, 0.0])
    np.testing.assert_array_equal(weights, [4, 2])
    # scoring the one-outcome user differently changes nothing
    p2 = p.copy()
    p2[6:] = [-5.0, 7.0, 3.0]
    assert metrics.grouped_auc(y, p2, users)[0] == pytest.approx(gauc)


def test_gauc_groups_by_raw_user_id_and_counts_ties_as_half():
    # ids 10 and 1 must stay apart (no hashing or truncation); ties between a positive and a negative count 1/2
    y = np.array([1, 0, 0, 1, 0])
    p = np.array([0.5, 0.5, 0.1, 0.3, 0.3])
    users = np.array([10, 10, 10, 1, 1])
    # user 10: positive vs (tied, below) -> (0.5 + 1) / 2 = 0.75; user 1: tie -> 0.5
    assert metrics.grouped_auc(y, p, users)[0] == pytest.approx((0.75 * 3 + 0.5 * 2) / 5)
    assert metrics.grouped_auc(y, np.zeros(5), users)[0] == pytest.approx(0.5)


def _dcg(gains):
    return sum(g / np.log2(i + 2) for i, g in enumerate(gains[:5]))


def test_ndcg_at_5_by_hand_over_user_day_lists():
    # user u, day 1: six rows (one list); user u, day 2: four rows (too short); user v, day 1: five rows, no positive
    users = np.array(["u"] * 10 + ["v"] * 5)
    days = np.array([1] * 6 + [2] * 4 + [1] * 5)
    gain = np.array([0, 1, 0, 0, 1, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0], float)
    score = np.array([6, 5, 4, 3, 2, 1, 1, 2, 3, 4, 1, 2, 3, 4, 5], float)
    per_list = metrics.per_list_ndcg(gain, score, users, days)
    # list (u, 1) ranked by score: gains 0 1 0 0 1 | 0 -> DCG 1/log2(3) + 1/log2(6); ideal 1 + 1/log2(3)
    expected = (1 / np.log2(3) + 1 / np.log2(6)) / (1 + 1 / np.log2(3))
    assert len(per_list) == 2  # (u, 2) has 4 rows
    assert per_list[0] == pytest.approx(expected)
    assert np.isnan(per_list[1])  # (v, 1): no positive, left out of the mean
    report = metrics.ranking_report(gain, score, users, days, binary=False)
    assert report["ndcg@5"] == pytest.approx(expected) and report["ndcg@5_lists"] == 1


def test_ndcg_uses_graded_gain():
    # watch time as gain: seconds 30, 0, 10, 0, 5 ranked 2nd, 5th, 1st, 4th, 3rd
    gain = np.array([30, 0, 10, 0, 5], float)
    score = np.array([4, 1, 5, 2, 3], float)
    nd = metrics.per_list_ndcg(gain, score, np.zeros(5), np.zeros(5))
    assert nd[0] == pytest.approx(_dcg([10, 30, 5, 0, 0]) / _dcg([30, 10, 5, 0, 0]))


def test_ndcg_ties_count_at_their_expected_gain():
    # a constant score: every order of the 6 rows equally likely -> expected DCG = mean gain at each position
    gain = np.array([0, 0, 0, 1, 0, 0], float)
    nd = metrics.per_list_ndcg(gain, np.zeros(6), np.zeros(6), np.zeros(6))
    assert nd[0] == pytest.approx(_dcg([1 / 6] * 5))  # ideal DCG is 1
    # a tie at ranks 1-2 between the positive and a negative, the rest clearly below: (1 + 1/log2 3) / 2
    score = np.array([0, 0, 0, 9, 9, 0], float)
    score[[0, 1, 2, 5]] = [1, 2, 3, 4]
    nd = metrics.per_list_ndcg(gain, score, np.zeros(6), np.zeros(6))
    assert nd[0] == pytest.approx((1 + 1 / np.log2(3)) / 2)


def test_paired_differences_equal_independent_sklearn_computations():
    # two different models of the same rows: a knows the labels a little, b is noise rounded to tenths (ties);
    # each difference is recomputed with scikit-learn, GAUC as the impression-weighted mean over users holding
    # both outcomes of per-user roc_auc_score differences, NDCG@5 per user-day list of >= 5 rows with a positive
    from sklearn.metrics import ndcg_score, roc_auc_score

    rng = np.random.default_rng(0)
    n = 600
    users, days = rng.integers(0, 30, n), rng.integers(0, 2, n)
    y = (rng.random(n) < 0.3).astype(float)
    a, b = 0.5 * y + rng.random(n), np.round(rng.random(n), 1)
    d = metrics.paired_report(y, a, b, users, days, binary=True, reps=50)

    assert d["auc"]["difference"] == pytest.approx(roc_auc_score(y, a) - roc_auc_score(y, b), abs=1e-12)
    diff, weight = [], []
    for u in np.unique(users):
        m = users == u
        if 0 < y[m].sum() < m.sum():
            diff.append(roc_auc_score(y[m], a[m]) - roc_auc_score(y[m], b[m]))
            weight.append(m.sum())
    assert d["gauc"]["users"] == len(diff) > 20
    assert d["gauc"]["difference"] == pytest.approx(np.average(diff, weights=weight), abs=1e-12)
    per_list = []
    for u, day in sorted(set(zip(users, days))):
        m = (users == u) & (days == day)
        if m.sum() >= 5 and y[m].any():
            per_list.append(ndcg_score([y[m]], [a[m]], k=5) - ndcg_score([y[m]], [b[m]], k=5))  # ties averaged
    assert d["ndcg@5"]["lists"] == len(per_list) > 20
    assert d["ndcg@5"]["difference"] == pytest.approx(np.mean(per_list), abs=1e-12)
    for name in ("auc", "gauc", "ndcg@5"):
        assert d[name]["difference"] > 0.05, name  # a is the better model by construction
        lo, hi = d[name]["ci95"]
        assert lo < d[name]["difference"] < hi, name
    # swapping the models flips every difference and interval
    r = metrics.paired_report(y, b, a, users, days, binary=True, reps=50)
    for name in ("auc", "gauc", "ndcg@5"):
        assert r[name]["difference"] == pytest.approx(-d[name]["difference"], abs=1e-12), name
        np.testing.assert_allclose(r[name]["ci95"], [-d[name]["ci95"][1], -d[name]["ci95"][0]], atol=1e-12)


def test_paired_difference_resamples_units_jointly():
    # a model that knows the labels against noise: the difference equals the difference of the separate metrics,
    # and its interval excludes 0 although the noise model's own interval is wide
    rng = np.random.default_rng(1)
    n = 2000
    users, days = rng.integers(0, 100, n), rng.integers(0, 2, n)
    y = (rng.random(n) < 0.3).astype(float)
    good, noise = y + rng.random(n), rng.random(n)
    d = metrics.paired_report(y, good, noise, users, days, binary=True, reps=50)
    a = metrics.ranking_report(y, good, users, days, binary=True)
    b = metrics.ranking_report(y, noise, users, days, binary=True)
    assert d["gauc"]["difference"] == pytest.approx(a["gauc"] - b["gauc"])
    assert d["ndcg@5"]["difference"] == pytest.approx(a["ndcg@5"] - b["ndcg@5"])
    assert d["gauc"]["users"] == a["gauc_users"] and d["ndcg@5"]["lists"] == a["ndcg@5_lists"]
    for name in ("auc", "gauc", "ndcg@5"):
        lo, hi = d[name]["ci95"]
        assert 0 < lo <= d[name]["difference"] <= hi, name


def test_interval_over_users_covers_the_estimate_and_shrinks_with_more_users():
    def width(n_users: int) -> float:
        rng = np.random.default_rng(2)
        n = 20 * n_users
        users, y = np.repeat(np.arange(n_users), 20), (rng.random(n) < 0.4).astype(float)
        p = y * 0.3 + rng.random(n)
        r = metrics.ranking_report(y, p, users, np.zeros(n), binary=True)
        lo, hi = r["gauc_ci95"]
        assert lo <= r["gauc"] <= hi
        return hi - lo

    assert width(400) < width(25)


def _with_training(config, **fields):
    return config.model_copy(update={"training": config.training.model_copy(update=fields)})


def test_early_stopping_metric_names_a_task_and_a_metric_its_type_has(tmp_path):
    import synthetic

    from features.spec import ConfigError
    from ranking.judging import early_stopping_monitor

    config = synthetic.config(tmp_path / "log.csv", ["segment"], ["click", "watch_time"])
    assert early_stopping_monitor(config) == ("val_loss", "min")
    assert early_stopping_monitor(_with_training(config, early_stopping_metric="click/gauc")) == \
        ("val_click/gauc", "max")
    assert early_stopping_monitor(_with_training(config, early_stopping_metric="watch_time/ndcg@5"))[1] == "max"
    for bad in ("like/gauc", "watch_time/gauc"):
        with pytest.raises(ConfigError, match=f"training.early_stopping_metric: '{bad}'"):
            early_stopping_monitor(_with_training(config, early_stopping_metric=bad))


def test_early_stopping_on_gauc_keeps_the_epoch_with_the_best_validation_gauc(tmp_path):
    import json

    import synthetic
    from conftest import TRUTH

    from ranking.train import train

    log = synthetic.write_log(synthetic.generate_log(24_000, TRUTH, seed=2), tmp_path / "log.csv")
    config = _with_training(synthetic.config(log, ["segment", "quality"], ["click", "watch_time"], epochs=3,
                                             batch_size=1024), early_stopping_metric="click/gauc")
    run = train(config, tmp_path / "run", verbose=False)
    history = json.loads((run / "history.json").read_text())
    report = json.loads((run / "metrics.json").read_text())
    followed = history["val_click/gauc"]
    assert len(followed) == len(history["loss"])
    assert report["best_epoch"] == int(np.argmax(followed)) + 1
    # the weights kept are the best epoch's: the report's GAUC (of the saved model) is the best one followed
    assert report["tasks"]["click"]["gauc"] == pytest.approx(max(followed), abs=1e-9)
