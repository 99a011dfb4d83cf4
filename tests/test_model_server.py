"""`rankstage model-server` over real loopback gRPC with the official TF Serving stubs: Predict equals the in-process
servable, metadata, status, errors, version swaps under traffic, refused versions, warmup, health, SIGTERM.

C candidates.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    model_management_pb2,
    model_service_pb2_grpc,
    prediction_log_pb2,
    prediction_service_pb2_grpc,
    regression_pb2,
)

from features.logs import raw_inputs
from ranking.export import export_run
from ranking.servable import WARMUP_FILE, load_servable, read_warmup_requests
from ranking.warmup import predict_request
from serving.model_server import GRPC_OPTIONS, ModelServer

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 10.0
Code = grpc.StatusCode
State = get_model_status_pb2.ModelVersionStatus.State
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class Client:
    channel: grpc.Channel
    predictions: prediction_service_pb2_grpc.PredictionServiceStub
    models: model_service_pb2_grpc.ModelServiceStub
    health: health_pb2_grpc.HealthStub

    def status(self, name: str) -> dict[int, get_model_status_pb2.ModelVersionStatus]:
        req = get_model_status_pb2.GetModelStatusRequest()
        req.model_spec.name = name
        return {s.version: s for s in self.models.GetModelStatus(req, timeout=TIMEOUT).model_version_status}

    def serving(self) -> int:
        return self.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT).status


def connect(port: int) -> Client:
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=GRPC_OPTIONS)
    return Client(channel, prediction_service_pb2_grpc.PredictionServiceStub(channel),
                  model_service_pb2_grpc.ModelServiceStub(channel), health_pb2_grpc.HealthStub(channel))


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.05)


def rpc_error(call, *args) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, timeout=TIMEOUT)
    return info.value


def install(source: Path, base: Path, version: int, damage: Callable[[Path], None] | None = None) -> Path:
    """Copy a version directory in the way export does: write ``.tmp-N`` completely, then rename it to ``N``."""
    tmp = base / f".tmp-{version}"
    shutil.copytree(source, tmp)
    if damage is not None:
        damage(tmp)
    return tmp.rename(base / str(version))


def truncate_saved_model(version_dir: Path) -> None:
    path = version_dir / "saved_model.pb"
    path.write_bytes(path.read_bytes()[:1000])


def misname_warmup_input(version_dir: Path) -> None:
    """One warmup record whose input ``user_id`` is renamed: the model is fine, its warmup is not."""
    request = read_warmup_requests(version_dir)[0]
    request.inputs["user_idx"].CopyFrom(request.inputs["user_id"])
    del request.inputs["user_id"]
    log = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
    with tf.io.TFRecordWriter(str(version_dir / "assets.extra" / WARMUP_FILE)) as writer:
        writer.write(log.SerializeToString())


@pytest.fixture(scope="module")
def rows(validation_frame, full_run) -> dict[str, np.ndarray]:
    """200 real validation rows as raw serving inputs, (C,) each."""
    return raw_inputs(validation_frame.iloc[:200].reset_index(drop=True), full_run.config.serving_features)


@pytest.fixture(scope="module")
def served(exported, tmp_path_factory):
    """A model server on a copy of the exported base path (version 1), and a client."""
    base = tmp_path_factory.mktemp("served") / "synthetic"
    shutil.copytree(exported[0], base)
    server = ModelServer(base, poll_interval_s=0.2)
    port = server.start(0)
    assert server.wait_until_ready(60), server.statuses()
    client = connect(port)
    yield server, client, base
    client.channel.close()
    server.stop(1.0)


def test_predict_equals_the_in_process_servable(served, rows, full_run):
    server, client, base = served
    request = predict_request(rows, full_run.config.name)
    assert request.inputs["user_id"].tensor_content and request.inputs["quality"].tensor_content  # packed bytes
    response = client.predictions.Predict(request, timeout=TIMEOUT)

    assert response.model_spec.name == full_run.config.name == server.name
    assert response.model_spec.version.value == 1
    assert response.model_spec.signature_name == "serving_default"
    want = load_servable(base / "1").predict(rows)
    assert set(response.outputs) == set(want) == {t.name for t in full_run.config.tasks}
    for task, expected in want.items():
        assert response.outputs[task].tensor_content, f"{task} not packed"
        got = tf.make_ndarray(response.outputs[task])
        assert got.shape == (200,)
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)


def test_output_filter_version_and_label(served, rows, full_run):
    _, client, _ = served
    request = predict_request(rows, full_run.config.name)
    request.output_filter.append("click")
    request.model_spec.version.value = 1
    response = client.predictions.Predict(request, timeout=TIMEOUT)
    assert list(response.outputs) == ["click"] and response.model_spec.version.value == 1

    request.model_spec.version_label = "stable"  # the newest AVAILABLE version
    assert client.predictions.Predict(request, timeout=TIMEOUT).model_spec.version.value == 1

    request.model_spec.version.value = 9
    err = rpc_error(client.predictions.Predict, request)
    assert err.code() == Code.NOT_FOUND and "version 9" in err.details()
    request.model_spec.version_label = "canary"
    err = rpc_error(client.predictions.Predict, request)
    assert err.code() == Code.INVALID_ARGUMENT and "'canary'" in err.details()


def test_metadata_lists_the_signatures_with_their_inputs(served, full_run):
    server, client, base = served
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = full_run.config.name
    response = client.predictions.GetModelMetadata(request, timeout=TIMEOUT)
    assert response.model_spec.name == full_run.config.name and response.model_spec.version.value == 1

    defs = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(defs)
    assert set(load_servable(base / "1").signatures) <= set(defs.signature_def)  # every runnable signature
    default = defs.signature_def["serving_default"]
    assert default.method_name == "tensorflow/serving/predict"
    assert set(default.inputs) == {f.name for f in full_run.config.serving_features}
    assert set(default.outputs) == {t.name for t in full_run.config.tasks}
    assert default.inputs["quality"].dtype == tf.float32.as_datatype_enum

    del request.metadata_field[:]
    err = rpc_error(client.predictions.GetModelMetadata, request)
    assert err.code() == Code.INVALID_ARGUMENT and "metadata_field" in err.details()


def test_model_status(served, full_run):
    _, client, _ = served
    (status,) = client.status(full_run.config.name).values()
    assert status.version == 1 and status.state == State.AVAILABLE and status.status.error_code == 0

    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "no_such_model"
    err = rpc_error(client.models.GetModelStatus, request)
    assert err.code() == Code.NOT_FOUND and "'no_such_model'" in err.details()
    request.model_spec.name = full_run.config.name
    request.model_spec.version.value = 5
    assert rpc_error(client.models.GetModelStatus, request).code() == Code.NOT_FOUND


def _wrong_name(r):
    r.model_spec.name = "no_such_model"


def _unknown_signature(r):
    r.model_spec.signature_name = "no_such_signature"


def _missing_input(r):
    del r.inputs["quality"]


def _extra_input(r):
    r.inputs["surprise"].CopyFrom(r.inputs["quality"])


def _wrong_dtype(r):
    r.inputs["quality"].CopyFrom(tf.make_tensor_proto(np.zeros(200, np.float64)))


def _bad_output_filter(r):
    r.output_filter.append("no_such_output")


def _different_lengths(r):
    r.inputs["quality"].CopyFrom(tf.make_tensor_proto(np.zeros(150, np.float32)))


@pytest.mark.parametrize("damage, code, named", [
    (_wrong_name, Code.NOT_FOUND, ["'no_such_model'"]),
    (_unknown_signature, Code.INVALID_ARGUMENT, ["'no_such_signature'", "serving_default"]),
    (_missing_input, Code.INVALID_ARGUMENT, ["'quality'"]),
    (_extra_input, Code.INVALID_ARGUMENT, ["'surprise'"]),
    (_wrong_dtype, Code.INVALID_ARGUMENT, ["'quality'", "DT_DOUBLE", "DT_FLOAT"]),
    (_bad_output_filter, Code.INVALID_ARGUMENT, ["'no_such_output'"]),
    (_different_lengths, Code.INVALID_ARGUMENT, ["serving_default"]),
], ids=lambda v: v.__name__.strip("_") if callable(v) else None)
def test_bad_predict_requests(served, rows, full_run, damage, code, named):
    server, client, _ = served
    request = predict_request(rows, full_run.config.name)
    damage(request)
    err = rpc_error(client.predictions.Predict, request)
    assert err.code() == code, err.details()
    for text in named:
        assert text in err.details()
    assert client.predictions.Predict(predict_request(rows, full_run.config.name), timeout=TIMEOUT).outputs


def test_other_methods_are_unimplemented(served):
    _, client, _ = served
    for call, request in [(client.predictions.Classify, classification_pb2.ClassificationRequest()),
                          (client.predictions.Regress, regression_pb2.RegressionRequest()),
                          (client.predictions.MultiInference, inference_pb2.MultiInferenceRequest()),
                          (client.models.HandleReloadConfigRequest, model_management_pb2.ReloadConfigRequest())]:
        err = rpc_error(call, request)
        assert err.code() == Code.UNIMPLEMENTED and "not implemented" in err.details()


def test_reflection_describes_the_tf_serving_services(served):
    _, client, _ = served
    reflected = ProtoReflectionDescriptorDatabase(client.channel)
    assert {"tensorflow.serving.PredictionService", "tensorflow.serving.ModelService",
            "grpc.health.v1.Health"} <= set(reflected.get_services())
    pool = descriptor_pool.DescriptorPool(reflected)
    predict = pool.FindServiceByName("tensorflow.serving.PredictionService").methods_by_name["Predict"]
    assert predict.input_type.full_name == "tensorflow.serving.PredictRequest"
    assert client.serving() == SERVING


def test_new_versions_swap_in_under_traffic_and_bad_ones_are_refused(exported, full_run, rows, tmp_path,
                                                                     synthetic_warmup):
    """Empty base path -> NOT_SERVING; version 1 appears -> SERVING; version 2 exported while a client hammers
    Predict -> served with zero failed calls; corrupt version 3 and version 4 with a broken warmup record ->
    refused, 2 keeps serving, not retried until its files change; version 3 repaired -> served, 1 unloaded;
    3 deleted -> 2 serves; 2 deleted too -> still served (never left with nothing)."""
    name = full_run.config.name
    base = tmp_path / "synthetic"
    base.mkdir()
    server = ModelServer(base, model_name=name, poll_interval_s=0.2)
    port = server.start(0)
    client = connect(port)
    request = predict_request(rows, name)
    try:
        assert client.serving() == NOT_SERVING
        assert rpc_error(client.predictions.Predict, request).code() == Code.UNAVAILABLE
        install(exported[1], base, 1)
        assert server.wait_until_ready(60), server.statuses()
        assert client.serving() == SERVING

        stop, seen, failures = threading.Event(), Counter(), []

        def hammer() -> None:
            own = connect(port)  # a client of its own, as a gateway would be
            while not stop.is_set():
                try:
                    seen[own.predictions.Predict(request, timeout=TIMEOUT).model_spec.version.value] += 1
                except grpc.RpcError as err:
                    failures.append(f"{err.code()}: {err.details()}")
            own.channel.close()

        thread = threading.Thread(target=hammer)
        thread.start()
        try:
            wait_for(lambda: seen[1] > 0, 30, "calls on version 1")
            assert export_run(full_run.run_dir, base, verbose=False, warmup=synthetic_warmup) == base / "2"
            wait_for(lambda: seen[2] >= 20, 60, "calls answered by version 2")
        finally:
            stop.set()
            thread.join()
        assert not failures, failures[:3]
        assert seen[1] > 0 and seen[2] >= 20
        status = client.status(name)
        assert status[1].state == status[2].state == State.AVAILABLE  # the previous version stays loaded
        pinned = predict_request(rows, name)
        pinned.model_spec.version.value = 1
        assert client.predictions.Predict(pinned, timeout=TIMEOUT).model_spec.version.value == 1

        def newest() -> int:
            return client.predictions.Predict(request, timeout=TIMEOUT).model_spec.version.value

        install(base / "2", base, 3, truncate_saved_model)
        wait_for(lambda: 3 in client.status(name) and client.status(name)[3].state == State.END, 30, "3 refused")
        refused = client.status(name)[3]
        assert refused.status.error_code != 0 and "SavedModel" in refused.status.error_message
        assert newest() == 2

        install(base / "2", base, 4, misname_warmup_input)
        wait_for(lambda: 4 in client.status(name) and client.status(name)[4].state == State.END, 30, "4 refused")
        refused = client.status(name)[4]
        assert refused.status.error_code != 0 and "warmup" in refused.status.error_message
        assert newest() == 2
        stats = server.stats()
        assert stats["versions_refused"] == 2

        attempts = stats["load_attempts"]
        time.sleep(1.0)  # five polls: refused versions whose files did not change are not tried again
        assert server.stats()["load_attempts"] == attempts

        shutil.copyfile(base / "2" / "saved_model.pb", base / "3" / "saved_model.pb")  # repair 3: retried
        wait_for(lambda: newest() == 3, 30, "repaired version 3 served")
        wait_for(lambda: client.status(name)[1].state == State.END, 10, "1 unloaded (UNLOADING -> END)")
        status = client.status(name)
        assert status[3].state == status[2].state == State.AVAILABLE
        assert status[1].state == State.END and status[1].status.error_code == 0  # unloaded: 2 versions kept
        assert status[4].state == State.END and status[4].status.error_code != 0
        assert client.serving() == SERVING

        shutil.rmtree(base / "3")  # a deleted version is unloaded; the last one never is
        wait_for(lambda: client.status(name)[3].state == State.END, 30, "3 unloaded (UNLOADING -> END)")
        assert newest() == 2
        shutil.rmtree(base / "2")
        time.sleep(0.6)
        assert newest() == 2 and client.status(name)[2].state == State.AVAILABLE
    finally:
        client.channel.close()
        server.stop(1.0)
    assert not server._loader.is_alive()  # stop() ends the loader thread too


def test_run_serves_until_sigterm_then_drains(exported, full_run, rows, tmp_path):
    """``python -m serving.model_server`` (what ``rankstage model-server`` runs): serves, exits 0 on SIGTERM."""
    log = tmp_path / "server.log"
    with log.open("w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "serving.model_server", "--model-base-path", str(exported[0]), "--port", "0"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=stderr, text=True,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(REPO)})
    try:
        line = proc.stdout.readline()
        match = re.search(r"on 127\.0\.0\.1:(\d+)$", line.strip())
        assert match, f"no address line: {line!r}; log: {log.read_text()[-2000:]}"
        client = connect(int(match.group(1)))
        wait_for(lambda: client.serving() == SERVING, 60, "SERVING")
        response = client.predictions.Predict(predict_request(rows, full_run.config.name), timeout=TIMEOUT)
        assert response.model_spec.version.value == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert "SIGTERM, draining" in proc.stdout.read()
        assert "version 1 AVAILABLE" in log.read_text()
        client.channel.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
