"""Distill a teacher checkpoint into a smaller student (fewer layers, narrower MLP).

    jaxinfer-distill --text_file data/botchan_ch1.txt --output /tmp/smollm2-student \
        --num_layers 15 --steps 100 --plot docs/distill_loss.png
The student starts from the teacher's layers and learns its temperature-softened next-token
distributions (optax). Rerunning the same command resumes from the last saved step (Orbax
CheckpointManager in --workdir, deleted once the student is saved unless --keep_workdir).
Prints a JSON summary (sizes, held-out perplexities).
"""

import json

from absl import flags

from jaxinfer import flags as runtime_flags
from jaxinfer.cli import run_program

_TEACHER = flags.DEFINE_string("teacher", None, "Teacher checkpoint (default: SmolLM2).")
_TEXT = flags.DEFINE_string("text_file", None, "Training text (UTF-8).", required=True)
_OUT = flags.DEFINE_string("output", None, "Directory for the student checkpoint.",
                           required=True)
_WORK = flags.DEFINE_string("workdir", None, "Resumable training state (default: "
                            "<output>.work); deleted once the student is saved.")
_KEEP = flags.DEFINE_bool("keep_workdir", False, "Keep --workdir after a finished run "
                          "(optimizer state: about 3x the student's float32 size).")
_LAYERS = flags.DEFINE_integer("num_layers", None, "Student layers (default: teacher's).",
                               lower_bound=1)
_SELECT = flags.DEFINE_enum("layer_selection", "every_other", ["every_other", "importance"],
                            "Which teacher layers the student starts from.")
_MLP = flags.DEFINE_integer("mlp_dim", None, "Student MLP width (default: teacher's).",
                            lower_bound=1)
_STEPS = flags.DEFINE_integer("steps", 100, "Training steps in total.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Windows per step.")
_SEQ = flags.DEFINE_integer("seq_len", 128, "Tokens per window.")
_LR = flags.DEFINE_float("learning_rate", 3e-4, "Peak AdamW learning rate.")
_TAU = flags.DEFINE_float("temperature", 2.0, "Softening temperature of the KL term.")
_HARD = flags.DEFINE_float("hard_weight", 0.0, "Weight of the hard-label cross-entropy.")
_SAVE = flags.DEFINE_integer("save_every", 25, "Steps between resumable checkpoints.")
_HELD = flags.DEFINE_float("held_out", 0.1, "Tail fraction of the text kept for perplexity.")
_PLOT = flags.DEFINE_string("plot", None, "Write the loss curve to this image (matplotlib).")
_SEED = flags.DEFINE_integer("seed", 0, "Batch sampling seed.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar.")


def main(argv):
    runtime_flags.setup()
    from jaxinfer import default_model
    from jaxinfer.distill import DistillConfig, distill_checkpoint
    from jaxinfer.sharding import make_mesh

    dc = DistillConfig(steps=_STEPS.value, batch_size=_BATCH.value, seq_len=_SEQ.value,
                       learning_rate=_LR.value, temperature=_TAU.value,
                       hard_weight=_HARD.value, save_every=_SAVE.value, seed=_SEED.value)
    mesh = make_mesh(runtime_flags.MESH.value) if runtime_flags.MESH.value else None
    summary = distill_checkpoint(
        _TEACHER.value or default_model.checkpoint_path(), _TEXT.value, _OUT.value, dc,
        _LAYERS.value, _MLP.value, _SELECT.value, _WORK.value, _HELD.value, mesh, _PLOT.value,
        _PROGRESS.value, _KEEP.value)
    print(json.dumps(summary))


def run() -> None:
    """The `jaxinfer-distill` console entry point."""
    run_program(__name__, main)
