"""Server-side feature join: the side tables of ``data.joins`` held in memory, keyed lookups per request.

The gateway sends a user id, the context and C candidate item ids (sometimes with some features inline); the service
must hand the model exactly the raw inputs training saw for the same logged row, i.e. what
``features.logs.raw_inputs(join_side_tables(log, load_side_tables(data)))`` gives. So a side table is loaded by
``load_side_tables`` itself (selected columns, first row per key, ``missing_values`` -> NaN), and each feature's
column is converted once at load by ``raw_column`` (the training conversion) into an (R + 1,) array whose last row
is the missing value (-1, "" or NaN). A request then costs one key lookup per table (a dict for the 1-row request
side, ``pandas.Index.get_indexer`` for C candidates) and one ``np.take`` per feature: no loop over candidates.

Precedence, as in training where log columns win over table columns and an earlier table over a later one: a value
sent inline (request or candidates, by feature name or source column) > the first side table providing the column >
missing. A join key comes from the request (1 row), else the candidates (C rows), else an earlier table's column
(chained joins). An unknown id, or a key nobody sent, makes that table's features missing; it is never an error.
The statistics snapshots of ``data.statistics`` (``features.statistics.serving_joins``) are tables like these; the
user x author one has a composite key, each part found as above (the user from the request, the author from the
video table per candidate), looked up as one int64 of the parts' level codes.

Notation: R rows of a side table, C candidates.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from features.logs import MISSING_INT, MISSING_STRING, load_side_tables, raw_column
from features.spec import ConfigError, FeatureSpec, JoinSpec, RankstageConfig
from features.statistics import AS_OF, serving_joins

REQUEST_GROUPS = ("user", "context")  # (1,) inputs; every other group is per candidate, (C,)

Rows = int | np.ndarray  # a table's matched row for the request side (int) or for each candidate ((C,) intp)


def file_stamp(path: str | Path) -> tuple:
    """(path, mtime_ns, size): a change of either means the file was rewritten (None, None if it is gone)."""
    try:
        st = Path(path).stat()
    except FileNotFoundError:
        return (str(path), None, None)
    return (str(path), st.st_mtime_ns, st.st_size)


def missing_column(raw_dtype: str, n: int) -> np.ndarray:
    """(n,) missing values of a raw dtype, as ``raw_column`` writes them."""
    if raw_dtype == "int":
        return np.full(n, MISSING_INT, dtype=np.int64)
    if raw_dtype == "string":
        return np.full(n, MISSING_STRING, dtype=object)
    return np.full(n, np.nan, dtype=np.float32)


def _frozen(values: np.ndarray) -> np.ndarray:
    values.flags.writeable = False  # part of an immutable snapshot shared by concurrent calls
    return values


def _key_column(values: pd.Series) -> np.ndarray:
    """(R + 1,) a column as a later join's key: numbers as float64 + NaN (a left-joined column in training), other
    values as objects + None."""
    if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
        return _frozen(np.append(values.to_numpy(dtype=np.float64, na_value=np.nan), np.nan))
    return _frozen(np.append(values.to_numpy(dtype=object, na_value=None), np.array([None], dtype=object)))


@dataclass(frozen=True)
class SideTable:
    """One side table in memory. ``values[(source, raw_dtype)]`` is an (R + 1,) raw column, last row missing."""

    join: JoinSpec
    stamp: tuple
    index: pd.Index  # (R,) unique keys, in table order (a MultiIndex for a composite key)
    positions: Mapping[object, int]  # key -> row, for the 1-row request side
    provides: tuple[str, ...]  # columns training takes from this table (not its key, not earlier tables' columns)
    values: dict[tuple[str, str], np.ndarray] = field(repr=False)
    keys: Mapping[str, np.ndarray] = field(repr=False)  # column -> (R + 1,) values, for later joins keyed on it
    frame: pd.DataFrame = field(repr=False)  # for a feature not in the config at load (converted on first use)

    @property
    def n_rows(self) -> int:
        return len(self.index)

    def lookup(self, keys: list[np.ndarray], per_candidate: bool) -> Rows:
        """Row of each key, R for unknown ones: an int for the 1-row request side, else (C,) intp. ``keys`` holds
        one array per key column ((1,) or (C,) each; a composite key's (1,) parts are broadcast to C)."""
        if not per_candidate:
            try:
                key = keys[0][0] if len(keys) == 1 else tuple(k[0] for k in keys)
                return self.positions.get(key, self.n_rows)
            except TypeError:  # an unhashable value is no known key
                return self.n_rows
        if not isinstance(self.index, pd.MultiIndex):
            rows = self.index.get_indexer(keys[0])
        else:  # each part to its level's code, the codes to one int64, looked up in the table's flat codes
            flat = np.zeros(max(len(k) for k in keys), dtype=np.int64)
            known = np.ones(len(flat), dtype=bool)
            for level, stride, part in zip(self.index.levels, self._strides, keys):
                codes = level.get_indexer(part)
                known &= codes >= 0
                flat += codes * stride
            rows = self._flat_codes.get_indexer(flat)
            rows[~known] = -1
        rows[rows < 0] = self.n_rows
        return rows

    @cached_property
    def _strides(self) -> np.ndarray:
        """A composite key's code of level i is multiplied by the product of the later levels' sizes."""
        sizes = np.array([len(level) for level in self.index.levels], dtype=np.int64)
        return np.append(np.cumprod(sizes[::-1])[::-1][1:], 1)

    @cached_property
    def _flat_codes(self) -> pd.Index:
        """(R,) each row's composite key as one int64 (``_strides``): one hash lookup per candidate."""
        return pd.Index(sum(np.asarray(c, np.int64) * s for c, s in zip(self.index.codes, self._strides)))

    def column(self, feature: FeatureSpec) -> np.ndarray:
        """(R + 1,) the feature's raw values from this table."""
        slot = (feature.source, feature.raw_dtype)
        values = self.values.get(slot)
        if values is None:  # a feature list other than the config's: convert once (a racing duplicate is harmless)
            values = self.values[slot] = _convert(self.frame, feature, self.join.path)
        return values


def _convert(frame: pd.DataFrame, feature: FeatureSpec, path: str) -> np.ndarray:
    try:
        values = raw_column(frame, feature)
    except ConfigError as err:
        raise ConfigError(f"data.joins: side table {path}: {err}") from None
    return _frozen(np.concatenate([values, missing_column(feature.raw_dtype, 1)]))


class _Input(NamedTuple):
    """How one feature is filled: inline by ``name`` or ``source``, else from ``column`` of table ``table``."""

    name: str
    source: str
    raw_dtype: str
    per_candidate: bool
    table: int | None
    column: np.ndarray | None  # (R + 1,)
    group: str


def snapshot_day(joins: list[JoinSpec], sides: list[pd.DataFrame]) -> str | None:
    """The one ``as_of`` day of a statistics snapshot's per-key tables; ConfigError naming each table and its as_of
    if they differ (tables of different days in one snapshot would mix features of different times)."""
    days = {}
    for join, side in zip(joins, sides):
        values = side[AS_OF].dropna().astype(str).unique().tolist() if AS_OF in side.columns else []
        days[join.path] = values
    found = sorted({d for values in days.values() for d in values})
    if len(found) > 1 or any(len(v) != len(found) for v in days.values()):
        listed = ", ".join(f"{path} as of {'/'.join(v) or '(none)'}" for path, v in days.items())
        raise ConfigError(f"data.statistics: the snapshot's tables are of different as_of days ({listed}); "
                          "write them together (rankstage statistics) before serving them")
    return found[0] if found else None


def table_sources(config: RankstageConfig) -> tuple:
    """Everything ``FeatureTables.load`` builds a config's tables from: the joins it reads (side tables, then the
    statistics snapshots with the statistics config), the log's key columns, and the features (which columns are
    converted, which names read a column). Two configs with equal sources can share one ``FeatureTables``."""
    data = config.data
    return (tuple(serving_joins(data)), data.statistics, data.user_column, data.item_column,
            tuple((f.name, f.source, f.raw_dtype) for f in config.features))


@dataclass(frozen=True)
class FeatureTables:
    """Immutable snapshot of every side table of a config (``data.joins``, then the newest statistics snapshots of
    ``data.statistics``, one keyed by a composite key such as (user, author)); a reload builds a new one."""

    tables: tuple[SideTable, ...]
    provider: Mapping[str, int]  # column -> index of the table it is taken from
    aliases: Mapping[str, tuple[str, ...]]  # source column -> names of the features reading it (key lookups)
    as_of: str | None = None  # the statistics snapshot's day (data.statistics.date_format), None without one
    as_of_time: float | None = None  # that day's midnight UTC, in seconds since the epoch
    _plans: dict[tuple[int, ...], tuple[tuple[_Input, ...], list[FeatureSpec]]] = field(
        default_factory=dict, repr=False, compare=False)  # per feature list (by identity): what fills each input

    @classmethod
    def load(cls, config: RankstageConfig) -> FeatureTables:
        """Read ``config.data.joins`` as training does, and the statistics snapshots; raises ConfigError (naming the
        table) if one is unusable."""
        data = config.data
        joins = serving_joins(data)  # the side tables, then the statistics snapshots
        stamps = [file_stamp(j.path) for j in joins]  # before reading: a write during the read shows later
        sides = load_side_tables(data, joins)
        log_columns = {data.user_column, data.item_column}  # always in a log, so never taken from a table
        taken: set[str] = set()
        provides: list[tuple[str, ...]] = []
        for join, (_, side) in zip(joins, sides):
            taken |= log_columns | set(join.keys)
            own = tuple(c for c in side.columns if c not in taken)
            taken |= set(own)
            provides.append(own)
        provider = {c: i for i, own in enumerate(provides) for c in own}
        later_keys = [{k for j in joins[i + 1:] for k in j.keys} for i in range(len(joins))]
        tables = []
        for i, (join, stamp, (_, side), own) in enumerate(zip(joins, stamps, sides, provides)):
            keys = join.keys
            index = pd.Index(side[keys[0]]) if len(keys) == 1 else pd.MultiIndex.from_frame(side[keys])
            values = {(f.source, f.raw_dtype): _convert(side, f, join.path)
                      for f in config.features if provider.get(f.source) == i}
            keys = {c: _key_column(side[c]) for c in own if c in later_keys[i]}
            tables.append(SideTable(join, stamp, index, dict(zip(index.tolist(), range(len(index)))), own,
                                    values, keys, side))
        aliases: dict[str, tuple[str, ...]] = {}
        for f in config.features:
            if f.source != f.name:
                aliases[f.source] = (*aliases.get(f.source, ()), f.name)
        as_of = snapshot_day(joins[len(data.joins):], [side for _, side in sides[len(data.joins):]])
        as_of_time = None
        if as_of is not None:
            day = pd.to_datetime(as_of, format=data.statistics.date_format, errors="coerce")
            if pd.isna(day):
                raise ConfigError(f"data.statistics: snapshot as_of {as_of!r} does not parse with date_format "
                                  f"{data.statistics.date_format!r}")
            as_of_time = (day if day.tzinfo else day.tz_localize("UTC")).timestamp()
        return cls(tuple(tables), provider, aliases, as_of, as_of_time)

    def fingerprint(self) -> tuple:
        """((path, mtime_ns, size), ...) per table, as they were when loaded."""
        return tuple(t.stamp for t in self.tables)

    def changed(self) -> bool:
        """Whether any table file was rewritten (or removed) since the load."""
        return any(file_stamp(t.join.path) != t.stamp for t in self.tables)

    def _sent(self, sent: dict[str, np.ndarray], column: str) -> np.ndarray | None:
        """A column sent inline, under its own name or the name of a feature reading it."""
        values = sent.get(column)
        if values is None:
            for name in self.aliases.get(column, ()):
                values = sent.get(name)
                if values is not None:
                    break
        return values

    def _match(self, request: dict[str, np.ndarray], candidates: dict[str, np.ndarray]) -> list[Rows | None]:
        """Each table's matched rows (None: its key was not sent and no earlier table gives it)."""
        rows: list[Rows | None] = []
        for table in self.tables:
            parts = [self._key(key, request, candidates, rows) for key in table.join.keys]
            matched: Rows | None = None
            if all(p is not None for p in parts):
                matched = table.lookup([v for v, _ in parts], per_candidate=any(c for _, c in parts))
            rows.append(matched)
        return rows

    def _key(self, key: str, request: dict[str, np.ndarray], candidates: dict[str, np.ndarray],
             rows: list[Rows | None]) -> tuple[np.ndarray, bool] | None:
        """One key column's values and whether they are per candidate: sent with the request ((1,)), else with the
        candidates ((C,)), else an earlier table's column at its matched rows; None if nobody gives it."""
        if (values := self._sent(request, key)) is not None:
            return values, False
        if (values := self._sent(candidates, key)) is not None:
            return values, True
        if (src := self.provider.get(key)) is not None and rows[src] is not None:
            values, at = self.tables[src].keys[key], rows[src]
            if isinstance(at, np.ndarray):
                return values.take(at), True
            return values[at:at + 1], False
        return None

    def _plan(self, features: list[FeatureSpec]) -> tuple[_Input, ...]:
        """Per feature: where its values come from. Cached by the features' identity (the entry holds them, so an
        id is not reused while cached): reading pydantic properties per call would cost more than the join."""
        key = tuple(map(id, features))
        cached = self._plans.get(key)
        if cached is not None:
            return cached[0]
        plan = []
        for f in features:
            src = self.provider.get(f.source)
            column = self.tables[src].column(f) if src is not None else None
            plan.append(_Input(f.name, f.source, f.raw_dtype, f.group not in REQUEST_GROUPS, src, column, f.group))
        if len(self._plans) >= 16:  # a few configs at most; never grow without bound
            self._plans.clear()
        self._plans[key] = (tuple(plan), list(features))
        return tuple(plan)

    def assemble(self, features: list[FeatureSpec], request: dict[str, np.ndarray],
                 candidates: dict[str, np.ndarray], n_candidates: int,
                 ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Raw model inputs for one request: ((1,) per user/context feature, (C,) per other feature).

        ``request``: (1,) arrays, ``candidates``: (C,) arrays (with the item ids), keyed by feature name or source
        column, already of the features' raw dtypes; they pass through unchanged and win over the tables.
        Values like ``features.logs.raw_column``: int64 (missing -1), object str (missing ""), float32 (missing NaN).
        """
        c = n_candidates
        for name, values in candidates.items():
            if len(values) != c:
                raise ConfigError(f"candidates[{name}]: {len(values)} values, expected {c} (one per candidate)")
        rows = self._match(request, candidates)
        request_inputs: dict[str, np.ndarray] = {}
        candidate_inputs: dict[str, np.ndarray] = {}
        for name, source, raw_dtype, per_candidate, src, column, group in self._plan(features):
            values = None
            if per_candidate:
                values = candidates.get(name)
                if values is None:
                    values = candidates.get(source)
            if values is None:
                values = request.get(name)
                if values is None:
                    values = request.get(source)
                if values is not None and per_candidate and len(values) != c:
                    values = np.repeat(values, c)  # one value sent for the request, the same for every candidate
            if values is None and src is not None and (at := rows[src]) is not None:
                if type(at) is not int:  # (C,) rows: a table keyed by the candidates
                    if not per_candidate:
                        join = self.tables[src].join
                        raise ConfigError(f"feature {name!r} (group {group!r}) comes from side table {join.path}, "
                                          f"keyed by the candidates' {join.key!r}: a user or context feature needs "
                                          "a table keyed by the request")
                    values = column.take(at)
                elif per_candidate:
                    values = np.full(c, column[at], dtype=column.dtype)
                else:
                    values = column[at:at + 1].copy()
            if values is None:
                values = missing_column(raw_dtype, c if per_candidate else 1)
            (candidate_inputs if per_candidate else request_inputs)[name] = values
        return request_inputs, candidate_inputs
