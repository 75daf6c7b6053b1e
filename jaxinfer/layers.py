"""Stateless building blocks: RMSNorm, rotary embeddings, SwiGLU MLP, the weight dot.

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


def rms_norm(x_BTD: jax.Array, w_D: jax.Array, eps: float) -> jax.Array:
    x = x_BTD.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
    return (x * w_D.astype(jnp.float32)).astype(x_BTD.dtype)


def rope_frequencies(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies [H/2], with Llama-3 long-context scaling when configured."""
    H = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, H, 2, dtype=np.float64) / H))
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


def mlp(x_BTD: jax.Array, w_gate_DF: jax.Array, w_up_DF: jax.Array, w_down_FD: jax.Array
        ) -> jax.Array:
    gate = dot(x_BTD, w_gate_DF, "BTD,DF->BTF")
    up = dot(x_BTD, w_up_DF, "BTD,DF->BTF")
    return dot(jax.nn.silu(gate) * up, w_down_FD, "BTF,FD->BTD")
