"""Pallas kernels. Each ships a pure-JAX `ref_*` twin and a static input validator."""

from jaxinfer.kernels.decode_attention import (
    decode_attention,
    ref_decode_attention,
    validate_decode_attention_inputs,
)

__all__ = ["decode_attention", "ref_decode_attention", "validate_decode_attention_inputs"]
