"""Prefix caching: reuse the KV entries of prompt prefixes that earlier requests computed.

Prompts are cut into blocks of `block` tokens; block j is named by a hash chained over
blocks 0..j, so equal names mean equal prefixes, not merely equal blocks. A device pool
`pools` (k and v [L, P, K, block, H], plus their [L, P, K, block] scales for an int8
cache) hold P blocks, P set by a memory budget, evicted
least-recently-used. A new request looks up its longest cached prefix, gets a one-row cache
[L, 1, K, S, H] assembled from those blocks (one gather) and prefills only the rest with
`model.prefill` on that non-empty row; its own new full prompt blocks are then copied into
the pool. Only whole blocks of the prompt are shared, and at least one prompt token is
always prefilled, because the first sampled token needs that token's logits.

Host code only (hashing, LRU, block tables); the device work is in engine_core.
"""

from __future__ import annotations

import collections
import hashlib

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer import engine_core as core
from jaxinfer.config import ModelConfig
from jaxinfer.errors import ConfigError
from jaxinfer.kv_cache import KVCache, kv_shapes, scaled


def block_digests(tokens: list[int], block: int, adapter: int = 0) -> list[bytes]:
    """Chained digests of the prompt's full blocks: digest j names tokens[: (j+1) * block]
    under the LoRA adapter whose key is `adapter` (its K/V differ from the base model's: 0
    is none; the engine gives each adapter it loads a new key)."""
    out, parent = [], b"" if adapter == 0 else f"lora:{adapter}".encode()
    arr = np.asarray(tokens, np.int64)
    for j in range(len(tokens) // block):
        parent = hashlib.blake2b(parent + arr[j * block:(j + 1) * block].tobytes(),
                                 digest_size=16).digest()
        out.append(parent)
    return out


class PrefixCache:
    """An LRU of KV blocks on the device, keyed by chained prefix digests."""

    def __init__(self, cfg: ModelConfig, max_len: int, block: int, budget_bytes: int, dtype,
                 device: jax.Device | None = None):
        if block <= 0 or max_len % block:
            raise ConfigError(f"prefix block size {block} must be positive and divide the "
                              f"slot length {max_len}")
        self.block, self.max_len = block, max_len
        self.num_row_blocks = max_len // block  # J
        dtype = jnp.dtype(dtype)
        quantized = scaled(dtype)  # int8 / fp8 K/V + one f32 scale per token and head
        per_token = (cfg.head_dim + cfg.value_dim) * dtype.itemsize + (8 if quantized else 0)
        self.block_bytes = cfg.num_layers * cfg.num_kv_heads * block * per_token
        self.capacity = int(budget_bytes // self.block_bytes)  # P
        k, v = kv_shapes(cfg, max(self.capacity, 1), block)
        specs = [(k, dtype), (v, dtype)] + [(k[:4], jnp.float32)] * 2 * quantized
        # Committed like every later pool (a jit output), so warm-up compiles what runs.
        device = device or jax.devices()[0]
        self.pools = tuple(jax.device_put(jnp.zeros(s, d), device) for s, d in specs)
        self._lru: collections.OrderedDict[bytes, int] = collections.OrderedDict()
        self._free = list(range(self.capacity))

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    @property
    def blocks_used(self) -> int:
        return len(self._lru)

    def clear(self) -> None:
        self._lru.clear()
        self._free = list(range(self.capacity))

    def match(self, digests: list[bytes], prompt_len: int) -> int:
        """Blocks of the longest cached prefix usable by a prompt of `prompt_len` tokens.
        Hit blocks become most recently used, parents after children, so a chain is
        evicted from its tail and never loses its head while keeping its tail."""
        usable = min(len(digests), (prompt_len - 1) // self.block) if self.enabled else 0
        n = 0
        while n < usable and digests[n] in self._lru:
            n += 1
        for d in reversed(digests[:n]):
            self._lru.move_to_end(d)
        return n

    def load(self, digests: list[bytes], num_blocks: int) -> KVCache:
        """A fresh one-row cache holding the first `num_blocks` blocks of the prefix."""
        table = np.zeros((self.num_row_blocks,), np.int32)
        table[:num_blocks] = [self._lru[d] for d in digests[:num_blocks]]
        return core.load_prefix(self.pools, table, np.int32(num_blocks * self.block))

    def store(self, digests: list[bytes], num_hit: int, row: KVCache,
              dry_run: bool = False) -> int:
        """Copy the row's full prompt blocks past the hit into the pool; returns how many.
        `dry_run` runs the same device program with every copy dropped (warm-up)."""
        J = self.num_row_blocks
        src = np.zeros((J,), np.int32)
        dst = np.full((J,), max(self.capacity, 1), np.int32)  # out of range: dropped
        protected = set(digests[:num_hit])
        n = 0
        for j in range(num_hit, min(len(digests), J)):
            if dry_run or not self.enabled:
                break
            d = digests[j]
            if d in self._lru:  # a child that outlived an evicted parent: just refresh it
                self._lru.move_to_end(d)
                protected.add(d)
                continue
            slot = self._allocate(protected)
            if slot is None:
                break
            self._lru[d] = slot
            protected.add(d)
            src[n], dst[n] = j, slot
            n += 1
        if n or dry_run:
            self.pools = core.save_blocks(self.pools, row, src, dst)
        return n

    def _allocate(self, protected: set[bytes]) -> int | None:
        if self._free:
            return self._free.pop()
        for d in self._lru:  # least recently used first
            if d not in protected:
                return self._lru.pop(d)
        return None
