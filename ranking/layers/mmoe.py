"""Multi-gate Mixture-of-Experts (Ma et al., KDD 2018) with gate dropout (Zhao et al., RecSys 2019).

B batch, D input width, E experts, H expert output width, T tasks.
"""

from __future__ import annotations

import keras
from keras import ops


def drop_gates(g, rate: float, rng):
    """(..., E) softmax gate weights -> each weight dropped with probability ``rate`` and the rest renormalised to
    sum to 1; a row that drops every expert keeps its undropped gate (training only; Zhao et al., RecSys 2019)."""
    if rate <= 0:
        return g
    keep = ops.cast(keras.random.uniform(ops.shape(g), seed=rng) >= rate, g.dtype)
    kept = g * keep
    total = ops.sum(kept, axis=-1, keepdims=True)
    return ops.where(total > 0, kept / ops.maximum(total, 1e-12), g)


@keras.saving.register_keras_serializable(package="rankstage")
class MMoE(keras.layers.Layer):
    """(B, D) -> (B, T, H): per task, a softmax-gated mixture of E shared ReLU expert MLPs.

    In training, each gate output is dropped with probability ``gate_dropout`` and the remaining weights are
    renormalised to sum to 1 (if a row drops every expert it keeps its undropped gate), which stops gates from
    polarising onto one expert. At inference the gates are a plain softmax.
    """

    def __init__(self, num_experts: int, expert_units: list[int], num_tasks: int, gate_dropout: float = 0.1,
                 seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        if int(num_experts) < 1:
            raise ValueError(f"MMoE: num_experts must be >= 1, got {num_experts!r}")
        if not expert_units or any(int(u) < 1 for u in expert_units):
            raise ValueError(f"MMoE: expert_units must be a non-empty list of widths >= 1, got {expert_units!r}")
        if int(num_tasks) < 1:
            raise ValueError(f"MMoE: num_tasks must be >= 1, got {num_tasks!r}")
        if not 0 <= gate_dropout < 1:
            raise ValueError(f"MMoE: gate_dropout must be in [0, 1), got {gate_dropout!r}")
        self.num_experts, self.expert_units = int(num_experts), [int(u) for u in expert_units]
        self.num_tasks, self.gate_dropout, self.seed = int(num_tasks), float(gate_dropout), seed
        self._rng = keras.random.SeedGenerator(seed) if gate_dropout > 0 else None

    def build(self, input_shape):
        d = int(input_shape[-1])
        self.expert_kernels, self.expert_biases = [], []
        for i, h in enumerate(self.expert_units):
            self.expert_kernels.append(self.add_weight(shape=(self.num_experts, d, h), name=f"expert_kernel_{i}",
                                                       initializer="glorot_uniform"))
            self.expert_biases.append(self.add_weight(shape=(self.num_experts, h), name=f"expert_bias_{i}",
                                                      initializer="zeros"))
            d = h
        self.gate_kernel = self.add_weight(shape=(self.num_tasks, int(input_shape[-1]), self.num_experts),
                                           name="gate_kernel", initializer="glorot_uniform")
        self.gate_bias = self.add_weight(shape=(self.num_tasks, self.num_experts), name="gate_bias",
                                         initializer="zeros")

    def experts(self, x):
        """(B, D) -> (B, E, H) expert outputs."""
        h = ops.relu(ops.einsum("bd,edh->beh", x, self.expert_kernels[0]) + self.expert_biases[0])
        for kernel, bias in zip(self.expert_kernels[1:], self.expert_biases[1:]):
            h = ops.relu(ops.einsum("beh,ehk->bek", h, kernel) + bias)
        return h

    def gates(self, x, training: bool = False):
        """(B, D) -> (B, T, E) gate weights; each (b, t) row sums to 1."""
        g = ops.softmax(ops.einsum("bd,tde->bte", x, self.gate_kernel) + self.gate_bias, axis=-1)
        return drop_gates(g, self.gate_dropout, self._rng) if training else g

    def call(self, x, training: bool = False):
        return ops.einsum("bte,beh->bth", self.gates(x, training=training), self.experts(x))  # (B, T, H)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_tasks, self.expert_units[-1])

    def get_config(self):
        return {**super().get_config(), "num_experts": self.num_experts, "expert_units": self.expert_units,
                "num_tasks": self.num_tasks, "gate_dropout": self.gate_dropout, "seed": self.seed}
