"""Embeddings from a decoder: its final (normed) hidden states pooled over each prompt.

    vectors = llm.embed(["a sentence", "another"])      # [B, D], unit length

`last` pooling (the hidden state of each prompt's final token) is what decoder embedding
models such as Qwen3-Embedding are trained for, and vLLM's default for them; `mean`
averages over the prompt's tokens. `dimensions` keeps the first d components before the
normalisation (Matryoshka-trained models, OpenAI's `dimensions`). Prompts are right-padded
to a power-of-two bucket, which the causal mask keeps from changing any real position, and
batched up to MAX_BATCH at a time, padded to a power of two: shapes, and so compilations,
stay few.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxinfer import model
from jaxinfer.config import ModelConfig
from jaxinfer.kv_cache import KVCache
from jaxinfer.lora import LoraStack
from jaxinfer.weights import Weights

POOLINGS = ("last", "mean")
MAX_BATCH = 32  # prompts per device call; batches are padded to powers of two


@functools.partial(jax.jit, static_argnames=("cfg", "pooling", "impl"))
def pooled(weights: Weights, tokens_BT: jax.Array, lens_B: jax.Array, cache: KVCache, *,
           cfg: ModelConfig, pooling: str, impl: str = "xla", lora: LoraStack | None = None,
           adapter_B: jax.Array | None = None) -> jax.Array:
    """float32 [B, D]: each row's final hidden states pooled over its first lens_B[b]
    tokens (the cache is scratch: the K/V written to it are dropped); with `lora`, row b
    runs adapter adapter_B[b]."""
    x_BTD, _ = model.hidden_states(weights, tokens_BT, cache, cfg, impl, lora, adapter_B)
    x_BTD = x_BTD.astype(jnp.float32)
    if pooling == "last":
        return jnp.take_along_axis(x_BTD, (lens_B - 1)[:, None, None], axis=1)[:, 0]
    keep_BT = jnp.arange(tokens_BT.shape[1])[None, :] < lens_B[:, None]
    return jnp.sum(x_BTD * keep_BT[..., None], axis=1) / lens_B[:, None].astype(jnp.float32)
