"""`rankstage calibrate`: fit post-hoc calibration per task on held-out days of a log, judge it on other days,
write the versioned artifact, a diagnostics table and one reliability plot per task (before / after).

"Before" is the model output after the down-sampling correction; "after" adds the post-hoc map. Fit on days the
model did not train on, and judge on a different day, or the "after" numbers are optimistic.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from calibration import diagnostics, posthoc
from features.spec import ConfigError


def fit_tasks(predictions: dict[str, np.ndarray], labels: dict[str, np.ndarray], tasks: list[str], method: str,
              units: dict[str, str | None] | None = None) -> dict[str, dict]:
    """Per task, fit ``method`` on (N,) corrected predictions and labels (rows with a NaN label skipped); tasks
    whose ``units`` entry is not None (watch time: "seconds") are fitted isotonic, without an upper bound."""
    units = units or {}
    params = {}
    for t in tasks:
        ok = np.isfinite(labels[t])
        unit = units.get(t)
        params[t] = posthoc.fit("isotonic" if unit else method, predictions[t][ok], labels[t][ok], unit is None)
    return params


def task_units(task_types: dict[str, str]) -> dict[str, str | None]:
    """The unit of each task's served value: None for probabilities (binary tasks, completion ratio), else seconds."""
    return {t: "seconds" if kind == "watch_time" else None for t, kind in task_types.items()}


def diagnose(predictions: dict[str, np.ndarray], labels: dict[str, np.ndarray], artifact: dict, out: Path,
             bins: int = 15, units: dict[str, str | None] | None = None) -> dict[str, dict]:
    """Per task: ECE and predicted mean vs observed rate before and after; writes reliability_<task>.png.
    Tasks with a unit (watch seconds) are binned by prediction quantiles and their ECE is in that unit."""
    units = units or {}
    after = posthoc.calibrate(predictions, artifact)
    rows = {}
    for t in artifact["tasks"]:
        ok = np.isfinite(labels[t])
        p0, p1, y = predictions[t][ok], after[t][ok], labels[t][ok]
        prob = units.get(t) is None
        rows[t] = {"before": diagnostics.summary(p0, y, bins, prob), "after": diagnostics.summary(p1, y, bins, prob),
                   "unit": units.get(t) or "probability"}
        diagnostics.reliability_plot({"before": (p0, y), f"after ({artifact['tasks'][t]['method']})": (p1, y)},
                                     out / f"reliability_{t}.png", f"{t}: reliability", bins, units.get(t))
    return rows


def format_diagnostics(rows: dict[str, dict], title: str) -> str:
    lines = [f"## {title}", "", "| task | rows | positives | observed rate / mean | predicted mean before -> after | "
             "ECE before -> after |", "|---|---|---|---|---|---|"]
    for t, r in rows.items():
        b, a = r["before"], r["after"]
        unit = r.get("unit", "probability")
        positives = f"{b['positives']:.0f}" if unit == "probability" else "-"
        ece = f"{b['ece']:.4f} -> {a['ece']:.4f}" + ("" if unit == "probability" else f" {unit}")
        lines.append(f"| {t} | {b['rows']} | {positives} | {b['observed_rate']:.4f} | "
                     f"{b['predicted_mean']:.4f} -> {a['predicted_mean']:.4f} | {ece} |")
    return "\n".join(lines) + "\n"


def calibrate_command(model_base_path, log, fit_days, eval_days, method, tasks, out, chunk_mb=8.0) -> dict:
    from evaluation.scoring import score_log
    from ranking.servable import load_servable

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    eval_days = eval_days or fit_days
    scored = score_log(load_servable(model_base_path), log, days=sorted({*fit_days, *eval_days}), chunk_mb=chunk_mb)
    tasks = tasks or [t for t, kind in scored.model["task_types"].items() if kind == "binary"]
    unknown = [t for t in tasks if t not in scored.model["task_types"]]
    if unknown:
        raise ConfigError(f"--tasks: {unknown} not tasks of the model (tasks: {list(scored.model['task_types'])})")
    units = task_units(scored.model["task_types"])
    fit_part, eval_part = scored.days(fit_days), scored.days(eval_days)
    params = fit_tasks(fit_part.predictions, fit_part.labels, tasks, method, units)
    artifact = posthoc.make_artifact(
        params, model={k: scored.model[k] for k in ("name", "version", "path")},
        fitted_on={"log": scored.model["log"], "days": list(fit_days), "rows": len(fit_part), "method": method,
                   "applied_after": "correct_downsampling"})
    path = posthoc.save_artifact(artifact, out / "calibration.json")
    rows = diagnose(eval_part.predictions, eval_part.labels, artifact, out, units=units)
    same = set(eval_days) == set(fit_days)
    report = format_diagnostics(rows, f"calibration {method} fitted on {list(fit_days)}, judged on {list(eval_days)}"
                                      f"{' (same days: optimistic)' if same else ''}")
    (out / "calibration.md").write_text(report + "\n" + "\n".join(f"![{t}](reliability_{t}.png)" for t in rows) + "\n")
    (out / "diagnostics.json").write_text(json.dumps(rows, indent=1))
    print(report)
    print(f"wrote {path} (version {artifact['version']}), calibration.md, reliability_<task>.png")
    return {"artifact": artifact, "diagnostics": rows}


def calibrate_from_run(run_dir, model_base_path, log, eval_days, method, tasks, out, chunk_mb=8.0) -> dict:
    """Fit on a training run's validation predictions and ship the artifact with the version exported from it.

    The run's ``validation_predictions.npz`` holds the non-refit model's predictions of the day after its training
    days: out of sample, and exactly the "next day" a served model predicts. With ``--refit`` the exported model
    has also trained on that day, so its own predictions there are in sample and would fit a near-identity map;
    the non-refit model's next-day error is the one to correct. ``eval_days`` (days after the run's window) are
    scored by the exported version and judged before / after."""
    from evaluation.scoring import score_log
    from ranking.judging import load_judged
    from ranking.runs import PREDICTIONS
    from ranking.servable import load_metadata, load_servable, resolve_version

    run_dir, out = Path(run_dir), Path(out)
    if not (run_dir / PREDICTIONS).exists():
        raise ConfigError(f"--from-run {run_dir}: no {PREDICTIONS} (not a training run directory?)")
    version_dir = resolve_version(model_base_path)
    meta = load_metadata(version_dir)
    if Path(meta.get("run", "")).resolve() != run_dir.resolve():
        raise ConfigError(f"--from-run {run_dir}: model version {version_dir} was exported from run "
                          f"{meta.get('run')!r}; calibrate the version exported from this run")
    judged = load_judged(run_dir / PREDICTIONS)
    task_types = {t["task"]: t["type"] for t in meta["outputs"]}
    tasks = tasks or [t for t, kind in task_types.items() if kind == "binary"]
    unknown = [t for t in tasks if t not in judged]
    if unknown:
        raise ConfigError(f"--tasks: {unknown} not judged in {run_dir / PREDICTIONS} (has {sorted(judged)})")
    units = task_units(task_types)
    params = fit_tasks({t: judged[t][1] for t in tasks}, {t: judged[t][0] for t in tasks}, tasks, method, units)
    fit_days = sorted({int(d) for t in tasks for d in np.unique(judged[t][3])})
    artifact = posthoc.make_artifact(
        params, model={"name": meta["model_name"], "version": int(version_dir.name), "path": str(version_dir)},
        fitted_on={"run": str(run_dir), "days": fit_days, "rows": {t: len(judged[t][0]) for t in tasks},
                   "method": method, "predictions": "the non-refit model's validation predictions (next day)",
                   "applied_after": "correct_downsampling"})
    out.mkdir(parents=True, exist_ok=True)
    path = posthoc.save_artifact(artifact, out / "calibration.json")
    result: dict = {"artifact": artifact, "diagnostics": {}}
    if eval_days:
        window = meta.get("training_window", {})
        trained = {*window.get("periods", []), *(window.get("validation_periods", []) if window.get("refit") else [])}
        inside = sorted(set(eval_days) & {int(d) for d in trained})
        scored = score_log(load_servable(version_dir), log, days=sorted(eval_days), chunk_mb=chunk_mb)
        part = scored.days(eval_days)
        rows = diagnose(part.predictions, part.labels, artifact, out, units=units)
        title = (f"calibration {method} fitted on run {run_dir.name}'s validation predictions of {fit_days}, "
                 f"judged on {list(eval_days)} with version {version_dir.name}"
                 f"{f' (days {inside} are in its training window: optimistic)' if inside else ''}")
        report = format_diagnostics(rows, title)
        (out / "calibration.md").write_text(report + "\n" + "\n".join(f"![{t}](reliability_{t}.png)" for t in rows)
                                            + "\n")
        (out / "diagnostics.json").write_text(json.dumps(rows, indent=1))
        print(report)
        result["diagnostics"] = rows
    print(f"wrote {path} (version {artifact['version']}, for model {meta['model_name']} v{version_dir.name})")
    return result
