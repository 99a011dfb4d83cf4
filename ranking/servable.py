"""The one loader of exported model versions: version directories, metadata, signatures and warmup.

The ranking service's in-process backend, the local model server, replay and the benchmarks all load a version
through ``load_servable``. A version lives at ``<model_base_path>/<integer version>/`` (TF Serving's layout) with
``assets.extra/rankstage_metadata.json`` (feature spec, tasks, down-sampling rates) and
``assets.extra/tf_serving_warmup_requests`` (a TFRecord of PredictionLog, as TF Serving reads it).

C candidates.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from features.spec import ConfigError, RankstageConfig, parse_config

METADATA_FILE = "rankstage_metadata.json"
WARMUP_FILE = "tf_serving_warmup_requests"
RANK_CANDIDATES_PACKED = "rank_candidates_packed"


def pack_inputs(layout: dict[str, list[str]], inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Named ``rank_candidates`` inputs ((1,) per request feature, (C,) per candidate feature) -> the inputs of
    ``rank_candidates_packed``: per group of ``layout`` (``request_<dtype>`` / ``candidates_<dtype>`` -> names) one
    (1, k) or (C, k) array, columns in layout order. Six tensors instead of ~40: building an eager tensor costs
    ~10 µs whatever its size, which made tensor creation ~0.4 ms of a Rank call. A column whose dtype the group
    cannot hold without changing values (floats in an int64 group, numbers in a string group) is a ValueError
    naming it, never a silent cast."""
    out = {}
    for group, names in layout.items():
        kind = group.rsplit("_", 1)[1]
        dtype = object if kind == "string" else np.dtype(kind)
        allowed = _PACKABLE_KINDS.get(kind, "fiub")
        cols = [np.asarray(inputs[n]) for n in names]
        for name, col in zip(names, cols):
            if col.dtype.kind not in allowed:
                raise ValueError(f"input {name!r}: dtype {col.dtype} cannot be packed into {group!r}")
        out[group] = np.stack(cols, axis=1).astype(dtype, copy=False)
    return out


_PACKABLE_KINDS = {"string": "OUS", "int64": "iub", "int32": "iub"}  # others (float32): any number


def list_versions(base: str | Path) -> list[int]:
    """Integer versions under a model base path that hold a ``saved_model.pb``, ascending."""
    base = Path(base)
    if not base.is_dir():
        return []
    return sorted(int(p.name) for p in base.iterdir()
                  if p.is_dir() and p.name.isdigit() and (p / "saved_model.pb").exists())


def next_version(base: str | Path) -> int:
    """The next free version number (directories being written count as taken)."""
    base = Path(base)
    taken = [int(p.name) for p in base.iterdir() if p.is_dir() and p.name.isdigit()] if base.exists() else []
    return max(taken, default=0) + 1


@contextlib.contextmanager
def staged_version(base: str | Path, version: int | None = None) -> Iterator[tuple[int, Path]]:
    """Write a new version atomically: yields ``(version, tmp)``, a private directory under ``base`` to fill; on
    a clean exit it is renamed to ``base/<version>`` (TF Serving never sees a half-written version), on an error it
    is removed. ``version`` None takes ``next_version``; an existing version is refused (versions are immutable)."""
    base = Path(base)
    base.mkdir(parents=True, exist_ok=True)
    version = version or next_version(base)
    final = base / str(version)
    if final.exists():
        raise FileExistsError(f"--version {version}: {final} already exists; versions are immutable")
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=base))
    try:
        yield version, tmp
        tmp.chmod(0o755)  # mkdtemp makes it private; the model server may run as another user
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def latest_version(base: str | Path) -> Path:
    """The newest version directory under ``base``; FileNotFoundError if there is none."""
    versions = list_versions(base)
    if not versions:
        raise FileNotFoundError(f"no model versions under {base}")
    return Path(base) / str(versions[-1])


def resolve_version(path: str | Path) -> Path:
    """A version directory itself, or the newest version under a model base path."""
    p = Path(path)
    if (p / "saved_model.pb").exists():
        return p
    if not p.exists():
        raise ConfigError(f"--model-base-path: not found: {p}")
    return latest_version(p)


def version_stamp(version_dir: str | Path) -> tuple:
    """(relative path, mtime_ns, size) of every file and directory under a version: changes when any of it is
    rewritten (a repaired saved_model.pb does not change the directory's own mtime). A refused version is retried
    only when this changes."""
    version_dir = Path(version_dir)
    entries = []
    for p in sorted([version_dir, *version_dir.rglob("*")]):
        try:
            st = p.stat()
        except FileNotFoundError:
            continue
        entries.append((str(p.relative_to(version_dir)), st.st_mtime_ns, st.st_size))
    return tuple(entries)


def load_metadata(version_dir: str | Path) -> dict:
    path = Path(version_dir) / "assets.extra" / METADATA_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"model version {version_dir}: no metadata ({path} missing)") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"model version {version_dir}: metadata {path} is not valid JSON: {err}") from None


@dataclass
class Servable:
    """One loaded model version. ``loaded`` must outlive ``signatures`` (they hold its variables weakly)."""

    version_dir: Path
    version: int
    metadata: dict
    config: RankstageConfig
    loaded: object
    signatures: dict[str, Callable[..., dict]] = field(repr=False)

    @property
    def name(self) -> str:
        return self.metadata["model_name"]

    @property
    def tasks(self) -> list[str]:
        return [o["task"] for o in self.metadata["outputs"]]

    @property
    def sampling(self) -> dict[str, dict]:
        return self.metadata["sampling"]

    def signature(self, name: str = "serving_default") -> Callable[..., dict]:
        if name not in self.signatures:
            raise ConfigError(f"signature {name!r} not in model {self.name} version {self.version} "
                              f"(has {sorted(self.signatures)})")
        return self.signatures[name]

    def predict(self, inputs: dict[str, np.ndarray], signature: str = "serving_default") -> dict[str, np.ndarray]:
        """Raw numpy inputs -> {task: (C,) numpy} through a signature (no correction, no calibration)."""
        fast = self._flat_calls.get(signature)
        if fast is not None:
            return fast(inputs)
        import tensorflow as tf

        out = self.signature(signature)(**{k: tf.constant(v) for k, v in inputs.items()})
        return {k: v.numpy() for k, v in out.items()}

    _flat_calls: dict[str, FlatCall] = field(default_factory=dict, repr=False)

    def enable_flat_calls(self, sample_inputs: dict[str, dict[str, np.ndarray]]) -> list[str]:
        """Switch each signature in ``sample_inputs`` to ``FlatCall`` if it gives the same outputs as the public
        call on those inputs (bit for bit); returns the signatures switched. Used by the serving paths."""
        switched = []
        for name, inputs in sample_inputs.items():
            fast = FlatCall.build(self.signature(name))
            if fast is None:
                continue
            want = self.predict(inputs, name)
            got = fast(inputs)
            if want.keys() == got.keys() and all(np.array_equal(want[k], got[k], equal_nan=True) for k in want):
                self._flat_calls[name] = fast
                switched.append(name)
        return switched


class FlatCall:
    """A signature called with its flat tensor list: skips the keyword binding of the public call (~0.3 ms for
    39 inputs) and builds eager tensors directly (~0.25 ms). Relies on TF's ``ConcreteFunction._call_flat`` (TF
    2.20); ``build`` returns None where that is absent, and ``Servable.enable_flat_calls`` only switches to it
    after checking it against the public call."""

    def __init__(self, fn, call_flat: Callable, names: list[str], dtypes: list[int],
                 shapes: list[tuple[int | None, ...]], device: str):
        self.fn, self.call_flat, self.names, self.dtypes, self.device = fn, call_flat, names, dtypes, device
        self.shapes = shapes  # the signature's input shapes (None: any size), checked as the public call does
        self.captured = fn.captured_inputs

    @classmethod
    def build(cls, fn) -> FlatCall | None:
        """None unless ``fn`` is a keyword-only ConcreteFunction whose flat inputs are its keyword names. A loaded
        signature's ``_call_flat`` checks each captured variable for being distributed on every call (~0.45 ms
        for 128 variables); with none distributed the plain ConcreteFunction's ``_call_flat`` is the same call."""
        from tensorflow.python.distribute import distribute_utils
        from tensorflow.python.eager import context
        from tensorflow.python.eager.polymorphic_function.concrete_function import ConcreteFunction

        args, kwargs = fn.structured_input_signature
        if args or not isinstance(fn, ConcreteFunction) or not hasattr(ConcreteFunction, "_call_flat"):
            return None
        names = [t.name.split(":")[0] for t in fn.inputs[: len(fn.inputs) - len(fn.captured_inputs)]]
        if sorted(names) != sorted(kwargs):
            return None
        distributed = any(distribute_utils.is_distributed_variable(x) for x in fn.captured_inputs)
        call_flat = fn._call_flat if distributed else partial(ConcreteFunction._call_flat, fn)
        return cls(fn, call_flat, names, [kwargs[n].dtype.as_datatype_enum for n in names],
                   [tuple(kwargs[n].shape.as_list()) for n in names], context.context().device_name)

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from tensorflow.python.framework.ops import EagerTensor

        missing = [n for n in self.names if n not in inputs]
        if missing or len(inputs) != len(self.names):
            raise ConfigError(f"model inputs: missing {missing}, unexpected {sorted(set(inputs) - set(self.names))}")
        for n, want in zip(self.names, self.shapes):
            got = np.shape(inputs[n])
            if len(got) != len(want) or any(w is not None and g != w for g, w in zip(got, want)):
                raise ValueError(f"input {n!r}: shape {got} is not compatible with the signature's "
                                 f"{tuple('?' if w is None else w for w in want)}")
        flat = [EagerTensor(inputs[n], self.device, d) for n, d in zip(self.names, self.dtypes)]
        out = self.call_flat(flat, self.captured)
        return {k: v.numpy() for k, v in out.items()}


def load_servable(path: str | Path) -> Servable:
    """Load a version directory (or the newest under a base path): SavedModel, signatures, metadata, spec."""
    import tensorflow as tf

    version_dir = resolve_version(path)
    meta = load_metadata(version_dir)
    config = parse_config(meta["feature_spec"], f"{version_dir} metadata")
    loaded = tf.saved_model.load(str(version_dir))
    return Servable(version_dir, int(version_dir.name) if version_dir.name.isdigit() else int(meta["version"]),
                    meta, config, loaded, dict(loaded.signatures))


def read_warmup_requests(version_dir: str | Path) -> list:
    """The PredictRequests of ``assets.extra/tf_serving_warmup_requests`` (empty if the file is absent)."""
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    path = Path(version_dir) / "assets.extra" / WARMUP_FILE
    if not path.exists():
        return []
    requests = []
    for record in tf.data.TFRecordDataset(str(path)):
        log = prediction_log_pb2.PredictionLog.FromString(record.numpy())
        if log.WhichOneof("log_type") != "predict_log":
            raise ConfigError(f"warmup record in {path}: only predict_log records are supported, got "
                              f"{log.WhichOneof('log_type')!r}")
        requests.append(log.predict_log.request)
    return requests


def run_warmup(servable: Servable, pause_s: float = 0.0, flat_calls: bool = False) -> int:
    """Run every warmup record through its signature; raise ConfigError on a failure or a non-finite output.

    Returns the number of records run. This is what TF Serving does before a version takes traffic. ``pause_s``
    sleeps between records, leaving the cores to the calls being served while a new version warms beside them.
    ``flat_calls``: afterwards switch each warmed signature to ``FlatCall`` (checked on its first record)."""
    import time

    import tensorflow as tf

    requests = read_warmup_requests(servable.version_dir)
    for i, req in enumerate(requests):
        if i and pause_s > 0:
            time.sleep(pause_s)
        sig = req.model_spec.signature_name or "serving_default"
        inputs = {k: tf.make_ndarray(v) for k, v in req.inputs.items()}
        try:
            out = servable.predict(inputs, sig)
        except Exception as err:  # any TF error in a warmup call means the version must not take traffic
            raise ConfigError(f"model {servable.version_dir}: warmup record {i} ({sig}) failed: "
                              f"{type(err).__name__}: {str(err)[:300]}") from None
        for task, v in out.items():
            if not np.all(np.isfinite(v)):
                raise ConfigError(f"model {servable.version_dir}: warmup record {i} ({sig}) gave non-finite "
                                  f"{task!r} outputs")
    if flat_calls:
        samples: dict[str, dict[str, np.ndarray]] = {}
        for req in requests:
            samples.setdefault(req.model_spec.signature_name or "serving_default",
                               {k: tf.make_ndarray(v) for k, v in req.inputs.items()})
        servable.enable_flat_calls(samples)
    return len(requests)


@contextlib.contextmanager
def paced_load(duty: float = 1.0, slice_s: float = 0.001, clock: Callable[[], float] = time.perf_counter,
               sleep: Callable[[float], None] = time.sleep) -> Iterator[None]:
    """Load (and warm) a version beside one that is serving, in this thread, without starving the serving threads.

    Loading a SavedModel is ~2 s of Python holding the GIL on these machines; unpaced, the p99 of the calls served
    meanwhile rose ~5x (max 300 ms with a full garbage collection of the loader's objects). Here the loading thread
    runs at most ``duty`` of the time (it sleeps ``slice_s * (1 - duty) / duty`` after each ``slice_s`` of Python,
    checked from a profile hook on this thread only), Python switches threads every 0.5 ms instead of 5 ms, and
    the cyclic garbage collector is off until the load ends. ``duty=1`` keeps only the last two. ``clock`` (seconds)
    and ``sleep`` are the pacer's time source and pause; tests pass fakes to check the accounting."""
    if not 0 < duty <= 1:
        raise ConfigError(f"load duty: must be in (0, 1], got {duty}")
    old_interval, gc_was_enabled, old_profile = sys.getswitchinterval(), gc.isenabled(), sys.getprofile()
    rest_s, state = slice_s * (1 - duty) / duty, {"t": clock(), "n": 0}

    def pacer(frame, event, arg) -> None:
        state["n"] += 1
        if state["n"] % 64 == 0 and clock() - state["t"] > slice_s:
            sleep(rest_s)
            state["t"] = clock()

    sys.setswitchinterval(0.0005)
    gc.disable()
    if duty < 1:
        sys.setprofile(pacer)
    try:
        yield
    finally:
        sys.setprofile(old_profile)
        sys.setswitchinterval(old_interval)
        if gc_was_enabled:
            gc.enable()
