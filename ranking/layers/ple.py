"""Progressive Layered Extraction (Tang et al., RecSys 2020) with gate dropout, beside MMoE.

B batch, D input width, T tasks, K task-specific experts per task, S shared experts, H expert output width,
L extraction levels.

One extraction level (a CGC, "customized gate control"): each task has K experts of its own, all tasks share S
experts; task t's softmax gate mixes its own K experts and the S shared ones. Below the last level a shared gate
also mixes all T·K + S experts into the input of the next level's shared experts, while task t's mixture feeds
the next level's task-t experts. The last level's task mixtures go to the task towers. Task-specific experts are
what lets a sparse task (like) keep capacity the dense task (click) cannot take over: the cure PLE proposes for
MMoE's negative transfer. In training each gate weight is dropped with probability ``gate_dropout`` and the rest
renormalised, as in ``MMoE``.
"""

from __future__ import annotations

import keras
from keras import ops

from ranking.layers.mmoe import drop_gates


@keras.saving.register_keras_serializable(package="rankstage")
class PLE(keras.layers.Layer):
    """(B, D) -> (B, T, H): L stacked extraction levels of task-specific and shared experts."""

    def __init__(self, num_tasks: int, task_experts: int, shared_experts: int, expert_units: list[int],
                 num_levels: int = 1, gate_dropout: float = 0.1, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        for name, value, low in (("num_tasks", num_tasks, 1), ("task_experts", task_experts, 0),
                                 ("shared_experts", shared_experts, 0), ("num_levels", num_levels, 1)):
            if int(value) < low:
                raise ValueError(f"PLE: {name} must be >= {low}, got {value!r}")
        if int(task_experts) + int(shared_experts) < 1:
            raise ValueError(f"PLE: task_experts + shared_experts must be >= 1, got {task_experts!r} + "
                             f"{shared_experts!r}")
        if not expert_units or any(int(u) < 1 for u in expert_units):
            raise ValueError(f"PLE: expert_units must be a non-empty list of widths >= 1, got {expert_units!r}")
        if not 0 <= gate_dropout < 1:
            raise ValueError(f"PLE: gate_dropout must be in [0, 1), got {gate_dropout!r}")
        self.num_tasks, self.task_experts, self.shared_experts = int(num_tasks), int(task_experts), int(shared_experts)
        self.expert_units, self.num_levels = [int(u) for u in expert_units], int(num_levels)
        self.gate_dropout, self.seed = float(gate_dropout), seed
        self._rng = keras.random.SeedGenerator(seed) if gate_dropout > 0 else None

    def build(self, input_shape):
        t, k, s = self.num_tasks, self.task_experts, self.shared_experts
        self.levels = []
        d_in = int(input_shape[-1])
        for level in range(self.num_levels):
            w: dict[str, list] = {"task_kernels": [], "task_biases": [], "shared_kernels": [], "shared_biases": []}
            d = d_in
            for i, h in enumerate(self.expert_units):
                if k:
                    w["task_kernels"].append(self.add_weight(shape=(t, k, d, h), name=f"l{level}_task_kernel_{i}",
                                                             initializer="glorot_uniform"))
                    w["task_biases"].append(self.add_weight(shape=(t, k, h), name=f"l{level}_task_bias_{i}",
                                                            initializer="zeros"))
                if s:
                    w["shared_kernels"].append(self.add_weight(shape=(s, d, h), name=f"l{level}_shared_kernel_{i}",
                                                               initializer="glorot_uniform"))
                    w["shared_biases"].append(self.add_weight(shape=(s, h), name=f"l{level}_shared_bias_{i}",
                                                              initializer="zeros"))
                d = h
            w["gate_kernel"] = self.add_weight(shape=(t, d_in, k + s), name=f"l{level}_gate_kernel",
                                               initializer="glorot_uniform")
            w["gate_bias"] = self.add_weight(shape=(t, k + s), name=f"l{level}_gate_bias", initializer="zeros")
            if level < self.num_levels - 1:
                w["shared_gate_kernel"] = self.add_weight(shape=(d_in, t * k + s), name=f"l{level}_shared_gate_kernel",
                                                          initializer="glorot_uniform")
                w["shared_gate_bias"] = self.add_weight(shape=(t * k + s,), name=f"l{level}_shared_gate_bias",
                                                        initializer="zeros")
            self.levels.append(w)
            d_in = self.expert_units[-1]

    def gates(self, xt, xs, level: int, training: bool = False):
        """Task gates (B, T, K + S) of ``level`` from task inputs (B, T, D) and, below the last level, the shared
        gate (B, T·K + S) from the shared input (B, D); each row sums to 1."""
        w = self.levels[level]
        g = ops.softmax(ops.einsum("btd,tde->bte", xt, w["gate_kernel"]) + w["gate_bias"], axis=-1)
        gs = None
        if "shared_gate_kernel" in w:
            gs = ops.softmax(ops.matmul(xs, w["shared_gate_kernel"]) + w["shared_gate_bias"], axis=-1)
        if training:
            g = drop_gates(g, self.gate_dropout, self._rng)
            gs = drop_gates(gs, self.gate_dropout, self._rng) if gs is not None else None
        return g, gs

    def experts(self, xt, xs, level: int):
        """Task experts (B, T, K, H) from (B, T, D) and shared experts (B, S, H) from (B, D) (None when 0)."""
        w = self.levels[level]
        ht = hs = None
        if self.task_experts:
            ht = ops.relu(ops.einsum("btd,tkdh->btkh", xt, w["task_kernels"][0]) + w["task_biases"][0])
            for kernel, bias in zip(w["task_kernels"][1:], w["task_biases"][1:]):
                ht = ops.relu(ops.einsum("btkd,tkdh->btkh", ht, kernel) + bias)
        if self.shared_experts:
            hs = ops.relu(ops.einsum("bd,sdh->bsh", xs, w["shared_kernels"][0]) + w["shared_biases"][0])
            for kernel, bias in zip(w["shared_kernels"][1:], w["shared_biases"][1:]):
                hs = ops.relu(ops.einsum("bsd,sdh->bsh", hs, kernel) + bias)
        return ht, hs

    def call(self, x, training: bool = False):
        xt = ops.repeat(ops.expand_dims(x, 1), self.num_tasks, axis=1)  # (B, T, D)
        xs = x
        for level in range(self.num_levels):
            ht, hs = self.experts(xt, xs, level)
            g, gs = self.gates(xt, xs, level, training=training)
            parts = []
            if ht is not None:
                parts.append(ht)  # (B, T, K, H)
            if hs is not None:
                parts.append(ops.repeat(ops.expand_dims(hs, 1), self.num_tasks, axis=1))  # (B, T, S, H)
            pool = ops.concatenate(parts, axis=2) if len(parts) > 1 else parts[0]  # (B, T, K + S, H)
            new_xt = ops.einsum("bte,bteh->bth", g, pool)  # (B, T, H)
            if gs is not None:
                every = []
                if ht is not None:
                    every.append(ops.reshape(ht, (-1, self.num_tasks * self.task_experts, self.expert_units[-1])))
                if hs is not None:
                    every.append(hs)
                every = ops.concatenate(every, axis=1) if len(every) > 1 else every[0]  # (B, T·K + S, H)
                xs = ops.einsum("be,beh->bh", gs, every)
            xt = new_xt
        return xt

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_tasks, self.expert_units[-1])

    def get_config(self):
        return {**super().get_config(), "num_tasks": self.num_tasks, "task_experts": self.task_experts,
                "shared_experts": self.shared_experts, "expert_units": self.expert_units,
                "num_levels": self.num_levels, "gate_dropout": self.gate_dropout, "seed": self.seed}
