"""Serve a checkpoint over an OpenAI-compatible HTTP API (default: SmolLM2-135M-Instruct).

    jaxinfer-serve --port 8000            # or: python scripts/serve.py --port 8000
    curl 127.0.0.1:8000/v1/chat/completions -H 'content-type: application/json' \\
        -d '{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 32}'

Binds 127.0.0.1 unless --host says otherwise. Endpoints: /v1/completions,
/v1/chat/completions (stream: true for server-sent events), /v1/responses, Anthropic's
/v1/messages (and /v1/messages/count_tokens), /v1/embeddings, /v1/models, /tokenize,
/detokenize, /health, /version, /metrics.
"""

import os

from absl import flags

from jaxinfer import flags as runtime_flags
from jaxinfer.cli import (
    chat_flags,
    engine_flags,
    lora_flags,
    parser_flags,
    run_program,
    spec_flags,
)
from jaxinfer.cli_util import ctrl_c_was_the_stop

_CKPT = flags.DEFINE_string("checkpoint", None, "Orbax checkpoint dir, .gguf file or Hugging "
                            "Face model dir (default: SmolLM2).")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to bind.")
_API_KEY = flags.DEFINE_string("api_key", None, "Require `Authorization: Bearer <key>` on "
                               "every /v1/ endpoint, as vLLM (default: $JAXINFER_API_KEY; "
                               "unset: no key).")
_PORT = flags.DEFINE_integer("port", 8000, "Port to bind.")
_ORIGINS = flags.DEFINE_list("allowed_origins", [], "Web origins whose pages may call the "
                             "server from a browser (CORS), e.g. 'http://localhost:3000'; "
                             "'*' for any (default: none).")
_MODEL_NAME = flags.DEFINE_string("model_name", None, "Model id clients send (default: the "
                                  "checkpoint's config name).")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"],
                           "Compute dtype (default: float32 on CPU, bfloat16 elsewhere).")
_MAX_QUEUE = flags.DEFINE_integer("max_queue", 256, "Waiting requests before 429s.")
_WARMUP = flags.DEFINE_bool("warmup", True, "Compile every prompt bucket before serving.")
_STORED = flags.DEFINE_integer("max_stored_responses", 1024, "Responses API: how many "
                               "responses to keep in memory for previous_response_id.",
                               lower_bound=0)
lora_flags.define_modules()
_MAX_LORAS = flags.DEFINE_integer("max_loras", 0, "LoRA adapter slots in all, for adapters "
                                  "loaded while serving (--allow_runtime_lora_updating).",
                                  lower_bound=0)
_MAX_LORA_RANK = flags.DEFINE_integer("max_lora_rank", 16, "The largest rank an adapter "
                                      "loaded while serving may have.", lower_bound=1)
_LORA_UPDATING = flags.DEFINE_bool("allow_runtime_lora_updating", False, "Serve vLLM's "
                                   "POST /v1/load_lora_adapter and /v1/unload_lora_adapter "
                                   "(they read any directory the server can: trusted "
                                   "clients only).")


def main(argv):
    del argv
    runtime_flags.setup()
    from jaxinfer.server import serve

    serve(_CKPT.value, host=_HOST.value, port=_PORT.value, dtype=_DTYPE.value,
          model_name=_MODEL_NAME.value, warmup=_WARMUP.value,
          max_stored_responses=_STORED.value, **parser_flags.kwargs(),
          config=engine_flags.config(max_queue=_MAX_QUEUE.value, max_loras=_MAX_LORAS.value,
                                     max_lora_rank=_MAX_LORA_RANK.value),
          allow_runtime_lora_updating=_LORA_UPDATING.value,
          api_key=_API_KEY.value if _API_KEY.value is not None
          else os.environ.get("JAXINFER_API_KEY"), allowed_origins=_ORIGINS.value,
          mesh=runtime_flags.MESH.value, fsdp=runtime_flags.FSDP.value,
          **spec_flags.kwargs(), **runtime_flags.quant_kwargs(), **lora_flags.kwargs(),
          **chat_flags.kwargs())
    ctrl_c_was_the_stop()  # the server shut down in order: Ctrl-C is how it is stopped


def run() -> None:
    """The `jaxinfer-serve` console entry point."""
    run_program(__name__, main)
