"""Query and candidate towers on tf-keras (TFRS): raw serving values in, one embedding out.

B batch, H history length, L values of a multi-valued row, D feature width, E output embedding width.
Lookups and string splitting are TF ops, so exported SavedModels need no Python and no project code.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from features.spec import ConfigError, FeatureSpec
from features.vocab import FeatureStats
from retrieval.data import HISTORY
from retrieval.spec import RetrievalConfig

TF_DTYPES = {"int": tf.int64, "string": tf.string, "float": tf.float32}


def _lookup(feature: FeatureSpec, stats: FeatureStats) -> tuple[tf.keras.layers.Layer, int]:
    """Raw id -> index in [0, size): OOV buckets first, then the vocabulary; or a hash bucket."""
    if feature.hash_bins is not None:
        return tf.keras.layers.Hashing(feature.hash_bins), feature.hash_bins
    assert feature.vocab is not None
    if not stats.vocabulary:
        raise ConfigError(f"feature {feature.name!r}: empty vocabulary (no value seen >= vocab.min_count="
                          f"{feature.vocab.min_count} times in the training log)")
    cls = tf.keras.layers.IntegerLookup if feature.raw_dtype == "int" else tf.keras.layers.StringLookup
    layer = cls(vocabulary=np.asarray(stats.vocabulary), num_oov_indices=feature.vocab.oov_buckets, mask_token=None)
    return layer, len(stats.vocabulary) + feature.vocab.oov_buckets


class FeatureEncoder(tf.keras.layers.Layer):
    """One raw input (B,) -> (B, D): embedding of a categorical / bucketized value, mean of a multi-valued row's
    embeddings, or a standardised numeric (NaN -> default, optional log1p)."""

    def __init__(self, feature: FeatureSpec, stats: FeatureStats, default_dim: int, **kwargs):
        super().__init__(name=f"{feature.name}_encoder", **kwargs)
        self.feature = feature
        dim = feature.embedding_dim or default_dim
        if feature.kind == "numeric":
            self.mean, self.std = float(stats.mean), float(stats.std)
        elif feature.kind == "bucketized":
            self.buckets = tf.keras.layers.Discretization(bin_boundaries=list(feature.boundaries or []))
            self.embedding = tf.keras.layers.Embedding(len(feature.boundaries or []) + 1, dim)
        else:
            self.lookup, size = _lookup(feature, stats)
            self.embedding = tf.keras.layers.Embedding(size, dim)

    def call(self, x: tf.Tensor) -> tf.Tensor:
        f = self.feature
        if f.kind in ("numeric", "bucketized"):
            x = tf.where(tf.math.is_finite(x), x, tf.cast(f.default, x.dtype))
            if f.kind == "bucketized":
                return self.embedding(self.buckets(x))
            if f.transform == "log1p":
                x = tf.math.log1p(tf.maximum(x, 0.0))
            return ((x - self.mean) / self.std)[:, None]
        if f.kind == "categorical":
            return self.embedding(self.lookup(x))
        tokens = tf.strings.split(tf.strings.strip(x), sep=f.separator)[:, : f.max_values]
        tokens = tokens.to_tensor(default_value="", shape=[None, f.max_values])  # (B, L)
        mask = tf.cast(tokens != "", tf.float32)[:, :, None]
        emb = self.embedding(self.lookup(tokens)) * mask  # (B, L, D)
        return tf.reduce_sum(emb, axis=1) / tf.maximum(tf.reduce_sum(mask, axis=1), 1.0)


class HistoryEncoder(tf.keras.layers.Layer):
    """(B, H) item ids, -1 padded -> (B, D): mean of the embeddings of the non-padding items (zeros if none)."""

    def __init__(self, item_feature: FeatureSpec, stats: FeatureStats, dim: int, **kwargs):
        super().__init__(name="history_encoder", **kwargs)
        self.lookup, size = _lookup(item_feature, stats)
        self.embedding = tf.keras.layers.Embedding(size, dim)

    def call(self, items: tf.Tensor) -> tf.Tensor:
        mask = tf.cast(items >= 0, tf.float32)[:, :, None]  # (B, H, 1)
        emb = self.embedding(self.lookup(items)) * mask  # (B, H, D)
        return tf.reduce_sum(emb, axis=1) / tf.maximum(tf.reduce_sum(mask, axis=1), 1.0)


class Tower(tf.keras.Model):
    """Encoders of ``features`` (plus history) -> concat -> Dense(``tower_units``, relu) -> Dense(E)."""

    def __init__(self, features: list[FeatureSpec], stats: dict[str, FeatureStats], config: RetrievalConfig,
                 history: HistoryEncoder | None = None, **kwargs):
        super().__init__(**kwargs)
        m = config.model
        self.names = [f.name for f in features]
        self.encoders = [FeatureEncoder(f, stats[f.name], m.feature_dim) for f in features]
        self.history = history
        self.hidden = [tf.keras.layers.Dense(u, activation="relu") for u in m.tower_units]
        self.out = tf.keras.layers.Dense(m.embedding_dim)
        self.normalize = m.normalize

    def call(self, inputs: dict[str, tf.Tensor]) -> tf.Tensor:
        parts = [enc(inputs[n]) for n, enc in zip(self.names, self.encoders)]
        if self.history is not None:
            parts.append(self.history(inputs[HISTORY]))
        x = tf.concat(parts, axis=-1) if len(parts) > 1 else parts[0]  # (B, sum D)
        for layer in self.hidden:
            x = layer(x)
        x = self.out(x)  # (B, E)
        return tf.math.l2_normalize(x, axis=-1) if self.normalize else x


def build_towers(config: RetrievalConfig, stats: dict[str, FeatureStats]) -> tuple[Tower, Tower]:
    """(query tower, candidate tower) for ``config``; the history encoder sits in the query tower."""
    history = None
    if config.history.length > 0:
        item = config.item_id_feature
        history = HistoryEncoder(item, stats[item.name], config.history.embedding_dim)
    query = Tower(config.query_features, stats, config, history, name="query_tower")
    candidate = Tower(config.candidate_features, stats, config, name="candidate_tower")
    return query, candidate


def query_signature(config: RetrievalConfig) -> dict[str, tf.TensorSpec]:
    """Raw serving inputs of the query tower: (B,) per feature, (B, H) history."""
    spec = {f.name: tf.TensorSpec([None], TF_DTYPES[f.raw_dtype], f.name) for f in config.query_features}
    if config.history.length > 0:
        spec[HISTORY] = tf.TensorSpec([None, None], tf.int64, HISTORY)
    return spec
