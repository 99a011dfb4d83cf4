"""Shallow position x device tower (Zhao et al., "Recommending What Video to Watch Next", RecSys 2019).

B batch. Position and device arrive as lookup indices, index 0 meaning missing / unseen.
"""

from __future__ import annotations

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="rankstage")
class PositionBiasTower(keras.layers.Layer):
    """(B,) position index, (B,) device index -> (B, 1) bias logit: one learned scalar per position x device.

    In training, the position of a ``position_dropout`` fraction of rows is set to missing (index 0), so the
    main model cannot lean on the tower alone and the tower learns a "position unknown" value. Either input may be
    ``None`` when the log lacks it. The tower is only wired into the training model; serving never sees it.
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
        pos = ops.zeros_like(ref, dtype="int64") if position is None else ops.cast(position, "int64")
        dev = ops.zeros_like(ref, dtype="int64") if device is None else ops.cast(device, "int64")
        if training and self.position_dropout > 0 and position is not None:
            drop = keras.random.uniform(ops.shape(pos), seed=self._rng) < self.position_dropout
            pos = ops.where(drop, ops.zeros_like(pos), pos)
        return ops.expand_dims(ops.take(self.bias, pos * self.num_devices + dev), -1)  # (B, 1)

    def bias_table(self):
        """(P, V) learned bias logit per position index and device index."""
        return ops.reshape(self.bias, (self.num_positions, self.num_devices))

    def compute_output_shape(self, *shapes):
        return (None, 1)

    def get_config(self):
        return {**super().get_config(), "num_positions": self.num_positions, "num_devices": self.num_devices,
                "position_dropout": self.position_dropout, "seed": self.seed}
