"""Task targets and losses (ranking/tasks.py), down-sampling correction (calibration/downsampling.py) and offline
metrics (evaluation/metrics.py): hand-worked values and numpy / scikit-learn references. N rows throughout."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from calibration.downsampling import apply_downsampling, correct_downsampling
from evaluation.metrics import auc, grouped_auc
from features.spec import TaskSpec
from ranking.tasks import (
    ServedValue,
    pairwise_bce_from_logits,
    prepare_targets,
    watch_time_weight_scale,
    weighted_bce_from_logits,
)

CLICK = TaskSpec(name="click", type="binary", label="is_click")
LIKE = TaskSpec(name="like", type="binary", label="is_like", condition="click")
WATCH = TaskSpec(name="watch_time", type="watch_time", label="play_ms", scale=0.001)
COMPLETION = TaskSpec(name="completion", type="completion", label="play_ms / duration_ms")


def bce_reference(y: np.ndarray, w: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Textbook weighted BCE in float64: -w (y log s(z) + (1 - y) log(1 - s(z)))."""
    s = 1.0 / (1.0 + np.exp(-z))
    return -w * (y * np.log(s) + (1.0 - y) * np.log(1.0 - s))


# ------------------------------------------------------------------------------------------------- targets


def test_watch_time_targets_and_weights_by_hand():
    t = np.array([0.0, 1.0, 3.0, 9.5])
    row_weight = np.array([1.0, 1.0, 2.0, 1.0])
    out = prepare_targets(WATCH, t, row_weight, weight_scale=0.25)
    assert out.shape == (4, 2) and out.dtype == np.float32
    np.testing.assert_allclose(out[:, 0], [0.0, 0.5, 0.75, 9.5 / 10.5], rtol=1e-6)  # t / (1 + t)
    np.testing.assert_allclose(out[:, 1], [0.25, 0.5, 2.0, 2.625], rtol=1e-6)  # row weight (1 + t) scale


def test_binary_targets_keep_labels_and_row_weights():
    out = prepare_targets(CLICK, np.array([0.0, 1.0, 1.0]), np.array([1.0, 3.0, 0.5]))
    np.testing.assert_array_equal(out, [[0.0, 1.0], [1.0, 3.0], [1.0, 0.5]])


def test_condition_zeroes_weights_where_the_condition_task_is_not_positive():
    like = np.array([1.0, 0.0, 0.0, 1.0])
    click = np.array([1.0, 1.0, 0.0, 0.0])
    out = prepare_targets(LIKE, like, np.ones(4), condition=click)
    np.testing.assert_array_equal(out[:, 1], [1.0, 1.0, 0.0, 0.0])
    np.testing.assert_array_equal(out[:, 0], like)
    watch = prepare_targets(WATCH, np.array([2.0, 2.0]), np.ones(2), condition=np.array([0.0, 1.0]))
    np.testing.assert_allclose(watch[:, 1], [0.0, 3.0])


def test_nan_labels_get_weight_zero_and_a_finite_target():
    label = np.array([0.5, np.nan, 1.0, np.nan])
    out = prepare_targets(COMPLETION, label, np.full(4, 2.0))
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out[:, 1], [2.0, 0.0, 2.0, 0.0])
    np.testing.assert_array_equal(out[[0, 2], 0], [0.5, 1.0])
    watch = prepare_targets(WATCH, np.array([np.nan, 4.0]), np.ones(2))
    np.testing.assert_allclose(watch, [[0.0, 0.0], [0.8, 5.0]], rtol=1e-6)


def test_watch_time_weight_scale_makes_weights_average_one():
    t = np.array([0.0, 2.0, 7.0, 3.0])
    scale = watch_time_weight_scale(t)
    assert scale == pytest.approx(1.0 / 4.0)  # mean(1 + t) = 4
    assert prepare_targets(WATCH, t, np.ones(4), weight_scale=scale)[:, 1].mean() == pytest.approx(1.0)
    assert watch_time_weight_scale(np.array([])) == 1.0


# -------------------------------------------------------------------------------------------------- losses


def test_weighted_bce_matches_numpy_reference():
    rng = np.random.default_rng(0)
    n = 200
    y = np.where(rng.random(n) < 0.3, rng.random(n), rng.integers(0, 2, n)).astype(np.float64)  # hard and soft
    w = rng.uniform(0, 3, n)
    z = rng.uniform(-8, 8, n)
    loss = np.asarray(weighted_bce_from_logits(np.stack([y, w], 1).astype(np.float32),
                                               z[:, None].astype(np.float32)))
    assert loss.shape == (n,)
    np.testing.assert_allclose(loss, bce_reference(y, w, z), rtol=1e-5, atol=1e-6)


def test_pairwise_loss_by_hand():
    """Lists A = rows 0-2 (labels 1, 0, 0), B = rows 3-4 (labels 1, 0; row 4 weight 0): the pairs are (0, 1) and
    (0, 2) only (B's one pair has a zero-weight row; no pair crosses lists)."""
    y = np.array([1, 0, 0, 1, 0], np.float64)
    w = np.array([1, 1, 1, 1, 0], np.float64)
    g = np.array([7, 7, 7, 9, 9], np.float64)
    z = np.array([0.5, 1.0, -2.0, 3.0, 5.0])
    y_true, y_pred = np.stack([y, w, g], 1).astype(np.float32), z[:, None].astype(np.float32)
    ranknet = (np.log1p(np.exp(-(0.5 - 1.0))) + np.log1p(np.exp(-(0.5 + 2.0)))) / 2
    for lam in (0.0, 0.3, 1.0):
        loss = np.asarray(pairwise_bce_from_logits(lam)(y_true, y_pred))
        np.testing.assert_allclose(loss, bce_reference(y, w, z) + lam * ranknet, rtol=1e-5, atol=1e-6)
    no_pairs = np.stack([np.zeros(5), w, g], 1).astype(np.float32)  # one label everywhere: nothing to order
    np.testing.assert_allclose(np.asarray(pairwise_bce_from_logits(1.0)(no_pairs, y_pred)),
                               bce_reference(np.zeros(5), w, z), rtol=1e-5, atol=1e-6)


def test_softmax_list_loss_by_hand():
    """The same lists as above: A (labels 1, 0, 0) has one positive, B's only positive is row 3 and row 4 has weight
    0, so B is the list {3} alone (loss log 1 = 0). The term is the mean over A and B of -log softmax."""
    y = np.array([1, 0, 0, 1, 0], np.float64)
    w = np.array([1, 1, 1, 1, 0], np.float64)
    g = np.array([7, 7, 7, 9, 9], np.float64)
    z = np.array([0.5, 1.0, -2.0, 3.0, 5.0])
    y_true, y_pred = np.stack([y, w, g], 1).astype(np.float32), z[:, None].astype(np.float32)
    term = (-(0.5 - np.log(np.exp(0.5) + np.exp(1.0) + np.exp(-2.0))) + 0.0) / 2
    loss = np.asarray(pairwise_bce_from_logits(0.5, "softmax")(y_true, y_pred))
    np.testing.assert_allclose(loss, bce_reference(y, w, z) + 0.5 * term, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="'listnet'"):
        pairwise_bce_from_logits(1.0, "listnet")


def test_softmax_list_loss_is_stable_when_lists_are_far_apart():
    """Each list is normalised by its own max: list A's logits 300 below list B's must not underflow to log(1e-30)."""
    y = np.array([1, 0, 1, 0], np.float64)
    w = np.ones(4)
    g = np.array([1, 1, 2, 2], np.float64)
    z = np.array([-300.0, -301.0, 0.0, 1.0])
    y_true, y_pred = np.stack([y, w, g], 1).astype(np.float32), z[:, None].astype(np.float32)
    term = (np.log1p(np.exp(-1.0)) + np.log1p(np.exp(1.0))) / 2
    loss = np.asarray(pairwise_bce_from_logits(1.0, "softmax")(y_true, y_pred))
    np.testing.assert_allclose(loss, bce_reference(y, w, z) + term, rtol=1e-5, atol=1e-4)


def test_weighted_bce_is_stable_for_large_logits():
    y_true = np.array([[1.0, 1.0], [0.0, 1.0], [1.0, 2.0], [0.0, 0.0]], np.float32)
    z = np.array([[100.0], [-100.0], [-100.0], [100.0]], np.float32)
    loss = np.asarray(weighted_bce_from_logits(y_true, z))
    np.testing.assert_allclose(loss, [0.0, 0.0, 200.0, 0.0], atol=1e-5)  # -log s(-100) = 100, times weight 2


def test_watch_time_loss_minimiser_has_odds_equal_to_mean_seconds():
    t = np.array([0.0, 1.0, 4.0, 10.0, 25.0])  # mean 8 seconds
    targets = prepare_targets(WATCH, t, np.ones_like(t))
    z_grid = np.linspace(0.0, 4.0, 4001, dtype=np.float32)  # step 0.001
    y_true = np.tile(targets, (len(z_grid), 1))  # (G * N, 2)
    z = np.repeat(z_grid, len(t))[:, None]  # (G * N, 1)
    total = np.asarray(weighted_bce_from_logits(y_true, z)).reshape(len(z_grid), len(t)).sum(axis=1)
    best = z_grid[np.argmin(total)]
    assert np.exp(best) == pytest.approx(t.mean(), rel=2e-3)


def test_served_value_is_exp_for_watch_time_and_sigmoid_otherwise():
    z = np.array([[-2.0], [0.0], [1.5], [3.0]], np.float32)
    # e^-2, e^0, e^1.5, e^3 seconds; sigmoid: 1 / (1 + e^2), 1/2, 1 / (1 + e^-1.5), 1 / (1 + e^-3)
    np.testing.assert_allclose(ServedValue("watch_time")(z), [0.135335, 1.0, 4.481689, 20.085537], rtol=1e-5)
    for task_type in ("binary", "completion"):
        np.testing.assert_allclose(ServedValue(task_type)(z), [0.119203, 0.5, 0.817574, 0.952574], rtol=1e-5)
    with pytest.raises(ValueError, match="'ctr'"):
        ServedValue("ctr")


def test_huge_watch_time_logit_serves_a_finite_value():
    """exp(z) of float32 overflows from z ~ 88.7: the served value is clipped at MAX_WATCH_SECONDS (1e6 s);
    binary outputs stay sigmoid(z)."""
    z = np.array([[3.0], [13.0], [100.0], [1e30]], np.float32)
    served = np.asarray(ServedValue("watch_time")(z))
    assert np.all(np.isfinite(served))
    np.testing.assert_allclose(served, [20.085537, 442413.39, 1e6, 1e6], rtol=1e-5)  # e^3, e^13, then the ceiling
    np.testing.assert_allclose(np.asarray(ServedValue("binary")(z))[2:], 1.0, rtol=1e-6)


def test_served_value_get_config_round_trip():
    layer = ServedValue("watch_time", name="watch_time_serve")
    clone = ServedValue.from_config(layer.get_config())
    assert clone.task_type == "watch_time" and clone.name == "watch_time_serve"


# ------------------------------------------------------------------------------------------- down-sampling


@pytest.mark.parametrize(("q", "a", "p"), [
    (0.5, 0.1, 0.1 * 0.5 / (0.5 + 0.05)),  # 0.0909...
    (0.2, 0.5, 0.1 / 0.9),
    (0.0, 0.3, 0.0),
    (1.0, 0.3, 1.0),
    (0.37, 1.0, 0.37),
])
def test_correct_downsampling_by_hand(q, a, p):
    assert correct_downsampling(q, a) == pytest.approx(p, rel=1e-12)


def test_correction_multiplies_the_odds_by_the_kept_fraction():
    # keeping a fraction a of the negatives multiplies the odds by 1 / a, so the correction multiplies them by a:
    # q = 0.8 (odds 4) at a = 0.25 -> odds 1 -> p = 0.5
    assert correct_downsampling(0.8, 0.25) == pytest.approx(0.5, rel=1e-12)
    q = np.array([0.5, 0.8, 0.2])
    odds = lambda x: x / (1 - x)  # noqa: E731
    for a in (0.05, 0.3, 0.7):
        np.testing.assert_allclose(odds(correct_downsampling(q, a)), a * odds(q), rtol=1e-12)


def test_correct_is_the_inverse_of_apply_over_a_grid():
    p = np.linspace(0.0, 1.0, 201)
    for a in (0.01, 0.1, 0.25, 0.5, 0.9, 1.0):
        q = apply_downsampling(p, a)
        assert (q >= p - 1e-15).all()  # dropping negatives can only raise the learned probability
        np.testing.assert_allclose(correct_downsampling(q, a), p, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(apply_downsampling(correct_downsampling(p, a), a), p, rtol=1e-12, atol=1e-15)


def test_correct_downsampling_keeps_the_shape():
    q = np.full((2, 3), 0.5)
    assert correct_downsampling(q, 0.5).shape == (2, 3)


@pytest.mark.parametrize("a", [0.0, 1.5, -0.2, float("nan")])
def test_invalid_kept_fraction_is_rejected_naming_the_value(a):
    for fn in (correct_downsampling, apply_downsampling):
        with pytest.raises(ValueError) as err:
            fn(np.array([0.5]), a)
        assert f"got {a!r}" in str(err.value)


# ------------------------------------------------------------------------------------------------- metrics


def test_auc_matches_sklearn_on_random_data_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(5):
        y = (rng.random(300) < 0.3).astype(int)
        score = np.round(rng.normal(size=300) + y, 1)  # rounding makes ties
        assert auc(y, score) == pytest.approx(roc_auc_score(y, score), abs=1e-12)


def test_auc_by_hand_and_with_one_class():
    assert auc(np.array([1, 0, 1, 0]), np.array([0.9, 0.1, 0.3, 0.5])) == pytest.approx(0.75)
    assert auc(np.array([1, 0]), np.array([0.5, 0.5])) == pytest.approx(0.5)
    assert np.isnan(auc(np.array([1, 1]), np.array([0.2, 0.4])))


def test_grouped_auc_by_hand():
    groups = np.array(["a", "b", "a", "c", "d", "b", "a", "d", "c", "d", "d"])
    y = np.array([1, 1, 0, 1, 0, 0, 0, 1, 1, 0, 1])
    score = np.array([0.9, 0.2, 0.5, 0.3, 0.1, 0.1, 0.95, 0.4, 0.6, 0.5, 0.8])
    # a: pos 0.9 vs negs 0.5 (win), 0.95 (loss) -> 0.5 over 3 rows; b: 0.2 > 0.1 -> 1.0 over 2 rows
    # c: positives only -> skipped; d: pos {0.4, 0.8} vs neg {0.1, 0.5} -> 3 of 4 pairs -> 0.75 over 4 rows
    gauc, used = grouped_auc(y, score, groups)
    assert used == 3
    assert gauc == pytest.approx((0.5 * 3 + 1.0 * 2 + 0.75 * 4) / 9)


def test_grouped_auc_without_usable_groups_is_nan():
    gauc, used = grouped_auc(np.array([1, 0]), np.array([0.3, 0.2]), np.array([1, 2]))
    assert used == 0 and np.isnan(gauc)
