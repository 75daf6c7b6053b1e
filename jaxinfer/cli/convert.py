"""Convert a GGUF file or a Hugging Face directory into a jaxinfer (Orbax) checkpoint.

    python scripts/convert.py --input model.Q4_K_M.gguf --output ckpt/
    python scripts/convert.py --input hf_llama_dir/ --output ckpt/ --dtype bfloat16
    python scripts/convert.py --input model.Q4_1.gguf --output ckpt_q/ --quantize gguf
    python scripts/convert.py --input hf_llama_dir/ --output ckpt8/ --quantize int8

--quantize gguf keeps a GGUF file's own Q8_0/Q4_0/Q4_1 blocks (no float round trip);
int8/int4 quantize the float weights (see docs/quantization.md).

The tokenizer travels with the weights (from the GGUF vocabulary or the HF directory's
tokenizer files), so the checkpoint is all `generate.py --checkpoint` needs.
"""

import contextlib
import sys
import tempfile
import time
from pathlib import Path

from absl import flags

from jaxinfer.cli import run_program

_INPUT = flags.DEFINE_string("input", None, "A .gguf file or a Hugging Face model directory.",
                            required=True)
_OUTPUT = flags.DEFINE_string("output", None, "Checkpoint directory to create.", required=True)
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                           "Dtype the weights are stored in (loading can cast either way).")
_QUANTIZE = flags.DEFINE_enum("quantize", "none", ["none", "int8", "int4", "fp8", "gguf"],
                              "Store weights quantized; 'gguf' keeps the file's own blocks; "
                              "'fp8' keeps an FP8 release's weights and scales as they are.")
_GROUP_SIZE = flags.DEFINE_integer("group_size", None, "Group size along the input axis "
                                   "(int4 default 32; int8 and fp8 default: per output "
                                   "channel, or what keeps a release's MXFP4 or FP8 blocks "
                                   "exactly).",
                                   lower_bound=1)
_SYMMETRIC = flags.DEFINE_bool("symmetric", False, "int4 groups without offsets (Q4_0 style).")
_LORA = flags.DEFINE_string("lora_adapter", None, "A PEFT LoRA adapter directory to "
                            "merge into the weights before they are stored (or quantized).")
_TOKENIZER = flags.DEFINE_bool("tokenizer", True, "Also convert and store the tokenizer.")
_SCRATCH = flags.DEFINE_string("scratch_dir", None, "Hold the float weights in files under "
                               "this directory while converting instead of in host memory "
                               "(a model larger than RAM converts; needs disk space for "
                               "the float model).")


def _progress(what: str):
    start = time.time()

    def show(done: int, total: int) -> None:
        end = "\n" if done == total else ""
        print(f"\r{what}: layer {done}/{total} ({time.time() - start:.1f} s)", end=end,
              file=sys.stderr, flush=True)

    return show


def main(argv):
    del argv
    import jax.numpy as jnp
    import numpy as np

    from jaxinfer.convert.stacks import Storage
    from jaxinfer.errors import ConversionError

    src, out = Path(_INPUT.value), Path(_OUTPUT.value)
    if not src.exists():
        raise ConversionError(f"--input {src} does not exist")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConversionError(f"--output {out} already exists and is not empty")
    mode = _QUANTIZE.value
    if mode == "gguf" and src.is_dir():
        raise ConversionError(f"--quantize=gguf needs a .gguf --input, got directory {src}")
    qc = None
    if mode in ("int8", "int4", "fp8"):
        from jaxinfer.quant import QuantConfig

        qc = QuantConfig.from_mode(mode, _GROUP_SIZE.value, False if _SYMMETRIC.value else None)
    # Quantized as read, one layer at a time (never the whole model in float), unless a
    # LoRA adapter must first merge into the float weights.
    stream = None if _LORA.value else qc
    if stream is not None:
        print(f"quantizing while reading: {qc}", file=sys.stderr, flush=True)
    scratch = _SCRATCH.value
    if scratch is not None and not Path(scratch).is_dir():
        raise ConversionError(f"--scratch_dir {scratch} is not a directory")
    # Float weights held as the checkpoint stores them, unless a LoRA merge or a
    # quantization still works on them (in float32, as without this).
    dtype = np.float32 if _LORA.value or qc else jnp.dtype(_DTYPE.value)
    with (tempfile.TemporaryDirectory(dir=scratch) if scratch is not None
          else contextlib.nullcontext()) as files:
        _convert(src, out, mode, qc, stream, Storage(dtype, files))


def _convert(src, out, mode, qc, stream, storage) -> None:
    from jaxinfer.checkpoint import save_checkpoint
    from jaxinfer.convert import load_gguf, load_hf_dir
    from jaxinfer.errors import ConversionError

    if src.is_dir():
        cfg, weights = load_hf_dir(src, progress=_progress(f"reading {src}"), quant=stream,
                                   storage=storage)
    else:
        cfg, weights = load_gguf(src, progress=_progress(f"reading {src}"),
                                 quantized=mode == "gguf", quant=stream, storage=storage)
    if _LORA.value:
        from jaxinfer.convert.lora import merge_lora, read_lora

        if mode == "gguf":
            raise ConversionError("--lora_adapter cannot merge into --quantize=gguf blocks; "
                                  "convert to float (or int8/int4) instead")
        print(f"merging LoRA adapter {_LORA.value}", file=sys.stderr, flush=True)
        weights = merge_lora(weights, read_lora(_LORA.value, cfg))
    if qc is not None and stream is None:
        from jaxinfer.weights import quantize_weights

        print(f"quantizing: {qc}", file=sys.stderr, flush=True)
        weights = quantize_weights(weights, qc)
    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = None
        if _TOKENIZER.value:
            from jaxinfer.tokenizer import load_tokenizer

            load_tokenizer(src).save(tmp)
            tok_dir = tmp
        print(f"writing {out} ({_DTYPE.value}, quantize={mode})", file=sys.stderr, flush=True)
        save_checkpoint(out, cfg, weights, tok_dir, dtype=_DTYPE.value)
    print(f"done: {cfg.name}, {cfg.num_layers} layers, vocab {cfg.vocab_size} -> {out}",
          file=sys.stderr)


def run() -> None:
    """The `jaxinfer-convert` console entry point."""
    run_program(__name__, main)
