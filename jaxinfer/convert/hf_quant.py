"""Quantized Hugging Face checkpoints, decoded to float as they are read.

MXFP4 (gpt-oss's released experts):
    <name>_blocks  u8[..., rows, G, 16]  32 FP4 (E2M1) values per block, two per byte,
                                         the even one in the low nibble
    <name>_scales  u8[..., rows, G]      each block's E8M0 exponent: 2 ** (s - 127)
  The gguf package's MXFP4 dequantizer does the decoding (it is the format llama.cpp
  reads) once the nibbles are moved into its block layout: one scale byte, then 16 bytes
  holding values j and j + 16 of the block in the low and high nibble of byte j.
  Every E2M1 value is a multiple of 1/2 no larger than 6, so 2 * value is an integer in
  [-12, 12] and a block is exactly int8 values times 2 ** (s - 128): `mxfp4_int8` keeps
  the weights quantized (int8, groups of 32) with no rounding at all.

FP8 (`quant_method: fp8`: DeepSeek V3 / R1, Qwen3 FP8; `compressed-tensors` float-quantized:
the FP8-dynamic releases; `fbgemm_fp8`: Llama 4's FP8):
    <name>            float8_e4m3fn[out, in]
    <name>_scale_inv  f32 (or E8M0) [ceil(out / bo), ceil(in / bi)], one per block of
    or <name>_scale   weight_block_size = [bo, bi]; or [out, 1] (per channel), or one
                      (per tensor)
  value = fp8 * the scale of its block, row or tensor.
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


def mxfp4_dequantize(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """float32[..., rows, G * 32]: each row's values in order."""
    import gguf

    return gguf.quants.dequantize(to_ggml_blocks(blocks, scales),
                                  gguf.GGMLQuantizationType.MXFP4).astype(np.float32)


# E2M1 code -> 2 * value: 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives
E2M1_X2 = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], np.int8)
MXFP4_BLOCK = 32


def ggml_mxfp4_int8(ggml: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml MXFP4 bytes u8[..., rows, G * 17] kept exactly: (int8[..., rows, G * 32] =
    2 * E2M1, float32[..., rows, G] = 2 ** (e - 128)); their product per 32-block is the
    dequantized value."""
    b = ggml.reshape(*ggml.shape[:-1], -1, GGML_BLOCK)
    qs = b[..., 1:]  # values j and j + 16 in the low and high nibble of byte j
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)
    scales = np.ldexp(np.float32(1), b[..., 0].astype(np.int32) - 128).astype(np.float32)
    return E2M1_X2[codes].reshape(*ggml.shape[:-1], -1), scales


def mxfp4_int8(blocks: np.ndarray, scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hugging Face's MXFP4 blocks and scales kept exactly (`ggml_mxfp4_int8`)."""
    return ggml_mxfp4_int8(to_ggml_blocks(blocks, scales))


def fp8_dequantize(w: np.ndarray, scale_inv: np.ndarray,
                   block: tuple[int, int] | None) -> np.ndarray:
    """float32 of an FP8 weight [..., out, in]: each [bo, bi] block (row, tensor) times its
    scale."""
    return w.astype(np.float32) * fp8_scales(w.shape, scale_inv, block)


def fp8_scales(shape: tuple[int, ...], scale_inv: np.ndarray,
               block: tuple[int, int] | None) -> np.ndarray:
    """float32 scales of an FP8 weight of `shape` [..., out, in], broadcastable to it: one
    per tensor, per row, or each [bo, bi] block's repeated over its elements."""
    s = scale_inv.astype(np.float32)
    if s.size == 1:  # per tensor
        return s.reshape((1,) * len(shape))
    out, inp = shape[-2:]
    if s.shape in ((*shape[:-1], 1), tuple(shape[:-1])):  # per channel (row)
        return s.reshape(*shape[:-1], 1)
    if block is None or s.shape[-2:] != (-(-out // block[0]), -(-inp // block[1])):
        raise ValueError(f"FP8 weight {tuple(shape)} with scales {s.shape} does not match "
                         f"weight_block_size={block}")
    s = np.repeat(np.repeat(s, block[0], axis=-2)[..., :out, :], block[1], axis=-1)
    return s[..., :inp]
