"""Click negative down-sampling is undone for every task: the sampled task (click) by the correction
p = a q / ((1 - q) + a q), every other task (like | click, an unconditioned binary long view, watch time) by weighting
the kept click negatives by 1/a in training, uncorrected at serving. Old metadata that corrects several tasks still
serves as it did.

S segments; the only serving feature is the segment, so the served value of a segment is its mean served value.
"""

from __future__ import annotations

import numpy as np
import pytest
import synthetic

from calibration.downsampling import correct_downsampling
from calibration.outputs import correct_outputs
from features.logs import raw_inputs, read_log
from features.spec import parse_config
from features.vocab import build_stats
from ranking.fit import fit
from ranking.predict import predict
from ranking.sampling import initial_logits, sample_negatives, targets

# segments with different click rates, no position effect: ctr is each segment's click rate everywhere
TRUTH = synthetic.PlantedTruth(ctr=(0.1, 0.2, 0.4), watch_mean_s=(5.0, 20.0, 60.0), click_watch_lift=1.5, days=2)
KEEP = 0.3
ROWS = 600_000
LONG_VIEW_S = 5.0  # long_view: watched more than 5 s, a binary task on every impression (no condition)


def long_view_rate(truth: synthetic.PlantedTruth, threshold: float) -> np.ndarray:
    """(S,) planted P(watch seconds > threshold | segment): watch = mean x lift x Exponential(1), lift L on clicks
    and (1 - L p) / (1 - p) otherwise (see ``synthetic``)."""
    p, m, lift = np.asarray(truth.ctr), np.asarray(truth.watch_mean_s), truth.click_watch_lift
    lift0 = (1 - lift * p) / (1 - p)
    return p * np.exp(-threshold / (m * lift)) + (1 - p) * np.exp(-threshold / (m * lift0))


def planted(truth: synthetic.PlantedTruth) -> dict[str, np.ndarray]:
    """Per task the (S,) true served value: click rate, like rate given a click, long-view rate, mean seconds."""
    s = len(truth.segments)
    return {"click": np.asarray(truth.ctr), "like": np.full(s, truth.like_rate),
            "long_view": long_view_rate(truth, LONG_VIEW_S), "watch_time": np.asarray(truth.watch_mean_s)}


def four_task_config(path, keep_fraction: float = KEEP, **kwargs):
    """click (sampled), like | click, long_view (binary, unconditioned), watch_time; segment only."""
    data = synthetic.config(path, ["segment"], ["click", "like", "watch_time"], keep_fraction=keep_fraction,
                            **kwargs).model_dump()
    data["tasks"].insert(2, {"name": "long_view", "type": "binary", "label": f"watch_ms > {1000 * LONG_VIEW_S:g}"})
    return parse_config(data, source="tests/test_downsampling_tasks.py")


@pytest.fixture(scope="module")
def log(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "segments.csv"
    synthetic.write_log(synthetic.generate_log(ROWS, TRUTH, seed=3), path)
    return path, read_log(synthetic.config(path, ["segment"], ["click"]).data)


@pytest.fixture(scope="module")
def trained(log):
    """Batch 4096, lr 5e-4, 8 epochs, no gate dropout: Adam's step noise at the end moves a served value by ~1%
    at most (lr 3e-3 / batch 8192: up to 4%). ~1 minute on 2 cores."""
    path, frame = log
    config = four_task_config(path, epochs=8, batch_size=4096, learning_rate=5e-4, gate_dropout=0.0)
    stats = build_stats(raw_inputs(frame, config.features), config.features)
    models, _, artifacts = fit(config, frame, stats, config.training.epochs, None, None, verbose=False)
    raw = predict(models, {"segment": np.asarray(TRUTH.segments, dtype=object)})
    return config, artifacts, correct_outputs(raw, artifacts.sampling)


def test_only_the_sampled_task_is_corrected(trained):
    _, artifacts, _ = trained
    assert artifacts.sampling["click"] == {"kept_fraction": KEEP, "method": "correct_downsampling"}
    for task in ("like", "long_view", "watch_time"):
        assert artifacts.sampling[task] == {"kept_fraction": 1.0, "method": "importance_weighted",
                                            "negative_weight": pytest.approx(1 / KEEP)}, task


def test_every_task_serves_the_planted_rate_per_segment(trained):
    """Tolerance 2.5% relative for the binary tasks, 3% for watch time. The rows are kept by a keyed hash of the row
    id (``ranking.shards``, the same on every worker and resume); the weighted rates of those kept rows meet the
    planted truth within 1.1% for every task and segment (news long view: -1.06%; the numpy draw used before gave
    -0.86% there and within 0.7% elsewhere; 200k rows per segment:
    >= 20k clicks, >= 36k kept negatives); the rest is the optimiser's noise: ~1% for the binary tasks, up to 1.9%
    for the 60 s segment's watch time (loss weights (1 + t) / a reach hundreds; measured 1.8% here and 1.9% at batch
    8192 / lr 1e-3, while the kept rows' weighted mean is within 0.1%). Before the fix like served 0.15 instead of
    0.30 and long view was 11% low for the least-clicked segment."""
    _, _, served = trained
    truth = planted(TRUTH)
    for task, want in truth.items():
        print(f"{task:>10} per segment {TRUTH.segments}: served {np.round(served[task], 4)}, planted "
              f"{np.round(want, 4)}, relative error {np.round(served[task] / want - 1, 4)}")
    for task, want in truth.items():
        np.testing.assert_allclose(served[task], want, rtol=0.03 if task == "watch_time" else 0.025, err_msg=task)


def test_unconditioned_binary_task_weights_kept_click_negatives():
    """By hand: 4 rows, click negatives kept at 1/2 -> weight 2 for a binary task without condition; click itself
    trains unweighted; like only counts clicked rows (never thinned, weight 1)."""
    config = four_task_config("unused.csv", keep_fraction=0.5)
    kept = {"click": np.array([1.0, 0.0, 1.0, 0.0]), "like": np.array([1.0, 0.0, 0.0, 0.0]),
            "long_view": np.array([1.0, 1.0, 0.0, 0.0]), "watch_time": np.array([30.0, 25.0, 3.0, 1.0])}
    row_weight = np.where(kept["click"] == 0, 2.0, 1.0)
    y = targets(config, kept, row_weight, {"watch_time": 1.0})
    np.testing.assert_array_equal(y["click"][:, 1], [1, 1, 1, 1])
    np.testing.assert_array_equal(y["like"][:, 1], [1, 0, 1, 0])
    np.testing.assert_array_equal(y["long_view"][:, 1], [1, 2, 1, 2])
    # priors: the weighted rates the targets train towards; click at its down-sampled rate (corrected at serving)
    priors = initial_logits(config, kept, row_weight)
    assert priors["click"] == pytest.approx(0.0)  # 2 of 4 kept rows
    assert priors["like"] == pytest.approx(0.0)  # 1 of 2 clicked rows
    assert priors["long_view"] == pytest.approx(np.log((1 + 2) / (1 + 2)))  # weighted 3 of 6
    assert priors["watch_time"] == pytest.approx(np.log((30 + 2 * 25 + 3 + 2 * 1) / 6))


def test_sample_negatives_records_the_configured_fraction_for_the_sampled_task_only():
    config = four_task_config("unused.csv")
    rng = np.random.default_rng(0)
    click = (rng.random(10_000) < 0.2).astype(float)
    labels = {"click": click, "like": click * (rng.random(10_000) < 0.3), "long_view": rng.random(10_000) < 0.4,
              "watch_time": rng.exponential(10.0, 10_000)}
    keep, row_weight, sampling = sample_negatives(labels, config, seed=0)
    assert keep[click == 1].all()
    np.testing.assert_array_equal(row_weight, np.where(click[keep] == 0, 1 / KEEP, 1.0))
    assert sampling["click"] == {"kept_fraction": KEEP, "method": "correct_downsampling"}
    assert {sampling[t]["method"] for t in ("like", "long_view", "watch_time")} == {"importance_weighted"}


def test_old_metadata_correcting_several_tasks_still_serves_as_before():
    """Models exported before this change carry "correct_downsampling" with an effective kept fraction on every
    binary task; serving and replay keep applying it to each of them."""
    old = {"click": {"kept_fraction": 0.3, "method": "correct_downsampling"},
           "like": {"kept_fraction": 0.52, "method": "correct_downsampling"},
           "watch_time": {"kept_fraction": 1.0, "method": "importance_weighted", "negative_weight": 1 / 0.3}}
    raw = {"click": np.array([0.2, 0.5]), "like": np.array([0.4, 0.3]), "watch_time": np.array([12.0, 3.0])}
    out = correct_outputs(raw, old)
    np.testing.assert_allclose(out["click"], correct_downsampling(raw["click"], 0.3))
    np.testing.assert_allclose(out["like"], correct_downsampling(raw["like"], 0.52))
    np.testing.assert_array_equal(out["watch_time"], raw["watch_time"])
