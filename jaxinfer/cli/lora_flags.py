"""--lora_adapter, for the commands that load a model for inference (generate, serve,
batch, eval_perplexity), and --lora_modules for those that serve requests (serve, batch),
defined by `define_modules()`; a command defines only what it uses, so neither flag is
ever silently ignored."""

from absl import flags

from jaxinfer.errors import ConfigError

LORA = flags.DEFINE_string("lora_adapter", None, "A PEFT LoRA adapter directory to merge "
                           "into the (float) weights on load.")


def define_modules() -> None:
    flags.DEFINE_list("lora_modules", [], "PEFT LoRA adapters served unmerged, as "
                      "name=directory,...: a request picks one by sending its name as the "
                      "model (vLLM's --lora-modules).")


def modules(entries: list[str]) -> dict[str, str]:
    """{name: directory} of --lora_modules entries; ConfigError naming a bad one."""
    out: dict[str, str] = {}
    for e in entries:
        name, sep, path = e.partition("=")
        if not sep or not name or not path or name in out:
            raise ConfigError(f"--lora_modules entry {e!r} is not name=directory with a new "
                              "name")
        out[name] = path
    return out


def kwargs() -> dict:
    """LLM.load's `lora` and (where defined) `lora_modules` arguments."""
    kw = {"lora": LORA.value}
    if "lora_modules" in flags.FLAGS and flags.FLAGS.lora_modules:
        kw["lora_modules"] = modules(flags.FLAGS.lora_modules)
    return kw
