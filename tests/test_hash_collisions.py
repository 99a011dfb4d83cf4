"""``features.hashing``: collision fractions worked out by hand, the buckets equal to the model's own lookup layer of a
``hash_bins`` feature, and the measured fraction of many ids near 1 - (1 - 1/B)^(n - 1)."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from features.encoding import lookup_layer, tf_dtype
from features.hashing import collisions_of_buckets, expected_collisions, hash_buckets, hash_collisions
from features.spec import FeatureSpec
from features.vocab import FeatureStats


def test_collision_fractions_by_hand():
    # ids a, b share bucket 0; c and d are alone. Impressions 1 + 3 of 10 are on a shared bucket
    r = collisions_of_buckets(np.array([0, 0, 1, 2]), np.array([1, 3, 5, 1]), bins=4)
    assert (r.ids, r.impressions, r.buckets_used) == (4, 10, 3)
    assert r.colliding_ids == pytest.approx(0.5)
    assert r.colliding_impressions == pytest.approx(0.4)
    none = collisions_of_buckets(np.array([3, 1]), np.array([7, 2]), bins=4)
    assert (none.colliding_ids, none.colliding_impressions) == (0.0, 0.0)


def test_expected_collisions_by_hand():
    assert expected_collisions(1, 10) == 0.0  # a lone id never collides
    assert expected_collisions(2, 2) == pytest.approx(0.5)
    assert expected_collisions(3, 2) == pytest.approx(0.75)  # 1 - (1/2)^2
    assert expected_collisions(5, 1) == pytest.approx(1.0)


@pytest.mark.parametrize("dtype, values", [("int", np.array([0, 1, 17, -1, 9155697141, 2**40], np.int64)),
                                           ("string", np.array(["NORMAL", "AD", "", "39", "a,b"], object))])
def test_buckets_are_the_models_hash_lookup(dtype, values):
    feature = FeatureSpec(name="x", kind="categorical", dtype=dtype, hash_bins=97)
    x = tf.constant(list(values) if values.dtype == object else values, dtype=tf_dtype(feature))
    model = np.asarray(lookup_layer(feature, FeatureStats())(x))
    fast = tf.strings.to_hash_bucket_fast(x if dtype == "string" else tf.as_string(x), 97).numpy()
    np.testing.assert_array_equal(hash_buckets(values, 97), model)
    np.testing.assert_array_equal(model, fast)


def test_hash_collisions_counts_repeats_as_impressions():
    ids = np.arange(1, 200, dtype=np.int64)
    buckets = hash_buckets(ids, 50)
    a, b = ids[buckets == buckets[0]][:2]  # two ids that share a bucket of 50 (199 ids into 50: certain)
    c = ids[buckets != buckets[0]][0]  # alone among a, b, c
    r = hash_collisions(np.array([a, a, a, b] + [c] * 6, np.int64), 50)
    assert (r.ids, r.impressions) == (3, 10)
    assert r.colliding_ids == pytest.approx(2 / 3)
    assert r.colliding_impressions == pytest.approx(4 / 10)
    assert hash_collisions(np.array([5, 5, 5], np.int64), 50).colliding_ids == 0.0
    assert hash_collisions(np.array(["a", "b", "a"], object), 1).colliding_impressions == 1.0


def test_many_ids_collide_about_as_a_uniform_hash_predicts():
    ids = np.arange(100_000, 104_000, dtype=np.int64)  # 4,000 ids into 4,000 / 16,000 bins
    for bins in (4_000, 16_000):
        r = hash_collisions(ids, bins)
        assert r.colliding_ids == pytest.approx(expected_collisions(len(ids), bins), abs=0.03)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="bins must be >= 1"):
        hash_collisions(np.array([1]), 0)
    with pytest.raises(ValueError, match="int64 or strings"):
        hash_buckets(np.array([1.5]), 4)
