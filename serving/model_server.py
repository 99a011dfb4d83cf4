"""`rankstage model-server`: TF Serving's gRPC API (PredictionService, ModelService) for our exported SavedModels.

Any TF Serving client works against it unchanged (official ``tensorflow-serving-api`` stubs):

- ``Predict``: ``model_spec.name`` is the served model; ``model_spec.version`` pins a loaded version,
  ``version_label: "stable"`` is the newest AVAILABLE one (the only label: every version that loads and warms is
  promoted, so there is no canary stage; a staged rollout needs the real server's ``version_labels``), no version
  means the newest AVAILABLE one. Inputs are checked against the signature (names, dtypes) before the graph runs;
  ``output_filter`` is honoured; outputs are packed tensors (``tensor_content``).
- ``GetModelMetadata``: ``signature_def`` (a ``SignatureDefMap`` in an ``Any``, read from ``saved_model.pb``
  exactly as TF Serving returns it, ``__saved_model_init_op`` included).
- ``GetModelStatus``: every version seen, LOADING / AVAILABLE / UNLOADING / END, with the error of a refused one.
- ``Classify`` / ``Regress`` / ``MultiInference`` / ``HandleReloadConfigRequest``: UNIMPLEMENTED.

Versions (TF Serving's ``latest { num_versions: 2 }``): a background loader thread, never a serving thread, polls
``--model-base-path`` every ``poll_interval_s``. A version is an integer directory holding ``saved_model.pb``
(``ranking.export`` renames a finished ``.tmp-N`` into ``N``, so such a directory is complete). A version newer
than the newest AVAILABLE one is loaded with ``ranking.servable.load_servable`` and replays its warmup records
(``run_warmup``) before it takes traffic; then one reference assignment swaps in a new immutable ``Snapshot``
(in-flight calls finish on the one they hold). The previous version stays loaded and can still be pinned by
number; older ones are unloaded. A version that fails to load or warm is END with its error in GetModelStatus,
logged and counted, the running versions keep serving, and it is retried only when its files change (their
mtimes or sizes). A loaded version whose directory is deleted is unloaded, unless it is the last AVAILABLE one.

Health (``grpc.health.v1``): NOT_SERVING until the first version is loaded and warm, SERVING after, NOT_SERVING
again while draining on stop. Server reflection is on. Before the first version is AVAILABLE, Predict answers
UNAVAILABLE (retryable; TF Serving does not open its port until then).
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import threading
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import grpc
import numpy as np
import tensorflow as tf
from google.protobuf import any_pb2, descriptor_pb2, descriptor_pool
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from tensorflow.core.framework import types_pb2
from tensorflow.core.protobuf import error_codes_pb2, meta_graph_pb2, saved_model_pb2
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    model_management_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
    regression_pb2,
)

from features.spec import ConfigError
from ranking.servable import (
    Servable,
    list_versions,
    load_metadata,
    load_servable,
    paced_load,
    run_warmup,
    version_stamp,
)

log = logging.getLogger("rankstage.model_server")

DEFAULT_SIGNATURE = "serving_default"
SIGNATURE_DEF_FIELD = "signature_def"
STABLE_LABEL = "stable"
MAX_MESSAGE_BYTES = 64 << 20  # 1,000 candidates x a few hundred features fit many times over
GRPC_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
State = get_model_status_pb2.ModelVersionStatus.State
PREDICTION_SERVICE = "tensorflow.serving.PredictionService"
MODEL_SERVICE = "tensorflow.serving.ModelService"
_GRPC_CODE = {code.value[0]: code for code in grpc.StatusCode}


class RpcFailure(Exception):
    """A call's answer is this status: ``code`` and a message naming the field and the value."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class LoadedVersion:
    """One loaded, warmed version: the servable and its SignatureDefs as ``saved_model.pb`` states them."""

    version: int
    servable: Servable = field(repr=False)
    signature_defs: Mapping[str, meta_graph_pb2.SignatureDef] = field(repr=False)
    metadata_any: any_pb2.Any = field(repr=False)  # SignatureDefMap packed once, as GetModelMetadata returns it

    @property
    def signatures(self) -> list[str]:
        """Signatures Predict can run (``__saved_model_init_op`` is not one)."""
        return sorted(self.servable.signatures)


@dataclass(frozen=True)
class Snapshot:
    """The AVAILABLE versions; replaced as a whole, never mutated."""

    versions: Mapping[int, LoadedVersion] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def newest(self) -> LoadedVersion | None:
        return self.versions[max(self.versions)] if self.versions else None


@dataclass(frozen=True)
class VersionStatus:
    version: int
    state: int  # ModelVersionStatus.State
    error_code: int = error_codes_pb2.OK
    error_message: str = ""
    stamp: tuple | None = None  # files of the version when it was last tried


def register_service_descriptors() -> None:
    """Put TF Serving's two service descriptors in the default pool, so reflection can describe them.

    ``tensorflow-serving-api`` 2.20 ships ``prediction_service_pb2`` / ``model_service_pb2`` generated by an old
    protoc that current protobuf refuses to import (the ``*_grpc`` stubs and message modules are fine), so the
    services are declared here from the same message types, exactly as in the .proto files."""
    pool = descriptor_pool.Default()
    services = {
        ("tensorflow_serving/apis/prediction_service.proto", "PredictionService"): [
            ("Classify", classification_pb2.ClassificationRequest, classification_pb2.ClassificationResponse),
            ("Regress", regression_pb2.RegressionRequest, regression_pb2.RegressionResponse),
            ("Predict", predict_pb2.PredictRequest, predict_pb2.PredictResponse),
            ("MultiInference", inference_pb2.MultiInferenceRequest, inference_pb2.MultiInferenceResponse),
            ("GetModelMetadata", get_model_metadata_pb2.GetModelMetadataRequest,
             get_model_metadata_pb2.GetModelMetadataResponse)],
        ("tensorflow_serving/apis/model_service.proto", "ModelService"): [
            ("GetModelStatus", get_model_status_pb2.GetModelStatusRequest,
             get_model_status_pb2.GetModelStatusResponse),
            ("HandleReloadConfigRequest", model_management_pb2.ReloadConfigRequest,
             model_management_pb2.ReloadConfigResponse)],
    }
    for (file_name, service_name), methods in services.items():
        try:
            pool.FindServiceByName(f"tensorflow.serving.{service_name}")
            continue
        except KeyError:
            pass
        proto = descriptor_pb2.FileDescriptorProto(name=file_name, package="tensorflow.serving", syntax="proto3")
        proto.dependency.extend(sorted({m.DESCRIPTOR.file.name for _, req, resp in methods for m in (req, resp)}))
        service = proto.service.add(name=service_name)
        for name, req, resp in methods:
            service.method.add(name=name, input_type=f".{req.DESCRIPTOR.full_name}",
                               output_type=f".{resp.DESCRIPTOR.full_name}")
        pool.Add(proto)


def read_signature_defs(version_dir: str | Path) -> dict[str, meta_graph_pb2.SignatureDef]:
    """Every SignatureDef of ``saved_model.pb`` (one meta graph, as our exports have)."""
    saved = saved_model_pb2.SavedModel()
    path = Path(version_dir) / "saved_model.pb"
    saved.ParseFromString(path.read_bytes())
    if len(saved.meta_graphs) != 1:
        raise ConfigError(f"{path}: expected one meta graph, found {len(saved.meta_graphs)}")
    return dict(saved.meta_graphs[0].signature_def)


def error_code_of(err: BaseException) -> int:
    """The ``tensorflow.error.Code`` a failed load or warmup reports."""
    if isinstance(err, tf.errors.OpError):
        return err.error_code
    if isinstance(err, FileNotFoundError):
        return error_codes_pb2.NOT_FOUND
    if isinstance(err, DecodeError):
        return error_codes_pb2.DATA_LOSS
    if isinstance(err, ConfigError):
        return error_codes_pb2.FAILED_PRECONDITION
    return error_codes_pb2.UNKNOWN


def load_version(version_dir: Path, load_duty: float = 1.0) -> LoadedVersion:
    """Load a version and replay its warmup records; raises if either fails (then it must not take traffic).

    ``load_duty`` < 1 paces the load beside versions that serve (``ranking.servable.paced_load``)."""
    signature_defs = read_signature_defs(version_dir)
    with paced_load(load_duty):
        servable = load_servable(version_dir)
        missing = [s for s in servable.signatures if s not in signature_defs]
        if not servable.signatures or missing:
            raise ConfigError(f"model version {version_dir}: signatures {missing or '(none)'} have no SignatureDef")
        run_warmup(servable, pause_s=0.02 if load_duty < 1 else 0.0, flat_calls=True)
    packed = any_pb2.Any()
    packed.Pack(get_model_metadata_pb2.SignatureDefMap(signature_def=signature_defs))
    return LoadedVersion(servable.version, servable, MappingProxyType(signature_defs), packed)


def dtype_name(dtype: int) -> str:
    return types_pb2.DataType.Name(dtype) if dtype in types_pb2.DataType.values() else str(dtype)


class ModelServer:
    """One model, served from ``base_path`` over TF Serving's gRPC API; see the module docstring.

    ``model_name`` defaults to the ``model_name`` in the newest version's metadata."""

    def __init__(self, base_path: str | Path, model_name: str | None = None, poll_interval_s: float = 1.0,
                 max_workers: int = 8, num_versions: int = 2, load_duty: float = 0.25):
        self.base_path = Path(base_path)
        if not 0 < load_duty <= 1:
            raise ConfigError(f"--load-duty: must be in (0, 1], got {load_duty}")
        self.load_duty = load_duty
        if poll_interval_s <= 0:
            raise ConfigError(f"--poll-interval-s: must be > 0, got {poll_interval_s}")
        if num_versions < 1:
            raise ConfigError(f"--num-versions: must be >= 1, got {num_versions}")
        if max_workers < 1:
            raise ConfigError(f"--max-workers: must be >= 1, got {max_workers}")
        if model_name is None:
            versions = list_versions(self.base_path)
            if not versions:
                raise ConfigError(f"--model-base-path {self.base_path}: no version to read the model name from; "
                                  "pass --model-name")
            model_name = load_metadata(self.base_path / str(versions[-1]))["model_name"]
        self.name = model_name
        self.poll_interval_s, self.max_workers, self.num_versions = poll_interval_s, max_workers, num_versions
        self._snapshot = Snapshot()
        self._status: dict[int, VersionStatus] = {}  # written by the loader thread only, under _lock
        self._lock = threading.Lock()
        self._counts: Counter = Counter()
        self._ready = threading.Event()
        self._stopping = threading.Event()
        self._loader: threading.Thread | None = None
        self._server: grpc.Server | None = None
        self._health = health.HealthServicer()
        for service in ("", PREDICTION_SERVICE, MODEL_SERVICE):
            self._health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)

    # ---- lifecycle

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    def start(self, port: int, host: str = "127.0.0.1") -> int:
        """Bind ``host:port`` (0 = a free port), start serving and the loader thread; returns the bound port."""
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=self.max_workers, thread_name_prefix="predict"),
                             options=GRPC_OPTIONS)
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(PredictionServicer(self), server)
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelServicer(self), server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        register_service_descriptors()
        reflection.enable_server_reflection(
            [PREDICTION_SERVICE, MODEL_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
        try:
            bound = server.add_insecure_port(f"{host}:{port}")
        except RuntimeError as err:
            raise ConfigError(f"--port {port}: cannot bind {host}:{port}: {err}") from None
        if not bound:
            raise ConfigError(f"--port {port}: cannot bind {host}:{port}")
        server.start()
        self._server = server
        self._loader = threading.Thread(target=self._poll_loop, name="model-loader", daemon=True)
        self._loader.start()
        log.info("model server for %r on %s:%d, base path %s", self.name, host, bound, self.base_path)
        return bound

    def wait_until_ready(self, timeout_s: float | None = None) -> bool:
        """True once a version is loaded and warm (health SERVING); False if ``timeout_s`` passes first."""
        return self._ready.wait(timeout_s)

    def stop(self, grace_s: float = 5.0) -> None:
        """Health NOT_SERVING, refuse new calls, let in-flight ones finish (up to ``grace_s``), stop the loader."""
        self._health.enter_graceful_shutdown()
        self._stopping.set()
        if self._server is not None:
            self._server.stop(grace_s).wait()
        if self._loader is not None:
            self._loader.join(timeout=grace_s + 30.0)  # a load in progress finishes first (the thread is a daemon)
        log.info("model server for %r stopped", self.name)

    def stats(self) -> dict[str, int]:
        """Counters: versions_loaded, versions_refused, versions_unloaded, load_attempts, rpc/<Method>/<CODE>."""
        with self._lock:
            return dict(self._counts)

    def statuses(self) -> list[VersionStatus]:
        with self._lock:
            return [self._status[v] for v in sorted(self._status)]

    def _count(self, key: str) -> None:
        with self._lock:
            self._counts[key] += 1

    def _set_status(self, status: VersionStatus) -> None:
        with self._lock:
            self._status[status.version] = status

    # ---- the loader thread

    def _poll_loop(self) -> None:
        while True:
            try:
                self.poll_once()
            except Exception:  # a bug or an unreadable base path must not kill the loader
                log.exception("model server: polling %s failed", self.base_path)
            if self._stopping.wait(self.poll_interval_s):
                return

    def poll_once(self) -> None:
        """One look at the base path: load the newest new version (falling back to older new ones), unload
        versions beyond ``num_versions`` or whose directory is gone. Runs on the loader thread."""
        on_disk = list_versions(self.base_path)
        self._unload_removed(set(on_disk))
        newest = self._snapshot.newest
        for version in reversed(on_disk):
            if self._stopping.is_set() or (newest is not None and version <= newest.version):
                return
            version_dir = self.base_path / str(version)
            stamp = version_stamp(version_dir)
            with self._lock:
                previous = self._status.get(version)
            if previous is not None and previous.state == State.END and previous.stamp == stamp:
                continue  # refused before and unchanged since: not retried every poll
            if self._try_load(version, version_dir, stamp):
                return

    def _try_load(self, version: int, version_dir: Path, stamp: tuple) -> bool:
        self._set_status(VersionStatus(version, State.LOADING, stamp=stamp))
        self._count("load_attempts")
        log.info("model %r version %d: loading %s", self.name, version, version_dir)
        try:
            loaded = load_version(version_dir, self.load_duty if self._snapshot.versions else 1.0)
        except Exception as err:  # any failure to load or warm refuses the version; the running ones keep serving
            message = f"{type(err).__name__}: {str(err)[:500]}"
            self._set_status(VersionStatus(version, State.END, error_code_of(err), message, stamp))
            self._count("versions_refused")
            log.error("model %r version %d refused (%s); still serving %s", self.name, version, message,
                      sorted(self._snapshot.versions) or "nothing")
            return False
        current = dict(self._snapshot.versions)
        current[version] = loaded
        keep = sorted(current)[-self.num_versions:]
        dropped = [v for v in current if v not in keep]
        for v in dropped:
            self._set_status(VersionStatus(v, State.UNLOADING))
        self._snapshot = Snapshot(MappingProxyType({v: current[v] for v in keep}))  # the swap
        self._set_status(VersionStatus(version, State.AVAILABLE, stamp=stamp))
        self._count("versions_loaded")
        for v in dropped:
            self._set_status(VersionStatus(v, State.END))
            self._count("versions_unloaded")
        log.info("model %r version %d AVAILABLE (warm); serving versions %s, unloaded %s", self.name, version, keep,
                 dropped)
        if not self._ready.is_set():
            for service in ("", PREDICTION_SERVICE, MODEL_SERVICE):
                self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
            self._ready.set()
        return True

    def _unload_removed(self, on_disk: set[int]) -> None:
        current = dict(self._snapshot.versions)
        gone = sorted(v for v in current if v not in on_disk)
        if not gone:
            return
        if len(gone) == len(current):
            gone = gone[:-1]  # never unload the last AVAILABLE version: serving stale beats serving nothing
            log.warning("model %r: version %s deleted from %s but kept: it is the last one", self.name,
                        max(current), self.base_path)
        for v in gone:
            self._set_status(VersionStatus(v, State.UNLOADING))
            del current[v]
        if gone:
            self._snapshot = Snapshot(MappingProxyType(current))
        for v in gone:
            self._set_status(VersionStatus(v, State.END))
            self._count("versions_unloaded")
            log.info("model %r version %d unloaded: its directory is gone", self.name, v)

    # ---- request routing (serving threads)

    def check_name(self, name: str) -> None:
        if name != self.name:
            raise RpcFailure(grpc.StatusCode.NOT_FOUND,
                             f"model_spec.name {name!r}: no such model (this server serves {self.name!r})")

    def resolve(self, model_spec, snapshot: Snapshot) -> LoadedVersion:
        """The loaded version a ``ModelSpec`` asks for (name checked, version / version_label / newest)."""
        self.check_name(model_spec.name)
        if not snapshot.versions:
            raise RpcFailure(grpc.StatusCode.UNAVAILABLE,
                             f"model {self.name!r}: no version is AVAILABLE yet (loading from {self.base_path})")
        choice = model_spec.WhichOneof("version_choice")
        if choice == "version":
            version = model_spec.version.value
            if version not in snapshot.versions:
                raise RpcFailure(grpc.StatusCode.NOT_FOUND,
                                 f"model_spec.version {version}: not loaded for model {self.name!r} "
                                 f"(AVAILABLE: {sorted(snapshot.versions)})")
            return snapshot.versions[version]
        if choice == "version_label" and model_spec.version_label != STABLE_LABEL:
            raise RpcFailure(grpc.StatusCode.INVALID_ARGUMENT,
                             f"model_spec.version_label {model_spec.version_label!r}: unrecognized servable version "
                             f"label (known: [{STABLE_LABEL!r}] = the newest AVAILABLE version)")
        return snapshot.newest


def signature_inputs(request: predict_pb2.PredictRequest, loaded: LoadedVersion, signature: str
                     ) -> dict[str, np.ndarray]:
    """Decode and check a request's inputs against the SignatureDef: names, dtypes; (C,) numpy arrays."""
    sig_def = loaded.signature_defs[signature]
    expected, given = set(sig_def.inputs), set(request.inputs)
    if missing := sorted(expected - given):
        raise RpcFailure(grpc.StatusCode.INVALID_ARGUMENT,
                         f"inputs: missing {missing} for signature {signature!r} (expects {sorted(expected)})")
    if extra := sorted(given - expected):
        raise RpcFailure(grpc.StatusCode.INVALID_ARGUMENT,
                         f"inputs: {extra} not in signature {signature!r} (expects {sorted(expected)})")
    arrays = {}
    for name, tensor in request.inputs.items():
        want = sig_def.inputs[name].dtype
        if tensor.dtype != want:
            raise RpcFailure(grpc.StatusCode.INVALID_ARGUMENT,
                             f"inputs[{name!r}]: dtype {dtype_name(tensor.dtype)}, signature {signature!r} expects "
                             f"{dtype_name(want)}")
        try:
            arrays[name] = tf.make_ndarray(tensor)
        except Exception as err:  # malformed tensor_content / shape
            raise RpcFailure(grpc.StatusCode.INVALID_ARGUMENT,
                             f"inputs[{name!r}]: cannot decode tensor: {err}") from None
    return arrays


def run_signature(loaded: LoadedVersion, signature: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``Servable.predict`` with TF's errors turned into gRPC statuses."""
    try:
        return loaded.servable.predict(inputs, signature)
    except tf.errors.OpError as err:
        raise RpcFailure(_GRPC_CODE.get(err.error_code, grpc.StatusCode.INTERNAL),
                         f"signature {signature!r}: {err.message[:500]}") from None
    except (ValueError, TypeError) as err:  # shapes the signature does not accept (e.g. rank 2 for a (C,) input)
        raise RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, f"signature {signature!r}: {str(err)[:500]}") from None


def _rpc(method: str) -> Callable:
    """Run a servicer method, turn ``RpcFailure`` into the call's status, count calls by status."""

    def wrap(fn):
        def handler(self, request, context):
            try:
                response = fn(self, request, context)
            except RpcFailure as err:
                self.server._count(f"rpc/{method}/{err.code.name}")
                context.abort(err.code, f"{method}: {err}")
            except Exception as err:
                self.server._count(f"rpc/{method}/INTERNAL")
                log.exception("%s failed", method)
                context.abort(grpc.StatusCode.INTERNAL, f"{method}: {type(err).__name__}: {str(err)[:500]}")
            self.server._count(f"rpc/{method}/OK")
            return response

        handler.__name__ = fn.__name__
        handler.__doc__ = fn.__doc__
        return handler

    return wrap


def _unimplemented(method: str, why: str) -> Callable:
    def handler(self, request, context):
        self.server._count(f"rpc/{method}/UNIMPLEMENTED")
        context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method}: not implemented by rankstage model-server ({why})")

    handler.__name__ = method
    return handler


_PREDICT_ONLY = "our SavedModels export predict signatures only (tensorflow/serving/predict); use Predict"


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, server: ModelServer):
        self.server = server

    @_rpc("Predict")
    def Predict(self, request: predict_pb2.PredictRequest, context) -> predict_pb2.PredictResponse:
        loaded = self.server.resolve(request.model_spec, self.server.snapshot)  # this call's version, to its end
        signature = request.model_spec.signature_name or DEFAULT_SIGNATURE
        if signature not in loaded.servable.signatures:
            raise RpcFailure(grpc.StatusCode.INVALID_ARGUMENT,
                             f"model_spec.signature_name {signature!r}: not a signature of model {self.server.name!r}"
                             f" version {loaded.version} (signatures: {loaded.signatures})")
        outputs = loaded.signature_defs[signature].outputs
        wanted = list(request.output_filter) or list(outputs)
        if unknown := [o for o in wanted if o not in outputs]:
            raise RpcFailure(grpc.StatusCode.INVALID_ARGUMENT,
                             f"output_filter: {unknown} not outputs of signature {signature!r} (has {sorted(outputs)})")
        if len(set(wanted)) != len(wanted):
            raise RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, f"output_filter: duplicate names in {wanted}")
        result = run_signature(loaded, signature, signature_inputs(request, loaded, signature))
        response = predict_pb2.PredictResponse()
        response.model_spec.name = self.server.name
        response.model_spec.version.value = loaded.version
        response.model_spec.signature_name = signature
        for name in wanted:
            response.outputs[name].CopyFrom(tf.make_tensor_proto(np.asarray(result[name])))
        return response

    @_rpc("GetModelMetadata")
    def GetModelMetadata(self, request: get_model_metadata_pb2.GetModelMetadataRequest, context
                         ) -> get_model_metadata_pb2.GetModelMetadataResponse:
        loaded = self.server.resolve(request.model_spec, self.server.snapshot)
        fields = list(request.metadata_field)
        if not fields:
            raise RpcFailure(grpc.StatusCode.INVALID_ARGUMENT,
                             f"metadata_field: empty; ask for [{SIGNATURE_DEF_FIELD!r}]")
        if unknown := [f for f in fields if f != SIGNATURE_DEF_FIELD]:
            raise RpcFailure(grpc.StatusCode.INVALID_ARGUMENT,
                             f"metadata_field: {unknown} not supported (only {SIGNATURE_DEF_FIELD!r})")
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = self.server.name
        response.model_spec.version.value = loaded.version
        response.metadata[SIGNATURE_DEF_FIELD].CopyFrom(loaded.metadata_any)
        return response

    Classify = _unimplemented("Classify", _PREDICT_ONLY)
    Regress = _unimplemented("Regress", _PREDICT_ONLY)
    MultiInference = _unimplemented("MultiInference", _PREDICT_ONLY)


class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, server: ModelServer):
        self.server = server

    @_rpc("GetModelStatus")
    def GetModelStatus(self, request: get_model_status_pb2.GetModelStatusRequest, context
                       ) -> get_model_status_pb2.GetModelStatusResponse:
        self.server.check_name(request.model_spec.name)
        statuses = self.server.statuses()
        choice = request.model_spec.WhichOneof("version_choice")
        if choice == "version":
            statuses = [s for s in statuses if s.version == request.model_spec.version.value]
            if not statuses:
                raise RpcFailure(grpc.StatusCode.NOT_FOUND,
                                 f"model_spec.version {request.model_spec.version.value}: model {self.server.name!r} "
                                 f"has no such version (seen: {[s.version for s in self.server.statuses()]})")
        elif choice == "version_label":
            raise RpcFailure(grpc.StatusCode.INVALID_ARGUMENT,
                             "model_spec.version_label: GetModelStatus takes a version number or none")
        if not statuses:
            raise RpcFailure(grpc.StatusCode.NOT_FOUND,
                             f"model {self.server.name!r}: no versions under {self.server.base_path} yet")
        response = get_model_status_pb2.GetModelStatusResponse()
        for s in statuses:
            entry = response.model_version_status.add(version=s.version, state=s.state)
            entry.status.error_code = s.error_code
            entry.status.error_message = s.error_message
        return response

    HandleReloadConfigRequest = _unimplemented(
        "HandleReloadConfigRequest",
        "it serves the one model under --model-base-path and picks up new versions by polling; "
        "multi-model configs need tensorflow_model_server")


# ---- the command

def main(args: argparse.Namespace) -> int:
    return run(args.model_base_path, args.port, host=args.host, model_name=args.model_name,
               poll_interval_s=args.poll_interval_s, num_versions=args.num_versions, max_workers=args.max_workers,
               grace_s=args.grace_s, load_duty=args.load_duty)


def run(base_path: str | Path, port: int, host: str = "127.0.0.1", model_name: str | None = None,
        poll_interval_s: float = 1.0, num_versions: int = 2, max_workers: int = 8, grace_s: float = 10.0,
        load_duty: float = 0.25) -> int:
    """Serve until SIGTERM or SIGINT, then drain and stop. Prints the bound address (useful with port 0)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = ModelServer(base_path, model_name, poll_interval_s=poll_interval_s, max_workers=max_workers,
                         num_versions=num_versions, load_duty=load_duty)
    # Signals reach this thread through a wakeup socket: the handlers do nothing, so no lock is taken in one.
    wake_r, wake_w = socket.socketpair()
    wake_w.setblocking(False)
    previous_fd = signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
    previous = {sig: signal.signal(sig, lambda signum, frame: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        bound = server.start(port, host)
        print(f"rankstage model-server: model {server.name!r} from {base_path} on {host}:{bound}", flush=True)
        received = signal.Signals(wake_r.recv(1)[0])
        print(f"rankstage model-server: {received.name}, draining (up to {grace_s:g} s)", flush=True)
        server.stop(grace_s)
    finally:
        signal.set_wakeup_fd(previous_fd)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        wake_r.close()
        wake_w.close()
    return 0


def _cli() -> int:
    from serving.config import model_server_arguments

    parser = argparse.ArgumentParser(prog="rankstage model-server", description=__doc__.split("\n")[0])
    model_server_arguments(parser)
    return main(parser.parse_args())


if __name__ == "__main__":
    import sys

    sys.exit(_cli())
