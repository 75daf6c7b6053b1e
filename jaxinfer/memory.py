"""Bytes a pytree of arrays actually holds on the devices (weights, KV cache).

Counts every addressable shard, so a weight replicated over 8 devices counts 8 times and
one sharded 8 ways counts once: the figure is what the devices hold, not the model size.
int4 counts half a byte per element, as XLA packs it (numpy's `nbytes` says one byte).
"""

from __future__ import annotations

from typing import Any

import jax

from jaxinfer.quant import nbytes


def array_bytes(x: Any) -> int:
    shards = getattr(x, "addressable_shards", None)
    if shards is None:  # numpy / host arrays
        return nbytes(x)
    return sum(nbytes(s.data) for s in shards)


def device_bytes(tree: Any) -> int:
    """Sum of `array_bytes` over the leaves of `tree` (QArray scales included)."""
    return sum(array_bytes(x) for x in jax.tree.leaves(tree))


def format_bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"
