"""Export a training run as a versioned SavedModel for TensorFlow Serving.

    <model_base_path>/
        models.config                       # TF Serving model config (text proto) naming this base path
        <version>/saved_model.pb, variables/
        <version>/assets.extra/rankstage_metadata.json
        <version>/assets.extra/tf_serving_warmup_requests   # TFRecord of PredictionLog from real logged rows

Signature ``serving_default``: one (C,) tensor per serving feature, raw logged values (C candidates), and one (C,)
output per task: probabilities (not yet corrected for down-sampling: see metadata ``sampling``), watch time in
seconds, completion in [0, 1].

Signature ``rank_candidates``: the same outputs, but the request's user and context features come once as (1,)
tensors and only the item features as (C,). The graph encodes the request side once and computes its share of the
first shared-bottom layer once, ``W·[u; i] + b = W_u·u + (W_i·i + b)``, broadcast to the C candidates. It is left
out (and metadata ``omitted_signatures`` says why) when the model has no user/context or no item feature, or no
shared bottom layer to split.

Signature ``rank_candidates_packed``: ``rank_candidates`` with its inputs packed by side and dtype, e.g.
``request_int64`` (1, k) and ``candidates_float32`` (C, k), unstacked in the graph (metadata ``packed_inputs`` lists
each group's columns; ``ranking.servable.pack_inputs`` builds them). The in-process backend calls it: six eager
tensors per call instead of one per feature.

A version is written to a temporary directory, reloaded and checked (against the in-memory model, and
``rank_candidates`` against ``serving_default``), and only then renamed into place, so a bad export never becomes a
servable version.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

from features.spec import RankstageConfig
from ranking.runs import LoadedRun, load_run
from ranking.servable import METADATA_FILE, RANK_CANDIDATES_PACKED, WARMUP_FILE, pack_inputs, staged_version
from ranking.signatures import (
    RANK_CANDIDATES,
    SERVING_DEFAULT,
    Packed,
    candidate_features,
    input_signature,
    packed_layout,
    packed_signature,
    rank_candidates_omitted,
    rank_candidates_signature,
    request_features,
    split_request,
)
from ranking.user_side import UserSide
from ranking.warmup import warmup_rows, write_warmup


def endpoints(serve: keras.Model, config: RankstageConfig
              ) -> dict[str, tuple[Callable[[dict], dict], dict[str, tf.TensorSpec]]]:
    """Signature name -> (function of one input dict, its input signature): what ``export_run`` writes."""
    out = {SERVING_DEFAULT: (lambda inputs: serve(inputs, training=False), input_signature(config))}
    if rank_candidates_omitted(config) is None:
        side = UserSide.of(serve, config)
        out[RANK_CANDIDATES] = (side, rank_candidates_signature(config))
        out[RANK_CANDIDATES_PACKED] = (Packed(side, packed_layout(config)), packed_signature(config))
    return out


def models_config_text(name: str, base_path: Path) -> str:
    """TF Serving --model_config_file contents for one model at ``base_path`` (latest version served)."""
    cfg = model_server_config_pb2.ModelServerConfig()
    model = cfg.model_config_list.config.add()
    model.name, model.base_path, model.model_platform = name, str(base_path.resolve()), "tensorflow"
    model.model_version_policy.latest.num_versions = 2
    return text_format.MessageToString(cfg)


METRICS_FROM_THIS_MODEL = "this model on its validation periods"
METRICS_FROM_WARM_START = "none: a warm start trains on its new days without a validation day (judge the next day)"
METRICS_FROM_REFIT = ("validation run before refit (the refit model trained on the validation periods too, so it has "
                      "no held-out metrics of its own)")


def metadata(run: LoadedRun, version: int, run_dir: Path) -> dict:
    cfg = run.config
    signatures: dict[str, dict] = {SERVING_DEFAULT: {"inputs": [f.name for f in cfg.serving_features]}}
    omitted = rank_candidates_omitted(cfg)
    if omitted is None:
        signatures[RANK_CANDIDATES] = {"request_inputs": request_features(cfg),
                                       "candidate_inputs": candidate_features(cfg)}
        signatures[RANK_CANDIDATES_PACKED] = {"packed_inputs": packed_layout(cfg)}
    return {
        "model_name": cfg.name,
        "version": version,
        "exported_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "run": str(run_dir),
        "signature": SERVING_DEFAULT,
        "signatures": signatures,
        **({"omitted_signatures": {RANK_CANDIDATES: omitted}} if omitted else {}),
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
        "metrics_from": (METRICS_FROM_WARM_START if run.artifacts.get("lineage") else METRICS_FROM_REFIT
                         if run.artifacts.get("refit") else METRICS_FROM_THIS_MODEL),
        **({"lineage": run.artifacts["lineage"]} if run.artifacts.get("lineage") else {}),
        "feature_spec": cfg.model_dump(),
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__},
    }


def export_run(run_dir: str | Path, model_base_path: str | Path, version: int | None = None,
               log: str | None = None, verbose: bool = True, warmup: list[dict[str, np.ndarray]] | None = None
               ) -> Path:
    """Export ``run_dir`` to ``model_base_path/<version>``; returns the version directory. ``warmup``: the warmup
    batches (raw serving inputs, (C,) per feature; the last one checks the export) as ``ranking.warmup`` builds
    them, so a caller holding the log need not have it read again; None reads them from ``log`` (else ``data.log``)."""
    run_dir, base = Path(run_dir), Path(model_base_path)
    run = load_run(run_dir)
    serve = run.models.serve

    archive = keras.export.ExportArchive()
    archive.track(serve)
    signatures = endpoints(serve, run.config)
    for name, (fn, spec) in signatures.items():
        archive.add_endpoint(name, fn, input_signature=[spec])
    with staged_version(base, version) as (version, tmp):
        archive.write_out(str(tmp), verbose=False)
        batches = warmup_rows(run, log) if warmup is None else warmup
        write_warmup(tmp / "assets.extra" / WARMUP_FILE, batches, run.config.name, run.config)
        (tmp / "assets.extra" / METADATA_FILE).write_text(json.dumps(metadata(run, version, run_dir), indent=2))
        check_export(tmp, serve, batches[-1], run.config)
    final = base / str(version)
    config_path = base / "models.config"
    staged = base / ".models.config.tmp"
    staged.write_text(models_config_text(run.config.name, base))
    staged.replace(config_path)
    if verbose:
        print(f"exported {run_dir} -> {final} (signatures {list(signatures)}, {len(run.config.serving_features)} "
              f"inputs, outputs {[t.name for t in run.config.tasks]})")
    return final


def check_export(path: Path, serve: keras.Model, batch: dict[str, np.ndarray],
                 config: RankstageConfig | None = None, atol: float = 1e-4) -> None:
    """Reload the SavedModel and compare ``serving_default`` with the in-memory model on ``batch`` (C rows); with
    ``config``, also ``rank_candidates`` (if the config has one) against ``serving_default`` on the same rows: the
    first row's user/context values, repeated C times for serving_default (within 1e-5). Raise if any differ."""
    signatures = tf.saved_model.load(str(path)).signatures
    got = signatures[SERVING_DEFAULT](**{k: tf.constant(v) for k, v in batch.items()})
    want = serve({k: tf.constant(v) for k, v in batch.items()}, training=False)
    _compare(got, want, "reloaded model disagrees with the trained model", rtol=1e-4, atol=atol)
    if config is None or rank_candidates_omitted(config) is not None:
        return
    if RANK_CANDIDATES not in signatures:
        raise RuntimeError(f"export check failed: signature {RANK_CANDIDATES!r} missing (has {sorted(signatures)})")
    ranked, repeated = split_request(batch, config)
    got = signatures[RANK_CANDIDATES](**{k: tf.constant(v) for k, v in ranked.items()})
    want = signatures[SERVING_DEFAULT](**{k: tf.constant(v) for k, v in repeated.items()})
    _compare(got, want, f"{RANK_CANDIDATES} disagrees with {SERVING_DEFAULT}", rtol=1e-5, atol=1e-5)
    if RANK_CANDIDATES_PACKED not in signatures:
        raise RuntimeError(f"export check failed: signature {RANK_CANDIDATES_PACKED!r} missing")
    packed = pack_inputs(packed_layout(config), ranked)
    packed_out = signatures[RANK_CANDIDATES_PACKED](**{k: tf.constant(v) for k, v in packed.items()})
    _compare(packed_out, got, f"{RANK_CANDIDATES_PACKED} disagrees with {RANK_CANDIDATES}", rtol=1e-6, atol=1e-6)


def _compare(got: dict, want: dict, what: str, rtol: float, atol: float) -> None:
    if set(got) != set(want):
        raise RuntimeError(f"export check failed: outputs {sorted(got)} != {sorted(want)} ({what})")
    for task, w in want.items():
        g, w = np.asarray(got[task]), np.asarray(w)
        if g.shape != w.shape or not np.all(np.isfinite(g)) or not np.allclose(g, w, rtol=rtol, atol=atol):
            raise RuntimeError(f"export check failed for output {task!r}: {what} "
                               f"(max diff {np.max(np.abs(g - w)) if g.shape == w.shape else 'shape'})")
