"""Tasks: how each behaviour's label becomes a training target, its loss, and its served value.

Every task trains one logit z with a weighted binary cross-entropy; tasks differ in target and weight:
- binary: y in {0, 1}; served sigmoid(z).
- watch_time (t seconds): weighted logistic regression, y = t / (1 + t) with weight (1 + t), i.e.
  loss = -t log s(z) - log(1 - s(z)); its minimiser has odds exp(z) = E[t], so serving returns exp(z) seconds,
  with z clipped at log(MAX_WATCH_SECONDS) so a runaway logit serves a finite value, not inf.
- completion (ratio in [0, 1]): soft-label BCE; served sigmoid(z).
A task with a ``condition`` only counts rows where that binary task's label is 1.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from features.spec import TaskSpec

MAX_WATCH_SECONDS = 1e6  # served watch time ceiling (~11.6 days): exp(z) of float32 overflows from z > 88.7
MAX_WATCH_LOGIT = float(np.log(MAX_WATCH_SECONDS))


def watch_time_weight_scale(seconds: np.ndarray) -> float:
    """1 / mean(1 + t) over training rows, so watch-time weights average ~1 (loss scale like BCE)."""
    return float(1.0 / np.mean(1.0 + seconds)) if len(seconds) else 1.0


def prepare_targets(task: TaskSpec, label: np.ndarray, row_weight: np.ndarray,
                    condition: np.ndarray | None = None, weight_scale: float = 1.0) -> np.ndarray:
    """(N,) label, (N,) row weight -> (N, 2) float32 [target, weight]; NaN labels get weight 0."""
    valid = np.isfinite(label)
    y = np.where(valid, label, 0.0)
    w = row_weight * valid
    if condition is not None:
        w = w * (condition == 1)
    if task.type == "watch_time":
        y, w = y / (1.0 + y), w * (1.0 + y) * weight_scale
    return np.stack([y, w], axis=1).astype(np.float32)


@keras.saving.register_keras_serializable(package="rankstage")
def weighted_bce_from_logits(y_true, y_pred):
    """(B, 2) [target, weight], (B, 1) logit -> (B,) weighted, numerically stable BCE."""
    y, w = y_true[:, 0], y_true[:, 1]
    z = ops.cast(y_pred[:, 0], y.dtype)
    return w * (ops.maximum(z, 0.0) - z * y + ops.log1p(ops.exp(-ops.abs(z))))


def pairwise_bce_from_logits(pairwise_weight: float, list_loss: str = "ranknet"):
    """The weighted BCE plus ``pairwise_weight`` x a within-list ranking loss over the batch's rows of weight > 0
    grouped by list id:

    - "ranknet": the mean of log(1 + exp(-(z_i - z_j))) over pairs (i, j) of one list with y_i > y_j;
    - "softmax": per list with positives, -sum_i y_i / P * log softmax(z over the list)_i (P its positives), averaged
      over those lists.

    (B, 3) [target, weight, list id], (B, 1) logit -> (B,): each row's BCE plus the batch's ranking term (so the
    mean over rows adds it once). A batch without pairs (lists with positives) adds 0."""
    if list_loss not in ("ranknet", "softmax"):
        raise ValueError(f"list_loss: {list_loss!r} is not 'ranknet' or 'softmax'")

    def loss(y_true, y_pred):
        y, w, g = y_true[:, 0], y_true[:, 1], y_true[:, 2]
        z = ops.cast(y_pred[:, 0], y.dtype)
        bce = w * (ops.maximum(z, 0.0) - z * y + ops.log1p(ops.exp(-ops.abs(z))))
        valid = ops.cast(ops.greater(w, 0.0), y.dtype)
        same = ops.cast(ops.equal(g[:, None], g[None, :]), y.dtype) * valid[:, None] * valid[None, :]  # (B, B)
        if list_loss == "ranknet":
            pairs = same * ops.cast(ops.greater(y[:, None], y[None, :]), y.dtype)
            term = ops.sum(pairs * ops.softplus(z[None, :] - z[:, None])) / ops.maximum(ops.sum(pairs), 1.0)
        else:
            top = ops.max(ops.where(same > 0, z[None, :], ops.min(z)), axis=1)  # (B,) each row's list max
            gap = ops.where(same > 0, z[None, :] - top[:, None], -100.0)  # (B, B), <= 0: no overflow across lists
            lse = ops.log(ops.maximum(ops.sum(same * ops.exp(gap), axis=1), 1e-30)) + top
            share = valid * y / ops.maximum(ops.sum(same * y[None, :], axis=1), 1.0)  # y_i / P of i's list
            term = ops.sum(share * (lse - z)) / ops.maximum(ops.sum(share), 1.0)
        return bce + pairwise_weight * term

    return loss


@keras.saving.register_keras_serializable(package="rankstage")
class ServedValue(keras.layers.Layer):
    """(B, 1) logit -> (B,) served value: exp(min(z, log 1e6)) seconds for watch_time, sigmoid(z) otherwise."""

    def __init__(self, task_type: str, **kwargs):
        super().__init__(**kwargs)
        if task_type not in ("binary", "watch_time", "completion"):
            raise ValueError(f"ServedValue: unknown task type {task_type!r}")
        self.task_type = task_type

    def call(self, logit):
        z = logit[:, 0]
        return ops.exp(ops.minimum(z, MAX_WATCH_LOGIT)) if self.task_type == "watch_time" else ops.sigmoid(z)

    def compute_output_shape(self, input_shape):
        return (input_shape[0],)

    def get_config(self):
        return {**super().get_config(), "task_type": self.task_type}

