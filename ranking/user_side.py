"""The serving model cut at its first shared-bottom layer, so ``rank_candidates`` encodes the request side once:
``W·[u; i] + b = W_u·u + (W_i·i + b)``, the user part broadcast to the C candidates. A sequence feature's slot is
per candidate (the candidate attends over the user's events): its keys are computed once per request, (1, L, D),
and broadcast over the C candidates' queries inside ``TargetAttention.attend``.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from features.spec import RankstageConfig
from ranking.layers.target_attention import TargetAttention
from ranking.signatures import candidate_features, rank_candidates_omitted, request_features


@dataclass(frozen=True)
class UserSide:
    """The serving model cut for ``rank_candidates``; every layer and weight is the serving model's own.

    C candidates, D_u / D_i encoded widths of the request / candidate features, H first bottom layer's width.
    ``first`` is the first shared-bottom Dense (kernel (D_u + D_i, H), rows in the ``features`` concatenation order);
    ``request_rows`` / ``candidate_rows`` are its kernel rows of the request / candidate features' slots. Features
    routed to towers only (``towers``) are encoded apart (request ones once, broadcast over C) and fed to ``rest``.
    """

    request_encoder: keras.Model  # {name: (1,)} -> [(1, D_f)] per request feature
    candidate_encoder: keras.Model  # {name: (C,)} -> [(C, D_f)] per candidate feature (inputs: theirs, and the ids
    # match features count)
    first: keras.layers.Dense
    request_rows: np.ndarray  # (D_u,) int
    candidate_rows: np.ndarray  # (D_i,) int
    rest: keras.Model  # (C, H) first layer's output [, (C,) bias lookup index per bias input] -> {task: (C,)}
    bias_lookups: tuple[tuple[str, keras.layers.Layer], ...] = ()  # (device, its lookup): request value, over C
    # tower-only features, fed to ``rest`` after the bias lookups: the request ones, then the candidate ones
    routed_request: keras.Model | None = None  # {name: (1,)} -> [(1, D_f)] per routed request feature
    routed_candidates: keras.Model | None = None  # {name: (C,)} -> [(C, D_f)] per routed candidate feature
    # sequence features (S of them): their events, once per request, and the attention over them per candidate. The
    # candidate encoder's last S outputs are their queries (C, D_q)
    sequence_encoder: keras.Model | None = None  # {name: (1,)} -> [keys (1, L, D_k), valid (1, L)] per sequence
    attentions: tuple[TargetAttention, ...] = ()
    sequence_rows: tuple[np.ndarray, ...] = ()  # per sequence: its kernel rows (D,) int

    @classmethod
    def of(cls, serve: keras.Model, config: RankstageConfig) -> UserSide:
        """Cut ``serve`` (built by ``ranking.model.build_models``) at its first shared-bottom layer."""
        reason = rank_candidates_omitted(config)
        if reason is not None:
            raise ValueError(f"rank_candidates: {reason}")
        concat, first = serve.get_layer("features"), serve.get_layer("shared_bottom_0")
        if first.input is not concat.output:
            raise ValueError("rank_candidates: shared_bottom_0 does not read the 'features' concatenation")
        encoded = dict(zip([f.name for f in config.bottom_features], concat.input))  # name -> (B, D_f)
        routed_encoded = {}  # tower-only features: the tensors their towers' input concatenations read
        for t in config.tasks:
            names = [f.name for f in config.tower_features(t.name)]
            if names:
                routed_encoded.update(zip(names, serve.get_layer(f"{t.name}_tower_input").input[1:]))
        inputs = serve.input  # {name: (B,)}
        bias = tuple(f.name for f in config.serving_bias_features)  # read by the bias tower, not encoded
        lookups = {n: serve.get_layer("bias_device_lookup") for n in bias}  # device is the only served bias input
        sequences = [f.name for f in config.bottom_features if f.kind == "sequence"]
        request = [n for n in request_features(config) if n in encoded and n not in sequences]
        candidates = [n for n in candidate_features(config) if n in encoded]
        routed_request = [n for n in request_features(config) if n in routed_encoded]
        routed_candidates = [n for n in candidate_features(config) if n in routed_encoded]
        routed = routed_request + routed_candidates  # ``rest``'s input order, as ``__call__`` feeds them
        rows, start = {}, 0
        for name, t in encoded.items():  # each encoding's width, from the graph
            rows[name] = np.arange(start, start + int(t.shape[-1]))
            start += int(t.shape[-1])
        if start != first.kernel.shape[0]:
            raise ValueError(f"rank_candidates: encoded widths sum to {start}, shared_bottom_0 kernel has "
                             f"{first.kernel.shape[0]} rows")

        def reads(names: list[str]) -> dict:
            """The raw inputs the encodings of ``names`` read: their own, and a match feature's candidate id."""
            extra = [f.match for f in config.features if f.name in names and f.match and f.match not in names]
            return {n: inputs[n] for n in [*names, *dict.fromkeys(extra)]}

        queries = [serve.get_layer(f"{n}_query").output for n in sequences]  # (B, D_q), from candidate inputs
        targets = [fld.target for f in config.features if f.name in sequences for fld in f.sequence.fields
                   if fld.target is not None]
        candidate_inputs = {**reads(candidates), **{n: inputs[n] for n in targets}}
        events = [t for n in sequences for t in (serve.get_layer(f"{n}_keys").output,
                                                  serve.get_layer(f"{n}_valid").output)]

        return cls(
            keras.Model(reads(request), [encoded[n] for n in request], name="request_encoder"),
            keras.Model(candidate_inputs, [encoded[n] for n in candidates] + queries, name="candidate_encoder"),
            first,
            np.concatenate([rows[n] for n in request]).astype(np.int32),
            np.concatenate([rows[n] for n in candidates]).astype(np.int32),
            # cut at the bias lookups' outputs too: a cut mixing graph inputs with inner tensors breaks saving
            keras.Model([first.output, *(lookups[n].output for n in bias), *(routed_encoded[n] for n in routed)]
                        if bias or routed else first.output, serve.output, name="over_first_layer"),
            tuple((n, lookups[n]) for n in bias),
            keras.Model(reads(routed_request), [routed_encoded[n] for n in routed_request],
                        name="routed_request_encoder") if routed_request else None,
            keras.Model(reads(routed_candidates), [routed_encoded[n] for n in routed_candidates],
                        name="routed_candidate_encoder") if routed_candidates else None,
            keras.Model({n: inputs[n] for n in sequences}, events, name="sequence_encoder") if sequences else None,
            tuple(serve.get_layer(f"{n}_attention") for n in sequences),
            tuple(rows[n].astype(np.int32) for n in sequences),
        )

    def __call__(self, inputs: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        """{user/context name: (1,), item name: (C,)} -> {task: (C,)}."""
        request = {n: inputs[n] for n in self.request_encoder.input}  # the encoders' own inputs (a match feature
        candidates = {n: inputs[n] for n in self.candidate_encoder.input}  # also reads its candidate id)
        u = _concat(self.request_encoder(request, training=False))  # (1, D_u)
        encoded = _as_list(self.candidate_encoder(candidates, training=False))
        n_seq = len(self.attentions)
        i = _concat(encoded[:len(encoded) - n_seq])  # (C, D_i)
        kernel = self.first.kernel  # (D_u + D_i, H)
        user_part = ops.matmul(u, ops.take(kernel, self.request_rows, axis=0))  # (1, H), once per request
        item_part = ops.matmul(i, ops.take(kernel, self.candidate_rows, axis=0)) + self.first.bias  # (C, H)
        if self.sequence_encoder is not None:
            events = _as_list(self.sequence_encoder({n: inputs[n] for n in self.sequence_encoder.input},
                                                    training=False))  # per sequence: (1, L, D_k), (1, L)
            queries = encoded[len(encoded) - n_seq:]  # (C, D_q) each
            for j, (attention, rows) in enumerate(zip(self.attentions, self.sequence_rows)):
                keys = attention.project_keys(events[2 * j])  # (1, L, D), once per request
                pooled = attention.attend(queries[j], keys, events[2 * j + 1])  # (C, D)
                item_part = item_part + ops.matmul(pooled, ops.take(kernel, rows, axis=0))  # (C, H)
        hidden = self.first.activation(item_part + user_part)  # (C, H), user part broadcast over C
        bias = [ops.broadcast_to(lookup(inputs[n]), ops.shape(hidden)[:1]) for n, lookup in self.bias_lookups]  # (C,)
        routed = []
        if self.routed_request is not None:  # (1, D_f) each, once per request, broadcast to (C, D_f)
            parts = _as_list(self.routed_request({n: inputs[n] for n in self.routed_request.input}, training=False))
            routed += [ops.broadcast_to(p, (ops.shape(hidden)[0], p.shape[-1])) for p in parts]
        if self.routed_candidates is not None:  # (C, D_f) each
            routed += _as_list(self.routed_candidates({n: inputs[n] for n in self.routed_candidates.input},
                                                      training=False))
        extra = [*bias, *routed]
        return self.rest([hidden, *extra] if extra else hidden, training=False)


def _as_list(parts) -> list:
    return list(parts) if isinstance(parts, list | tuple) else [parts]


def _concat(parts) -> tf.Tensor:
    parts = _as_list(parts)
    return parts[0] if len(parts) == 1 else ops.concatenate(parts, axis=-1)
