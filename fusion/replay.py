"""Offline replay: measure fusion profiles by re-ranking logged lists of impressions.

The log is scored once (``evaluation.scoring.score_log``) into a compact ``ScoredLog`` (per row: list keys, logged
order, corrected predictions, labels); any number of fusion profiles are then evaluated on it (``evaluate``), which
is what makes tuning cheap. Which metric a task gets follows its type in the model's metadata: binary tasks NDCG@K,
the others (watch time, completion) the sum of their logged values over the top K.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from calibration.posthoc import calibrate, check_artifact
from evaluation.lists import Lists, group_lists, list_metrics, paired_difference, summarise
from evaluation.scoring import ScoredLog
from features.spec import ConfigError
from fusion.config import FusionConfig, FusionProfile, calibration_path, load_fusion

GROUPINGS = ("user_day", "user_window", "request")  # request: rows sharing --list-column (e.g. simulator logs)
CLICK_ONLY = FusionProfile(formula="weighted_sum", weights={"click": 1.0}, description="rank by corrected click")


def task_types(scored: ScoredLog) -> dict[str, str]:
    """Task name -> type (binary, watch_time, completion) of every labelled task, from the model's metadata."""
    types = scored.model.get("task_types") or {}
    missing = [t for t in scored.labels if t not in types]
    if missing:
        raise ConfigError(f"scored log of model {scored.model.get('name')!r}: no task type for {missing} "
                          f"(task_types: {types})")
    return {t: types[t] for t in scored.labels}


def ndcg_tasks(scored: ScoredLog) -> list[str]:
    """Binary tasks with labels in ``scored``, in the model's order: judged by NDCG@K."""
    return [t for t, kind in task_types(scored).items() if kind == "binary"]


def sum_tasks(scored: ScoredLog) -> list[str]:
    """Non-binary tasks (watch time, completion) with labels: judged by the top-K sum of their logged values."""
    return [t for t, kind in task_types(scored).items() if kind != "binary"]


def fusion_for_version(fusion_path: str | Path, model_base_path: str | Path, calibration: str | Path | None = None
                       ) -> tuple[Path, FusionConfig, dict | None]:
    """-> (version directory, fusion config, calibration artifact or None) for replaying that version: the config
    checked against its tasks and the artifact against its name, version and outputs (``check_artifact``, as
    serving checks it), before any scoring. Score ``version directory``, not the base path, so a version published
    meanwhile is not the one scored."""
    from ranking.servable import load_metadata, resolve_version

    version_dir = resolve_version(model_base_path)
    meta = load_metadata(version_dir)
    tasks = [o["task"] for o in meta["outputs"]]
    config, cal = load_fusion(fusion_path, tasks, calibration)
    if cal is not None:
        check_artifact(cal, meta["model_name"], meta["version"], tasks, calibration or calibration_path(config,
                                                                                                     fusion_path))
    return version_dir, config, cal


def scored_for_version(scored_dir: str | Path, version_dir: Path, days: list[int] | None = None) -> ScoredLog:
    """The scored rows of ``days`` from ``rankstage replay --scored-out``'s Parquet, refused unless the version
    that scored them is ``version_dir``'s (model name, version and tasks, as ``check_artifact`` ties a calibration
    artifact to a version): tuning or calibrating on another version's predictions would ship a mismatch."""
    from evaluation.scoring import read_scored, read_scored_meta
    from ranking.servable import load_metadata

    meta, scored_by = load_metadata(version_dir), read_scored_meta(scored_dir)["model"]
    want = {"name": meta["model_name"], "version": meta["version"], "tasks": [o["task"] for o in meta["outputs"]]}
    got = {k: scored_by.get(k) for k in want}
    if got != want:
        raise ConfigError(f"--scored {scored_dir}: scored by model {got}, not by the version being used "
                          f"({version_dir}: {want}); rescore with rankstage replay --scored-out")
    return read_scored(scored_dir, days)


def replay_profiles(config: FusionConfig, names: list[str] | None = None) -> dict[str, FusionProfile | None]:
    """The rankings a replay reports: the logged order, click-only, and the config's profiles ``names`` (all)."""
    return {"logged_order": None, "click_only": CLICK_ONLY,
            **{n: config.profile(n) for n in (names or list(config.profiles))}}


# ---------------------------------------------------------------- evaluation


def make_lists(scored: ScoredLog, group: str, min_list: int) -> Lists:
    if group not in GROUPINGS:
        raise ConfigError(f"--group: {group!r} is not one of {GROUPINGS}")
    if group == "request":
        if scored.request is None:
            raise ConfigError("--group request needs --list-column (e.g. request_id)")
        return group_lists([scored.request], scored.order, min_list)
    keys = [scored.user, scored.day] if group == "user_day" else [scored.user]
    return group_lists(keys, scored.order, min_list)


def list_counts(lists: Lists, labels: dict[str, np.ndarray], binary: list[str]) -> dict:
    out = {"lists": int(len(lists.lengths)), "mean_length": float(np.mean(lists.lengths)) if len(lists.lengths)
           else 0.0, "rows": int(lists.lengths.sum())}
    for task in binary:
        if task in labels:
            out[f"lists_with_{task}"] = int((lists.gather(labels[task]).sum(axis=1) > 0).sum())
    if "click" in labels:
        clicks = lists.gather(labels["click"]).sum(axis=1)
        out["lists_with_mixed_clicks"] = int(((clicks > 0) & (clicks < lists.lengths)).sum())
    return out


def per_list_metrics(scored: ScoredLog, lists: Lists, profile: FusionProfile | None, k: int,
                     calibration: dict | None = None) -> dict[str, np.ndarray]:
    """(L,) per metric for ranking the lists by ``profile`` (None = logged order)."""
    score = None if profile is None else profile.score(calibrate(scored.predictions, calibration))
    return list_metrics(lists, score, {**scored.labels, **scored.truth}, k, ndcg_tasks(scored),
                        sum_tasks(scored) + list(scored.truth))


def evaluate(scored: ScoredLog, profiles: dict[str, FusionProfile | None], group: str = "user_day",
             min_list: int = 5, k: int = 5, calibration: dict | None = None, reps: int = 1000,
             reference: str | None = "click_only") -> dict:
    """Metrics with bootstrap intervals over lists for each named ranking, and paired differences vs ``reference``."""
    lists = make_lists(scored, group, min_list)
    if not len(lists.lengths):
        raise ConfigError(f"--min-list {min_list}: no {group} list is that long")
    per = {name: per_list_metrics(scored, lists, prof, k, calibration) for name, prof in profiles.items()}
    result = {"counts": list_counts(lists, scored.labels, ndcg_tasks(scored)), "group": group,
              "min_list": min_list, "k": k, "metrics": {name: summarise(m, reps) for name, m in per.items()},
              "differences": {}}
    if reference in per:
        result["reference"] = reference
        result["differences"] = {name: paired_difference(m, per[reference], reps) for name, m in per.items()
                                 if name != reference}
    return result


def _fmt(m: dict, digits: int) -> str:
    lo, hi = m["ci95"]
    return f"{m['mean']:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def format_report(result: dict, title: str = "replay") -> str:
    c = result["counts"]
    lines = [f"## {title}", "",
             f"{c['lists']} {result['group']} lists of >= {result['min_list']} impressions ({c['rows']} rows, "
             f"mean length {c['mean_length']:.1f}); lists holding a " +
             ", ".join(f"{k.removeprefix('lists_with_')}: {v}" for k, v in c.items()
                       if k.startswith("lists_with_") and k != "lists_with_mixed_clicks") +
             (f"; mixed clicks: {c['lists_with_mixed_clicks']}" if "lists_with_mixed_clicks" in c else "") + ".",
             "NDCG@K is averaged over lists holding at least one positive of that behaviour; top@K sums the logged "
             "watch seconds / completion ratios of the first K. Brackets: bootstrap 95% interval over lists.", ""]
    names = list(result["metrics"])
    metrics = list(result["metrics"][names[0]])
    lines.append("| ranking | " + " | ".join(metrics) + " |")
    lines.append("|---|" + "---|" * len(metrics))
    for n in names:
        row = result["metrics"][n]
        lines.append(f"| {n} | " + " | ".join(_fmt(row[m], 1 if "top@" in m and "watch" in m else 3)
                                                for m in metrics) + " |")
    if result["differences"]:
        ref = result["reference"]
        lines += ["", f"Paired difference vs {ref} (per list, same lists; * = interval excludes 0):", "",
                  "| ranking | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
        for n, row in result["differences"].items():
            cells = []
            for m in metrics:
                d = row[m]
                sig = "*" if d["ci95"][0] > 0 or d["ci95"][1] < 0 else ""
                cells.append(_fmt(d, 1 if "top@" in m and "watch" in m else 3) + sig)
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
