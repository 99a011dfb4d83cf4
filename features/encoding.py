"""Preprocessing inside the graph: raw serving values -> dense feature vectors.

B batch (candidates), L values per multi-valued row (events of a sequence), F fields per event, D embedding width.
Lookups put unseen and missing values into OOV buckets (index 0..k-1); NaN numerics get the feature's default.
These layers run on the TensorFlow backend (lookups are tf tables, string splitting is tf.strings), so the
exported SavedModel needs no Python and no project code.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from features.logs import MISSING_INT
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


@keras.saving.register_keras_serializable(package="rankstage")
class OOVDropout(keras.layers.Layer):
    """(B, ...) lookup indices -> the same, with each index replaced in training, with probability ``rate``, by one
    of the ``oov_buckets`` OOV indices (0..k-1) drawn uniformly, where an unseen id hashes; identity at inference."""

    def __init__(self, rate: float, oov_buckets: int = 1, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        if not 0 <= rate < 1:
            raise ValueError(f"OOVDropout: rate must be in [0, 1), got {rate!r}")
        if int(oov_buckets) < 1:
            raise ValueError(f"OOVDropout: oov_buckets must be >= 1, got {oov_buckets!r}")
        self.rate, self.oov_buckets, self.seed = float(rate), int(oov_buckets), seed
        self._rng = keras.random.SeedGenerator(seed)

    def call(self, idx, training: bool = False):
        if not training or self.rate <= 0:
            return idx
        shape = ops.shape(idx)
        drop = keras.random.uniform(shape, seed=self._rng) < self.rate
        bucket = keras.random.randint(shape, 0, self.oov_buckets, seed=self._rng, dtype=idx.dtype)
        return ops.where(drop, bucket, idx)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "rate": self.rate, "oov_buckets": self.oov_buckets, "seed": self.seed}


@keras.saving.register_keras_serializable(package="rankstage")
class MatchCount(keras.layers.Layer):
    """(B, L) tokens ("" padding) and (B,) or (1,) candidate ids (int64 or string) -> (B,) float: how many tokens
    equal the row's id (ints compared by their decimal string, as ``features.history`` writes them)."""

    def call(self, tokens, ids):
        if ids.dtype != tf.string:
            ids = tf.strings.as_string(ids)
        hit = ops.logical_and(ops.equal(tokens, ops.expand_dims(ids, -1)), ops.not_equal(tokens, ""))
        return ops.sum(ops.cast(hit, "float32"), axis=-1)

    def compute_output_shape(self, tokens_shape, ids_shape):
        return (tokens_shape[0],)


@keras.saving.register_keras_serializable(package="rankstage")
class SequenceFields(keras.layers.Layer):
    """(B,) strings "a:b:c,d:e:f" -> (B, L, F) field tokens: ``max_values`` events split at ",", each split into
    ``fields`` at ":"; missing events and fields are "" (an event's extra fields are dropped)."""

    def __init__(self, max_values: int, fields: int, **kwargs):
        super().__init__(**kwargs)
        if int(max_values) < 1 or int(fields) < 1:
            raise ValueError(f"SequenceFields: max_values and fields must be >= 1, got {max_values!r}, {fields!r}")
        self.max_values, self.fields = int(max_values), int(fields)

    def call(self, x):
        events = tf.strings.split(tf.strings.strip(x), ",").to_tensor(default_value="",
                                                                       shape=[None, self.max_values])  # (B, L)
        flat = tf.strings.split(tf.strings.strip(tf.reshape(events, [-1])), ":")  # ragged (B * L, None)
        parts = flat.to_tensor(default_value="", shape=[None, self.fields])  # (B * L, F)
        return tf.reshape(parts, [-1, self.max_values, self.fields])

    def compute_output_spec(self, x):
        return keras.KerasTensor((x.shape[0], self.max_values, self.fields), dtype="string")

    def get_config(self):
        return {**super().get_config(), "max_values": self.max_values, "fields": self.fields}


@keras.saving.register_keras_serializable(package="rankstage")
class ParseIds(keras.layers.Layer):
    """(...) string tokens -> (...) int64 ids; "" and anything not an integer -> the missing id (an OOV bucket)."""

    def call(self, tokens):
        ok = tf.strings.regex_full_match(tokens, r"[+-]?[0-9]{1,18}")
        ids = tf.strings.to_number(tf.where(ok, tokens, "0"), out_type=tf.int64)
        return tf.where(ok, ids, tf.constant(MISSING_INT, tf.int64))

    def compute_output_spec(self, tokens):
        return keras.KerasTensor(tokens.shape, dtype="int64")


@keras.saving.register_keras_serializable(package="rankstage")
class BucketIndex(keras.layers.Layer):
    """(...) string numbers -> (...) int64: 0 if "" or not a finite number, else 1 + how many ``boundaries`` are
    <= the value (``Discretization``'s bucket, shifted by the missing one)."""

    def __init__(self, boundaries: list[float], **kwargs):
        super().__init__(**kwargs)
        if not boundaries or any(a >= b for a, b in zip(boundaries, boundaries[1:])):
            raise ValueError(f"BucketIndex: boundaries must be non-empty and increasing, got {boundaries!r}")
        self.boundaries = [float(b) for b in boundaries]

    def call(self, tokens):
        ok = tf.strings.regex_full_match(tokens, r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")
        x = tf.strings.to_number(tf.where(ok, tokens, "0"), out_type=tf.float32)
        ok = tf.logical_and(ok, tf.math.is_finite(x))
        above = tf.add_n([tf.cast(x >= b, tf.int64) for b in self.boundaries])
        return tf.where(ok, above + 1, tf.zeros_like(above))

    def compute_output_spec(self, tokens):
        return keras.KerasTensor(tokens.shape, dtype="int64")

    def get_config(self):
        return {**super().get_config(), "boundaries": self.boundaries}


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


def _indices(x, feature: FeatureSpec, stats: FeatureStats, seed: int | None, shared: dict | None = None):
    """Lookup indices of raw ids or tokens, through ``OOVDropout`` when the vocabulary asks for it; the lookup layer
    is kept in ``shared[name]`` (for sequences sharing it)."""
    lookup = lookup_layer(feature, stats)
    if shared is not None:
        shared[feature.name] = [lookup]
    idx = lookup(x)
    if feature.vocab is not None and feature.vocab.oov_dropout > 0:
        idx = OOVDropout(feature.vocab.oov_dropout, feature.vocab.oov_buckets, seed=seed,
                         name=f"{feature.name}_oov_dropout")(idx)
    return idx


def encode_feature(x, feature: FeatureSpec, stats: FeatureStats, default_dim: int, seed: int | None = None,
                   match=None, shared: dict | None = None):
    """Functional encoding of one raw input (B,) -> (B, D_f); ``match`` is the raw (B,) input of the candidate feature
    a match feature counts. A categorical or multi-valued feature leaves ``shared[name] = [lookup, embedding]``."""
    dim = feature.embedding_dim or default_dim
    if feature.kind == "match":  # the count is then encoded like a numeric feature
        tokens = SplitValues(feature.separator, feature.max_values, name=f"{feature.name}_split")(x)  # (B, L)
        x = MatchCount(name=f"{feature.name}_count")(tokens, match)  # (B,)
    if feature.kind in ("numeric", "match"):
        return NumericEncoder(stats.mean, stats.std, feature.default, feature.transform,
                              name=f"{feature.name}_numeric")(x)
    if feature.kind == "bucketized":
        x = FillNaN(feature.default, name=f"{feature.name}_fill")(x)
        idx = keras.layers.Discretization(bin_boundaries=list(feature.boundaries or []),
                                          name=f"{feature.name}_buckets")(x)
        size = len(feature.boundaries or []) + 1
        return keras.layers.Embedding(size, dim, name=f"{feature.name}_embedding")(idx)
    if feature.kind == "sequence":
        raise ValueError(f"feature {feature.name!r}: a sequence is encoded by encode_sequence")
    if feature.kind == "categorical":
        idx = _indices(x, feature, stats, seed, shared)
        embedding = keras.layers.Embedding(lookup_size(feature, stats), dim, name=f"{feature.name}_embedding")
        if shared is not None:
            shared[feature.name].append(embedding)
        return embedding(idx)
    tokens = SplitValues(feature.separator, feature.max_values, name=f"{feature.name}_split")(x)  # (B, L)
    idx = _indices(tokens, feature, stats, seed, shared)
    embedding = keras.layers.Embedding(lookup_size(feature, stats), dim, name=f"{feature.name}_embedding")
    if shared is not None:
        shared[feature.name].append(embedding)
    return MaskedMean(name=f"{feature.name}_mean")(embedding(idx), tokens)


def sequence_keys(x, feature: FeatureSpec, features: dict[str, FeatureSpec], shared: dict):
    """A sequence's raw (B,) strings -> (keys (B, L, D_k), valid (B, L)): each field embedded, by its target's own
    lookup and embedding table (``shared``, from ``encode_feature``) or its own bucket table, concatenated. The
    tensors are named ``<name>_keys`` / ``<name>_valid`` (``rank_candidates`` computes them once per request)."""
    spec = feature.sequence
    assert spec is not None
    n = feature.name
    tokens = SequenceFields(feature.max_values, len(spec.fields), name=f"{n}_fields")(x)  # (B, L, F)
    parts = []
    for j, fld in enumerate(spec.fields):
        tok = tokens[:, :, j]  # (B, L)
        if fld.target is not None:
            lookup, embedding = shared[fld.target]
            if features[fld.target].raw_dtype == "int":
                tok = ParseIds(name=f"{n}_field{j}_ids")(tok)
            parts.append(embedding(lookup(tok)))  # (B, L, D_target)
        else:
            idx = BucketIndex(fld.boundaries, name=f"{n}_field{j}_buckets")(tok)
            parts.append(keras.layers.Embedding(len(fld.boundaries) + 2, fld.embedding_dim,
                                                name=f"{n}_field{j}_embedding")(idx))  # (B, L, D_j)
    keys = keras.layers.Concatenate(name=f"{n}_keys")(parts) if len(parts) > 1 else \
        keras.layers.Identity(name=f"{n}_keys")(parts[0])  # (B, L, D_k)
    valid = keras.layers.Identity(name=f"{n}_valid")(ops.cast(ops.not_equal(tokens[:, :, 0], ""), "float32"))
    return keys, valid


def sequence_query(feature: FeatureSpec, encoded: dict):
    """The candidate's side of a sequence's attention: its encodings of the fields' targets, (B, D_q), named
    ``<name>_query``."""
    assert feature.sequence is not None
    parts = [encoded[f.target] for f in feature.sequence.fields if f.target is not None]
    return keras.layers.Concatenate(name=f"{feature.name}_query")(parts) if len(parts) > 1 else \
        keras.layers.Identity(name=f"{feature.name}_query")(parts[0])


def keras_dtype(feature: FeatureSpec) -> str:
    return {"int": "int64", "string": "string", "float": "float32"}[feature.raw_dtype]


def tf_dtype(feature: FeatureSpec) -> tf.DType:
    return {"int": tf.int64, "string": tf.string, "float": tf.float32}[feature.raw_dtype]
