"""Latency, throughput and reload behaviour of the ranking service, beside the bare in-process signature call.

One run, one machine state. Requests are built from real logged rows of the newest day of the model's log: the
most active user of that day, the context of their first impression, and C candidate ids sampled from that day's
impressions. Requests carry ids only, as a gateway sends them; the service joins the rest from its side tables.
The bare calls get the same rows joined offline (``features.logs``) and prebuilt as ``tf.constant``.

    1. latency    per C in --sizes, timed round-robin in blocks of a few calls (one variant busy at a time):
                  bare_serving_default / bare_rank_candidates   the SavedModel signature, in this process
                  bare_serving_default_public   the same call as replay and a user make it: numpy in (tf.constant
                  per input, keyword call), numpy out; a second reference beside the strict, prebuilt baseline
                  rank_in_process_{rc,sd}   client -> loopback gRPC -> service -> in-process backend -> response
                  rank_model_server_{rc,sd} ... -> service -> TF Serving API -> model server (own process)
                  (rc = signature rank_candidates, sd = serving_default), p50 / p99 and ratios of p50 / p99 to
                  the bare serving_default call; the server-side stage_ms of every response (median per stage)
    2. throughput 4 client threads (a subprocess: the gateway is another process) for --duration s at C=500
                  against the in-process service: requests/s, p50 / p99, errors
    3. reload     one client calling Rank at C=500 back to back while new versions are published (copied to
                  ``.tmp-N``, renamed to ``N``, as export does) and picked up (in-process backend: by the service's
                  reload thread; model server backend: by the model server process, then the service): p99 in the
                  windows from publish until the new version answers (+ --settle s) vs p99 outside them

Usage (from the project root, env active):
    python benchmarks/serving.py [--model models/ranker] [--duration 60] [--out benchmarks/results/serving.json]
Without versions under --model, the default KuaiRand config is trained for --train-epochs into a temp dir and
exported (that model is what the numbers describe; the report says which).
"""

# ruff: noqa: E402  (sys.path is fixed before the project imports)
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Run as a script, this file's folder comes first on sys.path and its name would shadow the `serving` package.
sys.path[:] = [p for p in sys.path if Path(p or os.getcwd()).resolve() != ROOT / "benchmarks"]
sys.path.insert(0, str(ROOT))

import grpc
import numpy as np
import pandas as pd

from benchmarks._report import cpu_model, write_report
from ranking.servable import RANK_CANDIDATES_PACKED as PACKED
from ranking.servable import pack_inputs
from rankstage.v1 import ranking_pb2 as pb
from serving.client import RankingClient, build_request
from serving.config import ReloadConfig

Batch = dict[str, np.ndarray]
BASELINE = "bare_serving_default"
PUBLIC = "bare_serving_default_public"  # sv has no FlatCall switched on: Servable.predict is the public call
STAGES = ("decode", "join", "model", "calibrate", "fuse", "encode", "total")
TARGETS = {"rank_in_process_over_bare_at_500": 1.3, "reload_p99_over_steady": 1.5}


# ----------------------------------------------------------------------------------------------------- inputs


@dataclass
class LoggedRequest:
    """One real request at C candidates: what the gateway sends, and the same rows joined offline."""

    user: dict  # {user column: id}
    context: dict  # {context feature: value}
    item_ids: np.ndarray  # (C,)
    serving_default: Batch  # every serving feature (C,)
    rank_candidates: Batch  # user / context features (1,), item features (C,)

    def request(self, request_id: str, top_k: int = 0, predictions: bool = True) -> pb.RankRequest:
        """ids only; by default every candidate ranked with per-task predictions: the heaviest response."""
        return build_request(self.user, self.item_ids, self.context, top_k=top_k, return_predictions=predictions,
                             request_id=request_id)


def logged_requests(config, sizes: list[int], seed: int) -> dict[int, LoggedRequest]:
    """Per C: the newest day's most active user, the context of their first impression (with the same-day history
    lists of their last one, the longest), C distinct item ids sampled from that day's impressions; raw inputs joined
    with ``features.logs`` as training joins them."""
    from features.history import attach_history
    from features.logs import join_side_tables, load_side_tables, raw_inputs, read_table
    from features.statistics import serving_joins
    from ranking.signatures import split_request

    d = config.data
    df = read_table(d.log)
    if d.history is not None:
        df = attach_history(join_side_tables(df, load_side_tables(d)), d)[[*df.columns, *(x.name for x in
                                                                                     d.history.lists)]]
    day = df[df[d.time_column] == df[d.time_column].max()]
    user = day[d.user_column].value_counts().index[0]
    first = day[day[d.user_column] == user].iloc[0].copy()
    for f in config.serving_features:
        if f.kind in ("match", "sequence"):  # the lists the gateway sends with the request
            first[f.source] = day[day[d.user_column] == user].sort_values(d.history.order)[f.source].iloc[-1]
    logged_context = [f for f in config.serving_features
                      if (f.group == "context" or f.kind in ("match", "sequence")) and f.source in day.columns]
    context = {f.name: first[f.source].item() if hasattr(first[f.source], "item") else first[f.source]
               for f in logged_context}
    pool = day[d.item_column].unique()
    sides = load_side_tables(d, serving_joins(d))  # the side tables and statistics snapshots, as served
    rng = np.random.default_rng(seed)
    out = {}
    for n in sizes:
        if n > len(pool):
            raise SystemExit(f"--sizes {n}: the newest day has only {len(pool)} distinct items")
        ids = rng.choice(pool, n, replace=False).astype(pool.dtype)
        frame = pd.DataFrame({d.user_column: np.repeat(user, n), d.item_column: ids,
                              **{f.source: np.repeat(first[f.source], n) for f in logged_context}})
        batch = raw_inputs(join_side_tables(frame, sides), config.serving_features)
        ranked, repeated = split_request(batch, config)
        out[n] = LoggedRequest({d.user_column: user.item() if hasattr(user, "item") else user}, context,
                               np.asarray(ids), repeated, ranked)
    return out


# ------------------------------------------------------------------------------------------------------ model


def train_default_model(workdir: Path, epochs: int) -> Path:
    """The default KuaiRand config (configs/kuairand.yaml), ``epochs`` epochs, exported under ``workdir`` -> base;
    its statistics snapshot is published under ``workdir`` too, never over the one serving reads."""
    import ranking.train
    from features.spec import load_config, parse_config
    from ranking.export import export_run

    data = load_config(ROOT / "configs" / "kuairand.yaml").model_dump()
    data["training"].update(epochs=epochs)
    if data["data"]["statistics"]:  # the snapshot this model is served with: in the bench's own directory
        data["data"]["statistics"]["path"] = str(workdir / "stats")
    config = parse_config(data, f"configs/kuairand.yaml, training.epochs={epochs}")
    t0 = time.perf_counter()
    run = ranking.train.train(config, workdir / "runs" / "kuairand", verbose=False, publish_statistics=True)
    base = workdir / "trained" / "ranker"
    export_run(run, base, verbose=False)
    print(f"trained and exported the default KuaiRand model ({epochs} epochs) in {time.perf_counter() - t0:.0f} s",
          flush=True)
    return base


def publish(base: Path, source: Path, version: int) -> Path:
    """A version the way export publishes one: written aside as ``.tmp-N``, then renamed into place."""
    from ranking.servable import METADATA_FILE

    tmp = base / f".tmp-{version}"
    shutil.copytree(source, tmp)
    meta = tmp / "assets.extra" / METADATA_FILE
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "version": version}))
    tmp.rename(base / str(version))
    return base / str(version)


def fetch(outputs: dict) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in outputs.items()}


def max_abs_diff(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> float:
    return max(float(np.max(np.abs(np.asarray(got[k], np.float64) - np.asarray(want[k], np.float64))))
               for k in want)


# -------------------------------------------------------------------------------------------------- services


def service_config(base: Path, fusion: str, backend: str, signature: str, address: str = "localhost:8500",
                   reload_s: float = 1.0) -> dict:
    return {"model": {"base_path": str(base), "backend": backend, "signature": signature},
            "tf_serving": {"address": address, "timeout_ms": 5000},
            "fusion": fusion, "limits": {"max_candidates": 2000},
            "server": {"port": 0, "metrics_port": None, "drain_s": 1}, "reload": {"interval_s": reload_s}}


class ModelServerProcess:
    """``serving.model_server.run`` in its own process (as `rankstage model-server` runs), on a free port."""

    def __init__(self, base: Path, log_path: Path):
        code = f"import sys; from serving.model_server import run; sys.exit(run({str(base)!r}, 0))"
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True)
        line = self.proc.stdout.readline()
        match = re.search(r":(\d+)\s*$", line.strip())
        if not match:
            self.stop()
            raise RuntimeError(f"model server did not report its port (got {line!r}; log {log_path})")
        self.port = int(match.group(1))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def start_service(config: dict):
    from serving.config import parse_serving_config
    from serving.service import RankingService

    svc = RankingService(parse_serving_config(config))
    port = svc.start()
    if not svc.wait_until_ready(180):
        svc.stop(0)
        raise RuntimeError(f"service ({config['model']}) not ready within 180 s")
    return svc, RankingClient(f"127.0.0.1:{port}", timeout_s=10)


# ----------------------------------------------------------------------------------------------------- timing


def summarize(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1e3
    if len(ms) == 0:
        return {"calls": 0}
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "mean_ms": float(ms.mean()), "max_ms": float(ms.max()), "calls": int(len(ms))}


Call = Callable[[], dict | None]  # returns the response's stage_ms for Rank calls, None for bare calls


def round_robin(calls: dict[str, Call], warmup: int, iters: int, block: int
                ) -> tuple[dict[str, list[float]], dict[str, list[dict]]]:
    """``warmup`` untimed calls of each, then rounds of ``block`` timed calls of each until each has ``iters``."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    stages: dict[str, list[dict]] = {name: [] for name in calls}
    while any(len(t) < iters for t in times.values()):
        for name, call in calls.items():
            for _ in range(min(block, iters - len(times[name]))):
                t0 = time.perf_counter()
                got = call()
                times[name].append(time.perf_counter() - t0)
                if got is not None:
                    stages[name].append(got)
    return times, stages


def rank_call(client: RankingClient, request: pb.RankRequest) -> Call:
    return lambda: dict(client.send(request).stage_ms)


# ------------------------------------------------------------------------------------------------- phase 1


def latency_phase(args, sv, requests: dict[int, LoggedRequest], clients: dict[str, RankingClient]) -> dict:
    """Bare signature calls and Rank through every service, round-robin per size; consistency checks."""
    import tensorflow as tf

    from calibration.outputs import calibrated_outputs
    from serving.backends import tensor_proto
    from serving.codec import response_arrays

    has_rc = "rank_candidates" in sv.signatures
    out: dict = {"sizes": {}, "checks": {}, "bytes": {}}
    for n in args.sizes:
        lr = requests[n]
        sd_tensors = {k: tf.constant(v) for k, v in lr.serving_default.items()}
        sd = sv.signature("serving_default")
        calls: dict[str, Call] = {BASELINE: lambda sd=sd, x=sd_tensors: (fetch(sd(**x)), None)[1],
                                  PUBLIC: lambda x=lr.serving_default: (sv.predict(x), None)[1]}
        if has_rc:
            rc = sv.signature("rank_candidates")
            rc_tensors = {k: tf.constant(v) for k, v in lr.rank_candidates.items()}
            calls["bare_rank_candidates"] = lambda rc=rc, x=rc_tensors: (fetch(rc(**x)), None)[1]
        if PACKED in sv.signatures:
            pk = sv.signature(PACKED)
            pk_tensors = {k: tf.constant(v) for k, v in
                          pack_inputs(sv.metadata["signatures"][PACKED]["packed_inputs"], lr.rank_candidates).items()}
            calls["bare_rank_candidates_packed"] = lambda pk=pk, x=pk_tensors: (fetch(pk(**x)), None)[1]
        req = lr.request(f"bench-{n}")
        for name, client in clients.items():
            calls[name] = rank_call(client, req)
        if "rank_in_process_rc" in clients:  # what a gateway usually asks: the top 50, fused scores only
            calls["rank_in_process_rc_top50"] = rank_call(clients["rank_in_process_rc"],
                                                          lr.request(f"bench-{n}-top50", 50, False))

        # the same rows through every path: bare outputs, rankings and predictions must agree
        want_raw = fetch(sd(**sd_tensors))
        checks: dict = {}
        if has_rc:
            got_rc = fetch(rc(**rc_tensors))
            checks["bare_rank_candidates_vs_serving_default_max_abs_diff"] = {
                t: max_abs_diff(got_rc, {t: want_raw[t]}) for t in want_raw}
            checks["bare_rank_candidates_vs_serving_default_max_rel_diff"] = max(
                float(np.max(np.abs(got_rc[t] - want_raw[t]) / np.maximum(np.abs(want_raw[t]), 1e-6)))
                for t in want_raw)
        want = calibrated_outputs(want_raw, sv.sampling)
        orders = {}
        for name, client in clients.items():
            got = response_arrays(client.send(req))
            order = got["candidate_indices"]
            orders[name] = order
            checks[f"{name}_predictions_vs_bare_max_abs_diff"] = max_abs_diff(
                {t: got[t] for t in want}, {t: want[t][order] for t in want})
        ref = next(iter(orders.values()), None)
        checks["same_ranking_all_services"] = all(np.array_equal(o, ref) for o in orders.values())
        out["checks"][str(n)] = checks

        resp = next(iter(clients.values())).send(req)
        predict_bytes = {sig: sum(tensor_proto(v).ByteSize() for v in x.values())
                         for sig, x in (("serving_default", lr.serving_default), ("rank_candidates",
                                                                                  lr.rank_candidates))}
        out["bytes"][str(n)] = {"rank_request": req.ByteSize(), "rank_response": resp.ByteSize(),
                                "predict_request_tensors": predict_bytes}

        times, stages = round_robin(calls, args.warmup, args.iters, args.block)
        base = summarize(times[BASELINE])
        size: dict = {}
        for name, t in times.items():
            s = summarize(t)
            s["ratio_p50"] = s["p50_ms"] / base["p50_ms"]
            s["ratio_p99"] = s["p99_ms"] / base["p99_ms"]
            if stages[name]:
                s["stage_ms_p50"] = {k: float(np.median([st[k] for st in stages[name]])) for k in STAGES}
                s["outside_server_ms_p50"] = float(np.median(
                    [1e3 * dt - st["total"] for dt, st in zip(t, stages[name])]))
            size[name] = s
        out["sizes"][str(n)] = size
        print(f"C={n}: " + ", ".join(f"{k} {v['p50_ms']:.2f}/{v['p99_ms']:.2f}" for k, v in size.items())
              + " ms (p50/p99)", flush=True)
    return out


# ------------------------------------------------------------------------------------------------- phase 2


def client_worker(args) -> None:
    """Subprocess: ``--threads`` clients, one channel each, calling Rank back to back for ``--duration`` s."""
    request = pb.RankRequest.FromString(Path(args.request_file).read_bytes())
    clients = [RankingClient(args.client_worker, timeout_s=10) for _ in range(args.threads)]
    for c in clients:  # connect and warm each channel
        for _ in range(3):
            c.send(request)
    start = threading.Barrier(args.threads + 1)
    lat: list[list[float]] = [[] for _ in clients]
    server: list[list[float]] = [[] for _ in clients]
    errors: list[str] = []
    t_end = [0.0]

    def loop(i: int) -> None:
        start.wait()
        while time.perf_counter() < t_end[0]:
            t0 = time.perf_counter()
            try:
                resp = clients[i].send(request)
            except grpc.RpcError as err:
                errors.append(f"{err.code().name}: {err.details()}")
                continue
            lat[i].append(time.perf_counter() - t0)
            server[i].append(resp.stage_ms["total"])

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(len(clients))]
    for t in threads:
        t.start()
    t_end[0] = time.perf_counter() + args.duration
    t0 = time.perf_counter()
    start.wait()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    done = [x for per in lat for x in per]
    print(json.dumps({"wall_s": wall, "calls": len(done), "requests_per_s": len(done) / wall,
                      **summarize(done), "server_total_ms_p50": float(np.median([x for s in server for x in s])),
                      "per_thread_calls": [len(x) for x in lat], "errors": len(errors),
                      "error_samples": errors[:5]}))


def throughput_phase(args, address: str, request: pb.RankRequest, workdir: Path) -> dict:
    path = workdir / "throughput_request.bin"
    path.write_bytes(request.SerializeToString())
    cmd = [sys.executable, str(Path(__file__).resolve()), "--client-worker", address, "--request-file", str(path),
           "--threads", str(args.threads), "--duration", str(args.duration)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.duration + 300)
    if done.returncode != 0:
        return {"status": f"client worker failed ({done.returncode}): {done.stderr[-2000:]}"}
    report = json.loads(done.stdout.strip().splitlines()[-1])
    report.update(status="ok", threads=args.threads, duration_s=args.duration,
                  candidates=len(request.candidates.item_ids.int64_values.values))
    print(f"throughput: {report['requests_per_s']:.1f} req/s, p50 {report['p50_ms']:.2f} / p99 "
          f"{report['p99_ms']:.2f} ms, errors {report['errors']}", flush=True)
    return report


# ------------------------------------------------------------------------------------------------- phase 3


def reload_phase(args, version_dir: Path, fusion: str, request: pb.RankRequest, workdir: Path,
                 backend: str) -> dict:
    """Steady-state p99 vs p99 in windows where a new version is published, loaded, warmed and swapped in (by the
    service's reload thread in-process, or by the model server in its own process for ``tf_serving``)."""
    base = workdir / f"reload_{backend}"
    base.mkdir()
    shutil.copytree(version_dir, base / "1")
    server = ModelServerProcess(base, workdir / "reload_model_server.log") if backend == "tf_serving" else None
    try:
        svc, client = start_service(service_config(base, fusion, backend, "rank_candidates",
                                                   f"127.0.0.1:{server.port}" if server else "localhost:8500",
                                                   reload_s=args.reload_interval))
    except BaseException:
        if server:
            server.stop()
        raise
    records: list[tuple[float, float, int]] = []  # (start, seconds, version)
    errors: list[str] = []
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                v = client.send(request).model.version
            except grpc.RpcError as err:
                errors.append(f"{err.code().name}: {err.details()}")
                continue
            records.append((t0, time.perf_counter() - t0, v))

    thread = threading.Thread(target=hammer, daemon=True)
    thread.start()
    windows = []
    try:
        time.sleep(3)  # warm
        t_steady = time.perf_counter()
        for k in range(args.swaps):
            time.sleep(args.steady)
            version = k + 2
            t_pub = time.perf_counter()
            publish(base, version_dir, version)
            deadline = t_pub + 180
            while not (records and records[-1][2] == version) and time.perf_counter() < deadline:
                time.sleep(0.01)
            first = next((t0 + dt for t0, dt, v in records if v == version), None)
            time.sleep(args.settle)
            windows.append({"version": version, "t_publish": t_pub, "t_first_answer": first,
                            "t_end": time.perf_counter()})
        time.sleep(args.steady)
    finally:
        stop.set()
        thread.join(30)
        client.close()
        svc.stop(1)
        if server:
            server.stop()

    def overlaps(t0: float, dt: float, w: dict) -> bool:
        return t0 < w["t_end"] and t0 + dt > w["t_publish"]

    timed = [r for r in records if r[0] >= t_steady]
    steady = [dt for t0, dt, _ in timed if not any(overlaps(t0, dt, w) for w in windows)]
    swapping = [dt for t0, dt, _ in timed if any(overlaps(t0, dt, w) for w in windows)]
    per_swap = []
    for w in windows:
        in_w = [dt for t0, dt, _ in timed if overlaps(t0, dt, w)]
        per_swap.append({"version": w["version"], **summarize(in_w),
                         "publish_to_first_answer_s": None if w["t_first_answer"] is None
                         else w["t_first_answer"] - w["t_publish"],
                         "window_s": w["t_end"] - w["t_publish"]})
    s, sw = summarize(steady), summarize(swapping)
    ends = sorted(w["t_end"] for w in windows)

    def since_window(t0: float) -> float | None:
        before = [e for e in ends if e <= t0]
        return round(t0 - before[-1], 2) if before else None

    slowest = sorted(((dt, t0) for t0, dt, _ in timed if not any(overlaps(t0, dt, w) for w in windows)),
                     reverse=True)[:3]
    s["slowest"] = [{"ms": round(dt * 1e3, 1), "s_after_a_swap_window": since_window(t0),
                     "s_after_start": round(t0 - t_steady, 2)} for dt, t0 in slowest]
    out = {"steady": s, "swap_windows": sw, "per_swap": per_swap, "errors": len(errors),
           "error_samples": errors[:5], "versions_answered": sorted({v for _, _, v in records}),
           "ratio_p99": sw["p99_ms"] / s["p99_ms"] if sw.get("calls") else None,
           "settings": {"steady_s": args.steady, "swaps": args.swaps, "settle_s": args.settle,
                        "reload_interval_s": args.reload_interval,
                        "load_duty": ReloadConfig().load_duty}}
    print(f"reload ({backend}): steady p99 {s['p99_ms']:.2f} ms, swap windows p99 "
          f"{sw.get('p99_ms', float('nan')):.2f} ms ({sw.get('calls', 0)} calls), ratio {out['ratio_p99']}, "
          f"errors {len(errors)}", flush=True)
    return out


# ------------------------------------------------------------------------------------------------------ bench


def bench(args) -> dict:
    import tensorflow as tf

    from ranking.servable import list_versions, load_servable

    t_start, load_start = time.perf_counter(), os.getloadavg()
    os.chdir(ROOT)  # configs and the model metadata hold paths relative to the project root
    workdir = Path(tempfile.mkdtemp(prefix="bench_serving_"))
    try:
        model_base = Path(args.model)
        if list_versions(model_base):
            source = f"{model_base} (given)"
        else:
            print(f"no versions under {model_base}: training the default config for {args.train_epochs} epochs",
                  flush=True)
            model_base = train_default_model(workdir, args.train_epochs)
            source = f"configs/kuairand.yaml trained {args.train_epochs} epochs in this run"
        sv = load_servable(model_base)
        version_dir = sv.version_dir
        base = workdir / "serve_base"  # a copy: the bench never writes under --model
        base.mkdir()
        shutil.copytree(version_dir, base / "1")
        requests = logged_requests(sv.config, args.sizes, args.seed)
        print(f"model {sv.name} v{sv.version} from {source}; signatures {sorted(sv.signatures)}; "
              f"user {requests[args.sizes[0]].user}, context {requests[args.sizes[0]].context}", flush=True)

        services, clients = {}, {}
        server = ModelServerProcess(base, workdir / "model_server.log")
        try:
            address = f"127.0.0.1:{server.port}"
            for name, backend, sig in (("rank_in_process_rc", "in_process", "rank_candidates"),
                                       ("rank_in_process_sd", "in_process", "serving_default"),
                                       ("rank_model_server_rc", "tf_serving", "rank_candidates"),
                                       ("rank_model_server_sd", "tf_serving", "serving_default")):
                services[name], clients[name] = start_service(service_config(base, args.fusion, backend, sig,
                                                                             address))
            signatures_used = {name: s.snapshot.model.signature for name, s in services.items()}
            print(f"services ready ({time.perf_counter() - t_start:.0f} s): {signatures_used}", flush=True)
            latency = latency_phase(args, sv, requests, clients)
        except BaseException:
            for name in list(services):
                clients.pop(name).close()
                services.pop(name).stop(0)
            raise
        finally:  # the in-process rank_candidates service stays up for the throughput phase
            for name in [k for k in services if k != "rank_in_process_rc"]:
                clients.pop(name).close()
                services.pop(name).stop(1)
            server.stop()

        n = 500 if 500 in requests else args.sizes[len(args.sizes) // 2]
        if "rank_in_process_rc" in services:
            svc = services["rank_in_process_rc"]
            try:
                throughput = throughput_phase(args, f"127.0.0.1:{svc.port}", requests[n].request("bench-tp"),
                                              workdir) if args.duration > 0 else {"status": "skipped"}
            finally:
                clients.pop("rank_in_process_rc").close()
                svc.stop(1)
        else:
            throughput = {"status": "no service"}
        reload = {backend: reload_phase(args, version_dir, args.fusion, requests[n].request("bench-reload"),
                                        workdir, backend) for backend in args.reload_backends}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    size = latency["sizes"].get(str(n), {})
    base50 = size.get(BASELINE, {}).get("p50_ms")
    targets = {"candidates": n}
    if base50:
        for name in ("rank_in_process_rc", "rank_in_process_rc_top50", "rank_in_process_sd"):
            if name in size:
                targets[f"{name}_p50_over_bare"] = size[name]["p50_ms"] / base50
            if name in size and PUBLIC in size:
                targets[f"{name}_p50_over_public"] = size[name]["p50_ms"] / size[PUBLIC]["p50_ms"]
        if "rank_in_process_rc" in size:
            targets["rank_in_process_rc_faster_than_bare"] = size["rank_in_process_rc"]["p50_ms"] < base50
    for backend, rl in reload.items():
        targets[f"reload_p99_over_steady_{backend}"] = rl.get("ratio_p99")
    targets["throughput_errors"] = throughput.get("errors")
    return {
        "model": {"source": source, "name": sv.name, "version_dir": str(version_dir), "version": sv.version,
                  "run": sv.metadata.get("run"), "training_window": sv.metadata.get("training_window"),
                  "signatures": sorted(sv.signatures), "model_config": sv.config.model.model_dump()},
        "request": {"user": requests[n].user, "context": requests[n].context, "top_k": 0,
                    "return_predictions": True, "ids_only": True, "fusion": args.fusion},
        "sizes": args.sizes, "baseline": BASELINE, "targets": targets, "target_limits": TARGETS,
        "latency": latency, "throughput": throughput, "reload": reload,
        "settings": {k: getattr(args, k) for k in ("warmup", "iters", "block", "seed", "duration", "threads")},
        "machine": {"cpus": os.cpu_count(), "processor": cpu_model(), "python": platform.python_version(),
                    "tensorflow": tf.__version__, "grpc": grpc.__version__, "loadavg_start": load_start,
                    "loadavg_end": os.getloadavg()},
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "seconds": round(time.perf_counter() - t_start, 1),
    }


# ----------------------------------------------------------------------------------------------------- report


LABELS = {
    BASELINE: "bare `serving_default` (in-process, tensors prebuilt)",
    "bare_rank_candidates": "bare `rank_candidates` (in-process, tensors prebuilt)",
    "bare_rank_candidates_packed": "bare `rank_candidates_packed` (in-process, tensors prebuilt)",
    PUBLIC: "bare `serving_default` public call from numpy (`Servable.predict`: tf.constant per input)",
    "rank_in_process_rc": "Rank, in-process backend, `rank_candidates` (called as `rank_candidates_packed`)",
    "rank_in_process_rc_top50": "Rank, in-process backend, `rank_candidates_packed`, top 50 without predictions",
    "rank_in_process_sd": "Rank, in-process backend, `serving_default`",
    "rank_model_server_rc": "Rank, model server backend, `rank_candidates`",
    "rank_model_server_sd": "Rank, model server backend, `serving_default`",
}


def _arch(m: dict) -> str:
    keys = ("bottom_units", "num_experts", "expert_units", "tower_units", "embedding_dim")
    return ", ".join(f"{k} {m[k]}" for k in keys if k in m)


def _fmt(v) -> str:
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} {_fmt(x)}" for k, x in v.items()) + "}"
    return f"{v:.2g}" if isinstance(v, float) else str(v)


def format_markdown(r: dict) -> str:
    sizes = [str(n) for n in r["sizes"]]
    lat = r["latency"]["sizes"]
    names = list(lat[sizes[0]])
    m = r["machine"]
    lines = [
        "# Ranking service benchmark (`benchmarks/serving.py`)", "",
        f"Run {r['date']}, {r['seconds']} s, {m['cpus']} CPUs ({m['processor']}), TF {m['tensorflow']}, grpc "
        f"{m['grpc']}; load average at start {m['loadavg_start'][0]:.2f}, at end {m['loadavg_end'][0]:.2f}.",
        f"Model: {r['model']['name']} v{r['model']['version']}, {r['model']['source']} (run {r['model']['run']}); "
        f"signatures {', '.join(r['model']['signatures'])}; {_arch(r['model']['model_config'])}.",
        f"Requests: real user {r['request']['user']} of the newest day, context {r['request']['context']}, C "
        "candidate ids sampled from that day's impressions; ids only (the service joins the side tables), top_k 0 "
        "(all C ranked) with per-task predictions. Rank runs client -> loopback gRPC -> service -> backend -> "
        "response, client in this process, model server in its own process. "
        f"{r['settings']['iters']} timed calls per point after {r['settings']['warmup']} warmup calls, variants "
        f"round-robin in blocks of {r['settings']['block']}.", "",
        "## Latency (ms, p50 / p99; ratio = p50 / bare serving_default p50, p99 ratio in brackets)", "",
        "| variant | " + " | ".join(f"C={n}" for n in sizes) + " | ratio " + " / ".join(sizes) + " |",
        "|---|" + "---|" * (len(sizes) + 1)]
    for name in names:
        cells = [f"{lat[n][name]['p50_ms']:.2f} / {lat[n][name]['p99_ms']:.2f}" for n in sizes]
        ratios = " / ".join(f"{lat[n][name]['ratio_p50']:.2f} ({lat[n][name]['ratio_p99']:.2f})" for n in sizes)
        lines.append(f"| {LABELS.get(name, name)} | " + " | ".join(cells) + f" | {ratios} |")
    n = str(r["targets"]["candidates"])
    if n in lat:
        lines += ["", f"## Server-side stages at C={n} (median ms of `stage_ms` over the timed calls)", "",
                  "| variant | " + " | ".join(STAGES) + " | outside server | end to end p50 |",
                  "|---|" + "---|" * (len(STAGES) + 2)]
        for name, s in lat[n].items():
            if "stage_ms_p50" in s:
                lines.append(f"| {LABELS.get(name, name)} | " + " | ".join(f"{s['stage_ms_p50'][k]:.2f}"
                                                                        for k in STAGES)
                             + f" | {s['outside_server_ms_p50']:.2f} | {s['p50_ms']:.2f} |")
        lines.append("")
        lines.append("outside server = end to end minus the server's total: client serialization, loopback gRPC, "
                     "server-side gRPC framing and response parsing.")
    lines += ["", "## Bytes", "", "| C | Rank request (ids) | Rank response | Predict tensors serving_default | "
              "Predict tensors rank_candidates |", "|---|---|---|---|---|"]
    for c in sizes:
        b = r["latency"]["bytes"][c]
        p = b["predict_request_tensors"]
        lines.append(f"| {c} | {b['rank_request']:,} | {b['rank_response']:,} | {p['serving_default']:,} | "
                     f"{p['rank_candidates']:,} |")
    lines += ["", "## Consistency (the same rows through every path)", ""]
    for c in sizes:
        lines.append(f"- C={c}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in r["latency"]["checks"][c].items()))
    t = r["throughput"]
    lines += ["", "## Throughput", ""]
    if t.get("status") == "ok":
        lines.append(f"{t['threads']} client threads (one channel each, in a separate process) for "
                     f"{t['duration_s']} s at C={t['candidates']}, in-process backend with rank_candidates: "
                     f"**{t['requests_per_s']:.1f} requests/s** ({t['calls']:,} calls), p50 {t['p50_ms']:.2f} ms, "
                     f"p99 {t['p99_ms']:.2f} ms, max {t['max_ms']:.1f} ms, server-side total p50 "
                     f"{t['server_total_ms_p50']:.2f} ms, **errors {t['errors']}**.")
    else:
        lines.append(f"not measured: {t.get('status')}")
    lines += ["", "## p99 while a new model version loads and swaps", ""]
    for backend, rl in r["reload"].items():
        if "steady" not in rl:
            lines.append(f"{backend}: not measured: {rl.get('status')}")
            continue
        st = rl["settings"]
        where = ("in-process backend: the service's reload thread loads and warms the version" if backend ==
                 "in_process" else "model server backend: the model server process loads and warms the version, "
                 "the service then checks it and answers one warmup Predict")
        lines.append(f"**{backend}**. One client, Rank at C={n} back to back, rank_candidates, {where}; reload "
                     f"poll every {st['reload_interval_s']} s; the load paced at duty {st.get('load_duty', 1.0)} "
                     f"(`reload.load_duty` / `--load-duty`); {st['swaps']} new versions published (copy to "
                     f"`.tmp-N`, rename to `N`) {st['steady_s']} s apart. A swap window runs from the publish to "
                     f"{st['settle_s']} s after the first answer from the new version; steady = every other call.")
        lines += ["", "| window | calls | p50 ms | p99 ms | max ms | publish -> first answer s |",
                  "|---|---|---|---|---|---|",
                  f"| steady | {rl['steady']['calls']} | {rl['steady']['p50_ms']:.2f} | {rl['steady']['p99_ms']:.2f} "
                  f"| {rl['steady']['max_ms']:.1f} | |",
                  f"| all swap windows | {rl['swap_windows'].get('calls', 0)} | "
                  f"{rl['swap_windows'].get('p50_ms', float('nan')):.2f} | "
                  f"{rl['swap_windows'].get('p99_ms', float('nan')):.2f} | "
                  f"{rl['swap_windows'].get('max_ms', float('nan')):.1f} | |"]
        for w in rl["per_swap"]:
            first = w["publish_to_first_answer_s"]
            lines.append(f"| swap to v{w['version']} | {w.get('calls', 0)} | {w.get('p50_ms', float('nan')):.2f} | "
                         f"{w.get('p99_ms', float('nan')):.2f} | {w.get('max_ms', float('nan')):.1f} | "
                         f"{'never' if first is None else f'{first:.2f}'} |")
        lines.append("")
        lines.append(f"p99 ratio swap / steady: **{rl['ratio_p99']:.2f}**; errors {rl['errors']}; versions "
                     f"answered {rl['versions_answered']}.")
        lines.append("")
    tg = r["targets"]
    lines += ["", f"## Targets (C={tg['candidates']})", ""]
    for key in ("rank_in_process_rc_p50_over_bare", "rank_in_process_rc_top50_p50_over_bare",
                "rank_in_process_sd_p50_over_bare"):
        if key in tg:
            lines.append(f"- {key.replace('_', ' ')}: {tg[key]:.2f} (target <= 1.3: "
                         f"{'met' if tg[key] <= 1.3 else 'NOT met'})")
        public = key.replace("_over_bare", "_over_public")
        if public in tg:
            lines.append(f"  - against the public call from numpy instead (a second reference, not the target's "
                         f"baseline): {tg[public]:.2f}")
    if "rank_in_process_rc_faster_than_bare" in tg:
        lines.append(f"- Rank with rank_candidates faster than the bare serving_default call: "
                     f"{'yes' if tg['rank_in_process_rc_faster_than_bare'] else 'NO'}")
    for key, v in tg.items():
        if key.startswith("reload_p99_over_steady_") and v is not None:
            lines.append(f"- reload p99 / steady p99, {key.removeprefix('reload_p99_over_steady_')} backend: "
                         f"{v:.2f} (target <= 1.5: {'met' if v <= 1.5 else 'NOT met'})")
    if tg.get("throughput_errors") is not None:
        lines.append(f"- throughput errors: {tg['throughput_errors']} (target 0)")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="models/ranker", help="model base path; without versions, train the default "
                                                             "config into a temp dir")
    p.add_argument("--train-epochs", type=int, default=2, help="epochs when training the default config")
    p.add_argument("--fusion", default="configs/fusion.yaml", help="fusion config the services use")
    p.add_argument("--sizes", type=int, nargs="+", default=[100, 500, 1000], help="candidates per call")
    p.add_argument("--warmup", type=int, default=20, help="untimed calls per variant and size")
    p.add_argument("--iters", type=int, default=200, help="timed calls per variant and size")
    p.add_argument("--block", type=int, default=5, help="consecutive calls of one variant per round-robin turn")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--duration", type=float, default=60.0, help="throughput phase seconds (0 = skip)")
    p.add_argument("--threads", type=int, default=4, help="concurrent clients in the throughput phase")
    p.add_argument("--swaps", type=int, default=3, help="model versions published per reload backend")
    p.add_argument("--reload-backends", nargs="*", default=["in_process", "tf_serving"],
                   choices=["in_process", "tf_serving"], help="backends of the reload phase (none: skip it)")
    p.add_argument("--steady", type=float, default=10.0, help="seconds of steady traffic before/between/after swaps")
    p.add_argument("--settle", type=float, default=1.0, help="seconds a swap window lasts after the new version "
                                                             "first answers")
    p.add_argument("--reload-interval", type=float, default=1.0, help="the reload thread's poll interval (s)")
    p.add_argument("--out", default="benchmarks/results/serving.json", help="JSON report (the .md goes beside it)")
    p.add_argument("--client-worker", metavar="ADDRESS", help=argparse.SUPPRESS)
    p.add_argument("--request-file", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.client_worker:
        client_worker(args)
        return
    report = bench(args)
    table = format_markdown(report)
    out = write_report(report, table, ROOT / args.out if not Path(args.out).is_absolute() else args.out)
    out.with_suffix(".md").write_text(table)
    print(f"markdown written to {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
