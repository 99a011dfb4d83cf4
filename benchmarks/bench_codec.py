"""Cost of turning a RankRequest into model inputs (``serving.codec``): parse the bytes, decode the typed columns.

Requests are built from real KuaiRand rows of the newest day: one user, C candidates. Two payloads:

    ids_only     user id, context (tab, hourmin), C item ids: what the gateway sends, the service joins the rest
    all_inline   the same plus every other item feature of the spec inline as typed columns (tags list-valued);
                 43 on configs/kuairand.yaml (side table, same-day author matches, 1d/3d statistics); 9 (10 with
                 the id) when this was written. The behaviour sequence is a user feature the service joins: in neither.

Variants, timed round-robin over the same requests (p50 / p99 in ms):

    proto_columnar   RankRequest.FromString + decode_request                                       [the service]
    json_rows        json.loads of one object per candidate + building the same columns           [baseline]

The baseline is what a REST/JSON gateway protocol with one record per candidate would cost; the ratio is p50 of
``proto_columnar`` over ``json_rows`` in the same run.

Usage (from the project root):  python benchmarks/bench_codec.py [--calls 500] [--out reports/bench_codec.json]
"""

# ruff: noqa: E402  (sys.path is fixed before the project imports)
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Run as a script, this file's folder comes first on sys.path and benchmarks/serving.py would shadow the `serving`
# package (as in benchmarks/serving.py).
sys.path[:] = [p for p in sys.path if Path(p or os.getcwd()).resolve() != ROOT / "benchmarks"]
sys.path.insert(0, str(ROOT))

import numpy as np

from benchmarks._report import write_report
from features.logs import raw_inputs, read_log
from features.spec import load_config
from rankstage.v1 import ranking_pb2 as pb
from serving.client import build_request
from serving.codec import decode_request

SIZES = (100, 500, 1000)


def payloads(config, c: int, seed: int) -> dict[str, tuple[bytes, bytes]]:
    """-> {payload: (proto bytes, json bytes)} for one request of ``c`` real rows."""
    df = read_log(config.data)
    day = df[df["date"] == df["date"].max()].drop_duplicates("video_id")
    rows = day.sample(n=c, random_state=seed, replace=False).reset_index(drop=True)
    items = [f for f in config.serving_features if f.group == "item" and f.name != "video_id"]
    x = raw_inputs(rows, items)
    user = {"user_id": int(rows["user_id"][0])}
    context = {"tab": int(rows["tab"][0]), "hourmin": int(rows["hourmin"][0])}
    ids = rows["video_id"].to_numpy(np.int64)
    out = {}
    for name, feats in (("ids_only", {}), ("all_inline", x)):
        cand = {k: ([t.split(",") if t else [] for t in v] if k == "tag" else v) for k, v in feats.items()}
        proto = build_request(user, ids, context, {k: v if isinstance(v, np.ndarray) else v for k, v in cand.items()}
                              ).SerializeToString()
        records = [{"item_id": int(ids[i]), **{k: (v[i].item() if isinstance(v[i], np.generic) else v[i]) for k, v in
                                                cand.items()}} for i in range(c)]
        js = json.dumps({"user": user, "context": context, "candidates": records}).encode()
        out[name] = (proto, js)
    return out


def decode_json(data: bytes) -> dict[str, np.ndarray]:
    """The baseline: rows -> typed columns."""
    doc = json.loads(data)
    rows = doc["candidates"]
    cols = {k: [r[k] for r in rows] for k in rows[0]}
    out = {}
    for k, v in cols.items():
        if isinstance(v[0], list):
            out[k] = np.array([",".join(map(str, t)) for t in v], dtype=object)
        elif isinstance(v[0], str):
            out[k] = np.array(v, dtype=object)
        elif isinstance(v[0], int):
            out[k] = np.array(v, dtype=np.int64)
        else:
            out[k] = np.array(v, dtype=np.float32)
    return out


def time_calls(fn, data: bytes, calls: int) -> np.ndarray:
    ts = np.empty(calls)
    for i in range(calls):
        t0 = time.perf_counter()
        fn(data)
        ts[i] = time.perf_counter() - t0
    return ts * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/kuairand.yaml")
    ap.add_argument("--calls", type=int, default=500)
    ap.add_argument("--out", default="reports/bench_codec.json")
    args = ap.parse_args()
    t_start = time.perf_counter()
    config = load_config(args.config)
    results, lines = {}, ["| payload | C | bytes proto / json | proto_columnar p50 / p99 ms | json_rows p50 / p99 ms "
                          "| ratio p50 |", "|---|---|---|---|---|---|"]
    variants = {"proto_columnar": lambda b: decode_request(pb.RankRequest.FromString(b)), "json_rows": decode_json}
    for c in SIZES:
        for name, (proto, js) in payloads(config, c, seed=c).items():
            data = {"proto_columnar": proto, "json_rows": js}
            for v, fn in variants.items():
                time_calls(fn, data[v], 20)  # warm
            ts = {v: [] for v in variants}
            for _ in range(5):  # round-robin blocks: machine noise hits both alike
                for v, fn in variants.items():
                    ts[v].append(time_calls(fn, data[v], args.calls // 5))
            stat = {v: {"p50_ms": float(np.median(np.concatenate(t))), "p99_ms": float(np.percentile(
                np.concatenate(t), 99))} for v, t in ts.items()}
            ratio = stat["proto_columnar"]["p50_ms"] / stat["json_rows"]["p50_ms"]
            results[f"{name}/{c}"] = {**stat, "bytes": {"proto": len(proto), "json": len(js)}, "ratio_p50": ratio}
            p, j = stat["proto_columnar"], stat["json_rows"]
            lines.append(f"| {name} | {c} | {len(proto):,} / {len(js):,} | {p['p50_ms']:.3f} / {p['p99_ms']:.3f} | "
                         f"{j['p50_ms']:.3f} / {j['p99_ms']:.3f} | {ratio:.3f} |")
    write_report({"results": results, "calls": args.calls, "seconds": round(time.perf_counter() - t_start, 1)},
                 "\n".join(lines), args.out)


if __name__ == "__main__":
    main()
