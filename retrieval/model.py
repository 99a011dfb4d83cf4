"""The two-tower model: towers + ``tfrs.tasks.Retrieval`` (in-batch softmax, temperature, logQ, mixed negatives).

B batch, M mixed negatives, I catalog items, E embedding width. (Importing any ``retrieval.*`` module runs
``retrieval/__init__.py`` first, which selects tf-keras.)
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
import tensorflow_recommenders as tfrs

from retrieval.data import Catalog
from retrieval.spec import RetrievalConfig
from retrieval.towers import Tower

PROBABILITY = "_sampling_probability"  # training-row input: the chance its positive item is sampled (logQ)
ITEM = "_item"  # training-row input: the positive's raw item id (accidental-hit removal)


def candidate_sampling_probability(batch_probability: tf.Tensor, mixed_probability: tf.Tensor | None,
                                   num_items: int, batch_size: tf.Tensor) -> tf.Tensor:
    """(B + M,) what logQ subtracts the log of, for the columns of the score matrix.

    With in-batch candidates only: p_j, item j's share of training positives. With M uniform extra negatives,
    the expected number of times j is a column is B·p_j + M/I for every column (in-batch or sampled); divided by B
    (a constant shift, which softmax ignores): p_j + M / (I·B)."""
    probs = batch_probability if mixed_probability is None else tf.concat([batch_probability, mixed_probability], 0)
    if mixed_probability is None:
        return probs
    m = tf.cast(tf.shape(mixed_probability)[0], probs.dtype)
    return probs + m / (num_items * tf.cast(batch_size, probs.dtype))


class TwoTowerModel(tfrs.Model):
    """Query tower and candidate tower trained with ``tfrs.tasks.Retrieval`` on (query, positive item) rows."""

    def __init__(self, query_tower: Tower, candidate_tower: Tower, config: RetrievalConfig, catalog: Catalog,
                 item_probability: np.ndarray):
        super().__init__()
        m = config.model
        self.query_tower, self.candidate_tower = query_tower, candidate_tower
        self.logq, self.mixed = m.logq_correction, m.mixed_negatives
        self.catalog_inputs = {k: tf.constant(v) for k, v in catalog.inputs.items()}
        self.catalog_ids = tf.constant(catalog.ids)
        self.catalog_probability = tf.constant(item_probability, tf.float32)
        self.num_items = len(catalog.ids)
        metrics = None
        if m.factorized_top_k:
            ids = tf.data.Dataset.from_tensor_slices(catalog.ids).batch(4096)
            embeddings = tf.data.Dataset.from_tensor_slices(catalog.inputs).batch(4096).map(candidate_tower)
            candidates = tf.data.Dataset.zip((ids, embeddings))  # scored by id, like candidate_ids in the loss
            metrics = tfrs.metrics.FactorizedTopK(candidates=candidates, ks=(10, 50, 100))
        self.task = tfrs.tasks.Retrieval(metrics=metrics, temperature=m.temperature,
                                         remove_accidental_hits=self.mixed > 0)

    def compute_loss(self, features: dict[str, tf.Tensor], training: bool = False) -> tf.Tensor:
        query = self.query_tower(features)  # (B, E)
        candidates = self.candidate_tower(features)  # (B, E)
        ids = features[ITEM]
        mixed_probability = None
        if self.mixed > 0 and training:
            idx = tf.random.uniform([self.mixed], 0, self.num_items, dtype=tf.int64)
            sampled = {k: tf.gather(v, idx) for k, v in self.catalog_inputs.items()}
            candidates = tf.concat([candidates, self.candidate_tower(sampled)], 0)  # (B + M, E)
            ids = tf.concat([ids, tf.gather(self.catalog_ids, idx)], 0)
            mixed_probability = tf.gather(self.catalog_probability, idx)
        probability = None
        if self.logq:
            probability = candidate_sampling_probability(features[PROBABILITY], mixed_probability, self.num_items,
                                                         tf.shape(query)[0])
        return self.task(query, candidates, candidate_sampling_probability=probability, candidate_ids=ids,
                         compute_metrics=not training)
