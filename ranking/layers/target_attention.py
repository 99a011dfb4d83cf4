"""Target attention over a behaviour sequence (DIN, Zhou et al., KDD 2018): the candidate attends over the user's
past events and pools them into one vector per candidate.

B batch (candidates), L events, D_q query width (the candidate's embeddings of the fields it shares with the events),
D_k key width (all of an event's field embeddings), D attention width, U attention MLP widths.

    q = query · W_q                       (B, D)
    k = keys · W_k                        (B or 1, L, D)      ``project_keys``: once per request at serving
    w = MLP([q, k, q - k, q * k]) -> 1    (B, L)              ReLU hidden layers, a linear output
    out = sum_l valid_l · w_l · k_l       (B, D)              ``attend``

By default, as in DIN, the weights are not softmax-normalised: the pooled vector keeps how much of the history is
relevant to the candidate (three past clicks on the candidate's author weigh more than one), which a softmax would
divide away; the same-day ``match`` counts showed that the count itself carries the click signal. ``softmax=True``
normalises w over the valid events instead (a weighted mean). Padded events (``valid`` 0) add nothing and a user
with no events gets zeros either way.
"""

from __future__ import annotations

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="rankstage")
class TargetAttention(keras.layers.Layer):
    """(query (B, D_q), keys (B or 1, L, D_k), valid (B or 1, L)) -> (B, D): masked, unnormalised DIN pooling.

    Keys of batch 1 (one request's sequence) are broadcast over the B candidates.
    """

    def __init__(self, dim: int, units: list[int] | tuple[int, ...] = (32,), softmax: bool = False, **kwargs):
        super().__init__(**kwargs)
        if int(dim) < 1:
            raise ValueError(f"TargetAttention: dim must be >= 1, got {dim!r}")
        if not units or any(int(u) < 1 for u in units):
            raise ValueError(f"TargetAttention: units must be a non-empty list of widths >= 1, got {units!r}")
        self.dim, self.units, self.softmax = int(dim), [int(u) for u in units], bool(softmax)

    def build(self, query_shape, keys_shape, valid_shape=None):
        self.query_kernel = self.add_weight(shape=(int(query_shape[-1]), self.dim), name="query_kernel",
                                            initializer="glorot_uniform")
        self.key_kernel = self.add_weight(shape=(int(keys_shape[-1]), self.dim), name="key_kernel",
                                          initializer="glorot_uniform")
        self.hidden_kernels, self.hidden_biases = [], []
        d = 4 * self.dim
        for i, u in enumerate(self.units):
            self.hidden_kernels.append(self.add_weight(shape=(d, u), name=f"hidden_kernel_{i}",
                                                       initializer="glorot_uniform"))
            self.hidden_biases.append(self.add_weight(shape=(u,), name=f"hidden_bias_{i}", initializer="zeros"))
            d = u
        self.out_kernel = self.add_weight(shape=(d, 1), name="out_kernel", initializer="glorot_uniform")
        self.out_bias = self.add_weight(shape=(1,), name="out_bias", initializer="zeros")

    def project_keys(self, keys):
        """(..., L, D_k) event embeddings -> (..., L, D) keys (also the values)."""
        return ops.matmul(keys, self.key_kernel)

    def attend(self, query, keys, valid):
        """query (B, D_q), projected keys (B or 1, L, D), valid (B or 1, L) -> (B, D)."""
        q = ops.matmul(query, self.query_kernel)  # (B, D)
        b, length = ops.shape(q)[0], ops.shape(keys)[1]
        k = ops.broadcast_to(keys, (b, length, self.dim))  # (B, L, D)
        qs = ops.broadcast_to(ops.expand_dims(q, 1), (b, length, self.dim))  # (B, L, D)
        h = ops.concatenate([qs, k, qs - k, qs * k], axis=-1)  # (B, L, 4D)
        for kernel, bias in zip(self.hidden_kernels, self.hidden_biases):
            h = ops.relu(ops.matmul(h, kernel) + bias)  # (B, L, U)
        w = ops.squeeze(ops.matmul(h, self.out_kernel) + self.out_bias, -1)  # (B, L)
        v = ops.broadcast_to(ops.cast(valid, w.dtype), (b, length))
        if self.softmax:  # over the valid events; a row without any sums zeros
            w = ops.softmax(w + (v - 1.0) * 1e9, axis=-1)
        w = w * v  # padding weighs 0
        return ops.einsum("bl,bld->bd", w, k)

    def call(self, query, keys, valid):
        return self.attend(query, self.project_keys(keys), valid)

    def compute_output_shape(self, query_shape, keys_shape, valid_shape=None):
        return (query_shape[0], self.dim)

    def get_config(self):
        return {**super().get_config(), "dim": self.dim, "units": self.units, "softmax": self.softmax}
