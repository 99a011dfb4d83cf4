"""Daily warm start: the next version trained from its parent's weights on the new day(s) only.

The parent is a finished run directory (or an exported version, whose metadata names its run). The child's spec must
be the parent's: features, tasks, model, statistics and history definitions, joins' keys and the log's columns;
only paths, ``data.until``, the split and the training settings may differ (``spec_difference`` names the first
difference otherwise). Vocabularies grow: the parent's values keep their index (``oov + position``), the new days'
values not in them are appended (``grown_stats``); numeric normalisation stays the parent's, since the trained weights
expect it. Weights (``transfer_weights``): every variable of the same shape is copied; an embedding table that grew
keeps its old rows and its new rows start from the mean of its OOV rows (the row an unseen id used at serving
until now). Adam continues from the parent's state (``optimizer.npz`` in its run directory, ``restore_optimizer``;
a grown table's new rows take the mean of its OOV rows' moments, like their weights); a parent trained before runs
kept it, or ``training.warm_start_optimizer: false``, starts Adam fresh: its first steps then move every weight by
about the learning rate whatever its gradient's size.

``training.warm_start_update: embeddings`` updates the embedding tables and the task logits' biases only
(``dense_paths``: every other weight, the attention's, experts', gates' and towers', stays the parent's and so do
their Adam moments).

``training.warm_start_blend`` < 1 interpolates the dense weights between the parent's and the updated ones
(``blend_dense``); then, as after any training, ``training.recenter_biases`` (``ranking.recenter``) puts each binary
task's logit bias on the last new day's rate.

Lineage (in the run's ``artifacts.json`` and the exported metadata): the parent run, and the days every ancestor
trained on (``days_seen``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from features.spec import ConfigError, RankstageConfig
from features.vocab import FeatureStats
from ranking.model import RankingModels
from ranking.runs import OPTIMIZER_FILE, LoadedRun, adam_slots, load_run
from ranking.servable import METADATA_FILE, load_metadata

# config fields a child may change: where the data is, how much of it, and how training runs
FREE = {("name",), ("data", "log"), ("data", "until"), ("data", "validation_periods"), ("data", "statistics", "path"),
        ("training",)}


@dataclass
class Parent:
    run_dir: Path
    run: LoadedRun

    @property
    def days_seen(self) -> list:
        """Every day this model and its ancestors trained on, sorted."""
        art = self.run.artifacts
        seen = (art.get("lineage") or {}).get("days_seen") or art.get("train_periods", [])
        return sorted(set(seen))


def resolve_run(path: str | Path) -> Path:
    """A run directory, or the run an exported version's metadata names."""
    p = Path(path)
    if (p / "model.weights.h5").exists():
        return p
    if (p / "assets.extra" / METADATA_FILE).exists():
        run = Path(load_metadata(p)["run"])
        if not (run / "model.weights.h5").exists():
            raise ConfigError(f"--warm-start {p}: its run {run} (from the version's metadata) has no model.weights.h5")
        return run
    raise ConfigError(f"--warm-start {p}: neither a run directory (model.weights.h5) nor an exported version "
                      f"(assets.extra/{METADATA_FILE})")


def load_parent(path: str | Path) -> Parent:
    run_dir = resolve_run(path)
    return Parent(run_dir, load_run(run_dir))


def _strip_joins(data: dict) -> dict:
    for j in data.get("data", {}).get("joins") or []:
        j.pop("path", None)
    return data


def spec_difference(parent: RankstageConfig, child: RankstageConfig) -> str | None:
    """The first field where ``child``'s spec differs from ``parent``'s, as ``path: parent X, this Y``; None if the
    only differences are in ``FREE`` fields (and join paths)."""
    a, b = _strip_joins(parent.model_dump()), _strip_joins(child.model_dump())

    def walk(x, y, path: tuple) -> str | None:
        if any(path[:len(f)] == f for f in FREE):
            return None
        if isinstance(x, dict) and isinstance(y, dict):
            for k in list(x) + [k for k in y if k not in x]:
                found = walk(x.get(k), y.get(k), (*path, k))
                if found:
                    return found
            return None
        if (isinstance(x, list) and isinstance(y, list) and len(x) == len(y)
                and any(isinstance(u, dict) for u in x)):  # a list of specs (features, tasks): item by item
            for i, (u, v) in enumerate(zip(x, y, strict=True)):
                found = walk(u, v, (*path, i))
                if found:
                    return found
            return None
        if x != y:
            where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")
            return f"{where}: parent {x!r}, this {y!r}"
        return None

    return walk(a, b, ())


def check_spec(parent: Parent, config: RankstageConfig) -> None:
    diff = spec_difference(parent.run.config, config)
    if diff:
        raise ConfigError(f"--warm-start {parent.run_dir}: the spec differs from the parent's in more than "
                          f"vocabulary growth: {diff}")


def grown_stats(parent: dict[str, FeatureStats], new: dict[str, FeatureStats]) -> dict[str, FeatureStats]:
    """Per feature: the parent's vocabulary followed by the values of ``new``'s not in it (in ``new``'s order);
    everything else (mean, std) the parent's."""
    out = {}
    for name, old in parent.items():
        if old.vocabulary:
            known = set(old.vocabulary)
            added = [v for v in (new[name].vocabulary if name in new else []) if v not in known]
            out[name] = FeatureStats(vocabulary=list(old.vocabulary) + added, mean=old.mean, std=old.std)
        else:
            out[name] = old
    return out


def oov_rows(config: RankstageConfig) -> dict[str, int]:
    """Embedding layer name -> its OOV rows (the first rows of the table), for every vocabulary feature."""
    return {f"{f.name}_embedding": f.vocab.oov_buckets for f in config.features if f.vocab is not None}


def _layer(path: str) -> str:
    return path.split("/")[-2] if "/" in path else path


def grown_rows(old: np.ndarray, rows: int, oov: int) -> np.ndarray:
    """(old rows, d) -> (rows, d): ``old`` then new rows at the mean of its first ``oov`` (OOV) rows."""
    start = old[:oov].mean(axis=0, keepdims=True)
    return np.concatenate([old, np.repeat(start, rows - old.shape[0], axis=0)])


def transfer_weights(parent: RankingModels, child: RankingModels, config: RankstageConfig) -> dict[str, tuple]:
    """Copy ``parent``'s weights into ``child`` (built with grown vocabularies) by variable path; a grown embedding
    table keeps its rows and its new rows are the mean of its OOV rows. -> {path: (old rows, new rows)} of the
    tables that grew. A variable the parent lacks, or of another shape that is not a grown table, is a ConfigError."""
    oov = oov_rows(config)
    old = {v.path: v for v in parent.train.weights}
    grew = {}
    for v in child.train.weights:
        if v.path not in old:
            raise ConfigError(f"--warm-start: the parent has no variable {v.path!r}")
        w = np.asarray(old[v.path].numpy())
        if tuple(w.shape) == tuple(v.shape):
            v.assign(w)
            continue
        layer = _layer(v.path)
        if layer not in oov or w.ndim != 2 or v.shape[1] != w.shape[1] or v.shape[0] < w.shape[0]:
            raise ConfigError(f"--warm-start: variable {v.path!r} has shape {tuple(v.shape)}, the parent's "
                              f"{tuple(w.shape)}: not a vocabulary that grew")
        v.assign(grown_rows(w, v.shape[0], oov[layer]).astype(w.dtype))
        grew[v.path] = (int(w.shape[0]), int(v.shape[0]))
    return grew


def dense_paths(models: RankingModels, config: RankstageConfig) -> frozenset[str]:
    """What an embeddings-only update leaves as it is: the paths of every trainable variable outside the embedding
    tables (``keras.layers.Embedding``) and the task logits' biases (each task's base rate, which follows the day)."""
    import keras

    kept = {v.path for layer in models.train.layers if isinstance(layer, keras.layers.Embedding)
            for v in layer.trainable_variables}
    kept |= {models.train.get_layer(f"{t.name}_logit").bias.path for t in config.tasks}
    return frozenset(v.path for v in models.train.trainable_variables if v.path not in kept)


def blend_dense(parent: RankingModels, child: RankingModels, config: RankstageConfig, blend: float) -> int:
    """Each of ``child``'s ``dense_paths`` weights (trained on the new days) set to parent + ``blend`` x (trained -
    parent), in place: an interpolation of the two networks' dense weights (as WiSE-FT does for fine-tuning); the
    embedding tables and the logits' biases keep their whole update. -> how many variables were blended."""
    dense = dense_paths(child, config)
    before = {v.path: v for v in parent.train.weights}
    n = 0
    for v in child.train.weights:
        if v.path not in dense:
            continue
        if v.path not in before or tuple(before[v.path].shape) != tuple(v.shape):
            raise ConfigError(f"training.warm_start_blend: the parent has no variable {v.path!r} of shape "
                              f"{tuple(v.shape)}")
        p = before[v.path].numpy()
        v.assign(p + blend * (v.numpy() - p))
        n += 1
    return n


def parent_optimizer(parent: Parent) -> dict[str, np.ndarray] | None:
    """The parent run's saved Adam state (``ranking.runs.optimizer_state``), None if it kept none."""
    path = parent.run_dir / OPTIMIZER_FILE
    if not path.exists():
        return None
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def restore_optimizer(optimizer, child: RankingModels, state: dict[str, np.ndarray], config: RankstageConfig
                      ) -> int:
    """``state`` (the parent's Adam) into ``optimizer``, built on ``child``'s trainable variables: its step count,
    and each variable's moments by path; a grown embedding table's new rows get the mean of the old OOV rows'
    moments. -> how many variables' moments were restored (every one, or a ConfigError names the first missing)."""
    oov = oov_rows(config)
    optimizer.iterations.assign(int(state["iterations"]))
    for var, key, slot in adam_slots(optimizer, child):
        if key not in state:
            raise ConfigError(f"--warm-start: the parent's optimizer state has no {key!r}")
        old = state[key]
        if old.shape != tuple(slot.shape):  # a table that grew (transfer_weights checked the shapes)
            old = grown_rows(old, slot.shape[0], oov[_layer(var.path)])
        slot.assign(np.asarray(old, dtype=slot.dtype))
    return len(child.train.trainable_variables)


def lineage(parent: Parent, days: list) -> dict:
    return {"parent": str(parent.run_dir), "parent_days_seen": parent.days_seen,
            "days_seen": sorted(set(parent.days_seen) | set(days)), "days": sorted(days)}
