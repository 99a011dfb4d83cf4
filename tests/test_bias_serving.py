"""The bias tower at serving (Zhao et al., RecSys 2019): position is set to *missing*, the device is known.

V devices, P positions, N rows. The served click logit is the main logit plus the tower's logit at (position missing,
request's device). Position dropout trains that cell on a random 10% of the logged rows, whatever their position, so
it learns the examination *averaged over the logged rows*: over the positions the logging policy gave each item.

Which truth "missing" should match therefore depends on the log it was trained on:
- trained on a randomized log (random candidates at uniform positions), the served level is the examination averaged
  over uniform positions: it matches the mean true click probability per device on the simulator's randomized log;
- trained on the simulator's biased log (better items higher), it is the level under that policy, whose placement
  raises the click rate above the randomized log's: it matches the truth on a held-out day of the same policy, and
  overestimates the randomized log (printed, not asserted: a property of the policy, not of the model).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
import tensorflow as tf

from features.logs import raw_inputs
from features.spec import load_config, parse_config
from ranking.layers.bias_tower import MISSING
from ranking.predict import predict
from ranking.runs import LoadedRun, load_run
from ranking.servable import load_servable
from ranking.signatures import input_signature, rank_candidates_signature
from ranking.train import train
from simulation.simulator import SimulationConfig, make_world, simulate_lists

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "simulated.yaml"
SIM = SimulationConfig()
TEST_REQUESTS = 2000  # x P = 12k randomized test impressions


def _train_on(tmp: Path, randomized: bool, rows: int, seed: int) -> tuple[LoadedRun, pd.DataFrame, pd.DataFrame]:
    """configs/simulated.yaml (tower on position x device, 10% position dropout), 4 epochs, on ``rows`` simulated
    impressions of days 0..4 (day 4 validates) -> (run, the held-out day 4, a randomized test log of day 5)."""
    rng = np.random.default_rng(seed)
    world = make_world(SIM, rng)
    n = rows // SIM.positions
    log = simulate_lists(SIM, world, n, rng, randomized=randomized, day=np.sort(rng.integers(0, SIM.days, n)))
    test = simulate_lists(SIM, world, TEST_REQUESTS, rng, randomized=True, day=np.full(TEST_REQUESTS, SIM.days),
                          first_request=n)
    pacsv.write_csv(pa.Table.from_pandas(log, preserve_index=False), tmp / "train.csv")
    data = load_config(CONFIG).model_dump()
    data["data"]["log"] = str(tmp / "train.csv")
    data["training"].update(epochs=4, seed=seed)
    run = load_run(train(parse_config(data, "simulated, 4 epochs"), tmp / "run", verbose=False))
    return run, log[log["day"] == log["day"].max()], test


@pytest.fixture(scope="module")
def randomized_run(tmp_path_factory):
    """Trained on 60k impressions at uniform random positions (about 25 s)."""
    return _train_on(tmp_path_factory.mktemp("randomized"), randomized=True, rows=60_000, seed=0)


@pytest.fixture(scope="module")
def biased_run(tmp_path_factory):
    """Trained on 30k impressions of the simulator's logging policy (about 15 s)."""
    return _train_on(tmp_path_factory.mktemp("biased"), randomized=False, rows=30_000, seed=0)


def served_level(run: LoadedRun, frame: pd.DataFrame) -> pd.DataFrame:
    """Mean served click (position missing), true click probability and observed click per device."""
    served = predict(run.models, raw_inputs(frame, run.config.features))["click"].astype(np.float64)
    level = frame.assign(served=served).groupby("device")[["served", "true_click_prob", "click"]].mean()
    return level.assign(ratio=level["served"] / level["true_click_prob"])


def test_serving_inputs_have_device_and_no_position(biased_run):
    run, _, _ = biased_run
    assert set(run.models.serve.input) == {f.name for f in run.config.model_features} | {"device"}
    device = next(f for f in run.config.serving_features if f.name == "device")
    assert (device.group, device.raw_dtype) == ("context", "string")
    assert "device" in input_signature(run.config) and "position" not in input_signature(run.config)
    assert rank_candidates_signature(run.config)["device"].shape.as_list() == [1]  # sent once per request


def test_exported_signatures_have_device_and_no_position(exported):
    _, version_dir = exported
    signatures = tf.saved_model.load(str(version_dir)).signatures
    assert set(signatures) == {"serving_default", "rank_candidates", "rank_candidates_packed"}
    for name in ("serving_default", "rank_candidates"):
        inputs = signatures[name].structured_input_signature[1]
        assert "device" in inputs and inputs["device"].dtype == tf.string, (name, inputs)
        assert "position" not in inputs, (name, inputs)
    layout = load_servable(version_dir).metadata["signatures"]["rank_candidates_packed"]["packed_inputs"]
    assert "device" in layout["request_string"]  # once per request, a string column of the packed input
    assert "position" not in {n for names in layout.values() for n in names}


def test_served_click_adds_the_tower_at_position_missing_for_the_device(biased_run):
    """By hand: served logit(phone) - served logit(tv) = bias[missing, phone] - bias[missing, tv] on the same rows;
    the tasks without the tower do not depend on the device."""
    run, _, test = biased_run
    rows = test.head(300)
    table = np.asarray(run.models.bias_tower.bias_table())  # (P_idx, V_idx)
    vocab = run.stats["device"].vocabulary
    oov = next(f for f in run.config.features if f.name == "device").vocab.oov_buckets
    a, b = SIM.devices
    pa_, pb_ = (predict(run.models, raw_inputs(rows.assign(device=d), run.config.features)) for d in (a, b))
    logit = lambda p: np.log(p.astype(np.float64) / (1 - p))  # noqa: E731
    want = table[MISSING, oov + vocab.index(a)] - table[MISSING, oov + vocab.index(b)]
    np.testing.assert_allclose(logit(pa_["click"]) - logit(pb_["click"]), want, atol=1e-4)
    # phone's examination decays faster: its missing cell is clearly lower (-0.17 with the custom training loop, whose
    # epochs are seeded permutations with full batches; Keras fit's order gave below -0.2)
    assert want < -0.1, want
    for t in (t.name for t in run.config.tasks if t.name not in run.config.model.bias_tower.tasks):
        np.testing.assert_array_equal(pa_[t], pb_[t], err_msg=t)


def test_served_level_at_position_missing_matches_randomized_truth_per_device(randomized_run):
    """Trained on uniform positions: the mean served click per device on the randomized log within 20% of the mean
    true click probability (examination averaged over uniform positions), and phone / tv within 25% of the truth's.

    The bounds are the seed noise: seeds 0, 1, 2 gave served / truth (phone, tv) 0.98 / 1.15, 0.89 / 0.98,
    0.97 / 0.84 (phone / tv 1.18, 1.10, 1.16). The missing cell sees ~13 rows of a device per batch of 256 and Adam
    moves it ~lr = 0.005 per step, so its last value wanders by ~0.1-0.15 logit; any change of the rows' order (the
    hash buckets per day, the shard files' shuffle) is a new draw. Without the served tower (the device-blind serving
    model before) seed 0 gave 1.23 / 0.82: phone / tv off by 50%, which these bounds fail."""
    run, _, test = randomized_run
    level = served_level(run, test)
    print(f"randomized training log; randomized test log, per device:\n{level}")
    for d in SIM.devices:
        assert level.loc[d, "ratio"] == pytest.approx(1.0, abs=0.2), (d, level)
    assert level["ratio"].max() / level["ratio"].min() < 1.25, level


def test_served_level_at_position_missing_matches_the_policy_on_a_held_out_day(biased_run):
    """Trained on the policy's log: calibrated per device (20%) on the policy's held-out day, whose placement is the
    one the missing cell averaged over, phone / tv within 15% of the truth's; on the randomized log the same model
    serves above the truth (printed). Seeds 0, 1, 2 gave served / truth 0.85 / 0.87, 1.04 / 1.03, 1.03 / 0.94; the
    device-blind serving model before gave 0.94 / 0.76 (seed 0), phone / tv off by 23%."""
    run, held_out, test = biased_run
    level = served_level(run, held_out)
    print(f"biased training log; held-out day of the same policy, per device:\n{level}")
    print(f"the same model on the randomized log, per device:\n{served_level(run, test)}")
    for d in SIM.devices:
        assert level.loc[d, "ratio"] == pytest.approx(1.0, abs=0.20), (d, level)
    assert level["ratio"].max() / level["ratio"].min() < 1.15, level


def test_position_only_tower_serves_its_missing_cell(tmp_path):
    """No device in the spec (e.g. the Open Bandit config): nothing new to serve, and the served logit adds the
    tower's position-missing cell, by hand on an untrained model whose bias table is set."""
    import synthetic

    from features.vocab import build_stats
    from ranking.model import build_models

    log = synthetic.write_log(synthetic.generate_log(2000, synthetic.PlantedTruth(), seed=0), tmp_path / "log.csv")
    data = synthetic.config(log, ["segment"], ["click", "watch_time"], bias_tower=True).model_dump()
    data["features"] = [f for f in data["features"] if f["name"] != "device"]
    data["model"]["bias_tower"]["device"] = None
    config = parse_config(data, "position-only tower")
    x = raw_inputs(pd.read_csv(log).head(50), config.features)
    models = build_models(config, build_stats(x, config.features))
    assert set(models.serve.input) == {"segment"}
    before = {k: np.asarray(v, np.float64) for k, v in models.serve({"segment": tf.constant(x["segment"])}).items()}
    models.bias_tower.bias.assign(np.arange(models.bias_tower.bias.shape[0], dtype=np.float32) - 0.5)  # missing: -0.5
    after = {k: np.asarray(v, np.float64) for k, v in models.serve({"segment": tf.constant(x["segment"])}).items()}
    logit = lambda p: np.log(p / (1 - p))  # noqa: E731
    np.testing.assert_allclose(logit(after["click"]) - logit(before["click"]), -0.5, atol=1e-4)
    np.testing.assert_array_equal(after["watch_time"], before["watch_time"])
