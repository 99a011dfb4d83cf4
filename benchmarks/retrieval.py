"""Top-K retrieval latency: brute force vs ScaNN, per query, over the real catalog and 1M synthetic items.

For each item set: index build time, p50 / p99 milliseconds per single-query call, and ScaNN's recall@K relative
to brute force (|ScaNN top K ∩ exact top K| / K, averaged over queries). Brute force and ScaNN are timed
round-robin in blocks in the same run, so load from elsewhere on this shared machine hits both alike; ratios are
ScaNN / brute force (< 1 is faster).

    exported      the version's two SavedModels end to end (raw query features -> query tower -> index), i.e. what
                  a server calls; real test queries
    real          the index alone over the version's item embeddings (query embeddings in)
    synthetic_1M  the index alone over 1M items drawn around the real item embeddings (real item + Gaussian noise of
                  0.5 x the per-dimension std), real query embeddings

Brute force is ``tfrs.layers.factorized_top_k.BruteForce``; ScaNN is ``scann.scann_ops`` (the TF ops the exported
ScaNN index uses): a k-means tree with ~sqrt(I) leaves trained on at most 100k items, asymmetric hashing, and exact
re-scoring of the best ``--reorder`` candidates.

Usage (from the project root; needs an export, e.g. `rankstage retrieval export --run runs/retrieval_ml100k
--model-base-path models/retrieval`):
    python benchmarks/retrieval.py [--model models/retrieval] [--out benchmarks/results/retrieval.json]
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # TFRS runs on tf-keras (ENVIRONMENT.md)
# this file is named like the project's ``retrieval`` package: put the project root before benchmarks/
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_recommenders as tfrs  # noqa: E402
from _report import cpu_model, write_report  # noqa: E402
from scann.scann_ops.py import scann_ops  # noqa: E402

from ranking.servable import resolve_version  # noqa: E402
from retrieval.data import build_data  # noqa: E402
from retrieval.export import EMBEDDINGS_FILE, METADATA_FILE, SCANN_DIR, read_embeddings  # noqa: E402
from retrieval.spec import parse_retrieval_config  # noqa: E402
from retrieval.train import embed, load_run, query_inputs  # noqa: E402

K = 100


def brute_force(items: np.ndarray, k: int) -> tuple[Callable, float]:
    start = time.perf_counter()
    layer = tfrs.layers.factorized_top_k.BruteForce(k=k)
    layer.index(tf.constant(items), tf.range(len(items), dtype=tf.int64))
    build = time.perf_counter() - start
    fn = tf.function(lambda q: layer(q)[1])
    return fn, build


def scann(items: np.ndarray, k: int, leaves_to_search: float, reorder: int) -> tuple[Callable, float, dict]:
    leaves = max(2, int(round(math.sqrt(len(items)))))
    settings = {"num_leaves": leaves, "num_leaves_to_search": max(1, int(math.ceil(leaves * leaves_to_search))),
                "training_sample_size": min(len(items), 100_000), "reorder": max(reorder, k)}
    start = time.perf_counter()
    searcher = (scann_ops.builder(items, k, "dot_product")
                .tree(settings["num_leaves"], settings["num_leaves_to_search"],
                      training_sample_size=settings["training_sample_size"])
                .score_ah(2, anisotropic_quantization_threshold=0.2)
                .reorder(settings["reorder"]).build())
    build = time.perf_counter() - start
    fn = tf.function(lambda q: tf.cast(searcher.search_batched(q)[0], tf.int64))
    return fn, build, settings


def time_round_robin(fns: dict[str, Callable], queries: list, block: int = 5, warmup: int = 3
                     ) -> tuple[dict[str, np.ndarray], dict[str, list]]:
    """Milliseconds per call of each function on every query, interleaved in blocks; and the outputs."""
    for fn in fns.values():
        for q in queries[:warmup]:
            fn(q)
    times = {name: [] for name in fns}
    outs = {name: [None] * len(queries) for name in fns}
    for start in range(0, len(queries), block):
        for name, fn in fns.items():
            for i in range(start, min(start + block, len(queries))):
                t = time.perf_counter()
                out = fn(queries[i])
                out = {k: v.numpy() for k, v in out.items()} if isinstance(out, dict) else out.numpy()
                times[name].append((time.perf_counter() - t) * 1e3)
                outs[name][i] = out
    return {k: np.asarray(v) for k, v in times.items()}, outs


def relative_recall(approx: list[np.ndarray], exact: list[np.ndarray]) -> float:
    return float(np.mean([len(np.intersect1d(a.ravel(), e.ravel())) / e.size for a, e in zip(approx, exact)]))


def summary(times: dict[str, np.ndarray]) -> dict[str, dict]:
    return {k: {"p50_ms": float(np.percentile(v, 50)), "p99_ms": float(np.percentile(v, 99)), "calls": len(v)}
            for k, v in times.items()}


def bench_index(name: str, items: np.ndarray, query_embeddings: np.ndarray, leaves_to_search: float, reorder: int
                ) -> dict:
    k = min(K, len(items))
    bf, bf_build = brute_force(items, k)
    sc, sc_build, settings = scann(items, k, leaves_to_search, reorder)
    queries = [tf.constant(q[None, :]) for q in query_embeddings]
    times, outs = time_round_robin({"brute_force": bf, "scann": sc}, queries)
    row = {"items": len(items), "dim": int(items.shape[1]), "k": k, "queries": len(queries),
           "build_s": {"brute_force": round(bf_build, 3), "scann": round(sc_build, 3)},
           "latency": summary(times), "scann_settings": settings,
           "scann_recall_vs_brute_force": relative_recall(outs["scann"], outs["brute_force"])}
    row["p50_ratio_scann_vs_brute_force"] = row["latency"]["scann"]["p50_ms"] / row["latency"]["brute_force"]["p50_ms"]
    print(f"{name}: {json.dumps(row)}", flush=True)
    return row


def bench_exported(version_dir: Path, inputs: dict[str, np.ndarray]) -> dict:
    """The two exported SavedModels end to end, one query per call."""
    fns = {"brute_force": tf.saved_model.load(str(version_dir)).signatures["serving_default"],
           "scann": tf.saved_model.load(str(version_dir / SCANN_DIR)).signatures["serving_default"]}
    n = len(next(iter(inputs.values())))
    queries = [{k: tf.constant(v[i:i + 1]) for k, v in inputs.items()} for i in range(n)]
    calls = {name: (lambda q, fn=fn: fn(**q)) for name, fn in fns.items()}
    times, outs = time_round_robin(calls, queries)
    row = {"queries": n, "latency": summary(times),
           "scann_recall_vs_brute_force": relative_recall([o["item_ids"] for o in outs["scann"]],
                                                          [o["item_ids"] for o in outs["brute_force"]])}
    row["p50_ratio_scann_vs_brute_force"] = row["latency"]["scann"]["p50_ms"] / row["latency"]["brute_force"]["p50_ms"]
    print(f"exported: {json.dumps(row)}", flush=True)
    return row


def table(report: dict) -> str:
    lines = ["| item set | items | index build s (BF / ScaNN) | BF p50 / p99 ms | ScaNN p50 / p99 ms "
             "| ScaNN p50 / BF p50 | ScaNN recall@100 vs BF |", "|---|---|---|---|---|---|---|"]
    for name, r in report["results"].items():
        lat = r["latency"]
        build = f"{r['build_s']['brute_force']:.3f} / {r['build_s']['scann']:.2f}" if "build_s" in r else "(export)"
        lines.append(f"| {name} | {r.get('items', report['num_items'])} | {build} | "
                     f"{lat['brute_force']['p50_ms']:.2f} / {lat['brute_force']['p99_ms']:.2f} | "
                     f"{lat['scann']['p50_ms']:.2f} / {lat['scann']['p99_ms']:.2f} | "
                     f"{r['p50_ratio_scann_vs_brute_force']:.2f} | {r['scann_recall_vs_brute_force']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/retrieval", help="a retrieval base path or version directory")
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--synthetic-items", type=int, default=1_000_000)
    parser.add_argument("--leaves-to-search", type=float, default=0.1,
                        help="fraction of ScaNN leaves searched on the synthetic set (the real set uses the export's)")
    parser.add_argument("--reorder", type=int, default=2000, help="re-scored exactly on the synthetic set")
    parser.add_argument("--out", default="benchmarks/results/retrieval.json")
    args = parser.parse_args()
    start = time.time()

    version_dir = resolve_version(args.model)
    meta = json.loads((version_dir / "assets.extra" / METADATA_FILE).read_text())
    config = parse_retrieval_config(meta["feature_spec"], f"{version_dir} metadata")
    ids, items = read_embeddings(version_dir / "assets.extra" / EMBEDDINGS_FILE)
    data = build_data(config)
    inputs = {k: v[: args.queries] for k, v in query_inputs(config, data.test).items()}
    query_embeddings = embed(load_run(meta["run"]).query_tower, inputs)

    rng = np.random.default_rng(0)
    synthetic = (items[rng.integers(0, len(items), args.synthetic_items)]
                 + rng.normal(0, 0.5, (args.synthetic_items, items.shape[1])) * items.std(0)).astype(np.float32)
    results = {"exported": bench_exported(version_dir, inputs),
               "real": bench_index("real", items, query_embeddings, config.index.leaves_to_search,
                                   config.index.reordering_candidates),
               f"synthetic_{args.synthetic_items // 1000}k": bench_index(  # the real set keeps the export's reorder
                   "synthetic", synthetic, query_embeddings, args.leaves_to_search, args.reorder)}
    report = {"model": str(version_dir), "model_name": meta["model_name"], "num_items": len(ids), "k": K,
              "leaves_to_search": {"real": config.index.leaves_to_search, "synthetic": args.leaves_to_search},
              "reorder": {"real": config.index.reordering_candidates, "synthetic": args.reorder}, "cpu": cpu_model(),
              "cpu_count": os.cpu_count(), "results": results, "seconds": round(time.time() - start, 1)}
    text = table(report)
    write_report(report, text, args.out)
    md = Path(args.out).with_suffix(".md")
    md.write_text(f"# Retrieval index latency ({meta['model_name']}, {report['cpu']}, {report['cpu_count']} cores)\n\n"
                  f"One query per call, {args.queries} real test queries, K={K}; brute force and ScaNN timed "
                  f"round-robin in the same run. ScaNN: ~sqrt(I) leaves; searched: the export's "
                  f"{config.index.leaves_to_search:.0%} (exported, real), {args.leaves_to_search:.0%} (synthetic); "
                  f"re-scored exactly: {config.index.reordering_candidates} (real), {args.reorder} (synthetic)."
                  f"\n\n{text}\n\nReproduce: `python benchmarks/retrieval.py "
                  f"--model {args.model}` ({report['seconds']} s)\n")


if __name__ == "__main__":
    main()
