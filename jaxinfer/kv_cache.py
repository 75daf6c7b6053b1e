"""The KV cache: functional state, a dataclass pytree passed into and returned from jit.

Left-aligned: row b holds its tokens at positions [0, lengths[b]). Layers are stacked so
the whole cache is one donated buffer per tensor and updates happen in place.
    k, v     [L, B, K, S, H]
    lengths  i32[B]   tokens already written per row
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from jaxinfer.config import ModelConfig
from jaxinfer.sharding import ShardingRules, activation_sharding

CACHE_AXES = ("layers", "batch", "act_kv_heads", "cache_seq", "act_head_dim")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    k: jax.Array  # [L, B, K, S, H]
    v: jax.Array  # [L, B, K, S, H]
    lengths: jax.Array  # i32[B]

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:  # S
        return self.k.shape[3]

    def nbytes(self) -> int:
        return sum(x.nbytes for x in jax.tree.leaves(self))


def cache_shardings(cfg: ModelConfig, batch: int, max_len: int, mesh: jax.sharding.Mesh,
                    rules: ShardingRules | None = None) -> KVCache:
    shape = (cfg.num_layers, batch, cfg.num_kv_heads, max_len, cfg.head_dim)
    kv = activation_sharding(CACHE_AXES, mesh, shape, rules, "kv_cache")
    return KVCache(k=kv, v=kv, lengths=activation_sharding(("batch",), mesh, (batch,), rules,
                                                      "kv_cache.lengths"))


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: Any = jnp.float32,
               shardings: KVCache | None = None) -> KVCache:
    """An empty cache of B rows and S positions (zeros, lengths 0)."""
    shape = (cfg.num_layers, batch, cfg.num_kv_heads, max_len, cfg.head_dim)
    kv, lens = (shardings.k, shardings.lengths) if shardings is not None else (None, None)
    return _zeros_fn(shape, jnp.dtype(dtype), kv, lens)()


@functools.lru_cache(maxsize=64)
def _zeros_fn(shape: tuple[int, ...], dtype: Any, kv_sharding, lengths_sharding):
    """One compiled allocator per (shape, dtype, sharding): allocating never recompiles."""

    def make():
        return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                       lengths=jnp.zeros((shape[1],), jnp.int32))

    shardings = (None if kv_sharding is None
                 else KVCache(kv_sharding, kv_sharding, lengths_sharding))
    return jax.jit(make, out_shardings=shardings)


def abstract_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: Any = jnp.float32
                   ) -> KVCache:
    return jax.eval_shape(lambda: init_cache(cfg, batch, max_len, dtype))
