"""New model versions for serving tests, published the way export publishes one (written aside, renamed into place).

``add_version`` copies version 1 with its weights perturbed, so a test can tell which version answered: the copy's
predictions differ from version 1's. ``metadata`` edits apply to the copy's ``rankstage_metadata.json`` (e.g. a
statistics path), never to the SavedModel.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

METADATA = Path("assets.extra") / "rankstage_metadata.json"


def perturb_variables(version_dir: Path, seed: int, sigma: float = 0.3) -> None:
    """Rewrite the SavedModel's variables checkpoint with every float value multiplied by exp(sigma · N(0, 1)):
    signs (and so positive variances) are kept, the network's function changes. Same keys, same object graph."""
    import tensorflow as tf

    prefix = str(version_dir / "variables" / "variables")
    reader = tf.train.load_checkpoint(prefix)
    rng = np.random.default_rng(seed)
    names, tensors = [], []
    for name in sorted(reader.get_variable_to_dtype_map()):
        value = reader.get_tensor(name)
        if isinstance(value, np.ndarray) and value.dtype.kind == "f":
            value = (value * np.exp(sigma * rng.standard_normal(value.shape))).astype(value.dtype)
        names.append(name)
        tensors.append(tf.constant(value))
    for f in (version_dir / "variables").iterdir():
        f.unlink()
    tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names, shape_and_slices=[""] * len(names), tensors=tensors)


def add_version(base: Path, version: int, seed: int | None = None,
                metadata: Callable[[dict], None] | None = None) -> Path:
    """Version ``version`` under ``base``: a copy of version 1, weights perturbed with ``seed`` (None: a byte copy),
    metadata edited in place by ``metadata``; published by rename."""
    tmp = base / f".tmp-{version}"
    shutil.copytree(base / "1", tmp)
    if seed is not None:
        perturb_variables(tmp, seed)
    meta = json.loads((tmp / METADATA).read_text())
    meta["version"] = version
    if metadata is not None:
        metadata(meta)
    (tmp / METADATA).write_text(json.dumps(meta))
    tmp.rename(base / str(version))
    return base / str(version)
