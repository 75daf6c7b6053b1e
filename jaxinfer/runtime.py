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


def _env_int(name: str) -> int | None:
    v = os.environ.get(name)
    if v is None or v == "":
        return None
    try:
        return int(v)
    except ValueError:
        raise ConfigError(f"environment variable {name}={v!r} is not an integer") from None


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None,
                           timeout_s: float = 300.0) -> bool:
    """Join a multi-process run (one command on every host); False if single-process.

    Falls back to JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID. JAX aborts
    the process if a peer never arrives; a watchdog turns that into one clear error line
    and exit status 2 after `timeout_s`, never a hang.
    """
    import sys
    import threading

    addr = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    n = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    pid = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
    if not addr and n is None:
        return False
    if not addr or n is None or pid is None:
        raise ConfigError("multi-process runs need coordinator_address, num_processes and "
                          f"process_id; got {addr!r}, {n!r}, {pid!r}")
    if n < 1 or not 0 <= pid < n:
        raise ConfigError(f"process_id={pid} is not in [0, num_processes={n})")
    if timeout_s <= 0:
        raise ConfigError(f"distributed_timeout_s must be positive, got {timeout_s}")

    def abort():
        sys.stderr.write(f"error: process {pid}: not all {n} processes joined the coordinator "
                         f"at {addr} within {timeout_s:g} s\n")
        sys.stderr.flush()
        os._exit(2)

    # The watchdog fires first: JAX's own timeout (later) would abort with a C++ trace.
    watchdog = threading.Timer(timeout_s, abort)
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(addr, num_processes=n, process_id=pid,
                                   initialization_timeout=int(timeout_s) + 60,
                                   heartbeat_timeout_seconds=int(max(10, timeout_s)))
    except Exception as e:  # XLA raises assorted runtime errors here
        from jaxinfer.errors import DistributedError

        raise DistributedError(f"process {pid}: cannot join coordinator at {addr} "
                               f"({n} processes): {str(e).splitlines()[0]}") from e
    finally:
        watchdog.cancel()
    return True


def to_host(x):
    """Fetch a (possibly multi-host sharded) array tree to numpy on every process: a
    replicated array from this process's own copy, a sharded one by an all-gather."""
    leaves = jax.tree.leaves(x)
    if all(getattr(a, "is_fully_addressable", True) for a in leaves):
        return jax.device_get(x)
    if all(getattr(a, "is_fully_replicated", False) for a in leaves):
        import numpy as np

        return jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), x)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(x, tiled=True)
