"""What a call needs, in one immutable snapshot that a reload replaces atomically.

A snapshot pairs a model version with the fusion config, the calibration artifact and the feature tables that
were checked against it. ``Reloader.tick`` builds a candidate snapshot from whatever changed on disk (new model
version, edited fusion config, new calibration artifact, rewritten side tables), validates it, and either swaps it
in (one reference assignment: a call holds the old one to its end) or refuses it and keeps the running one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from calibration.posthoc import check_artifact, load_artifact
from features.spec import FeatureSpec
from fusion.config import FusionConfig, calibration_path, load_fusion_config
from ranking.servable import version_stamp
from serving.backends import ModelBackend, ModelVersion
from serving.config import ServingConfig
from serving.features import FeatureTables, file_stamp, table_sources

log = logging.getLogger("rankstage.serving")


def stamp_of(path: str | Path | None) -> tuple | None:
    """``file_stamp`` of a configured file, None when none is configured."""
    return None if path is None else file_stamp(path)


@dataclass(frozen=True)
class Snapshot:
    model: ModelVersion
    fusion: FusionConfig
    fusion_stamp: tuple | None
    calibration: dict | None
    calibration_stamp: tuple | None
    tables: FeatureTables = field(repr=False)
    features: dict[str, FeatureSpec] = field(repr=False)  # serving features by name
    sampling: dict = field(repr=False)
    separators: dict[str, str] = field(repr=False)  # multi-valued feature -> separator (list-valued columns)
    previous: Snapshot | None = field(default=None, repr=False)  # the version this one replaced (label routing)

    @property
    def calibration_version(self) -> str:
        return str(self.calibration["version"]) if self.calibration else ""

    def of_version(self, version: int) -> Snapshot | None:
        """This snapshot if it is of model ``version``, else the one it replaced if that is, else None."""
        if version == self.model.version:
            return self
        if self.previous is not None and self.previous.model.version == version:
            return self.previous
        return None


@dataclass(frozen=True)
class Refusal:
    """A model version whose snapshot could not be built: what it was built from, and when to try again."""

    inputs: tuple  # (version directory, fusion config, calibration artifact) stamps at the failure
    attempts: int
    retry_at: float  # on the reloader's clock
    reason: str


def backoff_s(attempts: int, initial_s: float, max_s: float) -> float:
    """Seconds before retry number ``attempts`` + 1: initial_s, doubling per failure, capped at max_s."""
    return min(max_s, initial_s * 2.0 ** min(attempts - 1, 62))


class Reloader:
    """Builds and refreshes snapshots, reporting each reload as ``on_event(kind, outcome, detail, reason)``: kind
    model / fusion / calibration / feature_tables, outcome applied / refused, reason the error's type when refused.

    A model version that cannot be built (load, warmup, fusion config, calibration artifact, feature tables: any
    error) is refused and the running snapshot keeps serving; the version is retried as soon as its directory, the
    fusion config or the calibration artifact changes, else with exponential backoff (``reload.retry_initial_s``
    doubling up to ``reload.retry_max_s``) on ``clock`` (injectable: tests advance it instead of sleeping)."""

    def __init__(self, config: ServingConfig, backend: ModelBackend, on_event=None,
                 clock: Callable[[], float] = time.monotonic):
        self.config, self.backend, self.clock = config, backend, clock
        self.on_event = on_event or (lambda kind, outcome, detail, reason="": None)
        self.refused: dict[int, Refusal] = {}  # version -> its last failure (retried when due)

    def _calibration_file(self, fusion: FusionConfig | None) -> Path | None:
        if self.config.calibration:
            return Path(self.config.calibration)
        return None if fusion is None else calibration_path(fusion, self.config.fusion)

    def _fusion(self, model: ModelVersion) -> tuple[FusionConfig, tuple | None]:
        stamp = stamp_of(self.config.fusion)
        return load_fusion_config(self.config.fusion, model.tasks), stamp

    def _calibration(self, fusion: FusionConfig, model: ModelVersion) -> tuple[dict | None, tuple | None]:
        path = self._calibration_file(fusion)
        if path is None:
            return None, None
        stamp = stamp_of(path)
        return check_artifact(load_artifact(path), model.name, model.version, model.tasks, path), stamp

    def build(self, model: ModelVersion, tables: FeatureTables | None = None) -> Snapshot:
        """A full snapshot for ``model``; raises if the fusion config, the calibration artifact or the feature
        tables do not fit it. A model and its calibration are one pair: a version whose configured artifact was
        fitted for another version is refused (the running pair keeps serving) until an artifact fitted for it
        arrives, never served uncalibrated under fusion weights tuned on calibrated outputs."""
        fusion, fstamp = self._fusion(model)
        cal, cstamp = self._calibration(fusion, model)
        if tables is None:
            tables = FeatureTables.load(model.config)
        features = {f.name: f for f in model.config.serving_features}
        return Snapshot(model, fusion, fstamp, cal, cstamp, tables, features, model.metadata["sampling"],
                        {n: f.separator for n, f in features.items() if f.kind in ("multi_valued", "match")})

    def _version_stamp(self, version: int) -> tuple | None:
        base = getattr(self.backend, "base_path", None)
        return version_stamp(Path(base) / str(version)) if base is not None else None

    def _inputs(self, version: int, snap: Snapshot | None) -> tuple:
        """Stamps of what a build of ``version`` reads from disk: a change retries a refused version at once."""
        if snap is not None:
            fusion = snap.fusion
        else:  # nothing serves yet: the artifact the fusion config names, if it parses
            try:
                fusion = load_fusion_config(self.config.fusion, None)  # no model yet to check tasks against
            except Exception:
                fusion = None
        return (self._version_stamp(version), stamp_of(self.config.fusion), stamp_of(self._calibration_file(fusion)))

    def _due(self, version: int, inputs: tuple) -> bool:
        refusal = self.refused.get(version)
        return refusal is None or refusal.inputs != inputs or self.clock() >= refusal.retry_at

    def _refuse(self, version: int, inputs: tuple, err: BaseException) -> None:
        last = self.refused.get(version)
        attempts = last.attempts + 1 if last is not None and last.inputs == inputs else 1
        wait = backoff_s(attempts, self.config.reload.retry_initial_s, self.config.reload.retry_max_s)
        reason = type(err).__name__
        self.refused[version] = Refusal(inputs, attempts, self.clock() + wait, reason)
        self.on_event("model", "refused", f"version {version}: {reason}: {err} (attempt {attempts}; retried in "
                                          f"{wait:.0f} s or when its files change)", reason)

    def _try_version(self, snap: Snapshot | None) -> Snapshot | None:
        """The snapshot of the newest version if it is new, due and builds; None otherwise (refusal recorded)."""
        version = self.backend.newest()
        if version is None or (snap is not None and version == snap.model.version):
            return None
        inputs = self._inputs(version, snap)
        if not self._due(version, inputs):
            return None
        try:
            model = self.backend.load(version)
            same = snap is not None and table_sources(model.config) == table_sources(snap.model.config)
            new = self.build(model, snap.tables if same else None)
        except Exception as err:  # any load / warm / validation failure keeps the running version
            self._refuse(version, inputs, err)
            return None
        self.refused = {v: r for v, r in self.refused.items() if v > version}  # older ones will not be newest
        if snap is None:
            self.on_event("model", "applied", f"version {version}")
            return new
        self.on_event("model", "applied", f"version {snap.model.version} -> {version}")
        if getattr(self.backend, "version_label", None):  # the label may still answer from the replaced version
            return replace(new, previous=replace(snap, previous=None))
        return new

    def initial(self) -> Snapshot | None:
        """The first snapshot (newest version), or None if there is none yet or it is refused (retried later)."""
        try:
            return self._try_version(None)
        except Exception as err:  # newest() itself failed: nothing serves yet, try again next pass
            self.on_event("model", "refused", f"{type(err).__name__}: {err}", type(err).__name__)
            return None

    def tick(self, snap: Snapshot) -> Snapshot:
        """One reload pass: returns a new snapshot if something valid changed, else ``snap``. Never raises."""
        try:
            new = self._try_version(snap)
        except Exception as err:  # newest() or a stamp failed: keep serving, try again next pass
            self.on_event("model", "refused", f"{type(err).__name__}: {err}", type(err).__name__)
            new = None
        if new is not None:
            return new
        try:
            return self._refresh(snap)
        except Exception as err:
            self.on_event("snapshot", "refused", f"{type(err).__name__}: {err}", type(err).__name__)
            return snap

    def _refresh(self, snap: Snapshot) -> Snapshot:
        """The running version's fusion config, calibration artifact or side tables, if one changed and fits."""
        new = snap
        if stamp_of(self.config.fusion) != snap.fusion_stamp:
            try:
                fusion, fstamp = self._fusion(snap.model)
                cal, cstamp = self._calibration(fusion, snap.model)
                new = replace(snap, fusion=fusion, fusion_stamp=fstamp, calibration=cal, calibration_stamp=cstamp)
                self.on_event("fusion", "applied", f"version {snap.fusion.version} -> {fusion.version}")
            except Exception as err:
                new = replace(snap, fusion_stamp=stamp_of(self.config.fusion))  # refused once, not every tick
                self.on_event("fusion", "refused", str(err), type(err).__name__)
            return new
        cal_file = self._calibration_file(snap.fusion)
        if stamp_of(cal_file) != snap.calibration_stamp:
            try:
                cal, cstamp = self._calibration(snap.fusion, snap.model)
                new = replace(snap, calibration=cal, calibration_stamp=cstamp)
                self.on_event("calibration", "applied", f"version {snap.calibration_version!r} -> "
                                                        f"{cal['version'] if cal else ''!r}")
            except Exception as err:
                new = replace(snap, calibration_stamp=stamp_of(cal_file))
                self.on_event("calibration", "refused", str(err), type(err).__name__)
            return new
        if snap.tables.changed():
            try:
                tables = FeatureTables.load(snap.model.config)
                new = replace(snap, tables=tables)
                self.on_event("feature_tables", "applied", "side tables reloaded")
            except Exception as err:
                self.on_event("feature_tables", "refused", str(err), type(err).__name__)
        return new


def finite_outputs(outputs: dict[str, np.ndarray], tasks: list[str]) -> None:
    for t in tasks:
        bad = ~np.isfinite(outputs[t])
        if bad.any():
            raise ValueError(f"model output {t!r} is not finite for {int(bad.sum())} candidates")
