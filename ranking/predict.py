"""Served values of an in-memory model over numpy inputs, in batches."""

from __future__ import annotations

import numpy as np

from ranking.datasets import make_dataset
from ranking.model import RankingModels


def predict(models: RankingModels, x: dict[str, np.ndarray], batch_size: int = 4096) -> dict[str, np.ndarray]:
    """Served values per task through the serving model: (N,) each."""
    parts: dict[str, list] = {}
    serve_x = {k: x[k] for k in models.serve.input}
    for batch in make_dataset(serve_x, None, batch_size):
        for k, v in models.serve(batch, training=False).items():
            parts.setdefault(k, []).append(np.asarray(v))
    return {k: np.concatenate(v) for k, v in parts.items()}
