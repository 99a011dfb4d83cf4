"""Vocabularies and numeric statistics built from the training log, stored as JSON with the run."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from features.logs import MISSING_INT, MISSING_STRING
from features.spec import FeatureSpec


@dataclass(frozen=True)
class FeatureStats:
    """What one feature learned from the training log. ``vocabulary`` excludes missing values,
    which always land in an OOV bucket; ``mean``/``std`` are after the transform and default fill."""

    vocabulary: list[int] | list[str] = field(default_factory=list)
    mean: float = 0.0
    std: float = 1.0


def transform_numeric(x: np.ndarray, feature: FeatureSpec) -> np.ndarray:
    """NaN/inf -> default, then the feature's transform. (N,) float -> (N,) float. Mirrors NumericEncoder."""
    x = np.where(np.isfinite(x), x, feature.default).astype(np.float64)
    if feature.transform == "log1p":
        x = np.log1p(np.maximum(x, 0.0))
    return x


def split_multi(values: np.ndarray, feature: FeatureSpec) -> list[str]:
    """All tokens of a multi-valued string column, split as ``SplitValues`` does (strip, split, first L)."""
    out: list[str] = []
    for v in values:
        if v:
            out.extend(t for t in v.strip().split(feature.separator)[: feature.max_values] if t)
    return out


def match_counts(lists: np.ndarray, ids: np.ndarray, feature: FeatureSpec) -> np.ndarray:
    """(N,) float: per row, how many of the first ``max_values`` tokens of the list equal the row's id (as a decimal
    string for ints). Mirrors ``SplitValues`` + ``MatchCount``."""
    return np.array([split_multi((text,), feature).count(str(value)) for text, value in zip(lists, ids)],
                    dtype=np.float64)


def value_counts(values: np.ndarray | list, feature: FeatureSpec) -> Counter:
    """How often each value occurs (missing values left out): what ``build_vocabulary`` orders. Counts of disjoint
    parts of a log add up (``Counter`` +) to the whole log's."""
    missing = MISSING_INT if feature.raw_dtype == "int" else MISSING_STRING
    counts = pd.Series(np.asarray(values, dtype=object) if isinstance(values, list) else values).value_counts()
    return Counter({v: int(c) for v, c in zip(counts.index.tolist(), counts.tolist()) if v != missing})


def vocabulary_from_counts(counts: Counter, feature: FeatureSpec) -> list:
    """Values with count >= min_count, most frequent first (ties by value), capped at max_size."""
    assert feature.vocab is not None
    kept = [(v, c) for v, c in counts.items() if c >= feature.vocab.min_count]
    kept.sort(key=lambda vc: (-vc[1], vc[0]))
    vocab = [v for v, _ in kept][: feature.vocab.max_size]
    return [int(v) for v in vocab] if feature.raw_dtype == "int" else [str(v) for v in vocab]


def build_vocabulary(values: np.ndarray | list, feature: FeatureSpec) -> list:
    """Values with count >= min_count, most frequent first (ties by value), capped at max_size."""
    return vocabulary_from_counts(value_counts(values, feature), feature)


def numeric_stats(mean: float, std: float) -> FeatureStats:
    """A numeric feature's statistics (after ``transform_numeric``); a constant feature keeps std 1."""
    return FeatureStats(mean=float(mean), std=float(std) if std > 1e-12 else 1.0)


def build_stats(raw: dict[str, np.ndarray], features: list[FeatureSpec]) -> dict[str, FeatureStats]:
    """Per-feature statistics from training rows ``raw`` (name -> (N,) raw values)."""
    stats: dict[str, FeatureStats] = {}
    for f in features:
        x = raw[f.name]
        if f.kind in ("numeric", "match"):
            t = transform_numeric(match_counts(x, raw[f.match], f) if f.kind == "match" else x, f)
            stats[f.name] = numeric_stats(t.mean(), t.std())
        elif f.kind == "categorical" and f.vocab is not None:
            stats[f.name] = FeatureStats(vocabulary=build_vocabulary(x, f))
        elif f.kind == "multi_valued" and f.vocab is not None:
            stats[f.name] = FeatureStats(vocabulary=build_vocabulary(split_multi(x, f), f))
        else:
            stats[f.name] = FeatureStats()
    return stats


def save_stats(stats: dict[str, FeatureStats], path: Path) -> None:
    path.write_text(json.dumps({k: asdict(v) for k, v in stats.items()}))


def load_stats(path: Path) -> dict[str, FeatureStats]:
    return {k: FeatureStats(**v) for k, v in json.loads(path.read_text()).items()}
