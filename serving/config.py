"""The ranking service's config: one YAML file, validated at load, errors naming the field and the value.

    model:   {base_path: models/ranker, backend: in_process, signature: rank_candidates}
    tf_serving: {address: localhost:8500, model_name: ranker, timeout_ms: 200}
    fusion:  configs/fusion.yaml
    limits:  {max_candidates: 2000, max_message_bytes: 4194304, default_top_k: 50}
    server:  {port: 50051, metrics_port: 9090, drain_s: 10}
    reload:  {interval_s: 2, retry_initial_s: 10, retry_max_s: 600}

Paths are relative to the working directory (the project root), like the training configs.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, model_validator

from features.spec import ConfigError, Strict, format_validation_error, read_document


class ModelSource(Strict):
    base_path: str  # <base_path>/<version>/ as exported; also where metadata is read for the TF Serving backend
    backend: Literal["in_process", "tf_serving"] = "in_process"
    # rank_candidates: user side once per request (falls back to serving_default when a version lacks it); the
    # in-process backend calls it as rank_candidates_packed where the version has that
    signature: Literal["rank_candidates", "serving_default"] = "rank_candidates"


class TFServingConfig(Strict):
    address: str = "localhost:8500"
    model_name: str | None = None  # default: the model name in the exported metadata
    version_label: str | None = None  # route by label instead of pinning the version the service checked
    timeout_ms: float = Field(200.0, gt=0)  # per Predict call, capped by the caller's remaining deadline


class Limits(Strict):
    max_candidates: int = Field(2000, ge=1)
    max_message_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    default_top_k: int = Field(0, ge=0)  # 0 = all candidates when the request says 0


class TLSConfig(Strict):
    cert: str
    key: str


class ServerConfig(Strict):
    host: str = "127.0.0.1"
    port: int = Field(50051, ge=0, le=65535)
    metrics_port: int | None = Field(None, ge=0, le=65535)  # Prometheus /metrics over HTTP; None = off
    max_workers: int = Field(8, ge=1)
    # SIGTERM: health NOT_SERVING at once while calls are still served for shutdown_delay_s (load balancers that
    # watch health move traffic away), then new calls are refused and the ones in flight get drain_s to finish
    shutdown_delay_s: float = Field(0.0, ge=0)
    drain_s: float = Field(10.0, ge=0)
    tls: TLSConfig | None = None


class RetrievalSource(Strict):
    """The retrieval index ``Recommend`` draws candidates from (``rankstage retrieval export``), hot-reloaded."""

    base_path: str
    num_candidates: int = Field(100, ge=1)  # when the request says 0


class ReloadConfig(Strict):
    interval_s: float = Field(2.0, gt=0)
    # in-process backend: a new version loads beside the serving one using at most this fraction of the time
    # (ranking.servable.paced_load); 0.25 kept the p99 during a swap near 1.4x steady at 4x the load time
    load_duty: float = Field(0.25, gt=0, le=1)
    # a model version whose snapshot could not be built is retried at once when its directory, the fusion config or
    # the calibration artifact changes, else after retry_initial_s, doubling per failure up to retry_max_s
    retry_initial_s: float = Field(10.0, gt=0)
    retry_max_s: float = Field(600.0, gt=0)

    @model_validator(mode="after")
    def _retry(self) -> ReloadConfig:
        if self.retry_max_s < self.retry_initial_s:
            raise ValueError(f"reload.retry_max_s: {self.retry_max_s} is below retry_initial_s "
                             f"{self.retry_initial_s}")
        return self


class ServingConfig(Strict):
    model: ModelSource
    tf_serving: TFServingConfig = TFServingConfig()
    fusion: str  # fusion config YAML; its `calibration` (if any) is the post-hoc calibration artifact
    calibration: str | None = None  # overrides the fusion config's calibration artifact
    limits: Limits = Limits()
    server: ServerConfig = ServerConfig()
    reload: ReloadConfig = ReloadConfig()
    retrieval: RetrievalSource | None = None  # enables Recommend (retrieve -> rank)

    @model_validator(mode="after")
    def _paths(self) -> ServingConfig:
        if self.server.tls is not None:
            for field in ("cert", "key"):
                if not Path(getattr(self.server.tls, field)).is_file():
                    raise ValueError(f"server.tls.{field}: file not found: {getattr(self.server.tls, field)}")
        return self


def parse_serving_config(data: dict, source: str = "<dict>") -> ServingConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"serving config {source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return ServingConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source, "serving config")) from None


def load_serving_config(path: str | Path) -> ServingConfig:
    return parse_serving_config(read_document(path, "serving config file"), str(path))


def model_server_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``rankstage model-server``."""
    parser.add_argument("--model-base-path", required=True, help="directory of integer version subdirectories")
    parser.add_argument("--port", type=int, default=8500, help="gRPC port (0: a free one, printed); default 8500")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)")
    parser.add_argument("--model-name", help="served model name (default: model_name of the newest version)")
    parser.add_argument("--poll-interval-s", type=float, default=1.0, help="how often to look for new versions")
    parser.add_argument("--num-versions", type=int, default=2, help="versions kept loaded (newest serves)")
    parser.add_argument("--max-workers", type=int, default=8, help="gRPC serving threads")
    parser.add_argument("--grace-s", type=float, default=10.0, help="drain time for in-flight calls on shutdown")
    parser.add_argument("--load-duty", type=float, default=0.25,
                        help="a new version loads beside the serving one using at most this fraction of the time")
