"""GGUF files read through the Hugging Face converter: DeepSeek V2 / V3 (llama.cpp's
`deepseek2` architecture, which also carries R1), GLM-4.5 / 4.6 (`glm4moe`), Llama 4
(`llama4`: its experts served as the checkpoint's [E, D, 2F] gate_up_proj again) and
MiniMax-M2 (`minimax-m2`).

Their layers (latent attention, grouped routing, shared experts, leading dense layers) are
what convert/safetensors.py builds from a Hugging Face checkpoint, so instead of a second
builder the file is given that converter's two inputs: the config.json transformers would
have, rebuilt from the GGUF metadata, and a reader serving each tensor under its Hugging
Face name (the `gguf` package's own name table), dequantized, with llama.cpp's rewrites
undone (experts stacked per layer; DeepSeek's kv_b_proj split into k_b, transposed, and
v_b; GLM's multi-token-prediction layers appended, and skipped here). llama.cpp keeps both
families' RoPE rows as their checkpoints have them, so the converter's handling applies as
is.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from jaxinfer.convert.gguf_quant import expert_tensors, shape_of
from jaxinfer.errors import ConversionError

# One expert's matrix as a checkpoint names it: DeepSeek's gate/up/down_proj, Mixtral-style
# w1/w3/w2 (MiniMax-M2); llama.cpp stacks each layer's (the name with the index left out).
_EXPERT = re.compile(r"model\.layers\.(\d+)\.(mlp|block_sparse_moe)\.experts\.(\d+)\."
                     r"((?:gate|up|down)_proj|w[123])\.weight")
_GATING = {1: "softmax", 2: "sigmoid"}  # llama.cpp's expert_gating_func values


VIA_HF = ("deepseek2", "glm4moe", "llama4", "minimax-m2")  # the GGUF architectures read so


_NEEDED = object()


def hf_config(arch: str, field: Callable[[str], Any], tensors: dict[str, Any], path: Path
              ) -> dict[str, Any]:
    """The config.json of a file of `arch` (one of VIA_HF; `field(key)`: its `{arch}.{key}`
    metadata, None where absent). A key read without a default must be there: its absence
    is a ConversionError naming it."""
    def m(key: str, default: Any = _NEEDED) -> Any:
        value = field(key)
        if value is not None:
            return value
        if default is _NEEDED:
            raise ConversionError(f"GGUF file {path} lacks metadata {arch}.{key}")
        return default

    return {"deepseek2": _deepseek2, "glm4moe": _glm4moe, "llama4": _llama4,
            "minimax-m2": _minimax_m2}[arch](m, tensors, path)


def _minimax_m2(m: Callable[..., Any], tensors: dict[str, Any], path: Path) -> dict[str, Any]:
    """MiniMax-M2's config: RoPE on rope.dimension_count dims of each head, q/k norms across
    all heads, sigmoid routing (the file's expert_gating_func, as llama.cpp reads it; its
    only one) with the choice bias, renormalised top-k (llama.cpp's graph always does)."""
    gating = _GATING.get(int(m("expert_gating_func", 2)))
    if gating != "sigmoid":
        raise ConversionError(f"GGUF file {path}: minimax-m2 with {gating or 'unknown'} expert "
                              "gating is not supported (its releases route by sigmoid)")
    n, d = int(m("attention.head_count")), int(m("embedding_length"))
    head_dim = int(m("attention.key_length", d // n))
    return {"model_type": "minimax_m2",
            "vocab_size": int(tensors["token_embd.weight"].shape[-1]),
            "hidden_size": d, "num_hidden_layers": int(m("block_count")),
            "num_attention_heads": n,
            "num_key_value_heads": int(m("attention.head_count_kv", n)),
            "head_dim": head_dim, "rotary_dim": int(m("rope.dimension_count", head_dim)),
            "intermediate_size": int(m("expert_feed_forward_length")),
            "num_local_experts": int(m("expert_count")),
            "num_experts_per_tok": int(m("expert_used_count")),
            "rms_norm_eps": float(m("attention.layer_norm_rms_epsilon")),
            "max_position_embeddings": int(m("context_length", 4096)),
            "tie_word_embeddings": "output.weight" not in tensors,
            "use_routing_bias": any(k.endswith("exp_probs_b.bias") for k in tensors),
            "rope_parameters": _rope(m, path)}


def _llama4(m: Callable[..., Any], tensors: dict[str, Any], path: Path) -> dict[str, Any]:
    """Llama 4 Scout / Maverick's text config. llama.cpp stores no chunked attention, NoPE
    layers, query temperature or q/k norm: it fixes them as the releases have them (chunks
    of 8192 positions on three layers of four (or the file's window pattern), no RoPE on
    every fourth, temperature 0.1 per 8192 positions there, q/k L2-normed except on the
    128-expert Maverick), and so does this. llama.cpp keeps Llama 4's q/k rows as they are
    (its RoPE pairs dims interleaved, as the checkpoints' complex RoPE does)."""
    n, d, L = int(m("attention.head_count")), int(m("embedding_length")), int(m("block_count"))
    E = int(m("expert_count"))
    if m("attention.sliding_window", None) == 0:  # (llama.cpp: MobileLLM-style files)
        raise ConversionError(f"GGUF file {path}: a Llama 4 file without chunked attention "
                              "(sliding_window 0) is not supported")
    pattern = m("attention.sliding_window_pattern", 4)
    local = ([bool(b) for b in pattern] if isinstance(pattern, list)
             else [i % int(pattern) < int(pattern) - 1 for i in range(L)])
    return {"model_type": "llama4_text",
            "vocab_size": int(tensors["token_embd.weight"].shape[-1]),
            "hidden_size": d, "num_hidden_layers": L, "num_attention_heads": n,
            "num_key_value_heads": int(m("attention.head_count_kv", n)),
            "head_dim": int(m("attention.key_length", d // n)),
            "intermediate_size": int(m("expert_feed_forward_length")),
            "intermediate_size_mlp": int(m("feed_forward_length")),
            "num_local_experts": E, "num_experts_per_tok": int(m("expert_used_count")),
            "interleave_moe_layer_step": int(m("interleave_moe_layer_step", 1)),
            "rms_norm_eps": float(m("attention.layer_norm_rms_epsilon")),
            "max_position_embeddings": int(m("context_length", 4096)),
            "tie_word_embeddings": "output.weight" not in tensors,
            "attention_chunk_size": 8192,
            "layer_types": ["chunked_attention" if x else "full_attention" for x in local],
            "no_rope_layers": [int((i + 1) % 4 != 0) for i in range(L)],
            "use_qk_norm": E != 128, "attn_temperature_tuning": True, "attn_scale": 0.1,
            "floor_scale": 8192,
            "rope_parameters": {"rope_type": "default",
                                "rope_theta": float(m("rope.freq_base", 500_000.0))}}


def _glm4moe(m: Callable[..., Any], tensors: dict[str, Any], path: Path) -> dict[str, Any]:
    """GLM-4.5's config: grouped-query attention with partial rotary (rope.dimension_count
    of head_dim), V3's sigmoid routing with the choice bias; block_count counts the
    multi-token-prediction layers llama.cpp appends."""
    n, d = int(m("attention.head_count")), int(m("embedding_length"))
    head_dim = int(m("attention.key_length", d // n))
    return {"model_type": "glm4_moe", **_common(m, tensors),
            "num_hidden_layers": int(m("block_count")) - int(m("nextn_predict_layers", 0)),
            "num_key_value_heads": int(m("attention.head_count_kv", n)),
            "head_dim": head_dim,
            "partial_rotary_factor": int(m("rope.dimension_count", head_dim)) / head_dim,
            "attention_bias": "blk.0.attn_q.bias" in tensors,
            "use_qk_norm": "blk.0.attn_q_norm.weight" in tensors,
            "rope_parameters": _rope(m, path)}


def _common(m: Callable[..., Any], tensors: dict[str, Any]) -> dict[str, Any]:
    """The fields both families write alike: sizes, experts, routing groups, norms."""
    return {"vocab_size": int(tensors["token_embd.weight"].shape[-1]),
            "hidden_size": int(m("embedding_length")),
            "intermediate_size": int(m("feed_forward_length")),
            "moe_intermediate_size": int(m("expert_feed_forward_length")),
            "num_attention_heads": int(m("attention.head_count")),
            "n_routed_experts": int(m("expert_count")),
            "num_experts_per_tok": int(m("expert_used_count")),
            "n_shared_experts": int(m("expert_shared_count", 0)),
            "first_k_dense_replace": int(m("leading_dense_block_count", 0)),
            "rms_norm_eps": float(m("attention.layer_norm_rms_epsilon")),
            "max_position_embeddings": int(m("context_length", 4096)),
            "routed_scaling_factor": float(m("expert_weights_scale", 1.0)),
            "norm_topk_prob": bool(m("expert_weights_norm", False)),
            "n_group": int(m("expert_group_count", 1)),
            "topk_group": int(m("expert_group_used_count", 1)),
            "tie_word_embeddings": "output.weight" not in tensors}


def _deepseek2(m: Callable[..., Any], tensors: dict[str, Any], path: Path) -> dict[str, Any]:
    """The config.json of a `deepseek2` file (m: its `deepseek2.*` metadata): V3 where the
    router scores by sigmoid (with the choice bias exp_probs_b), V2 by softmax."""
    gating = _GATING.get(int(m("expert_gating_func", 1)))
    if gating is None:
        raise ConversionError(f"GGUF file {path}: unsupported expert_gating_func "
                              f"{m('expert_gating_func')!r}")
    v3 = gating == "sigmoid"
    rot = int(m("rope.dimension_count"))
    # Since llama.cpp absorbs the key up-projection (2025), key/value_length describe the
    # latent cache and the per-head sizes moved to *_mla; older files have them plain.
    key, value = (m("attention.key_length_mla", None), m("attention.value_length_mla", None))
    if key is None:
        key, value = m("attention.key_length"), m("attention.value_length")
    hf: dict[str, Any] = {
        "model_type": "deepseek_v3" if v3 else "deepseek_v2", **_common(m, tensors),
        "num_hidden_layers": int(m("block_count")),
        "num_key_value_heads": int(m("attention.head_count")),
        "q_lora_rank": None if m("attention.q_lora_rank", None) is None
        else int(m("attention.q_lora_rank")),
        "kv_lora_rank": int(m("attention.kv_lora_rank")),
        "qk_rope_head_dim": rot, "qk_nope_head_dim": int(key) - rot,
        "v_head_dim": int(value), "scoring_func": gating, "rope_interleave": True,
    }
    hf["topk_method"] = ("noaux_tc" if v3 else "group_limited_greedy" if hf["n_group"] > 1
                         else "greedy")
    hf["rope_parameters"] = _rope(m, path)
    return hf


def _rope(m: Callable[..., Any], path: Path) -> dict[str, Any]:
    """rope_parameters: the base, and YaRN where the file says so."""
    rope: dict[str, Any] = {"rope_type": "default",
                            "rope_theta": float(m("rope.freq_base", 10_000.0))}
    kind = m("rope.scaling.type", None)
    if kind == "yarn":
        rope.update(rope_type="yarn", factor=float(m("rope.scaling.factor")),
                    original_max_position_embeddings=int(
                        m("rope.scaling.original_context_length")),
                    beta_fast=float(m("rope.scaling.yarn_beta_fast", 32.0)),
                    beta_slow=float(m("rope.scaling.yarn_beta_slow", 1.0)))
        if log_mul := m("rope.scaling.yarn_log_multiplier", None):
            # DeepSeek's 0.1 * mscale_all_dim (llama.cpp's deepseek2 convention); the file
            # drops mscale, which every release sets equal to it
            rope.update(mscale=float(log_mul) / 0.1, mscale_all_dim=float(log_mul) / 0.1)
    elif kind not in (None, "none"):
        raise ConversionError(f"GGUF file {path}: unsupported RoPE scaling {kind!r}")
    return rope


class HFView:
    """A GGUF file's tensors under Hugging Face names, as float32 in HF's [out, in] order:
    the reader interface convert/safetensors.py builds weights from (no FP8 or MXFP4
    here: GGUF blocks are dequantized as read)."""

    prefix, embed, lm_head, heads, fp8_block, has_mxfp4 = (
        "model.", "model.embed_tokens.weight", "lm_head.weight", 0, None, False)

    def __init__(self, tensors: dict[str, Any], get: Callable[..., np.ndarray], path: Path,
                 arch: str, kind: str, num_layers: int, num_experts: int):
        import gguf

        self.tensors, self._get, self.path, self.kind = tensors, get, path, kind
        by_name = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
        self._names = gguf.get_tensor_name_map(by_name[arch], num_layers)
        self._E = num_experts

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
        src = self._source(name)
        if name.endswith("experts.gate_up_proj"):  # Llama 4's [E, D, 2F], inputs first
            gate, up = (self._whole(src.replace("gate", part)) for part in ("gate", "up"))
            return np.concatenate([gate, up], axis=1).swapaxes(1, 2)
        if name.endswith("experts.down_proj"):  # Llama 4's [E, F, D]
            return self._whole(src).swapaxes(1, 2)
        if e := _EXPERT.fullmatch(name):  # one expert, its rows only dequantized: the
            return self._expert(src, int(e[3]))  # converter reads expert by expert
        if src.endswith("attn_kv_b.weight") and src not in self.tensors:
            # llama.cpp's split: k_b [N, R, Hn] (transposed) and v_b [N, Hv, R]
            k_b, v_b = (self._whole(src.replace("attn_kv_b", part))
                        for part in ("attn_k_b", "attn_v_b"))
            kv_b = np.concatenate([k_b.swapaxes(1, 2), v_b], axis=1)
            return kv_b.reshape(-1, kv_b.shape[-1])
        return self._whole(src)

    def _whole(self, src: str) -> np.ndarray:
        """A GGUF tensor as float32 in numpy order."""
        return self._get(src, shape_of(self.tensors[src]))

    def _expert(self, src: str, e: int) -> np.ndarray:
        """Expert e of the layer's experts `src` ([out, in]): its slice of the stacked
        tensor, or its own tensor in older files."""
        import gguf

        parts = expert_tensors(self.tensors, src, self._E)
        if len(parts) > 1:
            return self._whole(parts[e].name)
        t = parts[0]
        try:
            a = gguf.quants.dequantize(t.data[e], t.tensor_type)
        except (ValueError, NotImplementedError, IndexError) as err:
            raise ConversionError(f"cannot read expert {e} of tensor {src!r} in {self.path}: "
                                  f"{err}") from err
        return np.asarray(a, np.float32).reshape(shape_of(t)[1:])

    def _source(self, name: str) -> str:
        """The GGUF tensor that holds HF `name`, by the `gguf` package's name table
        (ConversionError if the file has none)."""
        if e := _EXPERT.fullmatch(name):  # the experts llama.cpp stacks
            name = f"model.layers.{e[1]}.{e[2]}.experts.{e[4]}.weight"
        # (llama.cpp's converter renames DeepSeek's choice bias before mapping it)
        name = name.replace("e_score_correction_bias", "e_score_correction.bias")
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):  # Llama 4's, split
            name = name.replace("gate_up_proj", "gate_proj") + ".weight"  # by llama.cpp
        src = self._names.get_name(name, try_suffixes=(".weight", ".bias"))
        kv_b_split = src is not None and src.endswith("attn_kv_b.weight") and (
            src.replace("attn_kv_b", "attn_k_b") in self.tensors)
        if src is None or not (src in self.tensors or kv_b_split or "_exps." in src
                               and expert_tensors(self.tensors, src, self._E)):
            raise ConversionError(f"GGUF file {self.path} has no tensor for {name!r}")
        return src

