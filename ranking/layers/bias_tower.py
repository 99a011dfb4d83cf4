"""Shallow position x device tower (Zhao et al., "Recommending What Video to Watch Next", RecSys 2019).

B batch. Position and device arrive as lookup indices, index ``MISSING`` (0, the first OOV bucket) meaning missing /
unseen.
"""

from __future__ import annotations

import keras
from keras import ops

MISSING = 0  # lookup index of a missing / unseen value: where position dropout puts positions, and what serving uses


@keras.saving.register_keras_serializable(package="rankstage")
class PositionBiasTower(keras.layers.Layer):
    """(B,) position index, (B,) device index -> (B, 1) bias logit: one learned scalar per position x device.

    In training, the position of a ``position_dropout`` fraction of rows is set to missing (index ``MISSING``), so
    the main model cannot lean on the tower alone and the tower learns a "position unknown" value: the average
    examination over the logged positions, per device. Either input may be ``None``: no device means device
    ``MISSING``; no position means position ``MISSING``, which is how serving calls it (the position is unknown
    there, the device is known), and dropout then has nothing to drop.
    """

    def __init__(self, num_positions: int = 1, num_devices: int = 1, position_dropout: float = 0.1,
                 seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        if int(num_positions) < 1 or int(num_devices) < 1:
            raise ValueError(f"PositionBiasTower: sizes must be >= 1, got positions={num_positions!r}, "
                             f"devices={num_devices!r}")
        if not 0 <= position_dropout < 1:
            raise ValueError(f"PositionBiasTower: position_dropout must be in [0, 1), got {position_dropout!r}")
        self.num_positions, self.num_devices = int(num_positions), int(num_devices)
        self.position_dropout, self.seed = float(position_dropout), seed
        self._rng = keras.random.SeedGenerator(seed) if position_dropout > 0 else None

    def build(self, *input_shapes):
        self.bias = self.add_weight(shape=(self.num_positions * self.num_devices,), name="bias",
                                    initializer="zeros")

    def call(self, position=None, device=None, training: bool = False):
        ref = position if position is not None else device
        if ref is None:
            raise ValueError("PositionBiasTower: give at least one of position or device")
        missing = ops.full_like(ref, MISSING, dtype="int64")  # (B,)
        pos = missing if position is None else ops.cast(position, "int64")
        dev = missing if device is None else ops.cast(device, "int64")
        if training and self.position_dropout > 0 and position is not None:
            drop = keras.random.uniform(ops.shape(pos), seed=self._rng) < self.position_dropout
            pos = ops.where(drop, missing, pos)
        return ops.expand_dims(ops.take(self.bias, pos * self.num_devices + dev), -1)  # (B, 1)

    def bias_table(self):
        """(P, V) learned bias logit per position index and device index."""
        return ops.reshape(self.bias, (self.num_positions, self.num_devices))

    def compute_output_shape(self, *shapes):
        return (None, 1)

    def get_config(self):
        return {**super().get_config(), "num_positions": self.num_positions, "num_devices": self.num_devices,
                "position_dropout": self.position_dropout, "seed": self.seed}
