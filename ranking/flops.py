"""Counting a traced graph's matrix-product FLOPs (what ``rank_candidates`` saves per candidate)."""

from __future__ import annotations

import numpy as np
import tensorflow as tf


def matmul_flops(graph: tf.Graph) -> int:
    """Multiply-add FLOPs (2 per multiply-add) of the MatMul / BatchMatMul / Einsum ops of a traced graph with
    static shapes. Gathers, lookups and elementwise ops are not counted."""
    total = 0
    for op in graph.get_operations():
        shapes = [list(t.shape) for t in op.inputs]
        if op.type == "MatMul":
            (m, k), (k2, n) = shapes[0], shapes[1]
            if op.get_attr("transpose_a"):
                m, k = k, m
            if op.get_attr("transpose_b"):
                n = k2
            total += 2 * m * k * n
        elif op.type in ("BatchMatMul", "BatchMatMulV2", "BatchMatMulV3"):
            k = shapes[0][-2] if op.get_attr("adj_x") else shapes[0][-1]
            total += 2 * int(np.prod(op.outputs[0].shape)) * k
        elif op.type == "Einsum":
            sizes: dict[str, int] = {}
            for labels, shape in zip(op.get_attr("equation").decode().split("->")[0].split(","), shapes):
                sizes.update(zip(labels, shape))
            total += 2 * int(np.prod(list(sizes.values())))
    return total
