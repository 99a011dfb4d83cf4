"""What the KuaiRand day-judging scripts (daily_chain.py, default_vs_plain.py, gbdt_sequence_eval.py) share: the ten
bundled days as one log, the figures a judged day reports, and the markdown row of a model's figures over seeds."""

from __future__ import annotations

from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "kuairand-pure"
LOGS = [str(DATA / f"log_standard_pure_{span}.csv") for span in ("20220425_to_20220430", "20220501_to_20220504")]
# (task, metric) of ``ranking.judging.judged_report`` each judged day reports
FIGURES = [("click", "auc"), ("click", "gauc"), ("click", "ndcg@5"), ("like", "auc"), ("long_view", "auc"),
           ("watch_time", "spearman")]


def seed_row(name: str, rows: list[dict], names: list[str]) -> str:
    """``| name | mean (seed 0, seed 1, ...) | ...``: one cell per figure of ``names``, ``rows`` one dict per seed."""
    cells = []
    for n in names:
        vals = [r[n] for r in rows]
        cells.append(f"{np.mean(vals):.4f} ({', '.join(f'{v:.4f}' for v in vals)})")
    return f"| {name} | " + " | ".join(cells) + " |"
