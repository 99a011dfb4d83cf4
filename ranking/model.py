"""Assembly of the ranking model, named after its diagram:

    raw inputs -> feature encoders (+ the candidate's target attention over each sequence) -> shared bottom MLP
    -> MMoE (E experts, one gate per task) -> task towers
    (features with ``towers``: encoder -> concatenated to those tasks' tower inputs, bypassing the bottom)
    bias features (position, device) -> PositionBiasTower -> + logit of the bias tasks   [training model]
    (position missing, device)       -> PositionBiasTower -> + logit of the bias tasks   [serving model]

Two Keras models share every layer: ``train`` (all features, logits per task, bias tower included) and
``serve`` (the serving features, served values per task). Serving does not know the position: as in the paper
(Zhao et al. 2019) it sets it to missing, the index position dropout trains, and adds the tower's logit there for
the request's device (a serving input when the spec has one). ``num_experts: 0`` gives a shared-bottom model.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras

from features.encoding import encode_feature, keras_dtype, lookup_layer, lookup_size, sequence_keys, sequence_query
from features.spec import RankstageConfig
from features.vocab import FeatureStats
from ranking.layers.bias_tower import MISSING, PositionBiasTower
from ranking.layers.mmoe import MMoE
from ranking.layers.ple import PLE
from ranking.layers.target_attention import TargetAttention
from ranking.tasks import ServedValue


@dataclass
class RankingModels:
    train: keras.Model  # inputs: all features; outputs: {task: (B, 1) logit}
    serve: keras.Model  # inputs: serving features (device, no position); outputs: {task: (B,) served value}
    bias_tower: PositionBiasTower | None
    optimizer: keras.optimizers.Optimizer | None = None  # the one training ended with (None when loaded from a run)


def _mlp(x, units: list[int], dropout: float, prefix: str):
    for i, u in enumerate(units):
        x = keras.layers.Dense(u, activation="relu", name=f"{prefix}_{i}")(x)
        if dropout > 0:
            x = keras.layers.Dropout(dropout, name=f"{prefix}_dropout_{i}")(x)
    return x


def _served_bias(tower: PositionBiasTower, idx: dict, x):
    """(B, 1) tower logit at position missing and the request's device (device missing when the spec has none).
    ``idx`` holds the bias lookups' outputs; only the device one is read, so position never reaches serving; ``x``
    (B, D) gives the batch size of a position-only tower."""
    if "device" in idx:
        return tower(None, idx["device"])
    return tower(keras.ops.full_like(x[:, 0], MISSING, dtype="int64"))


def build_models(config: RankstageConfig, stats: dict[str, FeatureStats]) -> RankingModels:
    """Build the training and serving models from the spec and the training log's statistics."""
    m, seed = config.model, config.training.seed
    inputs = {f.name: keras.Input(shape=(), dtype=keras_dtype(f), name=f.name) for f in config.features}
    shared: dict[str, list] = {}  # categorical / multi-valued name -> [lookup, embedding], shared with sequences
    encoded = {f.name: encode_feature(inputs[f.name], f, stats[f.name], m.embedding_dim, seed,
                                      match=inputs[f.match] if f.match else None, shared=shared)
               for f in config.model_features if f.kind != "sequence"}  # name -> (B, D_f)
    feats = {f.name: f for f in config.features}
    for f in config.model_features:
        if f.kind == "sequence":  # the candidate (query) attends over the user's events (keys)
            keys, valid = sequence_keys(inputs[f.name], f, feats, shared)  # (B, L, D_k), (B, L)
            attention = TargetAttention(f.embedding_dim or m.embedding_dim, f.sequence.units, f.sequence.softmax,
                                        name=f"{f.name}_attention")
            encoded[f.name] = attention(sequence_query(f, encoded), keys, valid)  # (B, D)
    encoded = {f.name: encoded[f.name] for f in config.model_features}  # config order
    bottom = [encoded[f.name] for f in config.bottom_features]
    x = keras.layers.Concatenate(name="features")(bottom) if len(bottom) > 1 else bottom[0]
    x = _mlp(x, m.bottom_units, m.dropout, "shared_bottom")
    if m.ple is not None:
        mixed = PLE(len(config.tasks), m.ple.task_experts, m.ple.shared_experts, m.expert_units, m.ple.levels,
                    m.gate_dropout, seed=seed, name="ple")(x)  # (B, T, H)
        tower_inputs = [mixed[:, i, :] for i in range(len(config.tasks))]
    elif m.num_experts > 0:
        mixed = MMoE(m.num_experts, m.expert_units, len(config.tasks), m.gate_dropout, seed=seed, name="mmoe")(x)
        tower_inputs = [mixed[:, i, :] for i in range(len(config.tasks))]  # T x (B, H)
    else:
        tower_inputs = [x] * len(config.tasks)

    bias_logit, served_bias, tower = None, None, None
    bt = m.bias_tower
    if config.bias_features:
        feats = {f.name: f for f in config.bias_features}
        idx, sizes = {}, {}
        for role in ("position", "device"):
            name = getattr(bt, role)
            if name is not None:
                f = feats[name]
                idx[role] = lookup_layer(f, stats[name], name=f"bias_{role}_lookup")(inputs[name])
                sizes[role] = lookup_size(f, stats[name])
        tower = PositionBiasTower(sizes.get("position", 1), sizes.get("device", 1), bt.position_dropout,
                                  seed=seed, name="position_bias_tower")
        bias_logit = tower(idx.get("position"), idx.get("device"))
        served_bias = _served_bias(tower, idx, x)

    train_out, serve_out = {}, {}
    for task, h in zip(config.tasks, tower_inputs):
        routed = [encoded[f.name] for f in config.tower_features(task.name)]  # features that skip the bottom
        if routed:
            h = keras.layers.Concatenate(name=f"{task.name}_tower_input")([h, *routed])
        h = _mlp(h, m.tower_units, m.dropout, f"{task.name}_tower")
        logit = keras.layers.Dense(1, name=f"{task.name}_logit")(h)  # (B, 1)
        served_logit = logit
        if bias_logit is not None and task.name in bt.tasks:
            served_logit = keras.layers.Add(name=f"{task.name}_served_logit")([logit, served_bias])
            logit = keras.layers.Add(name=f"{task.name}_debiased_logit")([logit, bias_logit])
        serve_out[task.name] = ServedValue(task.type, name=f"{task.name}_serve")(served_logit)
        train_out[task.name] = keras.layers.Identity(name=task.name)(logit)

    serve_inputs = {f.name: inputs[f.name] for f in config.serving_features}
    return RankingModels(
        train=keras.Model(inputs, train_out, name=f"{config.name}_train"),
        serve=keras.Model(serve_inputs, serve_out, name=f"{config.name}_serve"),
        bias_tower=tower,
    )
