"""Generate text from a prompt with a jaxinfer checkpoint (default: SmolLM2-135M-Instruct).

    python scripts/generate.py --prompt "The capital of France is" --temperature 0
    python scripts/generate.py --chat --prompt "What is JAX?" --output_format json
    python scripts/generate.py --prompt "..." --ngram_draft --num_speculative_tokens 4
"""

import json
import sys

import jax
from absl import flags, logging

from jaxinfer import flags as runtime_flags
from jaxinfer.cli import chat_flags, lora_flags, run_program, spec_flags

_PROMPT = flags.DEFINE_string("prompt", None, "Prompt text.", required=True)
_CHAT = flags.DEFINE_bool("chat", False, "Wrap the prompt in the model's chat template.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate at most.")
_TEMP = flags.DEFINE_float("temperature", 0.7, "0 means greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0: off).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass in (0, 1].")
_MIN_P = flags.DEFINE_float("min_p", 0.0, "Drop tokens below min_p * p(top token).")
_REP = flags.DEFINE_float("repetition_penalty", 1.0, "HF-style repetition penalty (> 0).")
_SEED = flags.DEFINE_integer("seed", None, "Sampling seed (default: random).")
_STOP = flags.DEFINE_multi_string("stop", [], "Stop string (repeatable).")
_CKPT = flags.DEFINE_string("checkpoint", None, "Orbax checkpoint dir, .gguf file or Hugging "
                            "Face model dir (default: SmolLM2).")
_FORMAT = flags.DEFINE_enum("output_format", "text", ["text", "json"], "Output format.")
_LOGPROBS = flags.DEFINE_integer(
    "logprobs", None, "With --output_format=json: each token's logprob and this many most "
    "likely alternatives (0-20).")
_PROMPT_LOGPROBS = flags.DEFINE_integer(
    "prompt_logprobs", None, "With --output_format=json: each prompt token's logprob and "
    "this many most likely alternatives (0-20).")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"],
                           "Compute dtype (default: float32 on CPU, bfloat16 elsewhere).")
_MIN_TOKENS = flags.DEFINE_integer("min_tokens", 0, "No EOS or stop token id before this "
                                   "many tokens.")
_STOP_IDS = flags.DEFINE_list("stop_token_ids", [], "Token ids that end the output like EOS.")
_BAD_WORDS = flags.DEFINE_list("bad_words", [], "Words the output never completes (vLLM's "
                               "bad_words), comma-separated.")
_IGNORE_EOS = flags.DEFINE_bool("ignore_eos", False, "Decode past EOS (max_new_tokens always).")
_SKIP_SPECIAL = flags.DEFINE_bool("skip_special_tokens", True, "Leave special tokens (chat "
                                  "markers) out of the text.")
_INCLUDE_STOP = flags.DEFINE_bool("include_stop_str_in_output", False, "Keep the matched "
                                  "--stop string at the end of the text.")
# Structured output, as vLLM's server names it; at most one.
_JSON = flags.DEFINE_string("guided_json", None, "A JSON schema the output must follow.")
_REGEX = flags.DEFINE_string("guided_regex", None, "A regex the output must match.")
_CHOICE = flags.DEFINE_list("guided_choice", None, "The output is one of these strings.")
_GRAMMAR = flags.DEFINE_string("guided_grammar", None, "A Lark or GBNF grammar the output follows.")


def main(argv):
    runtime_flags.setup()
    from jaxinfer.errors import BadRequestError, ConfigError
    from jaxinfer.llm import load
    from jaxinfer.memory import format_bytes
    from jaxinfer.sampling import SamplingParams
    from jaxinfer.structured import from_openai

    for f in (_LOGPROBS, _PROMPT_LOGPROBS):
        if f.value is not None and _FORMAT.value != "json":
            raise ConfigError(f"--{f.name}={f.value} needs --output_format=json")
    try:
        stop_ids = [int(t) for t in _STOP_IDS.value]
    except ValueError:
        raise BadRequestError(f"--stop_token_ids must be token ids, got "
                              f"{','.join(_STOP_IDS.value)!r}") from None
    sampling = SamplingParams(
        temperature=_TEMP.value, top_k=_TOP_K.value, top_p=_TOP_P.value, min_p=_MIN_P.value,
        repetition_penalty=_REP.value, seed=_SEED.value, logprobs=_LOGPROBS.value,
        prompt_logprobs=_PROMPT_LOGPROBS.value,
        min_tokens=_MIN_TOKENS.value, stop_token_ids=stop_ids, ignore_eos=_IGNORE_EOS.value,
        skip_special_tokens=_SKIP_SPECIAL.value,
        include_stop_str_in_output=_INCLUDE_STOP.value, bad_words=_BAD_WORDS.value)
    try:
        constraint = from_openai(None, _JSON.value, _REGEX.value, _CHOICE.value,
                                 _GRAMMAR.value)
    except json.JSONDecodeError as e:
        raise BadRequestError(f"--guided_json is not JSON: {e}") from None
    llm = load(_CKPT.value, dtype=_DTYPE.value, mesh=runtime_flags.MESH.value,
               fsdp=runtime_flags.FSDP.value, **runtime_flags.quant_kwargs(),
               **lora_flags.kwargs(), **chat_flags.kwargs())
    main_process = runtime_flags.is_main_process()
    kw = dict(sampling=sampling, max_new_tokens=_MAX_NEW.value, stop=_STOP.value,
              chat=_CHAT.value, constraint=constraint)
    spec = spec_flags.kwargs()
    if spec["draft"] is not None:
        kw.update(spec, draft=llm.load_draft(spec["draft"]))
    if _FORMAT.value == "json":
        out = llm.generate(_PROMPT.value, **kw)
        if main_process:
            print(json.dumps(out.to_json() | dict(weight_bytes=llm.weight_bytes,
                                                  kv_cache_bytes=llm.kv_cache_bytes)))
        else:  # results print once; other hosts log theirs so runs can be cross-checked
            logging.info("process %d token_ids: %s", jax.process_index(), out.token_ids)
        return
    result = []
    for delta in llm.stream(_PROMPT.value, result=result, **kw):
        if main_process:
            sys.stdout.write(delta)
            sys.stdout.flush()
    if not main_process:
        return
    sys.stdout.write("\n")
    c = result[0]
    drafted = (f"acceptance={c.acceptance_rate:.2f}, " if hasattr(c, "acceptance_rate")
               else "")
    print(f"[{len(c.token_ids)} tokens, finish={c.finish_reason}, ttft={c.ttft_s:.2f}s, "
          f"{drafted}{c.decode_tokens_per_s:.1f} tok/s, weights "
          f"{format_bytes(llm.weight_bytes)}, kv cache {format_bytes(llm.kv_cache_bytes)}]",
          file=sys.stderr)


def run() -> None:
    """The `jaxinfer-generate` console entry point."""
    run_program(__name__, main)
