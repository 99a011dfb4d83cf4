"""Warmup requests: PredictRequests of real logged rows, written to ``assets.extra/tf_serving_warmup_requests`` (a
TFRecord of PredictionLog) for TF Serving to run before a version takes traffic.

C rows per batch (one batch per size in ``WARMUP_SIZES``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

from features.logs import raw_inputs, read_log, time_split
from features.spec import ConfigError, RankstageConfig
from ranking.runs import LoadedRun
from ranking.servable import RANK_CANDIDATES_PACKED, pack_inputs
from ranking.signatures import RANK_CANDIDATES, packed_layout, rank_candidates_omitted, split_request

WARMUP_SIZES = (1, 10, 100, 500)


def predict_request(features: dict[str, np.ndarray], model_name: str, signature: str = "serving_default"
                    ) -> predict_pb2.PredictRequest:
    """A PredictRequest with one packed tensor per feature (tensor_content for numbers; strings as UTF-8 bytes)."""
    req = predict_pb2.PredictRequest()
    req.model_spec.name = model_name
    req.model_spec.signature_name = signature
    for name, values in features.items():
        arr = np.asarray(values)
        if arr.dtype == object or arr.dtype.kind == "U":
            arr = _utf8(arr)
        req.inputs[name].CopyFrom(tf.make_tensor_proto(arr))
    return req


def _utf8(arr: np.ndarray) -> np.ndarray:
    """(C,) str / bytes values -> (C,) object array of UTF-8 bytes, what a DT_STRING tensor holds. Not ``astype(bytes)``
    (ASCII only) nor a fixed-width "S" array (drops trailing NUL bytes)."""
    return np.array([v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in arr.ravel()],
                    dtype=object).reshape(arr.shape)


def warmup_rows(run: LoadedRun, log: str | None = None, sizes=WARMUP_SIZES) -> list[dict[str, np.ndarray]]:
    """Real logged rows of the newest period ``data.until`` keeps (never a held-out day), as raw serving inputs, one
    batch per size. From the feature pipeline's example shards the run trained on when its artifacts name them and
    no ``log`` is given (the log is not read again: at 10M rows reading it peaked at 8.8 GB), else from the log read
    from ``log`` (else ``data.log``)."""
    shards = (getattr(run, "artifacts", None) or {}).get("examples")
    if log is None and shards and (Path(shards) / "manifest.json").exists():
        return warmup_from_examples(run.config, Path(shards), sizes)
    return warmup_batches(run.config, read_log(run.config.data, log), sizes)


def warmup_from_examples(cfg: RankstageConfig, root: Path, sizes=WARMUP_SIZES, max_records: int = 20_000
                         ) -> list[dict[str, np.ndarray]]:
    """``warmup_batches`` from a feature pipeline's output ``root``: up to ``max_records`` records of the newest kept
    day (its shard files interleaved), C = min(size, records) of them sampled with seed i for the i-th size, as raw
    serving inputs (C,) per feature (strings decoded from UTF-8)."""
    from features.examples import read_columns
    from ranking.shards import read_layout

    layout = read_layout(root)
    days = layout.manifest.get("validation_days") or layout.manifest["train_days"]
    names = {f.name for f in cfg.serving_features}
    cols = [c for c in layout.columns if c.name in names]
    absent = names - {c.name for c in cols}
    if absent:
        raise ConfigError(f"--examples {root}: serving feature(s) {sorted(absent)} not in its schema.json")
    data = read_columns(layout.files([max(days)]), cols, batch_size=4096, limit=max_records)
    n = len(next(iter(data.values())))
    batches = []
    for i, size in enumerate(sizes):
        idx = np.sort(np.random.default_rng(i).choice(n, size=min(size, n), replace=False))
        batch = {}
        for f in cfg.serving_features:
            v = data[f.name][idx]
            batch[f.name] = (v if f.raw_dtype == "string" else
                             v.astype(np.int64) if f.raw_dtype == "int" else v.astype(np.float32))
        batches.append(batch)
    return batches


def warmup_batches(cfg: RankstageConfig, frame: pd.DataFrame, sizes=WARMUP_SIZES) -> list[dict[str, np.ndarray]]:
    """``warmup_rows`` of a log already read (``features.logs.read_log``): C = min(size, rows) rows of the newest
    period ``data.until`` keeps, sampled with seed i for the i-th size, as raw serving inputs (C,) per feature."""
    col = cfg.data.time_column
    _, newest = time_split(frame, cfg)  # the validation periods: the newest kept ones
    last = newest[newest[col] == newest[col].max()]
    batches = []
    for i, n in enumerate(sizes):
        rows = last.sample(n=min(n, len(last)), random_state=i, replace=len(last) < n)
        batches.append(raw_inputs(rows.reset_index(drop=True), cfg.serving_features))
    return batches


def write_warmup(path: Path, batches: list[dict[str, np.ndarray]], model_name: str,
                 config: RankstageConfig | None = None) -> None:
    """One serving_default record per batch; with ``config`` and a ``rank_candidates`` signature, then one
    rank_candidates and one rank_candidates_packed record per batch too: its first row's user/context values (one
    logged user) and its C items."""
    path.parent.mkdir(parents=True, exist_ok=True)
    requests = [predict_request(batch, model_name) for batch in batches]
    if config is not None and rank_candidates_omitted(config) is None:
        ranked = [split_request(batch, config)[0] for batch in batches]
        requests += [predict_request(r, model_name, RANK_CANDIDATES) for r in ranked]
        layout = packed_layout(config)
        requests += [predict_request(pack_inputs(layout, r), model_name, RANK_CANDIDATES_PACKED) for r in ranked]
    with tf.io.TFRecordWriter(str(path)) as writer:
        for request in requests:
            log = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
            writer.write(log.SerializeToString())
