"""Grouped-query attention over the KV cache.

Queries q_BTNH are viewed as [B, T, K, G, H] so each KV head serves G query heads
without repeating K/V in memory. The mask is causal in absolute positions: a query at
position p sees cache slots s <= p, which also hides padding and stale slots (s > p).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e30


def ref_attention(q_BTNH: jax.Array, k_BKSH: jax.Array, v_BKSH: jax.Array,
                  q_positions_BT: jax.Array) -> jax.Array:
    """Reference GQA attention; softmax in float32. Returns [B, T, N, H]."""
    B, T, N, H = q_BTNH.shape
    K, S = k_BKSH.shape[1], k_BKSH.shape[2]
    q = q_BTNH.reshape(B, T, K, N // K, H)
    scores = jnp.einsum("BTKGH,BKSH->BKGTS", q, k_BKSH,
                        preferred_element_type=jnp.float32) * (H ** -0.5)
    mask_BTS = jnp.arange(S)[None, None, :] <= q_positions_BT[:, :, None]
    scores = jnp.where(mask_BTS[:, None, None], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_BKSH.dtype)
    out = jnp.einsum("BKGTS,BKSH->BTKGH", probs, v_BKSH)
    return out.reshape(B, T, N, H)


def attention(q_BTNH, k_BKSH, v_BKSH, q_positions_BT, impl: str = "xla") -> jax.Array:
    """Dispatch point for kernels (cuDNN on GPU, Pallas on TPU); 'xla' is the reference."""
    if impl == "xla":
        return ref_attention(q_BTNH, k_BKSH, v_BKSH, q_positions_BT)
    raise ValueError(f"unknown attention impl {impl!r}")
