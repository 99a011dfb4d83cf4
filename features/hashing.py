"""Hash-bucket collisions of an id feature: how many ids, and how many impressions, share an embedding row.

N impressions, n distinct ids, B bins. The buckets are the ones the model computes: ``keras.layers.Hashing(num_bins=B)``
(no salt, no mask), as ``features.encoding.lookup_layer`` builds it for a ``hash_bins`` feature, i.e. FarmHash64 of
the value's string form (``tf.strings.to_hash_bucket_fast(tf.as_string(x), B)``) on the raw dtype serving sends
(int64 ids, strings).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class HashCollisions:
    """Collisions of n distinct ids in B bins; ``expected`` = 1 - (1 - 1/B)^(n - 1), the chance that one id shares
    its bucket under a uniform hash (the same for the id-weighted and the impression-weighted fraction)."""

    bins: int
    ids: int  # n distinct ids
    impressions: int  # N
    colliding_ids: float  # fraction of the n ids whose bucket holds another id
    colliding_impressions: float  # fraction of the N impressions whose id shares its bucket
    buckets_used: int  # distinct buckets the ids fall in

    @property
    def expected(self) -> float:
        return expected_collisions(self.ids, self.bins)


def expected_collisions(ids: int, bins: int) -> float:
    """1 - (1 - 1/B)^(n - 1): the chance that one of n ids hashed uniformly into B bins shares its bucket."""
    if bins == 1:
        return 1.0 if ids > 1 else 0.0
    return float(-np.expm1((ids - 1) * np.log1p(-1.0 / bins)))


def hash_buckets(values, bins: int) -> np.ndarray:
    """(n,) raw ids (int64 or str) -> (n,) int64 bucket in [0, B), computed by the model's Hashing layer."""
    import keras  # here, not at import: the numpy half of this module needs no TensorFlow

    values = np.asarray(values)
    if values.dtype.kind in "iu":
        values = values.astype(np.int64)
    elif values.dtype.kind in "OUS":
        values = values.astype(object)
    else:
        raise ValueError(f"hash_buckets: ids are int64 or strings, got dtype {values.dtype}")
    return np.asarray(keras.layers.Hashing(num_bins=bins)(values)).astype(np.int64).reshape(-1)


def collisions_of_buckets(buckets: np.ndarray, counts: np.ndarray, bins: int) -> HashCollisions:
    """(n,) bucket of each distinct id and (n,) its impressions -> the collision fractions (pure numpy)."""
    buckets, counts = np.asarray(buckets, np.int64), np.asarray(counts, np.int64)
    if buckets.shape != counts.shape or buckets.ndim != 1 or buckets.size == 0:
        raise ValueError(f"collisions_of_buckets: buckets and counts must be equal non-empty (n,), got "
                         f"{buckets.shape} and {counts.shape}")
    per_bucket = np.bincount(buckets, minlength=bins)  # ids per bucket
    shared = per_bucket[buckets] > 1  # (n,)
    return HashCollisions(bins=int(bins), ids=int(buckets.size), impressions=int(counts.sum()),
                          colliding_ids=float(shared.mean()),
                          colliding_impressions=float(counts[shared].sum() / counts.sum()),
                          buckets_used=int((per_bucket > 0).sum()))


def hash_collisions(values, bins: int) -> HashCollisions:
    """(N,) raw ids, one per impression (repeats count as impressions) -> collisions in ``bins`` hash buckets."""
    if int(bins) < 1:
        raise ValueError(f"hash_collisions: bins must be >= 1, got {bins!r}")
    ids, counts = np.unique(np.asarray(values), return_counts=True)
    return collisions_of_buckets(hash_buckets(ids, bins), counts, bins)
