"""The declarative spec: features, tasks, model, training and data, loaded from one YAML file.

Every section is a pydantic model validated at load; errors name the field and the bad value, e.g.
``features[3].kind: Input should be 'categorical', 'numeric', 'multi_valued', 'bucketized', 'match' or
'sequence' (got 'catgorical')``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

FeatureKind = Literal["categorical", "numeric", "multi_valued", "bucketized", "match", "sequence"]
FeatureGroup = Literal["user", "item", "context", "bias"]
RawDType = Literal["int", "string", "float"]
TaskType = Literal["binary", "watch_time", "completion"]


class ConfigError(ValueError):
    """A config or input that cannot be used; the message names the field and the value."""


class Strict(BaseModel):
    """Base of every typed config (ranking, serving, fusion, retrieval): unknown fields refused, values frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class VocabPolicy(Strict):
    """Vocabulary built from the training log: values seen at least ``min_count`` times, plus OOV buckets."""

    min_count: int = Field(1, ge=1)
    oov_buckets: int = Field(1, ge=1)
    max_size: int | None = Field(None, ge=1)
    # training only: this fraction of rows (of tokens, for multi_valued) is looked up as OOV, so the OOV embedding
    # learns what serving sends for ids the vocabulary lacks (new users, new videos) instead of the few rare ids
    # below min_count
    oov_dropout: float = Field(0.0, ge=0.0, lt=1.0)


class SequenceField(Strict):
    """One ``:``-separated field of each event of a sequence: ``target`` names a categorical or multi-valued item
    feature whose lookup and embedding table it shares (the candidate's value of it is part of the attention query),
    else ``boundaries`` bucket a number (play ratio, age) into its own ``embedding_dim``-wide table (key only)."""

    target: str | None = None
    boundaries: list[float] | None = None
    embedding_dim: int = Field(4, ge=1)

    @model_validator(mode="after")
    def _one_source(self) -> SequenceField:
        if (self.target is None) == (self.boundaries is None):
            raise ValueError(f"give exactly one of 'target' or 'boundaries', got target {self.target!r}, "
                             f"boundaries {self.boundaries!r}")
        b = self.boundaries
        if b is not None and (not b or any(not math.isfinite(x) for x in b) or any(x >= y for x, y in zip(b, b[1:]))):
            raise ValueError(f"'boundaries' must be finite and strictly increasing, got {b!r}")
        return self


class SequenceSpec(Strict):
    """A sequence feature's events: their fields in token order (the first shares the candidate's id embedding) and
    the target-attention MLP's hidden widths (``ranking/layers/target_attention.py``)."""

    fields: list[SequenceField] = Field(min_length=1)
    units: list[int] = [32]
    softmax: bool = False  # normalise the attention weights over the events (DIN does not)

    @field_validator("units")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if not v or any(u < 1 for u in v):
            raise ValueError(f"units must be a non-empty list of widths >= 1, got {v!r}")
        return v

    @model_validator(mode="after")
    def _first_is_a_target(self) -> SequenceSpec:
        if self.fields[0].target is None:
            raise ValueError("fields[0] must have a 'target' (the event's item id, matched against the candidate's)")
        return self


class FeatureSpec(Strict):
    """One model input: where it comes from, how it is encoded and how big its embedding is."""

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    kind: FeatureKind
    column: str | None = None  # source column; defaults to ``name``
    dtype: RawDType | None = None  # raw value type at serving; defaults by kind
    group: FeatureGroup = "item"
    bias: bool = False  # feeds only the shallow bias tower; the tower's device is also a serving context input
    # None: feeds the shared bottom. A list of task names: feeds only those tasks' towers (its encoding concatenated
    # to each one's tower input), so its signal cannot move the shared layers other tasks use
    towers: list[str] | None = None
    vocab: VocabPolicy | None = None
    hash_bins: int | None = Field(None, ge=2)
    embedding_dim: int | None = Field(None, ge=1)
    transform: Literal["none", "log1p"] = "none"
    default: float = 0.0  # numeric value used for NaN / missing
    boundaries: list[float] | None = None  # bucketized
    separator: str = ","  # multi_valued, match
    max_values: int = Field(8, ge=1)  # multi_valued, match: values kept per row (the first ones)
    # kind match: the name of a categorical candidate feature. This feature's raw value is a list of ids (the user's
    # recent history, newest first, e.g. the authors shown earlier today: ``data.history`` derives it from the log);
    # its encoding is how many of them equal the candidate's value of ``match`` (after ``transform``, normalised)
    match: str | None = None
    # kind sequence: the raw value is a list of the user's past events, newest first, each event ``:``-separated
    # fields (a ``data.history`` list with several columns); the candidate attends over them (``max_values`` events,
    # ``embedding_dim`` the attention width D, default ``model.embedding_dim``). A user-side input: sent once per
    # request, the keys computed once by ``rank_candidates``
    sequence: SequenceSpec | None = None

    @property
    def source(self) -> str:
        return self.column or self.name

    @property
    def raw_dtype(self) -> RawDType:
        if self.dtype is not None:
            return self.dtype
        return {"categorical": "int", "numeric": "float", "multi_valued": "string", "bucketized": "float",
                "match": "string", "sequence": "string"}[
            self.kind
        ]

    @model_validator(mode="after")
    def _check_kind(self) -> FeatureSpec:
        where = f"feature {self.name!r}"
        if self.kind in ("categorical", "multi_valued"):
            if (self.vocab is None) == (self.hash_bins is None):
                raise ValueError(f"{where}: give exactly one of 'vocab' or 'hash_bins' for kind {self.kind!r}")
            if self.kind == "multi_valued" and self.raw_dtype != "string":
                raise ValueError(f"{where}: multi_valued features are strings, got dtype {self.dtype!r}")
            if self.raw_dtype == "float":
                raise ValueError(f"{where}: categorical ids are 'int' or 'string', got dtype 'float'")
        elif self.vocab is not None or self.hash_bins is not None:
            raise ValueError(f"{where}: 'vocab'/'hash_bins' only apply to categorical features, not {self.kind!r}")
        if self.kind == "bucketized":
            b = self.boundaries
            if not b or any(not math.isfinite(x) for x in b) or any(x >= y for x, y in zip(b, b[1:])):
                raise ValueError(f"{where}: 'boundaries' must be finite and strictly increasing, got {b!r}")
        if (self.kind == "match") != (self.match is not None):
            raise ValueError(f"{where}: kind 'match' needs 'match' (the candidate feature to count), and 'match' "
                             f"needs kind 'match'; got kind {self.kind!r}, match {self.match!r}")
        if self.kind == "match" and self.raw_dtype != "string":
            raise ValueError(f"{where}: a match feature's raw value is a string list, got dtype {self.dtype!r}")
        if (self.kind == "sequence") != (self.sequence is not None):
            raise ValueError(f"{where}: kind 'sequence' needs 'sequence' (its fields), and 'sequence' needs kind "
                             f"'sequence'; got kind {self.kind!r}, sequence {self.sequence!r}")
        if self.kind == "sequence":
            if self.raw_dtype != "string":
                raise ValueError(f"{where}: a sequence feature's raw value is a string list, got dtype {self.dtype!r}")
            if self.group != "user":
                raise ValueError(f"{where}: a sequence is the user's, sent once per request: group must be 'user', "
                                 f"got {self.group!r}")
            if self.towers is not None:
                raise ValueError(f"{where}: a sequence feature feeds the shared bottom; 'towers' must be unset, "
                                 f"got {self.towers!r}")
        if self.kind == "numeric" and self.raw_dtype != "float":
            raise ValueError(f"{where}: numeric features have dtype 'float', got {self.dtype!r}")
        if not math.isfinite(self.default):
            raise ValueError(f"{where}: 'default' must be finite, got {self.default!r}")
        if self.bias and self.kind != "categorical":
            raise ValueError(f"{where}: bias features must be categorical, got kind {self.kind!r}")
        if self.bias and self.vocab is not None and self.vocab.oov_dropout > 0:
            raise ValueError(f"{where}: 'vocab.oov_dropout' does not apply to bias features (the bias tower has "
                             f"position_dropout), got {self.vocab.oov_dropout!r}")
        if self.bias != (self.group == "bias"):
            raise ValueError(f"{where}: set both 'bias: true' and 'group: bias' or neither")
        return self


class TaskSpec(Strict):
    """One predicted behaviour: its label, how it is trained and served, and its loss weight."""

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    type: TaskType
    label: str  # a column name, or a pandas expression over columns (e.g. "play_time_ms / duration_ms")
    scale: float = Field(1.0, gt=0)  # watch_time: multiply the label into seconds (ms -> s: 0.001)
    condition: str | None = None  # name of a binary task whose label must be 1 for this task to count
    loss_weight: float = Field(1.0, ge=0)
    max_value: float | None = Field(None, gt=0)  # watch_time: clip seconds at this value

    @field_validator("loss_weight", "scale")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError(f"must be finite, got {v!r}")
        return v


class BiasTowerConfig(Strict):
    """Shallow tower on position x device; its logit is added to ``tasks`` in training only."""

    position: str | None = None  # name of a bias feature
    device: str | None = None  # name of a bias feature
    tasks: list[str] = ["click"]
    position_dropout: float = Field(0.1, ge=0, lt=1)


class PLEConfig(Strict):
    """Progressive Layered Extraction in place of the MMoE: per level, ``task_experts`` experts of each task's own
    and ``shared_experts`` shared ones (widths ``model.expert_units``), gated per task; ``levels`` stacked."""

    task_experts: int = Field(1, ge=0)
    shared_experts: int = Field(2, ge=0)
    levels: int = Field(2, ge=1)

    @model_validator(mode="after")
    def _some_expert(self) -> PLEConfig:
        if self.task_experts + self.shared_experts < 1:
            raise ValueError(f"task_experts + shared_experts must be >= 1, got {self.task_experts} + "
                             f"{self.shared_experts}")
        return self


class ModelConfig(Strict):
    """Sizes of the shared bottom, the MMoE and the task towers. ``num_experts: 0`` is shared-bottom; ``ple`` set
    replaces the MMoE by PLE (``num_experts`` is then unused)."""

    embedding_dim: int = Field(16, ge=1)
    bottom_units: list[int] = [256]
    num_experts: int = Field(4, ge=0)
    expert_units: list[int] = [128]
    gate_dropout: float = Field(0.1, ge=0, lt=1)
    ple: PLEConfig | None = None
    tower_units: list[int] = [64]
    dropout: float = Field(0.0, ge=0, lt=1)
    bias_tower: BiasTowerConfig = BiasTowerConfig()

    @field_validator("bottom_units", "expert_units", "tower_units")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(u < 1 for u in v):
            raise ValueError(f"layer widths must be >= 1, got {v!r}")
        return v


class NegativeSampling(Strict):
    """Keep each training row whose ``task`` label is 0 with probability ``keep_fraction`` (``task: null``: off)."""

    task: str | None = "click"
    keep_fraction: float = Field(1.0, gt=0, le=1)


class TrainingConfig(Strict):
    batch_size: int = Field(1024, ge=1)
    epochs: int = Field(10, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    early_stopping_patience: int = Field(1, ge=0)
    # what early stopping and the best epoch follow on the validation rows: "val_loss" (lower is better) or
    # "<task>/<auc|gauc|ndcg@5>" (higher is better; e.g. "click/gauc", within-user ranking)
    early_stopping_metric: str = Field("val_loss", pattern=r"^(val_loss|[^/\s]+/(auc|gauc|ndcg@5))$")
    negative_sampling: NegativeSampling = NegativeSampling()
    # a within-list pairwise loss on one binary task (e.g. "click"): batches hold whole user-day lists (their order
    # shuffled each epoch) and the task's loss adds pairwise_weight x the mean logistic loss over the pairs of one
    # list with different labels (RankNet), the within-user ordering GAUC measures. None: rows shuffled, no pairs
    # (list_loss "softmax": instead of pairs, the softmax cross-entropy of each list's positives among its rows)
    pairwise_task: str | None = None
    pairwise_weight: float = Field(1.0, ge=0)
    list_loss: Literal["ranknet", "softmax"] = "ranknet"
    seed: int = 0
    # a warm start (rankstage train --warm-start) continues the parent's Adam state when its run kept one; false:
    # Adam starts fresh
    warm_start_optimizer: bool = True
    # what a warm start updates: "all" weights, or "embeddings": the embedding tables and the task logits' biases
    # (every other weight stays the parent's: attention, experts, gates, towers). Measured on the daily chain:
    # benchmarks/results/daily_chain.md
    warm_start_update: Literal["all", "embeddings"] = "all"
    # the fraction of its update a warm start's dense weights keep (ranking.warm_start.blend_dense): after training
    # on the new day(s), each weight outside the embedding tables and the logits' biases becomes parent + blend x
    # (trained - parent); 1 keeps the update whole. 0.25 halved the click GAUC loss of the whole update on the
    # daily chain at no cost beyond the paired intervals elsewhere (benchmarks/results/daily_chain.md)
    warm_start_blend: float = Field(0.25, ge=0, le=1)
    # after training (a warm start: after its update), shift each binary task's logit bias so its mean served
    # prediction on the last day trained on equals that day's observed rate (ranking.recenter)
    recenter_biases: bool = True


class JoinSpec(Strict):
    """A side table left-joined onto the log on column ``key`` (or a composite key, a list of columns, as the
    user x author statistics table has); ``missing_values`` become NaN."""

    path: str
    key: str | list[str]
    columns: list[str] | None = None
    missing_values: list[float | str] = []

    @property
    def keys(self) -> list[str]:
        """The key's columns: one, or several for a composite key."""
        return [self.key] if isinstance(self.key, str) else list(self.key)


class StatisticsKey(Strict):
    """One statistics table: the log's events aggregated per value of ``columns`` (one id, or a composite key such
    as user x author). ``group`` is the group of the features it yields: ``user`` when every key column is known from
    the request, else ``item`` (per candidate)."""

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    columns: list[str] = Field(min_length=1)
    group: Literal["user", "item"] = "item"

    @field_validator("columns")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"key columns must be distinct, got {v!r}")
        return v


class WatchTimeStatistic(Strict):
    column: str
    scale: float = Field(1.0, gt=0)  # into seconds (ms -> s: 0.001)


class StatisticsConfig(Strict):
    """Point-in-time statistics of the log (``features/statistics.py``): per key and past window of ``windows`` days,
    the impressions, the count and smoothed rate of each binary ``events`` column, and the smoothed mean watch time.
    For an impression on day d only days d - w .. d - 1 count. Rates are additively smoothed toward the window's
    global rate with ``prior_strength`` pseudo-impressions. Each (key, window, measure) becomes a numeric feature
    named ``stat_<key>_<measure>_<w>d``; the newest snapshot (as of the day after the last log day) is written as
    one Parquet table per key under ``path``, which serving joins like a side table. Rows of the first log day have
    no history (their statistics are missing, as a new id's are at serving); ``warmup_days`` > 0 drops the rows of
    the first days from the log instead (they still feed later days' statistics).
    """

    path: str
    date_format: str = "%Y%m%d"  # how data.time_column encodes a day
    windows: list[int] = [1, 3]
    events: dict[str, str] = Field(min_length=1)  # measure name -> binary 0/1 column of the log
    watch_time: WatchTimeStatistic | None = None
    prior_strength: float = Field(20.0, ge=0)
    warmup_days: int = Field(0, ge=0)
    keys: list[StatisticsKey] = Field(min_length=1)
    towers: list[str] | None = None  # the statistics features' ``towers`` (None: they feed the shared bottom)

    @field_validator("windows")
    @classmethod
    def _windows(cls, v: list[int]) -> list[int]:
        if not v or any(w < 1 for w in v) or len(set(v)) != len(v):
            raise ValueError(f"windows must be distinct whole days >= 1, got {v!r}")
        return v

    @field_validator("events")
    @classmethod
    def _event_names(cls, v: dict[str, str]) -> dict[str, str]:
        bad = [k for k in v if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k)]
        if bad:
            raise ValueError(f"event names must be identifiers, got {bad[0]!r}")
        return v

    @field_validator("prior_strength")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError(f"must be finite, got {v!r}")
        return v

    @model_validator(mode="after")
    def _unique_keys(self) -> StatisticsConfig:
        names = [k.name for k in self.keys]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"keys: duplicate names {dupes}")
        return self

    def measures(self) -> list[tuple[str, str]]:
        """(measure, transform) per table column and window: impressions, then per event its count and rate, then
        the mean watch time; counts and seconds are log1p-transformed."""
        out = [("impressions", "log1p")]
        for e in self.events:
            out += [(e, "log1p"), (f"{e}_rate", "none")]
        if self.watch_time is not None:
            out.append(("watch_s", "log1p"))
        return out

    def feature_specs(self) -> list[dict]:
        """The numeric features the statistics yield, as FeatureSpec fields: ``stat_<key>_<measure>_<w>d``."""
        routed = {} if self.towers is None else {"towers": list(self.towers)}
        return [{"name": f"stat_{k.name}_{m}_{w}d", "kind": "numeric", "group": k.group, "transform": t, **routed}
                for k in self.keys for w in self.windows for m, t in self.measures()]


class HistoryList(Strict):
    """One list column derived from the log: per row, ``column``'s values of the same user's strictly earlier rows
    of the same session (``scope: all``: of every earlier day too), where ``where`` > 0 if given, newest first,
    comma-separated. Several columns (and ``age``) make each entry an event of ``:``-separated fields."""

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    # a column or a pandas expression over columns (e.g. "play_time_ms / duration_ms"); a list: one field each (a
    # multi-valued value contributes its first value; an event whose first field is missing is left out)
    column: str | list[str]
    where: str | list[str] | None = None  # e.g. is_click: only the rows the user clicked; a list: any of them > 0
    scope: Literal["session", "all"] = "session"  # all: across sessions (days), strictly before the request
    max_len: int | None = Field(None, ge=1)  # newest entries kept; default data.history.max_len
    age: bool = False  # append a field: the request's ``order`` minus the event's (ms on KuaiRand)

    @field_validator("column")
    @classmethod
    def _some_column(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and not v:
            raise ValueError("a list of columns must not be empty")
        return v

    @property
    def columns(self) -> list[str]:
        return [self.column] if isinstance(self.column, str) else list(self.column)

    @property
    def wheres(self) -> list[str]:
        return [] if self.where is None else [self.where] if isinstance(self.where, str) else list(self.where)

    @property
    def fields(self) -> int:
        """Fields per entry: one per column, plus the age."""
        return len(self.columns) + int(self.age)


class HistoryConfig(Strict):
    """The user's history within a session (a value of ``data.time_column``: the day), ordered by ``order``: what
    the gateway knows of the user's earlier impressions when it sends a request, and sends as a context list."""

    order: str  # a time column finer than the session (e.g. time_ms); rows at the same time do not see each other
    max_len: int = Field(50, ge=1)  # newest values kept per list
    lists: list[HistoryList] = Field(min_length=1)


class DataConfig(Strict):
    # the impression log: a CSV or Parquet file, a directory of Parquet shards partitioned by day
    # (``date=YYYYMMDD/part-*.parquet``, what `rankstage logs import` writes), a glob, or a list of these, read in
    # order (features/logfiles.py); relative paths are relative to the working directory
    log: str | list[str]
    joins: list[JoinSpec] = []
    statistics: StatisticsConfig | None = None
    history: HistoryConfig | None = None  # list columns derived from the log (features of kind match read them)
    time_column: str  # the split is by distinct values of this column, in order
    user_column: str  # for user-grouped AUC and request grouping
    item_column: str
    validation_periods: int = Field(1, ge=1)  # last N distinct time values are validation
    until: int | float | str | None = None  # drop rows whose time value is later (keeps test days out of training)

    @model_validator(mode="before")
    @classmethod
    def _joins_beside_the_log(cls, data: object) -> object:
        """A join path starting ``{log}`` is under the log directory (a synthetic log keeps its side tables in
        ``DIR/side/``), so ``--set data.log=DIR`` moves them along."""
        if not isinstance(data, dict) or not isinstance(data.get("joins"), list):
            return data
        log = data.get("log")
        joins = []
        for i, join in enumerate(data["joins"]):
            path = join.get("path") if isinstance(join, dict) else getattr(join, "path", None)
            if isinstance(path, str) and path.startswith(LOG_DIR):
                if not isinstance(log, str):
                    raise ValueError(f"joins[{i}].path: {path!r} needs data.log to be one directory (got {log!r})")
                path = str(Path(log) / path[len(LOG_DIR):].lstrip("/"))
                join = {**join, "path": path} if isinstance(join, dict) else join.model_copy(update={"path": path})
            joins.append(join)
        return {**data, "joins": joins}


LOG_DIR = "{log}"  # a data.joins path prefix: the data.log directory


class RankstageConfig(Strict):
    name: str = "ranker"
    data: DataConfig
    features: list[FeatureSpec]
    tasks: list[TaskSpec]
    model: ModelConfig = ModelConfig()
    training: TrainingConfig = TrainingConfig()

    @model_validator(mode="before")
    @classmethod
    def _statistics_features(cls, data: object) -> object:
        """Append the features ``data.statistics`` yields. A feature of the same name already listed must be that
        same feature (a dumped config lists them; reloading it must not add them twice)."""
        if not isinstance(data, dict) or not isinstance(data.get("data"), dict):
            return data
        stats = data["data"].get("statistics")
        if stats is None or not isinstance(data.get("features"), list):
            return data
        try:
            stats = StatisticsConfig.model_validate(stats)
        except ValidationError:
            return data  # reported with its location by the field's own validation
        listed = {f.get("name"): (i, f) for i, f in enumerate(data["features"]) if isinstance(f, dict)}
        features = list(data["features"])
        for spec in stats.feature_specs():
            if spec["name"] not in listed:
                features.append(spec)
                continue
            i, f = listed[spec["name"]]
            if FeatureSpec.model_validate(f) != FeatureSpec.model_validate(spec):
                raise ValueError(f"features[{i}]: name {spec['name']!r} is a feature of data.statistics; rename it")
        return {**data, "features": features}

    @model_validator(mode="after")
    def _check_refs(self) -> RankstageConfig:
        for what, names in (("features", [f.name for f in self.features]), ("tasks", [t.name for t in self.tasks])):
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"{what}: duplicate names {dupes}")
        if not [f for f in self.features if not f.bias]:
            raise ValueError("features: at least one non-bias feature is needed")
        if not self.tasks:
            raise ValueError("tasks: at least one task is needed")
        tasks = {t.name: t for t in self.tasks}
        for t in self.tasks:
            if t.condition is not None and (t.condition not in tasks or tasks[t.condition].type != "binary"):
                raise ValueError(f"task {t.name!r}: condition {t.condition!r} is not a binary task of this config")
        bt = self.model.bias_tower
        feats = {f.name: f for f in self.features}
        for role in ("position", "device"):
            ref = getattr(bt, role)
            if ref is not None and (ref not in feats or not feats[ref].bias):
                raise ValueError(f"model.bias_tower.{role}: {ref!r} is not a feature with 'bias: true'")
        stat_names = {f["name"] for f in self.data.statistics.feature_specs()} if self.data.statistics else set()
        for i, f in enumerate(self.features):
            if f.towers is None:
                continue
            from_stats = f.name in stat_names and self.data.statistics.towers == f.towers  # generated, not listed
            if f.bias:
                raise ValueError(f"features[{i}] ({f.name!r}): a bias feature cannot feed task towers")
            if not f.towers or any(t not in tasks for t in f.towers):
                where = "data.statistics.towers:" if from_stats else f"features[{i}] ({f.name!r}): towers"
                raise ValueError(f"{where} {f.towers!r} must name tasks of this config (tasks: {list(tasks)})")
        for i, f in enumerate(self.features):
            if f.kind != "match":
                continue
            target = feats.get(f.match)
            if target is None or target.kind != "categorical" or target.bias or target.group in ("user", "context"):
                raise ValueError(f"features[{i}] ({f.name!r}): match {f.match!r} must name a categorical item "
                                 f"feature of this config (a candidate's id to count in the list)")
            if f.group in ("user", "context", "bias"):
                raise ValueError(f"features[{i}] ({f.name!r}): a match feature's value differs per candidate: "
                                 f"group must be 'item', got {f.group!r} (the request may still send one list)")
        lists = {x.name: x for x in self.data.history.lists} if self.data.history else {}
        for i, f in enumerate(self.features):
            if f.kind != "sequence":
                continue
            for j, fld in enumerate(f.sequence.fields):
                target = feats.get(fld.target) if fld.target is not None else None
                if fld.target is not None and (target is None or target.kind not in ("categorical", "multi_valued")
                                               or target.bias or target.group in ("user", "context")):
                    raise ValueError(f"features[{i}].sequence.fields[{j}].target: {fld.target!r} must name a "
                                     f"categorical or multi-valued item feature of this config (its embedding is "
                                     f"shared)")
            made = lists.get(f.source)
            if made is not None and made.fields != len(f.sequence.fields):
                raise ValueError(f"features[{i}] ({f.name!r}).sequence.fields: {len(f.sequence.fields)} fields, but "
                                 f"data.history list {made.name!r} writes {made.fields} per event")
        if not self.bottom_features:
            raise ValueError("features: every non-bias feature feeds towers only; the shared bottom needs one")
        unused = [f.name for f in self.features if f.bias and f.name not in (bt.position, bt.device)]
        if unused:
            raise ValueError(f"features {unused}: bias features must be model.bias_tower.position or .device")
        for t in bt.tasks:
            if t not in tasks:
                raise ValueError(f"model.bias_tower.tasks: {t!r} is not a task of this config")
        ns = self.training.negative_sampling
        if ns.task is not None and (ns.task not in tasks or tasks[ns.task].type != "binary"):
            raise ValueError(f"training.negative_sampling.task: {ns.task!r} is not a binary task of this config")
        pt = self.training.pairwise_task
        if pt is not None and (pt not in tasks or tasks[pt].type != "binary"):
            raise ValueError(f"training.pairwise_task: {pt!r} is not a binary task of this config")
        return self

    @property
    def model_features(self) -> list[FeatureSpec]:
        """The non-bias features: what the main network (bottom, experts, towers) encodes."""
        return [f for f in self.features if not f.bias]

    @property
    def bottom_features(self) -> list[FeatureSpec]:
        """The model features that feed the shared bottom (``towers`` None), in config order."""
        return [f for f in self.model_features if f.towers is None]

    def tower_features(self, task: str) -> list[FeatureSpec]:
        """The model features routed to ``task``'s tower only, in config order."""
        return [f for f in self.model_features if f.towers is not None and task in f.towers]

    @cached_property
    def serving_bias_features(self) -> list[FeatureSpec]:
        """The bias tower's device feature as a serving input (group ``context``, raw dtype as declared), when the
        tower has tasks: the served logit of those tasks adds the tower at (position missing, request's device).
        Position is never a serving input. Cached, so serving sees the same objects on every call."""
        bt = self.model.bias_tower
        if bt.device is None or not bt.tasks:
            return []
        device = next(f for f in self.features if f.name == bt.device)
        return [device.model_copy(update={"group": "context"})]

    @property
    def serving_features(self) -> list[FeatureSpec]:
        """Inputs of the serving model, in its signature's order: ``model_features`` then ``serving_bias_features``."""
        return self.model_features + self.serving_bias_features

    @property
    def bias_features(self) -> list[FeatureSpec]:
        return [f for f in self.features if f.bias]

    def with_tasks(self, names: list[str]) -> RankstageConfig:
        """The same config restricted to ``names`` (single-task baselines); bias tower tasks and feature towers are
        filtered (a feature left without towers feeds the bottom). An
        early-stopping metric on a dropped task moves to the same metric on the first kept task (NDCG@5 where that
        task is not binary), so a single-task model is selected by its own ranking quality."""
        unknown = [n for n in names if n not in {t.name for t in self.tasks}]
        if unknown:
            raise ConfigError(f"--tasks: unknown task(s) {unknown}; known: {[t.name for t in self.tasks]}")
        ns = self.training.negative_sampling
        keep_ns = ns if ns.task in names else NegativeSampling(task=None, keep_fraction=1.0)
        data = self.model_dump()
        data["tasks"] = [t.model_dump() for t in self.tasks if t.name in names]
        for t in data["tasks"]:
            if t["condition"] not in names:
                t["condition"] = None
        data["model"]["bias_tower"]["tasks"] = [t for t in self.model.bias_tower.tasks if t in names]
        data["training"]["negative_sampling"] = keep_ns.model_dump()
        if self.training.pairwise_task not in names:
            data["training"]["pairwise_task"] = None
        # a feature routed only to dropped towers feeds the bottom instead: a single-task model uses every feature
        routed = [*data["features"], *([data["data"]["statistics"]] if data["data"]["statistics"] else [])]
        for f in routed:
            if f["towers"] is not None:
                f["towers"] = [t for t in f["towers"] if t in names] or None
        stop = self.training.early_stopping_metric
        if stop != "val_loss" and stop.split("/")[0] not in names:
            first = data["tasks"][0]
            metric = stop.split("/")[1] if first["type"] == "binary" else "ndcg@5"
            data["training"]["early_stopping_metric"] = f"{first['name']}/{metric}"
        return parse_config(data, "--tasks")

    def with_model(self, **changes: object) -> RankstageConfig:
        data = self.model_dump()
        data["model"].update(changes)
        return parse_config(data, "model overrides")


def format_validation_error(err: ValidationError, source: str, what: str = "config",
                            relocate: Callable[[str, str], tuple[str, str]] | None = None) -> str:
    """One line per error: ``  features[3].kind: <message> (got <value>)``, headed ``invalid <what> <source>:``.

    ``relocate(loc, msg)`` may move a field named at the start of a validator's message into the location."""
    lines = [f"invalid {what} {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in e["loc"]).replace(".[", "[")
        msg = e["msg"].removeprefix("Value error, ")
        if relocate is not None:
            loc, msg = relocate(loc, msg)
        got = f" (got {e['input']!r})" if e["type"] not in ("value_error", "missing") and "input" in e else ""
        lines.append(f"  {loc or '<root>'}: {msg}{got}")
    return "\n".join(lines)


def parse_config(data: dict, source: str = "<dict>") -> RankstageConfig:
    """Validate a config mapping; raises ConfigError naming each bad field and value."""
    try:
        return RankstageConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def read_document(path: str | Path, what: str, fmt: Literal["yaml", "json"] = "yaml") -> object:
    """Parse a YAML or JSON file; a missing file or bad syntax is a ConfigError naming ``what`` and the path.

    JSON goes through ``json`` (PyYAML reads exponents such as ``1e-05`` as strings)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{what} not found: {path}") from None
    try:
        return json.loads(text) if fmt == "json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"{what} {path} is not valid {fmt.upper()}: {err}") from None


def read_config_data(path: str | Path) -> dict:
    """The mapping of one YAML config file, not yet validated (overrides may still be applied to it)."""
    data = read_document(path, "config file")
    if not isinstance(data, dict):
        raise ConfigError(f"config {path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """``--set model.num_experts=0`` -> data["model"]["num_experts"] = 0 (values parsed as YAML), in place.

    The one place command-line flags meet a config mapping (ranking, serving and retrieval configs alike)."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected dotted.key=value")
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {p!r} is not a section")
        node[leaf] = yaml.safe_load(value)
    return data


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = (), tasks: list[str] | None = None
                ) -> RankstageConfig:
    """Read one YAML config file, apply ``--set`` overrides, validate; ``tasks`` keeps only those tasks."""
    config = parse_config(apply_overrides(read_config_data(path), overrides), str(path))
    return config.with_tasks(tasks) if tasks else config
