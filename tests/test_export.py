"""Export of a run as a TF Serving SavedModel: layout, warmup requests, metadata, model server config, signature,
a graph the C++ loader can run without project code, robustness to bad values, and safe failure.

C candidates.
"""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import tensorflow as tf
from fresh_process import serve_in_fresh_process
from google.protobuf import text_format
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import prediction_log_pb2
from tensorflow_serving.config import model_server_config_pb2

import ranking.export
from features.logs import raw_inputs
from ranking.export import check_export, export_run
from ranking.runs import load_run
from ranking.signatures import input_signature
from ranking.warmup import WARMUP_SIZES, predict_request

TASKS = {"click", "like", "watch_time"}


@pytest.fixture(scope="module")
def signature_def(exported):
    saved = saved_model_pb2.SavedModel()
    saved.ParseFromString((exported[1] / "saved_model.pb").read_bytes())
    assert len(saved.meta_graphs) == 1
    return saved.meta_graphs[0], saved.meta_graphs[0].signature_def["serving_default"]


def serving_rows(frame, config, n: int) -> dict[str, np.ndarray]:
    return raw_inputs(frame.iloc[:n].reset_index(drop=True), config.serving_features)


def copy_base(exported, tmp_path):
    base = tmp_path / "synthetic"
    shutil.copytree(exported[0], base)
    return base


def test_export_writes_a_versioned_servable(exported, full_run):
    base, version_dir = exported
    assert version_dir == base / "1"
    assert (version_dir / "saved_model.pb").is_file()
    assert (version_dir / "variables" / "variables.index").is_file()
    assert (version_dir / "assets.extra" / "tf_serving_warmup_requests").is_file()
    assert not list(base.glob(".tmp-*")) and not list(base.glob(".*.tmp"))

    metadata = json.loads((version_dir / "assets.extra" / "rankstage_metadata.json").read_text())
    artifacts = json.loads((full_run.run_dir / "artifacts.json").read_text())
    assert metadata["version"] == 1 and metadata["signature"] == "serving_default"
    assert metadata["sampling"] == artifacts["sampling"]
    assert metadata["sampling"]["click"]["kept_fraction"] == pytest.approx(0.5, rel=0.05)
    assert metadata["sampling"]["watch_time"]["method"] == "importance_weighted"
    assert {o["task"]: o["unit"] for o in metadata["outputs"]} == {
        "click": "probability", "like": "probability", "watch_time": "seconds"}
    assert [i["name"] for i in metadata["inputs"]] == [f.name for f in full_run.config.serving_features]


def test_models_config_is_a_model_server_config(exported, full_run):
    base, _ = exported
    cfg = text_format.Parse((base / "models.config").read_text(), model_server_config_pb2.ModelServerConfig())
    (model,) = cfg.model_config_list.config
    assert model.name == full_run.config.name
    assert model.base_path == str(base.resolve())
    assert model.model_platform == "tensorflow"


def test_warmup_requests_match_the_signature(exported, full_run, signature_def):
    _, signature = signature_def
    records = list(tf.data.TFRecordDataset(str(exported[1] / "assets.extra" / "tf_serving_warmup_requests")))
    requests = [prediction_log_pb2.PredictionLog.FromString(r.numpy()).predict_log.request for r in records]
    assert {r.model_spec.signature_name for r in requests} == {"serving_default", "rank_candidates",
                                                               "rank_candidates_packed"}  # every signature warmed
    default = [r for r in requests if r.model_spec.signature_name == "serving_default"]
    assert len(default) == len(WARMUP_SIZES)
    for request, size in zip(default, WARMUP_SIZES):  # rank_candidates: tests/test_user_signature.py
        assert request.model_spec.name == full_run.config.name
        assert set(request.inputs) == set(signature.inputs)
        for name, tensor in request.inputs.items():
            assert tensor.dtype == signature.inputs[name].dtype, name
            assert tf.make_ndarray(tensor).shape == (size,), name


def test_second_export_becomes_version_2(exported, full_run, tmp_path):
    base = copy_base(exported, tmp_path)
    v2 = export_run(full_run.run_dir, base, verbose=False)
    assert v2 == base / "2"
    assert sorted(p.name for p in base.iterdir() if p.is_dir()) == ["1", "2"]
    assert json.loads((v2 / "assets.extra" / "rankstage_metadata.json").read_text())["version"] == 2
    cfg = text_format.Parse((base / "models.config").read_text(), model_server_config_pb2.ModelServerConfig())
    assert cfg.model_config_list.config[0].base_path == str(base.resolve())


def test_signature_is_predict_over_serving_features_only(signature_def, full_run):
    _, signature = signature_def
    assert signature.method_name == "tensorflow/serving/predict"
    assert set(signature.inputs) == set(input_signature(full_run.config))
    assert set(signature.inputs) == {"segment", "user_id", "item_id", "quality", "tags", "device"}
    assert "position" not in signature.inputs  # device is: the bias tower is served at position missing
    assert set(signature.outputs) == TASKS
    for name, spec in input_signature(full_run.config).items():
        assert signature.inputs[name].dtype == spec.dtype.as_datatype_enum, name
        assert [d.size for d in signature.inputs[name].tensor_shape.dim] == [-1], name


def test_graph_has_no_python_ops(signature_def):
    meta_graph, _ = signature_def
    ops = {n.op for n in meta_graph.graph_def.node}
    for fn in meta_graph.graph_def.library.function:
        ops |= {n.op for n in fn.node_def}
    assert ops, "no ops found in the graph"
    assert not ops & {"PyFunc", "EagerPyFunc", "PyFuncStateless"}


def test_fresh_process_serves_without_project_code(exported, full_run, validation_frame, tmp_path):
    rows = serving_rows(validation_frame, full_run.config, 64)
    got = serve_in_fresh_process(exported[1], rows, "serving_default", tmp_path)
    want = full_run.models.serve({k: tf.constant(v) for k, v in rows.items()}, training=False)
    assert set(got) == TASKS
    for task in TASKS:
        assert got[task].shape == (64,)
        np.testing.assert_allclose(got[task], np.asarray(want[task]), rtol=1e-5, atol=1e-6, err_msg=task)


def test_bad_values_give_finite_outputs(exported):
    fn = tf.saved_model.load(str(exported[1])).signatures["serving_default"]
    out = fn(segment=tf.constant(["", "news", "never-seen", ""]),
             user_id=tf.constant([10**12, -1, 0, 7], tf.int64),
             item_id=tf.constant([10**12, -(10**12), 0, 3], tf.int64),
             quality=tf.constant([np.nan, np.inf, -np.inf, -3.0], tf.float32),
             tags=tf.constant(["", ",,", "t999,never,seen", "t1"]),
             device=tf.constant(["", "never-seen", "phone", "tv"]))
    assert set(out) == TASKS
    for task, values in out.items():
        values = values.numpy()
        assert values.shape == (4,), task
        assert np.all(np.isfinite(values)), f"{task}: {values}"
        assert np.all(values >= 0), f"{task}: {values}"
    assert np.all(out["click"].numpy() <= 1) and np.all(out["like"].numpy() <= 1)


def test_check_export_rejects_a_model_that_disagrees(exported, full_run, validation_frame):
    """The guard itself can fail: a serving model whose click logit moved is caught against the SavedModel."""
    rows = serving_rows(validation_frame, full_run.config, 100)
    check_export(exported[1], full_run.models.serve, rows)  # the exported model agrees with itself
    other = load_run(full_run.run_dir).models
    bias = other.serve.get_layer("click_logit").bias
    bias.assign(bias.numpy() + 0.5)
    with pytest.raises(RuntimeError, match="click"):
        check_export(exported[1], other.serve, rows)


def test_failed_export_never_replaces_a_good_version(exported, full_run, tmp_path, monkeypatch, synthetic_warmup):
    base = copy_base(exported, tmp_path)
    before = sorted(p.name for p in base.iterdir())
    config_text = (base / "models.config").read_bytes()

    def bad_check(*args, **kwargs):
        raise RuntimeError("planted export check failure")

    monkeypatch.setattr(ranking.export, "check_export", bad_check)
    with pytest.raises(RuntimeError, match="planted"):
        export_run(full_run.run_dir, base, verbose=False, warmup=synthetic_warmup)
    assert sorted(p.name for p in base.iterdir()) == before == ["1", "models.config"]
    assert not list(base.glob(".tmp-*"))
    assert (base / "models.config").read_bytes() == config_text


def test_warmup_handed_to_export_equals_the_rows_it_would_read(exported, full_run, synthetic_warmup):
    """``export_run(..., warmup=warmup_batches(config, frame))`` writes what reading the log writes: the same rows."""
    from ranking.warmup import warmup_rows

    read = warmup_rows(SimpleNamespace(config=full_run.config))
    assert len(read) == len(synthetic_warmup) == len(WARMUP_SIZES)
    for got, want in zip(synthetic_warmup, read, strict=True):
        assert set(got) == set(want) == {f.name for f in full_run.config.serving_features}
        for name in want:
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    records = [prediction_log_pb2.PredictionLog.FromString(r.numpy()) for r in
               tf.data.TFRecordDataset(str(exported[1] / "assets.extra" / "tf_serving_warmup_requests"))]
    first = records[len(WARMUP_SIZES) - 1].predict_log.request.inputs  # serving_default, the largest batch
    for name, values in read[-1].items():
        sent = tf.make_ndarray(first[name])
        np.testing.assert_array_equal(sent, np.array([v.encode() for v in values]) if values.dtype == object
                                      else values, err_msg=name)


def test_warmup_rows_come_from_kept_days_and_encode_non_ascii_strings(tmp_path):
    """The newest day is held out by ``data.until``: warmup rows come from the newest kept day instead, and a
    non-ASCII string value travels as its UTF-8 bytes (``astype(bytes)`` would raise UnicodeEncodeError)."""
    import synthetic

    from features.spec import parse_config
    from ranking.warmup import warmup_rows, write_warmup

    frame = synthetic.generate_log(8000, synthetic.PlantedTruth(), seed=5)  # ~1000 rows a day
    last = frame["day"].max()
    frame.loc[frame["day"] == last, "segment"] = "held_out"
    newest_kept = (frame["day"] == last - 1).to_numpy()
    frame.loc[newest_kept & (np.arange(len(frame)) % 2 == 0), "segment"] = "música"
    path = synthetic.write_log(frame, tmp_path / "log.csv")
    data = synthetic.config(path, ["segment", "user_id"], ["click"]).model_dump()
    data["data"]["until"] = int(last - 1)
    config = parse_config(data, source="test")

    batches = warmup_rows(SimpleNamespace(config=config))
    assert [len(b["segment"]) for b in batches] == list(WARMUP_SIZES)
    served = set(np.concatenate([b["segment"] for b in batches]))
    assert "held_out" not in served
    assert served <= set(frame.loc[newest_kept, "segment"]) and "música" in served

    path = tmp_path / "warmup"
    write_warmup(path, batches, config.name, config)
    records = [prediction_log_pb2.PredictionLog.FromString(r.numpy()) for r in tf.data.TFRecordDataset(str(path))]
    named = [r.predict_log.request.inputs for r in records if "segment" in r.predict_log.request.inputs]
    sent = np.concatenate([tf.make_ndarray(inputs["segment"]) for inputs in named])
    assert "música".encode() in set(sent.tolist())
    packed = [r.predict_log.request.inputs for r in records if "candidates_string" in r.predict_log.request.inputs]
    assert len(named) == 2 * len(packed) == 2 * len(WARMUP_SIZES)  # serving_default, rank_candidates, packed
    assert "música".encode() in set(np.concatenate([tf.make_ndarray(p["candidates_string"]).ravel()
                                                    for p in packed]).tolist())


def test_refit_metadata_says_whose_metrics_it_carries(full_run):
    """A refit model trained on its validation days: its metadata's metrics are the run before refit, and say so."""
    from dataclasses import replace

    from ranking.export import metadata

    run = load_run(full_run.run_dir)
    assert "before refit" not in metadata(run, 1, full_run.run_dir)["metrics_from"]
    refit = metadata(replace(run, artifacts={**run.artifacts, "refit": True}), 1, full_run.run_dir)
    assert refit["metrics"] == run.metrics["tasks"]
    assert refit["metrics_from"].startswith("validation run before refit")


def test_predict_request_sends_non_ascii_strings_as_utf8():
    request = predict_request({"segment": np.array(["música", "news", ""], dtype=object),
                                              "quality": np.array([0.5, 1.0, 2.0], np.float32)}, "m")
    assert tf.make_ndarray(request.inputs["segment"]).tolist() == ["música".encode(), b"news", b""]
    np.testing.assert_array_equal(tf.make_ndarray(request.inputs["quality"]), [0.5, 1.0, 2.0])


def test_staged_version_is_atomic_and_refuses_existing_versions(tmp_path):
    """The ranker's and the retrieval index's exports publish through ``staged_version``."""
    from ranking.servable import staged_version

    base = tmp_path / "models"
    (base / "3").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="3"), staged_version(base, 3):
        pass
    with pytest.raises(RuntimeError, match="half-written"), staged_version(base) as (version, tmp):
        assert version == 4 and tmp.parent == base and not (base / "4").exists()
        (tmp / "saved_model.pb").write_bytes(b"x")
        raise RuntimeError("half-written")
    assert sorted(p.name for p in base.iterdir()) == ["3"]
    with staged_version(base) as (version, tmp):
        (tmp / "saved_model.pb").write_bytes(b"x")
    assert (base / "4" / "saved_model.pb").read_bytes() == b"x" and (base / "4").stat().st_mode & 0o777 == 0o755
    assert sorted(p.name for p in base.iterdir()) == ["3", "4"]


def test_a_run_trained_from_shards_takes_its_warmup_rows_there_without_reading_the_log(full_run, monkeypatch):
    """``full_run`` trained on the feature pipeline's shards: its warmup rows come from them (the log is never read:
    at 10M rows that read peaked at 8.8 GB), and every row sent is a logged row of the newest kept day."""
    import ranking.warmup
    from features.logs import read_log, time_split
    from ranking.warmup import warmup_rows

    run = load_run(full_run.run_dir)
    assert run.artifacts.get("examples"), "full_run did not train from the pipeline's shards"
    frame = read_log(full_run.config.data)
    _, newest = time_split(frame, full_run.config)
    col = full_run.config.data.time_column
    logged = raw_inputs(newest[newest[col] == newest[col].max()].reset_index(drop=True),
                        full_run.config.serving_features)
    names = sorted(logged)

    def rows(batch: dict[str, np.ndarray]) -> set[tuple]:
        return set(zip(*[[repr(v) for v in batch[name].tolist()] for name in names], strict=True))

    def no_log(*args, **kwargs):
        raise AssertionError("warmup_rows read the log")

    monkeypatch.setattr(ranking.warmup, "read_log", no_log)
    batches = warmup_rows(run)
    assert [len(b[names[0]]) for b in batches] == list(WARMUP_SIZES)
    for batch in batches:
        assert {k: v.dtype for k, v in batch.items()} == {k: v.dtype for k, v in logged.items()}
        assert rows(batch) <= rows(logged)
    assert len(rows(batches[-1])) > WARMUP_SIZES[-1] // 2  # sampled, not one row repeated
