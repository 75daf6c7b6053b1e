"""Structured pruning: drop MLP channels and/or whole layers scored on calibration text.

    jaxinfer-prune --text_file data/text.txt --output /tmp/smollm2-pruned \
        --num_layers 24 --mlp_dim 1024
Prints a JSON summary (layers kept, sizes, held-out perplexity before and after). The
output is an ordinary checkpoint: `scripts/generate.py --checkpoint /tmp/smollm2-pruned`.
"""

import json

from absl import flags

from jaxinfer import flags as runtime_flags
from jaxinfer.cli import run_program

_CKPT = flags.DEFINE_string("checkpoint", None, "Model to prune (default: SmolLM2).")
_TEXT = flags.DEFINE_string("text_file", None, "Calibration text (UTF-8).", required=True)
_OUT = flags.DEFINE_string("output", None, "Directory for the pruned checkpoint.",
                           required=True)
_LAYERS = flags.DEFINE_integer("num_layers", None, "Layers to keep (default: all).",
                               lower_bound=1)
_MLP = flags.DEFINE_integer("mlp_dim", None, "MLP channels to keep per layer (default: all).",
                            lower_bound=1)
_SEQ = flags.DEFINE_integer("seq_len", 256, "Tokens per calibration window.")
_BATCH = flags.DEFINE_integer("batch_size", 4, "Windows per calibration batch.")
_CALIB = flags.DEFINE_integer("calib_batches", 4, "Calibration batches.")
_HELD = flags.DEFINE_float("held_out", 0.1, "Tail fraction of the text kept for evaluation.")
_EVAL = flags.DEFINE_bool("eval", True, "Report held-out perplexity before and after.")


def main(argv):
    runtime_flags.setup()
    from jaxinfer import default_model
    from jaxinfer.prune import prune_checkpoint
    from jaxinfer.sharding import make_mesh

    mesh = make_mesh(runtime_flags.MESH.value) if runtime_flags.MESH.value else None
    summary = prune_checkpoint(
        _CKPT.value or default_model.checkpoint_path(), _TEXT.value, _OUT.value,
        _LAYERS.value, _MLP.value, _SEQ.value, _BATCH.value, _CALIB.value, _HELD.value,
        _EVAL.value, mesh)
    print(json.dumps(summary))


def run() -> None:
    """The `jaxinfer-prune` console entry point."""
    run_program(__name__, main)
