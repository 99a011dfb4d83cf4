"""The retrieval spec: query and candidate towers, history, loss and data, loaded from one YAML file.

Features are ``features.spec.FeatureSpec`` (the ranker's format and checks); errors name the field and the value,
e.g. ``query_features[1].kind: Input should be 'categorical', ... (got 'catgorical')``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

from pydantic import Field, ValidationError, model_validator

from features.spec import ConfigError, FeatureSpec, JoinSpec, Strict, format_validation_error, read_config_data

Split = Literal["leave_last_out", "time_cut"]
SPLITS: tuple[str, ...] = get_args(Split)


class RetrievalData(Strict):
    """Interactions (one row per event), side tables, which rows are positives and how to split by time.

    ``split: leave_last_out``: each user's last positive (by ``time_column``) is the test query, the rest trains
    (including every other user's later events: popularity, logQ and the fallback see the future).
    ``split: time_cut``: one global cut T = ``test_from`` on ``period_column`` (default ``time_column``): events
    before T train (and alone give popularity and logQ), events at or after T test (one query per user at their
    first test event). ``until`` (time_cut only) drops later events, e.g. to validate on an earlier day.
    ``rankstage retrieval evaluate`` reports both protocols when it can (leave_last_out beside a time_cut config
    without ``until``; time_cut beside a leave_last_out config that sets ``test_from``)."""

    log: str
    joins: list[JoinSpec] = []
    user_column: str
    item_column: str
    time_column: str  # orders events; history uses events strictly before the query's time
    positive: str | None = None  # pandas expression over columns (e.g. "is_click == 1 or long_view == 1")
    items: JoinSpec  # the catalog: every row is a candidate the index can return
    split: Split = "leave_last_out"
    period_column: str | None = None  # time_cut: the column compared with test_from (default: time_column)
    test_from: int | float | str | None = None  # time_cut: T (with leave_last_out: T of evaluate's time_cut report)
    until: int | float | str | None = None  # time_cut only: drop events whose period_column is later

    @model_validator(mode="before")
    @classmethod
    def _period_is_time_cut(cls, data: object) -> object:
        """``split: period`` is the former name of ``time_cut`` (runs saved before the rename still load)."""
        if isinstance(data, dict) and data.get("split") == "period":
            return {**data, "split": "time_cut"}
        return data

    @model_validator(mode="after")
    def _check_split(self) -> RetrievalData:
        if self.split == "time_cut" and self.test_from is None:
            raise ValueError("data.test_from: split 'time_cut' needs the cut T (events at or after it test), got "
                             "None")
        if self.until is not None and self.split != "time_cut":
            raise ValueError(f"data.until: applies only to split 'time_cut' (got until={self.until!r} with split "
                             f"{self.split!r}; leave_last_out holds out each user's last event, there is no later "
                             f"window to drop)")
        if self.until is not None and _less(self.until, self.test_from):
            raise ValueError(f"data.until: {self.until!r} is before data.test_from {self.test_from!r} (no test "
                             f"events would remain)")
        if self.items.key != self.item_column:
            raise ValueError(f"items.key must be the item column {self.item_column!r}, got {self.items.key!r}")
        return self

    @property
    def cut_column(self) -> str:
        """The column ``test_from`` and ``until`` compare with."""
        return self.period_column or self.time_column


def _less(a: object, b: object) -> bool:
    try:
        return bool(a < b)  # type: ignore[operator]
    except TypeError:
        raise ValueError(f"data.until / data.test_from: {a!r} and {b!r} cannot be compared") from None


class HistoryConfig(Strict):
    """The user's last ``length`` positive items strictly before the query time, embedded and mean-pooled."""

    length: int = Field(20, ge=0)  # 0: no history input
    embedding_dim: int = Field(32, ge=1)


class RetrievalModelConfig(Strict):
    """Tower widths, output width, and the loss: in-batch softmax with temperature, logQ, mixed negatives."""

    embedding_dim: int = Field(64, ge=1)  # width of query and candidate embeddings
    feature_dim: int = Field(16, ge=1)  # default embedding width of a categorical feature
    tower_units: list[int] = []  # hidden layers of each tower before the output projection
    normalize: bool = False  # L2-normalise both embeddings (cosine scores, then temperature matters)
    temperature: float = Field(1.0, gt=0)
    logq_correction: bool = True
    mixed_negatives: int = Field(0, ge=0)  # uniformly sampled catalog items added as negatives to every batch
    factorized_top_k: bool = False  # FactorizedTopK metrics on validation (slow: scores the whole catalog)


class IndexConfig(Strict):
    """ScaNN settings of the exported approximate index (the BruteForce one is exact)."""

    num_leaves: int | None = Field(None, ge=2)  # None: about sqrt(number of items)
    leaves_to_search: float = Field(0.5, gt=0, le=1)  # fraction of leaves searched per query
    reordering_candidates: int = Field(500, ge=1)  # re-scored exactly (at least top_k)


class RetrievalTraining(Strict):
    batch_size: int = Field(256, ge=2)
    epochs: int = Field(10, ge=1)
    learning_rate: float = Field(0.05, gt=0)
    optimizer: Literal["adagrad", "adam"] = "adagrad"
    seed: int = 0


class RetrievalConfig(Strict):
    name: str = "retrieval"
    data: RetrievalData
    query_features: list[FeatureSpec]
    candidate_features: list[FeatureSpec]
    history: HistoryConfig = HistoryConfig()
    model: RetrievalModelConfig = RetrievalModelConfig()
    training: RetrievalTraining = RetrievalTraining()
    top_k: int = Field(100, ge=1)  # what the exported index returns
    index: IndexConfig = IndexConfig()

    @model_validator(mode="after")
    def _check_towers(self) -> RetrievalConfig:
        names = [f.name for f in self.query_features + self.candidate_features]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"query_features + candidate_features: duplicate names {dupes}")
        for i, f in enumerate(self.query_features):
            if f.group not in ("user", "context"):
                raise ValueError(f"query_features[{i}] {f.name!r}: group must be 'user' or 'context', got {f.group!r}")
        for i, f in enumerate(self.candidate_features):
            if f.group != "item":
                raise ValueError(f"candidate_features[{i}] {f.name!r}: group must be 'item', got {f.group!r}")
        if not self.query_features:
            raise ValueError("query_features: at least one feature is needed")
        ids = [f for f in self.candidate_features if f.source == self.data.item_column]
        if not ids or ids[0].kind != "categorical":
            raise ValueError(f"candidate_features: the item id {self.data.item_column!r} must be a categorical "
                             f"feature (got {[f.name for f in self.candidate_features]})")
        return self

    @property
    def item_id_feature(self) -> FeatureSpec:
        return next(f for f in self.candidate_features if f.source == self.data.item_column)


def parse_retrieval_config(data: dict, source: str = "<dict>") -> RetrievalConfig:
    """Validate a retrieval config mapping; raises ConfigError naming each bad field and value."""
    try:
        return RetrievalConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def load_retrieval_config(path: str | Path) -> RetrievalConfig:
    return parse_retrieval_config(read_config_data(path), str(path))
