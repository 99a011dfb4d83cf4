"""Replay throughput: the Beam replay (``fusion.beam_replay``) on DirectRunner, in process and with 2 worker
processes, against today's in-memory replay (``score_log`` + ``evaluate``) on the same rows of the bundled KuaiRand
log, with every profile of configs/fusion.yaml. Not run in CI.

    .venv/bin/python benchmarks/bench_beam_replay.py --model models/ranker [--rounds 3] [--days 20220429 ...]

The example shards are built once from ``read_log`` (as the feature pipeline writes them) into a temporary
directory and not timed. Every replay variant loads the model version itself (the Beam ones once per worker).
Variants run round-robin, ``--rounds`` times each; the report gives median wall seconds, rows/s and the ratio to
the in-memory replay, plus two ceilings measured in the same run: parsing the shards alone (tf.data) and calling
the signature alone on the same rows (model loaded). -> reports/bench_beam_replay.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="model base path or version directory (a KuaiRand model)")
    ap.add_argument("--fusion", default=str(ROOT / "configs" / "fusion.yaml"))
    ap.add_argument("--days", type=int, nargs="*", help="days to replay (default: every day of the log)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=1000)
    ap.add_argument("--out", default=str(ROOT / "reports" / "bench_beam_replay.json"))
    args = ap.parse_args()

    import numpy as np
    import tensorflow as tf
    from example_shards import write_example_shards

    from evaluation.scoring import corrected_predictions, score_log
    from features import examples
    from features.logs import read_log
    from fusion.beam_replay import beam_replay, read_schema, shard_files
    from fusion.replay import evaluate, fusion_for_version, replay_profiles
    from ranking.servable import load_servable

    version_dir, config, cal = fusion_for_version(args.fusion, args.model)
    model = load_servable(version_dir)
    spec = model.config
    os.chdir(ROOT)  # the config's paths are relative to the project root
    frame = read_log(spec.data)
    days = args.days or sorted(set(frame[spec.data.time_column].tolist()))
    work = Path(tempfile.mkdtemp(prefix="bench_beam_replay-"))
    shards = write_example_shards(frame, spec, work / "shards", days, parts=4)
    rows = int(frame[spec.data.time_column].isin(days).sum())
    del frame
    profiles = replay_profiles(config)
    print(f"{rows:,} rows on days {days}; {len(profiles)} rankings; shards in {shards}")

    def in_memory():  # as `rankstage replay` runs it: load the version, stream the log, evaluate
        scored = score_log(load_servable(version_dir), spec.data.log, days=days, verbose=False)
        return evaluate(scored, profiles, calibration=cal, reps=args.reps)

    def beam(flags):
        return lambda: beam_replay(version_dir, str(shards), profiles, str(work / "out"), cal, days,
                                   reps=args.reps, pipeline_args=["--runner=DirectRunner", *flags])

    files = shard_files(str(shards), days)
    cols = read_schema(str(shards))
    parse = examples.parse_spec(cols)
    features = [f.name for f in spec.serving_features]
    fn = model.signature(model.metadata.get("signature", "serving_default"))

    def parse_only():
        n = 0
        ds = tf.data.TFRecordDataset(files, compression_type=examples.COMPRESSION).batch(16384)
        for b in ds.map(lambda x: tf.io.parse_example(x, parse)):
            n += int(b[examples.ROW].shape[0])
        return n

    x = examples.read_columns(files, [c for c in cols if c.name in features])
    x = {k: (v.astype(bytes).astype(object) if v.dtype == object else v) for k, v in x.items()}

    def signature_only():
        corrected_predictions(fn, x, model.sampling, model.tasks)

    variants = {"in_memory": in_memory, "beam_direct": beam([]),
                "beam_direct_2proc": beam(["--direct_num_workers=2", "--direct_running_mode=multi_processing"]),
                "parse_shards_only": parse_only, "signature_only": signature_only}
    times: dict[str, list[float]] = {k: [] for k in variants}
    results = {}
    load0 = os.getloadavg()[0]
    for r in range(args.rounds):
        for name, f in variants.items():
            t0 = time.perf_counter()
            results[name] = f()
            times[name].append(time.perf_counter() - t0)
            print(f"round {r + 1}: {name} {times[name][-1]:.2f} s", flush=True)
    base = float(np.median(times["in_memory"]))
    report = {"rows": rows, "days": days, "rankings": list(profiles), "reps": args.reps, "model": str(version_dir),
              "load_average_start": load0, "load_average_end": os.getloadavg()[0], "cpus": os.cpu_count(),
              "variants": {n: {"median_s": float(np.median(t)), "times_s": t, "rows_per_s": rows / np.median(t),
                               "speed_vs_in_memory": base / float(np.median(t))} for n, t in times.items()}}
    worst = max(abs(results["beam_direct"]["metrics"][n][m]["mean"] - c["mean"])
                for n, row in results["in_memory"]["metrics"].items() for m, c in row.items()
                if np.isfinite(c["mean"]))
    report["max_abs_mean_diff_beam_vs_in_memory"] = worst
    print(f"\n{'variant':<20} {'median s':>9} {'rows/s':>10} {'x in-memory':>12}")
    for n, v in report["variants"].items():
        print(f"{n:<20} {v['median_s']:>9.2f} {v['rows_per_s']:>10,.0f} {v['speed_vs_in_memory']:>12.2f}")
    print(f"max |mean difference| Beam vs in-memory: {worst:.2e}; load average {load0:.1f} -> "
          f"{report['load_average_end']:.1f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
