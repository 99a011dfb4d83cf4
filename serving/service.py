"""`rankstage serve`: the gRPC ranking service for the gateway.

One Rank call: decode the columnar request -> check it against the serving model's feature spec -> join the
side-table features the gateway did not send -> the model backend -> down-sampling correction and post-hoc
calibration (``calibration.outputs.calibrated_outputs``, the same function replay uses) -> the fusion profile's
score (``fusion.formulas`` through ``FusionProfile.score``) -> top K. C candidates.

The servicer is thin: everything swappable (model version, fusion config, calibration, feature tables) lives in one
``Snapshot`` that the reload thread replaces atomically. Health says SERVING only once a model is loaded and warm,
NOT_SERVING while draining. Prometheus metrics on an HTTP port, JSON logs with the request id, SIGTERM drains.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent import futures

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from calibration.outputs import calibrated_outputs
from features.spec import ConfigError
from fusion.config import FusionProfile
from rankstage.v1 import ranking_pb2 as pb
from rankstage.v1 import ranking_pb2_grpc as pb_grpc
from serving.backends import GRPC_OPTIONS, BackendError, InProcessBackend, ModelBackend, TFServingBackend
from serving.codec import STAGES, DecodedRequest, RequestError, decode_request, encode_response
from serving.config import ServingConfig
from serving.snapshot import Reloader, Snapshot, finite_outputs

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["RankingService"].full_name
log = logging.getLogger("rankstage.serving")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and any ``extra`` fields (request_id, ...)."""

    RESERVED = set(vars(logging.makeLogRecord({})))

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(record.created, 3), "level": record.levelname, "logger": record.name,
               "msg": record.getMessage()}
        out.update({k: v for k, v in vars(record).items() if k not in self.RESERVED and not k.startswith("_")})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_json_logging(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("rankstage")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


class Metrics:
    """The service's Prometheus metrics, in their own registry (several services may share a test process)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        ms = (0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 50, 75, 100, 200, 500, 1000)
        self.stage = Histogram("rankstage_rank_stage_seconds", "Server-side time per Rank stage", ["stage"],
                               buckets=[b / 1e3 for b in ms], registry=r)
        self.candidates = Histogram("rankstage_rank_candidates", "Candidates per Rank request",
                                    buckets=(10, 50, 100, 200, 300, 500, 750, 1000, 1500, 2000, 5000), registry=r)
        self.requests = Counter("rankstage_rank_requests", "Rank calls by gRPC status code", ["code"], registry=r)
        self.model_version = Gauge("rankstage_model_version", "Model version in use", ["model", "backend"],
                                   registry=r)
        self.config_version = Gauge("rankstage_config_info", "Fusion config and calibration versions in use (1)",
                                    ["fusion_version", "calibration_version"], registry=r)
        self.reloads = Counter("rankstage_reloads", "Reloads by kind and outcome (applied / refused)",
                               ["kind", "outcome"], registry=r)
        self.refusals = Counter("rankstage_reload_refusals", "Refused reloads by kind and reason (the error's type)",
                                ["kind", "reason"], registry=r)
        self.refused_versions = Gauge("rankstage_model_versions_refused", "Model versions refused and waiting for a "
                                      "retry (backoff, or a change of their files)", registry=r)
        self.statistics_age = Gauge("rankstage_statistics_age_seconds", "Age of the statistics snapshot in use: now "
                                    "minus its as_of day (midnight UTC); NaN without statistics", registry=r)
        self.recommend_requests = Counter("rankstage_recommend_requests", "Recommend calls by gRPC status code",
                                          ["code"], registry=r)
        self.recommend_sources = Counter("rankstage_recommend_candidates", "Recommend answers by candidate source "
                                         "(retrieval / popular_fallback)", ["source"], registry=r)
        self.retrieve = Histogram("rankstage_retrieve_seconds", "Retrieval time per Recommend call",
                                  buckets=[b / 1e3 for b in ms], registry=r)
        self.retrieval_version = Gauge("rankstage_retrieval_index_version", "Retrieval index version in use",
                                       ["model"], registry=r)
        for code in ("OK", "INVALID_ARGUMENT", "UNAVAILABLE", "DEADLINE_EXCEEDED", "INTERNAL"):
            self.requests.labels(code)
            self.recommend_requests.labels(code)
        for source in ("retrieval", "popular_fallback"):
            self.recommend_sources.labels(source)
        for kind in ("model", "fusion", "calibration", "feature_tables"):
            for outcome in ("applied", "refused"):
                self.reloads.labels(kind, outcome)

    def show(self, snap: Snapshot, backend: str) -> None:
        self.model_version.clear()
        self.model_version.labels(snap.model.name, backend).set(snap.model.version)
        self.config_version.clear()
        self.config_version.labels(snap.fusion.version, snap.calibration_version).set(1)


def check_features(req: DecodedRequest, snap: Snapshot) -> None:
    """Names, groups, types and finiteness of the inline features against the model's spec (-> RequestError)."""
    cfg = snap.model.config
    keys = {cfg.data.user_column: "user_features", cfg.data.item_column: "candidates"}
    for field, values, groups in (("user_features", req.user, ("user",)), ("context_features", req.context,
                                  ("context",)), ("candidates.features", req.candidates, ("item",))):
        for name, arr in values.items():
            where = f"{field}[{name}]"
            spec = snap.features.get(name)
            if spec is None:
                if keys.get(name) == field.split(".")[0]:
                    continue
                known = sorted(f for f, s in snap.features.items() if s.group in groups)
                raise RequestError(f"{where}: not a {'/'.join(groups)} feature of model {snap.model.name} version "
                                   f"{snap.model.version} (known: {', '.join(known)})")
            if spec.group not in groups and not (spec.kind in ("match", "sequence") and field == "context_features"):
                # a match or sequence feature (the user's history list) may come once per request in the context,
                # as the gateway sends its session lists
                home = {"user": "user_features", "context": "context_features"}.get(spec.group, "candidates.features")
                if spec.kind == "match":
                    home = "context_features (one list for the request) or candidates.features (one per candidate)"
                raise RequestError(f"{where}: {name!r} is a {spec.group} feature; send it in {home}")
            want = spec.raw_dtype
            got = {"i": "int", "f": "float", "O": "string"}[arr.dtype.kind]
            if spec.kind in ("multi_valued", "match", "sequence") and got == "string":
                continue
            if want != got and not (want == "float" and got == "int"):
                field_name = "int64_values" if want == "int" else f"{want}_values"
                raise RequestError(f"{where}: expected {want} values ({field_name}) for {spec.kind} feature "
                                   f"{name!r}, got {got} values")
            if got == "float":
                bad = np.isinf(arr)
                if bad.any():
                    i = int(np.flatnonzero(bad)[0])
                    raise RequestError(f"{where}: value {float(arr[i])!r} at row {i} is not finite (NaN means "
                                       f"missing and takes the feature's default {spec.default}; inf is refused)")
    item = snap.features.get(cfg.data.item_column)
    if item is not None:
        got = "int" if req.item_ids.dtype.kind == "i" else "string"
        if got != item.raw_dtype:
            raise RequestError(f"candidates.item_ids: expected {item.raw_dtype} ids for {item.name!r}, got {got}")
    if any(s.group == "user" for s in snap.features.values()) and cfg.data.user_column not in req.user:
        raise RequestError(f"user_features[{cfg.data.user_column}]: missing (the user id keys the user features)")


def as_float(values: dict[str, np.ndarray], specs) -> dict[str, np.ndarray]:
    """int64 values sent for float features -> float32 (the only conversion the service makes)."""
    return {k: v.astype(np.float32) if k in specs and specs[k].raw_dtype == "float" and v.dtype.kind == "i" else v
            for k, v in values.items()}


class RankingServicer(pb_grpc.RankingServiceServicer):
    def __init__(self, service: RankingService):
        self.service = service

    def Rank(self, request: pb.RankRequest, context: grpc.ServicerContext) -> pb.RankResponse:
        svc = self.service
        return self._answer("rank", svc.metrics.requests, lambda: svc.rank(request, context.time_remaining()),
                            request.request_id, context)

    def Recommend(self, request: pb.RecommendRequest, context: grpc.ServicerContext) -> pb.RecommendResponse:
        svc = self.service

        def recommend() -> pb.RecommendResponse:
            if svc.recommender is None:
                raise BackendError(grpc.StatusCode.FAILED_PRECONDITION,
                                   "Recommend needs a retrieval index (serving config section 'retrieval')")
            resp = svc.recommender.recommend(svc, request, context.time_remaining())
            svc.metrics.recommend_sources.labels(resp.candidate_source).inc()
            svc.metrics.retrieve.observe(resp.retrieve_ms / 1e3)
            svc.metrics.retrieval_version.clear()
            svc.metrics.retrieval_version.labels(resp.retrieval_model).set(resp.retrieval_version)
            return resp

        return self._answer("recommend", svc.metrics.recommend_requests, recommend, request.request_id, context)

    @staticmethod
    def _answer(call: str, counter: Counter, answer: Callable, request_id: str, context: grpc.ServicerContext):
        """``answer()``, or abort with the status its error maps to; count the call by status code."""
        code, message = grpc.StatusCode.OK, ""
        try:
            return answer()
        except (RequestError, ConfigError) as err:  # ConfigError: a request the feature join cannot use
            code, message = grpc.StatusCode.INVALID_ARGUMENT, str(err)
        except BackendError as err:
            code, message = err.code, str(err)
        except Exception as err:  # a bug must not leak a stack trace to the gateway; it is logged with it
            code, message = grpc.StatusCode.INTERNAL, f"{type(err).__name__}: {err}"
            log.exception(f"{call} failed", extra={"request_id": request_id})
        finally:
            counter.labels(code.name).inc()
        log.warning(f"{call} refused", extra={"request_id": request_id, "code": code.name, "error": message})
        context.abort(code, message)


class RankingService:
    """The service: a snapshot, a reload thread, a gRPC server (Rank, health, reflection) and /metrics."""

    def __init__(self, config: ServingConfig, backend: ModelBackend | None = None, recommender=None):
        self.config = config
        self.backend = backend or make_backend(config)
        if recommender is None and config.retrieval is not None:
            from serving.recommend import Recommender

            recommender = Recommender(config.retrieval.base_path, config.retrieval.num_candidates,
                                      config.reload.interval_s)
        self.recommender = recommender  # serves Recommend (retrieve -> rank); None: Recommend is refused
        self.metrics = Metrics()
        self.reloader = Reloader(config, self.backend, self._event)
        self.metrics.refused_versions.set_function(lambda: len(self.reloader.refused))
        self.metrics.statistics_age.set_function(self._statistics_age)
        self.snapshot: Snapshot | None = None
        self.health = health.HealthServicer()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.server: grpc.Server | None = None
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._metrics_server = None
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)

    # ------------------------------------------------------------------ state

    def _event(self, kind: str, outcome: str, detail: str, reason: str = "") -> None:
        self.metrics.reloads.labels(kind, outcome).inc()
        if outcome == "refused":
            self.metrics.refusals.labels(kind, reason or "unknown").inc()
        (log.info if outcome == "applied" else log.error)(f"{kind} reload {outcome}: {detail}",
                                                          extra={"reload": kind, "outcome": outcome})

    def _statistics_age(self) -> float:
        snap = self.snapshot
        when = None if snap is None else snap.tables.as_of_time
        return float("nan") if when is None else time.time() - when

    def _set_health(self, status) -> None:
        self.serving_status = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
        for name in ("", SERVICE_NAME):
            self.health.set(name, status)

    def _install(self, snap: Snapshot) -> None:
        self.snapshot = snap  # one reference assignment: calls in flight keep the snapshot they read
        self.metrics.show(snap, self.backend.kind)
        if not self._stop.is_set():
            self._set_health(health_pb2.HealthCheckResponse.SERVING)

    def _reload_loop(self) -> None:
        interval = self.config.reload.interval_s
        while not self._stop.is_set():
            try:
                if self.snapshot is None:
                    snap = self.reloader.initial()
                    if snap is not None:
                        self._install(snap)
                else:
                    snap = self.reloader.tick(self.snapshot)
                    if snap is not self.snapshot:
                        self._install(snap)
            except Exception as err:  # the loop must survive anything; the running snapshot keeps serving
                self._event("model" if self.snapshot is None else "snapshot", "refused",
                            f"{type(err).__name__}: {err}", type(err).__name__)
            self._stop.wait(interval)

    # ------------------------------------------------------------------ the call

    def rank(self, request: pb.RankRequest, time_remaining: float | None = None) -> pb.RankResponse:
        t0 = time.perf_counter()
        snap = self.snapshot
        if snap is None:
            raise BackendError(grpc.StatusCode.UNAVAILABLE, "no model version is loaded yet")
        limits = self.config.limits
        size = request.ByteSize()
        if size > limits.max_message_bytes:
            raise RequestError(f"request: {size} bytes exceeds limits.max_message_bytes={limits.max_message_bytes}")
        req = decode_request(request, snap.separators)
        n = len(req.item_ids)
        if n > limits.max_candidates:
            raise RequestError(f"candidates.item_ids: {n} candidates exceeds limits.max_candidates="
                               f"{limits.max_candidates}")
        check_features(req, snap)
        name = req.fusion_profile or snap.fusion.default_profile or next(iter(snap.fusion.profiles))
        if name not in snap.fusion.profiles:
            raise RequestError(f"fusion_profile: {name!r} is not a profile of fusion config {snap.fusion.version} "
                               f"(profiles: {', '.join(snap.fusion.profiles)})")
        profile = snap.fusion.profiles[name]
        t1 = time.perf_counter()
        cfg = snap.model.config
        request_values = as_float({**req.user, **req.context}, snap.features)
        candidate_values = as_float({**req.candidates, cfg.data.item_column: req.item_ids}, snap.features)
        request_inputs, candidate_inputs = snap.tables.assemble(cfg.serving_features, request_values,
                                                                candidate_values, n)
        t2 = time.perf_counter()
        timeout = 30.0 if time_remaining is None else time_remaining - (t2 - t0)
        if timeout <= 0:
            raise BackendError(grpc.StatusCode.DEADLINE_EXCEEDED,
                               f"deadline exceeded before the model call ({(t2 - t0) * 1e3:.1f} ms spent)")
        raw, answered = self.backend.predict(snap.model, request_inputs, candidate_inputs, n, timeout)
        if answered != snap.model.version:  # routed by a version label: correct with the version that answered
            snap, profile = self._answered_by(snap, answered, name)
        t3 = time.perf_counter()
        tasks = snap.model.tasks
        missing = [t for t in tasks if t not in raw]
        if missing:
            raise BackendError(grpc.StatusCode.INTERNAL, f"model version {answered} answered without outputs "
                                                         f"{missing}")
        outputs = calibrated_outputs({t: raw[t] for t in tasks}, snap.sampling, snap.calibration)
        finite_outputs(outputs, tasks)
        t4 = time.perf_counter()
        scores = profile.score(outputs)
        k = min(req.top_k or limits.default_top_k or n, n)
        order = np.argsort(-scores, kind="stable")[:k]
        t5 = time.perf_counter()
        resp = encode_response(req.request_id, req.item_ids, order, scores,
                               outputs if req.return_predictions else None)
        resp.model.name, resp.model.version = snap.model.name, snap.model.version
        resp.model.signature, resp.model.backend = snap.model.signature, self.backend.kind
        resp.fusion_profile, resp.fusion_version = name, snap.fusion.version
        resp.calibration_version = snap.calibration_version
        t6 = time.perf_counter()
        stages = dict(zip(STAGES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5, t6 - t0)))
        for stage, seconds in stages.items():
            resp.stage_ms[stage] = seconds * 1e3
            self.metrics.stage.labels(stage).observe(seconds)
        self.metrics.candidates.observe(n)
        return resp

    def _answered_by(self, snap: Snapshot, version: int, profile: str) -> tuple[Snapshot, FusionProfile]:
        """The snapshot of the version the backend answered from (its down-sampling rates, calibration and
        fusion), and its fusion ``profile``; UNAVAILABLE if the service does not hold that version."""
        held = snap.of_version(version)
        if held is None:
            versions = [s.model.version for s in (snap, snap.previous) if s is not None]
            raise BackendError(grpc.StatusCode.UNAVAILABLE,
                               f"model version {version} answered (tf_serving.version_label "
                               f"{getattr(self.backend, 'version_label', None)!r}), but the service holds versions "
                               f"{versions}: without that version's metadata and calibration its outputs cannot be "
                               "corrected; retry once the service has loaded it")
        if profile not in held.fusion.profiles:
            raise BackendError(grpc.StatusCode.UNAVAILABLE,
                               f"model version {version} answered, but fusion_profile {profile!r} is not a profile "
                               f"of its fusion config {held.fusion.version} "
                               f"(profiles: {', '.join(held.fusion.profiles)})")
        return held, held.fusion.profiles[profile]

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> int:
        """Start the gRPC server (NOT_SERVING until a model is warm), the reload thread and /metrics."""
        srv = self.config.server
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=srv.max_workers),
                                  options=GRPC_OPTIONS, maximum_concurrent_rpcs=srv.max_workers * 16)
        pb_grpc.add_RankingServiceServicer_to_server(RankingServicer(self), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        address = f"{srv.host}:{srv.port}"
        if srv.tls is not None:
            from pathlib import Path

            creds = grpc.ssl_server_credentials([(Path(srv.tls.key).read_bytes(), Path(srv.tls.cert).read_bytes())])
            self.port = self.server.add_secure_port(address, creds)
        else:
            self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise ConfigError(f"server.port: cannot bind {address}")
        if srv.metrics_port is not None:
            self._metrics_server, _ = start_http_server(srv.metrics_port, addr=srv.host, registry=self.metrics.registry)
            self.metrics_port = self._metrics_server.server_port
        if self.recommender is not None:
            self.recommender.start()
        self.server.start()
        self._thread = threading.Thread(target=self._reload_loop, name="rankstage-reload", daemon=True)
        self._thread.start()
        log.info("ranking service started", extra={"port": self.port, "metrics_port": self.metrics_port,
                                                   "backend": self.backend.kind, "tls": srv.tls is not None})
        return self.port

    def wait_until_ready(self, timeout_s: float = 60.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while self.snapshot is None and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.snapshot is not None

    def stop(self, grace_s: float | None = None, delay_s: float | None = None) -> None:
        """Drain: NOT_SERVING at once; keep serving for ``delay_s`` (server.shutdown_delay_s) so balancers watching
        health move away; then refuse new calls and let the calls in flight finish within ``grace_s``."""
        grace = self.config.server.drain_s if grace_s is None else grace_s
        delay = self.config.server.shutdown_delay_s if delay_s is None else delay_s
        self._stop.set()
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        log.info("draining", extra={"grace_s": grace, "delay_s": delay})
        if delay > 0:
            time.sleep(delay)
        if self.server is not None:
            self.server.stop(grace).wait()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
        if self.recommender is not None:
            self.recommender.stop()
        self.backend.close()
        log.info("stopped")


def make_backend(config: ServingConfig) -> ModelBackend:
    m = config.model
    if m.backend == "in_process":
        return InProcessBackend(m.base_path, m.signature, config.reload.load_duty)
    tfs = config.tf_serving
    return TFServingBackend(tfs.address, m.base_path, tfs.model_name, m.signature, tfs.timeout_ms / 1e3,
                            tfs.version_label)


def serve(config: ServingConfig, ready_file: str | None = None) -> None:
    """Run until SIGTERM / SIGINT, then drain and exit."""
    setup_json_logging()
    service = RankingService(config)
    service.start()
    done = threading.Event()

    def on_signal(signum, _frame):
        log.info("signal received", extra={"signal": signal.Signals(signum).name})
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if ready_file:
        threading.Thread(target=lambda: service.wait_until_ready(3600) and open(ready_file, "w").write(
            str(service.port)), daemon=True).start()
    done.wait()
    service.stop()
