"""RankRequest / RankResponse <-> numpy, columnar: one typed column per feature, no loop over candidates.

C candidates. A decoded column is a (N,) numpy array: int64, float32, or object (str). List-valued columns
(``row_lengths`` set) are joined per row with the feature's separator into the "a,b,c" strings the graph splits.
Every error is a ``RequestError`` naming the field and the value; the service maps it to INVALID_ARGUMENT.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rankstage.v1 import ranking_pb2 as pb

STAGES = ("decode", "join", "model", "calibrate", "fuse", "encode", "total")  # RankResponse.stage_ms keys, in order


class RequestError(ValueError):
    """A request the service refuses; the message names the field and the value (-> INVALID_ARGUMENT)."""


@dataclass(frozen=True)
class DecodedRequest:
    request_id: str
    user: dict[str, np.ndarray]  # feature name -> (1,)
    context: dict[str, np.ndarray]  # feature name -> (1,)
    item_ids: np.ndarray  # (C,)
    candidates: dict[str, np.ndarray]  # feature name -> (C,)
    top_k: int
    fusion_profile: str
    return_predictions: bool


def decode_column(column: pb.FeatureColumn, where: str, separator: str = ",") -> np.ndarray:
    """One FeatureColumn -> (N,) int64 / float32 / object array; list-valued rows joined with ``separator``."""
    kind = column.WhichOneof("values")
    if kind is None:
        raise RequestError(f"{where}: no values (set int64_values, float_values or string_values)")
    if kind == "int64_values":
        values = np.array(column.int64_values.values, dtype=np.int64)
    elif kind == "float_values":
        values = np.array(column.float_values.values, dtype=np.float32)
    else:
        values = np.array(column.string_values.values, dtype=object)
    if not column.row_lengths:
        return values
    lengths = np.array(column.row_lengths, dtype=np.int64)
    if (lengths < 0).any() or lengths.sum() != len(values):
        raise RequestError(f"{where}: row_lengths sum to {int(lengths.sum())} (min {int(lengths.min())}) but the "
                           f"column has {len(values)} values")
    if kind == "float_values":
        raise RequestError(f"{where}: list-valued features hold ids (int64 or string values), got float_values")
    tokens = [str(v) for v in values.tolist()] if kind == "int64_values" else list(column.string_values.values)
    ends = np.cumsum(lengths).tolist()
    starts = [0, *ends[:-1]]
    # one join per row over a Python list (slicing numpy object arrays is ~6x slower): list-valued features only
    joined = [separator.join(tokens[a:b]) for a, b in zip(starts, ends)]
    # a row of L tokens joins with L - 1 separators; more means a token holds one and would split into two values
    if separator and sum(s.count(separator) for s in joined) != int(np.maximum(lengths - 1, 0).sum()):
        raise RequestError(f"{where}: {_separator_clash(tokens, starts, ends, separator)}; send one token per value")
    return np.array(joined, dtype=object)


def _separator_clash(tokens: list[str], starts: list[int], ends: list[int], separator: str) -> str:
    """Why a list's joined rows hold more separators than tokens allow: a token holding the separator, or (a
    multi-character separator) two neighbouring tokens whose ends join into one more."""
    for i, t in enumerate(tokens):
        if separator in t:
            return f"value {t!r} (list token {i}) contains the separator {separator!r} of this list feature"
    i = next((i for a, b in zip(starts, ends) for i in range(a, b - 1)
              if (tokens[i] + separator + tokens[i + 1]).count(separator) > 1), None)
    if i is None:  # only longer runs of short tokens form it
        return f"its tokens join into more separators {separator!r} than values"
    return f"list tokens {tokens[i]!r}, {tokens[i + 1]!r} join into more than one separator {separator!r}"


def column(values: np.ndarray | list) -> pb.FeatureColumn:
    """(N,) int / float / str values -> FeatureColumn (packed; used by clients and the response)."""
    arr = np.asarray(values)
    col = pb.FeatureColumn()
    if arr.dtype.kind in "iub":
        col.int64_values.values.extend(arr.astype(np.int64, copy=False).tolist())  # tolist: 10x faster
    elif arr.dtype.kind == "f":
        col.float_values.values.extend(arr.astype(np.float32, copy=False).tolist())
    elif arr.dtype.kind in "OUS":
        col.string_values.values.extend(v.decode() if isinstance(v, bytes) else str(v) for v in arr.tolist())
    else:
        raise TypeError(f"cannot encode a column of dtype {arr.dtype}")
    return col


def decode_request(request: pb.RankRequest, separators: dict[str, str] | None = None) -> DecodedRequest:
    """Structure checks only (lengths, emptiness, duplicates, top_k); the feature spec checks come after."""
    separators = separators or {}
    if not request.HasField("candidates") or not request.candidates.HasField("item_ids"):
        raise RequestError("candidates.item_ids: missing (send the C candidate item ids)")
    item_ids = decode_column(request.candidates.item_ids, "candidates.item_ids")
    n = len(item_ids)
    if n == 0:
        raise RequestError("candidates.item_ids: empty (a request needs at least one candidate)")
    if item_ids.dtype == np.float32:
        raise RequestError("candidates.item_ids: ids are int64_values or string_values, got float_values")
    uniq, first, counts = np.unique(item_ids, return_index=True, return_counts=True)
    if len(uniq) != n:
        dupe = uniq[counts > 1][0]
        dupe = dupe.item() if isinstance(dupe, np.generic) else dupe
        raise RequestError(f"candidates.item_ids: duplicate id {dupe!r} ({int(counts[counts > 1][0])} times among "
                           f"{n} candidates)")
    cands = {}
    for name, col in request.candidates.features.items():
        where = f"candidates.features[{name}]"
        values = decode_column(col, where, separators.get(name, ","))
        if len(values) != n:
            raise RequestError(f"{where}: {len(values)} rows, expected {n} (one per candidates.item_ids)")
        cands[name] = values
    sides = {}
    for field in ("user_features", "context_features"):
        side = {}
        for name, col in getattr(request, field).items():
            where = f"{field}[{name}]"
            values = decode_column(col, where, separators.get(name, ","))
            if len(values) != 1:
                raise RequestError(f"{where}: {len(values)} rows, expected 1 (user and context features are sent "
                                   "once per request)")
            side[name] = values
        sides[field] = side
    if request.top_k < 0:
        raise RequestError(f"top_k: must be >= 0, got {request.top_k}")
    return DecodedRequest(request.request_id, sides["user_features"], sides["context_features"], item_ids, cands,
                          int(request.top_k), request.fusion_profile, bool(request.return_predictions))


def encode_response(request_id: str, item_ids: np.ndarray, order: np.ndarray, scores: np.ndarray,
                    predictions: dict[str, np.ndarray] | None) -> pb.RankResponse:
    """Top K (``order``: (K,) candidate indices, best first) -> RankResponse (model info and timings set later)."""
    resp = pb.RankResponse(request_id=request_id)
    resp.item_ids.CopyFrom(column(item_ids[order]))
    resp.candidate_indices.extend(order.tolist())
    resp.scores.extend(scores[order].astype(np.float32).tolist())
    for task, values in (predictions or {}).items():
        resp.predictions[task].values.extend(np.asarray(values)[order].astype(np.float32).tolist())
    return resp


def response_arrays(resp: pb.RankResponse) -> dict[str, np.ndarray]:
    """RankResponse -> {"item_ids", "candidate_indices", "scores", and one entry per task} as (K,) arrays."""
    out = {"item_ids": decode_column(resp.item_ids, "item_ids") if resp.HasField("item_ids") else np.array([]),
           "candidate_indices": np.array(resp.candidate_indices, dtype=np.int64),
           "scores": np.array(resp.scores, dtype=np.float32)}
    for task, values in resp.predictions.items():
        out[task] = np.array(values.values, dtype=np.float32)
    return out
