"""The two-tower loss: in-batch softmax with temperature and logQ, checked against numpy on a tiny batch."""

from __future__ import annotations

import numpy as np
import pytest

from features.vocab import FeatureStats
from retrieval.data import HISTORY, Catalog
from retrieval.spec import parse_retrieval_config


def _config(logq: bool, temperature: float, mixed: int = 0):
    return parse_retrieval_config({
        "data": {"log": "unused.csv", "user_column": "user_id", "item_column": "item_id", "time_column": "t",
                 "items": {"path": "unused.csv", "key": "item_id"}},
        "query_features": [{"name": "user_id", "kind": "categorical", "group": "user", "vocab": {}},
                           {"name": "age", "kind": "numeric", "group": "user"}],
        "candidate_features": [{"name": "item_id", "kind": "categorical", "group": "item", "vocab": {}},
                               {"name": "genres", "kind": "multi_valued", "group": "item", "vocab": {},
                                "separator": " "}],
        "history": {"length": 3, "embedding_dim": 4},
        "model": {"embedding_dim": 8, "feature_dim": 4, "logq_correction": logq, "temperature": temperature,
                  "mixed_negatives": mixed},
    }, "tiny")


STATS = {"user_id": FeatureStats(vocabulary=[1, 2, 3, 4]), "age": FeatureStats(mean=30.0, std=10.0),
         "item_id": FeatureStats(vocabulary=[10, 11, 12, 13, 14]), "genres": FeatureStats(vocabulary=["a", "b"])}
CATALOG = Catalog(np.array([10, 11, 12, 13, 14]),
                  {"item_id": np.array([10, 11, 12, 13, 14]), "genres": np.array(["a", "b", "a b", "", "b"], object)})
PROBABILITY = np.array([0.5, 0.2, 0.15, 0.1, 0.05])
BATCH = {"user_id": np.array([1, 2, 3, 9]), "age": np.array([20.0, np.nan, 40.0, 33.0], np.float32),
         HISTORY: np.array([[11, 12, -1], [-1, -1, -1], [10, -1, -1], [13, 14, 10]]),
         "item_id": np.array([10, 11, 12, 10]), "genres": np.array(["a", "b", "a b", "a"], object)}


def _numpy_loss(q: np.ndarray, c: np.ndarray, temperature: float, probability: np.ndarray | None) -> float:
    """Sum over queries of softmax cross-entropy, positives on the diagonal: what TFRS' Retrieval computes."""
    logits = q @ c.T / temperature
    if probability is not None:
        logits = logits - np.log(probability)[None, :]
    logits = logits - logits.max(1, keepdims=True)
    log_softmax = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    return float(-np.trace(log_softmax))


@pytest.mark.parametrize("temperature", [1.0, 0.2])
def test_logq_changes_loss_as_by_hand(temperature):
    import tensorflow as tf

    from retrieval.model import ITEM, TwoTowerModel
    from retrieval.model import PROBABILITY as PROB_KEY
    from retrieval.towers import build_towers

    tf.keras.utils.set_random_seed(3)
    config = _config(True, temperature)
    query, candidate = build_towers(config, STATS)
    model = TwoTowerModel(query, candidate, config, CATALOG, PROBABILITY)
    feats = {k: tf.constant(v) for k, v in BATCH.items()}
    feats[PROB_KEY] = tf.constant(PROBABILITY[CATALOG.positions(BATCH["item_id"])], tf.float32)
    feats[ITEM] = tf.constant(BATCH["item_id"])
    losses = {}
    for logq in (False, True):  # the same weights, with and without the correction
        model.logq = logq
        losses[logq] = float(model.compute_loss(feats, training=True))
    q, c = query(feats).numpy(), candidate(feats).numpy()
    p = PROBABILITY[CATALOG.positions(BATCH["item_id"])]
    assert losses[False] == pytest.approx(_numpy_loss(q, c, temperature, None), rel=1e-5)
    assert losses[True] == pytest.approx(_numpy_loss(q, c, temperature, p), rel=1e-5)
    assert abs(losses[True] - losses[False]) > 1e-3  # the correction is not a no-op on this batch


def test_mixed_negative_probability_by_hand():
    """Expected count of item j among B in-batch + M uniform columns is B·p_j + M/I; divided by B."""
    import tensorflow as tf

    from retrieval.model import candidate_sampling_probability

    batch = tf.constant([0.5, 0.2], tf.float32)
    mixed = tf.constant([0.05, 0.0, 0.1], tf.float32)
    got = candidate_sampling_probability(batch, mixed, num_items=5, batch_size=tf.constant(2)).numpy()
    np.testing.assert_allclose(got, np.array([0.5, 0.2, 0.05, 0.0, 0.1]) + 3 / (5 * 2), rtol=1e-6)
    np.testing.assert_allclose(candidate_sampling_probability(batch, None, 5, tf.constant(2)).numpy(), [0.5, 0.2])


def test_mixed_negatives_train_step_runs_and_is_finite():
    import tensorflow as tf

    from retrieval.model import ITEM, TwoTowerModel
    from retrieval.model import PROBABILITY as PROB_KEY
    from retrieval.towers import build_towers

    config = _config(True, 0.5, mixed=3)
    query, candidate = build_towers(config, STATS)
    model = TwoTowerModel(query, candidate, config, CATALOG, PROBABILITY)
    feats = {k: tf.constant(v) for k, v in BATCH.items()}
    feats[PROB_KEY] = tf.constant(PROBABILITY[CATALOG.positions(BATCH["item_id"])], tf.float32)
    feats[ITEM] = tf.constant(BATCH["item_id"])
    assert np.isfinite(float(model.compute_loss(feats, training=True)))
