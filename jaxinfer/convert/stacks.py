"""Stacked [L, ...] weights that the converters fill one layer (or expert) at a time.

Without quantization a stack is a preallocated float array, in memory or (with a scratch
directory) in a file mapped into memory; see `Storage`. With a QuantSpec each slice is
quantized as it arrives (the same `quant.quantize` as `weights.quantize_weights`), so
converting a large model with `--quantize` holds the quantized stacks plus one layer in
float, never the whole float model (a float32 8B model alone is 32 GB).
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxinfer.config import ModelConfig
from jaxinfer.convert.hf_quant import MXFP4_BLOCK
from jaxinfer.quant import QArray, QuantConfig, QuantSpec, scales_shape
from jaxinfer.weights import (
    LAYER_STACKS,
    LINEAR_QUANT_AXES,
    quantize_fn,
    quantize_weights,
    weight_specs,
)


@dataclasses.dataclass(frozen=True)
class Storage:
    """Where a converter keeps float weights until they are saved.

    `dtype` is the checkpoint's, so a bfloat16 conversion holds 2 bytes per weight and
    the save casts nothing. With `scratch` (a directory) each array is a file there mapped
    into memory: the kernel pages the model out to disk as needed, so a model larger than
    host memory converts, at the cost of disk space the size of the float model.
    """

    dtype: Any = np.float32
    scratch: str | Path | None = None

    def empty(self, shape: tuple[int, ...]) -> np.ndarray:
        if self.scratch is None:
            return np.empty(shape, self.dtype)
        with tempfile.NamedTemporaryFile(dir=self.scratch, suffix=".npy", delete=False) as f:
            return np.lib.format.open_memmap(f.name, mode="w+", dtype=self.dtype, shape=shape)

    def put(self, a: np.ndarray) -> np.ndarray:
        """`a` held as this storage holds weights (a no-op for float32 in memory)."""
        if self.scratch is None:
            return np.asarray(a).astype(self.dtype, copy=False)
        out = self.empty(a.shape)
        out[...] = a
        return out


IN_MEMORY = Storage()


class Stack:
    """One stacked weight; `stack[i] = layer` or `stack[i, e] = expert` (float arrays)."""

    def __init__(self, shape: tuple[int, ...], spec: QuantSpec | None = None,
                 contract: tuple[int, ...] = (), group_axis: int = -1,
                 storage: Storage = IN_MEMORY):
        self.spec, self.contract, self.group_axis = spec, contract, group_axis
        if spec is None:
            self.values = storage.empty(shape)
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

    def takes_groups(self, size: int) -> bool:
        """Whether weights already quantized to int8 with one scale per `size` inputs
        (MXFP4's blocks) can be stored as they are, with no requantization."""
        s = self.spec
        return (s is not None and s.bits == 8 and s.group_size == size and not s.offsets
                and not s.float8)

    @property
    def takes_scales(self) -> bool:
        """Whether FP8 weights can be stored with their own scales (`set_scaled`)."""
        return self.spec is not None and self.spec.float8

    def set_scaled(self, index: Any, w: np.ndarray, scales: np.ndarray) -> bool:
        """Store float8 values w / scales exactly: `w` is an FP8 weight decoded (values
        times `scales`, each element's) in float32, so w / scales rounds back to its own
        float8 values. False (nothing stored) if `scales` is not constant over the
        stack's groups (or contraction axes, per channel)."""
        nd = w.ndim
        if self.spec.group_size is None:
            red = tuple(a % nd for a in self.contract)
            s = scales.max(axis=red, keepdims=True)
            fits = np.array_equal(np.broadcast_to(s, scales.shape), scales)
        else:
            ga = self.group_axis % nd
            g = scales.shape[ga] // self.spec.group_size
            grouped = scales.reshape(scales.shape[:ga] + (g, -1) + scales.shape[ga + 1:])
            s = grouped.max(axis=ga + 1)
            fits = np.array_equal(grouped.min(axis=ga + 1), s)
        if not fits:
            return False
        self.values[index] = np.where(scales != 0, w / np.where(scales != 0, scales, 1), 0
                                      ).astype(self.values.dtype)
        self.scales[index] = s.reshape(self.scales[index].shape)
        return True

    def set_quantized(self, index: Any, values: np.ndarray, scales: np.ndarray) -> None:
        """Store a slice quantized elsewhere (see `takes_groups`)."""
        self.values[index] = values
        self.scales[index] = scales

    def result(self) -> np.ndarray | QArray:
        if self.spec is None:
            return self.values
        grouped = self.spec.group_size is not None
        return QArray(self.values, self.scales, self.offsets,
                      self.group_axis if grouped else None)


def stacks(shapes: dict[str, tuple[int, ...]], num_layers: int,
           quant: QuantConfig | None = None, storage: Storage = IN_MEMORY) -> dict[str, Stack]:
    """A Stack [L, *shape] per weight; the linear ones quantized per `quant.linear`, the
    others held per `storage`."""
    spec = None if quant is None else quant.linear
    out = {}
    for name, shape in shapes.items():
        axes = LINEAR_QUANT_AXES.get(name) if spec is not None else None
        out[name] = (Stack((num_layers, *shape), storage=storage) if axes is None
                     else Stack((num_layers, *shape), spec, *axes))
    return out


def source_groups(cfg: ModelConfig, quant: QuantConfig | None,
                  fp8_block: tuple[int, int] | None = None, mxfp4: bool = False
                  ) -> QuantConfig | None:
    """The groups that keep a quantized release's weights exactly, where `quant` gives no
    group size: fp8 of a block-FP8 release, groups that split its blocks along the inputs
    (the block width where it divides every linear weight's group axis, as 128 does in
    the releases); int8 of an MXFP4 release, groups of 32 (the MXFP4 block: `takes_groups`)
    where 32 divides them. Otherwise `quant` as given."""
    lin = None if quant is None else quant.linear
    if lin is None or lin.group_size is not None or lin.offsets or lin.bits != 8:
        return quant
    tree = weight_specs(cfg)
    sizes = [tree[stack][name].shape[axis] for stack in LAYER_STACKS
             for name, (_, axis) in LINEAR_QUANT_AXES.items() if name in tree.get(stack, {})]
    if lin.float8 and fp8_block is not None:
        g = math.gcd(fp8_block[1], *sizes)
    elif not lin.float8 and mxfp4 and all(n % MXFP4_BLOCK == 0 for n in sizes):
        g = MXFP4_BLOCK
    else:
        return quant
    return dataclasses.replace(quant, linear=dataclasses.replace(lin, group_size=g))


def results(layers: dict[str, Any]) -> dict[str, Any]:
    """The filled stacks as arrays / QArrays (other entries as they are)."""
    return {k: v.result() if isinstance(v, Stack) else v for k, v in layers.items()}


def quantize_embeddings(weights: dict[str, Any], quant: QuantConfig | None) -> dict[str, Any]:
    """The embedding (and lm_head) quantized per `quant.embed`, once they are read."""
    if quant is None or quant.embed is None:
        return weights
    return quantize_weights(weights, QuantConfig(linear=None, embed=quant.embed))
