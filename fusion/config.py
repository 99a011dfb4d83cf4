"""The fusion config: a version string and named profiles (one per scenario / tab, chosen per request).

    version: "2026-11-23.1"
    default_profile: feed
    calibration: calibration.json        # optional, relative to this file: post-hoc calibration artifact
    profiles:
      feed: {formula: weighted_product, weights: {click: 1, watch_time: 0.05}, exponents: {watch_time: 0.5}}

Validated at load: known formula, known task names, finite numbers; errors name the field and the value, e.g.
``profiles.feed.weights.clik: unknown task 'clik' (known: click, like, ...)``.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Literal

import numpy as np
import yaml
from pydantic import Field, ValidationError, model_validator

from features.spec import ConfigError, Strict, format_validation_error, read_document
from fusion.formulas import fuse


class FusionProfile(Strict):
    """One way to turn a candidate's task predictions into a ranking score."""

    formula: Literal["weighted_sum", "click_multiplier", "weighted_product"]
    weights: dict[str, float] = Field(min_length=1)
    exponents: dict[str, float] = {}
    description: str = ""

    @model_validator(mode="after")
    def _check(self, info) -> FusionProfile:
        known = (info.context or {}).get("tasks")  # the model's tasks, when validated against a model
        for field in ("weights", "exponents"):
            for task, value in getattr(self, field).items():
                if known is not None and task not in known:
                    raise ValueError(f"{field}.{task}: unknown task {task!r} (known: {', '.join(known)})")
                if not math.isfinite(value):
                    raise ValueError(f"{field}.{task}: must be a finite number, got {value!r}")
        if self.exponents and self.formula != "weighted_product":
            raise ValueError(f"exponents: only the weighted_product formula has exponents, not {self.formula!r}")
        for task in self.exponents:
            if task not in self.weights:
                raise ValueError(f"exponents.{task}: {task!r} has an exponent but no weight")
        if self.formula == "weighted_product":
            for task, w in self.weights.items():
                if w < 0:
                    raise ValueError(f"weights.{task}: weighted_product weights must be >= 0, got {w!r}")
        if self.formula == "click_multiplier" and "click" not in (self.weights if known is None else known):
            raise ValueError("formula: click_multiplier needs a 'click' task")
        return self

    def score(self, terms: dict[str, np.ndarray]) -> np.ndarray:
        """(C,) fused scores from (C,) task predictions."""
        return fuse(terms, self.formula, self.weights, self.exponents)


class FusionConfig(Strict):
    version: str = Field(min_length=1)
    default_profile: str | None = None
    calibration: str | None = None  # post-hoc calibration artifact (JSON), relative to the config file
    profiles: dict[str, FusionProfile] = Field(min_length=1)

    @model_validator(mode="after")
    def _check_default(self) -> FusionConfig:
        if self.default_profile is not None and self.default_profile not in self.profiles:
            raise ValueError(f"default_profile: {self.default_profile!r} is not a profile "
                             f"(profiles: {', '.join(self.profiles)})")
        return self

    def profile(self, name: str | None = None) -> FusionProfile:
        name = name or self.default_profile or next(iter(self.profiles))
        if name not in self.profiles:
            raise ConfigError(f"--profile: {name!r} is not a profile of this fusion config "
                              f"(profiles: {', '.join(self.profiles)})")
        return self.profiles[name]


def _relocate(loc: str, msg: str) -> tuple[str, str]:
    """"profiles.a" + "weights.x: ..." -> "profiles.a.weights.x: ..." (validators name the field they refuse)."""
    field = re.match(r"^(weights|exponents|formula|default_profile)(\.\w+)?: ", msg)
    if field:
        name = field.group(0)[:-2]
        loc, msg = (f"{loc}.{name}" if loc else name), msg[len(field.group(0)):]
    return loc, msg


def parse_fusion_config(data: dict, source: str, tasks: tuple[str, ...] | list[str] | None) -> FusionConfig:
    """Validate a fusion config mapping against the task names ``tasks`` (a model's outputs; None: not checked
    against a model, e.g. to read which calibration artifact it names); raises ConfigError naming the field."""
    if not isinstance(data, dict):
        raise ConfigError(f"fusion config {source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return FusionConfig.model_validate(data, context={"tasks": None if tasks is None else tuple(tasks)})
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source, "fusion config", _relocate)) from None


def load_fusion_config(path: str | Path, tasks: tuple[str, ...] | list[str] | None) -> FusionConfig:
    """Read and validate a fusion config YAML file."""
    return parse_fusion_config(read_document(path, "fusion config file"), str(path), tasks)


def calibration_path(config: FusionConfig, config_path: str | Path) -> Path | None:
    """The calibration artifact named by the config, resolved beside the config file."""
    if config.calibration is None:
        return None
    p = Path(config.calibration)
    return p if p.is_absolute() else Path(config_path).parent / p


def load_fusion(path: str | Path, tasks: list[str] | tuple[str, ...], calibration: str | Path | None = None
                ) -> tuple[FusionConfig, dict | None]:
    """A fusion config checked against the model's ``tasks``, and its post-hoc calibration artifact (``calibration``
    if given, else the one the config names, else None)."""
    from calibration.posthoc import load_artifact

    config = load_fusion_config(path, tasks)
    cal = calibration or calibration_path(config, path)
    return config, (load_artifact(cal) if cal else None)


def dump_fusion_config(config: FusionConfig) -> str:
    return yaml.safe_dump(config.model_dump(exclude_defaults=True, exclude_none=True), sort_keys=False)
