"""Why the default loses to the plain MMoE peer on the ten KuaiRand days: one change at a time, judged on later days.

    .venv/bin/python scripts/default_vs_plain.py --days 20220503 --seeds 0 --out reports/default_vs_plain
    .venv/bin/python scripts/default_vs_plain.py --only default plain --days 20220503 20220504 --seeds 0 1

Every variant trains the same way as the default ships: ``data.until`` = the day before the judged day (that day is
its validation day, early stopping picks the epoch count), then ``--refit`` through it; then it is judged on the
next day, which no variant has seen (``ranking.judging``): click AUC, GAUC and NDCG@5 over user-day lists, like AUC,
long view AUC, watch time Spearman, and each binary task's predicted / observed mean. The variants are the default
(configs/kuairand.yaml on the ten days), the plain peer (``ranking.compare.plain_mmoe``) and the default with one of
the peer's differences applied. Writes ``<out>/default_vs_plain.json`` and ``.md`` (per judged day and variant: the
mean over seeds, then each seed's value) and keeps the runs for ``rankstage compare-runs``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from kuairand_days import FIGURES, LOGS, seed_row  # noqa: E402  (scripts/ is on sys.path as the script's directory)

LEVELS = ["click", "like", "long_view"]


def _no_statistics(d: dict) -> dict:
    from features.spec import parse_config

    stats = {f.name for f in parse_config(d, "variant").data.statistics.feature_specs()}
    d["features"] = [f for f in d["features"] if f["name"] not in stats]
    d["data"]["statistics"] = None
    return d


def _no_history(d: dict) -> dict:
    d["features"] = [f for f in d["features"] if f["kind"] != "match"]
    d["data"]["history"] = None
    return d


def _unit_loss_weights(d: dict) -> dict:
    for t in d["tasks"]:
        t["loss_weight"] = 1.0
    return d


def _long_view_x3(d: dict) -> dict:
    """Long view's loss weight 3, as click's and like's (1 in the default)."""
    for t in d["tasks"]:
        if t["name"] == "long_view":
            t["loss_weight"] = 3.0
    return d


def _two_epochs(d: dict) -> dict:
    d["training"].update(epochs=2, early_stopping_patience=2)
    return d


def _peer_network(d: dict) -> dict:
    """The peer's network (no shared bottom, 4 experts of 256-128, no gate dropout, 16-d embeddings), the default's
    features, losses and training."""
    for f in d["features"]:
        if f["kind"] in ("categorical", "multi_valued"):
            f["embedding_dim"] = 16
    d["model"].update(bottom_units=[], expert_units=[256, 128], gate_dropout=0.0)
    return d


def _peer_experts(d: dict) -> dict:
    """The peer's experts (256-128) and 16-d embeddings, keeping the default's shared bottom and gate dropout."""
    for f in d["features"]:
        if f["kind"] in ("categorical", "multi_valued"):
            f["embedding_dim"] = 16
    d["model"].update(expert_units=[256, 128])
    return d


def _gate_dropout(d: dict) -> dict:
    """Dropout 0.1 on the gate outputs in training (after ``peer_network``, which sets it to 0)."""
    d["model"].update(gate_dropout=0.1)
    return d


CHANGES: dict[str, Callable[[dict], dict]] = {
    "no_statistics": _no_statistics, "no_history": _no_history, "unit_loss_weights": _unit_loss_weights,
    "long_view_x3": _long_view_x3, "two_epochs": _two_epochs, "peer_network": _peer_network,
    "peer_experts": _peer_experts, "gate_dropout": _gate_dropout,
}


def variant_config(base: dict, name: str, seed: int, until: int):
    """The config of variant ``name`` (``default``, ``plain`` or changes of ``CHANGES`` joined by "+")."""
    from features.spec import parse_config
    from ranking.compare import plain_mmoe

    d = copy.deepcopy(base)
    d["data"]["until"] = until
    d["training"]["seed"] = seed
    if name == "plain":
        return plain_mmoe(parse_config(d, "plain"))
    if name != "default":
        for change in name.split("+"):
            if change not in CHANGES:
                raise SystemExit(f"--only: unknown variant {change!r} (default, plain, {', '.join(CHANGES)})")
            d = CHANGES[change](d)
    return parse_config(d, f"variant {name} seed {seed} until {until}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "kuairand.yaml"))
    ap.add_argument("--only", nargs="+", default=["default", "plain", *CHANGES])
    ap.add_argument("--days", type=int, nargs="+", default=[20220504], help="judged days (trained through the day "
                    "before)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--out", default=str(ROOT / "reports" / "default_vs_plain"))
    args = ap.parse_args()
    os.chdir(ROOT)  # the config's side-table paths are relative to the project root

    from features.logs import read_log
    from features.spec import load_config
    from ranking.judging import judged_predictions, judged_report
    from ranking.runs import load_run
    from ranking.train import train

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = load_config(args.config).model_dump()
    base["data"]["log"] = LOGS
    base["data"]["statistics"]["path"] = str(out / "stats")
    frame = read_log(variant_config(base, "default", 0, max(args.days)).data)
    col = base["data"]["time_column"]
    path = out / "default_vs_plain.json"
    results = json.loads(path.read_text()) if path.exists() else {"days": {}, "seconds": {}}

    def judge(run_dir: Path, day: int) -> dict:
        run = load_run(run_dir)
        rows = frame[frame[col] == day].reset_index(drop=True)
        report = judged_report(run.config, judged_predictions(run.config, run.models, rows, run.artifacts["sampling"]))
        got = {f"{t} {m}": report[t][m] for t, m in FIGURES}
        got.update({f"{t} level": report[t]["predicted_mean"] / report[t]["observed_rate"] for t in LEVELS})
        got["epochs"] = json.loads((run_dir / "artifacts.json").read_text())["best_epoch"]
        return got

    for day in args.days:
        until = int((datetime.strptime(str(day), "%Y%m%d") - timedelta(days=1)).strftime("%Y%m%d"))
        for name in args.only:
            for seed in args.seeds:
                run_dir = out / str(day) / f"{name}@s{seed}"
                t0 = time.perf_counter()
                if not (run_dir / "metrics.json").exists():
                    train(variant_config(base, name, seed, until), run_dir, refit=True, verbose=False)
                    results["seconds"][f"{name}@s{seed} through {until}"] = round(time.perf_counter() - t0)
                results["days"].setdefault(str(day), {}).setdefault(name, {})[str(seed)] = judge(run_dir, day)
                print(f"{day} {name}@s{seed}: {json.dumps(results['days'][str(day)][name][str(seed)])}", flush=True)
                path.write_text(json.dumps(results, indent=1))
    (out / "default_vs_plain.md").write_text(report_md(results))
    print(report_md(results))


def report_md(results: dict) -> str:
    names = [f"{t} {m}" for t, m in FIGURES] + [f"{t} level" for t in LEVELS] + ["epochs"]
    lines = ["Judged on a day no variant saw (trained through the day before, refit); mean over seeds, then each "
             "seed's value. level = predicted / observed mean.", ""]
    for day, per in sorted(results["days"].items()):
        lines += [f"### judged on {day}", "", "| variant | " + " | ".join(names) + " |",
                  "|---" * (len(names) + 1) + "|"]
        lines += [seed_row(name, [r for _, r in sorted(by_seed.items())], names) for name, by_seed in per.items()]
        lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
