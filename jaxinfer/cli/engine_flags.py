"""Serving-engine flags shared by serve and batch: the fields of EngineConfig.

Importing this module defines them (once per process, like every absl flag module)."""

from __future__ import annotations

from typing import Any

from absl import flags

SLOTS = flags.DEFINE_integer("num_slots", 8, "Requests decoded together; 0: as many as fit "
                             "in --memory_fraction of the device memory left after the "
                             "weights (GPU, TPU).")
MEM_FRACTION = flags.DEFINE_float("memory_fraction", 0.9, "With --num_slots=0: the share of "
                                  "free device memory the slots' KV cache may take.")
MAX_LEN = flags.DEFINE_integer("max_len", 1024, "Cache positions per request "
                               "(prompt + max_tokens).")
PREFIX_MB = flags.DEFINE_float("prefix_cache_mb", 256.0, "Prefix-cache memory (0: off).")
MIN_BUCKET = flags.DEFINE_integer("min_prompt_bucket", None, "Smallest prompt bucket "
                                  "(prompts pad to powers of two from here; default: the "
                                  "engine's).")
BUDGET = flags.DEFINE_integer("prefill_token_budget", None, "Prompt tokens prefilled per "
                              "engine turn; longer prompts are split over turns (default: "
                              "the engine's).")

POLICY = flags.DEFINE_enum("scheduling_policy", "fcfs", ["fcfs", "priority"], "Which queued "
                           "request gets the next free slot: arrival order, or the lowest "
                           "request `priority` first (arrival order among equals), which "
                           "preempts a running request of higher priority value when no "
                           "slot is free.")


def config(**kw: Any):
    """An EngineConfig from these flags (unset ones keep the engine's defaults) and `kw`."""
    from jaxinfer.engine import EngineConfig

    extra = {"min_prompt_bucket": MIN_BUCKET.value, "prefill_token_budget": BUDGET.value}
    return EngineConfig(num_slots=SLOTS.value or None, memory_fraction=MEM_FRACTION.value,
                        max_len=MAX_LEN.value, prefix_cache_mb=PREFIX_MB.value,
                        scheduling_policy=POLICY.value, **kw,
                        **{k: v for k, v in extra.items() if v is not None})
