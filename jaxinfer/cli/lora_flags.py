"""--lora_adapter, for the commands that load a model for inference (generate, serve,
batch, eval_perplexity); the others do not define it, so it is never silently ignored."""

from absl import flags

LORA = flags.DEFINE_string("lora_adapter", None, "A PEFT LoRA adapter directory to merge "
                           "into the (float) weights on load.")


def kwargs() -> dict:
    """LLM.load's `lora` argument."""
    return {"lora": LORA.value}
