"""Retrieve → rank in one call: ``Recommend`` asks the retrieval index for the user's top N, then runs the Rank path
on them. The index version is hot-reloaded like the ranking model; an unknown user gets the index's popular items.

The index is the BruteForce SavedModel of ``rankstage retrieval export`` (stock TF ops only) with its
``assets.extra`` tables: ``query_users.parquet`` (user features, recent history and every seen item per known
user) and the metadata (signature inputs, popular items). A known user's candidates exclude the items they have
already seen (their positives in the index's training window, the set the offline evaluation excludes): the
``exclude_seen`` signature retrieves K + S and drops them, so N <= K candidates remain whenever the catalog holds N
unseen items. N retrieved candidates, H history length, S seen items, K the index's top K.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pyarrow.parquet as pq

from features.spec import ConfigError
from ranking.servable import latest_version, list_versions
from rankstage.v1 import ranking_pb2 as pb
from serving.backends import BackendError
from serving.codec import RequestError, column, decode_column

log = logging.getLogger("rankstage.serving.recommend")
METADATA = Path("assets.extra") / "retrieval_metadata.json"
USERS = Path("assets.extra") / "query_users.parquet"
HISTORY = "history"
MISSING = {"int64": -1, "string": "", "float32": np.nan}
NUMPY = {"int64": np.int64, "string": object, "float32": np.float32}


@dataclass(frozen=True)
class RetrievalIndex:
    """One loaded index version: its signature, what it takes, and the users it knows."""

    version_dir: Path
    version: int
    metadata: dict
    loaded: object = field(repr=False)  # must outlive ``signature``
    signature: object = field(repr=False)
    user_rows: dict[int, int] = field(repr=False)  # user id -> row of ``users``
    users: dict[str, list] = field(repr=False)  # column -> values per known user

    @property
    def name(self) -> str:
        return self.metadata["model_name"]

    @property
    def inputs(self) -> dict[str, str]:
        return self.metadata["signature"]["inputs"]

    @property
    def exclude(self) -> dict[str, str]:
        """The export's ``exclude_signature``: ``name``, ``input`` (the seen ids) and the users' ``seen_column``."""
        return self.metadata["exclude_signature"]

    @property
    def user_column(self) -> str:
        return self.metadata["feature_spec"]["data"]["user_column"]

    @property
    def popular(self) -> np.ndarray:
        return np.asarray(self.metadata["popular_items"], np.int64)

    def query(self, user_id: int, inline: dict[str, np.ndarray], context: dict[str, np.ndarray]) -> dict | None:
        """Raw ``exclude_seen`` inputs (batch 1) for a known user: the index's tables, overridden by the request's
        values; missing context features get missing values; ``exclude`` (1, S) the user's seen items. None for a
        user the index does not know."""
        row = self.user_rows.get(int(user_id))
        if row is None:
            return None
        seen = self.users[self.exclude["seen_column"]][row]
        out = {self.exclude["input"]: np.asarray(seen or [-1], np.int64)[None, :]}  # (1, S)
        for name, dtype in self.inputs.items():
            if name == HISTORY:
                hist = np.asarray(self.users[HISTORY][row] or [-1], np.int64)
                out[name] = hist[None, :]  # (1, H)
                continue
            sent = inline.get(name, context.get(name))
            if sent is not None:
                value = sent[:1]
            elif name in self.users:
                value = [self.users[name][row]]
            else:
                value = [MISSING[dtype]]
            out[name] = np.asarray([MISSING[dtype] if v is None else v for v in value], dtype=NUMPY[dtype])
        return out

    def top(self, inputs: dict[str, np.ndarray], n: int) -> np.ndarray:
        """(<= n,) the best item ids not in ``inputs["exclude"]``, best first (fewer only if the catalog runs out)."""
        import tensorflow as tf

        out = self.signature(**{k: tf.constant(v) for k, v in inputs.items()})
        ids = out["item_ids"].numpy()[0]
        return ids[ids >= 0][:n]


def load_index(path: str | Path) -> RetrievalIndex:
    """The newest version under a base path (or a version directory), warmed with one call."""
    import tensorflow as tf

    p = Path(path)
    version_dir = p if (p / "saved_model.pb").exists() else latest_version(p)
    try:
        meta = json.loads((version_dir / METADATA).read_text())
    except FileNotFoundError:
        raise ConfigError(f"retrieval index {version_dir}: no metadata ({version_dir / METADATA})") from None
    exclude = meta.get("exclude_signature")
    if exclude is None:
        raise ConfigError(f"retrieval index {version_dir}: its metadata has no exclude_signature (exported before "
                          "seen items were excluded); re-export it")
    table = pq.read_table(version_dir / USERS).to_pydict()
    if exclude["seen_column"] not in table:
        raise ConfigError(f"retrieval index {version_dir}: {USERS} has no {exclude['seen_column']!r} column; "
                          "re-export it")
    user_col = meta["feature_spec"]["data"]["user_column"]
    rows = {int(u): i for i, u in enumerate(table[user_col])}
    loaded = tf.saved_model.load(str(version_dir))
    if exclude["name"] not in loaded.signatures:
        raise ConfigError(f"retrieval index {version_dir}: no {exclude['name']!r} signature (has "
                          f"{sorted(loaded.signatures)}); re-export it")
    index = RetrievalIndex(version_dir, int(version_dir.name), meta, loaded, loaded.signatures[exclude["name"]],
                           rows, table)
    if rows:  # warm up (the first call traces and allocates)
        first = next(iter(rows))
        index.top(index.query(first, {}, {}), 1)
    return index


class Recommender:
    """Holds the current index (swapped atomically by a reload thread) and answers Recommend."""

    def __init__(self, base_path: str | Path, num_candidates: int = 100, interval_s: float = 2.0):
        self.base_path = Path(base_path)
        self.num_candidates = num_candidates
        self.interval_s = interval_s
        self.index: RetrievalIndex | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._refused: set[int] = set()

    def reload(self) -> bool:
        """Load the newest version if it is newer than the current one; True when swapped. A version that fails
        to load is logged and skipped; the current one keeps serving."""
        versions = [v for v in list_versions(self.base_path) if v not in self._refused]
        if not versions or (self.index is not None and versions[-1] <= self.index.version):
            return False
        try:
            index = load_index(self.base_path / str(versions[-1]))
        except Exception as err:  # a broken version must not replace a working one
            self._refused.add(versions[-1])
            log.error(f"retrieval index version {versions[-1]} refused: {type(err).__name__}: {err}")
            return False
        self.index = index  # one reference assignment: calls in flight keep the index they read
        log.info(f"retrieval index version {index.version} loaded")
        return True

    def start(self) -> None:
        self.reload()
        self._thread = threading.Thread(target=self._loop, name="rankstage-retrieval-reload", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.reload()
            except Exception as err:  # the loop must survive anything
                log.error(f"retrieval reload failed: {type(err).__name__}: {err}")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def candidates(self, request: pb.RecommendRequest) -> tuple[np.ndarray, str, RetrievalIndex]:
        """(N,) candidate item ids and their source ("retrieval" or "popular_fallback"). A known user's exclude
        their seen items."""
        index = self.index
        if index is None:
            raise BackendError(grpc.StatusCode.FAILED_PRECONDITION, "no retrieval index is loaded")
        user_col = index.user_column
        if user_col not in request.user_features:
            raise RequestError(f"user_features[{user_col}]: missing (the user id keys the retrieval index)")
        inline = {k: decode_column(v, f"user_features[{k}]") for k, v in request.user_features.items()}
        context = {k: decode_column(v, f"context_features[{k}]") for k, v in request.context_features.items()}
        if len(inline[user_col]) != 1:
            raise RequestError(f"user_features[{user_col}]: expected one value, got {len(inline[user_col])}")
        n = request.num_candidates or self.num_candidates
        if n < 0:
            raise RequestError(f"num_candidates: must be >= 0, got {n}")
        inputs = index.query(int(inline[user_col][0]), inline, context)
        if inputs is None:
            return index.popular[:n], "popular_fallback", index
        return index.top(inputs, n), "retrieval", index

    def recommend(self, ranking, request: pb.RecommendRequest, time_remaining: float | None = None
                  ) -> pb.RecommendResponse:
        """Retrieve N, rank them through ``ranking.rank`` (the Rank path), return its top K."""
        t0 = time.perf_counter()
        ids, source, index = self.candidates(request)
        retrieve_s = time.perf_counter() - t0
        rank_request = pb.RankRequest(request_id=request.request_id, top_k=request.top_k,
                                      fusion_profile=request.fusion_profile,
                                      return_predictions=request.return_predictions)
        for k, v in request.user_features.items():
            rank_request.user_features[k].CopyFrom(v)
        for k, v in request.context_features.items():
            rank_request.context_features[k].CopyFrom(v)
        rank_request.candidates.item_ids.CopyFrom(column(np.asarray(ids, np.int64)))
        remaining = None if time_remaining is None else time_remaining - retrieve_s
        ranked = ranking.rank(rank_request, remaining)
        return pb.RecommendResponse(ranked=ranked, candidate_source=source, retrieval_model=index.name,
                                    retrieval_version=index.version, num_candidates=len(ids),
                                    retrieve_ms=retrieve_s * 1e3)
