"""The committed generated code matches the .proto: regenerate with grpcio-tools and compare byte for byte."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from serving.proto.generate import PROTOS, REPO_ROOT


def test_generated_code_is_not_stale(tmp_path):
    # protoc runs in a child process: grpc_tools' compiler extension crashes when loaded beside pyarrow/TF
    out = subprocess.run([sys.executable, "-m", "serving.proto.generate", str(tmp_path)], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=120, check=True).stdout
    built = [Path(line) for line in out.split()]
    assert {p.name for p in built} == {"ranking_pb2.py", "ranking_pb2.pyi", "ranking_pb2_grpc.py"}
    for path in built:
        committed = REPO_ROOT / path.relative_to(tmp_path)
        assert committed.exists(), f"{committed} missing: run python -m serving.proto.generate"
        assert committed.read_bytes() == path.read_bytes(), (
            f"{committed} is stale against {PROTOS}: run python -m serving.proto.generate")


def test_contract_fields_are_stable():
    """Field numbers are part of the wire contract: renumbering one silently breaks deployed gateways."""
    from rankstage.v1 import ranking_pb2

    def numbers(message):
        return {f.name: f.number for f in message.DESCRIPTOR.fields}

    assert numbers(ranking_pb2.RankRequest) == {
        "request_id": 1, "user_features": 2, "context_features": 3, "candidates": 4, "top_k": 5,
        "fusion_profile": 6, "return_predictions": 7}
    assert numbers(ranking_pb2.RankResponse) == {
        "request_id": 1, "item_ids": 2, "candidate_indices": 3, "scores": 4, "predictions": 5, "model": 6,
        "fusion_profile": 7, "fusion_version": 8, "calibration_version": 9, "stage_ms": 10}
    assert numbers(ranking_pb2.FeatureColumn) == {"int64_values": 1, "float_values": 2, "string_values": 3,
                                                  "row_lengths": 4}
