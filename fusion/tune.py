"""`rankstage tune-fusion`: search a fusion profile's weights and exponents with Optuna on earlier days, then judge
the best against the logged order, click-only, watch-only and the hand-set profile on a held-out day.

Objective (stated, constrained): maximise watch seconds in the top K on the tuning days subject to
click NDCG@K >= (1 - tolerance) x click-only's click NDCG@K on the same lists. Optuna's TPE sampler handles the
constraint (``Trial.set_constraint``); a run is reproducible from ``--seed`` (one sampler, one worker).
Sparse behaviours (collect = follow, share = forward: a handful of lists per day) are not tuned: their weights
would fit noise. Click is the anchor term (weight 1, exponent 1): a product's ranking is unchanged by a common power.
"""

from __future__ import annotations

import csv
import datetime as dt
import sys
from pathlib import Path

import numpy as np

from evaluation.lists import Lists
from evaluation.scoring import ScoredLog, score_log
from features.spec import ConfigError
from fusion.config import FusionConfig, FusionProfile, dump_fusion_config, load_fusion_config
from fusion.replay import (
    CLICK_ONLY,
    evaluate,
    format_report,
    fusion_for_version,
    make_lists,
    per_list_metrics,
    scored_for_version,
)

WATCH_ONLY = FusionProfile(formula="weighted_sum", weights={"watch_time": 1.0}, description="rank by watch seconds")
TUNED_TASKS = ("long_view", "watch_time", "completion", "like")  # besides the click anchor
# weight ranges per unit: probabilities / ratios vs seconds
WEIGHT_RANGE = {"long_view": (0.1, 100.0), "like": (0.1, 100.0), "completion": (0.1, 100.0),
                "watch_time": (0.001, 1.0)}


def suggest_profile(trial, formula: str, tasks: tuple[str, ...]) -> FusionProfile:
    weights, exponents = {}, {}
    for t in tasks:
        lo, hi = WEIGHT_RANGE[t]
        weights[t] = trial.suggest_float(f"w_{t}", lo, hi, log=True)
        if formula == "weighted_product":
            exponents[t] = trial.suggest_float(f"a_{t}", 0.0, 2.0)
    if formula == "weighted_product":
        weights, exponents = {"click": 1.0, **weights}, {"click": 1.0, **exponents}
    elif formula == "weighted_sum":
        weights = {"click": 1.0, **{t: w / 10 for t, w in weights.items()}}
    return FusionProfile(formula=formula, weights=weights, exponents=exponents,
                         description=f"tuned by Optuna TPE, trial {trial.number}")


def tune_fusion(model_base_path, log, fusion_path, hand_profile, tune_days, eval_day, out, trials=200, seed=0,
                group="user_day", min_list=5, k=5, tolerance=0.01, formula="weighted_product", calibration=None,
                reps=1000, order_column="time_ms", chunk_mb=8.0, list_column=None, truth_columns=(), scored_dir=None
                ) -> dict:
    """``scored_dir``: the scored Parquet of ``rankstage replay --scored-out`` (of this version) instead of
    scoring ``log``."""
    if eval_day in tune_days:
        raise ConfigError(f"--eval-day {eval_day} is also a --tune-day: the held-out day must not be tuned on")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    from ranking.servable import load_servable

    version_dir, config, cal = fusion_for_version(fusion_path, model_base_path, calibration)
    if scored_dir:
        scored_all = scored_for_version(scored_dir, version_dir, [*tune_days, eval_day])
    else:
        scored_all = score_log(load_servable(version_dir), log, days=[*tune_days, eval_day],
                               order_column=order_column, chunk_mb=chunk_mb, list_column=list_column,
                               truth_columns=truth_columns)
    tasks = scored_all.model["tasks"]
    hand = config.profile(hand_profile)
    tune_scored, eval_scored = scored_all.days(tune_days), scored_all.days([eval_day])
    lists = make_lists(tune_scored, group, min_list)
    click_key, watch_key = f"click/ndcg@{k}", f"watch_time/top@{k}"
    print(f"tuning on days {tune_days}: {len(lists.lengths)} {group} lists of >= {min_list} (mean length "
          f"{np.mean(lists.lengths):.1f}); {trials} trials, seed {seed}")
    study, best, tuned, floor = search_fusion(tune_scored, lists, k, trials, seed, tolerance, formula, cal, hand)
    feasible = [t for t in study.trials if t.user_attrs["constraint"] <= 0]

    version = f"{dt.date.today().isoformat()}.tuned.seed{seed}"
    profiles = {**config.profiles, "tuned": tuned}
    # validated against the model's tasks, as loading validates it (a click_multiplier profile needs the model's
    # click task, not a click weight: without the context it was refused and tune-fusion stopped here)
    tuned_config = FusionConfig.model_validate({"version": version, "default_profile": "tuned",
                                                "calibration": config.calibration, "profiles": profiles},
                                               context={"tasks": tuple(tasks)})
    header = (f"# Tuned by `rankstage tune-fusion` (seed {seed}, {trials} trials, formula {formula}) on days "
              f"{tune_days}\n# objective: max {watch_key} s.t. {click_key} >= {1 - tolerance:.2f} x click-only; "
              f"model {scored_all.model['path']}\n")
    (out / "fusion_tuned.yaml").write_text(header + dump_fusion_config(tuned_config))
    load_fusion_config(out / "fusion_tuned.yaml", tasks)  # what is written must load

    compare = {"logged_order": None, "click_only": CLICK_ONLY, "watch_only": WATCH_ONLY, "hand_set": hand,
               "tuned": tuned}
    tune_res = evaluate(tune_scored, compare, group, min_list, k, cal, reps)
    eval_res = evaluate(eval_scored, compare, group, min_list, k, cal, reps)
    _write_trials(study, out / "trials.csv")
    _plot(study, tune_res, eval_res, floor, click_key, watch_key, out / "tradeoff.png")
    report = "\n".join([
        f"# tune-fusion: model {scored_all.model['name']} v{scored_all.model['version']} "
        f"({scored_all.model['path']}; trained on {scored_all.model['training_window']})", "",
        f"Objective: maximise {watch_key} on days {tune_days} subject to {click_key} >= {1 - tolerance:.2f} x "
        f"click-only ({floor:.4f}). {trials} Optuna TPE trials, seed {seed}, formula {formula}; "
        f"{len(feasible)} feasible. Best trial {best.number}: {watch_key} {best.value:.1f} s, {click_key} "
        f"{best.user_attrs['click_ndcg']:.4f} on the tuning days. Tuned config: `fusion_tuned.yaml` "
        f"(version {version}).", "", "```yaml", dump_fusion_config(
            FusionConfig(version=version, profiles={"tuned": tuned})).strip(), "```", "",
        format_report(eval_res, f"held-out day {eval_day} (not tuned on)"),
        format_report(tune_res, f"tuning days {tune_days} (optimistic: selected on these lists)"),
        "![trade-off across trials](tradeoff.png)", ""])
    (out / "tune.md").write_text(report)
    print(format_report(eval_res, f"held-out day {eval_day} (not tuned on)"))
    print(f"wrote {out}/fusion_tuned.yaml, tune.md, tradeoff.png, trials.csv")
    return {"tuned": tuned, "eval": eval_res, "tune": tune_res, "best_trial": best.number}


def _hand_params(hand: FusionProfile, formula: str, tasks: tuple[str, ...]) -> dict:
    params = {}
    if hand.formula != formula:
        return params
    for t in tasks:
        lo, hi = WEIGHT_RANGE[t]
        w = hand.weights.get(t)
        if w is not None and lo <= w <= hi:
            params[f"w_{t}"] = w
        if formula == "weighted_product" and t in hand.weights:
            params[f"a_{t}"] = float(np.clip(hand.exponents.get(t, 1.0), 0.0, 2.0))
    return params


def _write_trials(study, path: Path) -> None:
    keys = sorted({k for t in study.trials for k in t.params})
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["trial", "watch_top_k", "click_ndcg", "feasible", *keys])
        for t in study.trials:
            w.writerow([t.number, t.value, t.user_attrs["click_ndcg"], t.user_attrs["constraint"] <= 0,
                        *[t.params.get(k, "") for k in keys]])


def _plot(study, tune_res: dict, eval_res: dict, floor: float, click_key: str, watch_key: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    ax = axes[0]
    clicks = np.array([t.user_attrs["click_ndcg"] for t in study.trials])
    watch = np.array([t.value for t in study.trials])
    ok = np.array([t.user_attrs["constraint"] <= 0 for t in study.trials])
    ax.scatter(clicks[~ok], watch[~ok], s=10, c="lightgray", label="trial (infeasible)")
    ax.scatter(clicks[ok], watch[ok], s=12, c=np.flatnonzero(ok), cmap="viridis", label="trial (feasible)")
    ax.axvline(floor, color="r", ls=":", lw=1, label="click floor")
    for res, axis, title in ((tune_res, ax, "tuning days: trials"), (eval_res, axes[1], "held-out day")):
        for name, m in res["metrics"].items():
            c, w = m[click_key], m[watch_key]
            axis.errorbar(c["mean"], w["mean"], xerr=[[c["mean"] - c["ci95"][0]], [c["ci95"][1] - c["mean"]]]
                          if axis is axes[1] else None,
                          yerr=[[w["mean"] - w["ci95"][0]], [w["ci95"][1] - w["mean"]]] if axis is axes[1] else None,
                          fmt="s", ms=6, capsize=2, label=name)
        axis.set(xlabel=click_key, ylabel=f"{watch_key} (s)", title=title)
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def search_fusion(scored: ScoredLog, lists: Lists, k: int, trials: int, seed: int, tolerance: float = 0.01,
                  formula: str = "weighted_product", calibration: dict | None = None,
                  start: FusionProfile | None = None, verbose: bool = True):
    """Optuna TPE search on ``lists`` of ``scored``: max watch seconds in the top k s.t. click NDCG@k >= (1 - tolerance)
    x click-only's. -> (study, best feasible trial, its profile, click floor). Deterministic for a seed."""
    import optuna

    click_key, watch_key = f"click/ndcg@{k}", f"watch_time/top@{k}"

    def mean_metrics(profile):
        m = per_list_metrics(scored, lists, profile, k, calibration)
        return float(np.nanmean(m[click_key])), float(np.nanmean(m[watch_key]))

    click_ref, watch_ref = mean_metrics(CLICK_ONLY)
    floor = (1 - tolerance) * click_ref
    if verbose:
        print(f"  click-only: {click_key} {click_ref:.4f} (floor {floor:.4f}), {watch_key} {watch_ref:.1f} s")
    tasks_tuned = tuple(t for t in TUNED_TASKS if t in scored.predictions)

    def objective(trial):
        profile = suggest_profile(trial, formula, tasks_tuned)
        click, watch = mean_metrics(profile)
        trial.set_user_attr("click_ndcg", click)
        trial.set_user_attr("profile", profile.model_dump())
        trial.set_user_attr("constraint", floor - click)  # feasible when <= 0
        trial.set_constraint("click_floor", floor - click)
        return watch

    best_seen = [-np.inf]
    tty = sys.stdout.isatty()
    lead = "\r" if tty else ""

    def progress(study, trial):
        feasible = trial.user_attrs["constraint"] <= 0
        if feasible and trial.value > best_seen[0]:
            best_seen[0] = trial.value
        if not verbose or (not tty and (trial.number + 1) % 10 and trial.number + 1 != trials):
            return
        print(f"{lead}  trial {trial.number + 1}/{trials}: {watch_key} {trial.value:6.1f} s, {click_key} "
              f"{trial.user_attrs['click_ndcg']:.4f}{'' if feasible else ' (infeasible)'}; best feasible "
              f"{best_seen[0]:.1f} s", end="" if tty else "\n", flush=True)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(20, trials))
    study = optuna.create_study(direction="maximize", sampler=sampler)
    if start is not None:
        study.enqueue_trial(_hand_params(start, formula, tasks_tuned))  # start from the hand-set point if expressible
    study.optimize(objective, n_trials=trials, callbacks=[progress])
    if verbose and tty:
        print()
    feasible = [t for t in study.trials if t.user_attrs["constraint"] <= 0]
    if not feasible:
        raise ConfigError(f"no trial kept {click_key} within {tolerance:.0%} of click-only; raise --trials or "
                          f"--click-tolerance")
    best = max(feasible, key=lambda t: (t.value, -t.number))
    return study, best, FusionProfile.model_validate(best.user_attrs["profile"]), floor
