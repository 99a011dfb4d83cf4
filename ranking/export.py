"""Export a training run as a versioned SavedModel for TensorFlow Serving.

    <model_base_path>/
        models.config                       # TF Serving model config (text proto) naming this base path
        <version>/saved_model.pb, variables/
        <version>/assets.extra/rankstage_metadata.json
        <version>/assets.extra/tf_serving_warmup_requests   # TFRecord of PredictionLog from real logged rows

Signature ``serving_default``: one (C,) tensor per serving feature, raw logged values (C candidates), and one (C,)
output per task: probabilities (not yet corrected for down-sampling: see metadata ``sampling``), watch time in
seconds, completion in [0, 1]. A version is written to a temporary directory, reloaded and checked against the
in-memory model, and only then renamed into place, so a bad export never becomes a servable version.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from google.protobuf import text_format
from tensorflow_serving.apis import predict_pb2, prediction_log_pb2
from tensorflow_serving.config import model_server_config_pb2

from features.encoding import tf_dtype
from features.logs import raw_inputs, read_log
from features.spec import RankstageConfig
from ranking.servable import METADATA_FILE, WARMUP_FILE, latest_version, load_metadata, next_version
from ranking.train import LoadedRun, load_run

__all__ = ["export_run", "check_export", "input_signature", "latest_version", "load_metadata", "predict_request"]

WARMUP_SIZES = (1, 10, 100, 500)


def input_signature(config: RankstageConfig) -> dict[str, tf.TensorSpec]:
    return {f.name: tf.TensorSpec([None], tf_dtype(f), name=f.name) for f in config.serving_features}


def predict_request(features: dict[str, np.ndarray], model_name: str, signature: str = "serving_default"
                    ) -> predict_pb2.PredictRequest:
    """A PredictRequest with one packed tensor per feature (tensor_content for numbers)."""
    req = predict_pb2.PredictRequest()
    req.model_spec.name = model_name
    req.model_spec.signature_name = signature
    for name, values in features.items():
        arr = np.asarray(values)
        if arr.dtype == object:
            arr = arr.astype(bytes)
        req.inputs[name].CopyFrom(tf.make_tensor_proto(arr))
    return req


def warmup_rows(run: LoadedRun, log: str | None = None, sizes=WARMUP_SIZES) -> list[dict[str, np.ndarray]]:
    """Real logged rows of the newest period, as raw serving inputs, one batch per size."""
    cfg = run.config
    df = read_log(cfg.data, log)
    last = df[df[cfg.data.time_column] == df[cfg.data.time_column].max()]
    batches = []
    for i, n in enumerate(sizes):
        rows = last.sample(n=min(n, len(last)), random_state=i, replace=len(last) < n)
        batches.append(raw_inputs(rows.reset_index(drop=True), cfg.serving_features))
    return batches


def write_warmup(path: Path, batches: list[dict[str, np.ndarray]], model_name: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(path)) as writer:
        for batch in batches:
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=predict_request(batch, model_name)))
            writer.write(log.SerializeToString())


def models_config_text(name: str, base_path: Path) -> str:
    """TF Serving --model_config_file contents for one model at ``base_path`` (latest version served)."""
    cfg = model_server_config_pb2.ModelServerConfig()
    model = cfg.model_config_list.config.add()
    model.name, model.base_path, model.model_platform = name, str(base_path.resolve()), "tensorflow"
    model.model_version_policy.latest.num_versions = 2
    return text_format.MessageToString(cfg)


def metadata(run: LoadedRun, version: int, run_dir: Path) -> dict:
    cfg = run.config
    return {
        "model_name": cfg.name,
        "version": version,
        "exported_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "run": str(run_dir),
        "signature": "serving_default",
        "inputs": [{"name": f.name, "dtype": f.raw_dtype, "group": f.group, "kind": f.kind}
                   for f in cfg.serving_features],
        "outputs": [{"task": t.name, "type": t.type,
                     "unit": {"binary": "probability", "watch_time": "seconds", "completion": "ratio"}[t.type]}
                    for t in cfg.tasks],
        "sampling": run.artifacts["sampling"],
        "training_window": {"periods": run.artifacts["train_periods"],
                            "validation_periods": run.artifacts["validation_periods"],
                            "refit": run.artifacts["refit"], "epochs": run.artifacts["best_epoch"]},
        "metrics": run.metrics.get("tasks", {}),
        "feature_spec": cfg.model_dump(),
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__},
    }


def export_run(run_dir: str | Path, model_base_path: str | Path, version: int | None = None,
               log: str | None = None, verbose: bool = True) -> Path:
    """Export ``run_dir`` to ``model_base_path/<version>``; returns the version directory."""
    run_dir, base = Path(run_dir), Path(model_base_path)
    run = load_run(run_dir)
    base.mkdir(parents=True, exist_ok=True)
    version = version or next_version(base)
    final = base / str(version)
    if final.exists():
        raise FileExistsError(f"--version {version}: {final} already exists; versions are immutable")
    tmp = base / f".tmp-{version}"
    shutil.rmtree(tmp, ignore_errors=True)
    serve = run.models.serve

    archive = keras.export.ExportArchive()
    archive.track(serve)
    archive.add_endpoint("serving_default", lambda inputs: serve(inputs, training=False),
                         input_signature=[input_signature(run.config)])
    try:
        archive.write_out(str(tmp), verbose=False)
        batches = warmup_rows(run, log)
        write_warmup(tmp / "assets.extra" / WARMUP_FILE, batches, run.config.name)
        (tmp / "assets.extra" / METADATA_FILE).write_text(json.dumps(metadata(run, version, run_dir), indent=2))
        check_export(tmp, serve, batches[-1])
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tmp.rename(final)
    config_path = base / "models.config"
    staged = base / ".models.config.tmp"
    staged.write_text(models_config_text(run.config.name, base))
    staged.replace(config_path)
    if verbose:
        print(f"exported {run_dir} -> {final} (signature serving_default, {len(run.config.serving_features)} "
              f"inputs, outputs {[t.name for t in run.config.tasks]})")
    return final


def check_export(path: Path, serve: keras.Model, batch: dict[str, np.ndarray], atol: float = 1e-4) -> None:
    """Reload the SavedModel and compare its outputs with the in-memory model; raise if they differ."""
    fn = tf.saved_model.load(str(path)).signatures["serving_default"]
    got = fn(**{k: tf.constant(v) for k, v in batch.items()})
    want = serve({k: tf.constant(v) for k, v in batch.items()}, training=False)
    for task, w in want.items():
        g, w = np.asarray(got[task]), np.asarray(w)
        if g.shape != w.shape or not np.all(np.isfinite(g)) or not np.allclose(g, w, rtol=1e-4, atol=atol):
            raise RuntimeError(f"export check failed for output {task!r}: reloaded model disagrees with the trained "
                               f"model (max diff {np.max(np.abs(g - w)) if g.shape == w.shape else 'shape'})")
