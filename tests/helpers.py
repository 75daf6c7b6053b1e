"""Tiny random models for unit tests (the real model is used in the end-to-end tests)."""

import jax
import jax.numpy as jnp

from jaxinfer.config import ModelConfig
from jaxinfer.weights import init_weights, weight_specs

TINY = ModelConfig(vocab_size=97, d_model=64, mlp_dim=96, num_layers=3, num_heads=4,
                   num_kv_heads=2, head_dim=16, rope_theta=10_000.0, max_seq_len=512,
                   eos_token_ids=(3,), name="tiny")


def tiny_weights(cfg: ModelConfig = TINY, seed: int = 0, dtype=jnp.float32):
    return init_weights(weight_specs(cfg, dtype), jax.random.key(seed))
