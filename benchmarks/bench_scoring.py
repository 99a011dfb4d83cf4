"""Scoring latency of an exported ranker, in-process through its SavedModel ``serving_default`` signature.

C candidates per call (real logged rows of the newest day of the model's log), every output fetched to numpy.
Reports p50/p99 per C, FLOPs per candidate, achieved GFLOP/s against this machine's float32 matmul peak measured in
the same run, and variants as ratios of their p50 to the plain signature call's p50 (< 1 is faster).

Every variant, in this process or in a subprocess started beforehand, is timed round-robin in blocks of a few calls
(one process busy at a time), so load from elsewhere on this shared 2-core machine hits all variants alike:

    in this process
        signature_numpy      numpy arrays converted by the signature on every call (plain: tensors built once)
        keras_tf_function    the Keras serving model in a tf.function, no SavedModel
        xla_dense_split      preprocessing in a tf.function, then the dense part (bottom, MMoE, towers) in XLA
        part_preprocessing   the preprocessing alone (lookups, string split, embeddings, numerics)   [breakdown]
        part_dense           the dense part alone, fp32 / XLA                                          [breakdown]
    in subprocesses (settings fixed before TensorFlow initializes, or calls that may crash the process)
        threads_*            tf.config.threading intra/inter-op pool sizes; threads_default is the control
        onednn_off           TF_ENABLE_ONEDNN_OPTS=0
        xla_autoclustering   TF_XLA_FLAGS=--tf_xla_auto_jit=2 --tf_xla_cpu_global_jit
        xla_jit_signature    tf.function(jit_compile=True) around the reloaded signature
        xla_jit_keras        tf.function(jit_compile=True) around the Keras serving model
        bfloat16_keras       the Keras serving model rebuilt under the ``mixed_bfloat16`` policy

Usage (from the project root, env active):
    python benchmarks/bench_scoring.py [--model models/ranker] [--out reports/bench_scoring.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from _report import cpu_model, write_report

from features.logs import raw_inputs, read_log
from features.spec import RankstageConfig
from ranking.flops import matmul_flops
from ranking.layers.mmoe import MMoE
from ranking.servable import load_servable as load_version

Batch = dict[str, np.ndarray]
READY, TIMES = "BENCH_READY ", "BENCH_TIMES "  # worker -> parent line prefixes
BASELINE = "signature"
ENVIRONMENT_REFERENCE = {  # ENVIRONMENT.md: mid-size MMoE, ~1.5 MFLOP/candidate, signature call, p50 ms
    "flops_per_candidate": 1.5e6, "p50_ms": {100: 4.0, 500: 11.5, 1000: 17.5}, "peak_gflops": 150.0}


@dataclass(frozen=True)
class WorkerSpec:
    """A variant measured in its own process: what it calls and the settings fixed before TF initializes."""

    call: str  # "signature" | "xla_jit_signature" | "xla_jit_keras" | "keras"
    intra: int | None = None
    inter: int | None = None
    env: dict[str, str] = field(default_factory=dict)
    dtype_policy: str | None = None
    max_iters: int | None = None  # cap on timed calls per size (slow variants)
    note: str = ""


WORKERS: dict[str, WorkerSpec] = {
    "threads_default": WorkerSpec("signature", note="control: default pools in a fresh process"),
    "threads_intra1_inter1": WorkerSpec("signature", intra=1, inter=1),
    "threads_intra2_inter1": WorkerSpec("signature", intra=2, inter=1),
    "threads_intra1_inter2": WorkerSpec("signature", intra=1, inter=2),
    "onednn_off": WorkerSpec("signature", env={"TF_ENABLE_ONEDNN_OPTS": "0"}),
    "xla_autoclustering": WorkerSpec("signature",
                                     env={"TF_XLA_FLAGS": "--tf_xla_auto_jit=2 --tf_xla_cpu_global_jit"}),
    "xla_jit_signature": WorkerSpec("xla_jit_signature"),
    "xla_jit_keras": WorkerSpec("xla_jit_keras"),
    "bfloat16_keras": WorkerSpec("keras", dtype_policy="mixed_bfloat16", max_iters=30,
                                 note="Zen 3 has no AVX512-BF16: expected slower"),
}


# ----------------------------------------------------------------------------------------------------- inputs


@dataclass
class Servable:
    """The exported version, its config, and (if its run directory exists) the Keras serving model."""

    version_dir: Path
    config: RankstageConfig
    loaded: object  # the restored SavedModel: must outlive its signature (which only weakly holds the variables)
    signature: Callable[..., dict[str, tf.Tensor]]
    keras_serve: keras.Model | None
    run_dir: Path | None


def load_servable(model: str, run: str | None, with_keras: bool = True) -> Servable:
    """Load the SavedModel signature; rebuild the Keras serving model from ``run`` (default: the metadata's run)."""
    from ranking.runs import load_run

    sv = load_version(model)
    version_dir, meta, config, loaded = sv.version_dir, sv.metadata, sv.config, sv.loaded
    run_dir = Path(run or meta.get("run", ""))
    serve = None
    if with_keras and (run_dir / "model.weights.h5").exists():
        serve = load_run(run_dir).models.serve
    return Servable(version_dir, config, loaded, loaded.signatures["serving_default"], serve,
                    run_dir if serve is not None else None)


def candidate_batches(config: RankstageConfig, sizes: list[int], seed: int, log: str | None) -> dict[int, Batch]:
    """Per size C, C real logged rows of the newest period as raw serving inputs (C,) each."""
    df = read_log(config.data, log)
    col = config.data.time_column
    newest = df[df[col] == df[col].max()]
    out = {}
    for i, n in enumerate(sizes):
        rows = newest.sample(n=n, random_state=seed + i, replace=len(newest) < n).reset_index(drop=True)
        out[n] = raw_inputs(rows, config.serving_features)
    return out


def as_tensors(batch: Batch) -> dict[str, tf.Tensor]:
    return {k: tf.constant(v) for k, v in batch.items()}


def fetch(outputs: dict[str, tf.Tensor] | tf.Tensor) -> dict[str, np.ndarray] | np.ndarray:
    """Outputs to numpy, as a server must before answering (also forces any pending work)."""
    if isinstance(outputs, dict):
        return {k: np.asarray(v) for k, v in outputs.items()}
    return np.asarray(outputs)


def max_abs_diff(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> dict[str, float]:
    """Per output, max |got - want| (probabilities and ratios in [0, 1], watch time in seconds)."""
    return {k: float(np.max(np.abs(np.asarray(got[k], np.float64) - np.asarray(w, np.float64))))
            for k, w in want.items()}


# ------------------------------------------------------------------------------------------------------ FLOPs


def layer_flops(serve: keras.Model) -> dict[str, int]:
    """Multiply-add FLOPs per candidate of each matmul in the serving model, from its layers' weight shapes.

    Dense (D, U): 2*D*U. MMoE experts (E, D, H) per layer: 2*E*D*H; gates (T, D, E): 2*T*D*E; mixing: 2*T*E*H.
    Embedding gathers, lookups and elementwise ops are not counted.
    """
    out: dict[str, int] = {}
    for layer in serve.layers:
        if isinstance(layer, MMoE):
            for i, kernel in enumerate(layer.expert_kernels):
                e, d, h = kernel.shape
                out[f"{layer.name}/experts_{i}"] = 2 * e * d * h
            t, d, e = layer.gate_kernel.shape
            out[f"{layer.name}/gates"] = 2 * t * d * e
            out[f"{layer.name}/mixing"] = 2 * t * e * layer.expert_units[-1]
        elif isinstance(layer, keras.layers.Dense):
            d, u = layer.kernel.shape
            out[layer.name] = 2 * d * u
    return out


def graph_flops(serve: keras.Model, config: RankstageConfig, batch: int = 1000) -> dict[str, float]:
    """Cross-checks on the traced serving graph at a fixed batch: our count of MatMul/BatchMatMul/Einsum ops, and
    TensorFlow's v1 profiler (``float_operation``), which has no FLOP rule for Einsum. Both per candidate."""
    from features.encoding import tf_dtype

    spec = {f.name: tf.TensorSpec([batch], tf_dtype(f), name=f.name) for f in config.serving_features}
    graph = tf.function(lambda kw: serve(kw, training=False)).get_concrete_function(spec).graph
    counted = matmul_flops(graph)
    opts = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    opts["output"] = "none"
    level = tf.get_logger().level
    tf.get_logger().setLevel("ERROR")
    try:
        profiled = tf.compat.v1.profiler.profile(graph, options=opts).total_float_ops
    finally:
        tf.get_logger().setLevel(level)
    return {"graph_matmul_einsum": counted / batch, "tf_profiler_float_ops": profiled / batch}


# ----------------------------------------------------------------------------------------------------- timing


def summarize(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "mean_ms": float(ms.mean()), "calls": len(ms)}


def matmul_peak(n: int = 2048, repeats: int = 7) -> list[float]:
    """Seconds of each of ``repeats`` float32 (n, n) @ (n, n) products through TensorFlow (after one untimed)."""
    a = tf.random.normal([n, n], seed=1)
    b = tf.random.normal([n, n], seed=2)
    mm = tf.function(tf.linalg.matmul)
    np.asarray(mm(a, b)[0, 0])
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.asarray(mm(a, b)[0, 0])
        seconds.append(time.perf_counter() - t0)
    return seconds


def peak_report(n: int, samples: list[list[float]]) -> dict:
    """GFLOP/s of the median product over all samples (the peak used), of the best, and of each sample's median."""
    flop = 2.0 * n**3
    pooled = [t for sample in samples for t in sample]
    return {"n": n, "products": len(pooled), "gflops": flop / float(np.median(pooled)) / 1e9,
            "best_gflops": flop / min(pooled) / 1e9,
            "sample_gflops": [flop / float(np.median(sample)) / 1e9 for sample in samples]}


# ------------------------------------------------------------------------------------------------ in-process


def dense_split(serve: keras.Model) -> tuple[keras.Model, keras.Model] | None:
    """(preprocessing, dense) sub-models cut at the "features" concatenation, or None if the model has none."""
    try:
        features = serve.get_layer("features").output
    except ValueError:
        return None
    return keras.Model(serve.input, features, name="preprocessing"), keras.Model(features, serve.output, name="dense")


def in_process_calls(sv: Servable, batch: Batch) -> tuple[dict[str, Callable[[], object]], dict[str, dict]]:
    """Zero-argument calls per variant for one batch (plain first), and each end-to-end variant's max |diff| per
    output against the plain call."""
    tensors = as_tensors(batch)
    sig = sv.signature
    calls: dict[str, Callable[[], object]] = {
        BASELINE: lambda: fetch(sig(**tensors)),
        "signature_numpy": lambda: fetch(sig(**batch)),
    }
    if sv.keras_serve is not None:
        serve = sv.keras_serve
        keras_fn = tf.function(lambda kw: serve(kw, training=False))
        calls["keras_tf_function"] = lambda: fetch(keras_fn(tensors))
        split = dense_split(serve)
        if split is not None:
            pre, dense = split
            pre_fn = tf.function(lambda kw: pre(kw, training=False))
            dense_fn = tf.function(lambda h: dense(h, training=False))
            dense_xla = tf.function(lambda h: dense(h, training=False), jit_compile=True)
            encoded = pre_fn(tensors)
            calls["xla_dense_split"] = lambda: fetch(dense_xla(pre_fn(tensors)))
            calls["part_preprocessing"] = lambda: fetch(pre_fn(tensors))
            calls["part_dense"] = lambda: fetch(dense_fn(encoded))
            calls["part_dense_xla"] = lambda: fetch(dense_xla(encoded))
    want = calls[BASELINE]()
    diffs = {name: max_abs_diff(calls[name](), want) for name in calls if not name.startswith("part_")}
    return calls, diffs


# ------------------------------------------------------------------------------------------------ subprocess


def worker_call(spec: WorkerSpec, sv: Servable, tensors: dict[str, tf.Tensor]) -> Callable[[], object]:
    """The zero-argument call a WORKERS variant times."""
    sig = sv.signature
    if spec.call == "signature" and "TF_XLA_FLAGS" not in spec.env:
        return lambda: fetch(sig(**tensors))
    if spec.call in ("signature", "xla_jit_signature"):  # auto-clustering acts on tf.function graphs
        fn = tf.function(lambda kw: sig(**kw), jit_compile=spec.call == "xla_jit_signature")
    else:
        if sv.keras_serve is None:
            raise SystemExit("this variant needs the training run directory (--run); none found")
        serve = sv.keras_serve
        fn = tf.function(lambda kw: serve(kw, training=False), jit_compile=spec.call == "xla_jit_keras")
    return lambda: fetch(fn(tensors))


def timed(call: Callable[[], object], k: int) -> list[float]:
    """Seconds of each of ``k`` consecutive calls."""
    out = []
    for _ in range(k):
        t0 = time.perf_counter()
        call()
        out.append(time.perf_counter() - t0)
    return out


def worker_main(args: argparse.Namespace) -> None:
    """Serve one WORKERS variant to the parent over stdin/stdout.

    Prints ``READY {json}`` once loaded (after one call per size, so compile-time crashes happen before it), then
    answers each ``RUN <C> <k>`` line with ``TIMES [seconds, ...]`` of k calls until ``QUIT`` or end of input.
    """
    spec = WORKERS[args.worker]
    if spec.intra is not None:
        tf.config.threading.set_intra_op_parallelism_threads(spec.intra)
    if spec.inter is not None:
        tf.config.threading.set_inter_op_parallelism_threads(spec.inter)
    if spec.dtype_policy:
        keras.config.set_dtype_policy(spec.dtype_policy)
    sv = load_servable(args.model, args.run, with_keras=spec.call in ("keras", "xla_jit_keras"))
    calls, diffs = {}, {}
    for n, batch in candidate_batches(sv.config, args.sizes, args.seed, args.log).items():
        tensors = as_tensors(batch)
        calls[n] = worker_call(spec, sv, tensors)
        diffs[str(n)] = max_abs_diff(calls[n](), fetch(sv.signature(**tensors)))
    info = {"threads": {"intra": tf.config.threading.get_intra_op_parallelism_threads(),
                        "inter": tf.config.threading.get_inter_op_parallelism_threads()}, "max_abs_diff": diffs}
    print(READY + json.dumps(info), flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "QUIT":
            break
        print(TIMES + json.dumps(timed(calls[int(cmd[1])], int(cmd[2]))), flush=True)


class WorkerProcess:
    """Parent side of one worker: started at once, then driven call block by call block."""

    def __init__(self, name: str, args: argparse.Namespace) -> None:
        self.name, self.spec = name, WORKERS[name]
        cmd = [sys.executable, __file__, "--worker", name, "--model", args.model, "--seed", str(args.seed),
               "--sizes", *map(str, args.sizes)]
        cmd += ["--run", args.run] if args.run else []
        cmd += ["--log", args.log] if args.log else []
        self.stderr = tempfile.TemporaryFile(mode="w+")
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **self.spec.env}
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.stderr, text=True, bufsize=1)
        self.info: dict = {}
        self.failure: str | None = None

    def _read(self, prefix: str) -> str | None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(prefix):
                return line[len(prefix):]
        self.proc.wait()
        self.stderr.seek(0)
        self.failure = "failed: " + _failure_reason(self.stderr.read(), self.proc.returncode)
        return None

    def wait_ready(self) -> bool:
        line = self._read(READY)
        if line is not None:
            self.info = json.loads(line)
        return line is not None

    def run(self, n: int, k: int) -> list[float] | None:
        """Seconds of k calls at size n, or None if the worker died (``failure`` says why)."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(f"RUN {n} {k}\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # it died: _read finds end of output and records why
        line = self._read(TIMES)
        return json.loads(line) if line is not None else None

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            try:
                self.proc.stdin.write("QUIT\n")
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.stderr.seek(0)
        self.xla_compiled = "Compiled cluster using XLA" in self.stderr.read()
        self.stderr.close()


def _failure_reason(stderr: str, returncode: int | None) -> str:
    """The most telling stderr line of a crashed worker: a failed CHECK, else the last error, else the last line."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    checks = [ln for ln in lines if "Check failed" in ln]
    errors = [ln for ln in lines if "Error" in ln]
    reason = checks[0] if checks else errors[-1] if errors else lines[-1] if lines else f"exit code {returncode}"
    return re.sub(r"^F\d{4} [\d:. ]+\d+ ", "", reason)[:300]


# ------------------------------------------------------------------------------------------------------ report


def format_table(report: dict) -> str:
    """Plain-text table: p50/p99 per size and the ratio of p50 to the plain signature call's p50."""
    sizes = report["sizes"]
    head = f"{'variant':<24}{'where':<11}" + "".join(f"{f'C={n} p50 / p99 ms':>22}{'ratio':>7}" for n in sizes)
    lines = [head, "-" * len(head)]
    for name, v in report["variants"].items():
        row = f"{name:<24}{v['where']:<11}"
        if v["status"] != "ok":
            lines.append(row + v["status"][:200])
            continue
        for n in sizes:
            s = v["sizes"][str(n)]
            row += f"{s['p50_ms']:>13.2f} / {s['p99_ms']:>6.2f}{s['ratio_p50']:>7.2f}"
        lines.append(row)
    f, peak = report["flops"], report["peak"]
    lines.append("")
    if f:
        lines.append(f"FLOPs per candidate: {f['per_candidate']:,.0f} from layer shapes (graph MatMul/Einsum count "
                     f"{f['graph_matmul_einsum']:,.0f}; TF profiler {f['tf_profiler_float_ops']:,.0f}: no Einsum rule)")
    lines.append(f"matmul peak ({peak['n']}^3 fp32, median of {peak['products']} products): {peak['gflops']:.1f} "
                 f"GFLOP/s (best {peak['best_gflops']:.1f}; per sample "
                 + ", ".join(f"{g:.0f}" for g in peak["sample_gflops"]) + ")")
    for n, e in report["efficiency"].items():
        line = (f"  C={n:<5} signature {e['gflops']:5.1f} GFLOP/s = {100 * e['fraction_of_peak']:3.0f}% of peak "
                f"({100 * e['fraction_of_best_peak']:3.0f}% of best)")
        if "dense_gflops" in e:
            line += (f";  dense part alone {e['dense_gflops']:5.1f} GFLOP/s = {100 * e['dense_fraction_of_peak']:3.0f}%"
                     f" ({100 * e['dense_fraction_of_best_peak']:3.0f}% of best)")
        lines.append(line)
    return "\n".join(lines)


def efficiency(report_flops: dict, variants: dict[str, dict], sizes: list[int], peak: dict) -> dict[str, dict]:
    """Per size, achieved GFLOP/s of the plain call (and of the dense part alone) and their fraction of the median
    matmul peak (and of the best matmul, a fairer yardstick when other processes share the cores)."""
    out = {}
    for n in sizes:
        work = report_flops["per_candidate"] * n
        e = {}
        for name, key in ((BASELINE, ""), ("part_dense", "dense_")):
            if name in variants:
                gflops = work / (variants[name]["sizes"][str(n)]["p50_ms"] / 1e3) / 1e9
                e.update({f"{key}gflops": gflops, f"{key}fraction_of_peak": gflops / peak["gflops"],
                          f"{key}fraction_of_best_peak": gflops / peak["best_gflops"]})
        out[str(n)] = e
    return out


def round_robin(runners: dict[str, Callable[[int, int], list[float] | None]], sizes: list[int], warmup: int,
                iters: int, block: int, max_iters: dict[str, int]) -> dict[str, dict[int, list[float]]]:
    """Per size: ``warmup`` untimed calls of each runner, then rounds of ``block`` timed calls of each in turn
    until each has ``iters`` (or its ``max_iters``). A runner returning None is dropped."""
    times: dict[str, dict[int, list[float]]] = {name: {} for name in runners}
    live = dict(runners)
    for n in sizes:
        for name, run in list(live.items()):
            if run(n, warmup) is None:
                del live[name]
        for name in live:
            times[name][n] = []
        while True:
            due = [name for name in live if len(times[name][n]) < min(iters, max_iters.get(name, iters))]
            if not due:
                break
            for name in due:
                got = live[name](n, block)
                if got is None:
                    del live[name]
                else:
                    times[name][n] += got
        print(f"C={n}: " + ", ".join(f"{k} {1e3 * np.median(t[n]):.2f}" for k, t in times.items() if n in t)
              + " ms (p50)", flush=True)
    return times


def bench(args: argparse.Namespace) -> dict:
    """The whole benchmark: start the subprocess variants, then time every variant round-robin per size (in-process
    ones and subprocess ones alike, one process busy at a time), with matmul peak samples before and after each size.
    """
    t_start, load_start = time.perf_counter(), os.getloadavg()
    workers = {name: WorkerProcess(name, args) for name in args.workers}
    sv = load_servable(args.model, args.run)
    if sv.keras_serve is None:
        print(f"note: no run directory at {args.run or 'the metadata run'}: FLOPs and Keras variants skipped",
              file=sys.stderr)
    batches = candidate_batches(sv.config, args.sizes, args.seed, args.log)
    in_calls: dict[str, dict[int, Callable[[], object]]] = {}
    diffs: dict[str, dict[str, dict]] = {}
    for n, batch in batches.items():
        calls, d = in_process_calls(sv, batch)
        for name, call in calls.items():
            in_calls.setdefault(name, {})[n] = call
            if name in d:
                diffs.setdefault(name, {})[str(n)] = d[name]
    ready = {name: w for name, w in workers.items() if w.wait_ready()}
    print(f"workers ready: {list(ready)}; failed at start: {[n for n in workers if n not in ready]} "
          f"({time.perf_counter() - t_start:.0f} s)", flush=True)
    peak_samples = [matmul_peak(args.matmul_n, args.matmul_repeats)]  # once startup is over

    runners: dict[str, Callable[[int, int], list[float] | None]] = {
        name: (lambda n, k, c=c: timed(c[n], k)) for name, c in in_calls.items()}
    runners.update({name: w.run for name, w in ready.items()})
    max_iters = {name: w.spec.max_iters for name, w in ready.items() if w.spec.max_iters}
    times: dict[str, dict[int, list[float]]] = {}
    for n in args.sizes:  # one size at a time, so a matmul peak sample sits between sizes
        for name, by_size in round_robin(runners, [n], args.warmup, args.iters, args.block, max_iters).items():
            times.setdefault(name, {}).update(by_size)
        peak_samples.append(matmul_peak(args.matmul_n, args.matmul_repeats))
    for w in workers.values():
        w.close()

    variants: dict[str, dict] = {}
    base = {n: summarize(times[BASELINE][n])["p50_ms"] for n in args.sizes}
    for name in [*in_calls, *workers]:
        w = workers.get(name)
        v: dict = {"where": "subprocess" if w else "in-process"}
        if w is not None:
            v.update(note=w.spec.note, xla_compiled=w.xla_compiled, threads=w.info.get("threads"))
            diffs[name] = w.info.get("max_abs_diff", {})
        if w is not None and w.failure:
            variants[name] = {**v, "status": w.failure}
            continue
        v["status"], v["sizes"] = "ok", {}
        for n in args.sizes:
            s = summarize(times[name][n])
            s["ratio_p50"] = s["p50_ms"] / base[n]
            if name in diffs:
                s["max_abs_diff"] = diffs[name][str(n)]
            v["sizes"][str(n)] = s
        variants[name] = v

    peak = peak_report(args.matmul_n, peak_samples)
    flops: dict = {}
    if sv.keras_serve is not None:
        per_layer = layer_flops(sv.keras_serve)
        flops = {"per_candidate": float(sum(per_layer.values())), "per_layer": per_layer,
                 "method": "layer weight shapes of the Keras serving model (Dense 2*D*U; MMoE experts 2*E*D*H, "
                           "gates 2*T*D*E, mixing 2*T*E*H)",
                 **graph_flops(sv.keras_serve, sv.config)}
    return {
        "model": str(sv.version_dir), "run": str(sv.run_dir) if sv.run_dir else None, "sizes": args.sizes,
        "baseline": BASELINE,
        "settings": {k: getattr(args, k) for k in ("warmup", "iters", "block", "seed", "matmul_n", "matmul_repeats")},
        "flops": flops, "peak": peak,
        "efficiency": efficiency(flops, variants, args.sizes, peak) if flops else {},
        "variants": variants, "environment_reference": ENVIRONMENT_REFERENCE,
        "machine": {"cpus": os.cpu_count(), "processor": cpu_model(), "python": platform.python_version(),
                    "tensorflow": tf.__version__, "keras": keras.__version__,
                    "loadavg_start": load_start, "loadavg_end": os.getloadavg()},
        "seconds": round(time.perf_counter() - t_start, 1),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="models/ranker", help="model base path (newest version) or a version dir")
    p.add_argument("--run", help="training run for the Keras serving model (default: the metadata's 'run')")
    p.add_argument("--log", help="log to draw candidates from (default: the model config's data.log)")
    p.add_argument("--sizes", type=int, nargs="+", default=[100, 500, 1000], help="candidates per call")
    p.add_argument("--warmup", type=int, default=10, help="untimed calls per variant and size")
    p.add_argument("--iters", type=int, default=100, help="timed calls per variant and size")
    p.add_argument("--block", type=int, default=5, help="consecutive calls of one variant per round-robin turn")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", nargs="*", default=list(WORKERS), choices=list(WORKERS), metavar="VARIANT",
                   help=f"subprocess variants (default: all of {', '.join(WORKERS)}; none: --workers alone)")
    p.add_argument("--matmul-n", type=int, default=2048, help="square matmul size for the peak")
    p.add_argument("--matmul-repeats", type=int, default=5, help="products per peak sample (before, between and "
                                                                     "after the sizes)")
    p.add_argument("--out", default="reports/bench_scoring.json", help="JSON report path")
    p.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker_main(args)
        return
    report = bench(args)
    write_report(report, format_table(report), args.out)


if __name__ == "__main__":
    main()
