"""Logged impressions grouped into lists, re-ranked by a score, and listwise metrics per list.

N rows, L lists, M = longest list (shorter lists padded with row index -1), K = cut-off.
Within a list, columns are in logged order (KuaiRand: time order); a ``None`` score is the logged order itself.

The one tie rule of every listwise metric here (NDCG, top-K sums): rows tied in score share their mean value, i.e.
the metric is its expectation over every order of the tie. A constant score therefore earns the metric of a random
order, never the logged one (which would leak the logged ranking into a model that cannot tell rows apart).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from evaluation.bootstrap import bootstrap_ci


@dataclass(frozen=True)
class Lists:
    index: np.ndarray  # (L, M) row indices in logged order, -1 = padding
    lengths: np.ndarray  # (L,)

    @property
    def mask(self) -> np.ndarray:  # (L, M)
        return self.index >= 0

    def gather(self, values: np.ndarray, fill: float = 0.0) -> np.ndarray:
        """(N,) per-row values -> (L, M) per list position, ``fill`` in padding."""
        return np.where(self.mask, np.asarray(values)[np.maximum(self.index, 0)], fill)


def group_lists(keys: list[np.ndarray], order: np.ndarray, min_len: int = 1) -> Lists:
    """Rows sharing all ``keys`` (each (N,)) form a list, ordered by ``order`` (N,); lists shorter than ``min_len``
    are dropped. Lists come out sorted by key."""
    codes = np.zeros(len(order), dtype=np.int64)
    for k in keys:  # combine keys into one dense code
        c, uniq = pd.factorize(np.asarray(k), sort=True)
        codes = codes * len(uniq) + c
    codes = pd.factorize(codes, sort=True)[0]
    rows = np.lexsort((np.arange(len(order)), np.asarray(order), codes))  # by list, then logged order, then row
    sorted_codes = codes[rows]
    counts = np.bincount(sorted_codes)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    pos = np.arange(len(rows)) - starts[sorted_codes]
    keep_list = counts >= min_len
    new_id = np.cumsum(keep_list) - 1
    keep_row = keep_list[sorted_codes]
    n_lists, width = int(keep_list.sum()), int(counts[keep_list].max()) if keep_list.any() else 0
    index = np.full((n_lists, width), -1, dtype=np.int64)
    index[new_id[sorted_codes[keep_row]], pos[keep_row]] = rows[keep_row]
    return Lists(index=index, lengths=counts[keep_list])


@dataclass(frozen=True)
class Ranking:
    """Every list of ``lists`` ordered by one score, computed once for any number of value columns."""

    lists: Lists
    perm: np.ndarray  # (L, M) list positions in ranked order
    tie: np.ndarray | None  # (L*M,) tie group of each ranked position; None: the logged order, no ties
    tie_size: np.ndarray | None  # (G,) positions per tie group

    def values(self, values: np.ndarray) -> np.ndarray:
        """(N,) per-row values -> (L, M) in ranked order, each tie group holding its mean value (the expectation
        over the tie's orders); padding holds 0."""
        ranked = np.take_along_axis(self.lists.gather(np.asarray(values, np.float64)), self.perm, axis=1)
        if self.tie is None:
            return ranked
        mean = np.bincount(self.tie, weights=ranked.ravel(), minlength=len(self.tie_size)) / self.tie_size
        return mean[self.tie].reshape(ranked.shape)


def rank(lists: Lists, score: np.ndarray | None) -> Ranking:
    """Each list by descending ``score`` (NaN last), equal scores one tie group (padding never ties with a row);
    ``score`` None: the logged order."""
    if score is None:
        return Ranking(lists, np.broadcast_to(np.arange(lists.index.shape[1]), lists.index.shape), None, None)
    s = _list_scores(lists, score)
    perm = np.argsort(-s, axis=1, kind="stable")
    s = np.take_along_axis(s, perm, axis=1)
    real = np.take_along_axis(lists.mask, perm, axis=1)
    new_tie = np.ones_like(real)
    new_tie[:, 1:] = (s[:, 1:] != s[:, :-1]) | (real[:, 1:] != real[:, :-1])
    tie = (np.cumsum(new_tie, axis=1) - 1 + np.arange(len(s))[:, None] * s.shape[1]).ravel()  # (L*M,) group id
    return Ranking(lists, perm, tie, np.maximum(np.bincount(tie), 1))


def _list_scores(lists: Lists, score: np.ndarray) -> np.ndarray:
    """(N,) scores -> (L, M) per list position; NaN and padding become -inf."""
    s = lists.gather(np.asarray(score, dtype=np.float64), fill=-np.inf)
    return np.where(np.isnan(s), -np.inf, s)


def _discounts(k: int) -> np.ndarray:
    return 1.0 / np.log2(np.arange(2, k + 2))


def ndcg_at_k(rel_ranked: np.ndarray, rel_logged: np.ndarray, k: int) -> np.ndarray:
    """(L, M) gains in ranked order and in any order -> (L,) NDCG@k; NaN for lists without a positive gain."""
    k = min(k, rel_ranked.shape[1])
    d = _discounts(k)
    dcg = rel_ranked[:, :k] @ d
    ideal = -np.sort(-rel_logged, axis=1)[:, :k] @ d
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ideal > 0, dcg / ideal, np.nan)


def top_k_sum(values_ranked: np.ndarray, k: int) -> np.ndarray:
    """(L, M) values in ranked order -> (L,) sum over the first k."""
    return values_ranked[:, :k].sum(axis=1)


def list_ndcg(ranking: Ranking, gain: np.ndarray, k: int | None = None) -> np.ndarray:
    """(L,) NDCG@k (k None: whole list) of ``ranking``'s lists with gain ``gain`` (N,); NaN for a list without a
    positive gain."""
    rel = ranking.lists.gather(np.asarray(gain, np.float64))
    return ndcg_at_k(ranking.values(gain), rel, k or rel.shape[1])


def by_width(lists: Lists) -> list[tuple[np.ndarray, Lists]]:
    """``lists`` split by length into classes up to a power of two -> (positions in ``lists``, those lists cut to
    their class's longest) per class. Lists' (L, M) matrices are as wide as the longest list: at 1M synthetic rows a
    list holds 15 rows on average and a replay bucket's longest ~110, so 7.6x the rows; a class pads at most 2x.
    Each list's metrics are unchanged: trailing padding never ranks, ties or counts."""
    width = np.left_shift(1, np.ceil(np.log2(lists.lengths)).astype(np.int64))  # (L,) next power of two
    classes = []
    for w in np.unique(width):
        at = np.flatnonzero(width == w)
        classes.append((at, Lists(lists.index[at, :int(lists.lengths[at].max())], lists.lengths[at])))
    return classes


def list_metrics(lists: Lists, score: np.ndarray | None, labels: dict[str, np.ndarray], k: int,
                 ndcg_tasks: list[str], sum_tasks: list[str]) -> dict[str, np.ndarray]:
    """Per-list metrics (L,) for one ranking: ``<task>/ndcg@k`` (binary labels) and ``<task>/top@k`` (sums),
    computed on each class of ``by_width`` (``padded_list_metrics``' values, to an ulp, with less padding)."""
    if not len(lists.lengths):
        return padded_list_metrics(lists, score, labels, k, ndcg_tasks, sum_tasks)
    out: dict[str, np.ndarray] = {}
    for at, part in by_width(lists):
        for name, v in padded_list_metrics(part, score, labels, k, ndcg_tasks, sum_tasks).items():
            out.setdefault(name, np.full(len(lists.lengths), np.nan))[at] = v
    return out


def padded_list_metrics(lists: Lists, score: np.ndarray | None, labels: dict[str, np.ndarray], k: int,
                        ndcg_tasks: list[str], sum_tasks: list[str]) -> dict[str, np.ndarray]:
    """``list_metrics`` on one (L, M) matrix of every list, padded to the longest."""
    ranking = rank(lists, score)  # once for every task
    out = {}
    for task in ndcg_tasks:
        out[f"{task}/ndcg@{k}"] = list_ndcg(ranking, labels[task], k)
    for task in sum_tasks:
        out[f"{task}/top@{k}"] = top_k_sum(ranking.values(np.nan_to_num(labels[task])), k)
    return out


def summarise(per_list: dict[str, np.ndarray], reps: int = 1000, seed: int = 0) -> dict[str, dict]:
    """Mean over lists (lists where the metric is defined) and a bootstrap 95% interval over lists."""
    out = {}
    for name, v in per_list.items():
        v = v[np.isfinite(v)]
        lo, hi = bootstrap_ci(np.mean, v, reps=reps, seed=seed) if len(v) else (np.nan, np.nan)
        out[name] = {"mean": float(np.mean(v)) if len(v) else float("nan"), "ci95": [lo, hi], "lists": int(len(v))}
    return out


def paired_difference(a: dict[str, np.ndarray], b: dict[str, np.ndarray], reps: int = 1000, seed: int = 0
                      ) -> dict[str, dict]:
    """Mean of per-list a − b over lists where both are defined, with a bootstrap 95% interval over lists."""
    return summarise({name: a[name] - b[name] for name in a if name in b}, reps=reps, seed=seed)


def key_hash(keys: list[np.ndarray]) -> np.ndarray:
    """(N,) uint64 hash of each row's list key (the tuple of ``keys``, each (N,)), the same in every process and run:
    integer keys by value, others by their text (``pd.util.hash_array``, fixed hash key)."""
    from evaluation.bootstrap import mix64

    n = len(keys[0])
    h = np.zeros(n, np.uint64)
    for k in keys:
        k = np.asarray(k)
        part = pd.util.hash_array(k.astype(np.int64) if k.dtype.kind in "iub" else k.astype(str).astype(object))
        with np.errstate(over="ignore"):
            h = mix64(h * np.uint64(0x9E3779B97F4A7C15) ^ part)
    return h
