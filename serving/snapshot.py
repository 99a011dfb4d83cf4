"""What a call needs, in one immutable snapshot that a reload replaces atomically.

A snapshot pairs a model version with the fusion config, the calibration artifact and the feature tables that
were checked against it. ``Reloader.tick`` builds a candidate snapshot from whatever changed on disk (new model
version, edited fusion config, new calibration artifact, rewritten side tables), validates it, and either swaps it
in (one reference assignment: a call holds the old one to its end) or refuses it and keeps the running one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from calibration.posthoc import check_artifact, load_artifact
from features.spec import ConfigError, FeatureSpec
from fusion.config import FusionConfig, calibration_path, load_fusion_config
from ranking.servable import version_stamp
from serving.backends import ModelBackend, ModelVersion
from serving.config import ServingConfig
from serving.features import FeatureTables, file_stamp

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

    @property
    def calibration_version(self) -> str:
        return str(self.calibration["version"]) if self.calibration else ""


def check_calibration(artifact: dict, model: ModelVersion, path: Path) -> dict:
    """An artifact is applied only to the model version it was fitted for (``calibration.posthoc.check_artifact``)."""
    return check_artifact(artifact, model.name, model.version, model.tasks, path)


class Reloader:
    """Builds and refreshes snapshots; ``refused`` counts what was rejected, by kind (model, fusion, ...)."""

    def __init__(self, config: ServingConfig, backend: ModelBackend, on_event=None):
        self.config, self.backend = config, backend
        self.on_event = on_event or (lambda kind, outcome, detail: None)
        self._failed: dict[int, tuple | None] = {}  # version -> directory stamp when it failed (not retried)

    def _calibration_file(self, fusion: FusionConfig) -> Path | None:
        if self.config.calibration:
            return Path(self.config.calibration)
        return calibration_path(fusion, self.config.fusion)

    def _fusion(self, model: ModelVersion) -> tuple[FusionConfig, tuple | None]:
        stamp = stamp_of(self.config.fusion)
        return load_fusion_config(self.config.fusion, model.tasks), stamp

    def _calibration(self, fusion: FusionConfig, model: ModelVersion) -> tuple[dict | None, tuple | None]:
        path = self._calibration_file(fusion)
        if path is None:
            return None, None
        stamp = stamp_of(path)
        return check_calibration(load_artifact(path), model, path), stamp

    def build(self, model: ModelVersion, tables: FeatureTables | None = None) -> Snapshot:
        """A full snapshot for ``model``; raises ConfigError if the fusion config does not fit it. A calibration
        artifact fitted for another version is not applied (the new version serves uncalibrated, and the refusal
        is counted) until one fitted for it arrives: refusing the model instead would deadlock a rollout."""
        fusion, fstamp = self._fusion(model)
        try:
            cal, cstamp = self._calibration(fusion, model)
        except ConfigError as err:
            cal, cstamp = None, stamp_of(self._calibration_file(fusion))
            self.on_event("calibration", "refused", str(err))
        if tables is None:
            tables = FeatureTables.load(model.config)
        features = {f.name: f for f in model.config.serving_features}
        return Snapshot(model, fusion, fstamp, cal, cstamp, tables, features, model.metadata["sampling"],
                        {n: f.separator for n, f in features.items() if f.kind in ("multi_valued", "match")})

    def initial(self) -> Snapshot | None:
        version = self.backend.newest()
        if version is None:
            return None
        snap = self.build(self.backend.load(version))
        self.on_event("model", "applied", f"version {version}")
        return snap

    def _version_stamp(self, version: int) -> tuple | None:
        base = getattr(self.backend, "base_path", None)
        return version_stamp(Path(base) / str(version)) if base is not None else None

    def tick(self, snap: Snapshot) -> Snapshot:
        """One reload pass: returns a new snapshot if something valid changed, else ``snap``."""
        new = snap
        version = self.backend.newest()
        if version is not None and version != snap.model.version and (
                version not in self._failed or self._failed[version] != self._version_stamp(version)):
            try:
                model = self.backend.load(version)
                same_tables = model.config.data.joins == snap.model.config.data.joins
                new = self.build(model, snap.tables if same_tables else None)
                self._failed.pop(version, None)
                self.on_event("model", "applied", f"version {snap.model.version} -> {version}")
            except Exception as err:  # any load / warm / validation failure keeps the running version
                self._failed[version] = self._version_stamp(version)
                self.on_event("model", "refused", f"version {version}: {type(err).__name__}: {err}")
        if new is not snap:
            return new
        if stamp_of(self.config.fusion) != snap.fusion_stamp:
            try:
                fusion, fstamp = self._fusion(snap.model)
                cal, cstamp = self._calibration(fusion, snap.model)
                new = replace(snap, fusion=fusion, fusion_stamp=fstamp, calibration=cal, calibration_stamp=cstamp)
                self.on_event("fusion", "applied", f"version {snap.fusion.version} -> {fusion.version}")
            except Exception as err:
                new = replace(snap, fusion_stamp=stamp_of(self.config.fusion))  # refused once, not every tick
                self.on_event("fusion", "refused", str(err))
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
                self.on_event("calibration", "refused", str(err))
            return new
        if snap.tables.changed():
            try:
                tables = FeatureTables.load(snap.model.config)
                new = replace(snap, tables=tables)
                self.on_event("feature_tables", "applied", "side tables reloaded")
            except Exception as err:
                self.on_event("feature_tables", "refused", str(err))
        return new


def finite_outputs(outputs: dict[str, np.ndarray], tasks: list[str]) -> None:
    for t in tasks:
        bad = ~np.isfinite(outputs[t])
        if bad.any():
            raise ValueError(f"model output {t!r} is not finite for {int(bad.sum())} candidates")
