"""Stateless building blocks: RMSNorm, rotary embeddings, gated MLP, the weight dot.

Shapes: x_BTD activations, positions_BT absolute token positions.
Norms and RoPE angles are computed in float32 whatever the activation dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer import lora
from jaxinfer.config import ModelConfig
from jaxinfer.quant import is_qarray, qdot


def dot(x: jax.Array, w, eq: str, **kw) -> jax.Array:
    """`einsum(eq, x, w)` where `w` may be a quantized QArray (dequantized inside the dot,
    so the packed integers are what is read from memory) or a LoraLinear (each row's
    adapter delta added, lora.py)."""
    if isinstance(w, lora.LoraLinear):
        y = dot(x, w.base, eq, **kw)
        return (y.astype(jnp.float32) + lora.delta(x, w, y.shape[2:])).astype(y.dtype)
    return qdot(eq, x, w, **kw) if is_qarray(w) else jnp.einsum(eq, x, w, **kw)


def rms_norm(x_BTD: jax.Array, w_D: jax.Array, eps: float, plus_one: bool = False
             ) -> jax.Array:
    """RMSNorm over the last axis; Gemma's weights are stored as (scale - 1), so
    `plus_one` adds the 1 back in float32 (adding it to bfloat16 weights would round)."""
    x = x_BTD.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
    w = w_D.astype(jnp.float32)
    return (x * (1.0 + w if plus_one else w)).astype(x_BTD.dtype)


def unit_rms(x: jax.Array, eps: float) -> jax.Array:
    """x scaled to unit RMS over the last axis, no weights (Llama 4's q/k "L2" norm)."""
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
            ).astype(x.dtype)


def layer_norm(x_BTD: jax.Array, w_D: jax.Array, b_D: jax.Array | None, eps: float
               ) -> jax.Array:
    """LayerNorm over the last axis (Cohere, StableLM), in float32; `w` may carry leading
    axes of its own (per-head q/k norms: [N, H])."""
    x = x_BTD.astype(jnp.float32)
    x = x - jnp.mean(x, axis=-1, keepdims=True)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
    x = x * w_D.astype(jnp.float32)
    return (x if b_D is None else x + b_D.astype(jnp.float32)).astype(x_BTD.dtype)


def norm(cfg: ModelConfig, x_BTD: jax.Array, w_D: jax.Array, b_D: jax.Array | None = None
         ) -> jax.Array:
    """The model's norm: RMSNorm (eps and Gemma's 1 + w from the config) or LayerNorm,
    with its bias `b_D` where the model has one."""
    if cfg.layer_norm:
        return layer_norm(x_BTD, w_D, b_D, cfg.rms_norm_eps)
    return rms_norm(x_BTD, w_D, cfg.rms_norm_eps, cfg.norm_plus_one)


def norm_heads(cfg: ModelConfig, x_BTNH: jax.Array, w_NH: jax.Array) -> jax.Array:
    """RMSNorm over every head at once (OLMo 2's q/k norm over the [N*H] projection); under
    a mesh that splits the heads the mean is one all-reduce."""
    x = x_BTNH.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=(-2, -1), keepdims=True) + cfg.rms_norm_eps)
    return (x * w_NH.astype(jnp.float32)).astype(x_BTNH.dtype)


def rope_frequencies(cfg: ModelConfig, local: bool = False, long: bool = False
                     ) -> np.ndarray:
    """Inverse frequencies [R/2] (R rotated dims of each head) of the global layers, or of
    the local (sliding-window) ones, which Gemma 3 gives their own base and no scaling;
    scaled as configured: linear, Llama 3, YaRN, or LongRoPE's short (`long`: long)
    factors. Computed on the host in float64, then rounded to float32."""
    R = cfg.rope_dim or cfg.head_dim
    theta = cfg.rope_local_theta if local and cfg.rope_local_theta else cfg.rope_theta
    inv = 1.0 / (theta ** (np.arange(0, R, 2, dtype=np.float64) / R))
    if local and cfg.rope_local_theta:
        return inv.astype(np.float32)
    inv = inv / cfg.rope_linear_factor
    if cfg.rope_scaling:
        factor, lo, hi, orig = cfg.rope_scaling
        wavelen = 2 * np.pi / inv
        lo_wl, hi_wl = orig / lo, orig / hi
        smooth = (orig / wavelen - lo) / (hi - lo)
        scaled = np.where(wavelen > lo_wl, inv / factor, inv)
        mid = (wavelen <= lo_wl) & (wavelen >= hi_wl)
        inv = np.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
    if cfg.rope_yarn:
        factor, orig, fast, slow, truncate = cfg.rope_yarn
        # The dims that turn fewer than `slow` times over the original context are
        # interpolated (divided by factor), those turning more than `fast` times kept,
        # a linear ramp between.
        def dim(turns):
            return R * np.log(orig / (turns * 2 * np.pi)) / (2 * np.log(theta))
        lo, hi = dim(fast), dim(slow)
        if truncate:
            lo, hi = np.floor(lo), np.ceil(hi)
        lo, hi = max(lo, 0), min(hi, R - 1)
        ramp = np.clip((np.arange(R // 2) - lo) / (hi - lo if hi != lo else 0.001), 0, 1)
        inv = inv / factor * ramp + inv * (1 - ramp)
    if cfg.rope_longrope:
        inv = inv / np.asarray(cfg.rope_longrope[1 if long else 0], np.float64)
    return inv.astype(np.float32)


def rope_angles(cfg: ModelConfig, positions_BT: jax.Array, local: jax.Array | None = None,
                context: int = 0) -> jax.Array:
    """RoPE angles [B, T, R/2] of each position; `local` (a traced bool) picks the local
    layers' frequencies. LongRoPE takes its long factors for every position when the
    run's context (the KV cache length) exceeds the original one, as vLLM does with
    max_model_len: transformers switches when a sequence crosses it and recomputes the
    cache, which a cache shared by slots cannot; this way cached keys stay valid."""
    pos = positions_BT[..., None].astype(jnp.float32)
    long = bool(cfg.rope_longrope) and context > cfg.rope_longrope[2]
    inv = rope_frequencies(cfg, long=long)
    if local is not None and cfg.rope_local_theta:
        inv = jnp.where(local, rope_frequencies(cfg, local=True), inv)
    return pos * inv


def apply_rope(x_BTNH: jax.Array, angles_BTh: jax.Array, scale: float = 1.0) -> jax.Array:
    """Rotate-half RoPE (the Hugging Face layout; converters undo llama.cpp's interleave)
    of the first R = 2 * angles' last dims of each head (partial rotary: the rest pass),
    cos and sin scaled by `scale` (YaRN's and LongRoPE's attention factor)."""
    R = 2 * angles_BTh.shape[-1]
    cos, sin = jnp.cos(angles_BTh), jnp.sin(angles_BTh)
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    x = x_BTNH.astype(jnp.float32)
    rest = [x[..., R:]] if R < x.shape[-1] else []
    x1, x2 = jnp.split(x[..., :R] if rest else x, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, *rest], axis=-1)
    return out.astype(x_BTNH.dtype)


def mlp(x_BTD: jax.Array, w_gate_DF: jax.Array | None, w_up_DF: jax.Array,
        w_down_FD: jax.Array, activation: str = "silu", b_up_F: jax.Array | None = None,
        b_down_D: jax.Array | None = None) -> jax.Array:
    """Gated MLP: SwiGLU (Llama) or GeGLU with tanh-approximate GELU (Gemma); without a gate
    (None) the plain act(x W_up + b) W_down + b of StarCoder2 and Phi-2."""
    gate = None if w_gate_DF is None else dot(x_BTD, w_gate_DF, "BTD,DF->BTF")
    up = dot(x_BTD, w_up_DF, "BTD,DF->BTF")
    up = up if b_up_F is None else up + b_up_F
    h = activate(up, activation) if gate is None else activate(gate, activation) * up
    out = dot(h, w_down_FD, "BTF,FD->BTD")
    return out if b_down_D is None else out + b_down_D


def glu(cfg: ModelConfig, gate: jax.Array, up: jax.Array) -> jax.Array:
    """An expert's gated unit: act(gate) * up, or gpt-oss's clamped SwiGLU (swiglu_limit)."""
    if cfg.swiglu_limit is None:
        return activate(gate, cfg.activation) * up
    g = jnp.minimum(gate, cfg.swiglu_limit)
    u = jnp.clip(up, -cfg.swiglu_limit, cfg.swiglu_limit)
    return g * jax.nn.sigmoid(cfg.swiglu_alpha * g) * (u + 1)


def activate(gate: jax.Array, activation: str) -> jax.Array:
    """The gate's nonlinearity: SiLU, GELU with the tanh approximation, or exact GELU (erf:
    GPT-NeoX)."""
    if activation == "silu":
        return jax.nn.silu(gate)
    return jax.nn.gelu(gate, approximate=activation == "gelu_tanh")


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    """Gemma 2's soft capping, cap * tanh(x / cap); identity when cap is None."""
    return x if cap is None else cap * jnp.tanh(x / cap)
