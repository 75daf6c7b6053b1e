"""Convert a GGUF file or a Hugging Face directory into a jaxinfer (Orbax) checkpoint.

    python scripts/convert.py --input model.Q4_K_M.gguf --output ckpt/
    python scripts/convert.py --input hf_llama_dir/ --output ckpt/ --dtype bfloat16

The tokenizer travels with the weights (from the GGUF vocabulary or the HF directory's
tokenizer files), so the checkpoint is all `generate.py --checkpoint` needs.
"""

import sys
import tempfile
import time
from pathlib import Path

from absl import flags

from jaxinfer.cli_util import run_main

_INPUT = flags.DEFINE_string("input", None, "A .gguf file or a Hugging Face model directory.",
                            required=True)
_OUTPUT = flags.DEFINE_string("output", None, "Checkpoint directory to create.", required=True)
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                           "Dtype the weights are stored in (loading can cast either way).")
_TOKENIZER = flags.DEFINE_bool("tokenizer", True, "Also convert and store the tokenizer.")


def _progress(what: str):
    start = time.time()

    def show(done: int, total: int) -> None:
        end = "\n" if done == total else ""
        print(f"\r{what}: layer {done}/{total} ({time.time() - start:.1f} s)", end=end,
              file=sys.stderr, flush=True)

    return show


def main(argv):
    del argv
    from jaxinfer.checkpoint import save_checkpoint
    from jaxinfer.convert import load_gguf, load_hf_dir
    from jaxinfer.errors import ConversionError

    src, out = Path(_INPUT.value), Path(_OUTPUT.value)
    if not src.exists():
        raise ConversionError(f"--input {src} does not exist")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConversionError(f"--output {out} already exists and is not empty")
    if src.is_dir():
        cfg, weights = load_hf_dir(src, progress=_progress(f"reading {src}"))
    else:
        cfg, weights = load_gguf(src, progress=_progress(f"reading {src}"))
    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = None
        if _TOKENIZER.value:
            from jaxinfer.tokenizer import load_tokenizer

            load_tokenizer(src).save(tmp)
            tok_dir = tmp
        print(f"writing {out} ({_DTYPE.value})", file=sys.stderr, flush=True)
        save_checkpoint(out, cfg, weights, tok_dir, dtype=_DTYPE.value)
    print(f"done: {cfg.name}, {cfg.num_layers} layers, vocab {cfg.vocab_size} -> {out}",
          file=sys.stderr)


if __name__ == "__main__":
    run_main(main)
