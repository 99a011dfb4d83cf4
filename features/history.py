"""The user's earlier impressions of the same session as list columns (``data.history``), for features of kind
``match`` and ``sequence``: what a gateway knows when it sends a request and passes on as a context list.

N rows. For each list and row: the ``column`` values of the same user's rows of the same session (a value of
``data.time_column``, the day; ``scope: all``: of every session) that came strictly earlier by ``history.order``,
kept where ``where`` > 0 (any of them, for a list), newest first, at most ``max_len``, comma-separated ("" when there
are none). With several columns or ``age`` an entry is an event of ``:``-separated fields
("video:author:tag:ratio:age"), the age being the request's ``order`` value minus the event's: built at the
request, so it is point-in-time too.

The request boundary: a user's rows at one ``order`` value are one request. They get one list (what the gateway
sends once per request), built from the user's strictly earlier requests, so no row lists a click of its own
request; a request whose rows carry two session values (KuaiRand has duplicate rows stamped 00:00 of the next day)
belongs to the earliest. A click is assumed known to the gateway by the user's next request. The log has no request
id, so rows of one page shown at different times count as separate requests: on KuaiRand-Pure a click made at most
60 s before a row is in that row's list for 0.17% of rows, at most 5 minutes before for 1.5%
(reports/history_request_boundary.md).
"""

from __future__ import annotations

from collections import deque

import numpy as np
import pandas as pd

from features.spec import ConfigError, DataConfig


def _tokens(values: pd.Series) -> np.ndarray:
    """(N,) object: each value as the string serving would send (integral floats without ".0"), None if missing."""
    if pd.api.types.is_float_dtype(values):
        finite = values.dropna()
        if (finite % 1 == 0).all():
            values = values.astype("Int64")
    return np.array([None if pd.isna(v) else str(v) for v in values.astype(object)], dtype=object)


def _field_tokens(values: pd.Series) -> np.ndarray:
    """(N,) object: ``_tokens`` as one field of an event: non-integral floats to 4 significant digits, a
    multi-valued value cut to its first value, None if missing."""
    if pd.api.types.is_float_dtype(values) and not (values.dropna() % 1 == 0).all():
        return np.array([None if pd.isna(v) else f"{v:.4g}" for v in values.to_numpy()], dtype=object)
    return np.array([None if v is None else v.split(",")[0].split(":")[0] for v in _tokens(values)], dtype=object)


def _column(df: pd.DataFrame, col: str, where: str) -> pd.Series:
    """A column of ``df``, or a pandas expression over its columns."""
    if col in df.columns:
        return df[col]
    try:
        out = df.eval(col)
    except Exception as e:  # pandas raises many kinds for an unknown name or a bad expression
        raise ConfigError(f"{where}: column {col!r} not in the log or its side tables ({e})") from None
    if not isinstance(out, pd.Series):
        raise ConfigError(f"{where}: {col!r} is not a column of the log")
    return out.replace([np.inf, -np.inf], np.nan)


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:.4g}"


def _request_sessions(users: np.ndarray, sessions: np.ndarray, times: np.ndarray) -> np.ndarray:
    """(N,) each row's session, the earliest among the rows of its request (same user, same time)."""
    frame = pd.DataFrame({"user": users, "time": times, "session": sessions})
    return frame.groupby(["user", "time"], dropna=False, sort=False)["session"].transform("min").to_numpy()


def _layout(users: np.ndarray, sessions: np.ndarray, times: np.ndarray, scope: str):
    """(order (N,), block starts (K + 1,), clear (N,) bool, sorted times (N,)): rows sorted by user, then session
    (``scope: session``), then time; a block is one request (same user, session and time), ``clear`` marks the rows
    where a list starts empty (a new user, or a new session when the scope is the session). Across sessions the
    order is the time alone, so a row dated the next day but stamped earlier never sees a later event."""
    if scope == "session":
        order = np.lexsort((times, sessions, users))
        u, s, t = users[order], sessions[order], times[order]
        clear = np.ones(len(users), dtype=bool)
        clear[1:] = (u[1:] != u[:-1]) | (s[1:] != s[:-1])
    else:
        order = np.lexsort((times, users))
        u, t = users[order], times[order]
        clear = np.ones(len(users), dtype=bool)
        clear[1:] = u[1:] != u[:-1]
    new_block = clear.copy()  # ... or whose time differs (rows of one request share user and time, hence session)
    new_block[1:] |= t[1:] != t[:-1]
    return order, np.flatnonzero(new_block).tolist() + [len(users)], clear, t


def _where_mask(df: pd.DataFrame, lst) -> np.ndarray:
    """(N,) bool: the rows a list keeps, any of its ``where`` columns > 0 (missing counts 0)."""
    keep = np.zeros(len(df), dtype=bool)
    for w in lst.wheres:
        keep |= pd.to_numeric(df[w], errors="coerce").fillna(0).to_numpy() > 0
    return keep


def history_lists(df: pd.DataFrame, data: DataConfig) -> dict[str, np.ndarray]:
    """List name -> (N,) object strings of ``df``'s rows (any row order; the result follows ``df``'s)."""
    h = data.history
    assert h is not None
    if h.order not in df.columns:
        raise ConfigError(f"data.history.order: column {h.order!r} not in the log or its side tables")
    for i, lst in enumerate(h.lists):
        for col in lst.wheres + ([lst.column] if isinstance(lst.column, str) else []):
            if col not in df.columns:
                part = "where" if col in lst.wheres else "column"
                raise ConfigError(f"data.history.lists[{i}].{part}: column {col!r} not in the log or its side tables")
    users = df[data.user_column].to_numpy()
    times = pd.to_numeric(df[h.order], errors="coerce").to_numpy(dtype=np.float64)
    sessions = _request_sessions(users, df[data.time_column].to_numpy(), times)
    layouts = {scope: _layout(users, sessions, times, scope) for scope in {lst.scope for lst in h.lists}}
    out = {}
    for i, lst in enumerate(h.lists):
        order, starts, clear, t = layouts[lst.scope]
        if isinstance(lst.column, str) and not lst.age:
            tokens = _tokens(df[lst.column])[order]
        else:  # events: ':'-joined fields, missing when the first (the id) is
            parts = [_field_tokens(_column(df, c, f"data.history.lists[{i}].column"))[order] for c in lst.columns]
            tokens = np.array([None if p[0] is None else ":".join("" if v is None else v for v in p)
                               for p in zip(*parts)], dtype=object)
        if lst.wheres:
            tokens = np.where(_where_mask(df, lst)[order], tokens, None)
        texts = np.empty(len(df), dtype=object)
        window: deque = deque(maxlen=lst.max_len or h.max_len)
        for a, b in zip(starts[:-1], starts[1:]):
            if clear[a]:
                window.clear()
            if lst.age:  # (token, time): the age is the request's time minus the event's
                texts[a:b] = ",".join(f"{v}:{_number(t[a] - when)}" for v, when in reversed(window))
                window.extend((v, t[a + k]) for k, v in enumerate(tokens[a:b]) if v is not None)
            else:
                texts[a:b] = ",".join(reversed(window))
                window.extend(v for v in tokens[a:b] if v is not None)
        result = np.empty(len(df), dtype=object)
        result[order] = texts
        out[lst.name] = result
    return out


def attach_history(df: pd.DataFrame, data: DataConfig) -> pd.DataFrame:
    """``df`` with one column per ``data.history`` list (a no-op without it). A list already in the log (a log
    that recorded what the gateway sent) is kept as logged."""
    if data.history is None:
        return df
    lists = {k: v for k, v in history_lists(df, data).items() if k not in df.columns}
    return df.assign(**lists)


# ---- what a build carries to the next day's (features.carry) -----------------------------------------------------

def context_columns(df: pd.DataFrame, data: DataConfig) -> list[str]:
    """The columns of ``df`` that ``history_lists`` reads: user, time, order, each list's columns (the names an
    expression uses) and ``where`` columns."""
    import re

    h = data.history
    assert h is not None
    named = {data.user_column, data.time_column, h.order}
    for lst in h.lists:
        named |= set(lst.wheres)
        for c in lst.columns:
            named |= {c} if c in df.columns else set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", c))
    return [c for c in df.columns if c in named]


def history_tail(df: pd.DataFrame, data: DataConfig) -> np.ndarray:
    """(N,) bool: the rows of ``df`` that a later request's ``scope: all`` lists can still hold: per user and list,
    the newest ``max_len`` events that list keeps (``where`` > 0, the id present), newest by ``order`` then row
    position, as ``history_lists``' window holds them after the user's last row."""
    h = data.history
    assert h is not None
    tail = np.zeros(len(df), dtype=bool)
    if not len(df):
        return tail
    users = df[data.user_column].to_numpy()
    times = pd.to_numeric(df[h.order], errors="coerce").to_numpy(dtype=np.float64)
    for i, lst in enumerate(h.lists):
        if lst.scope != "all":
            continue
        first = lst.columns[0]
        ids = (_tokens(df[first]) if isinstance(lst.column, str) and not lst.age
               else _field_tokens(_column(df, first, f"data.history.lists[{i}].column")))
        keep = np.array([v is not None for v in ids], dtype=bool)
        if lst.wheres:
            keep &= _where_mask(df, lst)
        at = np.flatnonzero(keep)
        if not len(at):
            continue
        order = at[np.lexsort((at, times[at], users[at]))]  # by user, then order, then position: the window's order
        newest = pd.Series(users[order]).groupby(users[order], sort=False).cumcount(ascending=False).to_numpy()
        tail[order[newest < (lst.max_len or h.max_len)]] = True
    return tail
