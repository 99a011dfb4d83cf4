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
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from google.protobuf import text_format
from keras import ops
from tensorflow_serving.apis import predict_pb2, prediction_log_pb2
from tensorflow_serving.config import model_server_config_pb2

from features.encoding import tf_dtype
from features.logs import raw_inputs, read_log, time_split
from features.spec import RankstageConfig
from ranking.servable import (
    METADATA_FILE,
    RANK_CANDIDATES_PACKED,
    WARMUP_FILE,
    latest_version,
    load_metadata,
    pack_inputs,
    staged_version,
)
from ranking.train import LoadedRun, load_run

__all__ = ["export_run", "check_export", "input_signature", "rank_candidates_signature", "split_request",
           "UserSide", "latest_version", "load_metadata", "predict_request", "matmul_flops", "packed_layout",
           "RANK_CANDIDATES_PACKED"]

WARMUP_SIZES = (1, 10, 100, 500)
SERVING_DEFAULT = "serving_default"
RANK_CANDIDATES = "rank_candidates"
REQUEST_GROUPS = ("user", "context")  # features sent once per request by rank_candidates


def input_signature(config: RankstageConfig) -> dict[str, tf.TensorSpec]:
    return {f.name: tf.TensorSpec([None], tf_dtype(f), name=f.name) for f in config.serving_features}


def request_features(config: RankstageConfig) -> list[str]:
    """Serving features sent once per request (user and context groups), in serving order."""
    return [f.name for f in config.serving_features if f.group in REQUEST_GROUPS]


def candidate_features(config: RankstageConfig) -> list[str]:
    """Serving features sent once per candidate (item group), in serving order."""
    return [f.name for f in config.serving_features if f.group not in REQUEST_GROUPS]


def rank_candidates_signature(config: RankstageConfig) -> dict[str, tf.TensorSpec]:
    """Inputs of ``rank_candidates``: (1,) per user/context feature, (C,) per item feature."""
    request = set(request_features(config))
    return {f.name: tf.TensorSpec([1] if f.name in request else [None], tf_dtype(f), name=f.name)
            for f in config.serving_features}


def packed_layout(config: RankstageConfig) -> dict[str, list[str]]:
    """``rank_candidates`` inputs grouped by side and dtype, in serving order: {"request_int64": [names], ...,
    "candidates_string": [names]} (only non-empty groups)."""
    request = set(request_features(config))
    layout: dict[str, list[str]] = {}
    for name, spec in rank_candidates_signature(config).items():
        layout.setdefault(f"{'request' if name in request else 'candidates'}_{spec.dtype.name}", []).append(name)
    return layout


def packed_signature(config: RankstageConfig) -> dict[str, tf.TensorSpec]:
    """Inputs of ``rank_candidates_packed``: (1, k) per request group, (C, k) per candidate group."""
    specs = rank_candidates_signature(config)
    return {g: tf.TensorSpec([1 if g.startswith("request_") else None, len(names)], specs[names[0]].dtype, name=g)
            for g, names in packed_layout(config).items()}


@dataclass(frozen=True)
class Packed:
    """``rank_candidates`` behind packed inputs: each (B, k) group unstacked into its k named (B,) columns."""

    inner: Callable[[dict], dict]
    layout: dict[str, list[str]]

    def __call__(self, packed: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        inputs: dict[str, tf.Tensor] = {}
        for group, names in self.layout.items():
            inputs.update(zip(names, tf.unstack(packed[group], num=len(names), axis=1)))
        return self.inner(inputs)


def rank_candidates_omitted(config: RankstageConfig) -> str | None:
    """Why ``rank_candidates`` cannot be exported for this model, or None if it can."""
    bottom = {f.name for f in config.bottom_features}  # not the bias tower's device, not tower-only features
    if not [n for n in request_features(config) if n in bottom]:
        return "the model has no user or context feature in its shared bottom: nothing to compute once per request"
    if not [n for n in candidate_features(config) if n in bottom]:
        return "the model has no item feature in its shared bottom: every input is per request"
    if not config.model.bottom_units:
        return "model.bottom_units is empty: no shared first dense layer to split into user and item parts"
    return None


def split_request(batch: dict[str, np.ndarray], config: RankstageConfig, row: int = 0
                  ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """C rows of serving inputs -> (rank_candidates inputs: row ``row``'s user/context values as (1,) and the C
    item columns, the same as serving_default inputs: that row's user/context values repeated C times)."""
    request = set(request_features(config))
    n = len(next(iter(batch.values())))
    ranked = {k: v[row:row + 1] if k in request else v for k, v in batch.items()}
    repeated = {k: np.repeat(v[row:row + 1], n) if k in request else v for k, v in batch.items()}
    return ranked, repeated


@dataclass(frozen=True)
class UserSide:
    """The serving model cut for ``rank_candidates``; every layer and weight is the serving model's own.

    C candidates, D_u / D_i encoded widths of the request / candidate features, H first bottom layer's width.
    ``first`` is the first shared-bottom Dense (kernel (D_u + D_i, H), rows in the ``features`` concatenation order);
    ``request_rows`` / ``candidate_rows`` are its kernel rows of the request / candidate features' slots. Features
    routed to towers only (``towers``) are encoded apart (request ones once, broadcast over C) and fed to ``rest``.
    """

    request_encoder: keras.Model  # {name: (1,)} -> [(1, D_f)] per request feature
    candidate_encoder: keras.Model  # {name: (C,)} -> [(C, D_f)] per candidate feature (inputs: theirs, and the ids
    # match features count)
    first: keras.layers.Dense
    request_rows: np.ndarray  # (D_u,) int
    candidate_rows: np.ndarray  # (D_i,) int
    rest: keras.Model  # (C, H) first layer's output [, (C,) bias lookup index per bias input] -> {task: (C,)}
    bias_lookups: tuple[tuple[str, keras.layers.Layer], ...] = ()  # (device, its lookup): request value, over C
    # tower-only features, fed to ``rest`` after the bias lookups: the request ones, then the candidate ones
    routed_request: keras.Model | None = None  # {name: (1,)} -> [(1, D_f)] per routed request feature
    routed_candidates: keras.Model | None = None  # {name: (C,)} -> [(C, D_f)] per routed candidate feature

    @classmethod
    def of(cls, serve: keras.Model, config: RankstageConfig) -> UserSide:
        """Cut ``serve`` (built by ``ranking.model.build_models``) at its first shared-bottom layer."""
        reason = rank_candidates_omitted(config)
        if reason is not None:
            raise ValueError(f"rank_candidates: {reason}")
        concat, first = serve.get_layer("features"), serve.get_layer("shared_bottom_0")
        if first.input is not concat.output:
            raise ValueError("rank_candidates: shared_bottom_0 does not read the 'features' concatenation")
        encoded = dict(zip([f.name for f in config.bottom_features], concat.input))  # name -> (B, D_f)
        routed_encoded = {}  # tower-only features: the tensors their towers' input concatenations read
        for t in config.tasks:
            names = [f.name for f in config.tower_features(t.name)]
            if names:
                routed_encoded.update(zip(names, serve.get_layer(f"{t.name}_tower_input").input[1:]))
        inputs = serve.input  # {name: (B,)}
        bias = tuple(f.name for f in config.serving_bias_features)  # read by the bias tower, not encoded
        lookups = {n: serve.get_layer("bias_device_lookup") for n in bias}  # device is the only served bias input
        request = [n for n in request_features(config) if n in encoded]
        candidates = [n for n in candidate_features(config) if n in encoded]
        routed_request = [n for n in request_features(config) if n in routed_encoded]
        routed_candidates = [n for n in candidate_features(config) if n in routed_encoded]
        routed = routed_request + routed_candidates  # ``rest``'s input order, as ``__call__`` feeds them
        rows, start = {}, 0
        for name, t in encoded.items():  # each encoding's width, from the graph
            rows[name] = np.arange(start, start + int(t.shape[-1]))
            start += int(t.shape[-1])
        if start != first.kernel.shape[0]:
            raise ValueError(f"rank_candidates: encoded widths sum to {start}, shared_bottom_0 kernel has "
                             f"{first.kernel.shape[0]} rows")

        def reads(names: list[str]) -> dict:
            """The raw inputs the encodings of ``names`` read: their own, and a match feature's candidate id."""
            extra = [f.match for f in config.features if f.name in names and f.match and f.match not in names]
            return {n: inputs[n] for n in [*names, *dict.fromkeys(extra)]}

        return cls(
            keras.Model(reads(request), [encoded[n] for n in request], name="request_encoder"),
            keras.Model(reads(candidates), [encoded[n] for n in candidates], name="candidate_encoder"),
            first,
            np.concatenate([rows[n] for n in request]).astype(np.int32),
            np.concatenate([rows[n] for n in candidates]).astype(np.int32),
            # cut at the bias lookups' outputs too: a cut mixing graph inputs with inner tensors breaks saving
            keras.Model([first.output, *(lookups[n].output for n in bias), *(routed_encoded[n] for n in routed)]
                        if bias or routed else first.output, serve.output, name="over_first_layer"),
            tuple((n, lookups[n]) for n in bias),
            keras.Model(reads(routed_request), [routed_encoded[n] for n in routed_request],
                        name="routed_request_encoder") if routed_request else None,
            keras.Model(reads(routed_candidates), [routed_encoded[n] for n in routed_candidates],
                        name="routed_candidate_encoder") if routed_candidates else None,
        )

    def __call__(self, inputs: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        """{user/context name: (1,), item name: (C,)} -> {task: (C,)}."""
        request = {n: inputs[n] for n in self.request_encoder.input}  # the encoders' own inputs (a match feature
        candidates = {n: inputs[n] for n in self.candidate_encoder.input}  # also reads its candidate id)
        u = _concat(self.request_encoder(request, training=False))  # (1, D_u)
        i = _concat(self.candidate_encoder(candidates, training=False))  # (C, D_i)
        kernel = self.first.kernel  # (D_u + D_i, H)
        user_part = ops.matmul(u, ops.take(kernel, self.request_rows, axis=0))  # (1, H), once per request
        item_part = ops.matmul(i, ops.take(kernel, self.candidate_rows, axis=0)) + self.first.bias  # (C, H)
        hidden = self.first.activation(item_part + user_part)  # (C, H), user part broadcast over C
        bias = [ops.broadcast_to(lookup(inputs[n]), ops.shape(hidden)[:1]) for n, lookup in self.bias_lookups]  # (C,)
        routed = []
        if self.routed_request is not None:  # (1, D_f) each, once per request, broadcast to (C, D_f)
            parts = _as_list(self.routed_request({n: inputs[n] for n in self.routed_request.input}, training=False))
            routed += [ops.broadcast_to(p, (ops.shape(hidden)[0], p.shape[-1])) for p in parts]
        if self.routed_candidates is not None:  # (C, D_f) each
            routed += _as_list(self.routed_candidates({n: inputs[n] for n in self.routed_candidates.input},
                                                      training=False))
        extra = [*bias, *routed]
        return self.rest([hidden, *extra] if extra else hidden, training=False)


def _as_list(parts) -> list:
    return list(parts) if isinstance(parts, list | tuple) else [parts]


def _concat(parts) -> tf.Tensor:
    parts = _as_list(parts)
    return parts[0] if len(parts) == 1 else ops.concatenate(parts, axis=-1)


def endpoints(serve: keras.Model, config: RankstageConfig
              ) -> dict[str, tuple[Callable[[dict], dict], dict[str, tf.TensorSpec]]]:
    """Signature name -> (function of one input dict, its input signature): what ``export_run`` writes."""
    out = {SERVING_DEFAULT: (lambda inputs: serve(inputs, training=False), input_signature(config))}
    if rank_candidates_omitted(config) is None:
        side = UserSide.of(serve, config)
        out[RANK_CANDIDATES] = (side, rank_candidates_signature(config))
        out[RANK_CANDIDATES_PACKED] = (Packed(side, packed_layout(config)), packed_signature(config))
    return out


def matmul_flops(graph: tf.Graph) -> int:
    """Multiply-add FLOPs (2 per multiply-add) of the MatMul / BatchMatMul / Einsum ops of a traced graph with
    static shapes. Gathers, lookups and elementwise ops are not counted."""
    total = 0
    for op in graph.get_operations():
        shapes = [list(t.shape) for t in op.inputs]
        if op.type == "MatMul":
            (m, k), (k2, n) = shapes[0], shapes[1]
            if op.get_attr("transpose_a"):
                m, k = k, m
            if op.get_attr("transpose_b"):
                n = k2
            total += 2 * m * k * n
        elif op.type in ("BatchMatMul", "BatchMatMulV2", "BatchMatMulV3"):
            k = shapes[0][-2] if op.get_attr("adj_x") else shapes[0][-1]
            total += 2 * int(np.prod(op.outputs[0].shape)) * k
        elif op.type == "Einsum":
            sizes: dict[str, int] = {}
            for labels, shape in zip(op.get_attr("equation").decode().split("->")[0].split(","), shapes):
                sizes.update(zip(labels, shape))
            total += 2 * int(np.prod(list(sizes.values())))
    return total


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
    batch per size."""
    cfg = run.config
    col = cfg.data.time_column
    _, newest = time_split(read_log(cfg.data, log), cfg)  # the validation periods: the newest kept ones
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


def models_config_text(name: str, base_path: Path) -> str:
    """TF Serving --model_config_file contents for one model at ``base_path`` (latest version served)."""
    cfg = model_server_config_pb2.ModelServerConfig()
    model = cfg.model_config_list.config.add()
    model.name, model.base_path, model.model_platform = name, str(base_path.resolve()), "tensorflow"
    model.model_version_policy.latest.num_versions = 2
    return text_format.MessageToString(cfg)


METRICS_FROM_THIS_MODEL = "this model on its validation periods"
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
        "metrics_from": METRICS_FROM_REFIT if run.artifacts.get("refit") else METRICS_FROM_THIS_MODEL,
        "feature_spec": cfg.model_dump(),
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__},
    }


def export_run(run_dir: str | Path, model_base_path: str | Path, version: int | None = None,
               log: str | None = None, verbose: bool = True) -> Path:
    """Export ``run_dir`` to ``model_base_path/<version>``; returns the version directory."""
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
        batches = warmup_rows(run, log)
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
