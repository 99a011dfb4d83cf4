"""`rankstage calibrate`: fit post-hoc calibration per task on held-out days of a log, judge it on other days,
write the versioned artifact, a diagnostics table and one reliability plot per task (before / after).

The orchestration (load the exported version, score the log, write the files); the fitting and the diagnostics are
``calibration.fit``'s pure functions.
"""

from __future__ import annotations

import json
from pathlib import Path

from calibration import posthoc
from calibration.fit import diagnose, fit_tasks, format_diagnostics, in_sample_days, task_units, trained_days
from evaluation.scoring import score_log
from features.spec import ConfigError
from ranking.servable import load_metadata, load_servable, resolve_version


def _version(model_base_path: str | Path) -> tuple[Path, dict]:
    """(version directory, metadata) of ``--model-base-path``: the version itself or the newest under it."""
    version_dir = resolve_version(model_base_path)
    return version_dir, load_metadata(version_dir)


def _check_tasks(tasks: list[str] | None, meta: dict) -> list[str]:
    """``--tasks`` checked against the version's outputs; default: its binary tasks."""
    types = {o["task"]: o["type"] for o in meta["outputs"]}
    tasks = tasks or [t for t, kind in types.items() if kind == "binary"]
    unknown = [t for t in tasks if t not in types]
    if unknown:
        raise ConfigError(f"--tasks: {unknown} not tasks of the model (tasks: {list(types)})")
    return tasks


def calibrate_command(model_base_path, log, fit_days, eval_days, method, tasks, out, chunk_mb=8.0,
                      fitted_on: dict | None = None, scored_dir=None) -> dict:
    """Score the version on ``fit_days`` and ``eval_days`` (default: the fit days), fit on the first, judge on the
    second, write the artifact (for that version) and the diagnostics into ``out``. Fit days the version trained on
    are refused: its predictions there are in sample, and a map fitted on them corrects nothing it will serve.
    ``scored_dir``: the scored Parquet of ``rankstage replay --scored-out`` (of this version) instead of scoring."""
    version_dir, meta = _version(model_base_path)
    window = meta.get("training_window")
    inside = in_sample_days(list(fit_days), window)
    if inside:
        raise ConfigError(f"--fit-day {inside}: model version {version_dir} trained on these days (training window "
                          f"{sorted(trained_days(window))}); fit on days after its window")
    tasks = _check_tasks(tasks, meta)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    eval_days = eval_days or fit_days
    days = sorted({*fit_days, *eval_days})
    if scored_dir:
        from fusion.replay import scored_for_version

        scored = scored_for_version(scored_dir, version_dir, days)
    else:
        scored = score_log(load_servable(version_dir), log, days=days, chunk_mb=chunk_mb)
    units = task_units(scored.model["task_types"])
    fit_part, eval_part = scored.days(fit_days), scored.days(eval_days)
    params = fit_tasks(fit_part.predictions, fit_part.labels, tasks, method, units)
    artifact = posthoc.make_artifact(
        params, model={k: scored.model[k] for k in ("name", "version", "path")},
        fitted_on={"log": scored.model["log"], "days": list(fit_days), "rows": len(fit_part), "method": method,
                   "predictions": f"model {scored.model['name']} version {scored.model['version']}, out of sample",
                   "applied_after": "correct_downsampling", **(fitted_on or {})})
    path = posthoc.save_artifact(artifact, out / "calibration.json")
    rows = diagnose(eval_part.predictions, eval_part.labels, artifact, out, units=units)
    notes = [" (same days: optimistic)"] if set(eval_days) == set(fit_days) else []
    judged_inside = in_sample_days(list(eval_days), window)
    notes += [f" (days {judged_inside} are in its training window: optimistic)"] if judged_inside else []
    report = format_diagnostics(rows, f"calibration {method} fitted on {list(fit_days)}, judged on {list(eval_days)} "
                                      f"with version {scored.model['version']}{''.join(notes)}")
    (out / "calibration.md").write_text(report + "\n" + "\n".join(f"![{t}](reliability_{t}.png)" for t in rows) + "\n")
    (out / "diagnostics.json").write_text(json.dumps(rows, indent=1))
    print(report)
    print(f"wrote {path} (version {artifact['version']}, for model {scored.model['name']} "
          f"v{scored.model['version']}), calibration.md, reliability_<task>.png")
    return {"artifact": artifact, "diagnostics": rows}


def calibrate_from_run(run_dir, model_base_path, log, eval_days, method, tasks, out, chunk_mb=8.0,
                       scored_dir=None) -> dict:
    """Fit on the run's validation days, scored by the version exported from that run, and ship it for that version.

    The validation days are the days after the run's training days: a version trained without ``--refit`` never saw
    them, so its own predictions there are out of sample, and exactly the "next day" a served model predicts. A
    refit version trained on them too: its predictions there are in sample, and the non-refit model's (the run's
    ``validation_predictions.npz``) are another model's, so the pair is refused. ``eval_days`` default to the fit
    days (optimistic)."""
    run_dir = Path(run_dir)
    if not (run_dir / "artifacts.json").exists():
        raise ConfigError(f"--from-run {run_dir}: no artifacts.json (not a training run directory?)")
    version_dir, meta = _version(model_base_path)
    if Path(meta.get("run", "")).resolve() != run_dir.resolve():
        raise ConfigError(f"--from-run {run_dir}: model version {version_dir} was exported from run "
                          f"{meta.get('run')!r}; calibrate the version exported from this run")
    window = meta.get("training_window") or {}
    fit_days = sorted(window.get("validation_periods") or [])
    if not fit_days:
        raise ConfigError(f"--from-run {run_dir}: model version {version_dir} has no validation days "
                          f"(training_window {window}); give --fit-day instead")
    if window.get("refit"):
        raise ConfigError(
            f"--from-run {run_dir}: model version {version_dir} was refit on the run's validation days {fit_days} "
            "(rankstage train --refit), so its predictions there are in sample, and the run's validation "
            "predictions are those of the non-refit model, which is not the version shipped. Calibrate the refit "
            "version on days after its window (rankstage calibrate --fit-day D with D later than "
            f"{max(fit_days)}), or train without --refit and calibrate --from-run that run")
    return calibrate_command(version_dir, log, fit_days, eval_days, method, tasks, out, chunk_mb,
                             fitted_on={"run": str(run_dir)}, scored_dir=scored_dir)
