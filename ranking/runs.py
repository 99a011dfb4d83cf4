"""A training run directory: its file names, and loading one back.

    config.yaml  stats.json  artifacts.json  model.weights.h5  metrics.json  history.json  tensorboard/
    validation_predictions.npz
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from features.spec import RankstageConfig, load_config
from features.vocab import FeatureStats, load_stats, save_stats
from ranking.model import RankingModels, build_models

PREDICTIONS = "validation_predictions.npz"  # the non-refit model's judged validation predictions


def _jsonable(v):
    """A numpy scalar as its Python value, for ``json.dumps``."""
    return v.item() if isinstance(v, np.generic) else v


@dataclass
class LoadedRun:
    """A run directory loaded back: its config, vocabularies, artifacts, rebuilt models and metrics report."""

    config: RankstageConfig
    stats: dict[str, FeatureStats]
    artifacts: dict
    models: RankingModels
    metrics: dict


def load_run(run_dir: str | Path) -> LoadedRun:
    """Rebuild the models of a run directory and load its weights."""
    run = Path(run_dir)
    for name in ("config.yaml", "stats.json", "artifacts.json", "model.weights.h5"):
        if not (run / name).exists():
            raise FileNotFoundError(f"--run {run}: missing {name}; is this a finished training run?")
    config = load_config(run / "config.yaml")
    stats = load_stats(run / "stats.json")
    models = build_models(config, stats)
    models.train.load_weights(run / "model.weights.h5")
    metrics_path = run / "metrics.json"
    return LoadedRun(config, stats, json.loads((run / "artifacts.json").read_text()), models,
                     json.loads(metrics_path.read_text()) if metrics_path.exists() else {})


OPTIMIZER_FILE = "optimizer.npz"


def adam_slots(optimizer, models: RankingModels):
    """Yield (variable, its ``key``, the slot) for Adam's first (``m/<path>``) and second (``v/<path>``) moment of
    each trainable variable of ``models`` (the list the optimizer was built on, in its order)."""
    for var, m, v in zip(models.train.trainable_variables, optimizer._momentums, optimizer._velocities, strict=True):
        yield var, f"m/{var.path}", m
        yield var, f"v/{var.path}", v


def optimizer_state(models: RankingModels) -> dict[str, np.ndarray]:
    """Adam's state after training: ``iterations`` and ``adam_slots``' moments by key (each the variable's shape)."""
    opt = models.optimizer
    state = {"iterations": np.asarray(int(opt.iterations.numpy()), dtype=np.int64)}
    state.update({key: np.asarray(slot.numpy()) for _, key, slot in adam_slots(opt, models)})
    return state


def save_run(out: Path, config: RankstageConfig, models: RankingModels, stats: dict[str, FeatureStats],
             artifacts: dict, history: dict[str, list[float]], report: dict) -> None:
    """Write what ``load_run`` reads, and the run's history and metrics report, into ``out``."""
    models.train.save_weights(out / "model.weights.h5")
    if models.optimizer is not None:  # what a warm start from this run continues with
        np.savez(out / OPTIMIZER_FILE, **optimizer_state(models))
    save_stats(stats, out / "stats.json")
    (out / "config.yaml").write_text(yaml.safe_dump(config.model_dump(), sort_keys=False))
    (out / "artifacts.json").write_text(json.dumps(artifacts, indent=2, default=_jsonable))
    (out / "history.json").write_text(json.dumps(history, indent=2))
    (out / "metrics.json").write_text(json.dumps(report, indent=2, default=_jsonable))
