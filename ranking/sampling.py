"""Negative down-sampling, the per-task training targets it implies, and the logits' initial values.

N rows of the training log; labels are (N,) per task (``features.logs.task_labels``).
"""

from __future__ import annotations

import numpy as np

from features.spec import RankstageConfig
from ranking.tasks import prepare_targets


def sample_negatives(labels: dict[str, np.ndarray], config: RankstageConfig, seed: int
                     ) -> tuple[np.ndarray, np.ndarray, dict[str, dict]]:
    """Keep rows whose sampling-task label is 0 with probability a -> (keep (N,) bool, row weight (N,), rates).

    Only the sampled task (``training.negative_sampling.task``) trains unweighted on the thinned rows and is corrected
    at serving, p = a q / ((1 - q) + a q) (method "correct_downsampling", kept fraction a). Every other task, binary
    or not, weights the kept negatives of the sampled task by 1/a (importance weighting), so its served value needs
    no correction (method "importance_weighted"). A task conditioned on the sampled task only sees its positives,
    which are never thinned, so the weight is 1 on every row it counts.
    """
    ns = config.training.negative_sampling
    n = len(next(iter(labels.values())))
    rate = ns.keep_fraction if ns.task is not None else 1.0
    neg = labels[ns.task] == 0 if ns.task is not None else np.zeros(n, dtype=bool)
    rng = np.random.default_rng(seed)
    keep = ~neg | (rng.random(n) < rate)
    inv = np.where(neg, 1.0 / rate, 1.0)
    sampling = {}
    for t in config.tasks:
        if t.name == ns.task:
            sampling[t.name] = {"kept_fraction": rate, "method": "correct_downsampling"}
        else:
            sampling[t.name] = {"kept_fraction": 1.0, "method": "importance_weighted",
                                "negative_weight": 1.0 / rate}
    return keep, inv[keep], sampling


def targets(config: RankstageConfig, labels: dict[str, np.ndarray], row_weight: np.ndarray,
            weight_scales: dict[str, float]) -> dict[str, np.ndarray]:
    """Per task (N, 2) [target, weight] arrays; the sampled task ignores ``row_weight`` (it is corrected instead)."""
    sampled = config.training.negative_sampling.task
    ones = np.ones_like(row_weight)
    return {t.name: prepare_targets(t, labels[t.name], ones if t.name == sampled else row_weight,
                                    labels[t.condition] if t.condition else None,
                                    weight_scales.get(t.name, 1.0)) for t in config.tasks}


def initial_logits(config: RankstageConfig, labels: dict[str, np.ndarray], row_weight: np.ndarray | None = None
                   ) -> dict[str, float]:
    """Start each logit at its base rate (log-odds; log mean seconds for watch time) so rare tasks train at once.

    ``labels`` (N,) per task, ``row_weight`` (N,) the importance weights ``targets`` gives every task but the
    sampled one (None: 1). Rows count where the label is finite and, for a conditioned task, its condition is 1.
    """
    sampled = config.training.negative_sampling.task
    out = {}
    for t in config.tasks:
        rows = np.isfinite(labels[t.name])
        if t.condition:
            rows &= labels[t.condition] == 1
        y = labels[t.name][rows]
        w = np.ones(len(y)) if row_weight is None or t.name == sampled else row_weight[rows]
        out[t.name] = prior_logit(t.type, float(np.average(y, weights=w)) if len(y) else 0.5)
    return out


def prior_logit(task_type: str, mean: float) -> float:
    """A task's initial logit from its weighted mean label: log mean seconds for watch time (floored at 1 ms), the
    log-odds (mean clipped to [1e-4, 1 - 1e-4]) otherwise. ``initial_logits`` and ``ranking.shards``' streamed
    label summaries both call it."""
    if task_type == "watch_time":
        return float(np.log(max(mean, 1e-3)))
    m = min(max(mean, 1e-4), 1 - 1e-4)
    return float(np.log(m / (1 - m)))
