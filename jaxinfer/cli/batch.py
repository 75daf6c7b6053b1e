"""Generate for every line of a JSONL file through the engine; resumable.

    jaxinfer-batch --input=prompts.jsonl --output=results.jsonl
    # or: python scripts/batch_generate.py --input=prompts.jsonl --output=results.jsonl
    # input lines: {"id": ..., "prompt": ...} or {"id": ..., "messages": [...]}, with
    # optional max_tokens, stop and sampling fields (temperature, top_p, top_k, min_p,
    # seed, penalties, logprobs, logit_bias, stop_token_ids, min_tokens, ignore_eos,
    # skip_special_tokens, include_stop_str_in_output, ...);
    # or OpenAI's batch format: {"custom_id": ..., "method": "POST", "url":
    # "/v1/chat/completions" | "/v1/completions" | "/v1/responses" | "/v1/messages",
    # "body": {...}}, or Anthropic's Message Batches lines {"custom_id": ..., "params": {...}}

Rerunning the same command skips ids already in the output; a bad line becomes a result
line with an "error" field (OpenAI format: a 400 response). The flags below give the
defaults for fields a line omits (OpenAI-format lines take only their body).
"""

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

_INPUT = flags.DEFINE_string("input", None, "JSONL file of requests.", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "JSONL file results are appended to.",
                              required=True)
_CKPT = flags.DEFINE_string("checkpoint", None, "Orbax checkpoint dir, .gguf file or Hugging "
                            "Face model dir (default: SmolLM2).")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"],
                           "Compute dtype (default: float32 on CPU, bfloat16 elsewhere).")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 256, "Default tokens per request.")
_TEMP = flags.DEFINE_float("temperature", 1.0, "Default temperature (0: greedy).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Default nucleus mass in (0, 1].")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Default top-k (0: off).")
_SEED = flags.DEFINE_integer("seed", None, "Default seed (each line may set its own).")
_MODEL_NAME = flags.DEFINE_string("model_name", None, "Model OpenAI-format lines may name "
                                  "in body.model (default: the checkpoint's).")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar on stderr.")
lora_flags.define_modules()


def main(argv):
    del argv
    runtime_flags.setup()
    from jaxinfer.batch import run_batch_job

    defaults = {"max_tokens": _MAX_TOKENS.value, "temperature": _TEMP.value,
                "top_p": _TOP_P.value, "top_k": _TOP_K.value}
    if _SEED.value is not None:
        defaults["seed"] = _SEED.value
    run_batch_job(_INPUT.value, _OUTPUT.value, _CKPT.value, _DTYPE.value,
                  engine_flags.config(), defaults,
                  _PROGRESS.value, **spec_flags.kwargs(), model_name=_MODEL_NAME.value,
                  **parser_flags.kwargs(),
                  mesh=runtime_flags.MESH.value, fsdp=runtime_flags.FSDP.value,
                  **runtime_flags.quant_kwargs(), **lora_flags.kwargs(), **chat_flags.kwargs())


def run() -> None:
    """The `jaxinfer-batch` console entry point."""
    run_program(__name__, main)
