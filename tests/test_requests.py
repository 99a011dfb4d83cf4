"""serving/requests.py: logged rank requests are the newest day's largest user lists, ids and context only, and
their JSON files read back as the same RankRequests."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import synthetic

from features.spec import parse_config
from serving.client import load_request
from serving.codec import decode_column
from serving.requests import dump_requests, logged_requests


def tiny_log(tmp_path) -> tuple:
    """Day 1 (the newest): user 7 sees 6 items (one twice), user 8 sees 5, user 9 sees 2; day 0: user 5 sees 9.
    ``tab`` is a context column, equal within a user's day -> (config, log path)."""
    rows = ([(5, i, 0, 0) for i in range(9)] + [(7, i, 1, 3) for i in (1, 2, 3, 4, 5, 3, 6)]
            + [(8, i, 1, 4) for i in range(10, 15)] + [(9, i, 1, 5) for i in (1, 2)])
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "day", "tab"]).assign(click=0, watch_ms=0, like=0)
    path = synthetic.write_log(frame, tmp_path / "log.csv")
    data = synthetic.config(path, ["user_id", "item_id"], ["click"]).model_dump()
    data["features"].append({"name": "tab", "kind": "categorical", "group": "context", "vocab": {}})
    return parse_config(data, "tests/test_requests.py"), path


def test_requests_are_the_newest_days_largest_lists_with_ids_and_context(tmp_path):
    config, _ = tiny_log(tmp_path)
    requests = logged_requests(config, n=3, min_candidates=5, top_k=2)
    assert [r["user"] for r in requests] == [{"user_id": 7}, {"user_id": 8}]  # 9 has 2 items, 5 is a day older
    assert requests[0]["candidates"] == {"item_ids": [1, 2, 3, 4, 5, 6]}  # each item once, in log order
    assert requests[1]["candidates"] == {"item_ids": [10, 11, 12, 13, 14]}
    assert [r["context"] for r in requests] == [{"tab": 3}, {"tab": 4}]
    assert {r["top_k"] for r in requests} == {2} and all(r["return_predictions"] for r in requests)
    assert len({r["request_id"] for r in requests}) == 2
    assert [r["user"] for r in logged_requests(config, n=1)] == [{"user_id": 7}]


def test_dumped_requests_load_back_as_the_same_rank_requests(tmp_path):
    config, _ = tiny_log(tmp_path)
    requests = logged_requests(config)
    paths = dump_requests(requests, tmp_path / "requests")
    assert [p.name for p in paths] == ["request_0.json", "request_1.json"]
    for path, request in zip(paths, requests, strict=True):
        assert json.loads(path.read_text()) == request
        loaded = load_request(path)
        assert loaded.request_id == request["request_id"] and loaded.top_k == request["top_k"]
        items = decode_column(loaded.candidates.item_ids, "item_ids")
        np.testing.assert_array_equal(items, request["candidates"]["item_ids"])
        assert decode_column(loaded.context_features["tab"], "tab").tolist() == [request["context"]["tab"]]
