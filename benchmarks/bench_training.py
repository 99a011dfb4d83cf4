"""Training throughput of the ranker: examples per second of ``model.fit`` on the prepared KuaiRand training split.

The data is prepared once as ``ranking.fit.fit`` prepares it (time split, vocabularies from the training days,
negative sampling, per-task [target, weight] arrays); each variant then builds and compiles a fresh model the way
``fit`` does, and the variants train one epoch each in turn (no validation, no TensorBoard), so load from other
processes on this shared machine hits them alike. Each epoch is timed by a callback; the first (tracing) is dropped
and the median of the rest is reported, with each variant's ratio to the default config (> 1 is faster). Variants:

    default          the config as given (MMoE, its batch size)
    shared_bottom    model.num_experts = 0
    batch_quarter    training.batch_size / 4 (2048 -> 512 for configs/kuairand.yaml)

Usage (from the project root, env active):
    python benchmarks/bench_training.py [--config configs/kuairand.yaml] [--epochs 4] [--variants ...]
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf
from _report import write_report

from features.logs import raw_inputs, read_log, task_labels, time_split
from features.spec import RankstageConfig, load_config, parse_config
from features.vocab import FeatureStats, build_stats
from ranking.datasets import make_dataset
from ranking.fit import compile_model
from ranking.model import build_models
from ranking.sampling import initial_logits, sample_negatives, targets
from ranking.tasks import watch_time_weight_scale

VARIANTS: dict[str, Callable[[RankstageConfig], dict[str, object]]] = {  # name -> config -> overrides
    "default": lambda c: {},
    "shared_bottom": lambda c: {"model.num_experts": 0},
    "batch_quarter": lambda c: {"training.batch_size": max(1, c.training.batch_size // 4)},
}
BASELINE = "default"


@dataclass
class Prepared:
    """Training inputs shared by every variant: raw features (N,), targets {task: (N, 2)}, stats, priors."""

    x: dict[str, np.ndarray]
    y: dict[str, np.ndarray]
    stats: dict[str, FeatureStats]
    priors: dict[str, float]
    rows: int


class EpochTimer(keras.callbacks.Callback):
    """Wall-clock seconds of each epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: list[float] = []
        self._t0 = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._t0 = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.seconds.append(time.perf_counter() - self._t0)


def with_overrides(config: RankstageConfig, overrides: dict[str, object]) -> RankstageConfig:
    """``{"model.num_experts": 0}`` -> the same config with that field changed (validated again)."""
    data = config.model_dump()
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = data
        for p in parents:
            node = node[p]
        node[leaf] = value
    return parse_config(data, f"override {overrides}")


def prepare(config: RankstageConfig, log: str | None, max_rows: int | None) -> Prepared:
    """The training split as ``ranking.train.train`` and ``fit`` prepare it (no validation set)."""
    train_df, _ = time_split(read_log(config.data, log), config)
    if max_rows is not None and len(train_df) > max_rows:
        train_df = train_df.sample(n=max_rows, random_state=config.training.seed).reset_index(drop=True)
    stats = build_stats(raw_inputs(train_df, config.features), config.features)
    labels = task_labels(train_df, config.tasks)
    keep, row_weight, _ = sample_negatives(labels, config, config.training.seed)
    kept = {k: v[keep] for k, v in labels.items()}
    scales = {t.name: watch_time_weight_scale(kept[t.name]) for t in config.tasks if t.type == "watch_time"}
    x = raw_inputs(train_df[keep].reset_index(drop=True), config.features)
    return Prepared(x, targets(config, kept, row_weight, scales), stats, initial_logits(config, kept), int(keep.sum()))


@dataclass
class Trainee:
    """One variant's compiled model, its dataset and what its epochs measured."""

    model: keras.Model
    dataset: tf.data.Dataset
    timer: EpochTimer
    loss: list[float]


def build_trainee(config: RankstageConfig, data: Prepared) -> Trainee:
    """Build and compile a fresh model for ``config`` as ``ranking.fit.fit`` does, with its shuffled dataset."""
    keras.utils.set_random_seed(config.training.seed)
    ds = make_dataset(data.x, data.y, config.training.batch_size, shuffle=True, seed=config.training.seed)
    models = build_models(config, data.stats)
    compile_model(models, config, data.priors)
    return Trainee(models.train, ds, EpochTimer(), [])


def train_one_epoch(t: Trainee, epoch: int) -> None:
    """Fit epoch ``epoch`` (0-based) of ``t``; its seconds land in ``t.timer``."""
    with warnings.catch_warnings():  # Keras notes that fit's shuffle=True does not apply to a tf.data.Dataset
        warnings.filterwarnings("ignore", message=".*shuffle=True.*")
        hist = t.model.fit(t.dataset, epochs=epoch + 1, initial_epoch=epoch, callbacks=[t.timer], verbose=0)
    t.loss += [float(v) for v in hist.history["loss"]]


def bench(args: argparse.Namespace) -> dict:
    """Train every variant one epoch at a time, round-robin (order reversed on odd epochs), so load from elsewhere
    hits all alike; medians over epochs after the first (which includes tracing)."""
    t_start, load_start = time.perf_counter(), os.getloadavg()
    base_config = load_config(args.config)
    if args.batch_size:
        base_config = with_overrides(base_config, {"training.batch_size": args.batch_size})
    data = prepare(base_config, args.log, args.max_rows)
    print(f"{data.rows} training examples per epoch", flush=True)
    overrides = {name: VARIANTS[name](base_config) for name in args.variants}
    trainees = {name: build_trainee(with_overrides(base_config, overrides[name]), data) for name in args.variants}
    for epoch in range(args.epochs):
        for name in args.variants if epoch % 2 == 0 else args.variants[::-1]:
            train_one_epoch(trainees[name], epoch)
        print(f"epoch {epoch + 1}: " + ", ".join(f"{n} {data.rows / t.timer.seconds[-1]:,.0f}"
                                                 for n, t in trainees.items()) + " examples/s", flush=True)
    variants = {}
    for name, t in trainees.items():
        rates = [data.rows / s for s in t.timer.seconds]
        variants[name] = {"overrides": overrides[name], "median_examples_per_second": float(np.median(rates[1:])),
                          "min": float(np.min(rates[1:])), "max": float(np.max(rates[1:])),
                          "timed_epochs": len(rates) - 1, "examples_per_second": rates,
                          "epoch_seconds": t.timer.seconds, "loss": t.loss, "params": int(t.model.count_params())}
    base = variants.get(BASELINE)
    for v in variants.values():  # ratio of medians, and median of same-round ratios (cancels slow drift in load)
        v["ratio_to_default"] = v["median_examples_per_second"] / base["median_examples_per_second"] if base else None
        v["paired_ratio_to_default"] = float(np.median(np.divide(v["examples_per_second"][1:],
                                                                 base["examples_per_second"][1:]))) if base else None
    return {"config": args.config, "rows_per_epoch": data.rows, "epochs": args.epochs,
            "batch_size_default": base_config.training.batch_size, "variants": variants,
            "machine": {"cpus": os.cpu_count(), "tensorflow": tf.__version__, "keras": keras.__version__,
                        "loadavg_start": load_start, "loadavg_end": os.getloadavg()},
            "seconds": round(time.perf_counter() - t_start, 1)}


def format_table(report: dict) -> str:
    """Plain-text table: median examples/s over the timed epochs, their range, the ratio of medians to default's
    and the median of same-round (paired) ratios."""
    head = (f"{'variant':<16}{'median ex/s':>13}{'min':>10}{'max':>10}{'epochs':>8}{'ratio':>8}{'paired':>8}"
            f"{'params':>10}")
    lines = [head, "-" * len(head)]
    for name, v in report["variants"].items():
        ratio, paired = (f"{v[k]:.2f}" if v[k] is not None else "-" for k in ("ratio_to_default",
                                                                              "paired_ratio_to_default"))
        lines.append(f"{name:<16}{v['median_examples_per_second']:>13,.0f}{v['min']:>10,.0f}{v['max']:>10,.0f}"
                     f"{v['timed_epochs']:>8}{ratio:>8}{paired:>8}{v['params']:>10,}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/kuairand.yaml")
    p.add_argument("--log", help="impression log (default: the config's data.log)")
    p.add_argument("--epochs", type=int, default=4, help="epochs per fit; the first is not timed")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--batch-size", type=int, help="override the config's batch size (every variant starts from it)")
    p.add_argument("--max-rows", type=int, help="subsample the training split to this many rows (quick runs)")
    p.add_argument("--out", default="reports/bench_training.json", help="JSON report path")
    args = p.parse_args(argv)
    if args.epochs < 2:
        p.error("--epochs must be >= 2 (the first epoch is not timed)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    report = bench(args)
    write_report(report, format_table(report), args.out)


if __name__ == "__main__":
    main()
