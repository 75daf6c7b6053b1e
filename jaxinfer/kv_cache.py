"""The KV cache: functional state, a dataclass pytree passed into and returned from jit.

Left-aligned: row b holds its tokens at positions [0, lengths[b]). Layers are stacked so
the whole cache is one donated buffer per tensor and updates happen in place.
    k, v     [L, B, K, S, H]
    lengths  i32[B]   tokens already written per row
    k_scale, v_scale  f32[L, B, K, S]  only for an int8 or fp8 (float8_e4m3fn) cache: one
                      scale per token per head, so a new token never rescales old ones
                      (None otherwise)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from jaxinfer.config import ModelConfig
from jaxinfer.errors import ConfigError
from jaxinfer.quant import FP8_MAX
from jaxinfer.sharding import ShardingRules, activation_sharding

CACHE_AXES = ("layers", "batch", "act_kv_heads", "cache_seq", "act_head_dim")
# The cache dtypes stored with a scale per token and head, and the largest value each
# maps to: int8 and float8 e4m3 (vLLM's and llama.cpp's "fp8" cache).
SCALED = {jnp.dtype(jnp.int8): 127.0, jnp.dtype(jnp.float8_e4m3fn): FP8_MAX}


def cache_dtype(dtype: Any) -> Any:
    """A KV cache dtype from a name or dtype: a float of 16 bits or more, "int8" or "fp8"
    (float8_e4m3fn, scaled like int8); ConfigError otherwise (a bare float8 cache would
    flush small keys to zero)."""
    try:
        dt = jnp.dtype(jnp.float8_e4m3fn if dtype == "fp8" else dtype)
    except TypeError:
        dt = None
    if dt is None or not (dt in SCALED or jnp.issubdtype(dt, jnp.floating)
                          and dt.itemsize >= 2):
        raise ConfigError(f"kv_dtype must be a float dtype of 16 bits or more, 'int8' or "
                          f"'fp8', got {dtype!r}")
    return dt


def scaled(dtype: Any) -> bool:
    """Whether a cache of `dtype` keeps per-token scales (int8, fp8)."""
    return jnp.dtype(dtype) in SCALED


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    k: jax.Array  # [L, B, K, S, H]
    v: jax.Array  # [L, B, K, S, H]
    lengths: jax.Array  # i32[B]
    k_scale: jax.Array | None = None  # f32[L, B, K, S] (int8 cache only)
    v_scale: jax.Array | None = None  # f32[L, B, K, S] (int8 cache only)

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:  # S
        return self.k.shape[3]

    def nbytes(self) -> int:
        return sum(x.nbytes for x in jax.tree.leaves(self))

    def with_lengths(self, lengths: jax.Array) -> KVCache:
        """The same buffers (scales included) with new lengths."""
        return dataclasses.replace(self, lengths=lengths)


def write_kv(c_LBKSH: jax.Array, scale_LBKS: jax.Array | None, i: jax.Array,
             rows_B1: jax.Array, pos_BT: jax.Array, x_BTKH: jax.Array
             ) -> tuple[jax.Array, jax.Array | None]:
    """Scatter new K or V of layer i at each row's positions (out-of-range ones drop); an
    int8 cache stores round(x / s) with s = max|x| / 127 per token and head, an fp8 one
    x / s rounded to float8 with s = max|x| / 448."""
    if scale_LBKS is None:
        return c_LBKSH.at[i, rows_B1, :, pos_BT, :].set(x_BTKH.astype(c_LBKSH.dtype),
                                                        mode="drop"), None
    top = SCALED[jnp.dtype(c_LBKSH.dtype)]
    x = x_BTKH.astype(jnp.float32)
    s_BTK = jnp.max(jnp.abs(x), axis=-1) / top
    s_BTK = jnp.where(s_BTK > 0, s_BTK, 1.0)
    q = x / s_BTK[..., None]
    q = jnp.round(q) if c_LBKSH.dtype == jnp.int8 else q  # (float8: rounded by the cast)
    q = jnp.clip(q, -top, top).astype(c_LBKSH.dtype)
    return (c_LBKSH.at[i, rows_B1, :, pos_BT, :].set(q, mode="drop"),
            scale_LBKS.at[i, rows_B1, :, pos_BT].set(s_BTK, mode="drop"))


def read_kv(c_LBKSH: jax.Array, scale_LBKS: jax.Array | None, i: jax.Array, dtype: Any
            ) -> jax.Array:
    """Layer i of the cache as [B, K, S, H] in `dtype` (dequantized for int8 / fp8)."""
    x = c_LBKSH[i].astype(dtype)
    return x if scale_LBKS is None else x * scale_LBKS[i][..., None].astype(dtype)


def kv_shapes(cfg: ModelConfig, batch: int, max_len: int
              ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The K and V caches' shapes [L, B, K, S, H]; V's H is cfg.value_dim (0 with latent
    attention, whose values are the keys' latent part)."""
    k = (cfg.num_layers, batch, cfg.num_kv_heads, max_len, cfg.head_dim)
    return k, k[:4] + (cfg.value_dim,)


def cache_shardings(cfg: ModelConfig, batch: int, max_len: int, mesh: jax.sharding.Mesh,
                    rules: ShardingRules | None = None) -> KVCache:
    kv = activation_sharding(CACHE_AXES, mesh, kv_shapes(cfg, batch, max_len)[0], rules,
                             "kv_cache")
    return KVCache(k=kv, v=kv, lengths=activation_sharding(("batch",), mesh, (batch,), rules,
                                                      "kv_cache.lengths"))


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: Any = jnp.float32,
               shardings: KVCache | None = None) -> KVCache:
    """An empty cache of B rows and S positions (zeros, lengths 0); dtype int8 or fp8 adds
    the per-token scales."""
    kv, lens = (shardings.k, shardings.lengths) if shardings is not None else (None, None)
    return _zeros_fn(kv_shapes(cfg, batch, max_len), jnp.dtype(dtype), kv, lens)()


@functools.lru_cache(maxsize=64)
def _zeros_fn(shapes: tuple[tuple[int, ...], tuple[int, ...]], dtype: Any, kv_sharding,
              lengths_sharding):
    """One compiled allocator per (shapes, dtype, sharding): allocating never recompiles."""

    quantized = scaled(dtype)
    shape, v_shape = shapes

    def make():
        scale = (lambda: jnp.zeros(shape[:4], jnp.float32)) if quantized else (lambda: None)
        return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(v_shape, dtype),
                       lengths=jnp.zeros((shape[1],), jnp.int32), k_scale=scale(),
                       v_scale=scale())

    shardings = None
    if kv_sharding is not None:
        spec = tuple(kv_sharding.spec) + (None,) * (5 - len(kv_sharding.spec))
        s = (jax.sharding.NamedSharding(kv_sharding.mesh, jax.sharding.PartitionSpec(*spec[:4]))
             if quantized else None)
        shardings = KVCache(kv_sharding, kv_sharding, lengths_sharding, s, s)
    return jax.jit(make, out_shardings=shardings)


def abstract_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: Any = jnp.float32
                   ) -> KVCache:
    return jax.eval_shape(lambda: init_cache(cfg, batch, max_len, dtype))
