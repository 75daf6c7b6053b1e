"""Row layouts of the Q/K projections: RoPE pairs interleaved or split in halves.

The model rotates each head's dims as two halves (Hugging Face's Llama "rotate half").
Checkpoints that pair them interleaved, (x0, y0, x1, y1, ...), are reordered once while
they are read: llama.cpp's `llama` GGUF files (its converter interleaves them) and
Cohere's and GLM's checkpoints (interleaved in Hugging Face too). Attention scores are sums over a
head's dims, so reordering q and k alike changes nothing else.
"""

from __future__ import annotations

import numpy as np


def to_rotate_half(w: np.ndarray, heads: int, rotated: int | None = None) -> np.ndarray:
    """Rows [heads * H, ...] from (x0, y0, x1, y1, ...) to (x0, x1, ..., y0, y1, ...) per
    head; anything indexed by a head's dims along its first axis (weights [out, in],
    biases, norm weights, LoRA's B). With partial rotary (GLM) only the first `rotated`
    dims of each head are paired; the rest keep their place."""
    x = w.reshape(heads, -1, *w.shape[1:])
    R = rotated or x.shape[1]
    rot = x[:, :R].reshape(heads, R // 2, 2, *w.shape[1:]).swapaxes(1, 2)
    return np.concatenate([rot.reshape(heads, R, *w.shape[1:]), x[:, R:]], 1).reshape(w.shape)


def neox_qkv_split(m: np.ndarray, heads: int) -> np.ndarray:
    """GPT-NeoX's fused q/k/v rows, per head [N, 3, H, ...], regrouped to [3, N, H, ...]
    (q, then k, then v: Phi-3's fused layout); weights, biases and LoRA's B alike."""
    return m.reshape(heads, 3, -1, *m.shape[1:]).swapaxes(0, 1).reshape(m.shape)


def rope_tail_to_half(w: np.ndarray, heads: int, lead: int) -> np.ndarray:
    """`to_rotate_half` of each head's dims after its first `lead` (DeepSeek's latent
    attention: a head's RoPE dims come last, interleaved)."""
    x = w.reshape(heads, -1, *w.shape[1:])
    tail = to_rotate_half(x[:, lead:].reshape(-1, *w.shape[1:]), heads)
    return np.concatenate([x[:, :lead], tail.reshape(heads, -1, *w.shape[1:])], 1
                          ).reshape(w.shape)
