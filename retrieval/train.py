"""Train the two-tower model on a config's training window; save and reload a run; embed queries and the catalog.

A run directory holds ``config.json`` (the validated spec), ``stats.json`` (vocabularies, numeric statistics),
``checkpoint/`` (tower weights), ``item_probability.npy`` (logQ) and ``metrics.json`` (test metrics, window).
Q queries, I catalog items, E embedding width.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

from features.logs import raw_inputs
from features.vocab import FeatureStats, build_stats, load_stats, save_stats
from retrieval.data import HISTORY, Catalog, Queries, RetrievalData, build_data, item_sampling_probability
from retrieval.evaluate import embedding_scores, evaluate_scores, summarize
from retrieval.model import ITEM, PROBABILITY, TwoTowerModel
from retrieval.spec import RetrievalConfig, parse_retrieval_config
from retrieval.towers import Tower, build_towers


@dataclass
class Trained:
    config: RetrievalConfig
    stats: dict[str, FeatureStats]
    query_tower: Tower
    candidate_tower: Tower
    item_probability: np.ndarray  # (I,) over the catalog


def feature_stats(config: RetrievalConfig, data: RetrievalData) -> dict[str, FeatureStats]:
    """Vocabularies and numeric statistics from the training window only."""
    stats = build_stats(data.train.inputs, config.query_features)
    stats.update(build_stats(raw_inputs(data.train_events, config.candidate_features), config.candidate_features))
    return stats


def training_rows(config: RetrievalConfig, data: RetrievalData, item_probability: np.ndarray
                  ) -> dict[str, np.ndarray]:
    """Inputs of both towers per training positive, plus its item's sampling probability and raw id."""
    rows = dict(data.train.inputs)
    rows.update(raw_inputs(data.train_events, config.candidate_features))
    rows[PROBABILITY] = item_probability[data.catalog.positions(data.train.items)].astype(np.float32)
    rows[ITEM] = data.train.items
    if config.history.length == 0:
        rows.pop(HISTORY)
    return rows


def monitoring_rows(config: RetrievalConfig, data: RetrievalData, item_probability: np.ndarray
                    ) -> dict[str, np.ndarray]:
    """Rows for the FactorizedTopK monitor: each test query with its first held-out positive. Never used to choose
    anything (that would select on the test split)."""
    items = np.array([t[0] for t in data.test.targets], np.int64)
    pos = data.catalog.positions(items)
    rows = query_inputs(config, data.test)
    rows.update({k: v[pos] for k, v in data.catalog.inputs.items()})
    rows[PROBABILITY] = item_probability[pos].astype(np.float32)
    rows[ITEM] = items
    return rows


def fit(config: RetrievalConfig, data: RetrievalData, verbose: int = 0) -> Trained:
    """Build towers from training statistics and fit ``training.epochs`` epochs of in-batch softmax."""
    t = config.training
    tf.keras.utils.set_random_seed(t.seed)
    stats = feature_stats(config, data)
    probability = item_sampling_probability(data.train.items, data.catalog)
    query, candidate = build_towers(config, stats)
    model = TwoTowerModel(query, candidate, config, data.catalog, probability)
    opt = {"adagrad": tf.keras.optimizers.Adagrad, "adam": tf.keras.optimizers.Adam}[t.optimizer]
    model.compile(optimizer=opt(learning_rate=t.learning_rate))
    rows = training_rows(config, data, probability)
    ds = (tf.data.Dataset.from_tensor_slices(rows).shuffle(len(data.train.items), seed=t.seed)
          .batch(t.batch_size, drop_remainder=True).prefetch(2))
    validation = None
    if config.model.factorized_top_k:  # monitoring only: FactorizedTopK over the whole catalog per epoch
        validation = tf.data.Dataset.from_tensor_slices(monitoring_rows(config, data, probability)).batch(
            t.batch_size)
    model.fit(ds, epochs=t.epochs, verbose=verbose, validation_data=validation)
    return Trained(config, stats, query, candidate, probability)


def embed(tower: Tower, inputs: dict[str, np.ndarray], batch: int = 4096) -> np.ndarray:
    """(N,) raw inputs per feature -> (N, E) float32 embeddings."""
    n = len(next(iter(inputs.values())))
    out = [tower({k: tf.constant(v[i:i + batch]) for k, v in inputs.items()}).numpy() for i in range(0, n, batch)]
    return np.concatenate(out).astype(np.float32)


def query_inputs(config: RetrievalConfig, queries: Queries) -> dict[str, np.ndarray]:
    keep = [f.name for f in config.query_features] + ([HISTORY] if config.history.length else [])
    return {k: queries.inputs[k] for k in keep}


def evaluate_trained(trained: Trained, data: RetrievalData, bootstrap: int = 0) -> dict[str, dict]:
    """Test metrics of a trained model through the shared evaluator."""
    q = embed(trained.query_tower, query_inputs(trained.config, data.test))
    items = embed(trained.candidate_tower, data.catalog.inputs)
    return summarize(evaluate_scores(embedding_scores(q, items), data.test, data.catalog), bootstrap)


def save_run(trained: Trained, out: str | Path, metrics: dict) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(trained.config.model_dump(mode="json"), indent=2))
    save_stats(trained.stats, out / "stats.json")
    np.save(out / "item_probability.npy", trained.item_probability)
    tf.train.Checkpoint(query=trained.query_tower, candidate=trained.candidate_tower).write(
        str(out / "checkpoint" / "towers"))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return out


def load_run(run: str | Path, catalog: Catalog | None = None) -> Trained:
    """Rebuild the towers of a run from its config and statistics and restore their weights."""
    run = Path(run)
    config = parse_retrieval_config(json.loads((run / "config.json").read_text()), str(run / "config.json"))
    stats = load_stats(run / "stats.json")
    query, candidate = build_towers(config, stats)
    tf.train.Checkpoint(query=query, candidate=candidate).read(str(run / "checkpoint" / "towers")).expect_partial()
    return Trained(config, stats, query, candidate, np.load(run / "item_probability.npy"))


def train(config: RetrievalConfig, out: str | Path, verbose: int = 2, bootstrap: int = 0) -> tuple[Path, dict]:
    """Build the data, fit, evaluate on the test split, save the run. Returns (run dir, metrics)."""
    start = time.time()
    data = build_data(config)
    trained = fit(config, data, verbose)
    metrics = {"test": evaluate_trained(trained, data, bootstrap), "window": data.window,
               "train_seconds": round(time.time() - start, 1)}
    return save_run(trained, out, metrics), metrics
