"""Model backends behind one interface: the SavedModel in this process, or TF Serving's PredictionService.

C candidates. A backend finds the newest version (``newest``), prepares it for traffic (``load``: load + warm
in-process; for TF Serving, check it AVAILABLE and answer a warmup Predict), and scores one request
(``predict``: request inputs (1,) + candidate inputs (C,) -> {task: (C,)} raw model outputs). The service holds
the loaded ``ModelVersion`` in its snapshot, so a call always uses the version its metadata describes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Protocol

import grpc
import numpy as np

from features.spec import ConfigError, RankstageConfig, parse_config
from ranking.servable import (
    RANK_CANDIDATES_PACKED,
    Servable,
    list_versions,
    load_metadata,
    load_servable,
    paced_load,
    pack_inputs,
    read_warmup_requests,
    run_warmup,
)

USER_SIDE_SIGNATURE = "rank_candidates"
GRPC_OPTIONS = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20),
                ("grpc.initial_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 1000)]


class BackendError(RuntimeError):
    """The backend could not answer: ``code`` is the gRPC status the service returns (UNAVAILABLE, ...)."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class ModelVersion:
    """One servable version as the service sees it: metadata, spec, the signature it calls."""

    name: str
    version: int
    metadata: dict = field(repr=False)
    config: RankstageConfig = field(repr=False)
    signature: str
    request_features: tuple[str, ...]  # user + context features: (1,) inputs of rank_candidates
    candidate_features: tuple[str, ...]  # item features: (C,)
    servable: Servable | None = field(default=None, repr=False)  # in-process only
    packed: dict[str, list[str]] | None = field(default=None, repr=False)  # rank_candidates_packed's column groups

    @property
    def tasks(self) -> list[str]:
        return [o["task"] for o in self.metadata["outputs"]]


def model_version(metadata: dict, version: int, wanted_signature: str, available: set[str],
                  servable: Servable | None = None, prefer_packed: bool = False) -> ModelVersion:
    """The ``ModelVersion`` of exported ``metadata``: ``wanted_signature`` if the version has it, else
    serving_default (older exports have no user-side signature). ``prefer_packed``: rank_candidates is called
    as rank_candidates_packed where the version has it (the same function; export checked them equal)."""
    config = parse_config(metadata["feature_spec"], f"model version {version} metadata")
    sig = wanted_signature if wanted_signature in available else "serving_default"
    if sig not in available:
        raise ConfigError(f"model version {version}: no signature {sig!r} (has {sorted(available)})")
    layout = metadata.get("signatures", {}).get(RANK_CANDIDATES_PACKED, {}).get("packed_inputs")
    packed = None
    if prefer_packed and sig == USER_SIDE_SIGNATURE and RANK_CANDIDATES_PACKED in available and layout:
        sig, packed = RANK_CANDIDATES_PACKED, layout
    req = tuple(f.name for f in config.serving_features if f.group in ("user", "context"))
    cand = tuple(f.name for f in config.serving_features if f.group not in ("user", "context"))
    return ModelVersion(metadata["model_name"], version, metadata, config, sig, req, cand, servable, packed)


def signature_inputs(mv: ModelVersion, request_inputs: dict[str, np.ndarray],
                     candidate_inputs: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    """Inputs of the version's signature: as given for rank_candidates, packed by side and dtype for
    rank_candidates_packed; user side repeated C times for serving_default."""
    if mv.packed is not None:
        return pack_inputs(mv.packed, {**request_inputs, **candidate_inputs})
    if mv.signature == USER_SIDE_SIGNATURE:
        return {**request_inputs, **candidate_inputs}
    return {**{k: np.repeat(v, n) for k, v in request_inputs.items()}, **candidate_inputs}


class Prediction(NamedTuple):
    """A backend's answer: {task: (C,)} raw model outputs and the model version that computed them."""

    outputs: dict[str, np.ndarray]
    version: int


class ModelBackend(Protocol):
    kind: str

    def newest(self) -> int | None: ...

    def load(self, version: int) -> ModelVersion: ...

    def predict(self, mv: ModelVersion, request_inputs: dict[str, np.ndarray],
                candidate_inputs: dict[str, np.ndarray], n: int, timeout_s: float) -> Prediction:
        """Score with ``mv`` (or, routed by a version label, whatever version the backend picks: the answer says
        which)."""
        ...

    def close(self) -> None: ...


class InProcessBackend:
    """The SavedModel loaded in the service's process (``ranking.servable``), warmed before it takes traffic."""

    kind = "in_process"

    def __init__(self, base_path: str | Path, signature: str = USER_SIDE_SIGNATURE, load_duty: float = 1.0):
        self.base_path, self.signature, self.load_duty = Path(base_path), signature, load_duty
        self._loaded_once = False

    def newest(self) -> int | None:
        versions = list_versions(self.base_path)
        return versions[-1] if versions else None

    def load(self, version: int) -> ModelVersion:
        """Load and warm ``version``. Beside a version already serving, the load is paced (``paced_load``: at
        most ``load_duty`` of the time) and warmup pauses between records, leaving the serving threads the GIL
        and the cores; the first load runs at full speed."""
        with paced_load(self.load_duty if self._loaded_once else 1.0):
            sv = load_servable(self.base_path / str(version))
            run_warmup(sv, pause_s=0.02 if self._loaded_once else 0.0, flat_calls=True)
        self._loaded_once = True
        return model_version(sv.metadata, sv.version, self.signature, set(sv.signatures), sv, prefer_packed=True)

    def predict(self, mv, request_inputs, candidate_inputs, n, timeout_s) -> Prediction:
        return Prediction(mv.servable.predict(signature_inputs(mv, request_inputs, candidate_inputs, n), mv.signature),
                          mv.version)

    def close(self) -> None:
        pass


def tensor_proto(values: np.ndarray):
    """(N,) numpy -> TensorProto from packed bytes (tensor_content) for numbers; string_val for strings."""
    from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2

    arr = np.asarray(values)
    shape = tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=s) for s in arr.shape])
    if arr.dtype.kind in "OUS":
        return tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, tensor_shape=shape,
                                      string_val=[v if isinstance(v, bytes) else str(v).encode() for v in arr.ravel()])
    dtype = {np.dtype(np.int64): types_pb2.DT_INT64, np.dtype(np.float32): types_pb2.DT_FLOAT,
             np.dtype(np.float64): types_pb2.DT_DOUBLE, np.dtype(np.int32): types_pb2.DT_INT32}[arr.dtype]
    return tensor_pb2.TensorProto(dtype=dtype, tensor_shape=shape, tensor_content=arr.tobytes())


def tensor_array(proto) -> np.ndarray:
    """TensorProto -> numpy; packed ``tensor_content`` or the repeated ``*_val`` TF Serving may answer with."""
    from tensorflow.core.framework import types_pb2

    shape = [d.size for d in proto.tensor_shape.dim]
    dtype = {types_pb2.DT_FLOAT: np.float32, types_pb2.DT_DOUBLE: np.float64, types_pb2.DT_INT64: np.int64,
             types_pb2.DT_INT32: np.int32}.get(proto.dtype)
    if dtype is None:
        raise BackendError(grpc.StatusCode.INTERNAL, f"model output of dtype {proto.dtype} is not numeric")
    if proto.tensor_content:
        return np.frombuffer(proto.tensor_content, dtype=dtype).reshape(shape)
    field_name = {np.float32: "float_val", np.float64: "double_val", np.int64: "int64_val", np.int32: "int_val"}[dtype]
    return np.asarray(getattr(proto, field_name), dtype=dtype).reshape(shape)


class TFServingBackend:
    """TF Serving (or ``rankstage model-server``) over gRPC with the official stubs; a deadline on every call.

    Metadata (feature spec, down-sampling rates) is read from the same model base path TF Serving serves, for the
    exact version the model server reports AVAILABLE; calls pin that version unless ``version_label`` is set. With a
    label TF Serving picks the version, and ``predict`` returns the one it reports (``PredictResponse.model_spec``)
    so the service corrects and calibrates with that version's metadata; warmup calls always pin the version."""

    kind = "tf_serving"

    def __init__(self, address: str, base_path: str | Path, model_name: str | None = None,
                 signature: str = USER_SIDE_SIGNATURE, timeout_s: float = 0.2, version_label: str | None = None,
                 channel: grpc.Channel | None = None):
        from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

        self.address, self.base_path, self.signature = address, Path(base_path), signature
        self.timeout_s, self.version_label = timeout_s, version_label
        self.model_name = model_name
        self.channel = channel or grpc.insecure_channel(address, options=GRPC_OPTIONS)
        self.predictions = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self.models = model_service_pb2_grpc.ModelServiceStub(self.channel)

    def _name(self) -> str:
        if self.model_name is None:
            versions = list_versions(self.base_path)
            if not versions:
                raise ConfigError(f"model.base_path: no versions under {self.base_path} to read the model name from")
            self.model_name = load_metadata(self.base_path / str(versions[-1]))["model_name"]
        return self.model_name

    def newest(self) -> int | None:
        """The newest version the model server reports AVAILABLE (None if it has none or is unreachable)."""
        from tensorflow_serving.apis import get_model_status_pb2

        req = get_model_status_pb2.GetModelStatusRequest()
        req.model_spec.name = self._name()
        try:
            resp = self.models.GetModelStatus(req, timeout=max(self.timeout_s, 1.0))
        except grpc.RpcError:
            return None
        available = [s.version for s in resp.model_version_status if s.state == s.AVAILABLE]
        return max(available) if available else None

    def load(self, version: int) -> ModelVersion:
        version_dir = self.base_path / str(version)
        meta = load_metadata(version_dir)
        available = set(meta.get("signatures", {}) or {"serving_default": {}})
        mv = model_version(meta, version, self.signature, available)
        warm = [r for r in read_warmup_requests(version_dir) if (r.model_spec.signature_name or "serving_default")
                == mv.signature][:1]
        for req in warm:  # one end-to-end call through the model server before this version takes traffic
            import tensorflow as tf

            self._call(mv, {k: tf.make_ndarray(v) for k, v in req.inputs.items()}, max(self.timeout_s, 5.0),
                       pin=True)
        return mv

    def _call(self, mv: ModelVersion, inputs: dict[str, np.ndarray], timeout_s: float, pin: bool = False
              ) -> Prediction:
        """One Predict; ``pin``: ask for ``mv.version`` even when a version label routes the traffic."""
        from tensorflow_serving.apis import predict_pb2

        req = predict_pb2.PredictRequest()
        req.model_spec.name = self._name()
        req.model_spec.signature_name = mv.signature
        if self.version_label and not pin:
            req.model_spec.version_label = self.version_label
        else:
            req.model_spec.version.value = mv.version
        for name, values in inputs.items():
            req.inputs[name].CopyFrom(tensor_proto(values))
        try:
            resp = self.predictions.Predict(req, timeout=timeout_s)
        except grpc.RpcError as err:
            code = err.code()
            if code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                code = grpc.StatusCode.UNAVAILABLE if code == grpc.StatusCode.NOT_FOUND else grpc.StatusCode.INTERNAL
            raise BackendError(code, f"TF Serving at {self.address}: {err.code().name}: {err.details()}") from None
        if not resp.model_spec.HasField("version"):
            raise BackendError(grpc.StatusCode.INTERNAL, f"TF Serving at {self.address} answered without "
                                                         "model_spec.version: which version scored is unknown")
        return Prediction({k: tensor_array(v) for k, v in resp.outputs.items()}, int(resp.model_spec.version.value))

    def predict(self, mv, request_inputs, candidate_inputs, n, timeout_s) -> Prediction:
        t0 = time.perf_counter()
        out = self._call(mv, signature_inputs(mv, request_inputs, candidate_inputs, n), min(self.timeout_s, timeout_s))
        missing = [t for t in mv.tasks if t not in out.outputs]
        if missing:
            raise BackendError(grpc.StatusCode.INTERNAL, f"TF Serving answered without outputs {missing} "
                                                         f"({(time.perf_counter() - t0) * 1e3:.1f} ms)")
        return out

    def close(self) -> None:
        self.channel.close()
