"""Preprocessing inside the graph: raw serving values -> dense feature vectors.

B batch (candidates), L values per multi-valued row, D embedding width.
Lookups put unseen and missing values into OOV buckets (index 0..k-1); NaN numerics get the feature's default.
These layers run on the TensorFlow backend (lookups are tf tables, string splitting is tf.strings), so the
exported SavedModel needs no Python and no project code.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from features.spec import ConfigError, FeatureSpec
from features.vocab import FeatureStats


@keras.saving.register_keras_serializable(package="rankstage")
class NumericEncoder(keras.layers.Layer):
    """(B,) raw float -> (B, 1): NaN or +-inf -> ``default``, optional log1p, then (x - mean) / std."""

    def __init__(self, mean: float, std: float, default: float = 0.0, transform: str = "none", **kwargs):
        super().__init__(**kwargs)
        if transform not in ("none", "log1p"):
            raise ValueError(f"NumericEncoder: transform must be 'none' or 'log1p', got {transform!r}")
        if not std > 0:
            raise ValueError(f"NumericEncoder: std must be > 0, got {std!r}")
        self.mean, self.std, self.default, self.transform = float(mean), float(std), float(default), transform

    def call(self, x):
        x = ops.cast(x, "float32")
        x = ops.where(ops.isfinite(x), x, self.default)
        if self.transform == "log1p":
            x = ops.log1p(ops.maximum(x, 0.0))
        return ops.expand_dims((x - self.mean) / self.std, -1)

    def compute_output_shape(self, input_shape):
        return (*input_shape, 1)

    def get_config(self):
        return {**super().get_config(), "mean": self.mean, "std": self.std, "default": self.default,
                "transform": self.transform}


@keras.saving.register_keras_serializable(package="rankstage")
class FillNaN(keras.layers.Layer):
    """(B,) float -> (B,) float with NaN and +-inf replaced by ``default`` (before bucketizing)."""

    def __init__(self, default: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.default = float(default)

    def call(self, x):
        x = ops.cast(x, "float32")
        return ops.where(ops.isfinite(x), x, self.default)

    def get_config(self):
        return {**super().get_config(), "default": self.default}


@keras.saving.register_keras_serializable(package="rankstage")
class SplitValues(keras.layers.Layer):
    """(B,) strings "a,b,c" -> (B, L) tokens, padded with "" and cut at L = ``max_values``."""

    def __init__(self, separator: str = ",", max_values: int = 8, **kwargs):
        super().__init__(**kwargs)
        if not separator:
            raise ValueError("SplitValues: separator must be non-empty, got ''")
        self.separator, self.max_values = separator, int(max_values)

    def call(self, x):
        tokens = tf.strings.split(tf.strings.strip(x), self.separator)  # ragged (B, None)
        return tokens.to_tensor(default_value="", shape=[None, self.max_values])

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.max_values)

    def compute_output_spec(self, x):
        return keras.KerasTensor((x.shape[0], self.max_values), dtype="string")

    def get_config(self):
        return {**super().get_config(), "separator": self.separator, "max_values": self.max_values}


@keras.saving.register_keras_serializable(package="rankstage")
class MaskedMean(keras.layers.Layer):
    """Mean of (B, L, D) embeddings over the L tokens that are not "" in (B, L) -> (B, D); zeros if none."""

    def call(self, embeddings, tokens):
        mask = ops.expand_dims(ops.cast(ops.not_equal(tokens, ""), embeddings.dtype), -1)  # (B, L, 1)
        total = ops.sum(embeddings * mask, axis=1)  # (B, D)
        return total / ops.maximum(ops.sum(mask, axis=1), 1.0)

    def compute_output_shape(self, embeddings_shape, tokens_shape):
        return (embeddings_shape[0], embeddings_shape[2])


def lookup_layer(feature: FeatureSpec, stats: FeatureStats, name: str | None = None) -> keras.layers.Layer:
    """Raw id -> int index in [0, size): OOV buckets first, then the vocabulary; or a hash bucket."""
    name = name or f"{feature.name}_lookup"
    if feature.hash_bins is not None:
        return keras.layers.Hashing(num_bins=feature.hash_bins, name=name)
    assert feature.vocab is not None
    if not stats.vocabulary:
        raise ConfigError(f"feature {feature.name!r}: empty vocabulary (no value seen >= vocab.min_count="
                          f"{feature.vocab.min_count} times in the training log)")
    cls = keras.layers.IntegerLookup if feature.raw_dtype == "int" else keras.layers.StringLookup
    kwargs = {"mask_token": None} if cls is keras.layers.StringLookup else {"mask_token": None}
    return cls(vocabulary=np.asarray(stats.vocabulary), num_oov_indices=feature.vocab.oov_buckets, name=name,
               **kwargs)


def lookup_size(feature: FeatureSpec, stats: FeatureStats) -> int:
    """Number of distinct indices ``lookup_layer`` can return."""
    if feature.hash_bins is not None:
        return feature.hash_bins
    assert feature.vocab is not None
    return len(stats.vocabulary) + feature.vocab.oov_buckets


def encode_feature(x, feature: FeatureSpec, stats: FeatureStats, default_dim: int):
    """Functional encoding of one raw input (B,) -> (B, D_f)."""
    dim = feature.embedding_dim or default_dim
    if feature.kind == "numeric":
        return NumericEncoder(stats.mean, stats.std, feature.default, feature.transform,
                              name=f"{feature.name}_numeric")(x)
    if feature.kind == "bucketized":
        x = FillNaN(feature.default, name=f"{feature.name}_fill")(x)
        idx = keras.layers.Discretization(bin_boundaries=list(feature.boundaries or []),
                                          name=f"{feature.name}_buckets")(x)
        size = len(feature.boundaries or []) + 1
        return keras.layers.Embedding(size, dim, name=f"{feature.name}_embedding")(idx)
    if feature.kind == "categorical":
        idx = lookup_layer(feature, stats)(x)
        return keras.layers.Embedding(lookup_size(feature, stats), dim, name=f"{feature.name}_embedding")(idx)
    tokens = SplitValues(feature.separator, feature.max_values, name=f"{feature.name}_split")(x)  # (B, L)
    idx = lookup_layer(feature, stats)(tokens)
    emb = keras.layers.Embedding(lookup_size(feature, stats), dim, name=f"{feature.name}_embedding")(idx)
    return MaskedMean(name=f"{feature.name}_mean")(emb, tokens)


def keras_dtype(feature: FeatureSpec) -> str:
    return {"int": "int64", "string": "string", "float": "float32"}[feature.raw_dtype]


def tf_dtype(feature: FeatureSpec) -> tf.DType:
    return {"int": tf.int64, "string": tf.string, "float": tf.float32}[feature.raw_dtype]
