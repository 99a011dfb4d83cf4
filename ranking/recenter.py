"""Each binary task's logit bias recentred on the last day a model trained on: the bias is shifted so the mean
served (down-sampling-corrected) prediction on that day's rows equals its observed rate.

Feeds drift daily in base rate; a model trained on many days (or updated on one from a parent) predicts a mean
somewhere between them, and its next-day level (predicted / observed mean) wanders by seed: 0.90-1.13 for like on
the KuaiRand chain. One prediction pass over the last day and a scalar Newton solve per task put the intercept on
the newest rate; AUC and GAUC are unchanged (a shift of one task's logit keeps its order). Measured on the daily
chain: ``benchmarks/results/daily_chain.md``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from features.spec import RankstageConfig
from ranking.judging import judged_from_records, judged_predictions
from ranking.model import RankingModels


def bias_shift(y: np.ndarray, p: np.ndarray, iterations: int = 50) -> float:
    """The logit shift d with mean(sigmoid(logit(p) + d)) = mean(y), by Newton's method (the mean is increasing in
    d, so the root is unique). ``y``: (N,) labels in {0, 1}, ``p``: (N,) predictions in (0, 1). The rate is clipped
    to [0.5 / N, 1 - 0.5 / N] so a day without positives gives a finite shift."""
    n = len(y)
    target = float(np.clip(np.mean(y), 0.5 / n, 1 - 0.5 / n))
    q = np.clip(np.asarray(p, np.float64), 1e-7, 1 - 1e-7)
    z, d = np.log(q / (1 - q)), 0.0
    for _ in range(iterations):
        m = 1 / (1 + np.exp(-(z + d)))
        step = (m.mean() - target) / max(float((m * (1 - m)).mean()), 1e-12)
        d -= float(np.clip(step, -4, 4))
        if abs(step) < 1e-10:
            break
    return d


def recenter_biases(models: RankingModels, config: RankstageConfig, rows, sampling: dict[str, dict]
                    ) -> dict[str, float]:
    """Shift each binary task's ``<task>_logit`` bias, in place, by ``bias_shift`` of the model's served,
    down-sampling-corrected predictions on ``rows`` (one day: a joined frame or a ``ranking.shards.Source`` of its
    shards), judged as the reports judge (a task's condition's positives). The correction adds log(kept fraction)
    to the logit, so the shift carries over unchanged. Tasks with no judged row keep their bias. -> shift per task."""
    judged = (judged_predictions(config, models, rows, sampling) if isinstance(rows, pd.DataFrame) else
              judged_from_records(config, models, rows, sampling, batch_size=65536))  # a day in 1-2 calls
    shifts = {}
    for t in config.tasks:
        if t.type != "binary" or t.name not in judged or len(judged[t.name][0]) == 0:
            continue
        y, p, _, _ = judged[t.name]
        d = bias_shift(np.asarray(y), np.asarray(p))
        bias = models.train.get_layer(f"{t.name}_logit").bias
        bias.assign(bias.numpy() + np.float32(d))
        shifts[t.name] = d
    return shifts
