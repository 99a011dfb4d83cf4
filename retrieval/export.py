"""Export a trained run as one version of the retrieval index, published atomically.

``<model_base_path>/<integer version>/`` (TF Serving's layout):

- ``saved_model.pb``, ``variables/``: BruteForce top-K over the catalog, servable by stock TF Serving. Signature
  ``serving_default``: raw query features (B,) and ``history`` (B, H) int64 item ids (-1 padded, most recent first)
  -> ``item_ids`` (B, K) int64 and ``scores`` (B, K) float32, best first. Signature ``exclude_seen``: the same
  inputs plus ``exclude`` (B, S) int64 item ids (-1 padded) -> the top K of the items not in ``exclude`` (it
  retrieves K + S and drops them; where fewer than K remain, the tail is ``item_ids`` -1, ``scores`` -inf).
- ``scann/``: the same signature over a ScaNN index (approximate; needs ScaNN's custom ops registered, which stock
  TF Serving lacks).
- ``assets.extra/item_embeddings.parquet``: ``item_id`` int64 and ``embedding`` list<float32> (E) for other vector
  engines. ``assets.extra/retrieval_metadata.json``: feature spec, training window, test metrics, index settings,
  popular items (the fallback for unknown users). ``assets.extra/query_users.parquet``: per user of the training
  window its user features, ``history`` (the last H positives) and ``seen`` (every distinct positive item of the
  window: what Recommend excludes, as the offline evaluation does).

The version is written under a hidden temporary directory beside the versions and renamed into place.
B queries, K results, I catalog items, E embedding width.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import tensorflow as tf
import tensorflow_recommenders as tfrs

from features.logs import raw_inputs
from features.spec import ConfigError
from ranking.servable import staged_version
from retrieval.data import HISTORY, build_data, history_before
from retrieval.spec import RetrievalConfig
from retrieval.towers import Tower, query_signature
from retrieval.train import Trained, embed, load_run

METADATA_FILE = "retrieval_metadata.json"
EMBEDDINGS_FILE = "item_embeddings.parquet"
USERS_FILE = "query_users.parquet"
SCANN_DIR = "scann"
EXCLUDE = "exclude"  # input of the exclude_seen signature: (B, S) int64 item ids, -1 padded
EXCLUDE_SIGNATURE = "exclude_seen"
SEEN = "seen"  # column of query_users.parquet: every distinct positive item of the user in the training window
POPULAR_ITEMS = 500  # kept in the metadata for the unknown-user fallback


class IndexModule(tf.Module):
    """Holds a top-K layer and serves it under a signature of raw query features; with ``num_items`` (BruteForce
    only: ScaNN's K is fixed at build) also ``serve_excluding``, the top K of the items not in ``exclude``."""

    def __init__(self, index: tf.keras.layers.Layer, config: RetrievalConfig, num_items: int | None = None):
        super().__init__()
        self.index = index
        spec = query_signature(config)
        if EXCLUDE in spec:
            raise ConfigError(f"query_features: the name {EXCLUDE!r} is reserved for the exclude_seen signature")

        @tf.function(input_signature=[spec])
        def serve(inputs: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
            scores, ids = self.index(inputs)  # (B, K), (B, K)
            return {"scores": scores, "item_ids": ids}

        self.serve = serve
        if num_items is None:
            return
        k = min(config.top_k, num_items)

        @tf.function(input_signature=[{**spec, EXCLUDE: tf.TensorSpec([None, None], tf.int64, EXCLUDE)}])
        def serve_excluding(inputs: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
            inputs = dict(inputs)
            exclude = inputs.pop(EXCLUDE)  # (B, S)
            wide = tf.minimum(k + tf.shape(exclude)[1], num_items)
            scores, ids = self.index(inputs, k=wide)  # (B, K + S), (B, K + S)
            dropped = tf.reduce_any(tf.equal(ids[:, :, None], exclude[:, None, :]), axis=-1)  # (B, K + S)
            scores = tf.where(dropped, tf.constant(-np.inf, scores.dtype), scores)
            scores, top = tf.math.top_k(scores, k=k)  # (B, K)
            ids = tf.gather(ids, top, batch_dims=1)
            return {"scores": scores, "item_ids": tf.where(tf.math.is_inf(scores), tf.constant(-1, tf.int64), ids)}

        self.serve_excluding = serve_excluding


def scann_settings(num_items: int, config: RetrievalConfig) -> dict:
    """ScaNN partitioning for ``num_items``: about sqrt(I) leaves, a fraction of them searched, exact re-scoring of
    the best candidates (the config's ``index`` section)."""
    s = config.index
    leaves = s.num_leaves or max(2, int(round(math.sqrt(num_items))))
    return {"num_leaves": leaves, "num_leaves_to_search": max(1, int(math.ceil(leaves * s.leaves_to_search))),
            "num_reordering_candidates": max(s.reordering_candidates, config.top_k)}


def build_indexes(query_tower: Tower, item_embeddings: np.ndarray, item_ids: np.ndarray, config: RetrievalConfig
                  ) -> tuple[tfrs.layers.factorized_top_k.BruteForce, tfrs.layers.factorized_top_k.ScaNN, dict]:
    """(BruteForce, ScaNN, ScaNN settings) over (I, E) embeddings with their raw ids."""
    k = min(config.top_k, len(item_ids))
    emb, ids = tf.constant(item_embeddings), tf.constant(item_ids, tf.int64)
    brute = tfrs.layers.factorized_top_k.BruteForce(query_tower, k=k)
    brute.index(emb, ids)
    settings = scann_settings(len(item_ids), config)
    scann = tfrs.layers.factorized_top_k.ScaNN(query_tower, k=k, **settings)
    scann.index(emb, ids)
    return brute, scann, settings


def popular_items(trained: Trained, item_ids: np.ndarray, n: int = POPULAR_ITEMS) -> list[int]:
    """The ``n`` catalog items with the most training positives, most popular first (ties by id)."""
    order = np.lexsort((item_ids, -trained.item_probability))[:n]
    return [int(i) for i in item_ids[order]]


def export_run(run: str | Path, model_base_path: str | Path, version: int | None = None, verbose: bool = True
               ) -> Path:
    """Export ``run`` as ``<model_base_path>/<version>/`` (next free version by default); returns its path."""
    start = time.time()
    run = Path(run)
    trained = load_run(run)
    config = trained.config
    data = build_data(config)
    catalog = data.catalog
    items = embed(trained.candidate_tower, catalog.inputs)  # (I, E)
    brute, scann, settings = build_indexes(trained.query_tower, items, catalog.ids, config)

    with staged_version(model_base_path, version) as (version, tmp):
        module = IndexModule(brute, config, num_items=len(catalog.ids))
        tf.saved_model.save(module, str(tmp), signatures={
            "serving_default": module.serve.get_concrete_function(),
            EXCLUDE_SIGNATURE: module.serve_excluding.get_concrete_function()})
        scann_module = IndexModule(scann, config)
        tf.saved_model.save(scann_module, str(tmp / SCANN_DIR),
                            signatures={"serving_default": scann_module.serve.get_concrete_function()},
                            options=tf.saved_model.SaveOptions(namespace_whitelist=["Scann"]))
        extra = tmp / "assets.extra"
        extra.mkdir(exist_ok=True)
        write_embeddings(extra / EMBEDDINGS_FILE, catalog.ids, items)
        write_query_users(extra / USERS_FILE, config, data.train_events)
        run_metrics = json.loads((run / "metrics.json").read_text())
        meta = {
            "model_name": config.name, "version": version, "kind": "retrieval_index", "run": str(run),
            "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "feature_spec": config.model_dump(mode="json"),
            "training_window": run_metrics.get("window"), "metrics": run_metrics.get("test"),
            "k": min(config.top_k, len(catalog.ids)), "embedding_dim": int(items.shape[1]),
            "num_items": int(len(catalog.ids)),
            "signature": {"name": "serving_default",
                          "inputs": {k: v.dtype.name for k, v in query_signature(config).items()},
                          "outputs": {"item_ids": "int64 (B, K)", "scores": "float32 (B, K)"},
                          "history": "(B, H) int64 item ids, most recent first, -1 padded"},
            "exclude_signature": {"name": EXCLUDE_SIGNATURE, "input": EXCLUDE,
                                  "exclude": "(B, S) int64 item ids, -1 padded; the top K of the other items "
                                             "(item_ids -1 where fewer than K remain)",
                                  "seen_column": SEEN},
            "indexes": {
                "brute_force": {"path": ".", "exact": True, "needs_custom_ops": [],
                                "servable_by": "stock TensorFlow Serving"},
                "scann": {"path": SCANN_DIR, "exact": False, "needs_custom_ops": ["Scann"],
                          "servable_by": "a process with ScaNN's ops registered (`import scann`); NOT stock "
                                         "TensorFlow Serving", **settings},
            },
            "item_embeddings": f"assets.extra/{EMBEDDINGS_FILE}",
            "query_users": f"assets.extra/{USERS_FILE}",
            "popular_items": popular_items(trained, catalog.ids),
        }
        (extra / METADATA_FILE).write_text(json.dumps(meta, indent=2))
    final = Path(model_base_path) / str(version)
    if verbose:
        print(f"exported {final} ({len(catalog.ids)} items, {time.time() - start:.1f} s)")
    return final


def write_query_users(path: Path, config: RetrievalConfig, train_events) -> None:
    """Parquet, one row per user of the training window: the user id, the query tower's user features (latest
    row), ``history`` list<int64> (the last H positives of the window, most recent first) and ``seen``
    list<int64> (every distinct positive item of the window, ascending: the offline evaluation's exclusions). What
    a server needs to query the index with a user id and a context alone."""
    d = config.data
    last = train_events.sort_values(d.time_column, kind="stable").drop_duplicates(d.user_column, keep="last")
    users = last[d.user_column].to_numpy(np.int64)
    columns = {d.user_column: pa.array(users, pa.int64())}
    for name, values in raw_inputs(last, [f for f in config.query_features if f.group == "user"]).items():
        columns[name] = pa.array(values.tolist() if values.dtype == object else values)
    if config.history.length:
        end = np.full(len(users), np.iinfo(np.int64).max)
        hist = history_before(train_events, d.user_column, d.item_column, d.time_column, users, end,
                              config.history.length)
        columns[HISTORY] = pa.array([row[row >= 0].tolist() for row in hist], pa.list_(pa.int64()))
    seen = train_events.groupby(d.user_column)[d.item_column].unique()
    columns[SEEN] = pa.array([np.sort(np.asarray(seen[u], np.int64)).tolist() for u in users], pa.list_(pa.int64()))
    pq.write_table(pa.table(columns), path)


def write_embeddings(path: Path, ids: np.ndarray, embeddings: np.ndarray) -> None:
    """Parquet: ``item_id`` int64, ``embedding`` fixed-size list<float32>."""
    flat = pa.array(embeddings.astype(np.float32).ravel())
    table = pa.table({"item_id": pa.array(ids, pa.int64()),
                      "embedding": pa.FixedSizeListArray.from_arrays(flat, embeddings.shape[1])})
    pq.write_table(table, path)


def read_embeddings(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(I,) int64 ids and (I, E) float32 embeddings from ``write_embeddings``' file."""
    table = pq.read_table(path)
    emb = table.column("embedding").combine_chunks()
    dim = emb.type.list_size
    return (table.column("item_id").to_numpy(),
            emb.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32))
