"""Interactions → training examples and test queries, with the history feature built strictly before query time.

N events, Q queries, H history length, I catalog items. Items are referred to by raw id (int64) in the data and by
catalog position (0..I-1) in the evaluator.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from features.logs import MISSING_INT, raw_inputs, read_table
from features.spec import ConfigError, FeatureSpec, JoinSpec
from retrieval.spec import RetrievalConfig

HISTORY = "history"  # name of the history input: (Q, H) int64 item ids, most recent first, -1 padded
ATOMIC_SUFFIXES = (".inter", ".user", ".item")  # RecBole atomic files (MovieLens): tab-separated, "name:type" header


def read_any(path: str | Path) -> pd.DataFrame:
    """A CSV/Parquet table, or a RecBole atomic file (``ml-100k.inter``: tab-separated, ``name:type`` headers)."""
    path = Path(path)
    if path.suffix not in ATOMIC_SUFFIXES:
        return read_table(path)
    if not path.exists():
        raise ConfigError(f"data file not found: {path}")
    df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    types = {c.partition(":")[0]: c.partition(":")[2] for c in df.columns}
    df.columns = list(types)
    for col, kind in types.items():
        if kind == "float":
            df[col] = pd.to_numeric(df[col], errors="coerce")
        elif kind == "token" and df[col].str.fullmatch(r"-?\d+").all():
            df[col] = df[col].astype(np.int64)
    return df


def _side_table(join: JoinSpec) -> pd.DataFrame:
    side = read_any(join.path)
    if join.key not in side.columns:
        raise ConfigError(f"data: key {join.key!r} missing in {join.path} (has {list(side.columns)})")
    if join.columns:
        absent = [c for c in join.columns if c not in side.columns]
        if absent:
            raise ConfigError(f"data: columns {absent} not in {join.path}")
        side = side[[join.key, *join.columns]]
    side = side.drop_duplicates(join.key)
    if join.missing_values:
        side = side.replace({v: np.nan for v in join.missing_values})
    return side


def _join(df: pd.DataFrame, side: pd.DataFrame, key: str) -> pd.DataFrame:
    overlap = [c for c in side.columns if c in df.columns and c != key]
    return df.merge(side.drop(columns=overlap), on=key, how="left")


@dataclass
class Catalog:
    """The items the index can return: raw ids (I,), their candidate-tower inputs, and position by id."""

    ids: np.ndarray  # (I,) int64
    inputs: dict[str, np.ndarray]  # candidate feature -> (I,)
    table: pd.DataFrame | None = None  # the item side table, row i = item i

    def positions(self, item_ids: np.ndarray) -> np.ndarray:
        """Raw ids (any shape) -> catalog positions, -1 where the id is not in the catalog."""
        order = np.argsort(self.ids)
        pos = np.searchsorted(self.ids[order], item_ids)
        pos = np.clip(pos, 0, len(self.ids) - 1)
        found = self.ids[order][pos] == item_ids
        return np.where(found, order[pos], -1)


@dataclass
class Queries:
    """Rows for the query tower: inputs (features + history), the query time, and per query what is known.

    For training rows ``items`` is the positive item (N,); for test queries ``targets`` lists the held-out positive
    items and ``seen`` the user's training positives (excluded from the ranking)."""

    users: np.ndarray  # (Q,) raw user ids
    times: np.ndarray  # (Q,) query time
    inputs: dict[str, np.ndarray]  # query feature -> (Q,); HISTORY -> (Q, H)
    items: np.ndarray | None = None  # (Q,) positive item id of a training row
    targets: list[np.ndarray] | None = None  # per query: held-out positive item ids
    seen: list[np.ndarray] | None = None  # per query: item ids to exclude


@dataclass
class RetrievalData:
    train_events: pd.DataFrame  # positives before the test window / held-out item, with side tables joined
    train: Queries  # one row per training positive
    test: Queries  # one row per test user
    catalog: Catalog
    window: dict  # what trained and what tested, for the metadata


def history_before(events: pd.DataFrame, user_col: str, item_col: str, time_col: str, users: np.ndarray,
                   times: np.ndarray, length: int) -> np.ndarray:
    """(Q, H) int64: each query's last ``length`` positive items with event time strictly before its time, most
    recent first, -1 padded. ``events`` are positives; their row order does not matter (ties in time are broken by
    item id, so shuffling the log changes nothing)."""
    q = len(users)
    if length == 0:
        return np.zeros((q, 0), np.int64)
    ev_users = events[user_col].to_numpy(np.int64)
    ev_times = events[time_col].to_numpy(np.int64)
    ev_items = events[item_col].to_numpy(np.int64)
    order = np.lexsort((ev_items, ev_times, ev_users))
    ev_users, ev_times, ev_items = ev_users[order], ev_times[order], ev_items[order]
    users = np.asarray(users, np.int64)
    times = np.asarray(times, np.int64)
    # position of the first event of each query's user, and of its first event at or after the query time
    start = np.searchsorted(ev_users, users, side="left")
    end = np.searchsorted(ev_users, users, side="right")
    pos = np.empty(q, np.int64)
    for u_start, u_end, idx in _group_slices(start, end):
        pos[idx] = u_start + np.searchsorted(ev_times[u_start:u_end], times[idx], side="left")
    back = pos[:, None] - 1 - np.arange(length)[None, :]  # (Q, H)
    valid = back >= start[:, None]
    return np.where(valid, ev_items[np.clip(back, 0, max(len(ev_items) - 1, 0))], MISSING_INT).astype(np.int64)


def _group_slices(start: np.ndarray, end: np.ndarray):
    """(start, end, query indices) per distinct (start, end) range: one per user."""
    keys, inverse = np.unique(start * (int(end.max(initial=0)) + 1) + end, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.searchsorted(inverse[order], np.arange(len(keys) + 1))
    for k in range(len(keys)):
        idx = order[bounds[k]:bounds[k + 1]]
        yield int(start[idx[0]]), int(end[idx[0]]), idx


def load_events(config: RetrievalConfig) -> tuple[pd.DataFrame, Catalog]:
    """Positive events joined with user side tables and the catalog's item columns; the catalog."""
    d = config.data
    log = read_any(d.log)
    for col in (d.user_column, d.item_column, d.time_column):
        if col not in log.columns:
            raise ConfigError(f"data: column {col!r} not in log {d.log} (has {list(log.columns)})")
    if d.positive is not None:
        try:
            keep = log.eval(d.positive)
        except Exception as err:  # pandas raises many kinds for a bad expression
            raise ConfigError(f"data.positive: {d.positive!r} is not an expression over the log: {err}") from None
        log = log[np.asarray(keep, bool)]
    items = _side_table(d.items)
    catalog_ids = items[d.item_column].to_numpy(np.int64)
    log = log[log[d.item_column].isin(catalog_ids)]
    for join in d.joins:
        log = _join(log, _side_table(join), join.key)
    log = _join(log, items, d.item_column).reset_index(drop=True)
    catalog = Catalog(catalog_ids, raw_inputs(items, config.candidate_features), items.reset_index(drop=True))
    return log, catalog


def _queries(frame: pd.DataFrame, history_source: pd.DataFrame, config: RetrievalConfig,
             features: list[FeatureSpec]) -> Queries:
    d = config.data
    users = frame[d.user_column].to_numpy(np.int64)
    times = frame[d.time_column].to_numpy(np.int64)
    inputs = raw_inputs(frame, features)
    inputs[HISTORY] = history_before(history_source, d.user_column, d.item_column, d.time_column, users, times,
                                     config.history.length)
    return Queries(users, times, inputs)


def build_data(config: RetrievalConfig) -> RetrievalData:
    """Split positives by time (leave-last-out or a global time cut), build training rows and one test query per
    user. Under ``time_cut`` nothing at or after T reaches the training rows, their history or their popularity."""
    d = config.data
    events, catalog = load_events(config)
    events = events.sort_values([d.user_column, d.time_column, d.item_column], kind="stable").reset_index(drop=True)
    if d.split == "leave_last_out":
        last = ~events[d.user_column].duplicated(keep="last")
        train_ev, test_ev = events[~last], events[last]
        window = {"split": "leave_last_out", "test": "each user's last positive by time"}
    else:
        train_ev, test_ev = time_cut(events, d.cut_column, d.test_from, d.until)
        col = d.cut_column
        window = {"split": "time_cut", "cut_column": col, "test_from": _scalar(d.test_from),
                  "train": [_scalar(train_ev[col].min()), _scalar(train_ev[col].max())],
                  "test": [_scalar(test_ev[col].min()), _scalar(test_ev[col].max())]}
    train_ev = train_ev.reset_index(drop=True)
    train = _queries(train_ev, train_ev, config, config.query_features)
    train.items = train_ev[d.item_column].to_numpy(np.int64)

    first = test_ev[~test_ev[d.user_column].duplicated(keep="first")].reset_index(drop=True)
    seen_by_user = train_ev.groupby(d.user_column)[d.item_column].unique()
    targets_by_user = test_ev.groupby(d.user_column)[d.item_column].unique()
    seen, targets, keep = [], [], []
    for i, u in enumerate(first[d.user_column].to_numpy()):
        s = seen_by_user.get(u, np.zeros(0, np.int64))
        t = np.setdiff1d(targets_by_user[u], s)
        if len(t):
            keep.append(i)
            seen.append(np.asarray(s, np.int64))
            targets.append(np.asarray(t, np.int64))
    first = first.iloc[keep].reset_index(drop=True)
    test = _queries(first, train_ev, config, config.query_features)
    test.targets, test.seen = targets, seen
    window.update(train_positives=len(train_ev), test_queries=len(first),
                  test_queries_without_training_positives=int((~first[d.user_column].isin(train_ev[d.user_column])
                                                               ).sum()))
    return RetrievalData(train_ev, train, test, catalog, window)


def time_cut(events: pd.DataFrame, column: str, test_from: object, until: object = None
             ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(events with ``column`` < ``test_from``, events with ``test_from`` <= ``column`` [<= ``until``])."""
    if column not in events.columns:
        raise ConfigError(f"data.period_column: {column!r} is not a column of the log (has {list(events.columns)})")
    try:
        if until is not None:
            events = events[events[column] <= until]
        is_test = (events[column] >= test_from).to_numpy(bool)
    except TypeError as err:
        raise ConfigError(f"data.test_from / data.until: {column!r} >= {test_from!r} (until {until!r}) fails: "
                          f"{err}") from None
    return events[~is_test], events[is_test]


def _scalar(v: object) -> object:
    return v.item() if hasattr(v, "item") else v


def item_sampling_probability(train_items: np.ndarray, catalog: Catalog) -> np.ndarray:
    """(I,) the chance that a training row's positive is each catalog item: its share of training positives."""
    pos = catalog.positions(train_items)
    counts = np.bincount(pos[pos >= 0], minlength=len(catalog.ids)).astype(np.float64)
    return counts / counts.sum()
