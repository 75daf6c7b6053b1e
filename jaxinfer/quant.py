"""Weight-only quantization: integer (or float8) weights with float scales, dequantized
inside the dot.

Decode reads every weight once per token, so bytes per weight set its speed. A quantized
weight is a `QArray` pytree in the place of the float array, with the same logical shape:

    values   int8 | int4 | float8_e4m3fn   the weight's own shape [..., C, ...]  (int4 is
                           packed in memory; float8 keeps FP8 releases' weights as they are)
    scales   float         values' shape with the contraction axes reduced: size 1 (one
                           scale per output channel) or C // group_size on `group_axis`
    offsets  float | None  like scales; w = values * scales + offsets (asymmetric, which
                           is how GGUF Q4_1's per-block min maps exactly)

`group_axis` (static, counted from the end so it survives the layer scan's slicing) is
the contraction axis cut into groups, or None when every contraction axis has size 1 in
`scales`. Symmetric int4 uses all 16 levels like llama.cpp's Q4_0 (the largest-magnitude
value maps to -8); int8 uses [-127, 127]; float8 (e4m3) maps the largest magnitude to 448,
its largest finite value, as FP8 releases do.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.errors import ConfigError

MODES = ("int8", "int4", "fp8")
FP8_MAX = 448.0  # float8_e4m3fn's largest finite value
DEFAULT_GROUP_SIZE = 32  # GGUF's block size, so Q4_0/Q4_1/Q8_0 import keeps their scales


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QArray:
    values: Any  # int8 | int4, the weight's shape
    scales: Any  # float, contraction axes reduced (see module docstring)
    offsets: Any = None  # float like scales, or None (symmetric)
    group_axis: int | None = dataclasses.field(default=None, metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    @property
    def ndim(self) -> int:
        return len(self.values.shape)

    @property
    def dtype(self) -> Any:
        """The dtype it dequantizes to (the scales'), so `w.dtype` means compute dtype."""
        return self.scales.dtype


def is_qarray(x: Any) -> bool:
    return isinstance(x, QArray)


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How one kind of weight is stored: bits, group size (None: per output channel),
    whether groups carry an offset (asymmetric), and whether the 8 bits are float8 (e4m3,
    symmetric) instead of integers."""

    bits: int  # 8 or 4
    group_size: int | None = None
    offsets: bool = False
    float8: bool = False

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise ConfigError(f"quantization bits must be 4 or 8, got {self.bits}")
        if self.group_size is not None and self.group_size <= 0:
            raise ConfigError(f"group_size must be positive, got {self.group_size}")
        if self.float8 and (self.bits != 8 or self.offsets):
            raise ConfigError("float8 quantization is 8 bits and symmetric")

    @property
    def dtype(self) -> Any:
        if self.float8:
            return jnp.float8_e4m3fn
        return jnp.int8 if self.bits == 8 else jnp.int4


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """Which weights are quantized and how: `linear` for wq/wk/wv/wo/w_gate/w_up/w_down,
    `embed` for the embedding table and lm_head (None keeps them float)."""

    linear: QuantSpec | None
    embed: QuantSpec | None = None

    @classmethod
    def from_mode(cls, mode: str, group_size: int | None = None, offsets: bool | None = None,
                  embed: bool = True) -> QuantConfig:
        """'int8': per-channel int8 everywhere. 'int4': group-wise int4 linear layers, with
        the embedding (the tied unembedding too) per-channel int8, as GGUF Q4 files do.
        'fp8': float8 linear layers (per channel, or groups of `group_size` inputs), the
        embedding left in float, as FP8 releases and vLLM's fp8 mode do.

        int4 groups carry offsets unless offsets=False: asymmetric groups cost one more
        float per group and measured 0.03% vs 21% perplexity loss on SmolLM2 (see
        docs/quantization.md)."""
        offsets = (mode == "int4") if offsets is None else offsets
        if mode not in MODES:
            raise ConfigError(f"unknown quantization mode {mode!r}; expected one of {MODES}")
        e = QuantSpec(8) if embed else None
        if mode == "fp8":
            if offsets:
                raise ConfigError("fp8 quantization is symmetric (no offsets)")
            return cls(QuantSpec(8, group_size, float8=True), None)
        if mode == "int8":
            return cls(QuantSpec(8, group_size, offsets), e)
        return cls(QuantSpec(4, DEFAULT_GROUP_SIZE if group_size is None else group_size,
                             offsets), e)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> QuantConfig:
        try:
            spec = lambda s: None if s is None else QuantSpec(**s)
            return cls(linear=spec(d["linear"]), embed=spec(d.get("embed")))
        except (KeyError, TypeError) as e:
            raise ConfigError(f"bad quantization config {d!r}: {e}") from e

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> QuantConfig:
        try:
            return cls.from_json(json.loads(Path(path).read_text()))
        except json.JSONDecodeError as e:
            raise ConfigError(f"bad quantization config {path}: {e}") from e


def scales_shape(shape: tuple[int, ...], contract: tuple[int, ...], group_axis: int | None,
                 group_size: int | None) -> tuple[int, ...]:
    """Shape of the scales of a weight of `shape` (axes negative, counted from the end):
    per-channel scales reduce every contraction axis to 1; group-wise ones cut only
    `group_axis` into groups and keep the other contraction axes (wo's heads) whole."""
    out = list(shape)
    if group_size is None:
        for a in contract:
            out[a] = 1
    else:
        if shape[group_axis] % group_size:
            raise ConfigError(f"group_size {group_size} does not divide axis {group_axis} "
                              f"of a weight of shape {tuple(shape)}")
        out[group_axis] = shape[group_axis] // group_size
    return tuple(out)


def _grouped(x: jax.Array, axis: int, groups: int) -> jax.Array:
    """[..., C, ...] -> [..., groups, C // groups, ...] (axis >= 0)."""
    return x.reshape(x.shape[:axis] + (groups, x.shape[axis] // groups) + x.shape[axis + 1:])


def quantize(w: jax.Array, spec: QuantSpec, contract: tuple[int, ...], group_axis: int,
             scale_dtype: Any = None) -> QArray:
    """Quantize float `w` along its contraction axes `contract` (negative indices).

    With spec.group_size, `group_axis` (one of `contract`) is cut into groups of that size
    and every other contraction axis keeps its full size in the scales.
    """
    w = jnp.asarray(w, jnp.float32)
    nd = w.ndim
    grouped = spec.group_size is not None
    if grouped:
        ga = group_axis % nd
        groups = scales_shape(w.shape, (), group_axis, spec.group_size)[ga]
        x = _grouped(w, ga, groups)
        red = (ga + 1,)
    else:
        x, red = w, tuple(a % nd for a in contract)
    if spec.offsets:
        levels = 2 ** spec.bits - 1  # 255 or 15 steps between min and max
        lo, hi = x.min(red, keepdims=True), x.max(red, keepdims=True)
        scale = (hi - lo) / levels
        scale = jnp.where(scale > 0, scale, 1.0)
        qmin = -(2 ** (spec.bits - 1))
        q = jnp.clip(jnp.round((x - lo) / scale), 0, levels) + qmin
        offset = lo - qmin * scale
    elif spec.float8:
        scale = jnp.abs(x).max(red, keepdims=True) / FP8_MAX
        scale = jnp.where(scale != 0, scale, 1.0)
        q = jnp.clip(x / scale, -FP8_MAX, FP8_MAX)  # rounded to float8 by the cast below
        offset = None
    else:
        if spec.bits == 8:
            scale = jnp.abs(x).max(red, keepdims=True) / 127.0
        elif len(red) == 1:  # Q4_0's trick: the largest-magnitude value maps to -8
            i = jnp.argmax(jnp.abs(x), axis=red[0], keepdims=True)
            scale = jnp.take_along_axis(x, i, axis=red[0]) / -8.0
        else:
            scale = jnp.abs(x).max(red, keepdims=True) / 7.0
        scale = jnp.where(scale != 0, scale, 1.0)
        qmax = 127 if spec.bits == 8 else 7
        q = jnp.clip(jnp.round(x / scale), -qmax - 1, qmax)
        offset = None
    sdt = scale_dtype or jnp.float32
    squeeze = (lambda a: a.reshape(a.shape[:ga + 1] + a.shape[ga + 2:])) if grouped else (
        lambda a: a)
    return QArray(values=q.reshape(w.shape).astype(spec.dtype),
                  scales=squeeze(scale).astype(sdt),
                  offsets=None if offset is None else squeeze(offset).astype(sdt),
                  group_axis=group_axis if grouped else None)


def dequantize(q: QArray, dtype: Any = None) -> jax.Array:
    """The float weight `values * scales (+ offsets)`, in `dtype` (default: the scales')."""
    dtype = q.scales.dtype if dtype is None else dtype
    v = q.values.astype(dtype)
    s = q.scales.astype(dtype)
    o = None if q.offsets is None else q.offsets.astype(dtype)
    if q.group_axis is None:
        return v * s if o is None else v * s + o
    ga = q.group_axis % v.ndim
    shape = v.shape
    v = _grouped(v, ga, s.shape[ga])
    w = v * jnp.expand_dims(s, ga + 1)
    if o is not None:
        w = w + jnp.expand_dims(o, ga + 1)
    return w.reshape(shape)


def qdot(eq: str, x: jax.Array, w: QArray, **kw: Any) -> jax.Array:
    """einsum(eq, x, w) for a quantized `w`.

    Per-output-channel scales multiply the output, so the dot itself reads the raw integers
    and a fused convert (GPU/TPU) never writes a float copy of the weight; grouped or
    offset weights are dequantized in front of the dot, which XLA fuses on accelerators.
    """
    ins, out = eq.split("->")
    xl, wl = ins.split(",")
    if jax.default_backend() == "cpu" and int(np.prod(w.shape)) > CPU_CHUNK:
        return _chunked(eq, xl, wl, out, x, w, **kw)
    return _qdot(eq, wl, out, x, w, **kw)


def _qdot(eq: str, wl: str, out: str, x: jax.Array, w: QArray, **kw: Any) -> jax.Array:
    dt = x.dtype
    if w.group_axis is None and w.offsets is None:
        keep = "".join(c for c, n in zip(wl, w.scales.shape, strict=True) if n != 1)
        if all(c in out for c in keep):
            y = jnp.einsum(eq, x, w.values.astype(dt), **kw)
            s = w.scales.reshape([n for n in w.scales.shape if n != 1]).astype(y.dtype)
            return jnp.einsum(f"{out},{keep}->{out}", y, s)
    return jnp.einsum(eq, x, dequantize(w, dt), **kw)


# XLA:CPU does not fuse the int -> float convert into its dot: it writes the float weight
# out first. Below this many elements that copy stays in cache and costs little; a larger
# weight (a 49k-vocab unembedding) goes in chunks of about this size (30x faster there).
CPU_CHUNK = 1 << 21


def _chunked(eq: str, xl: str, wl: str, out: str, x: jax.Array, w: QArray, **kw: Any
             ) -> jax.Array:
    """_qdot over chunks of the largest output-only axis of `w`, under lax.map."""
    cands = [(n, i) for i, (c, n) in enumerate(zip(wl, w.shape, strict=True))
             if c in out and c not in xl and w.scales.shape[i] == n]
    if not cands:
        return _qdot(eq, wl, out, x, w, **kw)
    n, a = max(cands)
    want = max(1, int(np.prod(w.shape)) // CPU_CHUNK)
    C = next(c for c in range(want, n + 1) if n % c == 0)

    def split(arr):
        return None if arr is None else jnp.moveaxis(
            arr.reshape(arr.shape[:a] + (C, n // C) + arr.shape[a + 1:]), a, 0)

    chunks = QArray(split(w.values), split(w.scales), split(w.offsets), w.group_axis)
    y = jax.lax.map(lambda c: _qdot(eq, wl, out, x, c, **kw), chunks)  # [C, ..., n/C, ...]
    q = y.ndim - 2 - (len(out) - 1 - out.index(wl[a]))  # the chunked axis, within a chunk
    y = jnp.moveaxis(y, 0, q)
    return y.reshape(y.shape[:q] + (n,) + y.shape[q + 2:])


def take_rows(table: Any, ids: jax.Array, dtype: Any = None) -> jax.Array:
    """Rows `ids` of a [V, D] table (an embedding lookup), quantized or not: only the
    looked-up rows are dequantized."""
    if not is_qarray(table):
        return jnp.take(table, ids, axis=0).astype(dtype or table.dtype)
    rows = jax.tree.map(lambda a: jnp.take(a, ids, axis=0), table)
    return dequantize(rows, dtype)


def infer_config(weights: dict[str, Any]) -> QuantConfig | None:
    """The QuantConfig a weight tree was quantized with (None for a float tree)."""
    def spec(w: Any) -> QuantSpec | None:
        if not is_qarray(w):
            return None
        bits = 4 if jnp.dtype(w.values.dtype) == jnp.dtype(jnp.int4) else 8
        gs = None if w.group_axis is None else (
            w.values.shape[w.group_axis] // w.scales.shape[w.group_axis])
        f8 = jnp.dtype(w.values.dtype) == jnp.dtype(jnp.float8_e4m3fn)
        return QuantSpec(bits, gs, w.offsets is not None, f8)

    layers = weights["layers"]  # (latent attention: its query projection is wq or wq_a)
    lin, emb = spec(layers["wq"] if "wq" in layers else layers["wq_a"]), spec(weights["embed"])
    return None if lin is None and emb is None else QuantConfig(lin, emb)


def nbytes(x: Any) -> int:
    """Bytes an array occupies in memory: int4 is packed two to a byte, although numpy's
    and jax's `nbytes` count one byte per element."""
    bits = jnp.dtype(x.dtype).itemsize * 8
    if jnp.dtype(x.dtype) in (jnp.dtype(jnp.int4), jnp.dtype(jnp.uint4)):
        bits = 4
    return (int(np.prod(x.shape)) * bits + 7) // 8
