"""Process-level JAX setup shared by scripts and notebooks.

Must run before the first JAX operation: simulated CPU device count, the persistent
compilation cache (warm restarts skip XLA compiles) and multi-host initialisation.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

from jaxinfer.errors import ConfigError


def cache_root() -> Path:
    return Path(os.environ.get("JAXINFER_CACHE", Path.home() / ".cache" / "jaxinfer"))


def enable_compilation_cache(path: str | Path | None = None) -> Path:
    """Persist compiled executables across processes (on by default in scripts)."""
    path = Path(path) if path else cache_root() / "xla"
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return path


def set_num_cpu_devices(n: int) -> None:
    if n < 0:
        raise ConfigError(f"num_cpu_devices must be >= 0, got {n}")
    if n:
        jax.config.update("jax_num_cpu_devices", n)


class CompileCounter:
    """Counts XLA compilations (jit cache misses) while active, via jax.monitoring."""


    def __init__(self):
        self.count = 0
        self._active = False
        jax.monitoring.register_event_duration_secs_listener(self._on_duration)

    def _on_duration(self, event: str, duration: float, **kw) -> None:
        if self._active and event == "/jax/core/compile/backend_compile_duration":
            self.count += 1

    def __enter__(self) -> CompileCounter:
        self.count, self._active = 0, True
        return self

    def __exit__(self, *exc) -> None:
        self._active = False
