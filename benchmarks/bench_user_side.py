"""The user side once per request: ``rank_candidates`` against ``serving_default`` of one exported ranker.

C candidates. For each C, one real user of the model's newest day (its first impression's user and context
values) and C real logged items of that day (side tables joined). ``serving_default`` gets the user/context values
repeated C times, ``rank_candidates`` gets them once as (1,) tensors. Reported per C:
    FLOPs per candidate   MatMul/Einsum multiply-adds of each signature's function traced at C (from the run's
                          Keras serving model; gathers and lookups not counted)
    request bytes         size of the PredictRequest built by ``ranking.warmup.predict_request`` (packed
                          tensor_content for numbers, string_val for strings)
    p50 / p99 ms          in-process signature calls on tensors built once, outputs fetched to numpy; warmed up,
                          then timed round-robin in blocks so machine load hits both alike
and ratios rank_candidates / serving_default (< 1 is better), plus the max |difference| of the outputs.

Usage (from the project root, env active):
    python benchmarks/bench_user_side.py [--model models/ranker] [--out reports/bench_user_side.json]
Without --model (or if it does not exist) a tiny KuaiRand ranker is trained for 1 epoch (~1.5 min) and exported to a
temporary directory. A model exported before ``rank_candidates`` existed is re-exported from its run directory.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tensorflow as tf
from _report import write_report

from features.logs import raw_inputs, read_log
from features.spec import RankstageConfig, load_config, parse_config
from ranking.export import endpoints, export_run
from ranking.flops import matmul_flops
from ranking.servable import Servable, load_servable
from ranking.signatures import RANK_CANDIDATES, SERVING_DEFAULT, split_request
from ranking.warmup import predict_request

ROOT = Path(__file__).resolve().parent.parent
SIGNATURES = (SERVING_DEFAULT, RANK_CANDIDATES)
MATMUL_OPS = ("MatMul", "BatchMatMul", "BatchMatMulV2", "BatchMatMulV3", "Einsum")  # what matmul_flops counts
Batch = dict[str, np.ndarray]


def train_tiny(work: Path) -> Path:
    """A tiny KuaiRand ranker (1 epoch, narrow layers) exported under ``work``; returns the version directory."""
    import ranking.train

    data = load_config(ROOT / "configs" / "kuairand.yaml").model_dump()
    data["model"].update(bottom_units=[64, 32], num_experts=2, expert_units=[32], tower_units=[16])
    data["training"].update(epochs=1, batch_size=4096)
    data["data"] = {**data["data"], "log": str(ROOT / data["data"]["log"][0]),  # Apr 25-30
                    "joins": [{**j, "path": str(ROOT / j["path"])} for j in data["data"]["joins"]]}
    run_dir = ranking.train.train(parse_config(data, "kuairand tiny"), work / "run", verbose=False)
    return export_run(run_dir, work / "models", verbose=False)


def load_model(args: argparse.Namespace, work: Path) -> tuple[Servable, Path | None]:
    """The servable to time (with rank_candidates) and its training run directory (None if absent)."""
    if args.model and Path(args.model).exists():
        sv = load_servable(args.model)
        run = Path(args.run or sv.metadata.get("run", ""))
        if RANK_CANDIDATES not in sv.signatures:
            if not (run / "model.weights.h5").exists():
                raise SystemExit(f"{sv.version_dir} has no {RANK_CANDIDATES} signature and no run directory to "
                                 f"re-export (--run); omitted: {sv.metadata.get('omitted_signatures')}")
            print(f"{sv.version_dir} has no {RANK_CANDIDATES}: re-exporting {run} to {work}", flush=True)
            sv = load_servable(export_run(run, work / "models", verbose=False))
        return sv, run if (run / "model.weights.h5").exists() else None
    print(f"no model at {args.model!r}: training a tiny KuaiRand ranker in {work}", flush=True)
    sv = load_servable(train_tiny(work))
    return sv, Path(sv.metadata["run"])


def request_batches(config: RankstageConfig, sizes: list[int], seed: int) -> dict[int, tuple[Batch, Batch]]:
    """Per C: (rank_candidates inputs, serving_default inputs) of one real user and C real items of the newest day."""
    df = read_log(config.data)
    newest = df[df[config.data.time_column] == df[config.data.time_column].max()]
    out = {}
    for i, n in enumerate(sizes):
        rows = newest.sample(n=n, random_state=seed + i, replace=len(newest) < n).reset_index(drop=True)
        out[n] = split_request(raw_inputs(rows, config.serving_features), config)
    return out


def flops_per_candidate(run: Path, config: RankstageConfig, inputs: dict[str, Batch], n: int) -> dict[str, float]:
    """MatMul/Einsum FLOPs per candidate of each timed signature, traced at the shapes of its ``inputs``.

    A shape the trace leaves open (the behaviour sequence's events are reshaped to (-1, L, F), so their batch is
    unknown) is read from one call on ``inputs`` and set on the graph before counting."""
    from ranking.runs import load_run

    out = {}
    for name, (fn, spec) in endpoints(load_run(run).models.serve, config).items():
        if name not in inputs:
            continue
        names = sorted(spec)
        fixed = [tf.TensorSpec(np.shape(inputs[name][k]), spec[k].dtype, name=k) for k in names]
        traced = tf.compat.v1.wrap_function(lambda *a, fn=fn, names=names: fn(dict(zip(names, a))), fixed)
        graph = traced.graph
        open_ = [t for op in graph.get_operations() if op.type in MATMUL_OPS for t in (*op.inputs, *op.outputs)
                 if not t.shape.is_fully_defined()]
        if open_:
            with graph.as_default():
                shapes = [tf.shape(t) for t in open_]
            feeds = [graph.get_tensor_by_name(f"{k}:0") for k in names]
            measured = traced.prune(feeds, shapes)(*[tf.constant(inputs[name][k]) for k in names])
            for t, shape in zip(open_, measured):
                t.set_shape(shape.numpy().tolist())
        out[name] = matmul_flops(graph) / n
    return out


def timed_round_robin(calls: dict[str, Callable[[], object]], warmup: int, iters: int, block: int
                      ) -> dict[str, list[float]]:
    for call in calls.values():
        for _ in range(warmup):
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    while min(len(t) for t in times.values()) < iters:
        for name, call in calls.items():
            for _ in range(block):
                t0 = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - t0)
    return times


def bench(args: argparse.Namespace, work: Path) -> dict:
    t_start, load_start = time.perf_counter(), os.getloadavg()
    sv, run = load_model(args, work)
    batches = request_batches(sv.config, args.sizes, args.seed)
    sizes: dict[str, dict] = {}
    for n, (ranked, repeated) in batches.items():
        inputs = {RANK_CANDIDATES: ranked, SERVING_DEFAULT: repeated}
        tensors = {s: {k: tf.constant(v) for k, v in inputs[s].items()} for s in SIGNATURES}
        fns = {s: sv.signature(s) for s in SIGNATURES}
        calls = {s: (lambda s=s: {k: v.numpy() for k, v in fns[s](**tensors[s]).items()}) for s in SIGNATURES}
        outs = {s: calls[s]() for s in SIGNATURES}
        times = timed_round_robin(calls, args.warmup, args.iters, args.block)
        entry: dict = {"flops_per_candidate": flops_per_candidate(run, sv.config, inputs, n) if run else None}
        for s in SIGNATURES:
            ms = np.asarray(times[s]) * 1e3
            entry[s] = {"p50_ms": float(np.median(ms)), "p99_ms": float(np.percentile(ms, 99)), "calls": len(ms),
                        "request_bytes": predict_request(inputs[s], sv.name, s).ByteSize()}
        entry["ratio"] = {k: entry[RANK_CANDIDATES][k] / entry[SERVING_DEFAULT][k]
                          for k in ("p50_ms", "p99_ms", "request_bytes")}
        if entry["flops_per_candidate"]:
            f = entry["flops_per_candidate"]
            entry["ratio"]["flops_per_candidate"] = f[RANK_CANDIDATES] / f[SERVING_DEFAULT]
        entry["max_abs_diff"] = {t: float(np.max(np.abs(outs[RANK_CANDIDATES][t] - outs[SERVING_DEFAULT][t])))
                                 for t in sv.tasks}
        sizes[str(n)] = entry
        print(f"C={n}: done", flush=True)
    meta = sv.metadata["signatures"][RANK_CANDIDATES]
    return {"model": str(sv.version_dir), "run": str(run) if run else None,
            "request_inputs": len(meta["request_inputs"]), "candidate_inputs": len(meta["candidate_inputs"]),
            "settings": {k: getattr(args, k) for k in ("sizes", "warmup", "iters", "block", "seed")},
            "sizes": sizes, "machine": {"cpus": os.cpu_count(), "tensorflow": tf.__version__,
                                        "loadavg_start": load_start, "loadavg_end": os.getloadavg()},
            "seconds": round(time.perf_counter() - t_start, 1)}


def format_table(report: dict) -> str:
    lines = [f"model {report['model']}: {report['request_inputs']} user/context inputs once per request, "
             f"{report['candidate_inputs']} item inputs per candidate",
             "| C | FLOP/cand. default / rank | request bytes default / rank | p50 ms default / rank | "
             "p99 ms default / rank | ratio FLOP / bytes / p50 / p99 | max abs diff |",
             "|---|---|---|---|---|---|---|"]
    for n, e in report["sizes"].items():
        d, r, q = e[SERVING_DEFAULT], e[RANK_CANDIDATES], e["ratio"]
        f = e["flops_per_candidate"] or {}
        flops = f"{f[SERVING_DEFAULT]:,.0f} / {f[RANK_CANDIDATES]:,.0f}" if f else "n/a"
        lines.append(f"| {n} | {flops} | {d['request_bytes']:,} / {r['request_bytes']:,} | "
                     f"{d['p50_ms']:.2f} / {r['p50_ms']:.2f} | {d['p99_ms']:.2f} / {r['p99_ms']:.2f} | "
                     f"{q.get('flops_per_candidate', float('nan')):.3f} / {q['request_bytes']:.3f} / "
                     f"{q['p50_ms']:.3f} / {q['p99_ms']:.3f} | {max(e['max_abs_diff'].values()):.1e} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="models/ranker", help="model base path (newest version) or a version dir; "
                                                            "absent: train a tiny KuaiRand ranker")
    p.add_argument("--run", help="training run of the model (default: the metadata's 'run'), for FLOPs")
    p.add_argument("--sizes", type=int, nargs="+", default=[100, 500, 1000], help="candidates per call")
    p.add_argument("--warmup", type=int, default=20, help="untimed calls per signature and size")
    p.add_argument("--iters", type=int, default=200, help="timed calls per signature and size (at least)")
    p.add_argument("--block", type=int, default=5, help="consecutive calls of one signature per round-robin turn")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="reports/bench_user_side.json", help="JSON report path")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_user_side_") as work:
        report = bench(args, Path(work))
    write_report(report, format_table(report), args.out)


if __name__ == "__main__":
    main()
