"""PLE: a numpy reference on random weights (two levels), gates that sum to 1, gate dropout only in training,
task isolation of task-specific experts, config and file round trips, constructor errors.

B batch, D input width, T tasks, K task experts, S shared experts, H expert width.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

from ranking.layers.ple import PLE


def _softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _mlp(x, kernels, biases):
    """x (..., D) through ReLU layers with kernels (D, H)."""
    for k, b in zip(kernels, biases):
        x = np.maximum(x @ k + b, 0.0)
    return x


def ple_reference(x: np.ndarray, layer: PLE) -> np.ndarray:
    """numpy PLE at inference, one expert and one task at a time: (B, D) -> (B, T, H)."""
    t_n, k_n, s_n = layer.num_tasks, layer.task_experts, layer.shared_experts
    xt = [x.astype(np.float64)] * t_n
    xs = x.astype(np.float64)
    for w in layer.levels:
        tk = [np.asarray(v) for v in w["task_kernels"]]
        tb = [np.asarray(v) for v in w["task_biases"]]
        sk = [np.asarray(v) for v in w["shared_kernels"]]
        sb = [np.asarray(v) for v in w["shared_biases"]]
        task_out = [[_mlp(xt[t], [k[t, e] for k in tk], [b[t, e] for b in tb]) for e in range(k_n)]
                    for t in range(t_n)]
        shared_out = [_mlp(xs, [k[e] for k in sk], [b[e] for b in sb]) for e in range(s_n)]
        gk, gb = np.asarray(w["gate_kernel"]), np.asarray(w["gate_bias"])
        new_xt = []
        for t in range(t_n):
            g = _softmax(xt[t] @ gk[t] + gb[t])  # (B, K + S)
            pool = task_out[t] + shared_out
            new_xt.append(sum(g[:, e:e + 1] * pool[e] for e in range(k_n + s_n)))
        if "shared_gate_kernel" in w:
            g = _softmax(xs @ np.asarray(w["shared_gate_kernel"]) + np.asarray(w["shared_gate_bias"]))
            pool = [e for t in range(t_n) for e in task_out[t]] + shared_out
            xs = sum(g[:, e:e + 1] * pool[e] for e in range(len(pool)))
        xt = new_xt
    return np.stack(xt, axis=1)


def _random_ple(seed: int = 0, **cfg) -> tuple[PLE, np.ndarray]:
    cfg = {"num_tasks": 3, "task_experts": 2, "shared_experts": 2, "expert_units": [5, 4], "num_levels": 2,
           "gate_dropout": 0.0, **cfg}
    rng = np.random.default_rng(seed)
    layer = PLE(seed=seed, **cfg)
    x = rng.normal(size=(8, 6)).astype(np.float32)
    layer.build(x.shape)
    layer.set_weights([rng.normal(scale=0.5, size=w.shape).astype(np.float32) for w in layer.get_weights()])
    return layer, x


@pytest.mark.parametrize("cfg", [{}, {"num_levels": 1}, {"shared_experts": 0}, {"task_experts": 0},
                                 {"num_levels": 3, "expert_units": [4]}])
def test_ple_matches_numpy_reference(cfg):
    layer, x = _random_ple(**cfg)
    np.testing.assert_allclose(np.asarray(layer(x)), ple_reference(x, layer), rtol=1e-4, atol=1e-5)
    assert layer.compute_output_shape(x.shape) == (8, layer.num_tasks, layer.expert_units[-1])


def test_ple_gates_sum_to_one_and_dropout_acts_only_in_training():
    layer, x = _random_ple(gate_dropout=0.5)
    xt = np.repeat(x[:, None, :], layer.num_tasks, axis=1)
    for training in (False, True):
        g, gs = layer.gates(xt, x, 0, training=training)
        np.testing.assert_allclose(np.asarray(g).sum(-1), 1.0, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(gs).sum(-1), 1.0, rtol=1e-5)
    g_inf, _ = layer.gates(xt, x, 0, training=False)
    assert np.all(np.asarray(g_inf) > 0)  # inference: a plain softmax
    g_tr, _ = layer.gates(xt, x, 0, training=True)
    assert np.mean(np.asarray(g_tr) == 0) > 0.2  # about half the weights dropped
    np.testing.assert_allclose(np.asarray(layer(x, training=False)), np.asarray(layer(x)), rtol=1e-6)
    assert not np.allclose(np.asarray(layer(x, training=True)), np.asarray(layer(x)))


def test_task_specific_experts_serve_only_their_task():
    """One level: changing task 0's own experts changes task 0's output and leaves the other tasks' untouched
    (what lets a sparse task keep capacity of its own)."""
    layer, x = _random_ple(num_levels=1)
    before = np.asarray(layer(x))
    kernel = layer.levels[0]["task_kernels"][0]
    k = np.asarray(kernel).copy()
    k[0] += 1.0
    kernel.assign(k)
    after = np.asarray(layer(x))
    assert not np.allclose(after[:, 0], before[:, 0])
    np.testing.assert_array_equal(after[:, 1:], before[:, 1:])


def test_ple_config_and_file_round_trip(tmp_path):
    layer, x = _random_ple(gate_dropout=0.1)
    clone = PLE.from_config(layer.get_config())
    clone.build(x.shape)
    clone.set_weights(layer.get_weights())
    np.testing.assert_allclose(np.asarray(clone(x)), np.asarray(layer(x)), rtol=1e-6)
    inp = keras.Input(shape=(6,))
    model = keras.Model(inp, PLE(3, 1, 1, [4], num_levels=2, name="ple")(inp))
    path = tmp_path / "ple.keras"
    model.save(path)
    np.testing.assert_allclose(keras.saving.load_model(path)(x), model(x), rtol=1e-6)


@pytest.mark.parametrize("kwargs,quoted", [
    ({"num_tasks": 0}, "num_tasks must be >= 1, got 0"),
    ({"task_experts": 0, "shared_experts": 0}, "task_experts + shared_experts must be >= 1"),
    ({"expert_units": []}, "expert_units must be a non-empty list"),
    ({"num_levels": 0}, "num_levels must be >= 1, got 0"),
    ({"gate_dropout": 1.0}, "gate_dropout must be in [0, 1), got 1.0"),
])
def test_ple_constructor_errors_quote_the_bad_value(kwargs, quoted):
    args = {"num_tasks": 2, "task_experts": 1, "shared_experts": 1, "expert_units": [4], **kwargs}
    with pytest.raises(ValueError) as err:
        PLE(**args)
    assert quoted in str(err.value)


def test_a_ple_ranker_trains_and_exports_both_signatures(tmp_path, synthetic_log):
    """``model.ple`` in the spec gives a PLE ranker that trains, and whose export passes the check that
    rank_candidates equals serving_default (export_run raises otherwise)."""
    import synthetic

    from ranking.export import export_run
    from ranking.runs import load_run
    from ranking.servable import load_servable
    from ranking.train import train

    config = synthetic.config(synthetic_log, ["segment", "user_id", "item_id"], ["click", "watch_time"], epochs=1,
                              batch_size=2048).with_model(ple={"task_experts": 1, "shared_experts": 1, "levels": 2})
    run_dir = train(config, tmp_path / "run", verbose=False)
    version = export_run(run_dir, tmp_path / "models", verbose=False)
    sv = load_servable(version)
    assert sv.config.model.ple is not None and {"serving_default", "rank_candidates"} <= set(sv.signatures)
    weights = [w.path for w in load_run(run_dir).models.serve.weights]
    assert any("ple" in p and "task_kernel" in p for p in weights)
