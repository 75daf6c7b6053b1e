"""MXFP4 weights as Hugging Face checkpoints store them (gpt-oss's experts), decoded.

    <name>_blocks  u8[..., rows, G, 16]  32 FP4 (E2M1) values per block, two per byte,
                                         the even one in the low nibble
    <name>_scales  u8[..., rows, G]      each block's E8M0 exponent: 2 ** (s - 127)

The gguf package's MXFP4 dequantizer does the decoding (it is the format llama.cpp reads)
once the nibbles are moved into its block layout: one scale byte, then 16 bytes holding
values j and j + 16 of the block in the low and high nibble of byte j.
"""

from __future__ import annotations

import numpy as np

GGML_BLOCK = 17  # bytes of one 32-value MXFP4 block in ggml: scale + 16 bytes of nibbles


def to_ggml_blocks(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Hugging Face's packed blocks and scales as ggml MXFP4 bytes, u8[..., rows, G * 17]."""
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != 16:
        raise ValueError(f"MXFP4 blocks {blocks.shape} and scales {scales.shape} do not pair "
                         f"(blocks must be [..., G, 16], scales [..., G])")
    values = np.stack([blocks & 0x0F, blocks >> 4], axis=-1).reshape(*blocks.shape[:-1], 32)
    packed = values[..., :16] | (values[..., 16:] << 4)
    ggml = np.concatenate([scales[..., None], packed], axis=-1)
    return ggml.reshape(*blocks.shape[:-2], blocks.shape[-2] * GGML_BLOCK)


def dequantize(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """float32[..., rows, G * 32]: each row's values in order."""
    import gguf

    return gguf.quants.dequantize(to_ggml_blocks(blocks, scales),
                                  gguf.GGMLQuantizationType.MXFP4).astype(np.float32)
