"""Perplexity of a model (float, quantized weights, int8 KV cache) over a text file, and
how often its greedy output agrees with the float model's.

    jaxinfer-eval-perplexity                         # the docs table (SmolLM2)
    jaxinfer-eval-perplexity --variants float32,int8 --max_tokens 2048
    jaxinfer-eval-perplexity --checkpoint ckpt/ --variants float32 --quantize int4

Variants: float32, int8 (per-channel weights), int4 (group 32 with offsets, the default),
int4_sym (group 32, symmetric, Q4_0 style), kv_int8 (float weights, int8 KV cache), gguf
(the GGUF file's own Q4_1/Q8_0 blocks, --gguf), custom (from --quantize, --group_size,
--kv_cache_dtype).
The first variant is the reference for the agreement columns.
"""

import json
import sys
from pathlib import Path

from absl import flags

from jaxinfer import flags as runtime_flags
from jaxinfer.cli import lora_flags, run_program

_CKPT = flags.DEFINE_string("checkpoint", None, "Float checkpoint (default: SmolLM2).")
_GGUF = flags.DEFINE_string("gguf", None, "GGUF file for the 'gguf' variant "
                            "(default: the SmolLM2 GGUF).")
_TEXT = flags.DEFINE_string("text_file", str(Path(__file__).parent.parent / "data" /
                                             "botchan_ch1.txt"), "Text to score.")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 4096, "Score at most this many tokens.")
_CONTEXT = flags.DEFINE_integer("context_len", 512, "Window length (tokens).")
_VARIANTS = flags.DEFINE_list("variants", ["float32", "int8", "int4", "int4_sym", "kv_int8"],
                              "Comma-separated variants (see the module docstring).")
_NUM_NEW = flags.DEFINE_integer("greedy_tokens", 32, "Greedy tokens per agreement prompt.")
_FORMAT = flags.DEFINE_enum("output_format", "markdown", ["markdown", "json"], "Output.")

PROMPTS = ["The capital of France is", "Once upon a time, in a small village,",
           "The main difference between a list and a tuple in Python is",
           "Water boils at a temperature of", "My favourite book is"]


def _variant(name: str, base):
    import jax

    from jaxinfer.convert.gguf import load_gguf
    from jaxinfer.errors import ConfigError
    from jaxinfer.llm import LLM
    from jaxinfer.quant import QuantConfig
    from jaxinfer.weights import quantize_weights

    q = lambda qc, kv=None: LLM(base.cfg, quantize_weights(base.params, qc), base.tokenizer,
                                kv_dtype=kv)
    if name == "float32":
        return base
    if name == "int8":
        return q(QuantConfig.from_mode("int8"))
    if name == "int4":
        return q(QuantConfig.from_mode("int4"))
    if name == "int4_sym":
        return q(QuantConfig.from_mode("int4", offsets=False))
    if name == "kv_int8":
        return LLM(base.cfg, base.params, base.tokenizer, kv_dtype="int8")
    if name == "gguf":
        from jaxinfer import default_model

        cfg, w = load_gguf(_GGUF.value or default_model.gguf_path(), quantized=True)
        return LLM(cfg, jax.device_put(w), base.tokenizer)
    if name == "custom":
        kw = runtime_flags.quant_kwargs()
        params = base.params if kw["quantize"] is None else quantize_weights(
            base.params, QuantConfig.from_mode(kw["quantize"], kw["group_size"]))
        return LLM(base.cfg, params, base.tokenizer, kv_dtype=kw["kv_dtype"])
    raise ConfigError(f"unknown variant {name!r} in --variants")


def main(argv):
    runtime_flags.setup()
    import numpy as np

    from jaxinfer.errors import ConfigError
    from jaxinfer.llm import load
    from jaxinfer.memory import device_bytes
    from jaxinfer.perplexity import agreement, greedy_tokens, perplexity

    text = Path(_TEXT.value)
    if not text.is_file():
        raise ConfigError(f"--text_file {text} does not exist")
    variants = list(_VARIANTS.value)
    if any(runtime_flags.quant_kwargs().values()) and "custom" not in variants:
        variants.append("custom")
    base = load(_CKPT.value, dtype="float32", **lora_flags.kwargs())
    ids = base.tokenizer.encode(text.read_text())[: _MAX_TOKENS.value]
    rows, ref = [], None
    for name in variants:
        llm = _variant(name, base)
        p = perplexity(llm, ids, _CONTEXT.value)
        greedy = greedy_tokens(llm, PROMPTS, _NUM_NEW.value)
        row = dict(variant=name, perplexity=round(p.perplexity, 4), tokens=p.num_tokens,
                   weight_bytes=device_bytes(llm.params))
        if ref is None:
            ref = (p, greedy)
        else:
            row["top1_agreement"] = round(float(np.mean(p.top1 == ref[0].top1)), 4)
            row["ppl_change_pct"] = round(100 * (p.perplexity / ref[0].perplexity - 1), 2)
            same, prefix = agreement(ref[1], greedy)
            row["greedy_same_tokens"] = round(same, 4)
            row["greedy_prefix"] = round(prefix, 4)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    if _FORMAT.value == "json":
        print(json.dumps(rows))
        return
    cols = ["variant", "perplexity", "ppl_change_pct", "tokens", "weight_bytes",
            "top1_agreement", "greedy_same_tokens", "greedy_prefix"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")


def run() -> None:
    """The `jaxinfer-eval-perplexity` console entry point."""
    run_program(__name__, main)
