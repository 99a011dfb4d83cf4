"""Does the shallow position x device tower remove position bias? Four variants through ``ranking.train.train``:

    no_debias          position and device are not model inputs
    position_feature   position and device are ordinary (serving) features; at evaluation every row gets position 1
    tower_dropout      shallow tower on position x device for click, 10% position dropout (YouTube 2019)
    tower_no_dropout   the same tower without dropout

judged on logs whose positions are randomized (AUC against clicks, NDCG against the planted attraction per list) and
by the learned bias per position and device against the truth: logit offsets relative to position 1 against planted
log-examination offsets (simulator) or against log(CTR_p / CTR_1) on the random log (Open Bandit Dataset).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
from scipy.stats import spearmanr

from evaluation import metrics
from evaluation.lists import group_lists, list_ndcg, rank
from features.logs import raw_inputs, read_table
from features.spec import RankstageConfig, load_config
from ranking.predict import predict
from ranking.runs import LoadedRun, load_run
from ranking.train import train
from simulation.simulator import SimulationConfig, write_simulation

VARIANTS = ("no_debias", "position_feature", "tower_dropout", "tower_no_dropout")
TOWER_VARIANTS = ("tower_dropout", "tower_no_dropout")
ALL_DEVICES = "all"  # key of the bias curve when the log has no device
POSITION_DEFAULT = 1  # the position every row gets at serving in the position_feature variant


def variant_configs(config: RankstageConfig, variants=VARIANTS) -> dict[str, RankstageConfig]:
    """The variants of a config whose bias tower is set (position, optionally device); same features otherwise."""
    bt = config.model.bias_tower
    if bt.position is None:
        raise ValueError(f"config {config.name!r}: model.bias_tower.position must be set to derive the variants")
    base = config.model_dump()
    bias_names = [f.name for f in config.bias_features]
    out = {}
    for name in variants:
        data = json.loads(json.dumps(base))
        tower = data["model"]["bias_tower"]
        data["name"] = f"{config.name}_{name}"
        if name in ("no_debias", "position_feature"):
            tower.update(position=None, device=None, tasks=[])
            if name == "no_debias":
                data["features"] = [f for f in data["features"] if f["name"] not in bias_names]
            else:  # the same columns as ordinary context features the serving model receives
                for f in data["features"]:
                    if f["name"] in bias_names:
                        f.update(bias=False, group="context", embedding_dim=f.get("embedding_dim") or 4)
        elif name == "tower_no_dropout":
            tower["position_dropout"] = 0.0
        elif name == "tower_dropout":
            tower["position_dropout"] = 0.1
        else:
            raise ValueError(f"unknown variant {name!r}; known: {VARIANTS}")
        out[name] = RankstageConfig.model_validate(data)
    return out


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def _index(values: list, value, oov: int) -> int:
    return oov + [str(v) for v in values].index(str(value))


def tower_offsets(run: LoadedRun, positions: list[int]) -> dict[str, list[float]]:
    """Learned click-logit bias per device at ``positions``, relative to the first, from ``bias_table()``."""
    bt, feats = run.config.model.bias_tower, {f.name: f for f in run.config.features}
    table = np.asarray(run.models.bias_tower.bias_table())  # (P_idx, V_idx)
    pos_vocab = run.stats[bt.position].vocabulary
    p_idx = [_index(pos_vocab, p, feats[bt.position].vocab.oov_buckets) for p in positions]
    if bt.device is None:
        curves = {ALL_DEVICES: table[p_idx, 0]}
    else:
        dev_oov = feats[bt.device].vocab.oov_buckets
        curves = {str(d): table[p_idx, _index(run.stats[bt.device].vocabulary, d, dev_oov)]
                  for d in run.stats[bt.device].vocabulary}
    return {d: (c - c[0]).tolist() for d, c in sorted(curves.items())}


def implied_offsets(run: LoadedRun, frame: pd.DataFrame, positions: list[int], position: str,
                    device: str | None) -> dict[str, list[float]]:
    """For a model with position as an input: mean click-logit change, per device, when every row of ``frame`` is
    moved from the first of ``positions`` to each other one."""
    logits = []
    for p in positions:
        moved = frame.assign(**{position: p})
        logits.append(_logit(predict(run.models, raw_inputs(moved, run.config.features))["click"]))
    logits = np.stack(logits, axis=1) - np.stack(logits, axis=1)[:, :1]  # (N, P) relative to the first
    groups = frame[device].astype(str).to_numpy() if device else np.full(len(frame), ALL_DEVICES)
    return {g: logits[groups == g].mean(axis=0).tolist() for g in sorted(set(groups))}


def bias_agreement(learned: dict[str, list[float]], planted: dict[str, list[float]]) -> dict:
    """Spearman rank correlation and error over the position x device cells below position 1."""
    devices = [d for d in planted if d in learned]
    x = np.concatenate([learned[d][1:] for d in devices])
    y = np.concatenate([planted[d][1:] for d in devices])
    rho = float(spearmanr(x, y).statistic) if len(x) > 1 else float("nan")
    per_device = {d: float(spearmanr(learned[d][1:], planted[d][1:]).statistic) if len(planted[d]) > 2
                  else float("nan") for d in devices}
    return {"spearman": rho, "spearman_per_device": per_device, "rmse": float(np.sqrt(np.mean((x - y) ** 2))),
            "mae": float(np.mean(np.abs(x - y)))}


def ndcg_per_list(lists: np.ndarray, score: np.ndarray, gain: np.ndarray) -> np.ndarray:
    """NDCG of ordering each list by ``score`` with graded relevance ``gain`` (>= 0), whole list; one value per
    list id in sorted id order (ties: ``evaluation.lists``' rule)."""
    grouped = group_lists([np.asarray(lists)], np.arange(len(lists)))
    return list_ndcg(rank(grouped, np.asarray(score, np.float64)), np.asarray(gain, np.float64))


def served_click(run: LoadedRun, frame: pd.DataFrame) -> np.ndarray:
    """Served click probability; a model with position as an input is asked at ``POSITION_DEFAULT``."""
    pos = next((f.name for f in run.config.serving_features if f.name == "position"), None)
    if pos is not None:
        frame = frame.assign(**{pos: POSITION_DEFAULT})
    return predict(run.models, raw_inputs(frame, run.config.features))["click"].astype(np.float64)


def ranking_quality(frame: pd.DataFrame, pred: dict[str, np.ndarray], list_column: str | None,
                    gain_column: str | None, reps: int, seed: int) -> dict[str, dict]:
    """Click AUC (and NDCG against ``gain_column`` per list) with bootstrap intervals, and paired differences
    against ``no_debias`` (the same resamples for both models)."""
    y = frame["click"].to_numpy()
    out: dict[str, dict] = {}
    base = pred.get("no_debias")
    for name, p in pred.items():
        r = {"click_auc": metrics.auc(y, p), "click_auc_ci95": metrics.bootstrap_ci(metrics.auc, y, p, reps=reps,
                                                                                      seed=seed)}
        if base is not None and name != "no_debias":
            diff = lambda yy, a, b: metrics.auc(yy, a) - metrics.auc(yy, b)  # noqa: E731
            r["auc_minus_no_debias"] = r["click_auc"] - metrics.auc(y, base)
            r["auc_minus_no_debias_ci95"] = metrics.bootstrap_ci(diff, y, p, base, reps=reps, seed=seed)
        if list_column and gain_column:
            lists, gain = frame[list_column].to_numpy(), frame[gain_column].to_numpy()
            nd = ndcg_per_list(lists, p, gain)
            r["ndcg"], r["ndcg_ci95"] = float(nd.mean()), metrics.bootstrap_ci(np.mean, nd, reps=reps, seed=seed)
            if base is not None and name != "no_debias":
                d = nd - ndcg_per_list(lists, base, gain)
                r["ndcg_minus_no_debias"] = float(d.mean())
                r["ndcg_minus_no_debias_ci95"] = metrics.bootstrap_ci(np.mean, d, reps=reps, seed=seed)
        out[name] = r
    return out


def train_variants(config: RankstageConfig, train_log: str | Path, work: Path, variants=VARIANTS,
                   log: Callable[[str], None] = print, verbose: bool = False) -> dict[str, LoadedRun]:
    """Train each variant with ``ranking.train.train`` into ``work/<variant>`` and load it back."""
    runs = {}
    for name, cfg in variant_configs(config, variants).items():
        log(f"  training {cfg.name} -> {work / name}")
        runs[name] = load_run(train(cfg, work / name, log=train_log, verbose=verbose))
    return runs


def compare(config: RankstageConfig, train_log: str | Path, test: pd.DataFrame, work: Path,
            planted: dict[str, list[float]] | None, list_column: str | None = None, gain_column: str | None = None,
            variants=VARIANTS, reps: int = 200, seed: int = 0, log: Callable[[str], None] = print) -> dict:
    """Train the variants, then measure ranking quality on ``test`` and the learned bias against ``planted``."""
    runs = train_variants(config, train_log, work, variants, log)
    bt = config.model.bias_tower
    positions = sorted(int(p) for p in test[bt.position].unique())
    log("  evaluating on the randomized log")
    pred = {name: served_click(run, test) for name, run in runs.items()}
    result = {"positions": positions, "variants": ranking_quality(test, pred, list_column, gain_column, reps, seed)}
    for name, run in runs.items():
        r = result["variants"][name]
        if name in TOWER_VARIANTS:
            r["bias"] = tower_offsets(run, positions)
        elif name == "position_feature":
            r["bias"] = implied_offsets(run, test, positions, bt.position, bt.device)
        if "bias" in r and planted is not None:
            r["bias_vs_truth"] = bias_agreement(r["bias"], planted)
        r["epochs"] = run.artifacts.get("best_epoch")
    result["planted_bias"] = planted
    return result


# --- the two data sets ---------------------------------------------------------------------------------------------

def run_simulated(config: RankstageConfig, work: Path, rows: int, seed: int, sim: SimulationConfig | None = None,
                  variants=VARIANTS, reps: int = 200, log: Callable[[str], None] = print) -> dict:
    sim = sim or SimulationConfig()
    log(f"[simulator] {rows} training impressions, {rows // 3} randomized test impressions, seed {seed}")
    paths = write_simulation(work / "log", sim, rows, rows // 3, seed)
    truth = json.loads(paths["truth"].read_text())
    test = read_table(paths["test"])
    data = config.model_dump()
    data["data"]["log"] = str(paths["train"])
    data["training"]["seed"] = seed
    result = compare(RankstageConfig.model_validate(data), paths["train"], test, work / "runs",
                     truth["log_examination_offsets"], "request_id", "true_attraction", variants, reps, seed, log)
    result["truth"] = truth
    return result


def obd_frame(path: str | Path) -> pd.DataFrame:
    """An OBD log with ``period`` (day of the timestamp, 0 = Nov 24) and ``affinity_shown`` added in memory."""
    df = read_table(path)
    df = df.drop(columns=[c for c in df.columns if c == "" or c.startswith("Unnamed")])
    day = pd.to_datetime(df["timestamp"]).dt.floor("D")
    df["period"] = (day - pd.Timestamp("2019-11-24", tz="UTC")).dt.days
    aff = df[[f"user-item_affinity_{k}" for k in range(int(df["item_id"].max()) + 1)]].to_numpy()
    df["affinity_shown"] = aff[np.arange(len(df)), df["item_id"].to_numpy()]
    return df


def empirical_position_effect(test: pd.DataFrame, positions: list[int], reps: int, seed: int) -> dict:
    """log(CTR_p / CTR_first) on a log with randomized positions, with bootstrap intervals."""
    y, pos = test["click"].to_numpy(), test["position"].to_numpy()

    def effect(p):
        def f(yy, pp):
            a, b = yy[pp == p].mean(), yy[pp == positions[0]].mean()
            return float(np.log(a / b)) if a > 0 and b > 0 else float("nan")
        return f

    return {str(p): {"log_ctr_ratio": effect(p)(y, pos), "ci95": metrics.bootstrap_ci(effect(p), y, pos, reps=reps,
                                                                                        seed=seed),
                     "clicks": int(y[pos == p].sum()), "rows": int((pos == p).sum())} for p in positions}


def run_obd(config: RankstageConfig, root: str | Path, work: Path, seed: int, variants=VARIANTS, reps: int = 1000,
            log: Callable[[str], None] = print) -> dict:
    root = Path(root)
    train_df, test = obd_frame(root / "bts/all/all.csv"), obd_frame(root / "random/all/all.csv")
    log(f"[obd] train {len(train_df)} rows ({int(train_df['click'].sum())} clicks, Thompson sampling), test "
        f"{len(test)} rows ({int(test['click'].sum())} clicks, uniformly random)")
    data = config.model_dump()
    data["training"]["seed"] = seed
    with tempfile.TemporaryDirectory(prefix="obd-") as tmp:  # derived columns live outside the repo, briefly
        path = Path(tmp) / "bts_with_period.csv"
        pacsv.write_csv(pa.Table.from_pandas(train_df, preserve_index=False), path)
        result = compare(RankstageConfig.model_validate(data), path, test, work / "runs", None, variants=variants,
                         reps=reps, seed=seed, log=log)
    result["empirical_position_effect"] = empirical_position_effect(test, result["positions"], reps, seed)
    result["clicks"] = {"train": int(train_df["click"].sum()), "test": int(test["click"].sum())}
    return result


# --- output --------------------------------------------------------------------------------------------------------

def _ci(v: float, ci) -> str:
    return f"{v:.4f} [{ci[0]:.4f}, {ci[1]:.4f}]"


def _curve(c: dict[str, list[float]]) -> str:
    return "; ".join(f"{d}: " + " ".join(f"{x:+.2f}" for x in v[1:]) for d, v in c.items())


def format_table(title: str, result: dict) -> str:
    has_ndcg = any("ndcg" in r for r in result["variants"].values())
    head = ["variant", "click AUC [95% CI]", "AUC − no_debias [95% CI]"]
    head += ["NDCG vs planted attraction [95% CI]", "NDCG − no_debias [95% CI]"] if has_ndcg else []
    head += ["bias Spearman", "bias RMSE", f"learned bias, positions {result['positions'][1]}.. vs "
                                           f"{result['positions'][0]}"]
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in result["variants"].items():
        row = [name, _ci(r["click_auc"], r["click_auc_ci95"])]
        row.append(_ci(r["auc_minus_no_debias"], r["auc_minus_no_debias_ci95"]) if "auc_minus_no_debias" in r
                   else "—")
        if has_ndcg:
            row.append(_ci(r["ndcg"], r["ndcg_ci95"]))
            row.append(_ci(r["ndcg_minus_no_debias"], r["ndcg_minus_no_debias_ci95"])
                       if "ndcg_minus_no_debias" in r else "—")
        agree = r.get("bias_vs_truth")
        row += [f"{agree['spearman']:.3f}" if agree else "—", f"{agree['rmse']:.3f}" if agree else "—",
                _curve(r["bias"]) if "bias" in r else "—"]
        lines.append("| " + " | ".join(row) + " |")
    if result.get("planted_bias"):
        lines.append(f"| planted (log examination) | | | {'| |' if has_ndcg else ''} | | "
                     f"{_curve(result['planted_bias'])} |")
    if "empirical_position_effect" in result:
        eff = result["empirical_position_effect"]
        lines += ["", "Random log, log(CTR_p / CTR_1) with 95% bootstrap CI: " + "; ".join(
            f"position {p}: {e['log_ctr_ratio']:+.2f} [{e['ci95'][0]:+.2f}, {e['ci95'][1]:+.2f}] "
            f"({e['clicks']} clicks / {e['rows']})" for p, e in eff.items())]
    return "\n".join(lines)


def plot_bias(result: dict, path: Path, title: str, reference: dict[str, list[float]] | None,
              reference_label: str, reference_ci: dict[str, list] | None = None) -> Path:
    """Learned bias by position, one line per device, the reference dashed; one panel per variant with a bias."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(n, r) for n, r in result["variants"].items() if "bias" in r]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), sharey=True, squeeze=False)
    pos = result["positions"]
    for ax, (name, r) in zip(axes[0], panels):
        for k, (dev, curve) in enumerate(r["bias"].items()):
            color = f"C{k}"
            ax.plot(pos, curve, "o-", color=color, label=f"{dev} learned")
            if reference and dev in reference:
                ax.plot(pos, reference[dev], "--", color=color, label=f"{dev} {reference_label}")
                if reference_ci and dev in reference_ci:
                    lo, hi = zip(*reference_ci[dev])
                    ax.fill_between(pos, lo, hi, color=color, alpha=0.15)
        ax.set_title(name)
        ax.set_xlabel("position")
        ax.set_xticks(pos)
        ax.axhline(0, color="grey", lw=0.5)
    axes[0][0].set_ylabel(f"click-logit bias relative to position {pos[0]}")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def debias_report(out: str | Path, work: str | Path, rows: int, seed: int, simulated_config: str | Path,
                  obd_config: str | Path, obd_root: str | Path, log: Callable[[str], None] = print) -> dict:
    """Both data sets: the table (markdown + JSON) and the bias plots in ``out``; logs and runs under ``work``."""
    out, work = Path(out), Path(work)
    out.mkdir(parents=True, exist_ok=True)
    sim = run_simulated(load_config(simulated_config), work / "simulated", rows, seed, log=log)
    plot_bias(sim, out / "simulated_bias.png", "Simulator: learned position bias (planted dashed)",
              sim["planted_bias"], "planted")
    obd = run_obd(load_config(obd_config), obd_root, work / "obd", seed, log=log)
    eff = obd["empirical_position_effect"]
    ref = {ALL_DEVICES: [eff[str(p)]["log_ctr_ratio"] for p in obd["positions"]]}
    ref_ci = {ALL_DEVICES: [eff[str(p)]["ci95"] if p != obd["positions"][0] else [0.0, 0.0]
                            for p in obd["positions"]]}
    plot_bias(obd, out / "obd_bias.png", "Open Bandit Dataset: learned position bias (random-log CTR ratio dashed)",
              ref, "random log", ref_ci)
    cmd = f"rankstage debias-report --out {out} --rows {rows} --seed {seed}"
    text = "\n\n".join([f"# Position debiasing (`{cmd}`)",
                        format_table(f"Simulator ({sim['truth']['rows']['train']} biased training impressions, "
                                     f"{sim['truth']['rows']['test']} randomized test impressions)", sim),
                        format_table(f"Open Bandit Dataset (train bts, {obd['clicks']['train']} clicks; test random, "
                                     f"{obd['clicks']['test']} clicks)", obd)])
    (out / "debias.md").write_text(text + "\n")
    report = {"command": cmd, "simulated": sim, "obd": obd}
    (out / "debias.json").write_text(json.dumps(report, indent=1, default=float))
    log(text)
    log(f"wrote {out / 'debias.md'}, debias.json, simulated_bias.png, obd_bias.png")
    return report
