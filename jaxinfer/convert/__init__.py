"""Foreign weight formats (GGUF, Hugging Face safetensors) into the jaxinfer weight tree.

Each converter returns `(ModelConfig, weights)` with weights as float32 numpy arrays in
the layout of `jaxinfer.weights`; `jaxinfer.checkpoint.save_checkpoint` then writes the
native Orbax checkpoint. Converters run once, offline, so they favour clarity over speed.
"""

from __future__ import annotations

from pathlib import Path

from jaxinfer.convert.gguf import load_gguf
from jaxinfer.convert.safetensors import Progress, load_hf_dir
from jaxinfer.convert.stacks import IN_MEMORY, Storage
from jaxinfer.errors import ConversionError
from jaxinfer.quant import QuantConfig

__all__ = ["is_foreign", "load_foreign", "load_gguf", "load_hf_dir"]


def is_foreign(path: str | Path) -> bool:
    """Whether `path` is a GGUF file or a Hugging Face model directory (config.json and
    safetensors, no Orbax weights/), which `LLM.load` converts in memory."""
    p = Path(path)
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ConversionError(f"GGUF file not found: {p}")
        return True
    return ((p / "config.json").is_file() and not (p / "weights").exists()
            and any(p.glob("*.safetensors")))


def load_foreign(path: str | Path, quant: QuantConfig | None = None,
                 progress: Progress | None = None, storage: Storage = IN_MEMORY) -> tuple:
    """`(config, weights)` of a GGUF file or Hugging Face directory (`quant`: quantized
    layer by layer as read; `storage`: how float weights are held)."""
    p = Path(path)
    return (load_gguf(p, progress, quant=quant, storage=storage) if p.is_file()
            else load_hf_dir(p, progress, quant=quant, storage=storage))
