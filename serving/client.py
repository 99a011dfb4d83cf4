"""Client of the ranking service for gateways, and the JSON request format of `rankstage rank`.

    client = RankingClient("localhost:50051")
    resp = client.rank(user={"user_id": 123}, item_ids=[4, 8, 15], context={"tab": 1}, top_k=2)

JSON request (what `rankstage rank --request req.json` reads; ``serving.requests`` builds real logged ones):
    {"request_id": "r1", "user": {"user_id": 123}, "context": {"tab": 1, "hourmin": 1400},
     "candidates": {"item_ids": [4, 8, 15], "features": {"video_duration": [12000.0, 8000.0, null]}},
     "top_k": 5, "fusion_profile": "", "return_predictions": true}
JSON ints become int64 columns, numbers with a fraction (or null = missing) float columns, strings string columns;
a column of lists is list-valued (values + row lengths).
"""

from __future__ import annotations

import uuid
from pathlib import Path

import grpc
import numpy as np

from features.spec import ConfigError
from rankstage.v1 import ranking_pb2 as pb
from rankstage.v1 import ranking_pb2_grpc as pb_grpc
from serving.codec import STAGES, column, response_arrays

CHANNEL_OPTIONS = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]


def json_column(values: list, where: str) -> pb.FeatureColumn:
    """A JSON list -> FeatureColumn: ints -> int64, other numbers / null -> float (null = NaN), strings -> string;
    a list of lists -> list-valued (values concatenated + row_lengths)."""
    if values and all(isinstance(v, list) for v in values):
        col = json_column([x for v in values for x in v], where)
        col.row_lengths.extend(len(v) for v in values)
        return col
    if all(isinstance(v, str) for v in values):
        return column(np.array(values, dtype=object))
    if all(isinstance(v, bool) or isinstance(v, int) for v in values):
        return column(np.array(values, dtype=np.int64))
    if all(v is None or isinstance(v, int | float) for v in values):
        return column(np.array([np.nan if v is None else v for v in values], dtype=np.float32))
    raise ConfigError(f"{where}: mixed or unsupported JSON values {values[:5]!r} (use one of int, number, string)")


def build_request(user: dict, item_ids, context: dict | None = None, candidate_features: dict | None = None,
                  top_k: int = 0, fusion_profile: str = "", return_predictions: bool = False,
                  request_id: str | None = None) -> pb.RankRequest:
    """numpy arrays or JSON-like lists -> RankRequest (user / context values are scalars)."""
    req = pb.RankRequest(request_id=request_id or uuid.uuid4().hex, top_k=top_k, fusion_profile=fusion_profile,
                         return_predictions=return_predictions)

    def col(values, where):
        return column(values) if isinstance(values, np.ndarray) else json_column(list(values), where)

    for field, side in (("user_features", user), ("context_features", context or {})):
        for name, value in side.items():
            getattr(req, field)[name].CopyFrom(col(value if isinstance(value, np.ndarray) else [value],
                                                   f"{field}.{name}"))
    req.candidates.item_ids.CopyFrom(col(item_ids, "candidates.item_ids"))
    for name, values in (candidate_features or {}).items():
        req.candidates.features[name].CopyFrom(col(values, f"candidates.features.{name}"))
    return req


def request_from_json(data: dict, source: str = "request") -> pb.RankRequest:
    if not isinstance(data, dict) or "candidates" not in data or "item_ids" not in data.get("candidates", {}):
        raise ConfigError(f"{source}: expected an object with candidates.item_ids (see serving/client.py)")
    unknown = set(data) - {"request_id", "user", "context", "candidates", "top_k", "fusion_profile",
                           "return_predictions"}
    if unknown:
        raise ConfigError(f"{source}: unknown fields {sorted(unknown)}")
    c = data["candidates"]
    return build_request(data.get("user", {}), c["item_ids"], data.get("context"), c.get("features"),
                         int(data.get("top_k", 0)), data.get("fusion_profile", ""),
                         bool(data.get("return_predictions", False)), data.get("request_id"))


def load_request(path: str | Path) -> pb.RankRequest:
    from features.spec import read_document

    return request_from_json(read_document(path, "request file", "json"), str(path))


class RankingClient:
    """A channel to the ranking service; every call has a deadline (``timeout_s``)."""

    def __init__(self, address: str, timeout_s: float = 1.0, root_certificates: bytes | None = None,
                 server_name: str | None = None):
        options = list(CHANNEL_OPTIONS)
        if root_certificates is not None:
            if server_name:
                options.append(("grpc.ssl_target_name_override", server_name))
            self.channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates), options)
        else:
            self.channel = grpc.insecure_channel(address, options)
        self.stub = pb_grpc.RankingServiceStub(self.channel)
        self.timeout_s = timeout_s

    def send(self, request: pb.RankRequest, timeout_s: float | None = None) -> pb.RankResponse:
        return self.stub.Rank(request, timeout=timeout_s or self.timeout_s)

    def rank(self, user: dict, item_ids, context: dict | None = None, candidate_features: dict | None = None,
             top_k: int = 0, fusion_profile: str = "", return_predictions: bool = False,
             timeout_s: float | None = None) -> pb.RankResponse:
        return self.send(build_request(user, item_ids, context, candidate_features, top_k, fusion_profile,
                                       return_predictions), timeout_s)

    def recommend(self, user: dict, context: dict | None = None, num_candidates: int = 0, top_k: int = 0,
                  fusion_profile: str = "", return_predictions: bool = False, request_id: str = "",
                  timeout_s: float | None = None) -> pb.RecommendResponse:
        """Retrieve → rank: the index's top ``num_candidates`` for the user, ranked, top ``top_k`` back."""
        req = pb.RecommendRequest(request_id=request_id, num_candidates=num_candidates, top_k=top_k,
                                  fusion_profile=fusion_profile, return_predictions=return_predictions)
        for k, v in user.items():
            req.user_features[k].CopyFrom(json_column([v], f"user[{k}]"))
        for k, v in (context or {}).items():
            req.context_features[k].CopyFrom(json_column([v], f"context[{k}]"))
        return self.stub.Recommend(req, timeout=timeout_s or self.timeout_s)

    def health(self, service: str = "", timeout_s: float = 1.0) -> str:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self.channel)
        resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def format_response(resp: pb.RankResponse, max_tasks: int = 7) -> str:
    """The ranked list as a table: rank, item, fused score, per-task predictions; then versions and timings."""
    arr = response_arrays(resp)
    tasks = sorted(resp.predictions)[:max_tasks]
    lines = [f"request {resp.request_id}: model {resp.model.name} v{resp.model.version} ({resp.model.backend}, "
             f"{resp.model.signature}), fusion {resp.fusion_version} profile {resp.fusion_profile}, calibration "
             f"{resp.calibration_version or 'none'}",
             "  rank  item        " + "     fused" + "".join(f"  {t[:10]:>10}" for t in tasks)]
    for r, (item, score) in enumerate(zip(arr["item_ids"], arr["scores"]), 1):
        lines.append(f"  {r:>4}  {str(item):<10}  {score:8.4g}" + "".join(f"  {arr[t][r - 1]:10.3f}" for t in tasks))
    stages = sorted(resp.stage_ms, key=lambda s: STAGES.index(s) if s in STAGES else len(STAGES))
    lines.append("  server ms: " + ", ".join(f"{k} {resp.stage_ms[k]:.2f}" for k in stages))
    return "\n".join(lines)
