"""One evaluator for every retrieval model and baseline: a score per (query, catalog item) in, recall@K and
NDCG@10 out, with each query's already-seen items excluded and bootstrap intervals over queries.

Q queries, I catalog items, K cut-off.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from retrieval.data import Catalog, Queries

KS = (10, 50, 100)
ScoreFn = Callable[[np.ndarray], np.ndarray]  # query indices (q,) -> scores (q, I)


def rank_metrics(top: np.ndarray, targets: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Per-query metrics from ``top`` (Q, K_max) catalog positions, best first, and each query's target positions.

    recall@K = |top K ∩ targets| / |targets|; NDCG@10 with binary gains, ideal DCG over min(|targets|, 10)."""
    q, kmax = top.shape
    hits = np.zeros((q, kmax), bool)
    n_targets = np.array([len(t) for t in targets], np.float64)
    for i, t in enumerate(targets):
        hits[i] = np.isin(top[i], t)
    out = {f"recall@{k}": hits[:, :k].sum(1) / n_targets for k in KS if k <= kmax}
    discount = 1.0 / np.log2(np.arange(2, 12))
    dcg = (hits[:, :10] * discount[: min(10, kmax)]).sum(1)
    ideal = np.array([discount[: int(min(n, 10))].sum() for n in n_targets])
    out["ndcg@10"] = dcg / ideal
    return out


def evaluate_scores(score_fn: ScoreFn, queries: Queries, catalog: Catalog, chunk: int = 1024) -> dict[str, np.ndarray]:
    """Run ``score_fn`` over all test queries in chunks, mask each query's seen items, take the top 100."""
    kmax = max(KS)
    tops = []
    for start in range(0, len(queries.users), chunk):
        idx = np.arange(start, min(start + chunk, len(queries.users)))
        scores = np.array(score_fn(idx), dtype=np.float64, copy=True)  # (q, I)
        for row, i in enumerate(idx):
            seen = catalog.positions(queries.seen[i])
            scores[row, seen[seen >= 0]] = -np.inf
        part = np.argpartition(-scores, kmax, axis=1)[:, :kmax]
        order = np.argsort(-np.take_along_axis(scores, part, 1), axis=1, kind="stable")
        tops.append(np.take_along_axis(part, order, 1))
    targets = [catalog.positions(t) for t in queries.targets]
    return rank_metrics(np.concatenate(tops), targets)


def summarize(per_query: dict[str, np.ndarray], bootstrap: int = 0, seed: int = 0) -> dict[str, dict]:
    """{metric: {"mean", and with ``bootstrap`` resamples of queries "lo", "hi" (95% percentile interval)}}."""
    rng = np.random.default_rng(seed)
    n = len(next(iter(per_query.values())))
    draws = rng.integers(0, n, size=(bootstrap, n)) if bootstrap else None
    out = {}
    for name, v in per_query.items():
        row = {"mean": float(v.mean())}
        if draws is not None:
            means = v[draws].mean(1)
            row["lo"], row["hi"] = (float(x) for x in np.percentile(means, [2.5, 97.5]))
        out[name] = row
    return out


def most_popular(item_probability: np.ndarray) -> ScoreFn:
    """Every query gets the catalog by training popularity."""
    return lambda idx: np.broadcast_to(item_probability, (len(idx), len(item_probability)))


def popular_among_authors(item_probability: np.ndarray, item_author: np.ndarray, user_authors: list[np.ndarray]
                          ) -> ScoreFn:
    """Items by authors the query's user had training positives with first (by popularity), then the rest."""
    boost = 1.0 + item_probability.max()

    def score(idx: np.ndarray) -> np.ndarray:
        s = np.repeat(item_probability[None, :], len(idx), 0)
        for row, i in enumerate(idx):
            s[row, np.isin(item_author, user_authors[i])] += boost
        return s

    return score


def embedding_scores(query_embeddings: np.ndarray, item_embeddings: np.ndarray) -> ScoreFn:
    """Dot products of (Q, E) query and (I, E) item embeddings."""
    return lambda idx: query_embeddings[idx] @ item_embeddings.T


def format_table(rows: dict[str, dict[str, dict]], with_interval: bool = False) -> str:
    """Markdown table: one row per model, one column per metric (mean, and [lo, hi] when bootstrapped)."""
    metrics = list(next(iter(rows.values())))
    lines = ["| model | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
    for name, summary in rows.items():
        cells = []
        for m in metrics:
            s = summary[m]
            cells.append(f"{s['mean']:.3f} [{s['lo']:.3f}, {s['hi']:.3f}]" if with_interval and "lo" in s
                         else f"{s['mean']:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
