"""Replay (evaluation/lists.py, fusion/replay.py): grouping into lists, NDCG@K and top-K sums worked out by hand on a
tiny log, bootstrap over lists, chunked reading and per-chunk side-table joins equal to ``read_log``."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from evaluation.lists import (
    by_width,
    group_lists,
    list_metrics,
    ndcg_at_k,
    padded_list_metrics,
    paired_difference,
    summarise,
)
from evaluation.scoring import ScoredLog
from features.logs import iter_log_chunks, join_side_tables, load_side_tables, read_log
from features.spec import DataConfig, JoinSpec
from fusion.config import FusionProfile
from fusion.replay import CLICK_ONLY, evaluate

# A tiny log: user 1 on day 1 sees rows 0, 1, 3 (logged order by time: 1, 3, 0); user 2 on day 1 sees rows 2, 4, 5
# (order 4, 2, 5); user 3 on day 1 sees one row (6); user 1 on day 2 sees rows 7, 8.
USER = np.array([1, 1, 2, 1, 2, 2, 3, 1, 1])
DAY = np.array([1, 1, 1, 1, 1, 1, 1, 2, 2])
TIME = np.array([30, 10, 50, 20, 40, 60, 0, 70, 80])
CLICK = np.array([1, 0, 0, 0, 0, 1, 1, 1, 0], dtype=float)
LIKE = np.array([0, 0, 0, 0, 0, 1, 0, 0, 0], dtype=float)
WATCH = np.array([40, 5, 2, 3, 1, 30, 9, 10, 20], dtype=float)
TYPES = {"click": "binary", "like": "binary", "watch_time": "watch_time"}  # the model metadata's task types
P_CLICK = np.array([0.9, 0.1, 0.3, 0.2, 0.1, 0.8, 0.5, 0.4, 0.6])


def _scored() -> ScoredLog:
    return ScoredLog(USER, DAY, TIME, {"click": P_CLICK, "watch_time": WATCH / 2},
                     {"click": CLICK, "like": LIKE, "watch_time": WATCH},
                     {"tasks": ["click", "watch_time"], "task_types": TYPES})


def test_group_lists_orders_by_logged_time_and_drops_short_lists():
    lists = group_lists([USER, DAY], TIME, min_len=2)
    np.testing.assert_array_equal(lists.index, [[1, 3, 0], [7, 8, -1], [4, 2, 5]])  # (user, day) order
    np.testing.assert_array_equal(lists.lengths, [3, 2, 3])
    whole = group_lists([USER], TIME, min_len=3)
    np.testing.assert_array_equal(whole.index, [[1, 3, 0, 7, 8], [4, 2, 5, -1, -1]])


def test_ndcg_by_hand():
    logged = np.array([[0.0, 1.0, 1.0]])
    # logged order, K=2: DCG = 1/log2(3) = 0.6309, IDCG = 1 + 0.6309 -> 0.3869
    assert ndcg_at_k(logged, logged, 2)[0] == pytest.approx(0.63093 / 1.63093, abs=1e-5)
    assert ndcg_at_k(logged[:, ::-1], logged, 2)[0] == pytest.approx(1.0)
    assert np.isnan(ndcg_at_k(np.zeros((1, 3)), np.zeros((1, 3)), 2)[0])  # no positive: undefined


def test_list_metrics_by_hand_logged_order_vs_click_score():
    lists = group_lists([USER, DAY], TIME, min_len=2)
    labels = {"click": CLICK, "watch_time": WATCH}
    logged = list_metrics(lists, None, labels, 2, ["click"], ["watch_time"])
    # list A rows (1, 3, 0) clicks (0, 0, 1): DCG@2 0, NDCG 0; watch top-2 = 5 + 3
    # list B rows (7, 8) clicks (1, 0): NDCG 1; watch 10 + 20
    # list C rows (4, 2, 5) clicks (0, 0, 1): NDCG 0; watch 1 + 2
    np.testing.assert_allclose(logged["click/ndcg@2"], [0, 1, 0])
    np.testing.assert_allclose(logged["watch_time/top@2"], [8, 30, 3])
    by_click = list_metrics(lists, P_CLICK, labels, 2, ["click"], ["watch_time"])
    # A by p: rows 0 (.9), 3 (.2), 1 (.1) -> click first: NDCG 1; watch 40 + 3
    # B: rows 8 (.6), 7 (.4) -> the click second: (1/log2 3) / 1 = 0.6309; watch 20 + 10
    # C: rows 5 (.8), 2 (.3), 4 (.1) -> NDCG 1; watch 30 + 2
    np.testing.assert_allclose(by_click["click/ndcg@2"], [1, 1 / np.log2(3), 1])
    np.testing.assert_allclose(by_click["watch_time/top@2"], [43, 30, 32])


def test_ties_count_at_their_expected_value_not_the_logged_order():
    # the one tie rule (evaluation/lists.py): a constant score ranks every order of a list equally likely, so each
    # position holds the list's mean gain; the logged order (NDCG 0, 1, 0 here) must not leak through a tie
    lists = group_lists([USER, DAY], TIME, min_len=2)
    flat = list_metrics(lists, np.zeros(len(USER)), {"click": CLICK, "watch_time": WATCH}, 2, ["click"],
                        ["watch_time"])
    d2 = 1 + 1 / np.log2(3)  # DCG@2 of a gain of 1 at both positions
    np.testing.assert_allclose(flat["click/ndcg@2"], [d2 / 3, d2 / 2, d2 / 3])  # ideal DCG@2 is 1 in each list
    np.testing.assert_allclose(flat["watch_time/top@2"], [2 * 48 / 3, 30, 2 * 33 / 3])  # 2 x mean watch
    # a partial tie: in list A rows 0 and 3 tie above row 1 -> the click (row 0) is first or second, 1/2 each
    partial = list_metrics(lists, np.array([1, 0, 0, 1, 0, 0, 0, 0, 0.0]), {"click": CLICK}, 2, ["click"], [])
    assert partial["click/ndcg@2"][0] == pytest.approx(d2 / 2)


def test_evaluate_counts_means_and_paired_differences_by_hand():
    result = evaluate(_scored(), {"logged_order": None, "click_only": CLICK_ONLY}, "user_day", 2, 2, reps=200)
    c = result["counts"]
    assert (c["lists"], c["rows"], c["lists_with_like"], c["lists_with_click"]) == (3, 8, 1, 3)
    assert c["mean_length"] == pytest.approx(8 / 3)
    m = result["metrics"]
    assert m["logged_order"]["click/ndcg@2"]["mean"] == pytest.approx(1 / 3)
    assert m["click_only"]["click/ndcg@2"]["mean"] == pytest.approx((2 + 1 / np.log2(3)) / 3)
    assert m["click_only"]["watch_time/top@2"]["mean"] == pytest.approx(35.0)
    # like: only list C has one (row 5); logged puts it 3rd (NDCG@2 = 0), click-only 1st (1); one list counts
    assert m["logged_order"]["like/ndcg@2"] == {"mean": 0.0, "ci95": [0.0, 0.0], "lists": 1}
    d = result["differences"]["logged_order"]["watch_time/top@2"]
    assert d["mean"] == pytest.approx((8 - 43 + 30 - 30 + 3 - 32) / 3)
    lo, hi = d["ci95"]
    assert lo <= d["mean"] <= hi


def test_a_fusion_profile_changes_the_ranking_as_hand_computed():
    watch_first = FusionProfile(formula="weighted_sum", weights={"watch_time": 1.0})
    result = evaluate(_scored(), {"w": watch_first}, "user_day", 2, 1, reps=50, reference=None)
    # top-1 by predicted watch (= logged / 2): A row 0 (40), B row 8 (20), C row 5 (30)
    assert result["metrics"]["w"]["watch_time/top@1"]["mean"] == pytest.approx(30.0)


def test_bootstrap_interval_covers_the_mean_and_shrinks_with_more_lists():
    rng = np.random.default_rng(0)
    small = summarise({"m": rng.normal(1, 1, 100)}, reps=300)["m"]
    large = summarise({"m": rng.normal(1, 1, 10000)}, reps=300)["m"]
    assert small["ci95"][0] < small["mean"] < small["ci95"][1]
    assert (large["ci95"][1] - large["ci95"][0]) < 0.2 * (small["ci95"][1] - small["ci95"][0])
    diff = paired_difference({"m": np.array([1.0, 2.0, np.nan])}, {"m": np.array([0.0, 1.0, 1.0])}, reps=50)
    assert diff["m"]["mean"] == 1.0 and diff["m"]["lists"] == 2


def test_chunked_reading_and_per_chunk_joins_equal_read_log(tmp_path):
    rng = np.random.default_rng(0)
    n = 3000
    log = pd.DataFrame({"user_id": rng.integers(0, 50, n), "video_id": rng.integers(0, 80, n),
                        "date": rng.integers(1, 4, n), "time_ms": np.arange(n), "is_click": rng.integers(0, 2, n)})
    users = pd.DataFrame({"user_id": np.arange(50), "age": rng.integers(-124, 60, 50), "is_click": 0})
    videos = pd.DataFrame({"video_id": np.arange(70), "tag": [f"t{i}" for i in range(70)]})  # 10 ids missing
    for name, df in (("log", log), ("users", users), ("videos", videos)):
        df.to_csv(tmp_path / f"{name}.csv", index=False)
    data = DataConfig(log=str(tmp_path / "log.csv"), time_column="date", user_column="user_id",
                      item_column="video_id", joins=[
                          JoinSpec(path=str(tmp_path / "users.csv"), key="user_id", missing_values=[-124]),
                          JoinSpec(path=str(tmp_path / "videos.csv"), key="video_id")])
    chunks = list(iter_log_chunks(data.log, chunk_mb=0.01))
    assert len(chunks) > 2
    sides = load_side_tables(data)
    streamed = pd.concat([join_side_tables(c, sides) for c in chunks], ignore_index=True)
    pd.testing.assert_frame_equal(streamed, read_log(data), check_dtype=False)


def test_replay_with_the_exported_model_does_not_depend_on_the_chunk_size(tmp_path, exported, synthetic_log):
    from evaluation.scoring import score_log
    from ranking.servable import load_servable

    model, log = load_servable(exported[0]), synthetic_log
    pd.read_csv(log, nrows=400).to_csv(tmp_path / "log.csv", index=False)
    one = score_log(model, tmp_path / "log.csv", verbose=False)
    many = score_log(model, tmp_path / "log.csv", chunk_mb=0.005, verbose=False)
    assert len(one) == len(many) == 400
    for task, p in one.predictions.items():
        assert np.all(np.isfinite(p)), task
        np.testing.assert_allclose(many.predictions[task], p, rtol=1e-5, atol=1e-6)
    result = evaluate(one, {"logged_order": None, "click_only": CLICK_ONLY}, "user_window", 3, 3, reps=50)
    assert result["counts"]["lists"] > 0
    assert np.isfinite(result["metrics"]["click_only"]["click/ndcg@3"]["mean"])


def test_request_lists_and_truth_columns_are_measured_like_watch_time():
    scored = _scored()
    scored.request = np.array([0, 0, 1, 0, 1, 1, 2, 3, 3])  # same lists as user x day
    scored.truth = {"true_utility": np.arange(9.0)}
    result = evaluate(scored, {"click_only": CLICK_ONLY}, "request", 2, 1, reps=50, reference=None)
    # top-1 by predicted click: rows 0, 8, 5 -> utilities 0, 8, 5
    assert result["metrics"]["click_only"]["true_utility/top@1"]["mean"] == pytest.approx(13 / 3)
    assert result["counts"]["lists"] == 3


def _synthetic_scored(lists: int, seed: int) -> ScoredLog:
    """Lists of 8 where predicted click and watch are noisy copies of the labels, and long clicks are rarer."""
    rng = np.random.default_rng(seed)
    n = lists * 8
    click = (rng.uniform(size=n) < 0.4).astype(float)
    watch = rng.exponential(20, n) * (0.3 + click)
    preds = {"click": np.clip(click * 0.4 + rng.uniform(0, 0.6, n), 0, 1),
             "watch_time": watch * rng.lognormal(0, 0.5, n)}
    return ScoredLog(np.repeat(np.arange(lists), 8), np.zeros(n, int), np.tile(np.arange(8), lists), preds,
                     {"click": click, "watch_time": watch}, {"tasks": ["click", "watch_time"], "task_types": TYPES})


def test_fusion_search_is_reproducible_from_its_seed_and_keeps_the_click_constraint():
    from evaluation.lists import list_metrics
    from fusion.tune import search_fusion

    scored = _synthetic_scored(300, seed=0)
    lists = group_lists([scored.user], scored.order, 5)
    runs = [search_fusion(scored, lists, 3, trials=25, seed=7, verbose=False) for _ in range(2)]
    assert runs[0][2] == runs[1][2]  # same tuned profile
    _, best, tuned, floor = runs[0]
    m = list_metrics(lists, tuned.score(scored.predictions), scored.labels, 3, ["click"], ["watch_time"])
    ref = list_metrics(lists, scored.predictions["click"], scored.labels, 3, ["click"], ["watch_time"])
    assert np.nanmean(m["click/ndcg@3"]) >= floor == pytest.approx(0.99 * np.nanmean(ref["click/ndcg@3"]))
    assert best.value == pytest.approx(np.mean(m["watch_time/top@3"]))
    assert best.value > np.mean(ref["watch_time/top@3"])  # watch predictions are informative: the search gains


def test_the_three_ndcg_entry_points_agree_on_ties_with_the_hand_worked_value():
    # evaluation.metrics.per_list_ndcg (training reports), evaluation.lists.list_metrics (replay) and
    # simulation.debias.ndcg_per_list (the debiasing study) once had three tie rules; on one tied input they give
    # one number, the one rule's (tied rows share their mean gain). Rows of users 1 and 2 interleave.
    from evaluation.metrics import per_list_ndcg
    from simulation.debias import ndcg_per_list

    users = np.array([1, 2, 1, 2, 1, 1, 2])
    gain = np.array([3, 0, 0, 2, 1, 0, 1], float)
    score = np.array([1, 5, 2, 5, 2, 0, 5], float)
    # user 1 (rows 0, 2, 4, 5): rows 2 and 4 tie on top (gains 0, 1 -> 1/2 each), then row 0 (3), row 5 (0)
    #   DCG = 1/2 + 1/2 / log2 3 + 3/2; ideal 3 + 1 / log2 3
    # user 2 (rows 1, 3, 6): a constant score -> each position holds the mean gain 1
    #   DCG = 1 + 1 / log2 3 + 1/2; ideal 2 + 1 / log2 3
    l3 = np.log2(3)
    expected = [(2 + 0.5 / l3) / (3 + 1 / l3), (1.5 + 1 / l3) / (2 + 1 / l3)]
    from_metrics = per_list_ndcg(gain, score, users, np.zeros(7), k=4, min_len=3)
    from_lists = list_metrics(group_lists([users], np.arange(7)), score, {"gain": gain}, 4, ["gain"], [])["gain/ndcg@4"]
    from_debias = ndcg_per_list(users, score, gain)
    for name, got in (("per_list_ndcg", from_metrics), ("list_metrics", from_lists), ("ndcg_per_list", from_debias)):
        np.testing.assert_allclose(got, expected, rtol=1e-12, err_msg=name)


def test_metrics_by_list_width_equal_the_metrics_of_all_lists_at_once():
    # lists of 1..120 rows (each class of widths padded to its own longest), scores with ties, a list without a click
    from fusion.replay import make_lists, ndcg_tasks, sum_tasks

    rng = np.random.default_rng(1)
    lengths = np.array([1, 3, 5, 8, 9, 16, 17, 40, 64, 65, 120])
    user = np.repeat(np.arange(len(lengths)), lengths)
    n = len(user)
    click = (rng.random(n) < 0.3).astype(np.float32)
    click[user == 2] = 0
    scored = ScoredLog(user, np.full(n, 20230101), rng.permutation(n),
                       {"click": np.round(rng.random(n), 1).astype(np.float32),
                        "watch_time": rng.exponential(10, n).astype(np.float32)},
                       {"click": click, "watch_time": rng.exponential(10, n).astype(np.float32)},
                       {"task_types": {"click": "binary", "watch_time": "watch_time"}})
    lists = make_lists(scored, "user_day", 1)
    assert [len(part.lengths) for _, part in by_width(lists)] == [1, 1, 2, 2, 1, 2, 2]  # widths 1, 4, ..., 128
    assert [part.index.shape[1] for _, part in by_width(lists)] == [1, 3, 8, 16, 17, 64, 120]
    for profile in (None, FusionProfile(formula="weighted_sum", weights={"click": 1.0}),
                    FusionProfile(formula="weighted_sum", weights={"click": 1.0, "watch_time": 0.05})):
        score = None if profile is None else profile.score(scored.predictions)
        args = (scored.labels, 5, ndcg_tasks(scored), sum_tasks(scored))
        want = padded_list_metrics(lists, score, *args)
        got = list_metrics(lists, score, *args)
        assert set(got) == set(want)
        for name, v in want.items():
            # NaN where undefined; an ulp apart at most (the DCG's matrix-vector product rounds by shape)
            np.testing.assert_allclose(got[name], v, rtol=1e-14, atol=0, err_msg=name)
    assert np.isnan(got["click/ndcg@5"][2])
