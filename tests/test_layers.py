"""Keras layers: MMoE, PositionBiasTower and the in-graph feature encoders.

Hand-worked values, numpy references, properties (gates sum to 1, dropout only in training) and config round trips.
B batch, D input width, E experts, H expert width, T tasks, L values per multi-valued row.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

from features.encoding import FillNaN, MaskedMean, NumericEncoder, OOVDropout, SplitValues
from features.spec import FeatureSpec
from features.vocab import transform_numeric
from ranking.layers.bias_tower import PositionBiasTower
from ranking.layers.mmoe import MMoE


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def mmoe_reference(x: np.ndarray, layer: MMoE) -> tuple[np.ndarray, np.ndarray]:
    """numpy MMoE at inference: (B, D) -> gates (B, T, E), output (B, T, H)."""
    h = np.repeat(x[:, None, :], layer.num_experts, axis=1).astype(np.float64)  # (B, E, D)
    for kernel, bias in zip(layer.expert_kernels, layer.expert_biases):
        k, b = np.asarray(kernel), np.asarray(bias)  # (E, D, H), (E, H)
        h = np.maximum(np.stack([h[:, e] @ k[e] + b[e] for e in range(layer.num_experts)], axis=1), 0.0)
    gk, gb = np.asarray(layer.gate_kernel), np.asarray(layer.gate_bias)  # (T, D, E), (T, E)
    gates = _softmax(np.stack([x @ gk[t] + gb[t] for t in range(layer.num_tasks)], axis=1))  # (B, T, E)
    out = np.stack([(gates[:, t, :, None] * h).sum(axis=1) for t in range(layer.num_tasks)], axis=1)
    return gates, out


def _random_mmoe(seed: int = 0, gate_dropout: float = 0.0, **sizes) -> tuple[MMoE, np.ndarray]:
    """A built MMoE with every weight (biases too) drawn at random, and an input batch."""
    cfg = {"num_experts": 3, "expert_units": [5, 4], "num_tasks": 2, **sizes}
    rng = np.random.default_rng(seed)
    layer = MMoE(gate_dropout=gate_dropout, seed=seed, **cfg)
    x = rng.normal(size=(16, 6)).astype(np.float32)
    layer.build(x.shape)
    layer.set_weights([rng.normal(size=w.shape).astype(np.float32) for w in layer.get_weights()])
    return layer, x


# ---------------------------------------------------------------------------------------------------- MMoE


def test_mmoe_mixing_matches_hand_computed_values():
    layer = MMoE(num_experts=2, expert_units=[2], num_tasks=2, gate_dropout=0.0)
    layer.build((None, 2))
    layer.expert_kernels[0].assign(np.stack([np.eye(2), 2 * np.eye(2)]))  # expert 0: x, expert 1: 2x - 1
    layer.expert_biases[0].assign([[0.0, 0.0], [-1.0, -1.0]])
    layer.gate_kernel.assign(np.zeros((2, 2, 2)))  # gates independent of x
    layer.gate_bias.assign([[0.0, np.log(3.0)], [0.0, 0.0]])  # task 0: [1/4, 3/4]; task 1: [1/2, 1/2]
    x = np.array([[1.0, 2.0], [-1.0, 2.0]], np.float32)
    # row 0: expert 0 = [1, 2], expert 1 = relu([1, 3]) = [1, 3]
    # row 1: expert 0 = relu([-1, 2]) = [0, 2], expert 1 = relu([-3, 3]) = [0, 3]
    expected = np.array([
        [[1.0, 0.25 * 2 + 0.75 * 3], [1.0, 2.5]],
        [[0.0, 0.25 * 2 + 0.75 * 3], [0.0, 2.5]],
    ])
    np.testing.assert_allclose(layer(x), expected, rtol=1e-6)
    np.testing.assert_allclose(layer.gates(x), [[[0.25, 0.75], [0.5, 0.5]]] * 2, rtol=1e-6)


def test_mmoe_gates_follow_the_input():
    layer = MMoE(num_experts=2, expert_units=[1], num_tasks=1, gate_dropout=0.0)
    layer.build((None, 1))
    layer.gate_kernel.assign([[[1.0, -1.0]]])  # logits [x, -x] -> weight of expert 0 = sigmoid(2x)
    x = np.array([[0.0], [1.0], [-2.0]], np.float32)
    w0 = 1.0 / (1.0 + np.exp(-2.0 * x[:, 0]))
    np.testing.assert_allclose(layer.gates(x)[:, 0, 0], w0, rtol=1e-6)


def test_mmoe_matches_numpy_reference_on_random_weights():
    layer, x = _random_mmoe(seed=1)
    gates, out = mmoe_reference(x, layer)
    assert layer(x).shape == (16, 2, 4)
    np.testing.assert_allclose(layer.gates(x), gates, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer(x), out, rtol=1e-4, atol=1e-5)


def test_mmoe_gate_weights_sum_to_one_in_inference_and_training():
    layer, x = _random_mmoe(seed=2, gate_dropout=0.5, num_experts=4, num_tasks=3)
    for training in (False, True):
        g = np.asarray(layer.gates(x, training=training))
        assert g.shape == (16, 3, 4)
        assert (g >= 0).all()
        np.testing.assert_allclose(g.sum(axis=-1), np.ones((16, 3)), rtol=1e-5)


def test_mmoe_gate_dropout_is_a_no_op_at_inference():
    layer, x = _random_mmoe(seed=3, gate_dropout=0.5, num_experts=4)
    gates, out = mmoe_reference(x, layer)
    first, second = np.asarray(layer(x, training=False)), np.asarray(layer(x, training=False))
    np.testing.assert_array_equal(first, second)
    np.testing.assert_allclose(first, out, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(layer.gates(x, training=False), gates, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(layer(x), first)  # training defaults to False


def test_mmoe_gate_dropout_in_training_zeroes_gates_and_renormalises():
    layer, x = _random_mmoe(seed=4, gate_dropout=0.5, num_experts=4, num_tasks=3)
    x = np.tile(x, (8, 1))  # (128, D): enough rows that dropout must hit some gates
    plain = np.asarray(layer.gates(x, training=False))
    dropped = np.asarray(layer.gates(x, training=True))
    zero = dropped == 0.0
    assert zero.any(), "gate_dropout=0.5 dropped no gate at all"
    assert 0.3 < zero.mean() < 0.6  # ~0.5, less the rows where every expert was dropped (kept as is)
    assert (plain > 0).all()  # so every zero above comes from dropout
    np.testing.assert_allclose(dropped.sum(axis=-1), 1.0, rtol=1e-5)
    # the kept gates keep their softmax proportions: the plain softmax restricted to the kept experts, renormalised
    kept = np.where(zero, 0.0, plain)
    np.testing.assert_allclose(dropped, kept / kept.sum(axis=-1, keepdims=True), rtol=1e-4, atol=1e-7)
    # the layer output is the mixture with those dropped gates, not with the plain softmax
    experts = np.asarray(layer.experts(x))
    np.testing.assert_allclose(np.einsum("bte,beh->bth", plain, experts), layer(x, training=False), rtol=1e-4,
                               atol=1e-5)
    assert not np.allclose(np.asarray(layer(x, training=True)), np.asarray(layer(x, training=False)))


def test_mmoe_without_gate_dropout_training_equals_inference():
    layer, x = _random_mmoe(seed=5, gate_dropout=0.0)
    np.testing.assert_allclose(layer(x, training=True), layer(x, training=False), rtol=1e-6)


def test_mmoe_get_config_round_trip():
    layer, x = _random_mmoe(seed=6, gate_dropout=0.25, num_experts=2, expert_units=[3], num_tasks=4)
    config = layer.get_config()
    assert {k: config[k] for k in ("num_experts", "expert_units", "num_tasks", "gate_dropout", "seed")} == {
        "num_experts": 2, "expert_units": [3], "num_tasks": 4, "gate_dropout": 0.25, "seed": 6}
    clone = MMoE.from_config(config)
    clone.build(x.shape)
    clone.set_weights(layer.get_weights())
    np.testing.assert_array_equal(clone(x), layer(x))
    revived = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert isinstance(revived, MMoE) and revived.get_config() == config


def test_mmoe_saved_model_file_reloads_with_same_predictions(tmp_path):
    layer, x = _random_mmoe(seed=7)
    inputs = keras.Input(shape=(x.shape[1],))
    model = keras.Model(inputs, layer(inputs))
    path = tmp_path / "mmoe.keras"
    model.save(path)
    np.testing.assert_allclose(keras.saving.load_model(path)(x), model(x), rtol=1e-6)


@pytest.mark.parametrize(("kwargs", "quoted"), [
    ({"num_experts": 0}, "num_experts must be >= 1, got 0"),
    ({"num_tasks": 0}, "num_tasks must be >= 1, got 0"),
    ({"expert_units": []}, "got []"),
    ({"expert_units": [8, 0]}, "got [8, 0]"),
    ({"gate_dropout": 1.5}, "gate_dropout must be in [0, 1), got 1.5"),
    ({"gate_dropout": 1.0}, "got 1.0"),
    ({"gate_dropout": -0.1}, "got -0.1"),
])
def test_mmoe_constructor_errors_quote_the_bad_value(kwargs, quoted):
    args = {"num_experts": 2, "expert_units": [4], "num_tasks": 2, **kwargs}
    with pytest.raises(ValueError) as err:
        MMoE(**args)
    assert quoted in str(err.value)


# ---------------------------------------------------------------------------------------------- bias tower


def _tower(num_positions: int = 4, num_devices: int = 3, dropout: float = 0.0, seed: int = 0) -> PositionBiasTower:
    tower = PositionBiasTower(num_positions, num_devices, dropout, seed=seed)
    tower.build((None,), (None,))
    tower.set_weights([np.arange(num_positions * num_devices, dtype=np.float32) * 10 + 1])  # entry k -> 10k + 1
    return tower


def test_bias_tower_output_is_the_table_entry_for_position_and_device():
    tower = _tower()
    pos = np.array([0, 1, 2, 3, 3, 1], np.int64)
    dev = np.array([0, 2, 1, 0, 2, 0], np.int64)
    out = np.asarray(tower(pos, dev))
    assert out.shape == (6, 1)
    np.testing.assert_array_equal(out[:, 0], 10 * (pos * 3 + dev) + 1)  # [1, 61, 71, 91, 111, 31]
    table = np.asarray(tower.bias_table())
    assert table.shape == (4, 3)
    np.testing.assert_array_equal(table[pos, dev], out[:, 0])


def test_bias_tower_with_only_one_input():
    tower = _tower()
    pos = np.array([0, 2, 3], np.int64)
    np.testing.assert_array_equal(np.asarray(tower(pos))[:, 0], 10 * (pos * 3) + 1)  # device = 0
    only_devices = _tower(num_positions=1, num_devices=3)
    dev = np.array([2, 0, 1], np.int64)
    np.testing.assert_array_equal(np.asarray(only_devices(None, dev))[:, 0], 10 * dev + 1)
    np.testing.assert_array_equal(np.asarray(only_devices(device=dev, training=True))[:, 0], 10 * dev + 1)
    with pytest.raises(ValueError, match="at least one of position or device"):
        tower(None, None)


def test_bias_tower_position_dropout_only_in_training():
    n = 10_000
    rng = np.random.default_rng(0)
    pos = rng.integers(1, 4, n)  # never missing, so a 0 can only come from dropout
    dev = rng.integers(0, 3, n)
    tower = _tower(dropout=0.5, seed=1)
    kept, dropped = 10 * (pos * 3 + dev) + 1, 10 * dev + 1  # dropped rows keep their device

    for _ in range(2):
        np.testing.assert_array_equal(np.asarray(tower(pos, dev, training=False))[:, 0], kept)

    out = np.asarray(tower(pos, dev, training=True))[:, 0]
    is_dropped = out == dropped
    assert (is_dropped | (out == kept)).all()
    assert abs(is_dropped.mean() - 0.5) < 0.03  # binomial sd at n=10k is 0.005


def test_bias_tower_get_config_round_trip():
    tower = _tower(num_positions=5, num_devices=2, dropout=0.3, seed=9)
    config = tower.get_config()
    assert {k: config[k] for k in ("num_positions", "num_devices", "position_dropout", "seed")} == {
        "num_positions": 5, "num_devices": 2, "position_dropout": 0.3, "seed": 9}
    clone = PositionBiasTower.from_config(config)
    clone.build((None,), (None,))
    clone.set_weights(tower.get_weights())
    pos, dev = np.array([0, 4, 2, 1]), np.array([1, 0, 1, 1])
    np.testing.assert_array_equal(clone(pos, dev), tower(pos, dev))
    revived = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(tower))
    assert isinstance(revived, PositionBiasTower) and revived.get_config() == config


@pytest.mark.parametrize(("kwargs", "quoted"), [
    ({"num_positions": 0}, "positions=0"),
    ({"num_devices": -1}, "devices=-1"),
    ({"position_dropout": 1.0}, "got 1.0"),
    ({"position_dropout": -0.5}, "got -0.5"),
])
def test_bias_tower_constructor_errors_quote_the_bad_value(kwargs, quoted):
    with pytest.raises(ValueError) as err:
        PositionBiasTower(**kwargs)
    assert quoted in str(err.value)


# ------------------------------------------------------------------------------------------------ encoders


def test_numeric_encoder_fills_nan_log1p_and_normalises_by_hand():
    enc = NumericEncoder(mean=1.0, std=2.0, default=3.0, transform="log1p")
    x = np.array([np.nan, 0.0, np.e - 1.0, -5.0, 3.0], np.float32)
    # NaN -> 3 -> log1p(3); e-1 -> log1p = 1; negatives clip to 0 before log1p
    expected = (np.array([np.log(4.0), 0.0, 1.0, 0.0, np.log(4.0)]) - 1.0) / 2.0
    out = np.asarray(enc(x))
    assert out.shape == (5, 1)
    np.testing.assert_allclose(out[:, 0], expected, rtol=1e-6)


def test_numeric_encoder_without_transform():
    enc = NumericEncoder(mean=10.0, std=4.0, default=-2.0)
    x = np.array([np.nan, 10.0, 18.0, -6.0], np.float32)
    np.testing.assert_allclose(np.asarray(enc(x))[:, 0], [-3.0, 0.0, 2.0, -4.0], rtol=1e-6)


def test_numeric_encoder_mirrors_the_numpy_transform_used_for_statistics():
    feature = FeatureSpec(name="n", kind="numeric", transform="log1p", default=7.0)
    x = np.random.default_rng(0).exponential(100.0, 64).astype(np.float32)
    x[::5] = np.nan
    x[1::7] = -3.0
    t = transform_numeric(x, feature)
    mean, std = float(t.mean()), float(t.std())
    enc = NumericEncoder(mean, std, feature.default, feature.transform)
    np.testing.assert_allclose(np.asarray(enc(x))[:, 0], (t - mean) / std, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("kwargs", "quoted"), [({"std": 0.0}, "got 0.0"), ({"transform": "sqrt"}, "'sqrt'")])
def test_numeric_encoder_errors_quote_the_bad_value(kwargs, quoted):
    with pytest.raises(ValueError) as err:
        NumericEncoder(**{"mean": 0.0, "std": 1.0, **kwargs})
    assert quoted in str(err.value)


def test_fill_nan():
    out = np.asarray(FillNaN(default=5.0)(np.array([1.0, np.nan, -2.0], np.float32)))
    np.testing.assert_array_equal(out, [1.0, 5.0, -2.0])


def test_split_values_pads_and_cuts():
    split = SplitValues(separator="|", max_values=3)
    out = np.asarray(split(np.array(["a|b|c", "d", "", "e|f|g|h|i", " x|y "])))
    assert out.shape == (5, 3)
    expected = [[b"a", b"b", b"c"], [b"d", b"", b""], [b"", b"", b""], [b"e", b"f", b"g"], [b"x", b"y", b""]]
    assert out.tolist() == expected
    with pytest.raises(ValueError, match="separator"):
        SplitValues(separator="")


def test_masked_mean_after_split_by_hand():
    tokens = SplitValues(",", 3)(np.array(["a,b,c", "a", "", "b,c"]))  # (4, 3)
    emb = np.array([  # (B=4, L=3, D=2); entries under padding are junk that must be ignored
        [[1.0, 2.0], [3.0, 4.0], [5.0, 9.0]],
        [[6.0, -2.0], [100.0, 100.0], [100.0, 100.0]],
        [[7.0, 7.0], [7.0, 7.0], [7.0, 7.0]],
        [[2.0, 0.0], [4.0, 1.0], [-50.0, -50.0]],
    ], np.float32)
    out = np.asarray(MaskedMean()(emb, tokens))
    np.testing.assert_allclose(out, [[3.0, 5.0], [6.0, -2.0], [0.0, 0.0], [3.0, 0.5]], rtol=1e-6)


def test_oov_dropout_is_identity_at_inference_and_drops_at_its_rate_in_training():
    idx = np.arange(5, 20005, dtype=np.int64)  # vocabulary indices, above the 3 OOV buckets 0..2
    layer = OOVDropout(0.3, oov_buckets=3, seed=0)
    np.testing.assert_array_equal(np.asarray(layer(idx)), idx)
    np.testing.assert_array_equal(np.asarray(layer(idx, training=False)), idx)
    out = np.asarray(layer(idx, training=True))
    dropped = out != idx
    assert abs(dropped.mean() - 0.3) < 0.02
    assert set(np.unique(out[dropped])) == {0, 1, 2}  # every OOV bucket, nothing else
    tokens = np.tile(idx[:100, None], (1, 4))  # (B, L) multi-valued indices: dropped token by token
    out2 = np.asarray(OOVDropout(0.5, seed=1)(tokens, training=True))
    assert out2.shape == (100, 4) and 0 < (out2 == 0).mean() < 1 and set(np.unique(out2[out2 != tokens])) == {0}


def test_oov_dropout_config_round_trip_and_errors():
    layer = OOVDropout(0.2, oov_buckets=2, seed=7)
    assert OOVDropout.from_config(layer.get_config()).get_config() == layer.get_config()
    with pytest.raises(ValueError, match="got 1.0"):
        OOVDropout(1.0)
    with pytest.raises(ValueError, match="got 0"):
        OOVDropout(0.1, oov_buckets=0)
