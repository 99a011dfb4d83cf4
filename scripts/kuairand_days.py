"""What the KuaiRand day-judging scripts (daily_chain.py, default_vs_plain.py, gbdt_sequence_eval.py,
time_daily_update.py) share: the ten bundled days as one log, a config on them through a given day, the figures a
judged day reports, and the markdown row of a model's figures over seeds."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "kuairand-pure"
LOGS = [str(DATA / f"log_standard_pure_{span}.csv") for span in ("20220425_to_20220430", "20220501_to_20220504")]
# (task, metric) of ``ranking.judging.judged_report`` each judged day reports
FIGURES = [("click", "auc"), ("click", "gauc"), ("click", "ndcg@5"), ("like", "auc"), ("long_view", "auc"),
           ("watch_time", "spearman")]


def through_day(config_path: str | Path, stats_path: str | Path, label: str) -> Callable:
    """``config(seed, until, **training)``: the config at ``config_path`` on the ten days (statistics snapshots under
    ``stats_path``) with ``data.until`` = ``until``, ``training.seed`` = ``seed`` and the ``training`` overrides."""
    from features.spec import load_config, parse_config

    base = load_config(config_path).model_dump()
    base["data"]["log"], base["data"]["statistics"]["path"] = LOGS, str(stats_path)

    def config(seed: int, until: int, **training):
        d = json.loads(json.dumps(base))
        d["data"]["until"] = until
        d["training"].update(seed=seed, **training)
        return parse_config(d, f"{label} seed {seed} until {until}")

    return config


def seed_row(name: str, rows: list[dict], names: list[str]) -> str:
    """``| name | mean (seed 0, seed 1, ...) | ...``: one cell per figure of ``names``, ``rows`` one dict per seed."""
    cells = []
    for n in names:
        vals = [r[n] for r in rows]
        cells.append(f"{np.mean(vals):.4f} ({', '.join(f'{v:.4f}' for v in vals)})")
    return f"| {name} | " + " | ".join(cells) + " |"


def warm_pair(parent_dir: str | Path, warm_dir: str | Path, day: int, label: str):
    """A warm start and its parent loaded, the judged ``day``'s rows of the ten days (read as the warm start's
    config reads them), the two runs' weights by path and ``figures(shown)``: the warm start's current weights
    judged on those rows, {"task metric": value}. -> (parent, warm, before, after, figures)."""
    from features.logs import read_log
    from features.spec import parse_config
    from ranking.judging import judged_predictions, judged_report
    from ranking.runs import load_run

    parent, warm = load_run(parent_dir), load_run(warm_dir)
    d = warm.config.model_dump()
    d["data"]["log"], d["data"]["until"] = LOGS, day
    frame = read_log(parse_config(d, label).data)
    rows = frame[frame[warm.config.data.time_column] == day].reset_index(drop=True)
    before = {v.path: v.numpy() for v in parent.models.train.weights}
    after = {v.path: v.numpy() for v in warm.models.train.weights}

    def figures(shown: list[tuple[str, str]]) -> dict[str, float]:
        report = judged_report(warm.config, judged_predictions(warm.config, warm.models, rows,
                                                               warm.artifacts["sampling"]))
        return {f"{t} {m}": report[t][m] for t, m in shown}

    return parent, warm, before, after, figures
