"""Replay on Apache Beam: the logged lists of training-example shards scored with ``RunInference``, ranked by each
fusion profile and measured, with means and Poisson-bootstrap intervals combined across workers.

    ReadExampleShards or ReadParquetShards | RunInference(ServableHandler) | GroupIntoLists | ListMetrics
        | CombineGlobally(ReplayCombineFn)

Input: the feature pipeline's layout, ``DIR/examples/date=<day>/part-*.tfrecord.gz`` and ``DIR/schema.json``
(``features.examples``), or the same rows as ``part-*.parquet`` when the pipeline wrote them (``features build
--formats tfrecord,parquet``; ``input_shards`` chooses, ``--read-format``). Work is per batch, never per impression:
groups of files are read in batches of rows (TFRecords with tf.data, ``ReadExampleShards``; Parquet with pyarrow,
``ReadParquetShards``: the same batches of the same numpy columns), each batch is scored as it is read (one
signature call per batch: a row's score does not depend on its list), then cut by a hash of its rows' list key into
``buckets`` fragments of only the columns the metrics need (keys, labels, predictions), and a bucket (every row of
its lists, from every file) is the element that is grouped and measured. The features never reach the shuffle.
A list lives in exactly one bucket, so the per-list metrics are those of the in-process replay: the same
``correct_outputs`` (via ``evaluation.scoring.corrected_predictions``), ``calibrate``, ``FusionProfile.score`` and
``fusion.replay.per_list_metrics`` / ``list_counts`` on a ``ScoredLog`` of the bucket.

Aggregation: each list carries K Poisson(1) weights drawn from a hash of its key (``evaluation.bootstrap``), so the
resample is the same whatever the partitioning; the accumulator holds per metric the count, the sum and K weighted
sums with their K weight totals, for each profile and for its paired difference against the reference profile.
Nothing is collected to the driver but that accumulator. B buckets, L lists, K bootstrap replicates.
"""

from __future__ import annotations

import json
import math
import pickle
import sys
from pathlib import Path

import apache_beam as beam
import numpy as np
from apache_beam.ml.inference.base import ModelHandler, RunInference
from threadpoolctl import threadpool_limits

from evaluation.bootstrap import bootstrap_sums, interval_from_sums, poisson_weights
from evaluation.lists import key_hash
from evaluation.scoring import SCORED_META, ScoredLog, corrected_predictions, scored_table
from features import examples
from features.logfiles import rss_gb
from features.pipeline import one_line_errors
from features.spec import ConfigError

PRED = "pred/"
HASH = "key/hash"  # (N,) uint64 hash of the row's list key, computed when read


# ---------------------------------------------------------------- input


def read_schema(examples_dir: str) -> list[examples.Column]:
    from apache_beam.io.filesystems import FileSystems

    path = f"{examples_dir.rstrip('/')}/schema.json"
    if not FileSystems.exists(path):
        raise ConfigError(f"--examples {examples_dir}: no schema.json (expected the feature pipeline's output)")
    with FileSystems.open(path) as f:
        return [examples.Column(c["name"], c["kind"]) for c in json.loads(f.read())]


def shard_files(examples_dir: str, days: list[int] | None = None, suffix: str = examples.SUFFIX,
                missing_ok: bool = False) -> list[str]:
    """The example shards (``suffix``: TFRecord or Parquet) of ``days`` (all days if None), by day directory,
    sorted."""
    from apache_beam.io.filesystems import FileSystems

    root = f"{examples_dir.rstrip('/')}/examples"
    patterns = [f"{root}/date={d}/part-*{suffix}" for d in days] if days else [f"{root}/date=*/part-*{suffix}"]
    files = sorted(m.path for r in FileSystems.match(patterns) for m in r.metadata_list)
    if not files and not missing_ok:
        raise ConfigError(f"--examples {examples_dir}: no shards {' or '.join(patterns)}")
    return files


READ_FORMATS = ("auto", examples.TFRECORD, examples.PARQUET)


def input_shards(examples_dir: str, days: list[int] | None, read_format: str = "auto"
                 ) -> tuple[str, list[str], dict[str, str]]:
    """-> (format, shard files the replay reads, the TFRecord twin of each Parquet file). "auto": Parquet when the
    days hold Parquet shards, else TFRecord. Parquet read when TFRecords are there too must cover every TFRecord
    shard (``part-X.parquet`` beside each ``part-X.tfrecord.gz``): a missing one is an error naming it, never a
    replay of part of the rows. The twins size the passes and read groups (``file_sizes``)."""
    if read_format not in READ_FORMATS:
        raise ConfigError(f"--read-format {read_format!r}: not one of {', '.join(READ_FORMATS)}")
    parquet = shard_files(examples_dir, days, examples.PARQUET_SUFFIX, missing_ok=True)
    if read_format == "auto":
        read_format = examples.PARQUET if parquet else examples.TFRECORD
    if read_format == examples.TFRECORD:
        return read_format, shard_files(examples_dir, days), {}
    if not parquet:
        raise ConfigError(f"--read-format parquet: no Parquet shards under {examples_dir}/examples (the feature "
                          f"pipeline writes them with --formats tfrecord,parquet)")
    have = set(parquet)
    records = shard_files(examples_dir, days, missing_ok=True)
    twins = {f.removesuffix(examples.SUFFIX) + examples.PARQUET_SUFFIX: f for f in records}
    missing = [f for p, f in twins.items() if p not in have]
    if missing:
        raise ConfigError(f"--examples {examples_dir}: {missing[0]} has no Parquet shard beside it "
                          f"({len(missing)} of {len(records)} TFRecord shards have none); use --read-format tfrecord")
    return read_format, parquet, twins


def check_parquet_files(files: list[str], cols: list[examples.Column]) -> None:
    """Every Parquet shard holds ``cols`` as ``schema.json`` has them, without nulls (footers only: the schema and
    the row groups' statistics; one line naming the first file and column that differ, or the file that cannot be
    read). ``ReadParquetShards`` checks the nulls again in the rows, for files written without statistics."""
    import pyarrow.parquet as pq
    from apache_beam.io.filesystems import FileSystems

    for path in files:
        try:
            with FileSystems.open(path) as f:
                metadata = pq.read_metadata(f)
        except Exception as err:  # pyarrow raises ArrowInvalid, OSError, ... for a file that is not Parquet
            raise ConfigError(f"{path}: not a readable Parquet file ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''})") from None
        error = (examples.parquet_schema_error(path, metadata.schema.to_arrow_schema(), cols)
                 or examples.parquet_nulls_error(path, metadata, cols))
        if error:
            raise ConfigError(error)


def list_key_columns(group: str, list_column: str | None) -> list[str]:
    if group == "user_day":
        return [examples.USER, examples.DAY]
    if group == "user_window":
        return [examples.USER]
    if group == "request":
        if not list_column:
            raise ConfigError("--group request needs --list-column (a column of the examples' schema)")
        return [list_column]
    raise ConfigError(f"--group: {group!r} is not one of user_day, user_window, request")


def check_schema(cols: list[examples.Column], config, needed: list[str]) -> None:
    """Every column the replay reads is in the shards' schema, and each model input has the kind the model takes."""
    kinds = {c.name: c.kind for c in cols}
    missing = [n for n in needed if n not in kinds]
    if missing:
        raise ConfigError(f"--examples: columns {missing} not in schema.json (has {sorted(kinds)})")
    wrong = [(f.name, kinds[f.name], f.raw_dtype) for f in config.serving_features if kinds[f.name] != f.raw_dtype]
    if wrong:
        raise ConfigError(f"--examples: feature kinds differ from the model's (name, shards, model): {wrong}")


def pack(cols: dict[str, np.ndarray]) -> dict:
    """(n,) columns -> a few arrays that pickle fast (a GroupByKey encodes its elements): every int64 column in one
    (Ci, n) block, every float32 column in one (Cf, n) block, strings as fixed-width bytes, the rest as they are."""
    ints = [k for k, v in cols.items() if v.dtype == np.int64]
    floats = [k for k, v in cols.items() if v.dtype == np.float32]
    rest = {k: v for k, v in cols.items() if k not in set(ints) | set(floats)}
    return {"int": (ints, np.stack([cols[k] for k in ints]) if ints else None),
            "float": (floats, np.stack([cols[k] for k in floats]) if floats else None), "rest": rest}


def unpack(packed: dict) -> dict[str, np.ndarray]:
    out = {}
    for kind in ("int", "float"):
        names, block = packed[kind]
        out |= {k: block[j] for j, k in enumerate(names)}
    return out | packed["rest"]


def take(packed: dict, idx: np.ndarray | slice) -> dict:
    """The rows ``idx`` (indices, or a slice: views) of a packed batch."""
    return {"int": (packed["int"][0], None if packed["int"][1] is None else packed["int"][1][:, idx]),
            "float": (packed["float"][0], None if packed["float"][1] is None else packed["float"][1][:, idx]),
            "rest": {k: v[idx] for k, v in packed["rest"].items()}}


_PARSERS: dict = {}  # the columns' (name, kind) -> the traced record parser, once per worker process


def file_sizes(files: list[str], sized_as: dict[str, str] | None = None) -> dict[str, int]:
    """Bytes of each of ``files``, or of the file ``sized_as`` maps it to: a Parquet shard counts as its TFRecord
    twin, so that passes and read groups, and with them the batches the model scores (its float rounding depends
    on the batch), are the same whichever format is read, and so is replay.json, bit for bit."""
    from apache_beam.io.filesystems import FileSystems

    sized_as = sized_as or {}
    sizes = {m.path: m.size_in_bytes for r in FileSystems.match([sized_as.get(f, f) for f in files])
             for m in r.metadata_list}
    return {f: sizes.get(sized_as.get(f, f), 0) for f in files}


def read_groups(files: list[str], read_mb: float, sized_as: dict[str, str] | None = None) -> list[list[str]]:
    """``files`` cut into consecutive groups of about ``read_mb`` MB (at least one file each; ``file_sizes``): the
    element that one reader reads. Building a tf.data dataset and its iterator costs ~0.15 s (the parser's graph is
    traced into the dataset and optimised each time), as long as reading ~6k rows: one dataset per file took half
    the replay."""
    sizes = file_sizes(files, sized_as)
    groups: list[list[str]] = [[]]
    held = 0
    for f in files:
        if groups[-1] and held + sizes.get(f, 0) > read_mb * 2**20:
            groups.append([])
            held = 0
        groups[-1].append(f)
        held += sizes.get(f, 0)
    return groups


class ReadExampleShards(beam.DoFn):
    """A group of shard paths -> one dict of (n,) columns per record batch, with the list key's hash (``HASH``).
    One tf.data pipeline per group (``read_groups``), parsing in its own thread while Python converts the previous
    batch. The parser is traced once per process (``_PARSERS``), not per pass: a pass is a new pipeline, a new
    DoFn."""

    def __init__(self, cols: list[examples.Column], key_columns: list[str], batch_rows: int = 65536):
        self.cols, self.key_columns, self.batch_rows = cols, key_columns, batch_rows

    def setup(self):
        key = tuple((c.name, c.kind) for c in self.cols)
        if key not in _PARSERS:
            import tensorflow as tf

            spec = examples.parse_spec(self.cols)
            _PARSERS[key] = tf.function(lambda b: tf.io.parse_example(b, spec))
        self._parse = _PARSERS[key]
        self._keys = {c.name for c in self.cols if c.kind == "string"
                      and (c.name.startswith("key/") or c.name in self.key_columns)}

    def process(self, paths: list[str]):
        import tensorflow as tf

        ds = tf.data.TFRecordDataset(list(paths), compression_type=examples.COMPRESSION).batch(self.batch_rows)
        for batch in ds.map(self._parse, num_parallel_calls=1).prefetch(1):
            cols = {}
            for k, v in batch.items():
                v = v.numpy()
                if v.dtype == object:  # keys as text; features as fixed-width bytes (the signature takes tf.string)
                    v = v.astype(str).astype(object) if k in self._keys else v.astype(bytes)
                cols[k] = v
            cols[HASH] = key_hash([cols[k] for k in self.key_columns])
            yield cols


class ReadParquetShards(beam.DoFn):
    """``ReadExampleShards`` from the Parquet shards of the same rows: a group of paths -> one dict of (n,) columns
    per batch of ``batch_rows`` rows, batches running across the group's files as the TFRecord reader's do (so the
    model sees the same batches), the same dtypes (keys as str objects, string features as fixed-width bytes) and
    ``HASH``. pyarrow in a DoFn rather than Beam's ``ReadFromParquetBatched``: that yields one table per row group
    (a file here), so batches would end at files, and its schema errors are pyarrow's; this keeps ``read_groups``
    (the unit of parallelism) and the one-line errors of ``features.examples.table_columns``."""

    def __init__(self, cols: list[examples.Column], key_columns: list[str], batch_rows: int = 65536):
        self.cols, self.key_columns, self.batch_rows = cols, key_columns, batch_rows

    def setup(self):
        self._keys = {c.name for c in self.cols if c.kind == "string"
                      and (c.name.startswith("key/") or c.name in self.key_columns)}

    def _columns(self, table) -> dict[str, np.ndarray]:
        cols = examples.table_columns(table, self.cols, self._keys)
        cols[HASH] = key_hash([cols[k] for k in self.key_columns])
        return cols

    def process(self, paths: list[str]):
        import pyarrow as pa
        import pyarrow.parquet as pq
        from apache_beam.io.filesystems import FileSystems

        names = [c.name for c in self.cols]
        pending, held = [], 0
        for path in paths:
            with FileSystems.open(path) as f:
                table = pq.read_table(f, columns=names, use_threads=False)  # the runner's workers parallelise
            nulls = [n for n in names if table.column(n).null_count]
            if nulls:
                raise ConfigError(f"{path}: column {nulls[0]!r} has nulls (the examples have none)")
            pending.append(table)
            held += table.num_rows
            if held < self.batch_rows:
                continue
            table = pa.concat_tables(pending)
            start = 0
            while held - start >= self.batch_rows:
                yield self._columns(table.slice(start, self.batch_rows))
                start += self.batch_rows
            pending, held = [table.slice(start)], held - start
        if held:
            yield self._columns(pa.concat_tables(pending))


def bucket_fragments(batch: dict[str, np.ndarray], keep: list[str], buckets: int):
    """A scored batch -> (bucket, fragment) per bucket present: its rows of ``keep`` columns, packed (``pack``)."""
    bucket = batch[HASH] % np.uint64(buckets)
    by = np.argsort(bucket, kind="stable")
    packed = take(pack({k: batch[k] for k in keep}), by)  # rows in bucket order: one gather, then slices
    bucket = bucket[by]
    cuts = [0, *(np.flatnonzero(np.diff(bucket)) + 1).tolist(), len(bucket)]
    for start, stop in zip(cuts[:-1], cuts[1:], strict=True):
        yield int(bucket[start]), take(packed, slice(start, stop))


def merge_fragments(item) -> dict[str, np.ndarray]:
    """(bucket, fragments) -> one bucket of (n,) columns in log order (``key/row``): ties in the logged order then
    break by row, as the in-process replay breaks them by file position."""
    _, fragments = item
    fragments = list(fragments)
    first = fragments[0]
    merged = {kind: (first[kind][0], None if first[kind][1] is None else
                     np.concatenate([f[kind][1] for f in fragments], axis=1)) for kind in ("int", "float")}
    merged["rest"] = {k: np.concatenate([f["rest"][k] for f in fragments]) for k in first["rest"]}
    cols = unpack(merged)
    order = np.argsort(cols[examples.ROW], kind="stable")
    return {k: v[order] for k, v in cols.items()}


class GroupIntoLists(beam.PTransform):
    """Scored batches -> buckets: every row of a list (all rows sharing the list key) in one element, in log order,
    with the columns ``keep`` only."""

    def __init__(self, keep: list[str], buckets: int):
        super().__init__()
        self.keep, self.buckets = keep, buckets

    def expand(self, batches):
        return (batches
                | "ByBucket" >> beam.FlatMap(bucket_fragments, self.keep, self.buckets)
                | "ByListKey" >> beam.GroupByKey()
                | "MergeBucket" >> beam.Map(merge_fragments))


# ---------------------------------------------------------------- scoring


_SERVABLES: dict = {}  # version dir -> ranking.servable.Servable, loaded once per worker process


class ServableHandler(ModelHandler):
    """RunInference on record batches: the exported version loaded once per worker
    (``ranking.servable.load_servable``), its serving signature called on the feature columns of ``max_batches``
    batches at a time, in slices of ``max_rows``; each batch comes back with ``pred/<task>`` (corrected, float32:
    what the in-process ``ScoredLog`` keeps)."""

    def __init__(self, version_dir: str, features: list[str], tasks: list[str], sampling: dict,
                 signature: str = "serving_default", max_batches: int = 1, max_rows: int = 65536):
        super().__init__(min_batch_size=1, max_batch_size=max_batches)
        self.version_dir, self.features, self.tasks, self.sampling = version_dir, features, tasks, sampling
        self.signature_name, self.max_rows = signature, max_rows

    def load_model(self):
        """One load per process for every pass: each pass is a new pipeline, and loading the SavedModel again per
        pass grew the driver by ~28 MB a pass (40 passes at 10M rows: 0.18 -> 2.3 GB before the passes' own rows)."""
        from ranking.servable import load_servable

        if self.version_dir not in _SERVABLES:
            _SERVABLES[self.version_dir] = load_servable(self.version_dir)
        return _SERVABLES[self.version_dir]

    def run_inference(self, batch, model, inference_args=None):
        sizes = [len(b[examples.ROW]) for b in batch]
        x = {f: np.concatenate([b[f] for b in batch]) for f in self.features}
        preds = corrected_predictions(model.signature(self.signature_name), x, self.sampling, self.tasks,
                                      self.max_rows)
        start = 0
        for b, n in zip(batch, sizes, strict=True):
            yield {**b, **{PRED + t: p[start:start + n] for t, p in preds.items()}}
            start += n

    def get_num_bytes(self, batch) -> int:
        return int(sum(v.nbytes for b in batch for v in b.values()))


# ---------------------------------------------------------------- metrics


def bucket_scored_log(bucket: dict[str, np.ndarray], model: dict, list_column: str | None = None,
                      truth_columns: tuple[str, ...] = ()) -> ScoredLog:
    tasks = model["tasks"]
    return ScoredLog(bucket[examples.USER], bucket[examples.DAY], bucket[examples.ORDER],
                     {t: bucket[PRED + t] for t in tasks}, {t: bucket[examples.LABEL + t] for t in tasks}, model,
                     bucket[list_column] if list_column else None,
                     {c: bucket[c].astype(np.float64) for c in truth_columns})


class ListMetrics(beam.DoFn):
    """A scored bucket -> its lists' metrics for every profile (``per_list_metrics``), counts and list hashes."""

    def __init__(self, model: dict, profiles: dict, group: str, min_list: int, k: int, calibration: dict | None,
                 list_column: str | None = None, truth_columns: tuple[str, ...] = ()):
        self.model, self.profiles, self.group, self.min_list, self.k = model, profiles, group, min_list, k
        self.calibration, self.list_column, self.truth_columns = calibration, list_column, truth_columns

    def process(self, bucket):
        from fusion.replay import list_counts, make_lists, ndcg_tasks, per_list_metrics

        scored = bucket_scored_log(bucket, self.model, self.list_column, self.truth_columns)
        lists = make_lists(scored, self.group, self.min_list)
        out = {"days": sorted(set(scored.day.tolist())), "counts": None, "hash": None, "metrics": {}}
        if len(lists.lengths):
            out["counts"] = list_counts(lists, scored.labels, ndcg_tasks(scored))
            out["hash"] = bucket[HASH][lists.index[:, 0]]  # (L,) the list key's hash, from its first row
            out["metrics"] = {name: per_list_metrics(scored, lists, prof, self.k, self.calibration)
                              for name, prof in self.profiles.items()}
        yield out


class ReplayCombineFn(beam.CombineFn):
    """Buckets' per-list metrics -> counts, days, and per (profile or difference, metric): lists, sum, (K,)
    Poisson-weighted sums and (K,) weight totals. Merges by addition; the output is ``fusion.replay.evaluate``'s."""

    def __init__(self, reps: int, reference: str | None, group: str, min_list: int, k: int):
        self.reps, self.reference, self.group, self.min_list, self.k = reps, reference, group, min_list, k

    def create_accumulator(self):
        return {"days": set(), "counts": {}, "metrics": {}, "differences": {}}

    def add_input(self, acc, bucket):
        acc["days"].update(bucket["days"])
        if bucket["counts"] is None:
            return acc
        for key, v in bucket["counts"].items():
            if key != "mean_length":
                acc["counts"][key] = acc["counts"].get(key, 0) + v
        per = bucket["metrics"]
        cells = [("metrics", name, metric, v) for name, m in per.items() for metric, v in m.items()]
        if self.reference in per:
            ref = per[self.reference]
            cells += [("differences", name, x, m[x] - ref[x]) for name, m in per.items() if name != self.reference
                      for x in m if x in ref]
        # one BLAS thread: the runner's workers are the parallelism, and OpenBLAS's threads on cores the model (or
        # another job) holds took 1.1-3.5 s of CPU against 0.6 s at 1M rows; the sums no longer depend on how many
        # cores the machine has either (OpenBLAS rounds by its thread count)
        with threadpool_limits(1, user_api="blas"):
            sums = bootstrap_sums(np.stack([v for *_, v in cells], axis=1), poisson_weights(bucket["hash"],
                                                                                           self.reps))
        for (table, name, metric, _), n, s, rs, rw in zip(cells, *sums, strict=True):
            row = acc[table].setdefault(name, {})
            if metric in row:
                a = row[metric]
                a[0] += int(n)
                a[1] += float(s)
                a[2] += rs
                a[3] += rw
            else:
                row[metric] = [int(n), float(s), rs.copy(), rw.copy()]
        return acc

    def merge_accumulators(self, accumulators):
        accumulators = iter(accumulators)
        out = next(accumulators)
        for acc in accumulators:
            out["days"] |= acc["days"]
            for key, v in acc["counts"].items():
                out["counts"][key] = out["counts"].get(key, 0) + v
            for table in ("metrics", "differences"):
                for name, row in acc[table].items():
                    for metric, (n, s, rs, rw) in row.items():
                        mine = out[table].setdefault(name, {})
                        if metric in mine:
                            a = mine[metric]
                            a[0] += n
                            a[1] += s
                            a[2] = a[2] + rs
                            a[3] = a[3] + rw
                        else:
                            mine[metric] = [n, s, rs.copy(), rw.copy()]
        return out

    @staticmethod
    def _summary(row: dict) -> dict:
        out = {}
        for metric, (n, s, rs, rw) in row.items():
            lo, hi = interval_from_sums(rs, rw) if n else (float("nan"), float("nan"))
            out[metric] = {"mean": s / n if n else float("nan"), "ci95": [lo, hi], "lists": int(n)}
        return out

    def extract_output(self, acc):
        counts = dict(acc["counts"])
        if not counts.get("lists"):
            raise ConfigError(f"--min-list {self.min_list}: no {self.group} list is that long")
        lists, rows = counts.pop("lists"), counts.pop("rows")
        counts = {"lists": lists, "mean_length": rows / lists, "rows": rows, **counts}
        result = {"counts": counts, "group": self.group, "min_list": self.min_list, "k": self.k,
                  "metrics": {n: self._summary(r) for n, r in acc["metrics"].items()}, "differences": {}}
        if self.reference in acc["metrics"]:
            result["reference"] = self.reference
            result["differences"] = {n: self._summary(r) for n, r in acc["differences"].items()}
        return {"days": sorted(acc["days"]), **result}


class _Accumulate(ReplayCombineFn):
    """``ReplayCombineFn`` whose output is its accumulator: one pass's part, merged with the others' on the driver."""

    def extract_output(self, acc):
        return acc


# ---------------------------------------------------------------- scored lists as Parquet


class WriteScored(beam.DoFn):
    """A scored bucket -> ``DIR/part-<first row>.parquet`` (one file per bucket; the name is the bucket's first row
    id, so a rerun overwrites rather than duplicates)."""

    def __init__(self, out_dir: str, tasks: list[str], list_column: str | None = None,
                 truth_columns: tuple[str, ...] = ()):
        self.out_dir, self.tasks, self.list_column, self.truth_columns = out_dir, tasks, list_column, truth_columns

    def process(self, bucket):
        import pyarrow.parquet as pq
        from apache_beam.io.filesystems import FileSystems

        path = f"{self.out_dir.rstrip('/')}/part-{int(bucket[examples.ROW][0]):020d}.parquet"
        with FileSystems.create(path) as f:
            pq.write_table(scored_table(
                bucket[examples.USER], bucket[examples.DAY], bucket[examples.ORDER], bucket[examples.ROW],
                {t: bucket[PRED + t] for t in self.tasks}, {t: bucket[examples.LABEL + t] for t in self.tasks},
                bucket[self.list_column] if self.list_column else None,
                {c: bucket[c] for c in self.truth_columns}), f)
        yield path


# ---------------------------------------------------------------- the job


def write_text(text: str, path: str) -> str:
    """Write ``text`` to ``path`` on any Beam filesystem (local, gs://, ...)."""
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.create(path) as f:
        f.write(text.encode())
    return path


def write_bytes(data: bytes, path: str) -> str:
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.create(path) as f:
        f.write(data)
    return path


def write_json(result: dict, path: str) -> str:
    return write_text(json.dumps(result, indent=1, default=float), path)


def beam_replay(version_dir: Path, examples_dir: str, profiles: dict, out: str, calibration: dict | None = None,
                days: list[int] | None = None, group: str = "user_day", min_list: int = 5, k: int = 5,
                reps: int = 1000, reference: str | None = "click_only", list_column: str | None = None,
                truth_columns: tuple[str, ...] = (), buckets: int = 64, batch_rows: int = 65536,
                scored_out: str | None = None, pipeline_args: list[str] | None = None, extra: dict | None = None,
                passes: int | None = None, rows_per_pass: int = 1_000_000, read_mb: float = 64.0,
                read_format: str = "auto") -> dict:
    """Run the replay pipeline; writes ``out/replay.json`` (``evaluate``'s result, plus ``days``, ``model`` and
    ``extra``) and returns it. ``scored_out``: also the scored rows as Parquet (``read_scored`` reads them).
    The shards go through in ``passes`` pipelines over disjoint groups of files that each hold whole lists
    (``pass_files``; default: one pass per ``rows_per_pass`` rows of the shards' manifest), so a runner that holds a
    shuffle in memory (DirectRunner) holds one pass's rows and every shard is read once; each pass's accumulator is
    merged on the driver by ``ReplayCombineFn.merge_accumulators``. Within a pass, one element of the read is
    ``read_mb`` MB of shards (``read_groups``). ``read_format``: which shards (``input_shards``: "auto" reads
    Parquet when the feature pipeline wrote it); the result does not depend on it."""
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.options.pipeline_options import PipelineOptions

    from features.spec import parse_config
    from ranking.servable import load_metadata

    meta = load_metadata(version_dir)
    config = parse_config(meta["feature_spec"], f"{version_dir} metadata")  # the driver never loads the SavedModel
    tasks = [t.name for t in config.tasks]
    model = {"name": meta["model_name"], "version": meta["version"], "path": str(version_dir),
             "training_window": meta.get("training_window"), "log": str(examples_dir), "tasks": tasks,
             "task_types": {t.name: t.type for t in config.tasks}}
    cols = read_schema(examples_dir)
    keys = list_key_columns(group, list_column)
    features = [f.name for f in config.serving_features]
    measured = [*(examples.LABEL + t for t in tasks), examples.USER, examples.DAY, examples.ORDER, examples.ROW,
                *keys, *truth_columns]
    needed = [*features, *measured]
    check_schema(cols, config, needed)
    read_cols = [c for c in cols if c.name in set(needed)]
    keep = sorted({*measured, HASH, *(PRED + t for t in tasks)})  # what the lists' metrics and WriteScored read
    read_format, files, sized_as = input_shards(examples_dir, days, read_format)
    if read_format == examples.PARQUET:
        check_parquet_files(files, read_cols)
        reader = ReadParquetShards(read_cols, keys, batch_rows)
    else:
        reader = ReadExampleShards(read_cols, keys, batch_rows)
    handler = ServableHandler(str(version_dir), features, tasks, meta["sampling"],
                              meta.get("signature", "serving_default"))
    for d in (out, scored_out) if scored_out else (out,):
        if not FileSystems.exists(d):
            FileSystems.mkdirs(d)
    if scored_out:
        write_json({"model": model, "examples": str(examples_dir), "days": days, "list_column": list_column,
                    "truth_columns": list(truth_columns)},
                   f"{scored_out.rstrip('/')}/{SCORED_META}")
    if passes is None:
        passes = max(1, math.ceil(manifest_rows(examples_dir, days) / rows_per_pass))
    if passes < 1:
        raise ConfigError(f"--passes {passes}: must be at least 1")
    groups = pass_files(files, group, passes, sized_as)
    passes = len(groups)
    options = PipelineOptions(pipeline_args or [])
    combine = ReplayCombineFn(reps, reference, group, min_list, k)
    total = combine.create_accumulator()  # the passes' parts merged as they come: one accumulator held, not P
    for index in range(passes):
        if passes > 1:
            print(f"replay: pass {index + 1}/{passes} ({len(groups[index])} shard files, RSS {rss_gb():.2f} GB)",
                  file=sys.stderr, flush=True)
        part = f"{out.rstrip('/')}/.pass-{index}.pkl"
        with one_line_errors(), beam.Pipeline(options=options) as p:  # a worker's ConfigError: its one line
            scored = (p
                      | "Shards" >> beam.Create(read_groups(groups[index], read_mb, sized_as))
                      | "ReadBatches" >> beam.ParDo(reader)
                      | "RunInference" >> RunInference(handler)
                      | "GroupIntoLists" >> GroupIntoLists(keep, buckets))
            _ = (scored
                 | "ListMetrics" >> beam.ParDo(ListMetrics(model, profiles, group, min_list, k, calibration,
                                                           list_column, truth_columns))
                 | "Combine" >> beam.CombineGlobally(_Accumulate(reps, reference, group, min_list, k))
                 | "SavePart" >> beam.Map(lambda acc, path: write_bytes(pickle.dumps(acc), path), part))
            if scored_out:
                _ = scored | "WriteScored" >> beam.ParDo(WriteScored(scored_out, tasks, list_column, truth_columns))
        with FileSystems.open(part) as f:
            total = combine.merge_accumulators([total, pickle.loads(f.read())])
        FileSystems.delete([part])
    result = {"model": model, **(extra or {}), **combine.extract_output(total)}
    write_json(result, f"{out.rstrip('/')}/replay.json")
    return json.loads(json.dumps(result, default=float))


def pass_files(files: list[str], group: str, passes: int, sized_as: dict[str, str] | None = None
               ) -> list[list[str]]:
    """``files`` cut into at most ``passes`` groups, each holding whole lists, balanced by bytes (``file_sizes``;
    largest first onto the lightest group). A list lies within one unit of files: the feature pipeline writes a
    user's rows of a pass to files ``part-p<pass>-*`` (``features.pipeline``), and a user-day list within one day
    directory, so the units are (day directory, pass) for ``user_day`` and the pass otherwise; more passes than
    units give one per unit."""
    import re

    units: dict[tuple[str, str], list[str]] = {}
    for f in files:
        parent, name = f.rstrip("/").rsplit("/", 2)[-2:]
        match = re.match(r"part-(p\d+)-", name)
        unit = (parent if group == "user_day" else "", match.group(1) if match else "")
        units.setdefault(unit, []).append(f)
    per_file = file_sizes(files, sized_as)
    sizes = {u: sum(per_file[f] for f in fs) for u, fs in units.items()}
    bins: list[tuple[int, list[str]]] = [(0, []) for _ in range(min(passes, len(units)))]
    for u in sorted(units, key=lambda u: (-sizes[u], u)):
        i = min(range(len(bins)), key=lambda j: (bins[j][0], j))
        bins[i] = (bins[i][0] + sizes[u], bins[i][1] + units[u])
    return [sorted(fs) for _, fs in bins]


def manifest_rows(examples_dir: str, days: list[int] | None) -> int:
    """Rows of ``days`` (all if None) by the feature pipeline's ``manifest.json``; 0 without one."""
    from apache_beam.io.filesystems import FileSystems

    path = f"{examples_dir.rstrip('/')}/manifest.json"
    if not FileSystems.exists(path):
        return 0
    with FileSystems.open(path) as f:
        per_day = json.loads(f.read()).get("rows_per_day", {})
    return sum(int(n) for d, n in per_day.items() if days is None or int(d) in set(days))

