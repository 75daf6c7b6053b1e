"""Model shapes for random-weight benchmarks, and a stand-in tokenizer for them.

Decode speed depends on shapes and dtypes, not on weight values, so a model of a size we
have no checkpoint for (Llama 3.2 1B, Llama 3.1 8B: the configs/models presets) is
benchmarked with random weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from jaxinfer.config import ModelConfig
from jaxinfer.tokenizer import Tokenizer

# A few-layer toy for the benchmark's own tests; real shapes come from jaxinfer.presets.
TINY = ModelConfig(vocab_size=97, d_model=64, mlp_dim=96, num_layers=3, num_heads=4,
                   num_kv_heads=2, head_dim=16, max_seq_len=512, name="tiny")


def preset(name: str) -> ModelConfig:
    """'tiny', or any model preset of configs/models (jaxinfer.presets.list_models())."""
    if name == "tiny":
        return TINY
    from jaxinfer.presets import model_config

    return model_config(name)


class IdTokenizer(Tokenizer):
    """Renders ids as `<id>` and has no EOS: random weights produce no meaningful text."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self._init_meta(None, None, 0, False, None)

    def _token_to_id(self, token: str) -> int | None:
        return None

    def _id_to_token(self, token_id: int) -> str:
        return f"<{token_id}>"

    def _encode(self, text: str) -> list[int]:
        return [ord(c) % self.vocab_size for c in text]

    def _decode(self, ids: list[int]) -> str:
        return "".join(f"<{i}>" for i in ids)

    def save(self, directory: str | Path) -> None:
        raise NotImplementedError("IdTokenizer is a benchmark stand-in and is never saved")


def random_llm(name: str, dtype: Any = None, impl: str | None = None, seed: int = 0,
               quantize: str | None = None, group_size: int | None = None,
               kv_dtype: Any = None):
    """An LLM of the preset's shapes with random weights (on the default device),
    optionally quantized ("int8", "int4") the way `LLM.load(quantize=...)` does."""
    from jaxinfer.llm import LLM, default_dtype
    from jaxinfer.weights import init_weights, weight_specs

    cfg = preset(name)
    dtype = default_dtype() if dtype is None else jnp.dtype(dtype)
    params = init_weights(weight_specs(cfg, dtype), jax.random.key(seed))
    if quantize:
        from jaxinfer.quant import QuantConfig
        from jaxinfer.weights import quantize_weights

        params = quantize_weights(params, QuantConfig.from_mode(quantize, group_size))
    return LLM(cfg, params, IdTokenizer(cfg.vocab_size), impl=impl, kv_dtype=kv_dtype)
