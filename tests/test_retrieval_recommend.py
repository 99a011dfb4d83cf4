"""Recommend over real loopback gRPC: a small real KuaiRand retrieval index (Apr 25-29, 1 epoch) feeds the small
real KuaiRand ranker; a known user's candidates are the index's top N of the items they have not seen and are
ranked exactly as Rank ranks them; an unknown user gets the popular-items fallback; a new index version is picked
up while serving."""

from __future__ import annotations

import time

import numpy as np
import pytest
import yaml
from tiny_retrieval import tiny_retrieval_config

from rankstage.v1 import ranking_pb2 as pb
from serving.client import RankingClient
from serving.codec import response_arrays
from serving.config import parse_serving_config
from serving.service import RankingService

FUSION = {"version": "f1", "default_profile": "click", "profiles": {
    "click": {"formula": "weighted_sum", "weights": {"click": 1.0}}}}


@pytest.fixture(scope="module")
def retrieval_run(tmp_path_factory):
    """A KuaiRand retrieval run (narrow, 1 epoch) -> (run dir, config)."""
    from retrieval.train import train

    config = tiny_retrieval_config("retrieval_kuairand.yaml", "kuairand tiny")
    run, _ = train(config, tmp_path_factory.mktemp("runs") / "retrieval_kuairand", verbose=0)
    return run, config


@pytest.fixture
def recommending(tmp_path, kuairand_model, retrieval_run):
    """A service with the ranker and a retrieval index (version 1) -> (service, client, retrieval base path)."""
    import shutil

    from retrieval.export import export_run

    base = tmp_path / "ranker"
    shutil.copytree(kuairand_model[1], base)
    index_base = tmp_path / "retrieval"
    export_run(retrieval_run[0], index_base, verbose=False)
    fusion = tmp_path / "fusion.yaml"
    fusion.write_text(yaml.safe_dump(FUSION))
    cfg = {"model": {"base_path": str(base)}, "fusion": str(fusion), "server": {"port": 0, "drain_s": 1},
           "reload": {"interval_s": 0.2}, "retrieval": {"base_path": str(index_base), "num_candidates": 50}}
    svc = RankingService(parse_serving_config(cfg))
    port = svc.start()
    assert svc.wait_until_ready(60)
    client = RankingClient(f"127.0.0.1:{port}", timeout_s=10)
    yield svc, client, index_base
    client.close()
    svc.stop(1)


def _known_user(index) -> int:
    """A user with history in the index's tables."""
    hist = index.users["history"]
    return int(index.users[index.user_column][next(i for i, h in enumerate(hist) if len(h) >= 3)])


def test_known_user_gets_index_top_n_ranked_as_rank_would(recommending):
    svc, client, _ = recommending
    index = svc.recommender.index
    user = _known_user(index)
    context = {"tab": 1, "hourmin": 1400}
    resp = client.recommend({"user_id": user}, context, num_candidates=30, top_k=10, return_predictions=True)
    assert resp.candidate_source == "retrieval" and resp.num_candidates == 30 and resp.retrieval_version == 1

    inline = {"user_id": np.array([user])}
    expected = index.top(index.query(user, inline, {k: np.array([v]) for k, v in context.items()}), 30)
    ranked = response_arrays(resp.ranked)
    assert len(ranked["item_ids"]) == 10 and set(ranked["item_ids"]) <= set(expected.tolist())
    direct = client.rank({"user_id": user}, expected, context, top_k=10)  # the Rank path on the same candidates
    np.testing.assert_array_equal(ranked["item_ids"], response_arrays(direct)["item_ids"])
    np.testing.assert_allclose(ranked["scores"], response_arrays(direct)["scores"], rtol=1e-6)


def test_known_users_never_get_a_seen_item_and_still_get_n(recommending, retrieval_run):
    """The users with the most positives in the index's training window (their seen set, rebuilt from the log, not
    read from the index's table) get K candidates, all ranked and returned (top_k = K), none of them seen."""
    from retrieval.data import build_data

    svc, client, _ = recommending
    config = retrieval_run[1]
    k = svc.recommender.index.metadata["k"]
    events = build_data(config).train_events
    seen = events.groupby(config.data.user_column)[config.data.item_column].unique()
    heavy = seen.map(len).sort_values(ascending=False, kind="stable").index[:5]
    assert len(seen[heavy[-1]]) >= 15  # enough seen items that an unfiltered top K holds some
    for user in heavy:
        resp = client.recommend({"user_id": int(user)}, {"tab": 1}, num_candidates=k, top_k=k)
        items = response_arrays(resp.ranked)["item_ids"]
        assert resp.candidate_source == "retrieval" and resp.num_candidates == k and len(items) == k
        assert len(set(items.tolist())) == k
        assert not set(items.tolist()) & set(seen[user].tolist()), f"user {user}: seen items returned"


def test_unknown_user_gets_popular_items(recommending):
    svc, client, _ = recommending
    resp = client.recommend({"user_id": 10**12}, {"tab": 1}, num_candidates=20, top_k=5)
    assert resp.candidate_source == "popular_fallback" and resp.num_candidates == 20
    popular = svc.recommender.index.popular[:20]
    assert set(response_arrays(resp.ranked)["item_ids"]) <= set(popular.tolist())
    assert len(response_arrays(resp.ranked)["item_ids"]) == 5


def test_missing_user_id_is_invalid_argument(recommending):
    import grpc

    _, client, _ = recommending
    with pytest.raises(grpc.RpcError) as err:
        client.stub.Recommend(pb.RecommendRequest(top_k=3), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "user_features[user_id]: missing" in err.value.details()


def test_new_index_version_is_hot_reloaded(recommending, retrieval_run):
    from retrieval.export import export_run

    svc, client, index_base = recommending
    export_run(retrieval_run[0], index_base, verbose=False)  # version 2
    deadline = time.monotonic() + 60
    while svc.recommender.index.version != 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    resp = client.recommend({"user_id": _known_user(svc.recommender.index)}, {"tab": 1}, top_k=3)
    assert resp.retrieval_version == 2 and resp.candidate_source == "retrieval"


def test_recommend_calls_are_counted_by_code_and_candidate_source(recommending):
    import grpc

    svc, client, _ = recommending
    registry = svc.metrics.registry

    def value(name: str, **labels) -> float:
        return registry.get_sample_value(name, labels) or 0.0

    before = {"ok": value("rankstage_recommend_requests_total", code="OK"),
              "bad": value("rankstage_recommend_requests_total", code="INVALID_ARGUMENT"),
              "fallback": value("rankstage_recommend_candidates_total", source="popular_fallback"),
              "retrieval": value("rankstage_recommend_candidates_total", source="retrieval"),
              "rank_ok": value("rankstage_rank_requests_total", code="OK"),
              "timed": value("rankstage_retrieve_seconds_count")}
    client.recommend({"user_id": 10**12}, {"tab": 1}, num_candidates=10, top_k=3)
    client.recommend({"user_id": _known_user(svc.recommender.index)}, {"tab": 1}, num_candidates=10, top_k=3)
    with pytest.raises(grpc.RpcError):
        client.stub.Recommend(pb.RecommendRequest(top_k=3), timeout=5)
    assert value("rankstage_recommend_requests_total", code="OK") == before["ok"] + 2
    assert value("rankstage_recommend_requests_total", code="INVALID_ARGUMENT") == before["bad"] + 1
    assert value("rankstage_recommend_candidates_total", source="popular_fallback") == before["fallback"] + 1
    assert value("rankstage_recommend_candidates_total", source="retrieval") == before["retrieval"] + 1
    assert value("rankstage_retrieve_seconds_count") == before["timed"] + 2
    assert value("rankstage_rank_requests_total", code="OK") == before["rank_ok"]  # Rank counts its own calls
    version = svc.recommender.index.version
    assert value("rankstage_retrieval_index_version", model=svc.recommender.index.name) == version
