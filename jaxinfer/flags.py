"""Runtime flags shared by every script: devices, mesh, multi-host, compilation cache.

Importing this module defines the flags; `setup()` applies them before any JAX op, in
the only order that works (device count, then distributed init, then the cache).
"""

from __future__ import annotations

from typing import Any

from absl import flags

CONFIG = flags.DEFINE_string("config", None, "Run preset: a name from configs/run (e.g. "
                             "'tpu-v5e-8') or a .json path. Its values become the defaults; "
                             "flags given on the command line still win.")
MESH = flags.DEFINE_string("mesh", None, "Device mesh over the axes data, expert, model, "
                           "e.g. 'data:2,model:4' (default: all devices on 'data').")
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
QUANTIZE = flags.DEFINE_enum("quantize", None, ["int8", "int4", "fp8"],
                             "Quantize a float checkpoint's weights on load (a quantized "
                             "checkpoint loads quantized without it).")
GROUP_SIZE = flags.DEFINE_integer("group_size", None, "int4 quantization group size "
                                  "(default 32; int8 and fp8 are per output channel, an FP8 "
                                  "release's fp8 its own blocks' width).",
                                  lower_bound=1)
KV_CACHE_DTYPE = flags.DEFINE_enum("kv_cache_dtype", None,
                                   ["float32", "bfloat16", "int8", "fp8"],
                                   "KV cache dtype (default: the compute dtype); int8 and fp8 "
                                   "(float8 e4m3) keep a scale per token and head.")
COMPILATION_CACHE = flags.DEFINE_bool("compilation_cache", True,
                                      "Persist compiled XLA programs across runs.")


def apply_config(spec: str, flag_values: flags.FlagValues = flags.FLAGS) -> dict[str, Any]:
    """Make a run preset's values the defaults of the flags this program defines.

    Flags given explicitly keep their values; preset keys this program has no flag for
    (a serving preset used by generate.py) are skipped. Returns what was applied.
    """
    from jaxinfer.errors import ConfigError
    from jaxinfer.presets import run_preset

    applied = {}
    for name, value in run_preset(spec).items():
        if name not in flag_values or flag_values[name].present:
            continue
        try:
            flag_values.set_default(name, value)
        except (flags.Error, ValueError, TypeError) as e:
            raise ConfigError(f"--config={spec}: bad value {value!r} for --{name}: {e}") from e
        applied[name] = value
    return applied


def setup() -> None:
    from jaxinfer import runtime

    if CONFIG.value:
        apply_config(CONFIG.value)
    runtime.set_num_cpu_devices(NUM_CPU_DEVICES.value)
    runtime.initialize_distributed(COORDINATOR.value, NUM_PROCESSES.value, PROCESS_ID.value,
                                   DIST_TIMEOUT.value)
    if COMPILATION_CACHE.value:
        runtime.enable_compilation_cache()


def quant_kwargs() -> dict:
    """LLM.load keyword arguments from --quantize, --group_size and --kv_cache_dtype."""
    return dict(quantize=QUANTIZE.value, group_size=GROUP_SIZE.value,
                kv_dtype=KV_CACHE_DTYPE.value)


def is_main_process() -> bool:
    import jax

    return jax.process_index() == 0
