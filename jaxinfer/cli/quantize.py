"""Quantize a float jaxinfer checkpoint into a new, smaller one (weights int8 or int4).

    jaxinfer-quantize --checkpoint ckpt/ --output ckpt_int8/ --mode int8
    jaxinfer-quantize --checkpoint ckpt/ --output ckpt_int4/ --mode int4 \
        --group_size 32

The output records its quantization (quant.json), so `generate.py --checkpoint ckpt_int8/`
and `LLM.load` restore it quantized with no extra flag. The tokenizer is copied along.
"""

import sys
from pathlib import Path

from absl import flags

from jaxinfer.cli import run_program

_CKPT = flags.DEFINE_string("checkpoint", None, "Float checkpoint (default: SmolLM2).")
_OUTPUT = flags.DEFINE_string("output", None, "Checkpoint directory to create.", required=True)
_MODE = flags.DEFINE_enum("mode", "int8", ["int8", "int4", "fp8"],
                          "int8: per output channel; int4: group-wise scales; fp8: float8 "
                          "linear layers, per channel (embedding left in float).")
_GROUP_SIZE = flags.DEFINE_integer("group_size", None, "Group size along the input axis "
                                   "(int4 default 32; int8 default: per channel).",
                                   lower_bound=1)
_SYMMETRIC = flags.DEFINE_bool("symmetric", False, "int4 groups without offsets (Q4_0 "
                               "style; default: an offset per group, Q4_1 style).")
_EMBED = flags.DEFINE_bool("embed", True, "Also quantize the embedding / lm_head (int8).")


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main(argv):
    del argv
    from jaxinfer.checkpoint import load_checkpoint, load_quant_config, save_checkpoint
    from jaxinfer.errors import CheckpointError
    from jaxinfer.memory import format_bytes
    from jaxinfer.quant import QuantConfig
    from jaxinfer.weights import quantize_weights

    src = Path(_CKPT.value) if _CKPT.value else None
    if src is None:
        from jaxinfer import default_model

        src = default_model.checkpoint_path()
    out = Path(_OUTPUT.value)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"--output {out} already exists and is not empty")
    if load_quant_config(src) is not None:
        raise CheckpointError(f"--checkpoint {src} is already quantized")
    qc = QuantConfig.from_mode(_MODE.value, _GROUP_SIZE.value,
                               False if _SYMMETRIC.value else None, embed=_EMBED.value)
    cfg, weights = load_checkpoint(src)
    print(f"quantizing {src}: {qc}", file=sys.stderr, flush=True)
    weights = quantize_weights(weights, qc)
    tok = src / "tokenizer"
    save_checkpoint(out, cfg, weights, tok if tok.is_dir() else None)
    before, after = _size(src / "weights"), _size(out / "weights")
    print(f"done: {out} weights {format_bytes(after)} on disk (float: {format_bytes(before)},"
          f" {before / after:.2f}x smaller)", file=sys.stderr)


def run() -> None:
    """The `jaxinfer-quantize` console entry point."""
    run_program(__name__, main)
