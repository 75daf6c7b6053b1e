"""Foreign weight formats (GGUF, Hugging Face safetensors) into the jaxinfer weight tree.

Each converter returns `(ModelConfig, weights)` with weights as float32 numpy arrays in
the layout of `jaxinfer.weights`; `jaxinfer.checkpoint.save_checkpoint` then writes the
native Orbax checkpoint. Converters run once, offline, so they favour clarity over speed.
"""

from jaxinfer.convert.gguf import load_gguf
from jaxinfer.convert.safetensors import load_hf_dir

__all__ = ["load_gguf", "load_hf_dir"]
