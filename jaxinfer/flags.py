"""Runtime flags shared by every script: devices, mesh, multi-host, compilation cache.

Importing this module defines the flags; `setup()` applies them before any JAX op, in
the only order that works (device count, then distributed init, then the cache).
"""

from __future__ import annotations

from absl import flags

MESH = flags.DEFINE_string("mesh", None, "Device mesh, e.g. 'data:2,model:4' (default: "
                           "all devices on 'data').")
FSDP = flags.DEFINE_bool("fsdp", False, "Also shard weights' embed axis over 'data'.")
NUM_CPU_DEVICES = flags.DEFINE_integer("num_cpu_devices", 0,
                                       "Simulated CPU devices for tests/demos (0: default).")
COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                  "host:port of process 0 for multi-host runs "
                                  "(or JAX_COORDINATOR_ADDRESS).")
NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-host run.")
PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
DIST_TIMEOUT = flags.DEFINE_float("distributed_timeout_s", 300.0,
                                  "Give up (exit 2) if peers have not joined by then.")
COMPILATION_CACHE = flags.DEFINE_bool("compilation_cache", True,
                                      "Persist compiled XLA programs across runs.")


def setup() -> None:
    from jaxinfer import runtime

    runtime.set_num_cpu_devices(NUM_CPU_DEVICES.value)
    runtime.initialize_distributed(COORDINATOR.value, NUM_PROCESSES.value, PROCESS_ID.value,
                                   DIST_TIMEOUT.value)
    if COMPILATION_CACHE.value:
        runtime.enable_compilation_cache()


def is_main_process() -> bool:
    import jax

    return jax.process_index() == 0
