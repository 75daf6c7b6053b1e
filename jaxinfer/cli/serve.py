"""Serve a checkpoint over an OpenAI-compatible HTTP API (default: SmolLM2-135M-Instruct).

    jaxinfer-serve --port 8000            # or: python scripts/serve.py --port 8000
    curl 127.0.0.1:8000/v1/chat/completions -H 'content-type: application/json' \\
        -d '{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 32}'

Binds 127.0.0.1 unless --host says otherwise. Endpoints: /v1/completions,
/v1/chat/completions (stream: true for server-sent events), /v1/models, /health, /metrics.
"""

from absl import flags

from jaxinfer import flags as runtime_flags
from jaxinfer.cli import run_program, spec_flags

_CKPT = flags.DEFINE_string("checkpoint", None, "Orbax checkpoint dir (default: SmolLM2).")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to bind.")
_PORT = flags.DEFINE_integer("port", 8000, "Port to bind.")
_MODEL_NAME = flags.DEFINE_string("model_name", None, "Model id clients send (default: the "
                                  "checkpoint's config name).")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"],
                           "Compute dtype (default: float32 on CPU, bfloat16 elsewhere).")
_SLOTS = flags.DEFINE_integer("num_slots", 8, "Requests decoded together; 0: as many as "
                              "fit in --memory_fraction of the device memory left after the "
                              "weights (GPU, TPU).")
_MEM_FRACTION = flags.DEFINE_float("memory_fraction", 0.9, "With --num_slots=0: the share of "
                                   "free device memory the slots' KV cache may take.")
_MAX_LEN = flags.DEFINE_integer("max_len", 1024, "Cache positions per request "
                                "(prompt + max_tokens).")
_MAX_QUEUE = flags.DEFINE_integer("max_queue", 256, "Waiting requests before 429s.")
_PREFIX_MB = flags.DEFINE_float("prefix_cache_mb", 256.0, "Prefix-cache memory (0: off).")
_MIN_BUCKET = flags.DEFINE_integer("min_prompt_bucket", None, "Smallest prompt bucket "
                                   "(prompts pad to powers of two from here; default: "
                                   "the engine's).")
_BUDGET = flags.DEFINE_integer("prefill_token_budget", None, "Prompt tokens prefilled per "
                               "engine turn; longer prompts are split over turns "
                               "(default: the engine's).")
_WARMUP = flags.DEFINE_bool("warmup", True, "Compile every prompt bucket before serving.")


def _engine_config(**kw):
    """An EngineConfig from the shared engine flags (None flags keep the engine default)."""
    from jaxinfer.engine import EngineConfig

    extra = {"min_prompt_bucket": _MIN_BUCKET.value, "prefill_token_budget": _BUDGET.value}
    return EngineConfig(**kw, **{k: v for k, v in extra.items() if v is not None})


def main(argv):
    del argv
    runtime_flags.setup()
    from jaxinfer.server import serve

    serve(_CKPT.value, host=_HOST.value, port=_PORT.value, dtype=_DTYPE.value,
          model_name=_MODEL_NAME.value, warmup=_WARMUP.value,
          config=_engine_config(num_slots=_SLOTS.value or None,
                                memory_fraction=_MEM_FRACTION.value, max_len=_MAX_LEN.value,
                                max_queue=_MAX_QUEUE.value, prefix_cache_mb=_PREFIX_MB.value),
          mesh=runtime_flags.MESH.value, fsdp=runtime_flags.FSDP.value,
          **spec_flags.kwargs(), **runtime_flags.quant_kwargs())


def run() -> None:
    """The `jaxinfer-serve` console entry point."""
    run_program(__name__, main)
