"""GGUF files read through the Hugging Face converter: DeepSeek V2 / V3 (llama.cpp's
`deepseek2` architecture, which also carries R1 and Kimi K2).

Their layers (latent attention, grouped routing, a shared expert, leading dense layers) are
what convert/safetensors.py builds from a Hugging Face checkpoint, so instead of a second
builder the file is given that converter's two inputs: the config.json transformers would
have, rebuilt from the GGUF metadata, and a reader serving each tensor under its Hugging
Face name, dequantized, with llama.cpp's rewrites undone (experts stacked per layer;
kv_b_proj split into k_b, transposed, and v_b). llama.cpp keeps DeepSeek's RoPE pairs
interleaved as the checkpoint has them, so the converter's own reordering applies as is.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from jaxinfer.convert.gguf_quant import expert_tensors
from jaxinfer.errors import ConversionError

# Hugging Face module (under model.layers.N.) -> GGUF tensor (under blk.N.)
_LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
          "self_attn.q_proj": "attn_q", "self_attn.q_a_proj": "attn_q_a",
          "self_attn.q_a_layernorm": "attn_q_a_norm", "self_attn.q_b_proj": "attn_q_b",
          "self_attn.kv_a_proj_with_mqa": "attn_kv_a_mqa",
          "self_attn.kv_a_layernorm": "attn_kv_a_norm", "self_attn.kv_b_proj": "attn_kv_b",
          "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate",
          "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "mlp.gate": "ffn_gate_inp",
          "mlp.shared_experts.gate_proj": "ffn_gate_shexp",
          "mlp.shared_experts.up_proj": "ffn_up_shexp",
          "mlp.shared_experts.down_proj": "ffn_down_shexp"}
_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight",
           "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
_EXPERT = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight")
_GATING = {1: "softmax", 2: "sigmoid"}  # llama.cpp's expert_gating_func values


def deepseek_hf_config(m: Callable[..., Any], tensors: dict[str, Any], path: Path
                       ) -> dict[str, Any]:
    """The config.json of a `deepseek2` file (m: its `deepseek2.*` metadata): V3 where the
    router scores by sigmoid (with the choice bias exp_probs_b), V2 by softmax."""
    gating = _GATING.get(int(m("expert_gating_func") or 1))
    if gating is None:
        raise ConversionError(f"GGUF file {path}: unsupported expert_gating_func "
                              f"{m('expert_gating_func')!r}")
    v3 = gating == "sigmoid"
    rot = int(m("rope.dimension_count"))
    # Since llama.cpp absorbs the key up-projection (2025), key/value_length describe the
    # latent cache and the per-head sizes moved to *_mla; older files have them plain.
    key, value = (m("attention.key_length_mla"), m("attention.value_length_mla"))
    if key is None:
        key, value = m("attention.key_length"), m("attention.value_length")
    groups, used = int(m("expert_group_count") or 1), int(m("expert_group_used_count") or 1)
    hf: dict[str, Any] = {
        "model_type": "deepseek_v3" if v3 else "deepseek_v2",
        "vocab_size": int(tensors["token_embd.weight"].shape[-1]),
        "hidden_size": int(m("embedding_length")),
        "intermediate_size": int(m("feed_forward_length")),
        "moe_intermediate_size": int(m("expert_feed_forward_length")),
        "num_hidden_layers": int(m("block_count")),
        "num_attention_heads": int(m("attention.head_count")),
        "num_key_value_heads": int(m("attention.head_count")),
        "n_routed_experts": int(m("expert_count")),
        "num_experts_per_tok": int(m("expert_used_count")),
        "n_shared_experts": int(m("expert_shared_count") or 0),
        "first_k_dense_replace": int(m("leading_dense_block_count") or 0),
        "q_lora_rank": None if m("attention.q_lora_rank") is None
        else int(m("attention.q_lora_rank")),
        "kv_lora_rank": int(m("attention.kv_lora_rank")),
        "qk_rope_head_dim": rot, "qk_nope_head_dim": int(key) - rot,
        "v_head_dim": int(value),
        "rms_norm_eps": float(m("attention.layer_norm_rms_epsilon")),
        "max_position_embeddings": int(m("context_length", 4096)),
        "routed_scaling_factor": float(m("expert_weights_scale") or 1.0),
        "norm_topk_prob": bool(m("expert_weights_norm", False)),
        "n_group": groups, "topk_group": used,
        "topk_method": "noaux_tc" if v3 else ("group_limited_greedy" if groups > 1
                                              else "greedy"),
        "scoring_func": gating, "tie_word_embeddings": "output.weight" not in tensors,
        "rope_interleave": True,
    }
    rope: dict[str, Any] = {"rope_type": "default",
                            "rope_theta": float(m("rope.freq_base", 10_000.0))}
    if m("rope.scaling.type") == "yarn":
        # The file keeps 0.1 * mscale_all_dim (llama.cpp's deepseek2 convention) and not
        # mscale, which every release sets equal to it.
        mscale = float(m("rope.scaling.yarn_log_multiplier") or 0.0) / 0.1
        rope.update(rope_type="yarn", factor=float(m("rope.scaling.factor")),
                    original_max_position_embeddings=int(
                        m("rope.scaling.original_context_length")),
                    beta_fast=float(m("rope.scaling.yarn_beta_fast") or 32.0),
                    beta_slow=float(m("rope.scaling.yarn_beta_slow") or 1.0),
                    mscale=mscale, mscale_all_dim=mscale)
    elif m("rope.scaling.type") not in (None, "none"):
        raise ConversionError(f"GGUF file {path}: unsupported RoPE scaling "
                              f"{m('rope.scaling.type')!r} for deepseek2")
    hf["rope_parameters"] = rope
    return hf


class HFView:
    """A GGUF file's tensors under Hugging Face names, as float32 in HF's [out, in] order:
    the reader interface convert/safetensors.py builds weights from (no FP8 or MXFP4
    here: GGUF blocks are dequantized as read)."""

    prefix, embed, lm_head, heads, fp8_block, has_mxfp4 = (
        "model.", "model.embed_tokens.weight", "lm_head.weight", 0, None, False)

    def __init__(self, tensors: dict[str, Any], get: Callable[..., np.ndarray], path: Path,
                 kind: str, num_experts: int):
        self.tensors, self._get, self.path, self.kind = tensors, get, path, kind
        self._E = num_experts
        self._last: tuple[str | None, np.ndarray | None] = (None, None)

    def __contains__(self, name: str) -> bool:
        try:
            self._source(name)
        except ConversionError:
            return False
        return True

    def get(self, name: str, shape: tuple[int, ...], reshape: bool = False) -> np.ndarray:
        a = self._read(name)
        if reshape and a.size == int(np.prod(shape)):
            a = a.reshape(shape)
        if a.shape != tuple(shape):
            raise ConversionError(f"tensor {self._source(name)!r} ({name}) in {self.path} "
                                  f"has shape {a.shape}, expected {shape}")
        return a

    def fp8_scales(self, name: str, shape: tuple[int, ...]) -> None:
        return None

    def mxfp4(self, name: str, shape: tuple[int, ...]) -> None:
        return None

    def _read(self, name: str) -> np.ndarray:
        if e := _EXPERT.fullmatch(name):  # one expert of a layer's stacked [E, out, in]
            i, x, part = e.groups()
            return self._whole(f"blk.{i}.ffn_{part}_exps.weight")[int(x)]
        src = self._source(name)
        if src.endswith("attn_kv_b.weight") and src not in self.tensors:
            # llama.cpp's split: k_b [N, R, Hn] (transposed) and v_b [N, Hv, R]
            k_b = self._whole(src.replace("attn_kv_b", "attn_k_b"))
            v_b = self._whole(src.replace("attn_kv_b", "attn_v_b"))
            kv_b = np.concatenate([k_b.swapaxes(1, 2), v_b], axis=1)
            return kv_b.reshape(-1, kv_b.shape[-1])
        return self._whole(src)

    def _whole(self, src: str) -> np.ndarray:
        """A GGUF tensor as float32 in numpy order; the last one read is kept, so a layer's
        stacked experts are dequantized once, not once per expert."""
        if self._last[0] != src:
            parts = expert_tensors(self.tensors, src, self._E) if "_exps." in src else None
            if parts is not None and len(parts) > 1:  # one tensor per expert (older files)
                base = src.replace("_exps.", ".")
                self._last = (src, np.stack([self._get(base.replace(
                    ".weight", f".{e}.weight"), _shape(t)) for e, t in enumerate(parts)]))
            else:
                if src not in self.tensors:
                    raise ConversionError(f"GGUF file {self.path} lacks tensor {src!r}")
                self._last = (src, self._get(src, _shape(self.tensors[src])))
        return self._last[1]

    def _source(self, name: str) -> str:
        """The GGUF tensor that holds HF `name` (raises ConversionError if none maps)."""
        if name in _GLOBAL:
            return _GLOBAL[name]
        if e := _EXPERT.fullmatch(name):
            return f"blk.{e[1]}.ffn_{e[3]}_exps.weight"
        if m := re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|e_score_correction_bias)",
                             name):
            i, module, kind = m.groups()
            if kind == "e_score_correction_bias" and module == "mlp.gate":
                return f"blk.{i}.exp_probs_b.bias"
            if module in _LAYER and kind == "weight":
                src = f"blk.{i}.{_LAYER[module]}.weight"
                if src in self.tensors or module == "self_attn.kv_b_proj" and (
                        f"blk.{i}.attn_k_b.weight" in self.tensors):
                    return src
        raise ConversionError(f"GGUF file {self.path} has no tensor for {name!r}")


def _shape(t: Any) -> tuple[int, ...]:
    return tuple(int(s) for s in reversed(t.shape))
