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


def norm(cfg: ModelConfig, x_BTD: jax.Array, w_D: jax.Array) -> jax.Array:
    """The model's RMSNorm (eps and Gemma's 1 + w from the config)."""
    return rms_norm(x_BTD, w_D, cfg.rms_norm_eps, cfg.norm_plus_one)


def rope_frequencies(cfg: ModelConfig, local: bool = False) -> np.ndarray:
    """Inverse frequencies [H/2] of the global layers, or of the local (sliding-window)
    ones, which Gemma 3 gives their own base and no scaling; with Llama-3 long-context
    or linear scaling when configured."""
    H = cfg.head_dim
    theta = cfg.rope_local_theta if local and cfg.rope_local_theta else cfg.rope_theta
    inv = 1.0 / (theta ** (np.arange(0, H, 2, dtype=np.float64) / H))
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
    return inv.astype(np.float32)


def apply_rope(x_BTNH: jax.Array, positions_BT: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotate-half RoPE (the Hugging Face layout; converters undo llama.cpp's interleave)."""
    angles_BTh = positions_BT[..., None].astype(jnp.float32) * inv_freq
    cos = jnp.cos(angles_BTh)[:, :, None, :]
    sin = jnp.sin(angles_BTh)[:, :, None, :]
    x = x_BTNH.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BTNH.dtype)


def mlp(x_BTD: jax.Array, w_gate_DF: jax.Array, w_up_DF: jax.Array, w_down_FD: jax.Array,
        activation: str = "silu") -> jax.Array:
    """Gated MLP: SwiGLU (Llama) or GeGLU with tanh-approximate GELU (Gemma)."""
    gate = dot(x_BTD, w_gate_DF, "BTD,DF->BTF")
    up = dot(x_BTD, w_up_DF, "BTD,DF->BTF")
    return dot(activate(gate, activation) * up, w_down_FD, "BTF,FD->BTD")


def activate(gate: jax.Array, activation: str) -> jax.Array:
    """The gate's nonlinearity: SiLU, or GELU with the tanh approximation."""
    return jax.nn.silu(gate) if activation == "silu" else jax.nn.gelu(gate, approximate=True)


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    """Gemma 2's soft capping, cap * tanh(x / cap); identity when cap is None."""
    return x if cap is None else cap * jnp.tanh(x / cap)
