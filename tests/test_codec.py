"""Columnar request decoding: typed columns, list-valued rows, and the structural errors, by hand."""

from __future__ import annotations

import numpy as np
import pytest

from rankstage.v1 import ranking_pb2 as pb
from serving.client import build_request, request_from_json
from serving.codec import RequestError, column, decode_column, decode_request, encode_response, response_arrays


def test_list_valued_columns_join_rows_with_the_separator():
    col = column(np.array(["a", "b", "c", "d"], dtype=object))
    col.row_lengths.extend([2, 0, 1, 1])
    assert decode_column(col, "f", "|").tolist() == ["a|b", "", "c", "d"]
    ints = column(np.array([7, 8, 9]))
    ints.row_lengths.extend([1, 2])
    assert decode_column(ints, "f").tolist() == ["7", "8,9"]


@pytest.mark.parametrize("lengths,match", [([2, 2, 1], "row_lengths sum to 5"), ([-1, 5], "min -1")])
def test_row_lengths_that_do_not_add_up_are_refused(lengths, match):
    col = column(np.array(["a", "b", "c", "d"], dtype=object))
    col.row_lengths.extend(lengths)
    with pytest.raises(RequestError, match=match):
        decode_column(col, "candidates.features[tag]")


def test_typed_columns_keep_their_dtype():
    assert decode_column(column(np.array([1, 2])), "x").dtype == np.int64
    assert decode_column(column(np.array([1.5], dtype=np.float32)), "x").dtype == np.float32
    assert decode_column(column(np.array(["é"], dtype=object)), "x").tolist() == ["é"]  # non-ASCII survives
    with pytest.raises(RequestError, match="x: no values"):
        decode_column(pb.FeatureColumn(), "x")


def test_request_structure_errors_name_the_field():
    with pytest.raises(RequestError, match="candidates.item_ids: missing"):
        decode_request(pb.RankRequest())
    with pytest.raises(RequestError, match="ids are int64_values or string_values"):
        decode_request(build_request({}, np.array([1.0, 2.0], dtype=np.float32)))
    req = build_request({"user_id": 1}, np.array([3, 4]))
    req.user_features["user_id"].int64_values.values.append(2)
    with pytest.raises(RequestError, match=r"user_features\[user_id\]: 2 rows, expected 1"):
        decode_request(req)


def test_json_requests_and_the_response_round_trip():
    req = request_from_json({"user": {"user_id": 5}, "context": {"tab": 1},
                             "candidates": {"item_ids": ["x", "y", "z"], "features": {
                                 "score": [0.5, None, 2], "tag": [["a"], [], ["b", "c"]]}}, "top_k": 2})
    d = decode_request(req)
    assert d.item_ids.tolist() == ["x", "y", "z"] and d.top_k == 2
    np.testing.assert_array_equal(d.candidates["score"], np.array([0.5, np.nan, 2.0], dtype=np.float32))
    assert d.candidates["tag"].tolist() == ["a", "", "b,c"]
    resp = encode_response("r", d.item_ids, np.array([2, 0]), np.array([0.1, 0.2, 0.9]),
                           {"click": np.array([0.3, 0.4, 0.5])})
    out = response_arrays(pb.RankResponse.FromString(resp.SerializeToString()))
    assert out["item_ids"].tolist() == ["z", "x"] and out["candidate_indices"].tolist() == [2, 0]
    np.testing.assert_allclose(out["scores"], [0.9, 0.1], rtol=1e-6)
    np.testing.assert_allclose(out["click"], [0.5, 0.3], rtol=1e-6)


def test_a_multi_character_separator_formed_across_tokens_is_refused_not_a_crash():
    # "a|" + "||" + "|b" holds the separator "||" twice although no token does: the row would split into three
    col = column(np.array(["a|", "|b"], dtype=object))
    col.row_lengths.append(2)
    with pytest.raises(RequestError, match=r"f: list tokens 'a\|', '\|b' join into more than one separator '\|\|'"):
        decode_column(col, "f", "||")
    ok = column(np.array(["a", "b"], dtype=object))
    ok.row_lengths.append(2)
    assert decode_column(ok, "f", "||").tolist() == ["a||b"]
