"""Bytes a pytree of arrays actually holds on the devices (weights, KV cache), and what a
device has left.

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


def free_bytes(devices: Any) -> int | None:
    """Bytes every one of `devices` can still allocate (the least of them), from the
    backend's memory statistics (GPU, TPU); None where it keeps none (CPU)."""
    free = []
    for d in devices:
        try:
            stats = d.memory_stats()
        except Exception:  # backends without the call raise assorted errors
            stats = None
        if not stats or "bytes_limit" not in stats:
            return None
        free.append(int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)))
    return min(free) if free else None


def format_bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"
