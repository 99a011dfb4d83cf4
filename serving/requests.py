"""Rank requests built from the log, as a gateway would send them: what `rankstage requests` writes and
`rankstage rank --request` reads back (the JSON format is in ``serving/client.py``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from features.history import attach_history
from features.logs import join_side_tables, load_side_tables, read_table
from features.spec import RankstageConfig


def logged_requests(config: RankstageConfig, n: int = 3, log: str | None = None, min_candidates: int = 5,
                    top_k: int = 5) -> list[dict]:
    """JSON requests built from the ``n`` largest user lists of the log's newest day: ids and context only (the
    service joins the rest), as a gateway would send them; with the user's history lists of the first impression
    when the model has match features."""
    d = config.data
    df = read_table(log or d.log)
    lists = [f for f in config.serving_features if f.kind in ("match", "sequence")]  # the user's history lists
    if lists and d.history is not None:
        df = attach_history(join_side_tables(df, load_side_tables(d)), d)
    day = df[df[d.time_column] == df[d.time_column].max()]
    sizes = day.groupby(d.user_column).size()
    users = sizes[sizes >= min_candidates].sort_values(ascending=False).index[:n]
    context = [f for f in config.serving_features if f.group == "context" and f.source in df.columns]
    out = []
    for user in users:
        rows = day[day[d.user_column] == user].drop_duplicates(d.item_column)
        first = rows.iloc[0]
        out.append({"request_id": f"logged-{d.user_column}-{user}-{first[d.time_column]}",
                    "user": {d.user_column: int(user) if isinstance(user, int | np.integer) else str(user)},
                    "context": {**{f.name: first[f.source].item() if hasattr(first[f.source], "item")
                                   else first[f.source] for f in context},
                                **{f.name: first[f.source] for f in lists if f.source in df.columns}},
                    "candidates": {"item_ids": rows[d.item_column].tolist()},
                    "top_k": top_k, "return_predictions": True})
    return out


def dump_requests(requests: list[dict], out_dir: str | Path) -> list[Path]:
    """Write each request as ``out_dir/request_<i>.json``; the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, r in enumerate(requests):
        p = out_dir / f"request_{i}.json"
        p.write_text(json.dumps(r, indent=1))
        paths.append(p)
    return paths
