"""Stacked [L, ...] weights that the converters fill one layer (or expert) at a time.

Without quantization a stack is a preallocated float32 array. With a QuantSpec each slice
is quantized as it arrives (the same `quant.quantize` as `weights.quantize_weights`), so
converting a large model with `--quantize` holds the quantized stacks plus one layer in
float, never the whole float model (a float32 8B model alone is 32 GB).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxinfer.quant import QArray, QuantConfig, QuantSpec, scales_shape
from jaxinfer.weights import LINEAR_QUANT_AXES, quantize_fn, quantize_weights


class Stack:
    """One stacked weight; `stack[i] = layer` or `stack[i, e] = expert` (float arrays)."""

    def __init__(self, shape: tuple[int, ...], spec: QuantSpec | None = None,
                 contract: tuple[int, ...] = (), group_axis: int = -1):
        self.spec, self.contract, self.group_axis = spec, contract, group_axis
        if spec is None:
            self.values = np.empty(shape, np.float32)
            return
        self.values = np.empty(shape, spec.dtype)
        sshape = scales_shape(shape, contract, group_axis, spec.group_size)
        self.scales = np.empty(sshape, np.float32)
        self.offsets = np.empty(sshape, np.float32) if spec.offsets else None

    def __setitem__(self, index: Any, value: np.ndarray) -> None:
        if self.spec is None:
            self.values[index] = value
            return
        fn = quantize_fn(self.spec, self.contract, self.group_axis, jnp.dtype(jnp.float32),
                          None)
        q = fn(jnp.asarray(value, jnp.float32))
        self.values[index] = np.asarray(q.values)
        self.scales[index] = np.asarray(q.scales)
        if self.offsets is not None:
            self.offsets[index] = np.asarray(q.offsets)

    def result(self) -> np.ndarray | QArray:
        if self.spec is None:
            return self.values
        grouped = self.spec.group_size is not None
        return QArray(self.values, self.scales, self.offsets,
                      self.group_axis if grouped else None)


def stacks(shapes: dict[str, tuple[int, ...]], num_layers: int,
           quant: QuantConfig | None = None) -> dict[str, Stack]:
    """A Stack [L, *shape] per weight; the linear ones quantized per `quant.linear`."""
    spec = None if quant is None else quant.linear
    out = {}
    for name, shape in shapes.items():
        axes = LINEAR_QUANT_AXES.get(name) if spec is not None else None
        out[name] = (Stack((num_layers, *shape)) if axes is None
                     else Stack((num_layers, *shape), spec, *axes))
    return out


def results(layers: dict[str, Any]) -> dict[str, Any]:
    """The filled stacks as arrays / QArrays (other entries as they are)."""
    return {k: v.result() if isinstance(v, Stack) else v for k, v in layers.items()}


def quantize_embeddings(weights: dict[str, Any], quant: QuantConfig | None) -> dict[str, Any]:
    """The embedding (and lm_head) quantized per `quant.embed`, once they are read."""
    if quant is None or quant.embed is None:
        return weights
    return quantize_weights(weights, QuantConfig(linear=None, embed=quant.embed))
