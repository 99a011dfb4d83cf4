"""What each part of the two-tower buys: ids only → + features → + history → + logQ, beside the baselines,
all through the one evaluator on the same split, under each split protocol that applies (leave-last-out and the
global time cut). Writes ``<out>.md``, ``<out>.json`` and ``<out>.png``."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from features.spec import ConfigError
from retrieval.data import build_data, item_sampling_probability
from retrieval.evaluate import evaluate_scores, format_table, most_popular, popular_among_authors, summarize
from retrieval.spec import SPLITS, RetrievalConfig, parse_retrieval_config

VARIANTS = ("ids", "features", "history", "logq")


def variant(config: RetrievalConfig, name: str) -> RetrievalConfig:
    """The config cut down to one step of the ablation (``logq`` is the config itself, logQ on)."""
    data = config.model_dump(mode="json")
    if name in ("ids", "features", "history"):
        data["model"]["logq_correction"] = False
    if name in ("ids", "features"):
        data["history"]["length"] = 0
    if name == "ids":
        data["query_features"] = [f for f in data["query_features"]
                                  if (f.get("column") or f["name"]) == config.data.user_column]
        data["candidate_features"] = [f for f in data["candidate_features"]
                                      if (f.get("column") or f["name"]) == config.data.item_column]
    if name == "logq":
        data["model"]["logq_correction"] = True
    return parse_retrieval_config(data, f"ablation variant {name!r}")


def protocols(config: RetrievalConfig, splits: list[str] | None = None
              ) -> tuple[dict[str, RetrievalConfig], dict[str, str]]:
    """The config under each split of ``splits`` (default: its own split first, then the other where it applies),
    and why another was skipped. A split asked for by name that cannot apply is a ConfigError naming the field."""
    own = config.data.split
    wanted = splits or [own] + [s for s in SPLITS if s != own]
    out: dict[str, RetrievalConfig] = {}
    skipped: dict[str, str] = {}
    for split in wanted:
        if split == own:
            out[split] = config
            continue
        why = None
        if split == "time_cut" and config.data.test_from is None:
            why = "data.test_from is not set (the cut T)"
        if split == "leave_last_out" and config.data.until is not None:
            why = f"data.until={config.data.until!r} cannot apply to leave_last_out"
        if why is not None:
            if splits:
                raise ConfigError(f"--splits {split}: {why}")
            skipped[split] = why
            continue
        data = config.model_dump(mode="json")
        data["data"]["split"] = split
        out[split] = parse_retrieval_config(data, f"protocol {split!r}")
    return out, skipped


def baselines(config: RetrievalConfig, data, author_column: str | None) -> dict[str, dict]:
    """Most popular, and (with an author column) most popular among the authors of the user's training positives."""
    probability = item_sampling_probability(data.train.items, data.catalog)
    rows = {"most popular": evaluate_scores(most_popular(probability), data.test, data.catalog)}
    if author_column is not None:
        authors = data.train_events.groupby(config.data.user_column)[author_column].unique()
        user_authors = [np.asarray(authors.get(u, []), np.int64) for u in data.test.users]
        item_author = data.catalog.table[author_column].to_numpy(np.int64)
        rows["most popular among the user's authors"] = evaluate_scores(
            popular_among_authors(probability, item_author, user_authors), data.test, data.catalog)
    return rows


LEAKS = {"leave_last_out": "Trains on every other user's events after a test user's held-out one, so the "
                            "popularity behind logQ, the most-popular baseline and the fallback sees the future",
         "time_cut": "Trains on events before T only (popularity and logQ too); test users without earlier "
                     "positives are served by their features and popularity alone"}


def run_ablation(config: RetrievalConfig, out: str | Path, variants: list[str], bootstrap: int = 0,
                 author_column: str | None = None, command: str = "", splits: list[str] | None = None) -> dict:
    """Baselines and the ablation steps under each protocol of ``protocols``; writes the report, returns it."""
    from retrieval.train import evaluate_trained, fit

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    configs, skipped = protocols(config, splits)
    sections: dict[str, dict] = {}
    for split, cfg in configs.items():
        data = build_data(cfg)
        results: dict[str, dict] = {}
        seconds: dict[str, float] = {}
        for name, per_query in baselines(cfg, data, author_column).items():
            results[name] = summarize(per_query, bootstrap)
        for name in variants:
            start = time.time()
            trained = fit(variant(cfg, name), data)
            results[f"two-tower: {name}"] = evaluate_trained(trained, data, bootstrap)
            seconds[name] = round(time.time() - start, 1)
            print(f"{split} {name}: {results[f'two-tower: {name}']} ({seconds[name]} s)", flush=True)
        sections[split] = {"window": data.window, "results": results, "train_seconds": seconds,
                           "catalog_items": int(len(data.catalog.ids))}
    report = {"config": config.model_dump(mode="json"), "protocols": sections, "skipped": skipped,
              "bootstrap": bootstrap, "command": command, "date": time.strftime("%Y-%m-%d", time.gmtime())}
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    interval = f" Brackets: 95% bootstrap interval over test users ({bootstrap} resamples)." if bootstrap else ""
    md = [f"# Retrieval ablation: {config.name}", "",
          "Variants (each adds to the one above): ids = user id and item id embeddings; features = + all "
          "query/candidate features; history = + last N positives strictly before the query time, mean-pooled; "
          f"logq = + logQ correction of in-batch negatives. Each user's training positives are excluded from the "
          f"ranking.{interval}", ""]
    for split, section in sections.items():
        table = format_table(section["results"], with_interval=bootstrap > 0)
        md += [f"## Split: {split}", "", f"{LEAKS[split]}. Window: {json.dumps(section['window'])}. "
               f"Catalog: {section['catalog_items']} items.", "", table, "",
               f"Training seconds per variant (2 shared cores): {section['train_seconds']}", ""]
        print(f"{split}:\n{table}")
    md += [f"Not reported: {split} ({why})." for split, why in skipped.items()]
    md += ["", f"![recall by model]({out.with_suffix('.png').name})", "",
           f"Reproduce ({report['date']}):", "", "```bash", command, "```", ""]
    plot(report, out.with_suffix(".png"))
    out.with_suffix(".md").write_text("\n".join(md))
    return report


def plot(report: dict, path: str | Path) -> Path:
    """Grouped bars, one panel per protocol: recall@10/50/100 per model (baselines, then the ablation steps), with
    intervals if any."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sections = report["protocols"]
    fig, axes = plt.subplots(1, len(sections), figsize=(9 * len(sections), 4), squeeze=False)
    for ax, (split, section) in zip(axes[0], sections.items()):
        results = section["results"]
        names = list(results)
        metrics = [m for m in next(iter(results.values())) if m.startswith("recall@")]
        width = 0.8 / len(metrics)
        for j, m in enumerate(metrics):
            means = np.array([results[n][m]["mean"] for n in names])
            err = None
            if "lo" in results[names[0]][m]:
                err = np.array([[means[i] - results[n][m]["lo"], results[n][m]["hi"] - means[i]]
                                for i, n in enumerate(names)]).T
            ax.bar(np.arange(len(names)) + j * width, means, width, yerr=err, label=m, capsize=2)
        ax.set_xticks(np.arange(len(names)) + width * (len(metrics) - 1) / 2)
        ax.set_xticklabels([n.replace("two-tower: ", "+").replace("most popular among the user's authors",
                                                                   "popular (authors)") for n in names], fontsize=8)
        ax.set_ylabel("recall")
        ax.set_title(f"{report['config']['name']}: {split}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
