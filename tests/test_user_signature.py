"""The ``rank_candidates`` signature: user and context features once per request (1,), item features per candidate
(C,), the user's share of the first bottom layer computed once; outputs equal ``serving_default``'s.

C candidates, D_u / D_i encoded request / candidate widths, H width of the first shared-bottom layer.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
import yaml
from fresh_process import serve_in_fresh_process
from tensorflow.core.protobuf import saved_model_pb2

from features.logs import raw_inputs
from features.spec import ConfigError, RankstageConfig, parse_config
from ranking.export import check_export, endpoints, export_run
from ranking.flops import matmul_flops
from ranking.model import build_models
from ranking.runs import load_run
from ranking.servable import RANK_CANDIDATES_PACKED, load_servable, pack_inputs, read_warmup_requests, run_warmup
from ranking.signatures import (
    RANK_CANDIDATES,
    SERVING_DEFAULT,
    packed_layout,
    rank_candidates_signature,
    request_features,
    split_request,
)
from ranking.user_side import UserSide

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class TinyExport:
    config: RankstageConfig
    run_dir: Path
    version_dir: Path
    rows: dict[str, np.ndarray]  # one logged user's real rows of the newest day (side tables joined), (C,) each


def one_users_rows(config: RankstageConfig, df: pd.DataFrame, min_rows: int = 20) -> dict[str, np.ndarray]:
    """Raw serving inputs of the newest day's rows in ``df`` (the log as ``read_log`` gives it) of one real user with
    at least ``min_rows`` impressions."""
    newest = df[df[config.data.time_column] == df[config.data.time_column].max()]
    counts = newest[config.data.user_column].value_counts()
    user = counts[counts >= min_rows].sort_index().index[0]
    return raw_inputs(newest[newest[config.data.user_column] == user].reset_index(drop=True), config.serving_features)


@pytest.fixture(scope="session")
def kuairand_tiny_export(kuairand_model, kuairand_frame) -> TinyExport:
    """conftest's small real KuaiRand ranker (two bottom layers, 2 experts), plus one logged user's Apr 30 rows."""
    config, base = kuairand_model
    version_dir = base / "1"
    return TinyExport(config, Path(load_servable(version_dir).metadata["run"]), version_dir,
                      one_users_rows(config, kuairand_frame))


def signature_def(version_dir: Path, name: str):
    saved = saved_model_pb2.SavedModel()
    saved.ParseFromString((version_dir / "saved_model.pb").read_bytes())
    return saved.meta_graphs[0].signature_def[name]


def both_signatures(version_dir: Path, config: RankstageConfig, rows: dict[str, np.ndarray]):
    """(rank_candidates outputs, serving_default outputs) on ``rows`` with row 0's user/context values."""
    sv = load_servable(version_dir)
    ranked, repeated = split_request(rows, config)
    return sv.predict(ranked, RANK_CANDIDATES), sv.predict(repeated, SERVING_DEFAULT)


def assert_same(got: dict, want: dict, config: RankstageConfig) -> None:
    assert set(got) == set(want) == {t.name for t in config.tasks}
    for task in config.tasks:
        rtol = 1e-5 if task.type == "watch_time" else 0.0  # seconds: relative; probabilities, ratios: absolute
        assert got[task.name].shape == want[task.name].shape, task.name
        np.testing.assert_allclose(got[task.name], want[task.name], rtol=rtol, atol=1e-5, err_msg=task.name)


def assert_input_shapes(version_dir: Path, config: RankstageConfig) -> None:
    sig, default = signature_def(version_dir, RANK_CANDIDATES), signature_def(version_dir, SERVING_DEFAULT)
    assert sig.method_name == "tensorflow/serving/predict"
    assert set(sig.inputs) == set(default.inputs) and set(sig.outputs) == set(default.outputs)
    request = set(request_features(config))
    for name, spec in sig.inputs.items():
        assert spec.dtype == default.inputs[name].dtype, name
        want = [1] if name in request else [-1]  # (1,) once per request, (None,) per candidate
        assert [d.size for d in spec.tensor_shape.dim] == want, name


def flops_per_candidate(fn, spec: dict[str, tf.TensorSpec], c: int) -> float:
    """MatMul/Einsum FLOPs of ``fn`` traced with C = ``c`` candidates, divided by C."""
    fixed = {k: tf.TensorSpec([1 if s.shape[0] == 1 else c], s.dtype, name=k) for k, s in spec.items()}
    return matmul_flops(tf.function(fn).get_concrete_function(fixed).graph) / c


# ---------------------------------------------------------------------------------------------------- synthetic


def test_synthetic_rank_candidates_equals_serving_default(exported, full_run, validation_frame):
    config = full_run.config
    user = validation_frame["user_id"].value_counts().index[0]
    rows = raw_inputs(validation_frame[validation_frame["user_id"] == user].reset_index(drop=True),
                      config.serving_features)
    got, want = both_signatures(exported[1], config, rows)
    assert len(got["click"]) == len(rows["item_id"]) > 1
    assert_same(got, want, config)


def test_synthetic_signature_shapes_and_metadata(exported, full_run):
    config = full_run.config
    assert_input_shapes(exported[1], config)
    meta = json.loads((exported[1] / "assets.extra" / "rankstage_metadata.json").read_text())
    assert meta["signature"] == SERVING_DEFAULT
    assert meta["signatures"] == {
        SERVING_DEFAULT: {"inputs": [f.name for f in config.serving_features]},
        RANK_CANDIDATES: {"request_inputs": ["user_id", "device"],
                          "candidate_inputs": ["segment", "item_id", "quality", "tags"]},
        RANK_CANDIDATES_PACKED: {"packed_inputs": {"candidates_string": ["segment", "tags"],
                                                   "request_int64": ["user_id"], "request_string": ["device"],
                                                   "candidates_int64": ["item_id"],
                                                   "candidates_float32": ["quality"]}}}
    assert "omitted_signatures" not in meta
    packed = signature_def(exported[1], RANK_CANDIDATES_PACKED)
    assert {k: [d.size for d in v.tensor_shape.dim] for k, v in packed.inputs.items()} == {
        "request_int64": [1, 1], "request_string": [1, 1], "candidates_int64": [-1, 1],
        "candidates_float32": [-1, 1], "candidates_string": [-1, 2]}


def test_warmup_covers_every_signature(exported, full_run):
    requests = read_warmup_requests(exported[1])
    by_sig: dict[str, list] = {}
    for r in requests:
        by_sig.setdefault(r.model_spec.signature_name, []).append(r)
    assert set(by_sig) == {SERVING_DEFAULT, RANK_CANDIDATES, RANK_CANDIDATES_PACKED}
    for r in by_sig[RANK_CANDIDATES_PACKED]:
        shapes = {k: tf.make_ndarray(v).shape for k, v in r.inputs.items()}
        assert shapes["request_int64"] == (1, 1) and shapes["candidates_string"][1] == 2
    sizes = []
    for r in by_sig[RANK_CANDIDATES]:
        shapes = {k: tf.make_ndarray(v).shape for k, v in r.inputs.items()}
        assert shapes["user_id"] == (1,)
        assert len({shapes[k] for k in ("segment", "item_id", "quality", "tags")}) == 1
        sizes.append(shapes["item_id"][0])
    assert len(set(sizes)) >= 3, sizes  # several candidate counts
    assert run_warmup(load_servable(exported[1])) == len(requests)


def test_user_part_is_computed_once(full_run):
    """FLOPs by hand: serving_default does C * (2*D*H + R), rank_candidates 2*D_u*H + C * (2*D_i*H + R); the
    difference is exactly 2*D_u*H*(C - 1)."""
    serve, config, c = full_run.models.serve, full_run.config, 100
    fns = endpoints(serve, config)
    default = flops_per_candidate(*fns[SERVING_DEFAULT], c)
    ranked = flops_per_candidate(*fns[RANK_CANDIDATES], c)
    side = fns[RANK_CANDIDATES][0]
    d_u, h = len(side.request_rows), side.first.kernel.shape[1]
    assert d_u == 8 and h == 32  # user_id's embedding (embedding_dim 8) into bottom_units [32]
    assert default * c - ranked * c == pytest.approx(2 * d_u * h * (c - 1))
    assert ranked < default


def test_a_wrong_rank_candidates_is_never_published(exported, full_run, validation_frame, tmp_path, monkeypatch,
                                                     synthetic_warmup):
    """The guard can fail: a rank_candidates graph off by 0.1% is caught against serving_default, nothing is
    published, and the good signature passes the same check."""
    rows = raw_inputs(validation_frame.iloc[:50].reset_index(drop=True), full_run.config.serving_features)
    check_export(exported[1], full_run.models.serve, rows, full_run.config)
    real = UserSide.__call__
    monkeypatch.setattr(UserSide, "__call__", lambda self, x: {k: v * 1.001 for k, v in real(self, x).items()})
    with pytest.raises(RuntimeError, match="rank_candidates disagrees with serving_default"):
        export_run(full_run.run_dir, tmp_path / "models", verbose=False, warmup=synthetic_warmup)
    assert not [p for p in (tmp_path / "models").iterdir() if p.is_dir()]


def run_dir_variant(full_run, tmp_path: Path, edit) -> Path:
    """A copy of ``full_run``'s run directory with its config edited by ``edit(dict)``; if the model changed shape,
    freshly initialised weights (equivalence of the two signatures holds for any weights)."""
    run_dir = tmp_path / "run"
    shutil.copytree(full_run.run_dir, run_dir)
    data = yaml.safe_load((run_dir / "config.yaml").read_text())
    before = json.dumps(data["model"], sort_keys=True)
    edit(data)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    if json.dumps(data["model"], sort_keys=True) != before:
        config = parse_config(data, "variant")
        loaded = load_run(full_run.run_dir)
        build_models(config, loaded.stats).train.save_weights(run_dir / "model.weights.h5")
    return run_dir


@pytest.mark.parametrize("model", [{"num_experts": 0, "bottom_units": [16, 8]},
                                   {"num_experts": 3, "bottom_units": [24, 12, 6], "dropout": 0.2}],
                         ids=["shared_bottom", "mmoe_with_dropout"])
def test_bottom_shapes_and_shared_bottom(full_run, validation_frame, tmp_path, model, synthetic_warmup):
    run_dir = run_dir_variant(full_run, tmp_path, lambda d: d["model"].update(model))
    # check_export compares both signatures
    version_dir = export_run(run_dir, tmp_path / "models", verbose=False, warmup=synthetic_warmup)
    config = load_run(run_dir).config
    assert_input_shapes(version_dir, config)
    user = validation_frame["user_id"].value_counts().index[1]
    rows = raw_inputs(validation_frame[validation_frame["user_id"] == user].reset_index(drop=True),
                      config.serving_features)
    assert_same(*both_signatures(version_dir, config, rows), config)


def test_no_user_or_context_feature_exports_serving_default_only(full_run, tmp_path, synthetic_warmup):
    def all_items(d):
        for f in d["features"]:
            if f.get("group") in ("user", "context"):
                f["group"] = "item"

    version_dir = export_run(run_dir_variant(full_run, tmp_path, all_items), tmp_path / "models", verbose=False,
                             warmup=synthetic_warmup)
    sv = load_servable(version_dir)
    assert set(sv.signatures) == {SERVING_DEFAULT}
    assert set(sv.metadata["signatures"]) == {SERVING_DEFAULT}
    assert "no user or context feature" in sv.metadata["omitted_signatures"][RANK_CANDIDATES]
    assert {r.model_spec.signature_name for r in read_warmup_requests(version_dir)} == {SERVING_DEFAULT}
    with pytest.raises(ValueError, match="no user or context feature"):
        UserSide.of(load_run(tmp_path / "run").models.serve, sv.config)


# ----------------------------------------------------------------------------------------------------- KuaiRand


def test_kuairand_rank_candidates_equals_serving_default(kuairand_tiny_export):
    t = kuairand_tiny_export
    got, want = both_signatures(t.version_dir, t.config, t.rows)
    assert len(got["click"]) == len(t.rows["video_id"]) >= 20
    assert len(np.unique(t.rows["video_id"])) > 1 and len(np.unique(t.rows["user_id"])) == 1
    assert_same(got, want, t.config)


def test_kuairand_packed_signature_equals_rank_candidates(kuairand_tiny_export):
    """rank_candidates_packed is rank_candidates behind six packed inputs: the same outputs bit for bit on real rows;
    its column groups cover every rank_candidates input once, each in the group of its side and dtype."""
    t = kuairand_tiny_export
    sv = load_servable(t.version_dir)
    layout = sv.metadata["signatures"][RANK_CANDIDATES_PACKED]["packed_inputs"]
    assert layout == packed_layout(t.config)
    spec = rank_candidates_signature(t.config)
    assert sorted(n for names in layout.values() for n in names) == sorted(spec)
    for group, names in layout.items():
        side, dtype = group.split("_")
        assert all(spec[n].dtype.name == dtype and (spec[n].shape.as_list() == [1]) == (side == "request")
                   for n in names), group
    assert len(layout) == 6  # int64, float32 and string on both sides
    ranked, _ = split_request(t.rows, t.config)
    packed = pack_inputs(layout, ranked)
    assert packed["candidates_int64"].shape == (len(t.rows["video_id"]), len(layout["candidates_int64"]))
    got, want = sv.predict(packed, RANK_CANDIDATES_PACKED), sv.predict(ranked, RANK_CANDIDATES)
    assert got.keys() == want.keys()
    for task in got:
        np.testing.assert_array_equal(got[task], want[task])


def test_kuairand_signature_shapes_and_metadata(kuairand_tiny_export):
    t = kuairand_tiny_export
    assert_input_shapes(t.version_dir, t.config)
    meta = load_servable(t.version_dir).metadata
    rc = meta["signatures"][RANK_CANDIDATES]
    assert rc["request_inputs"][0] == "user_id" and {"tab", "hourmin"} <= set(rc["request_inputs"])
    assert {"video_id", "author_id", "tag"} <= set(rc["candidate_inputs"])
    assert len(rc["request_inputs"]) + len(rc["candidate_inputs"]) == len(t.config.serving_features)


def test_kuairand_user_part_is_computed_once(kuairand_tiny_export):
    t = kuairand_tiny_export
    fns = endpoints(load_run(t.run_dir).models.serve, t.config)
    side = fns[RANK_CANDIDATES][0]
    d_u, h = len(side.request_rows), side.first.kernel.shape[1]
    assert h == 64 and d_u > len(side.candidate_rows)  # ~30 user features are wider than the item side
    for c in (100, 1000):
        default = flops_per_candidate(*fns[SERVING_DEFAULT], c)
        ranked = flops_per_candidate(*fns[RANK_CANDIDATES], c)
        assert (default - ranked) * c == pytest.approx(2 * d_u * h * (c - 1))


def test_kuairand_fresh_process_serves_rank_candidates(kuairand_tiny_export, tmp_path):
    t = kuairand_tiny_export
    ranked, repeated = split_request(t.rows, t.config)
    got = serve_in_fresh_process(t.version_dir, ranked, RANK_CANDIDATES, tmp_path)
    want = load_servable(t.version_dir).predict(repeated, SERVING_DEFAULT)
    assert_same(got, want, t.config)


def test_rank_candidates_signature_spec(kuairand_tiny_export):
    spec = rank_candidates_signature(kuairand_tiny_export.config)
    assert spec["user_id"].shape.as_list() == [1] and spec["tab"].shape.as_list() == [1]
    assert spec["video_id"].shape.as_list() == [None] and spec["tag"].dtype == tf.string


def test_flat_calls_equal_the_public_call_on_real_rows(kuairand_tiny_export):
    """The serving paths call signatures through ``FlatCall`` after warmup: same outputs bit for bit, on rows of
    another size than the warmup records, with the inputs given in another order."""
    t = kuairand_tiny_export
    ranked, repeated = split_request(t.rows, t.config)
    public = load_servable(t.version_dir)
    packed = pack_inputs(public.metadata["signatures"][RANK_CANDIDATES_PACKED]["packed_inputs"], ranked)
    want = {RANK_CANDIDATES: public.predict(ranked, RANK_CANDIDATES),
            SERVING_DEFAULT: public.predict(repeated, SERVING_DEFAULT),
            RANK_CANDIDATES_PACKED: public.predict(packed, RANK_CANDIDATES_PACKED)}
    fast = load_servable(t.version_dir)
    run_warmup(fast, flat_calls=True)
    assert set(fast._flat_calls) == {RANK_CANDIDATES, SERVING_DEFAULT, RANK_CANDIDATES_PACKED}
    for name, rows in ((RANK_CANDIDATES, ranked), (SERVING_DEFAULT, repeated), (RANK_CANDIDATES_PACKED, packed)):
        got = fast.predict(dict(reversed(list(rows.items()))), name)
        assert got.keys() == want[name].keys()
        for task in got:
            np.testing.assert_array_equal(got[task], want[name][task])
    with pytest.raises(ConfigError, match="missing \\['author_id'\\]"):
        fast.predict({k: v for k, v in ranked.items() if k != "author_id"}, RANK_CANDIDATES)


def test_flat_calls_refuse_shapes_the_signature_does_not_accept(kuairand_tiny_export):
    """The public call checks input shapes against the signature; the flat call must too (a (C,) user input to
    rank_candidates would otherwise be computed as if it were one user)."""
    t = kuairand_tiny_export
    ranked, _ = split_request(t.rows, t.config)
    fast = load_servable(t.version_dir)
    run_warmup(fast, flat_calls=True)
    assert RANK_CANDIDATES in fast._flat_calls
    c = len(ranked["video_id"])
    for name, bad in (("user_id", np.repeat(ranked["user_id"], c)), ("video_id", ranked["video_id"][:, None])):
        with pytest.raises(ValueError, match=re.escape(f"input '{name}': shape {bad.shape} is not compatible")):
            fast.predict({**ranked, name: bad}, RANK_CANDIDATES)


def test_pack_inputs_stacks_columns_and_refuses_lossy_ones():
    layout = {"request_int64": ["user_id"], "candidates_float32": ["q", "r"], "candidates_string": ["tag"]}
    good = {"user_id": np.array([7]), "q": np.array([1.5, 2.0], np.float32), "r": np.array([1, 2]),
            "tag": np.array(["a", "b"], dtype=object)}
    packed = pack_inputs(layout, good)
    assert packed["request_int64"].tolist() == [[7]] and packed["request_int64"].dtype == np.int64
    assert packed["candidates_float32"].tolist() == [[1.5, 1.0], [2.0, 2.0]]
    assert packed["candidates_float32"].dtype == np.float32 and packed["candidates_string"].dtype == object
    with pytest.raises(ValueError, match="'user_id': dtype float64 cannot be packed into 'request_int64'"):
        pack_inputs(layout, {**good, "user_id": np.array([7.5])})
    with pytest.raises(ValueError, match="'tag': dtype int64 cannot be packed into 'candidates_string'"):
        pack_inputs(layout, {**good, "tag": np.array([1, 2])})
