"""Training choices judged by within-user ranking on two held-out days.

One change at a time against the base config (batch size, learning rate, embedding sizes, id min counts, click
loss weight, dropout, early stopping on click GAUC, a second seed for the noise floor). Each variant is trained
twice: Apr 25-29 judged on Apr 30, and Apr 25-28 judged on Apr 29 (``data.until``). Then ``rankstage
compare-runs`` pairs every variant against the base on the same rows, per day.

    .venv/bin/python scripts/sweep_training.py --out reports/training_sweep            # ~1 min per training
    .venv/bin/python scripts/sweep_training.py --only es_click_gauc --out /tmp/sweep   # a subset

A variant may combine changes with "+" (``es_click_gauc+batch512``); ``--seeds 0 1 2`` trains each variant per seed
(runs ``<name>@s<seed>``). Writes ``<out>/<day>/compare.md`` (every run paired against the base's first seed, with
intervals) and ``<out>/summary.md`` (per variant and day: the seeds' mean of the ranking figures, and the mean
paired difference against the base at the same seed).
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DAYS = {"apr30": [], "apr29": ["data.until=20220429"]}
ID_FEATURES = ("user_id", "video_id", "author_id")


def _features(data: dict, names: tuple[str, ...], **fields: object) -> dict:
    """``data`` with ``fields`` set on the named feature entries."""
    out = copy.deepcopy(data)
    for entry in out["features"]:
        if entry["name"] in names:
            for key, value in fields.items():
                if key in ("min_count", "oov_dropout"):
                    entry["vocab"] = {**entry.get("vocab", {}), key: value}
                else:
                    entry[key] = value
    return out


def _task(data: dict, name: str, **fields: object) -> dict:
    out = copy.deepcopy(data)
    for entry in out["tasks"]:
        if entry["name"] == name:
            entry.update(fields)
    return out


def _statistics(data: dict, towers: list[str] | None = None) -> dict:
    """``data`` plus configs/kuairand_stats.yaml's statistics features, routed to ``towers`` (None: the shared bottom,
    as that config has them). Each run's snapshot goes into its run directory (``rankstage train`` never publishes);
    the path is stats/sweep all the same, away from the one serving reads, should a sweep config be published."""
    out = copy.deepcopy(data)
    stats = yaml.safe_load((ROOT / "configs" / "kuairand_stats.yaml").read_text())["data"]["statistics"]
    out["data"]["statistics"] = {**stats, "path": "stats/sweep", **({} if towers is None else {"towers": towers})}
    return out


def _stat_towers(data: dict, towers: list[str]) -> dict:
    """``data`` (a config with a statistics block) with the statistics routed to ``towers``; its path stats/sweep
    (see ``_statistics``)."""
    out = copy.deepcopy(data)
    out["data"]["statistics"] = {**out["data"]["statistics"], "path": "stats/sweep", "towers": towers}
    return out


HISTORY = {"order": "time_ms", "max_len": 50, "lists": [
    {"name": "authors_seen_today", "column": "author_id"},
    {"name": "authors_clicked_today", "column": "author_id", "where": "is_click"}]}


def _history(data: dict, towers: list[str] | None = None) -> dict:
    """``data`` plus the user's authors earlier the same day (shown, clicked) counted against the candidate's
    author: two match features (the request carries the lists at serving)."""
    out = copy.deepcopy(data)
    out["data"]["history"] = HISTORY
    for lst in HISTORY["lists"]:
        out["features"].append({"name": lst["name"], "kind": "match", "match": "author_id", "group": "item",
                                "max_values": 50, "transform": "log1p", **({"towers": towers} if towers else {})})
    return out


ALL_TASKS = ["click", "like", "collect", "share", "long_view", "watch_time", "completion"]

# name -> (config edit, --set overrides)
VARIANTS: dict[str, tuple[Callable[[dict], dict], list[str]]] = {
    "base": (lambda d: d, []),
    "seed1": (lambda d: d, ["training.seed=1"]),
    "es_click_gauc": (lambda d: d, ["training.early_stopping_metric=click/gauc"]),
    "batch512": (lambda d: d, ["training.batch_size=512"]),
    "batch8192": (lambda d: d, ["training.batch_size=8192"]),
    "batch256": (lambda d: d, ["training.batch_size=256"]),
    "lr3e-3": (lambda d: d, ["training.learning_rate=0.003"]),
    "lr3e-4": (lambda d: d, ["training.learning_rate=0.0003"]),
    "id_emb8": (lambda d: _features(d, ID_FEATURES, embedding_dim=8), []),
    "id_emb32": (lambda d: _features(d, ID_FEATURES, embedding_dim=32), []),
    "id_min_count5": (lambda d: _features(d, ID_FEATURES, min_count=5), []),
    "id_min_count1": (lambda d: _features(d, ID_FEATURES, min_count=1), []),
    "click_weight3": (lambda d: _task(d, "click", loss_weight=3), []),
    "click_weight5": (lambda d: _task(d, "click", loss_weight=5), []),
    "like_weight10": (lambda d: _task(d, "like", loss_weight=10), []),
    "dropout0.2": (lambda d: d, ["model.dropout=0.2"]),
    "stats": (_statistics, []),  # = configs/kuairand_stats.yaml
    "stats_like": (lambda d: _statistics(d, ["like"]), []),  # statistics feed like's tower only
    "stats_all_towers": (lambda d: _statistics(d, ALL_TASKS), []),  # every tower, never the shared bottom
    # on today's default (statistics in like's tower): also route them to watch time's / completion's tower
    "stats_to_watch": (lambda d: _stat_towers(d, ["like", "watch_time"]), []),
    "stats_to_watch_completion": (lambda d: _stat_towers(d, ["like", "watch_time", "completion"]), []),
    # ids looked up as OOV in training, so the OOV embedding learns new users / videos (a third of Apr 30's rows)
    "user_oov_dropout0.1": (lambda d: _features(d, ("user_id",), oov_dropout=0.1), []),
    "user_oov_dropout0.3": (lambda d: _features(d, ("user_id",), oov_dropout=0.3), []),
    "id_oov_dropout0.1": (lambda d: _features(d, ID_FEATURES, oov_dropout=0.1), []),
    # watch time trained on min(t, cap): 600 s -> 120 s -> 60 s raised its Spearman (configs/kuairand.yaml)
    "watch_cap30": (lambda d: _task(d, "watch_time", max_value=30), []),
    "watch_cap20": (lambda d: _task(d, "watch_time", max_value=20), []),
    "history_authors": (_history, []),
    "history_authors_click_tower": (lambda d: _history(d, ["click"]), []),  # straight to click's tower
    "pairwise1": (lambda d: d, ["training.pairwise_task=click", "training.pairwise_weight=1.0"]),
    "pairwise0.3": (lambda d: d, ["training.pairwise_task=click", "training.pairwise_weight=0.3"]),
    "list_batches": (lambda d: d, ["training.pairwise_task=click", "training.pairwise_weight=0"]),  # grouping only
    "listwise1": (lambda d: d, ["training.pairwise_task=click", "training.pairwise_weight=1.0",
                                "training.list_loss=softmax"]),
    "listwise0.3": (lambda d: d, ["training.pairwise_task=click", "training.pairwise_weight=0.3",
                                  "training.list_loss=softmax"]),
    # the way back to the defaults before this sweep (batch 2048, val_loss stopping, click weight 1):
    # --only batch2048+es_val_loss+click_weight1 measures today's default against them
    "batch2048": (lambda d: d, ["training.batch_size=2048"]),
    "es_val_loss": (lambda d: d, ["training.early_stopping_metric=val_loss"]),
    "click_weight1": (lambda d: _task(d, "click", loss_weight=1), []),
}


def _train(config: Path, overrides: list[str], out: Path, log: Path) -> float:
    """One ``rankstage train``; returns its wall seconds. Raises on failure with the log's tail."""
    cmd = [sys.executable, "-m", "rankstage.cli", "train", "--config", str(config), "--out", str(out)]
    for item in overrides:
        cmd += ["--set", item]
    start = time.perf_counter()
    with log.open("w") as fh:
        code = subprocess.call(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT)
    if code != 0:
        raise SystemExit(f"train failed ({code}): {' '.join(cmd)}\n" + "".join(log.read_text().splitlines(True)[-20:]))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/kuairand.yaml")
    parser.add_argument("--out", default="reports/training_sweep")
    parser.add_argument("--only", nargs="+", help="variants to run, '+' combines changes (base always runs); "
                        f"changes: {', '.join(VARIANTS)}")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="training seeds per variant")
    args = parser.parse_args()
    out = (ROOT / args.out).resolve()
    base_data = yaml.safe_load((ROOT / args.config).read_text())
    names = ["base"] + [n for n in (args.only or VARIANTS) if n != "base"]
    plans = {}
    for name in names:
        data, sets = base_data, []
        for part in name.split("+"):
            if part not in VARIANTS:
                raise SystemExit(f"--only {name}: unknown change {part!r} (changes: {', '.join(VARIANTS)})")
            edit, more = VARIANTS[part]
            data, sets = edit(data), sets + more
        path = out / "configs" / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        # the config's relative paths stay relative to the project root, where training runs
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        plans[name] = (path, sets)
    runs = [(name, seed) for name in names for seed in args.seeds]
    total, done = len(runs) * len(DAYS), 0
    for name, seed in runs:
        for day, day_sets in DAYS.items():
            tag = _tag(name, seed)
            run = out / "runs" / day / tag
            done += 1
            if (run / "metrics.json").exists():
                print(f"[{done}/{total}] {day} {tag}: done before, kept", flush=True)
                continue
            run.parent.mkdir(parents=True, exist_ok=True)
            path, sets = plans[name]
            seconds = _train(path, day_sets + sets + [f"training.seed={seed}"] * (seed != 0), run,
                             out / "runs" / day / f"{tag}.log")
            gauc = json.loads((run / "metrics.json").read_text())["tasks"]["click"]["gauc"]
            print(f"[{done}/{total}] {day} {tag}: {seconds:.0f} s, click GAUC {gauc:.4f}", flush=True)
    for day in DAYS:
        dirs = [f"{_tag(n, s)}={out / 'runs' / day / _tag(n, s)}" for n, s in runs]
        subprocess.check_call([sys.executable, "-m", "rankstage.cli", "compare-runs", *dirs,
                               "--out", str(out / day)], cwd=ROOT, stdout=subprocess.DEVNULL)
        print(f"{day}: {out / day / 'compare.md'}", flush=True)
    (out / "summary.md").write_text(summary(out, names, args.seeds, args.config))
    print(f"summary: {out / 'summary.md'}", flush=True)


def _tag(name: str, seed: int) -> str:
    """Run directory name: the variant, and the seed unless it is 0 (the first sweep's runs keep their names)."""
    return name if seed == 0 else f"{name}@s{seed}"


FIGURES = (("click", "gauc"), ("click", "ndcg@5"), ("click", "auc"), ("like", "auc"), ("long_view", "gauc"),
           ("watch_time", "spearman"), ("completion", "spearman"))


def summary(out: Path, names: list[str], seeds: list[int], config: str) -> str:
    """Markdown: per day, per variant, the mean over seeds of each figure and of its difference to the base run
    of the same seed (paired by seed; the spread of the base over seeds is the noise floor)."""
    lines = [f"# Training choices on two held-out days ({config}, seeds {seeds})", "",
             "Mean over seeds; in brackets the mean difference to `base` at the same seed. "
             "`python scripts/sweep_training.py` reproduces it; `<day>/compare.md` has every run's intervals.", ""]
    for day in DAYS:
        metric = {}
        for name in names:
            for seed in seeds:
                m = json.loads((out / "runs" / day / _tag(name, seed) / "metrics.json").read_text())["tasks"]
                metric[name, seed] = {f"{t} {k}": m[t][k] for t, k in FIGURES if t in m and k in m[t]}
        cols = list(metric["base", seeds[0]])
        lines += [f"## {day}", "", "| variant | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for name in names:
            cells = []
            for col in cols:
                vals = [metric[name, s][col] for s in seeds]
                diffs = [metric[name, s][col] - metric["base", s][col] for s in seeds]
                mean = sum(vals) / len(vals)
                cells.append(f"{mean:.4f}" if name == "base" else f"{mean:.4f} ({sum(diffs) / len(diffs):+.4f})")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        if len(seeds) > 1:
            spread = [max(metric["base", s][c] for s in seeds) - min(metric["base", s][c] for s in seeds)
                      for c in cols]
            lines.append("| base: max − min over seeds | " + " | ".join(f"{v:.4f}" for v in spread) + " |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
