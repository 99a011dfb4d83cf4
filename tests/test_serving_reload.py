"""Snapshot reloads on the small real KuaiRand model: a version that cannot be built is refused while the old
snapshot serves and is retried with backoff (a fake clock, no sleeps); side tables are rebuilt when what they are
built from differs; a model and its calibration artifact swap as a pair; with a version label, the version that
answered decides the correction (real `rankstage model-server` over loopback gRPC).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml
from conftest import wait_for
from model_versions import add_version

from features.statistics import serving_joins
from ranking.servable import load_servable
from serving.backends import InProcessBackend
from serving.client import RankingClient, build_request
from serving.codec import response_arrays
from serving.config import parse_serving_config
from serving.service import RankingService
from serving.snapshot import Reloader, backoff_s

FUSION = {"version": "f1", "default_profile": "watch",
          "profiles": {"watch": {"formula": "weighted_sum", "weights": {"watch_time": 1.0, "click": 10.0}}}}


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def env(tmp_path: Path, kuairand_model, fusion: dict | None = None, **reload) -> tuple[Path, Path, dict]:
    """A copy of the model base path and a fusion config -> (base, fusion path, serving config dict)."""
    base = tmp_path / "models"
    shutil.copytree(kuairand_model[1], base)
    path = tmp_path / "fusion.yaml"
    path.write_text(yaml.safe_dump(fusion or FUSION))
    cfg = {"model": {"base_path": str(base)}, "fusion": str(path), "server": {"port": 0},
           "reload": {"interval_s": 0.2, "load_duty": 1.0, "retry_initial_s": 10, "retry_max_s": 40, **reload}}
    return base, path, cfg


def reloader(cfg: dict, base: Path, events: list, clock: Clock) -> Reloader:
    r = Reloader(parse_serving_config(cfg), InProcessBackend(base, load_duty=1.0),
                 lambda kind, outcome, detail, *reason: events.append((kind, outcome, detail)))
    r.clock = clock  # set after construction, so the same test runs against a Reloader without the argument
    return r


def stats_path(kuairand_model) -> Path:
    return Path(kuairand_model[0].data.statistics.path)


def moved_statistics(path: str):
    """A metadata edit: the version's statistics snapshot lives at ``path``."""
    def edit(meta: dict) -> None:
        meta["feature_spec"]["data"]["statistics"]["path"] = path
    return edit


def refusals(events: list) -> list[str]:
    return [detail for kind, outcome, detail in events if kind == "model" and outcome == "refused"]


def test_backoff_doubles_from_the_initial_delay_up_to_the_cap():
    assert [backoff_s(a, 10, 40) for a in range(1, 6)] == [10, 20, 40, 40, 40]
    assert backoff_s(10_000, 1, 600) == 600


def test_a_version_that_fails_to_build_is_retried_with_backoff_while_the_old_one_serves(tmp_path, kuairand_model):
    """Version 2's statistics snapshot is missing: refused, version 1 serves; retried after 10 s, then 20 s
    later; the snapshot written meanwhile, version 2 swaps in on the next due retry (nothing else changed)."""
    base, _, cfg = env(tmp_path, kuairand_model)
    events, clock = [], Clock()
    r = reloader(cfg, base, events, clock)
    snap = r.initial()
    assert snap.model.version == 1
    stats2 = tmp_path / "stats-v2"
    add_version(base, 2, metadata=moved_statistics(str(stats2)))

    assert r.tick(snap) is snap and len(refusals(events)) == 1, events  # t = 0: refused
    assert "version 2" in refusals(events)[0]
    clock.now = 9.9
    assert r.tick(snap) is snap and len(refusals(events)) == 1  # not retried before its backoff
    clock.now = 10.0
    assert r.tick(snap) is snap and len(refusals(events)) == 2  # retried, refused again: next in 20 s
    shutil.copytree(stats_path(kuairand_model), stats2)  # the missing snapshot arrives
    clock.now = 29.9
    assert r.tick(snap) is snap and len(refusals(events)) == 2
    clock.now = 30.0
    new = r.tick(snap)
    assert new.model.version == 2, events
    assert [t.join.path for t in new.tables.tables][-3:] == [str(stats2 / f"{k}.parquet")
                                                            for k in ("user", "item", "user_author")]


def test_tables_are_rebuilt_when_the_statistics_config_differs(tmp_path, kuairand_model):
    """Version 2 has the same data.joins as version 1 but its statistics snapshot elsewhere, with other values:
    it must be served with its own statistics, not version 1's tables."""
    import pandas as pd

    base, _, cfg = env(tmp_path, kuairand_model)
    events, clock = [], Clock()
    r = reloader(cfg, base, events, clock)
    snap = r.initial()
    stats2 = tmp_path / "stats-v2"
    shutil.copytree(stats_path(kuairand_model), stats2)
    table = pd.read_parquet(stats2 / "user.parquet")
    column = next(c for c in table.columns if c.startswith("stat_user_impressions"))
    table[column] = table[column] + 1000.0
    table.to_parquet(stats2 / "user.parquet", index=False)
    add_version(base, 2, metadata=moved_statistics(str(stats2)))

    new = r.tick(snap)
    assert new.model.version == 2, events
    want = [j.path for j in serving_joins(new.model.config.data)]
    assert [t.join.path for t in new.tables.tables] == want
    user = int(table["user_id"].iloc[0])
    feature = next(f for f in new.model.config.serving_features if f.source == column)
    request, _ = new.tables.assemble([feature], {"user_id": np.array([user])}, {}, 1)
    assert request[feature.name][0] == pytest.approx(table[column].iloc[0])


def calibration(path: Path, version: int, name: str, a: float = 1.0, b: float = 0.5) -> None:
    path.write_text(json.dumps({"format": "rankstage.calibration/1", "version": name,
                                "model": {"name": "ranker", "version": version}, "fitted_on": {},
                                "tasks": {"click": {"method": "platt", "a": a, "b": b}}}))


def test_a_malformed_calibration_artifact_at_start_is_refused_not_raised(tmp_path, kuairand_model):
    """Nothing serves yet and the artifact is malformed (KeyError): the first version is refused, no exception out
    of ``initial``; the repaired artifact retries it at once (no backoff wait)."""
    cal = tmp_path / "calibration.json"
    calibration(cal, 1, "c1")
    good = cal.read_text()
    art = json.loads(good)
    del art["tasks"]["click"]["b"]  # malformed: load_artifact raises KeyError
    cal.write_text(json.dumps(art))
    base, _, cfg = env(tmp_path, kuairand_model, {**FUSION, "calibration": str(cal)})
    events, clock = [], Clock()
    r = reloader(cfg, base, events, clock)
    assert r.initial() is None and "KeyError" in refusals(events)[-1], events
    cal.write_text(good)
    snap = r.initial()
    assert snap is not None, events
    assert (snap.model.version, snap.calibration_version) == (1, "c1")


def test_a_model_and_its_calibration_swap_as_a_pair(tmp_path, kuairand_model):
    """Version 1 serves with c1 (fitted for it). Version 2 arrives while the artifact is still c1: refused, the
    pair (1, c1) keeps serving. A malformed artifact (KeyError) is refused on both paths. c2, fitted for version 2,
    arrives: the change retries version 2 at once (no backoff wait) and the pair (2, c2) swaps in."""
    cal = tmp_path / "calibration.json"
    calibration(cal, 1, "c1")
    base, _, cfg = env(tmp_path, kuairand_model, {**FUSION, "calibration": str(cal)})
    events, clock = [], Clock()
    r = reloader(cfg, base, events, clock)
    snap = r.initial()
    assert (snap.model.version, snap.calibration_version) == (1, "c1")
    add_version(base, 2)

    snap = r.tick(snap)
    assert (snap.model.version, snap.calibration_version) == (1, "c1"), events
    assert "fitted for model 'ranker' version 1" in refusals(events)[-1]

    art = json.loads(cal.read_text())
    del art["tasks"]["click"]["b"]  # malformed: load_artifact raises KeyError
    cal.write_text(json.dumps({**art, "version": "c2", "model": {"name": "ranker", "version": 2}}))
    snap = r.tick(snap)
    assert (snap.model.version, snap.calibration_version) == (1, "c1"), events
    assert "KeyError" in refusals(events)[-1]

    calibration(cal, 2, "c2")
    snap = r.tick(snap)
    assert (snap.model.version, snap.calibration_version) == (2, "c2"), events


def test_version_label_corrects_with_the_version_that_answered(tmp_path, kuairand_model):
    """TF Serving routed by label answers from version 2, whose statistics the service cannot load yet: the call
    is refused (UNAVAILABLE, naming the versions) instead of reporting version 1 and correcting version 2's outputs
    with version 1's rates. Once version 2 is loaded, its answers carry its version and its own predictions."""
    from serving.model_server import ModelServer

    base, _, cfg = env(tmp_path, kuairand_model, retry_initial_s=0.5, retry_max_s=0.5)
    ms = ModelServer(base, poll_interval_s=0.2)
    ms_port = ms.start(0)
    assert ms.wait_until_ready(60)
    cfg["model"]["backend"] = "tf_serving"
    cfg["tf_serving"] = {"address": f"127.0.0.1:{ms_port}", "timeout_ms": 5000, "version_label": "stable"}
    svc = RankingService(parse_serving_config(cfg))
    client = RankingClient(f"127.0.0.1:{svc.start()}", timeout_s=10)
    try:
        assert svc.wait_until_ready(60)
        stats2 = tmp_path / "stats-v2"
        add_version(base, 2, seed=2, metadata=moved_statistics(str(stats2)))
        assert wait_for(lambda: ms.snapshot.newest is not None and ms.snapshot.newest.version == 2, 60), ms.statuses()
        assert wait_for(lambda: svc.metrics.reloads.labels("model", "refused")._value.get() >= 1, 60)
        assert svc.snapshot.model.version == 1
        req = build_request({"user_id": 1}, np.arange(1, 11, dtype=np.int64), {"tab": 1, "hourmin": 1200},
                            return_predictions=True)
        with pytest.raises(grpc.RpcError) as err:
            client.send(req)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "model version 2 answered" in err.value.details() and "holds versions [1]" in err.value.details()

        shutil.copytree(stats_path(kuairand_model), stats2)
        assert wait_for(lambda: svc.snapshot.model.version == 2, 60)
        resp = client.send(req)
        assert resp.model.version == 2
        sv2, sv1 = load_servable(base / "2"), load_servable(base / "1")
        request, candidates = svc.snapshot.tables.assemble(
            sv2.config.serving_features, {"user_id": np.array([1]), "tab": np.array([1]), "hourmin": np.array([1200])},
            {"video_id": np.arange(1, 11, dtype=np.int64)}, 10)
        x = {**{k: np.repeat(v, 10) for k, v in request.items()}, **candidates}  # serving_default: (C,) each
        got = response_arrays(resp)
        order = got["candidate_indices"]
        want2, want1 = sv2.predict(x)["watch_time"][order], sv1.predict(x)["watch_time"][order]
        np.testing.assert_allclose(got["watch_time"], want2, rtol=2e-4)
        assert not np.allclose(got["watch_time"], want1, rtol=1e-2)
    finally:
        client.close()
        svc.stop(0)
        ms.stop(0)

