"""Training throughput from TFRecord shards (``ranking.shards`` + ``ranking.loop``) against today's in-memory Keras
``model.fit``, and one worker against two loopback workers with the all-reduce cost per step.

Every variant trains the same model on the same KuaiRand training days for ``--epochs`` epochs (no validation);
the first epoch (tracing, the shuffle buffer's first fill) is dropped and the median rows/s of the rest is reported,
with each variant's ratio to the in-memory Keras baseline measured in this run (> 1 is faster). Variants:

    keras_fit_memory   today's path: numpy targets, ``make_dataset``, ``model.fit`` (the baseline)
    loop_memory        the custom step on in-memory records (``memory_source``, the map in the graph)
    loop_shards        the custom step on the shards (interleave, shuffle buffer, parse, map)
    loop_shards_2w     two worker processes (MultiWorkerMirroredStrategy on loopback), global batch as above;
                       rows/s of the whole cluster, and per step: the step's time and the time of an all-reduce of
                       every gradient alone (the model's trainable variables, summed over the workers)

Shards: ``--examples DIR`` (a feature pipeline's output), else written once with ``tests/shard_fixture.py``.
Not run in CI; this machine is shared, so compare ratios within one run only.

    python benchmarks/bench_train_shards.py [--config configs/kuairand.yaml] [--epochs 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _median_rows_per_s(epoch_seconds: list[float], rows: int) -> float:
    import numpy as np

    kept = epoch_seconds[1:] or epoch_seconds
    return float(rows / np.median(kept))


def keras_fit_memory(config, frame, stats, epochs: int) -> dict:
    import keras
    import numpy as np

    from features.logs import raw_inputs, task_labels
    from ranking.datasets import make_dataset
    from ranking.fit import compile_model
    from ranking.model import build_models
    from ranking.sampling import initial_logits, sample_negatives, targets
    from ranking.tasks import watch_time_weight_scale

    labels = task_labels(frame, config.tasks)
    keep, w, _ = sample_negatives(labels, config, config.training.seed)
    kept = {k: v[keep] for k, v in labels.items()}
    scales = {t.name: watch_time_weight_scale(kept[t.name]) for t in config.tasks if t.type == "watch_time"}
    x = raw_inputs(frame[keep].reset_index(drop=True), config.features)
    ds = make_dataset(x, targets(config, kept, w, scales), config.training.batch_size, shuffle=True)
    models = build_models(config, stats)
    compile_model(models, config, initial_logits(config, kept, w))
    seconds: list[float] = []

    class Timer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            seconds.append(time.perf_counter() - self.t0)

    models.train.fit(ds, epochs=epochs, verbose=0, callbacks=[Timer()])
    rows = int(np.sum(keep))
    return {"rows": rows, "epoch_seconds": seconds, "rows_per_s": _median_rows_per_s(seconds, rows)}


def loop_epochs(config, source, stats, epochs: int, strategy=None, allreduce_reps: int = 0) -> dict:
    """The custom step for ``epochs`` epochs (as ``ranking.loop.run`` runs it, without validation or checkpoints),
    timed per epoch; optionally the all-reduce of one gradient's worth of tensors timed alone."""
    import math

    import numpy as np
    import tensorflow as tf

    from ranking import loop
    from ranking.shards import TargetMap, label_summary, training_dataset

    strategy = strategy or tf.distribute.get_strategy()
    summary = label_summary(source, config)
    models, optimizer = loop.build(config, stats, summary.priors(config), strategy)
    batch = config.training.batch_size
    steps = max(1, math.ceil(summary.kept / batch))
    step = loop.make_train_step(config, models, optimizer, strategy, batch)
    tm = TargetMap(config, summary.weight_scales())
    seconds = []
    for epoch in range(epochs):
        it = iter(strategy.experimental_distribute_dataset(training_dataset(source, tm, batch, epoch)))
        t0 = time.perf_counter()
        for _ in range(steps):
            step(it)
        seconds.append(time.perf_counter() - t0)
    out = {"rows": steps * batch, "steps_per_epoch": steps, "epoch_seconds": seconds,
           "rows_per_s": _median_rows_per_s(seconds, steps * batch)}
    out["step_ms"] = 1000 * float(np.median(seconds[1:] or seconds)) / steps
    if allreduce_reps:
        grads = [tf.zeros_like(v) for v in models.train.trainable_variables]

        @tf.function
        def all_reduce():
            ctx = lambda: tf.distribute.get_replica_context().all_reduce(  # noqa: E731
                tf.distribute.ReduceOp.SUM, grads)
            return strategy.run(ctx)

        all_reduce()
        t0 = time.perf_counter()
        for _ in range(allreduce_reps):
            all_reduce()
        out["allreduce_ms"] = 1000 * (time.perf_counter() - t0) / allreduce_reps
        out["gradient_floats"] = int(sum(int(np.prod(v.shape)) for v in models.train.trainable_variables))
    return out


def worker_main(args) -> None:
    """One worker of the two-worker variant (``TF_CONFIG`` set by the launcher); the chief writes ``--result``."""
    from ranking import loop

    strategy = loop.strategy_from_env()  # before any other TensorFlow op
    from features.spec import load_config
    from ranking.shards import read_layout, shard_source

    config = load_config(args.config, args.set, None)
    layout = read_layout(args.examples)
    source = shard_source(layout, layout.manifest["train_days"])
    result = loop_epochs(config, source, layout.stats("train"), args.epochs, strategy, allreduce_reps=50)
    if loop.is_chief():
        Path(args.result).write_text(json.dumps(result))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "kuairand.yaml"))
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--examples", help="a feature pipeline's output; default: written to a temporary directory")
    p.add_argument("--out", default=str(ROOT / "reports" / "bench_train_shards.json"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    os.chdir(ROOT)
    if args.worker:
        return worker_main(args)
    t_start = time.perf_counter()
    from features.logs import raw_inputs, read_log, time_split
    from features.spec import load_config
    from features.vocab import build_stats
    from ranking.shards import memory_source, read_layout, shard_source

    config = load_config(args.config, args.set, None)
    frame = read_log(config.data)
    train, _ = time_split(frame, config)
    examples = args.examples
    if examples is None:
        sys.path.insert(0, str(ROOT / "tests"))
        import shard_fixture

        examples = shard_fixture.write_examples(frame, config, Path(tempfile.mkdtemp()) / "examples")
    layout = read_layout(examples)
    stats = build_stats(raw_inputs(train, config.features), config.features)
    results = {"keras_fit_memory": keras_fit_memory(config, train, stats, args.epochs),
               "loop_memory": loop_epochs(config, memory_source(train, config), stats, args.epochs),
               "loop_shards": loop_epochs(config, shard_source(layout, layout.manifest["train_days"]), stats,
                                          args.epochs)}
    from rankstage.cli import launch_workers

    result_file = Path(tempfile.mkdtemp()) / "two_workers.json"
    argv = ["--worker", "--config", args.config, "--examples", str(examples), "--epochs", str(args.epochs),
            "--result", str(result_file), *[a for s in args.set for a in ("--set", s)]]
    status = launch_workers(argv, 2, command=[sys.executable, str(Path(__file__).resolve())])
    if status == 0:
        results["loop_shards_2w"] = json.loads(result_file.read_text())
    base = results["keras_fit_memory"]["rows_per_s"]
    lines = [f"{'variant':<18} {'rows/s':>9} {'ratio':>6} {'step ms':>8} {'all-reduce ms':>14}"]
    for name, r in results.items():
        r["ratio_to_keras_fit_memory"] = r["rows_per_s"] / base
        lines.append(f"{name:<18} {r['rows_per_s']:>9.0f} {r['ratio_to_keras_fit_memory']:>6.2f} "
                     f"{r.get('step_ms', float('nan')):>8.1f} {r.get('allreduce_ms', float('nan')):>14.2f}")
    from _report import cpu_model, write_report

    report = {"config": args.config, "batch_size": config.training.batch_size, "epochs": args.epochs,
              "cpu": cpu_model(), "cores": os.cpu_count(), "results": results,
              "seconds": round(time.perf_counter() - t_start, 1)}
    write_report(report, "\n".join(lines), args.out)


if __name__ == "__main__":
    main()
