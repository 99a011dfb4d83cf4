"""The ranking service over real loopback gRPC, on a small real KuaiRand model: the ranked list equals the offline
path on the same logged rows, bad input is refused with the field and value named, reloads under traffic fail no
call, bad models and configs never replace good ones, health, drain, TLS, metrics, and a dead backend.

C candidates.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml
from conftest import wait_for
from model_versions import add_version

from features.history import attach_history
from features.logs import join_side_tables, load_side_tables, raw_inputs, read_table
from features.statistics import serving_joins
from ranking.servable import load_servable
from rankstage.v1 import ranking_pb2 as pb
from serving.client import RankingClient, build_request
from serving.codec import column, response_arrays
from serving.config import parse_serving_config
from serving.service import RankingService

ROOT = Path(__file__).resolve().parent.parent
HISTORY_LISTS = ("authors_seen_today", "authors_clicked_today")  # match features of configs/kuairand.yaml
FUSION = {"version": "f1", "default_profile": "mix", "profiles": {
    "mix": {"formula": "weighted_product", "weights": {"click": 1.0, "watch_time": 0.05, "like": 10.0},
            "exponents": {"watch_time": 0.5}},
    "watch": {"formula": "weighted_sum", "weights": {"watch_time": 1.0}}}}


@pytest.fixture(scope="module")
def logged(kuairand_model):
    """Apr 30 rows of the three largest user lists, joined as the service joins them: the side tables and the newest
    statistics snapshot (as of May 1, the one training wrote), not training's as-of-Apr-30 statistics."""
    config, _ = kuairand_model
    df = join_side_tables(read_table(config.data.log), load_side_tables(config.data, serving_joins(config.data)))
    df = attach_history(df, config.data)  # the user's same-day author lists, as the gateway would send them
    day = df[df["date"] == df["date"].max()]
    users = day.groupby("user_id").size().sort_values(ascending=False).index[:3]
    return [day[day["user_id"] == u].drop_duplicates("video_id").reset_index(drop=True) for u in users]


def ids_request(rows, top_k: int = 0, profile: str = "", **kw) -> pb.RankRequest:
    """What a gateway sends: user id, context of the first impression (with the user's same-day author lists),
    candidate ids. Nothing else."""
    first = rows.iloc[0]
    lists = {name: str(first[name]) for name in HISTORY_LISTS}
    return build_request({"user_id": int(first["user_id"])}, rows["video_id"].to_numpy(np.int64),
                         {"tab": int(first["tab"]), "hourmin": int(first["hourmin"]), **lists}, top_k=top_k,
                         fusion_profile=profile, return_predictions=True, **kw)


def make_env(tmp_path, kuairand_model, backend: str = "in_process", **server):
    base = tmp_path / "models"
    shutil.copytree(kuairand_model[1], base)
    fusion = tmp_path / "fusion.yaml"
    fusion.write_text(yaml.safe_dump(FUSION))
    cfg = {"model": {"base_path": str(base), "backend": backend}, "fusion": str(fusion),
           "limits": {"max_candidates": 1000, "max_message_bytes": 200_000},
           "server": {"port": 0, "metrics_port": 0, "drain_s": 5, **server}, "reload": {"interval_s": 0.2}}
    return base, fusion, cfg


@pytest.fixture
def running(tmp_path, kuairand_model):
    """An in-process service on a copy of the model base path -> (service, client, base, fusion path)."""
    base, fusion, cfg = make_env(tmp_path, kuairand_model)
    svc = RankingService(parse_serving_config(cfg))
    port = svc.start()
    assert svc.wait_until_ready(60)
    client = RankingClient(f"127.0.0.1:{port}", timeout_s=10)
    yield svc, client, base, fusion
    client.close()
    svc.stop(1)


def logged_inputs(sv, rows, **inline: float) -> dict[str, np.ndarray]:
    """serving_default inputs of logged rows as training builds them, with the request's one context (the first
    impression's) and ``inline`` features set to one value for every row."""
    x = raw_inputs(rows, sv.config.serving_features)
    for name in ("tab", "hourmin", *HISTORY_LISTS):
        x[name][:] = x[name][0]
    for name, value in inline.items():
        x[name][:] = value
    return x


def corrected(sv, raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The down-sampling correction written out here, not the service's code: p = a q / ((1 - q) + a q) with a the
    kept fraction of negatives, for the tasks the metadata marks; other outputs unchanged."""
    out = {}
    for task, q in raw.items():
        q = np.asarray(q, dtype=np.float64)
        rule = sv.sampling.get(task, {})
        if rule.get("method") == "correct_downsampling":
            a = rule["kept_fraction"]
            q = a * q / ((1.0 - q) + a * q)
        out[task] = q
    return out


def fused(out: dict[str, np.ndarray], profile: str) -> np.ndarray:
    """The FUSION profiles by hand: mix = prod_i (1 + w_i max(x_i, 0)) ** e_i, watch = sum_i w_i x_i."""
    spec = FUSION["profiles"][profile]
    if spec["formula"] == "weighted_product":
        score = np.ones(len(next(iter(out.values()))))
        for task, w in spec["weights"].items():
            score = score * (1.0 + w * np.maximum(out[task], 0.0)) ** spec.get("exponents", {}).get(task, 1.0)
        return score
    assert spec["formula"] == "weighted_sum"
    return sum(w * out[task] for task, w in spec["weights"].items())


def offline_ranking(version_dir, rows, profile: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """An oracle independent of the service's correction and fusion code: serving_default on logged rows, then
    ``corrected`` and ``fused`` -> (fusion score per candidate (C,), corrected outputs)."""
    sv = load_servable(version_dir)
    out = corrected(sv, sv.predict(logged_inputs(sv, rows)))
    return fused(out, profile), out


def assert_ranked_as(got: dict[str, np.ndarray], score: np.ndarray, out: dict[str, np.ndarray]) -> None:
    """The response is every candidate in decreasing oracle score, with the oracle's scores and predictions."""
    order = got["candidate_indices"]
    assert sorted(order.tolist()) == list(range(len(score)))
    np.testing.assert_allclose(score[order], np.sort(score)[::-1], rtol=1e-6)  # the order (robust to exact ties)
    np.testing.assert_allclose(got["scores"], score[order], rtol=2e-4, atol=1e-7)
    for task in ("click", "watch_time", "like"):
        np.testing.assert_allclose(got[task], out[task][order], rtol=2e-4, atol=1e-6)


def test_rank_equals_the_offline_path_on_logged_rows(running, logged):
    svc, client, base, _ = running
    rules = load_servable(base / "1").sampling
    assert rules["click"] == {**rules["click"], "method": "correct_downsampling", "kept_fraction": 0.5}, rules
    for rows in logged:
        for profile in ("mix", "watch"):
            resp = client.send(ids_request(rows, profile=profile))
            score, want = offline_ranking(base / "1", rows, profile)
            got = response_arrays(resp)
            assert_ranked_as(got, score, want)
            np.testing.assert_array_equal(got["item_ids"], rows["video_id"].to_numpy()[got["candidate_indices"]])
            assert np.all(np.diff(got["scores"]) <= 0)
    assert resp.model.version == 1 and resp.model.signature == "rank_candidates_packed"  # in-process: packed
    assert resp.fusion_version == "f1" and resp.fusion_profile == "watch" and resp.calibration_version == ""
    assert set(resp.stage_ms) == {"decode", "join", "model", "calibrate", "fuse", "encode", "total"}
    top = client.send(ids_request(logged[0], top_k=3))
    assert len(top.candidate_indices) == 3 and resp.request_id != ""


def test_inline_features_override_the_side_tables(running, logged):
    """Values sent inline replace the side tables' for every candidate: the predictions are the model's on the
    logged rows with those two features set to the sent values."""
    _, client, base_path, _ = running
    rows = logged[0]
    base = response_arrays(client.send(ids_request(rows)))
    req = ids_request(rows)
    req.user_features["fans_user_num"].CopyFrom(column(np.array([1e6], dtype=np.float32)))
    req.candidates.features["video_duration"].CopyFrom(column(np.full(len(rows), 5000.0, dtype=np.float32)))
    changed = response_arrays(client.send(req))
    sv = load_servable(base_path / "1")
    want = corrected(sv, sv.predict(logged_inputs(sv, rows, fans_user_num=1e6, video_duration=5000.0)))
    order = changed["candidate_indices"]
    for task in ("click", "watch_time", "like"):
        np.testing.assert_allclose(changed[task], want[task][order], rtol=2e-4, atol=1e-6)
    assert not np.allclose(changed["click"], base["click"][np.argsort(base["candidate_indices"])][order])


def test_unknown_user_and_items_are_served_not_refused(running):
    _, client, _, _ = running
    resp = client.rank({"user_id": 987654321}, np.array([10**12, 10**12 + 1], dtype=np.int64),
                       {"tab": 1, "hourmin": 1200}, return_predictions=True)
    assert len(resp.candidate_indices) == 2 and np.all(np.isfinite(resp.scores))


def _code(client, req) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        client.send(req)
    return err.value.code(), err.value.details()


def test_bad_input_is_invalid_argument_naming_field_and_value(running, logged):
    _, client, _, _ = running
    rows = logged[0]
    n = len(rows)
    ids = rows["video_id"].to_numpy(np.int64)
    cases = {}
    cases["candidates.item_ids: empty"] = build_request({"user_id": 1}, np.array([], dtype=np.int64))
    dupes = ids.copy()
    dupes[1] = dupes[0]
    cases[f"duplicate id {int(dupes[0])}"] = ids_request(rows.assign(video_id=dupes))
    cases["exceeds limits.max_candidates=1000"] = build_request({"user_id": 1}, np.arange(1001, dtype=np.int64))
    r = ids_request(rows)
    r.candidates.features["video_duration"].CopyFrom(column(np.ones(n - 1, dtype=np.float32)))
    cases[f"candidates.features[video_duration]: {n - 1} rows, expected {n}"] = r
    r = ids_request(rows)
    r.candidates.features["video_duration"].CopyFrom(column(np.array([np.inf] + [1.0] * (n - 1), np.float32)))
    cases["candidates.features[video_duration]: value inf at row 0"] = r
    r = ids_request(rows)
    r.user_features["fans_user_num"].CopyFrom(column(np.array(["many"], dtype=object)))
    cases["user_features[fans_user_num]: expected float values"] = r
    r = ids_request(rows)
    r.candidates.features["author_id"].CopyFrom(column(np.full(n, 1.5, dtype=np.float32)))
    cases["candidates.features[author_id]: expected int values"] = r
    cases["fusion_profile: 'nope' is not a profile"] = ids_request(rows, profile="nope")
    r = ids_request(rows)
    r.user_features["video_duration"].CopyFrom(column(np.array([1.0], dtype=np.float32)))
    cases["user_features[video_duration]: 'video_duration' is a item feature"] = r
    r = ids_request(rows)
    r.context_features["tabb"].CopyFrom(column(np.array([1])))
    cases["context_features[tabb]: not a context feature"] = r
    r = ids_request(rows)
    r.candidates.features["tag"].CopyFrom(column(np.array(["x"] * n, dtype=object)))
    r.candidates.features["tag"].string_values.values.append("extra")
    cases["candidates.features[tag]: " + f"{n + 1} rows"] = r
    r = ids_request(rows)
    r.candidates.features["big"].CopyFrom(column(np.zeros(60_000, dtype=np.float32)))
    cases["exceeds limits.max_message_bytes=200000"] = r
    r = ids_request(rows)
    del r.user_features["user_id"]
    cases["user_features[user_id]: missing"] = r
    r = ids_request(rows)
    r.top_k = -1
    cases["top_k: must be >= 0, got -1"] = r
    r = ids_request(rows)
    token = column(np.array(["12", "3,4"], dtype=object))  # one row of two tokens, the second holding a ","
    token.row_lengths.append(2)
    r.context_features["authors_seen_today"].CopyFrom(token)
    cases["context_features[authors_seen_today]: value '3,4' (list token 1) contains the separator ','"] = r
    for expected, req in cases.items():
        code, details = _code(client, req)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (expected, code, details)
        assert expected in details, (expected, details)
    assert client.send(ids_request(rows)).candidate_indices  # still serving


def _hammer(client, request, stop: threading.Event, seen: dict, errors: list) -> None:
    while not stop.is_set():
        try:
            resp = client.send(request)
            seen.setdefault((resp.model.version, resp.fusion_version), 0)
            seen[(resp.model.version, resp.fusion_version)] += 1
        except grpc.RpcError as err:
            errors.append(f"{err.code().name}: {err.details()}")



def test_model_and_fusion_swapped_under_traffic_with_zero_failed_calls(running, logged):
    svc, client, base, fusion = running
    stop, seen, errors = threading.Event(), {}, []
    threads = [threading.Thread(target=_hammer, args=(client, ids_request(rows), stop, seen, errors))
               for rows in logged[:2]]
    for t in threads:
        t.start()
    try:
        time.sleep(0.3)
        t0 = time.monotonic()
        add_version(base, 2, seed=2)  # other weights: which version answered shows in the predictions
        # a paced load (reload.load_duty 0.25) beside two hammering clients on 2 cores: ~15-40 s for this model
        swapped = wait_for(lambda: svc.snapshot.model.version == 2, timeout_s=120)
        assert swapped, f"no swap in {time.monotonic() - t0:.0f} s"
        print(f"version 2 loaded, warmed and swapped in {time.monotonic() - t0:.1f} s under traffic")
        fusion.write_text(yaml.safe_dump({**FUSION, "version": "f2"}))
        assert wait_for(lambda: svc.snapshot.fusion.version == "f2")
        time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert errors == []
    assert (1, "f1") in seen and (2, "f1") in seen and (2, "f2") in seen, seen
    got = response_arrays(client.send(ids_request(logged[0])))
    score2, want2 = offline_ranking(base / "2", logged[0], "mix")
    assert_ranked_as(got, score2, want2)
    _, want1 = offline_ranking(base / "1", logged[0], "mix")
    order = got["candidate_indices"]
    assert not np.allclose(got["watch_time"], want1["watch_time"][order], rtol=1e-2)  # version 1 would fail


def test_corrupt_model_and_invalid_configs_are_refused_while_the_old_ones_serve(running, logged):
    svc, client, base, fusion = running
    refused = svc.metrics.reloads.labels("model", "refused")
    before = refused._value.get()
    bad = base / ".tmp-2"
    shutil.copytree(base / "1", bad)
    (bad / "saved_model.pb").write_bytes(b"not a saved model")
    bad.rename(base / "2")
    assert wait_for(lambda: refused._value.get() > before)
    time.sleep(0.5)
    assert refused._value.get() == before + 1  # refused once, not again on every poll
    resp = client.send(ids_request(logged[0]))
    assert resp.model.version == 1

    fusion.write_text(yaml.safe_dump({**FUSION, "version": "f-bad", "profiles": {
        "mix": {"formula": "weighted_sum", "weights": {"clik": 1.0}}}}))
    fref = svc.metrics.reloads.labels("fusion", "refused")
    assert wait_for(lambda: fref._value.get() >= 1)
    resp = client.send(ids_request(logged[0]))
    assert resp.fusion_version == "f1"

    cal = base.parent / "calibration.json"
    cal.write_text(json.dumps({"format": "rankstage.calibration/1", "version": "c-other",
                               "model": {"name": "ranker", "version": 7}, "fitted_on": {},
                               "tasks": {"click": {"method": "platt", "a": 1.0, "b": 0.5}}}))
    fusion.write_text(yaml.safe_dump({**FUSION, "version": "f3", "calibration": str(cal)}))
    cref = svc.metrics.reloads.labels("fusion", "refused")
    before = cref._value.get()
    assert wait_for(lambda: cref._value.get() > before)
    resp = client.send(ids_request(logged[0]))
    assert resp.fusion_version == "f1" and resp.calibration_version == ""

    cal.write_text(json.dumps({**json.loads(cal.read_text()), "version": "c1", "model": {"name": "ranker",
                                                                                          "version": 1}}))
    fusion.write_text(yaml.safe_dump({**FUSION, "version": "f4", "calibration": str(cal)}))
    assert wait_for(lambda: svc.snapshot.calibration_version == "c1")
    resp = client.send(ids_request(logged[0]))
    assert resp.fusion_version == "f4" and resp.calibration_version == "c1"


def test_statistics_snapshot_age_is_a_metric(running, kuairand_model):
    """/metrics reports now minus the statistics snapshot's as_of day (midnight UTC), read here from its table."""
    import datetime as dt

    import pandas as pd

    svc = running[0]
    as_of = pd.read_parquet(Path(kuairand_model[0].data.statistics.path) / "user.parquet")["as_of"].iloc[0]
    day = dt.datetime.strptime(str(as_of), "%Y%m%d").replace(tzinfo=dt.UTC)
    text = urllib.request.urlopen(f"http://127.0.0.1:{svc.metrics_port}/metrics", timeout=5).read().decode()
    line = next(x for x in text.splitlines() if x.startswith("rankstage_statistics_age_seconds "))
    assert float(line.split()[1]) == pytest.approx(time.time() - day.timestamp(), abs=60)


def test_reflection_lists_the_ranking_service(running):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    svc, client, _, _ = running
    db = ProtoReflectionDescriptorDatabase(client.channel)
    assert {"rankstage.v1.RankingService", "grpc.health.v1.Health"} <= set(db.get_services())
    method = db.FindFileContainingSymbol("rankstage.v1.RankingService")
    assert method.package == "rankstage.v1"


def test_health_metrics_and_drain(tmp_path, kuairand_model, logged):
    base, fusion, cfg = make_env(tmp_path, kuairand_model)
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg["model"]["base_path"] = str(empty)
    svc = RankingService(parse_serving_config(cfg))
    port = svc.start()
    client = RankingClient(f"127.0.0.1:{port}", timeout_s=10)
    try:
        assert client.health() == "NOT_SERVING"
        code, details = _code(client, ids_request(logged[0]))
        assert code == grpc.StatusCode.UNAVAILABLE and "no model version" in details
        shutil.copytree(base / "1", empty / ".tmp-1")
        (empty / ".tmp-1").rename(empty / "1")
        assert wait_for(lambda: client.health() == "SERVING")
        assert client.health("rankstage.v1.RankingService") == "SERVING"
        client.send(ids_request(logged[0]))
        text = urllib.request.urlopen(f"http://127.0.0.1:{svc.metrics_port}/metrics", timeout=5).read().decode()
        assert 'rankstage_rank_requests_total{code="OK"} 1.0' in text
        assert 'rankstage_rank_requests_total{code="UNAVAILABLE"} 1.0' in text
        assert 'rankstage_model_version{backend="in_process",model="ranker"} 1.0' in text
        assert 'rankstage_rank_stage_seconds_count{stage="model"} 1.0' in text

        big = ids_request(logged[0])
        results = []
        inflight = [threading.Thread(target=lambda: results.append(client.send(big).model.version))
                    for _ in range(8)]
        for t in inflight:
            t.start()
        stopper = threading.Thread(target=svc.stop, args=(5, 1.0))  # 1 s of NOT_SERVING before refusing calls
        stopper.start()
        assert wait_for(lambda: svc.serving_status == "NOT_SERVING", 5)
        assert client.health() == "NOT_SERVING"  # still answering while balancers move away
        for t in inflight:
            t.join()
        stopper.join()
        assert results == [1] * 8  # calls sent when the drain began all finished
        with pytest.raises(grpc.RpcError) as err:
            client.send(big, timeout_s=2)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        client.close()
        svc.stop(0)


def test_tls(tmp_path, kuairand_model, logged):
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rankstage.test")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("rankstage.test")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    (tmp_path / "cert.pem").write_bytes(cert_pem)
    (tmp_path / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                         serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    _, _, cfg = make_env(tmp_path, kuairand_model, tls={"cert": str(tmp_path / "cert.pem"),
                                                       "key": str(tmp_path / "key.pem")})
    svc = RankingService(parse_serving_config(cfg))
    port = svc.start()
    try:
        assert svc.wait_until_ready(60)
        with RankingClient(f"localhost:{port}", 10, cert_pem, "rankstage.test") as client:
            assert client.send(ids_request(logged[0])).model.version == 1
        with RankingClient(f"localhost:{port}", 2) as plain:  # a plaintext client cannot talk to it
            with pytest.raises(grpc.RpcError):
                plain.send(ids_request(logged[0]))
    finally:
        svc.stop(0)


def test_tf_serving_backend_matches_in_process_and_survives_a_dead_model_server(running, tmp_path, logged):
    """Through the official TF Serving stubs to `rankstage model-server`: the same ranking as in-process; the
    model server killed -> UNAVAILABLE within the caller's deadline; restarted -> served again, no restart."""
    from serving.model_server import ModelServer

    in_process, in_client, base, fusion = running
    ms = ModelServer(base, poll_interval_s=0.2)
    ms_port = ms.start(0)
    assert ms.wait_until_ready(60)
    cfg = {"model": {"base_path": str(base), "backend": "tf_serving"}, "fusion": str(fusion),
           "tf_serving": {"address": f"127.0.0.1:{ms_port}", "timeout_ms": 2000},
           "server": {"port": 0}, "reload": {"interval_s": 0.2}}
    svc = RankingService(parse_serving_config(cfg))
    port = svc.start()
    client = RankingClient(f"127.0.0.1:{port}", timeout_s=10)
    try:
        assert svc.wait_until_ready(60)
        for rows in logged:
            a = client.send(ids_request(rows))
            b = in_client.send(ids_request(rows))
            assert a.model.backend == "tf_serving" and b.model.backend == "in_process"
            assert list(a.candidate_indices) == list(b.candidate_indices)
            np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5)
            for task in b.predictions:
                np.testing.assert_allclose(a.predictions[task].values, b.predictions[task].values, rtol=1e-5)
        # a slow backend: TF Serving answers in milliseconds, the configured Predict deadline is 0.1 ms
        slow_cfg = {**cfg, "tf_serving": {**cfg["tf_serving"], "timeout_ms": 0.1}}
        slow = RankingService(parse_serving_config(slow_cfg))
        slow_client = RankingClient(f"127.0.0.1:{slow.start()}", timeout_s=10)
        try:
            assert slow.wait_until_ready(60)  # warmup calls get their own, longer deadline
            t0 = time.monotonic()
            code, details = _code(slow_client, ids_request(logged[0]))
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED and "TF Serving" in details
            assert time.monotonic() - t0 < 1.0
        finally:
            slow_client.close()
            slow.stop(0)
        ms.stop(0)
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            client.send(ids_request(logged[0]), timeout_s=3)
        assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        assert time.monotonic() - t0 < 3.5
        ms = ModelServer(base, poll_interval_s=0.2)
        ms.start(ms_port)
        assert ms.wait_until_ready(60)

        def answers() -> bool:
            try:
                return client.send(ids_request(logged[0]), timeout_s=3).model.version == 1
            except grpc.RpcError:
                return False

        assert wait_for(answers, 30)
    finally:
        client.close()
        svc.stop(0)
        ms.stop(0)


def test_rankstage_serve_answers_then_drains_on_sigterm(tmp_path, kuairand_model, logged):
    """The real command: JSON logs carrying the request id, SERVING after warmup, exit 0 after SIGTERM."""
    import os
    import signal
    import subprocess
    import sys

    _, _, cfg = make_env(tmp_path, kuairand_model)
    cfg["server"] = {"port": 0, "shutdown_delay_s": 0.2}
    path = tmp_path / "serving.yaml"
    path.write_text(yaml.safe_dump(cfg))
    ready = tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-m", "rankstage.cli", "serve", "--config", str(path),
                             "--ready-file", str(ready)], cwd=ROOT, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    try:
        assert wait_for(lambda: ready.exists() and ready.read_text() != "" or proc.poll() is not None, 120)
        assert proc.poll() is None, proc.stderr.read()
        with RankingClient(f"127.0.0.1:{ready.read_text()}", 10) as client:
            assert client.health() == "SERVING"
            client.send(ids_request(logged[0], request_id="req-42"))
            bad = ids_request(logged[0], request_id="req-43", profile="nope")
            with pytest.raises(grpc.RpcError):
                client.send(bad)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    records = [json.loads(line) for line in proc.stderr.read().splitlines() if line.startswith("{")]
    msgs = [r["msg"] for r in records]
    assert "ranking service started" in msgs and "draining" in msgs and msgs[-1] == "stopped"
    refused = [r for r in records if r["msg"] == "rank refused"]
    assert refused and refused[0]["request_id"] == "req-43" and refused[0]["code"] == "INVALID_ARGUMENT"
