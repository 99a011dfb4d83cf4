"""Model outputs -> probabilities on the full traffic: down-sampling correction, then optional post-hoc calibration.

One function for replay and serving. ``outputs`` maps task name to (C,) raw SavedModel outputs; ``sampling`` is the
``sampling`` block of the model's metadata (per task: method and kept fraction).
"""

from __future__ import annotations

import numpy as np

from calibration.downsampling import correct_downsampling
from calibration.posthoc import calibrate


def correct_outputs(outputs: dict[str, np.ndarray], sampling: dict[str, dict]) -> dict[str, np.ndarray]:
    """Undo negative down-sampling on the binary tasks the metadata marks ``correct_downsampling``."""
    out = {}
    for task, values in outputs.items():
        s = sampling.get(task, {})
        values = np.asarray(values, dtype=np.float64)
        out[task] = correct_downsampling(values, s["kept_fraction"]) if s.get("method") == "correct_downsampling" \
            else values
    return out


def calibrated_outputs(outputs: dict[str, np.ndarray], sampling: dict[str, dict], artifact: dict | None = None
                       ) -> dict[str, np.ndarray]:
    return calibrate(correct_outputs(outputs, sampling), artifact)
