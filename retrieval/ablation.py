"""What each part of the two-tower buys: ids only → + features → + history → + logQ, beside the baselines,
all through the one evaluator on the same split. Writes ``<out>.md`` and ``<out>.json``."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from retrieval.data import build_data, item_sampling_probability
from retrieval.evaluate import evaluate_scores, format_table, most_popular, popular_among_authors, summarize
from retrieval.spec import RetrievalConfig, parse_retrieval_config

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


def run_ablation(config: RetrievalConfig, out: str | Path, variants: list[str], bootstrap: int = 0,
                 author_column: str | None = None, command: str = "") -> dict:
    from retrieval.train import evaluate_trained, fit

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    data = build_data(config)
    results: dict[str, dict] = {}
    seconds: dict[str, float] = {}
    for name, per_query in baselines(config, data, author_column).items():
        results[name] = summarize(per_query, bootstrap)
    for name in variants:
        start = time.time()
        trained = fit(variant(config, name), data)
        results[f"two-tower: {name}"] = evaluate_trained(trained, data, bootstrap)
        seconds[name] = round(time.time() - start, 1)
        print(f"{name}: {results[f'two-tower: {name}']} ({seconds[name]} s)", flush=True)
    report = {"config": config.model_dump(mode="json"), "window": data.window, "results": results,
              "train_seconds": seconds, "bootstrap": bootstrap, "command": command}
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    table = format_table(results, with_interval=bootstrap > 0)
    interval = f" Brackets: 95% bootstrap interval over test users ({bootstrap} resamples)." if bootstrap else ""
    md = [f"# Retrieval ablation: {config.name}", "",
          f"Split: {json.dumps(data.window)}. Catalog: {len(data.catalog.ids)} items; the user's training "
          f"positives are excluded from the ranking.{interval}", "",
          "Variants (each adds to the one above): ids = user id and item id embeddings; features = + all "
          "query/candidate features; history = + last N positives strictly before the query time, mean-pooled; "
          "logq = + logQ correction of in-batch negatives.", "", table, "",
          f"![recall by model]({out.with_suffix('.png').name})", "",
          f"Training seconds per variant (2 shared cores): {seconds}", "", "Reproduce:", "", "```bash", command,
          "```", ""]
    plot(report, out.with_suffix(".png"))
    out.with_suffix(".md").write_text("\n".join(md))
    print(table)
    return report


def plot(report: dict, path: str | Path) -> Path:
    """Grouped bars: recall@10/50/100 per model (baselines, then the ablation steps), with intervals if any."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    names = list(results)
    metrics = [m for m in next(iter(results.values())) if m.startswith("recall@")]
    fig, ax = plt.subplots(figsize=(9, 4))
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
    ax.set_title(report["config"]["name"])
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
