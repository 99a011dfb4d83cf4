"""What one feature build carries to the next day's: the state a daily build starts from instead of the whole log.

A statistics feature of day d sums days d - w .. d - 1, and a ``scope: all`` history list holds the user's newest
events of every earlier day; so the examples of a new day need, besides that day's rows, only

- per statistics key, the daily sums (``features.statistics.daily_sums``) of the last ``max(windows)`` days;
- per user, the rows a later list can still hold (``features.history.history_tail``: the newest ``max_len``
  events of each ``scope: all`` list) and every row of the last day (a request stamped across midnight belongs to
  the earlier day's session), with only the columns the lists read (``features.history.context_columns``).

Every build of the feature pipeline writes them, as of its last day up to ``data.until``, under ``state/``::

    state/meta.json                          the last day (time value), the first day (day number), specs
    state/daily/<key>/part-<bucket>.parquet  daily sums of the last max(windows) days
    state/history/part-<bucket>.parquet      the users' context rows

A warm start's build (``build_features(..., state_from=...)``) reads the parent build's ``state/`` and, of the
log, only the rows after its last day: memory and time in the new day's rows, not in the log's. Its examples equal
the full build's of the same days row for row (``tests/test_feature_pipeline.py``), and it writes the state the
next day starts from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from features.spec import ConfigError, RankstageConfig

STATE = "state"
META, DAILY, CONTEXT = "meta.json", "daily", "history"


def specs(config: RankstageConfig) -> dict:
    """What a state depends on: the statistics (without its snapshot path) and history definitions, the columns."""
    d = config.data
    stats = None if d.statistics is None else d.statistics.model_dump(exclude={"path"})
    return {"statistics": stats, "history": None if d.history is None else d.history.model_dump(),
            "columns": [d.time_column, d.user_column, d.item_column]}


def carries(config: RankstageConfig) -> bool:
    """Whether a build has anything to carry (statistics or history lists)."""
    return config.data.statistics is not None or config.data.history is not None


@dataclass(frozen=True)
class Carried:
    """A build's ``state/``: ``last`` the last time value it covers (up to ``data.until``), ``first_day`` the log's
    first day number (the warm-up days count from it)."""

    root: Path
    last: object
    first_day: int | None

    def daily_files(self) -> list[tuple[str, str]]:
        """(key name, path) of every daily-sums part."""
        return [(p.parent.name, str(p)) for p in sorted((self.root / DAILY).glob("*/*.parquet"))]

    def context_files(self) -> list[str]:
        return [str(p) for p in sorted((self.root / CONTEXT).glob("*.parquet"))]


def write_meta(root: Path, config: RankstageConfig, last, first_day: int | None) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / META).write_text(json.dumps({"last": last, "first_day": first_day, **specs(config)}, indent=1,
                                        default=str))


def load(path: str | Path, config: RankstageConfig) -> Carried:
    """The state under ``path`` (a build's ``state/`` or the build directory); a ConfigError when there is none or
    it was written for other statistics or history definitions (naming the first difference)."""
    root = Path(path)
    if not (root / META).exists() and (root / STATE / META).exists():
        root = root / STATE
    if not (root / META).exists():
        raise ConfigError(f"state {path}: no {META} (not a feature build's state/)")
    meta = json.loads((root / META).read_text())
    want = json.loads(json.dumps(specs(config), default=str))  # as meta.json holds it (tuples as lists)
    for part in want:
        found = _difference(meta.get(part), want[part], part)
        if found:
            raise ConfigError(f"state {path}: written for other data.{part}: {found}")
    return Carried(root, meta["last"], meta["first_day"])


def _difference(old, new, where: str) -> str | None:
    """The first field where ``new`` differs from ``old`` (JSON values), as ``where.field: state X, this Y``."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in list(old) + [k for k in new if k not in old]:
            found = _difference(old.get(k), new.get(k), f"{where}.{k}")
            if found:
                return found
        return None
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new, strict=True)):
            found = _difference(a, b, f"{where}[{i}]")
            if found:
                return found
        return None
    return None if old == new else f"{where}: state {old!r}, this {new!r}"
