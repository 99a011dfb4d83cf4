"""The exported model's signatures and their inputs: ``serving_default`` (C,) per feature, ``rank_candidates``
(user/context features once as (1,), item features (C,)), and ``rank_candidates_packed`` (its inputs packed by side
and dtype: request groups (1, k), candidate groups (C, k)).

C candidates; k the columns of a packed group.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from features.encoding import tf_dtype
from features.spec import RankstageConfig

SERVING_DEFAULT = "serving_default"
RANK_CANDIDATES = "rank_candidates"
REQUEST_GROUPS = ("user", "context")  # features sent once per request by rank_candidates


def input_signature(config: RankstageConfig) -> dict[str, tf.TensorSpec]:
    return {f.name: tf.TensorSpec([None], tf_dtype(f), name=f.name) for f in config.serving_features}


def request_features(config: RankstageConfig) -> list[str]:
    """Serving features sent once per request (user and context groups), in serving order."""
    return [f.name for f in config.serving_features if f.group in REQUEST_GROUPS]


def candidate_features(config: RankstageConfig) -> list[str]:
    """Serving features sent once per candidate (item group), in serving order."""
    return [f.name for f in config.serving_features if f.group not in REQUEST_GROUPS]


def rank_candidates_signature(config: RankstageConfig) -> dict[str, tf.TensorSpec]:
    """Inputs of ``rank_candidates``: (1,) per user/context feature, (C,) per item feature."""
    request = set(request_features(config))
    return {f.name: tf.TensorSpec([1] if f.name in request else [None], tf_dtype(f), name=f.name)
            for f in config.serving_features}


def packed_layout(config: RankstageConfig) -> dict[str, list[str]]:
    """``rank_candidates`` inputs grouped by side and dtype, in serving order: {"request_int64": [names], ...,
    "candidates_string": [names]} (only non-empty groups)."""
    request = set(request_features(config))
    layout: dict[str, list[str]] = {}
    for name, spec in rank_candidates_signature(config).items():
        layout.setdefault(f"{'request' if name in request else 'candidates'}_{spec.dtype.name}", []).append(name)
    return layout


def packed_signature(config: RankstageConfig) -> dict[str, tf.TensorSpec]:
    """Inputs of ``rank_candidates_packed``: (1, k) per request group, (C, k) per candidate group."""
    specs = rank_candidates_signature(config)
    return {g: tf.TensorSpec([1 if g.startswith("request_") else None, len(names)], specs[names[0]].dtype, name=g)
            for g, names in packed_layout(config).items()}


@dataclass(frozen=True)
class Packed:
    """``rank_candidates`` behind packed inputs: each (B, k) group unstacked into its k named (B,) columns."""

    inner: Callable[[dict], dict]
    layout: dict[str, list[str]]

    def __call__(self, packed: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        inputs: dict[str, tf.Tensor] = {}
        for group, names in self.layout.items():
            inputs.update(zip(names, tf.unstack(packed[group], num=len(names), axis=1)))
        return self.inner(inputs)


def rank_candidates_omitted(config: RankstageConfig) -> str | None:
    """Why ``rank_candidates`` cannot be exported for this model, or None if it can."""
    bottom = {f.name for f in config.bottom_features}  # not the bias tower's device, not tower-only features
    per_request = bottom - {f.name for f in config.bottom_features if f.kind == "sequence"}  # a sequence's slot is
    if not [n for n in request_features(config) if n in per_request]:  # per candidate
        return "the model has no user or context feature in its shared bottom: nothing to compute once per request"
    if not [n for n in candidate_features(config) if n in bottom]:
        return "the model has no item feature in its shared bottom: every input is per request"
    if not config.model.bottom_units:
        return "model.bottom_units is empty: no shared first dense layer to split into user and item parts"
    return None


def split_request(batch: dict[str, np.ndarray], config: RankstageConfig, row: int = 0
                  ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """C rows of serving inputs -> (rank_candidates inputs: row ``row``'s user/context values as (1,) and the C
    item columns, the same as serving_default inputs: that row's user/context values repeated C times)."""
    request = set(request_features(config))
    n = len(next(iter(batch.values())))
    ranked = {k: v[row:row + 1] if k in request else v for k, v in batch.items()}
    repeated = {k: np.repeat(v[row:row + 1], n) if k in request else v for k, v in batch.items()}
    return ranked, repeated
