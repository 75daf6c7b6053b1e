"""Hugging Face Llama-family, Gemma and mixture-of-experts directories (config.json +
safetensors) into the weight tree (a multimodal Gemma 3 or Mistral 3: its language model).
Cohere's and GLM's interleaved q/k rows are reordered to rotate-half as they are read
(layout.py); MXFP4 experts (gpt-oss) and block-FP8 weights (DeepSeek V3, Qwen3 FP8) are
decoded (hf_quant.py); other quantized checkpoints (GPTQ, AWQ, ...) are refused by name.

Read with safetensors' numpy framework, which holds bfloat16 through ml_dtypes, so no torch
is needed. Sharded checkpoints are found through `model.safetensors.index.json`. Tensors are
read one at a time into preallocated stacked arrays, so peak memory is one float32 copy.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from jaxinfer.config import (
    COHERE_TYPES,
    DEEPSEEK_TYPES,
    GEMMA_TYPES,
    GLM_TYPES,
    MOE_TYPES,
    ModelConfig,
)
from jaxinfer.convert import hf_quant
from jaxinfer.convert.layout import neox_qkv_split, rope_tail_to_half, to_rotate_half
from jaxinfer.convert.stacks import (
    IN_MEMORY,
    Stack,
    Storage,
    quantize_embeddings,
    results,
    source_groups,
    stacks,
)
from jaxinfer.errors import ConfigError, ConversionError
from jaxinfer.quant import QuantConfig
from jaxinfer.weights import check_weights, weight_specs

log = logging.getLogger(__name__)

_MODEL_TYPES = ("llama", "mistral", "mistral3", "ministral", "ministral3", "qwen2", "qwen3",
                "phi", "phi3", "smollm3", "granite", "olmo2", "exaone4", "ernie4_5", "stablelm",
                "starcoder2", "gpt_neox",
                "llama4", "llama4_text", *COHERE_TYPES, *GLM_TYPES, *GEMMA_TYPES, *MOE_TYPES)

# Phi-3 fuses q/k/v and gate/up into one matrix each: part -> (fused module, the part's
# place in units of its own rows, from the start or the end: k and v are the same size,
# as are gate and up). GPT-NeoX fuses q/k/v as attention.query_key_value, per head
# ([N, 3, H] rows), regrouped to [3, N, H] as read.
FUSED = {"self_attn.q_proj": ("self_attn.qkv_proj", 0), "self_attn.k_proj":
          ("self_attn.qkv_proj", -2), "self_attn.v_proj": ("self_attn.qkv_proj", -1),
          "mlp.gate_proj": ("mlp.gate_up_proj", 0), "mlp.up_proj": ("mlp.gate_up_proj", -1)}
# Where a checkpoint keeps its decoder: text-only models under "model.", multimodal Gemma 3
# under "language_model.model." (transformers 4) or "model.language_model." (5).
_PREFIXES = ("model.", "language_model.model.", "model.language_model.")

Progress = Callable[[int, int], None]
# safetensors' float8 dtypes -> ml_dtypes' names (block-FP8 weights and E8M0 scales)
_FLOAT8 = {"F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu"}
# quantization_config.quant_method values read: decoded to float as they are read, or
# (gguf: a model transformers dequantized from a GGUF file and saved) float already
_QUANT_METHODS = ("fp8", "fbgemm_fp8", "compressed-tensors", "mxfp4", "gguf")


def load_hf_dir(path: str | Path, progress: Progress | None = None,
                quant: QuantConfig | None = None, storage: Storage = IN_MEMORY
                ) -> tuple[ModelConfig, dict]:
    """Read a Hugging Face model directory into `(config, weights)` (float numpy arrays
    held per `storage`, or with `quant` QArrays quantized layer by layer as they are read:
    convert/stacks.py).

    `progress(done, total)` is called after each layer. Raises ConversionError naming the
    path when the directory, its config or its tensors are missing or unsupported.
    """
    path = Path(path)
    if not path.is_dir():
        raise ConversionError(f"not a Hugging Face model directory: {path}")
    hf = _read_json(path / "config.json", required=True)
    kind = hf.get("model_type")
    if kind not in _MODEL_TYPES:
        raise ConversionError(f"unsupported model_type {kind!r} in {path / 'config.json'} "
                              f"(supported: {', '.join(_MODEL_TYPES)})")
    qc = hf.get("quantization_config") or {}
    method = qc.get("quant_method")
    if method is not None and method not in _QUANT_METHODS:
        raise ConversionError(f"{path / 'config.json'}: quantization_config quant_method "
                              f"{method!r} is not supported (supported: "
                              f"{', '.join(_QUANT_METHODS)}; or an unquantized copy)")
    if method == "compressed-tensors" and qc.get("format") != "float-quantized":
        raise ConversionError(f"{path / 'config.json'}: compressed-tensors format "
                              f"{qc.get('format')!r} is not supported (only float-quantized: "
                              f"FP8 weights)")
    reader = _Reader(path, kind)
    try:
        cfg = ModelConfig.from_hf(hf)
    except ConfigError as e:
        raise ConversionError(f"{path / 'config.json'}: {e}") from e
    for extra in ("self_attn.o_proj.bias", "mlp.down_proj.bias"):
        if f"{reader.prefix}layers.0.{extra}" in reader and not (
                cfg.linear_bias or cfg.attn_out_bias and extra.startswith("self_attn")):
            raise ConversionError(f"{path}: unsupported tensor {reader.prefix}layers.0.{extra}")
    eos = list(cfg.eos_token_ids)
    gen_eos = _read_json(path / "generation_config.json").get("eos_token_id")
    eos += gen_eos if isinstance(gen_eos, list) else [] if gen_eos is None else [gen_eos]
    tok_cfg = _read_json(path / "tokenizer_config.json")
    cfg = cfg.replace(
        tie_embeddings=cfg.tie_embeddings or reader.lm_head not in reader,
        qkv_bias=f"{reader.prefix}layers.0.self_attn.q_proj.bias" in reader,
        eos_token_ids=tuple(dict.fromkeys(int(e) for e in eos)),
        add_bos=bool(tok_cfg.get("add_bos_token", False)))
    return cfg, reader_weights(cfg, reader, progress, quant, storage)


def reader_weights(cfg: ModelConfig, reader: Any, progress: Progress | None = None,
                   quant: QuantConfig | None = None, storage: Storage = IN_MEMORY) -> dict:
    """The weight tree of `cfg` read through `reader` (a `_Reader`, or anything serving
    tensors under their Hugging Face names the same way: a GGUF file's, convert/gguf_hf.py)."""
    quant = source_groups(cfg, quant, reader.fp8_block, reader.has_mxfp4)
    try:
        weights = quantize_embeddings(_weights(cfg, reader, progress,
                                               _MOE_EXPERTS.get(reader.kind), quant, storage),
                                      quant)
        check_weights(weight_specs(cfg, quant=quant), weights)
    except ConfigError as e:
        raise ConversionError(f"{reader.path}: {e}") from e
    return weights


def _fp8_block(qc: dict[str, Any]) -> tuple[int, int] | None:
    """FP8 scale blocks [out, in]: `weight_block_size` (fp8), or a compressed-tensors group's
    `block_structure`; None: per channel or tensor."""
    block = qc.get("weight_block_size")
    for group in (qc.get("config_groups") or {}).values():
        block = block or (group.get("weights") or {}).get("block_structure")
    return tuple(int(b) for b in block) if block else None


def _read_json(file: Path, required: bool = False) -> dict[str, Any]:
    if not file.exists() and not required:
        return {}
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise ConversionError(f"cannot read {file}: {e}") from e


def fused_rows(at: int, rows: int, total: int) -> slice:
    """The rows of a part (`FUSED`) of `rows` rows in a fused matrix of `total` rows."""
    start = at * rows if at >= 0 else total + at * rows
    return slice(start, start + rows)


class _Reader:
    """Tensor name -> float32 array across one or many safetensors files."""

    def __init__(self, path: Path, kind: str = "llama"):
        from safetensors import safe_open

        self.kind = kind  # the config's model_type
        index = path / "model.safetensors.index.json"
        if index.exists():
            files = sorted(set(_read_json(index).get("weight_map", {}).values()))
        elif (path / "model.safetensors").exists():
            files = ["model.safetensors"]
        else:
            files = sorted(p.name for p in path.glob("*.safetensors"))
        if not files:
            raise ConversionError(f"no safetensors weights in {path}")
        self.path, self._where, self._files, self._headers = path, {}, {}, {}
        self._last: tuple[str | None, np.ndarray | None] = (None, None)
        self._open = []
        for name in files:
            try:
                f = safe_open(str(path / name), framework="numpy")
            except Exception as e:  # safetensors raises its own SafetensorError / OSError
                raise ConversionError(f"cannot read {path / name}: {e}") from e
            self._open.append(f)
            self._files[id(f)] = path / name
            self._where.update((k, f) for k in f.keys())
        self.prefix = next((p for p in _PREFIXES if f"{p}embed_tokens.weight" in self._where),
                           "model.")
        self.embed = self.prefix + "embed_tokens.weight"
        self.lm_head = ("language_model.lm_head.weight" if self.prefix == "language_model.model."
                        else "lm_head.weight")
        hf = _read_json(path / "config.json")
        self.heads = 0  # GPT-NeoX: its heads, to regroup the fused q/k/v rows
        if kind == "gpt_neox":
            self.prefix, self.embed, self.lm_head = ("gpt_neox.", "gpt_neox.embed_in.weight",
                                                     "embed_out.weight")
            self.heads = int(hf.get("num_attention_heads", 0))
        self.fp8_block = _fp8_block(hf.get("quantization_config") or {})  # [out, in]

    def __contains__(self, name: str) -> bool:
        return name in self._where or self._fused(name) is not None

    def get(self, name: str, shape: tuple[int, ...], reshape: bool = False) -> np.ndarray:
        """The tensor as float32 of `shape` (a leading -1: any length); `reshape` takes any
        shape of as many values (norm weights per head: [N * H] or [N, H])."""
        if name not in self._where and (fused := self._fused(name)):
            whole, at = fused
            if self._last[0] != whole:  # read once for its two or three parts
                a = self.get(whole, (-1, *shape[1:]))
                if self.kind == "gpt_neox":  # [N, 3, H] rows -> [3, N, H]
                    a = neox_qkv_split(a, self.heads)
                self._last = (whole, a)
            return self._last[1][fused_rows(at, shape[0], len(self._last[1]))]
        if name not in self._where and name + "_blocks" in self._where:  # MXFP4 (gpt-oss)
            try:  # stored [..., out, in] in blocks along in; ours inputs first
                a = hf_quant.mxfp4_dequantize(self._raw(name + "_blocks"),
                                              self._raw(name + "_scales")).swapaxes(-1, -2)
            except ValueError as e:
                raise ConversionError(f"{self.path}: MXFP4 tensor {name!r}: {e}") from e
        elif name not in self._where:
            raise ConversionError(f"{self.path} lacks tensor {name!r}")
        elif (scale := self._fp8_scale(name)) is not None:  # FP8 (DeepSeek V3, Qwen3 FP8, ...)
            try:
                a = hf_quant.fp8_dequantize(self._raw(name), self._raw(scale), self.fp8_block)
            except ValueError as e:
                raise ConversionError(f"{self.path}: FP8 tensor {name!r}: {e}") from e
        else:
            a = self._raw(name).astype(np.float32)
        if reshape and a.size == int(np.prod(shape)):
            a = a.reshape(shape)
        if a.shape != shape and not (shape[0] == -1 and a.shape[1:] == shape[1:]):
            raise ConversionError(f"tensor {name!r} in {self.path} has shape {a.shape}, "
                                  f"expected {shape}")
        return a

    @property
    def has_mxfp4(self) -> bool:
        """Whether some weight is stored as MXFP4 blocks (gpt-oss's experts)."""
        return any(n.endswith("_blocks") and n[:-7] + "_scales" in self._where
                   for n in self._where)

    def fp8_scales(self, name: str, shape: tuple[int, ...]) -> np.ndarray | None:
        """Each element's scale (float32 of `shape`, HF's [out, in]) of a weight stored in
        FP8, or None when it is not: with `get`'s values, what `Stack.set_scaled` keeps
        exactly."""
        if name not in self._where or (scale := self._fp8_scale(name)) is None:
            return None
        try:
            s = hf_quant.fp8_scales(self._where[name].get_slice(name).get_shape(),
                                    self._raw(scale), self.fp8_block)
        except ValueError as e:
            raise ConversionError(f"{self.path}: FP8 tensor {name!r}: {e}") from e
        return np.broadcast_to(s, shape)

    def _fp8_scale(self, name: str) -> str | None:
        """The scales' name of a float8 weight: `_scale_inv` (block FP8) or `_scale`
        (per channel or tensor: compressed-tensors, fbgemm)."""
        if name + "_scale_inv" in self._where:
            return name + "_scale_inv"
        f = self._where[name]
        if name + "_scale" in self._where and f.get_slice(name).get_dtype() in _FLOAT8:
            return name + "_scale"
        return None

    def mxfp4(self, name: str, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray] | None:
        """An MXFP4 weight kept quantized, inputs first like `get`: exact int8 values of
        `shape` [..., in, out] and float32 scales [..., in / 32, out]; None when `name` is
        not stored as MXFP4."""
        if name in self._where or name + "_blocks" not in self._where:
            return None
        try:
            v, s = hf_quant.mxfp4_int8(self._raw(name + "_blocks"), self._raw(name + "_scales"))
        except ValueError as e:
            raise ConversionError(f"{self.path}: MXFP4 tensor {name!r}: {e}") from e
        v, s = v.swapaxes(-1, -2), s.swapaxes(-1, -2)
        if v.shape != shape:
            raise ConversionError(f"tensor {name!r} in {self.path} has shape {v.shape}, "
                                  f"expected {shape}")
        return v, s

    def _raw(self, name: str) -> np.ndarray:
        """The tensor as stored (its own dtype; float8 through ml_dtypes)."""
        if name not in self._where:
            raise ConversionError(f"{self.path} lacks tensor {name!r}")
        f = self._where[name]
        try:
            if f.get_slice(name).get_dtype() in _FLOAT8:  # safetensors' numpy loader has none
                return self._float8(f, name)
            return np.asarray(f.get_tensor(name))
        except ConversionError:
            raise
        except Exception as e:  # truncated or corrupt file
            raise ConversionError(f"cannot read tensor {name!r} in {self.path}: {e}") from e

    def _float8(self, f: Any, name: str) -> np.ndarray:
        """A float8 tensor's bytes, found through the file's header (its 8-byte length, then
        JSON naming each tensor's dtype, shape and byte range after the header)."""
        import ml_dtypes

        file = self._files[id(f)]
        with open(file, "rb") as fh:
            if file not in self._headers:  # parsed once per file
                n = int.from_bytes(fh.read(8), "little")
                self._headers[file] = (8 + n, json.loads(fh.read(n)))
            start, header = self._headers[file]
            meta = header[name]
            begin, end = meta["data_offsets"]
            fh.seek(start + begin)
            data = np.frombuffer(fh.read(end - begin), np.uint8)
        return data.view(getattr(ml_dtypes, _FLOAT8[meta["dtype"]])).reshape(meta["shape"])

    def _fused(self, name: str) -> tuple[str, int] | None:
        """(the fused tensor holding `name`, which part) when the file fuses it (Phi-3,
        GPT-NeoX: its biases too)."""
        for part, (whole, at) in FUSED.items():
            if self.kind == "gpt_neox" and whole == "self_attn.qkv_proj":
                whole = "attention.query_key_value"
            for suffix in (".weight", ".bias"):
                if name.endswith(f".{part}{suffix}"):
                    fused = name.removesuffix(f"{part}{suffix}") + whole + suffix
                    return (fused, at) if fused in self._where else None
        return None


# Families with a plain (ungated) MLP: their attention output, MLP up and MLP down modules.
_PLAIN_MLP = {"starcoder2": ("self_attn.o_proj", "mlp.c_fc", "mlp.c_proj"),
              "phi": ("self_attn.dense", "mlp.fc1", "mlp.fc2"),
              "gpt_neox": ("attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")}


# Each projection of a layer: HF module -> (weight-tree key, our shape, how many of its
# leading dims are inputs). Shared with LoRA adapters (convert/lora.py), whose deltas are
# HF [out, in] matrices too; they name no model_type (`kind` None), so a plain MLP takes
# every family's module names.
# A mixture-of-experts model has no dense MLP projections (its experts: _MOE_EXPERTS).
def hf_linears(cfg: ModelConfig, kind: str | None = None
               ) -> dict[str, tuple[str, tuple[int, ...], int]]:
    D, F, N, K, H = cfg.d_model, cfg.mlp_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    if cfg.kv_lora_rank:  # DeepSeek (kv_b_proj, split in two, is read on its own)
        Hq, R, Rq = cfg.qk_nope_dim + cfg.rope_dim, cfg.kv_lora_rank, cfg.q_lora_rank
        q = ({"self_attn.q_a_proj": ("wq_a", (D, Rq), 1),
              "self_attn.q_b_proj": ("wq_b", (Rq, N, Hq), 1)} if Rq
             else {"self_attn.q_proj": ("wq", (D, N, Hq), 1)})
        return {**q, "self_attn.kv_a_proj_with_mqa": ("wkv_a", (D, R + cfg.rope_dim), 1),
                "self_attn.o_proj": ("wo", (N, cfg.v_head_dim, D), 2)}
    out = {"self_attn.q_proj": ("wq", (D, N, H), 1), "self_attn.k_proj": ("wk", (D, K, H), 1),
           "self_attn.v_proj": ("wv", (D, K, H), 1)}
    if cfg.mlp_gated:
        out["self_attn.o_proj"] = ("wo", (N, H, D), 2)
        if not cfg.num_experts:
            out.update({"mlp.gate_proj": ("w_gate", (D, F), 1),
                        "mlp.up_proj": ("w_up", (D, F), 1),
                        "mlp.down_proj": ("w_down", (F, D), 1)})
        return out
    for o, up, down in [_PLAIN_MLP[kind]] if kind in _PLAIN_MLP else _PLAIN_MLP.values():
        out.update({o: ("wo", (N, H, D), 2), up: ("w_up", (D, F), 1),
                    down: ("w_down", (F, D), 1)})
    return out


# model_type -> (the MoE block's module, its router, each expert's gate / up / down names)
_MOE_EXPERTS = {"mixtral": ("block_sparse_moe", "gate", ("w1", "w3", "w2")),
                "phimoe": ("block_sparse_moe", "gate", ("w1", "w3", "w2")),
                "minimax_m2": ("block_sparse_moe", "gate", ("w1", "w3", "w2")),
                "qwen2_moe": ("mlp", "gate", ("gate_proj", "up_proj", "down_proj")),
                "qwen3_moe": ("mlp", "gate", ("gate_proj", "up_proj", "down_proj")),
                "olmoe": ("mlp", "gate", ("gate_proj", "up_proj", "down_proj")),
                # Granite MoE stacks its experts: input_linear [E, 2F, D] (gate, then up)
                # and output_linear [E, D, F]
                "granitemoe": ("block_sparse_moe", "router.layer", None),
                # Llama 4 stacks them inputs first: gate_up_proj [E, D, 2F], down_proj
                # [E, F, D] (a multimodal checkpoint's model_type is llama4)
                "llama4_text": ("feed_forward", "router", "in_out"),
                "llama4": ("feed_forward", "router", "in_out"),
                # gpt-oss: the same, gate and up interleaved, with biases
                "gpt_oss": ("mlp", "router", "in_out"),
                **{kind: ("mlp", "gate", ("gate_proj", "up_proj", "down_proj"))
                   for kind in (*DEEPSEEK_TYPES, "glm4_moe")}}


_MOE_EXPERTS_PLURAL = (*DEEPSEEK_TYPES, "glm4_moe")  # their shared expert: "shared_experts"
EXPERT_KEYS = ("moe_gate", "moe_up", "moe_down", "moe_b_gate", "moe_b_up", "moe_b_down")


def hf_shape(shape: tuple[int, ...], n_in: int) -> tuple[int, int]:
    """HF's [out, in] shape of a weight of ours."""
    return int(np.prod(shape[n_in:])), int(np.prod(shape[:n_in]))


def from_hf_matrix(m: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """An HF linear weight [out, in] in our layout: inputs first, heads split."""
    return m.T.reshape(shape)


def _weights(cfg: ModelConfig, r: _Reader, progress: Progress | None,
             moe: tuple[str, str, tuple[str, str, str] | str | None] | None = None,
             quant: QuantConfig | None = None, storage: Storage = IN_MEMORY) -> dict:
    L, D, F, N, K, H, V = (cfg.num_layers, cfg.d_model, cfg.mlp_dim, cfg.num_heads,
                           cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size)
    E = cfg.num_experts
    linears = hf_linears(cfg, r.kind)
    shapes = {"attn_norm": (D,), "mlp_norm": (D,),
              **{key: shape for key, shape, _ in linears.values()}}
    if E:
        shapes.update(router=(D, E), moe_gate=(E, D, F), moe_up=(E, D, F), moe_down=(E, F, D))
        if cfg.router_bias:
            shapes["router_b"] = (E,)
        if cfg.linear_bias:  # gpt-oss's experts' biases
            shapes.update(moe_b_gate=(E, F), moe_b_up=(E, F), moe_b_down=(E, D))
    Fs = cfg.shared_expert_dim
    shared = {"shared_gate": ("gate_proj", (D, Fs)), "shared_up": ("up_proj", (D, Fs)),
              "shared_down": ("down_proj", (Fs, D))} if Fs else {}
    shapes.update({key: shape for key, (_, shape) in shared.items()})
    if cfg.shared_expert_gate:
        shapes.update(shared_router=(D,))
    # Gemma 2/3 sandwich each block: their post_attention_layernorm is the attention output's
    # norm and pre_feedforward_layernorm the MLP's input norm (Llama's post_attention one).
    norms = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}
    if cfg.shared_input_norm:  # Cohere, StableLM 2 12B: one norm before both
        norms = {"attn_norm": "input_layernorm"}
        del shapes["mlp_norm"]
    if cfg.post_norms:
        norms = {"attn_norm": "input_layernorm", "post_attn_norm": "post_attention_layernorm",
                 "mlp_norm": "pre_feedforward_layernorm",
                 "post_mlp_norm": "post_feedforward_layernorm"}
        if r.kind == "glm4":  # the same sandwich, named its own way
            norms = {"attn_norm": "input_layernorm", "post_attn_norm": "post_self_attn_layernorm",
                     "mlp_norm": "post_attention_layernorm", "post_mlp_norm": "post_mlp_layernorm"}
        shapes.update(post_attn_norm=(D,), post_mlp_norm=(D,))
    if not cfg.pre_norms:  # OLMo 2: the output norms only
        norms = {"post_attn_norm": "post_attention_layernorm",
                 "post_mlp_norm": "post_feedforward_layernorm"}
        del shapes["attn_norm"], shapes["mlp_norm"]
    if cfg.qkv_bias:
        shapes.update(bq=(N, H), bk=(K, H), bv=(K, H))
    if cfg.attn_sinks:
        shapes["sinks"] = (N,)
    if cfg.router_choice_bias:
        shapes["router_choice_b"] = (E,)
    R, Hn = cfg.kv_lora_rank, cfg.qk_nope_dim
    if R:  # latent attention's norms and its key / value up-projections
        shapes.update(kv_a_norm=(R,), w_uk=(N, Hn, R), w_uv=(N, R, cfg.v_head_dim))
        if cfg.q_lora_rank:
            shapes["q_a_norm"] = (cfg.q_lora_rank,)
    qk_norm = ((N, H), (K, H)) if cfg.qk_norm_heads else ((H,), (H,))  # per head
    if cfg.qk_norm:
        shapes.update(q_norm=qk_norm[0], k_norm=qk_norm[1])
    if cfg.norm_bias:  # StableLM's, StarCoder2's and Phi-2's LayerNorms
        shapes.update({key + "_bias": (D,) for key in norms})
    biases = ({"wo": "bo", "w_up": "b_up", "w_down": "b_down"} if cfg.linear_bias
              else {"wo": "bo"} if cfg.attn_out_bias else {})
    biases = {k: b for k, b in biases.items() if k in shapes}  # (experts: wo's only)
    shapes.update({b: shapes[key][-1:] for key, b in biases.items()})
    # Dense layers of a mixture of experts (DeepSeek's leading ones, Maverick's in between):
    # the same but a dense MLP in the MoE block's place, in a stack of their own
    k, Fd, block = cfg.num_dense_layers, cfg.dense_mlp_dim, moe[0] if moe else "mlp"
    dense_linears = {**linears, f"{block}.gate_proj": ("w_gate", (D, Fd), 1),
                     f"{block}.up_proj": ("w_up", (D, Fd), 1),
                     f"{block}.down_proj": ("w_down", (Fd, D), 1)}
    moe_only = ("router", "router_b", "router_choice_b", "shared_router", *EXPERT_KEYS, *shared)
    dense_shapes = {**{n: s for n, s in shapes.items() if n not in moe_only},
                    **{key: shape for key, shape, _ in dense_linears.values()}}
    layers, dense = (stacks(shapes, L - k, quant, storage),
                     stacks(dense_shapes, k, quant, storage))
    # Cohere and GLM pair RoPE dims interleaved: their q/k rows (weights, biases, norms)
    # are reordered to rotate-half
    half = ((lambda m, heads: to_rotate_half(m, heads, cfg.rope_dim)) if cfg.rope_interleaved
            else (lambda m, heads: m))
    for n in range(L):
        stack, i = cfg.layer_slot(n)
        p, x = f"{r.prefix}layers.{n}.", dense if stack == "dense_layers" else layers
        for key, hf_name in norms.items():
            x[key][i] = r.get(p + hf_name + ".weight", (D,))
            if cfg.norm_bias:
                x[key + "_bias"][i] = r.get(p + hf_name + ".bias", (D,))
        for module, (key, shape, n_in) in (dense_linears if x is dense else linears).items():
            tf = None  # the rows reordered first (q and k: RoPE's pairs; as the scales)
            if R and cfg.rope_interleaved and key in ("wq", "wq_b", "wkv_a"):
                tf = lambda a, key=key: rope_tail_to_half(
                    a, *((1, R) if key == "wkv_a" else (N, Hn)))
            elif key in ("wq", "wk"):
                tf = lambda a, shape=shape: half(a, shape[1])
            _put_hf(x[key], i, r, p + module + ".weight", shape, hf_shape(shape, n_in), tf)
            if key in biases:
                x[biases[key]][i] = r.get(p + module + ".bias", shape[-1:])
        if R:
            _latent(cfg, r, p, x, i)
        if E and x is layers:
            block, router, names = moe
            x["router"][i] = r.get(f"{p}{block}.{router}.weight", (E, D)).T
            if names == "in_out":  # stacked inputs first (Llama 4, gpt-oss)
                q = f"{p}{block}.experts."  # (gpt-oss's released MXFP4 experts decoded)
                halves = (np.s_[..., ::2], np.s_[..., 1::2]) if r.kind == "gpt_oss" else (
                    np.s_[..., :F], np.s_[..., F:])  # gpt-oss interleaves gate and up
                exact = (x["moe_gate"].takes_groups(hf_quant.MXFP4_BLOCK)
                         and r.mxfp4(q + "gate_up_proj", (E, D, 2 * F)))
                if exact:  # MXFP4 into int8 groups of 32, as they are (hf_quant.py)
                    v, sc = exact
                    for key, cols in zip(("moe_gate", "moe_up"), halves, strict=True):
                        x[key].set_quantized(i, v[cols], sc[cols])
                    x["moe_down"].set_quantized(i, *r.mxfp4(q + "down_proj", (E, F, D)))
                else:
                    gate_up = r.get(q + "gate_up_proj", (E, D, 2 * F))
                    x["moe_gate"][i], x["moe_up"][i] = gate_up[halves[0]], gate_up[halves[1]]
                    x["moe_down"][i] = r.get(q + "down_proj", (E, F, D))
                if cfg.linear_bias:
                    b = r.get(q + "gate_up_proj_bias", (E, 2 * F))
                    x["moe_b_gate"][i], x["moe_b_up"][i] = b[halves[0]], b[halves[1]]
                    x["moe_b_down"][i] = r.get(q + "down_proj_bias", (E, D))
                if cfg.router_bias:
                    x["router_b"][i] = r.get(f"{p}{block}.{router}.bias", (E,))
            elif names is None:  # stacked (Granite MoE)
                gate_up = r.get(f"{p}{block}.input_linear.weight", (E, 2 * F, D))
                x["moe_gate"][i] = gate_up[:, :F].swapaxes(1, 2)
                x["moe_up"][i] = gate_up[:, F:].swapaxes(1, 2)
                x["moe_down"][i] = r.get(f"{p}{block}.output_linear.weight",
                                         (E, D, F)).swapaxes(1, 2)
            else:
                for e in range(E):
                    q = f"{p}{block}.experts.{e}."
                    for key, name, shape in zip(("moe_gate", "moe_up", "moe_down"), names,
                                                ((D, F), (D, F), (F, D)), strict=True):
                        _put_hf(x[key], (i, e), r, q + name + ".weight", shape)
            if cfg.router_choice_bias:  # DeepSeek V3's (under its router), MiniMax-M2's
                at = f"{p}{block}." if r.kind == "minimax_m2" else f"{p}{block}.{router}."
                x["router_choice_b"][i] = r.get(at + "e_score_correction_bias", (E,))
            shared_name = "shared_experts" if r.kind in _MOE_EXPERTS_PLURAL else "shared_expert"
            for key, (name, shape) in shared.items():  # Qwen2-MoE's, DeepSeek's shared expert
                _put_hf(x[key], i, r, f"{p}{block}.{shared_name}.{name}.weight", shape)
            if cfg.shared_expert_gate:
                x["shared_router"][i] = r.get(f"{p}{block}.shared_expert_gate.weight",
                                              (1, D))[0]
        if cfg.qk_norm:
            for key, shape in zip(("q_norm", "k_norm"), qk_norm, strict=True):
                w = _qk_norm(r, p, key, shape)  # flat: [heads * H]
                x[key][i] = half(w, len(w) // H).reshape(shape)
        if cfg.qkv_bias:
            x["bq"][i] = half(r.get(p + "self_attn.q_proj.bias", (N * H,)), N).reshape(N, H)
            x["bk"][i] = half(r.get(p + "self_attn.k_proj.bias", (K * H,)), K).reshape(K, H)
            x["bv"][i] = r.get(p + "self_attn.v_proj.bias", (K * H,)).reshape(K, H)
        if cfg.attn_sinks:  # gpt-oss
            x["sinks"][i] = r.get(p + "self_attn.sinks", (N,))
        if progress:
            progress(n + 1, L)
    final = r.prefix + {"phi": "final_layernorm", "gpt_neox": "final_layer_norm"}.get(r.kind,
                                                                                     "norm")
    weights = {"embed": storage.put(r.get(r.embed, (V, D))), "layers": results(layers),
               "final_norm": r.get(final + ".weight", (D,))}
    if k:
        weights["dense_layers"] = results(dense)
    if cfg.norm_bias:
        weights["final_norm_bias"] = r.get(final + ".bias", (D,))
    if cfg.lm_head_bias:  # Phi-2
        weights["lm_head_bias"] = r.get(r.lm_head.removesuffix("weight") + "bias", (V,))
    if not cfg.tie_embeddings:
        weights["lm_head"] = storage.put(np.ascontiguousarray(r.get(r.lm_head, (V, D)).T))
    return weights


def _put_hf(stack: Stack, index: Any, r: _Reader, name: str, shape: tuple[int, ...],
            hf: tuple[int, int] | None = None,
            tf: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
    """An HF linear weight (`hf` [out, in], default `shape` reversed), its rows reordered
    by `tf`, into `stack[index]` in our layout `shape`; its FP8 values and scales kept as
    they are where the stack is float8 (see `_put`)."""
    m = r.get(name, hf or shape[::-1])
    scales = r.fp8_scales(name, m.shape) if stack.takes_scales else None
    ours = lambda a: from_hf_matrix(a if tf is None else tf(a), shape)
    _put(stack, index, ours(m), None if scales is None else ours(scales), name)


def _put(stack: Stack, index: Any, w: np.ndarray, scales: np.ndarray | None,
         name: str) -> None:
    """`stack[index] = w`, or with an FP8 weight's per-element `scales` its exact values;
    an FP8 weight whose scales the stack's groups cannot hold is requantized, and said."""
    if scales is None:
        stack[index] = w
    elif not stack.set_scaled(index, w, scales):
        log.warning("%s: its FP8 scales do not fit --group_size=%s groups; requantized",
                    name, stack.spec.group_size)
        stack[index] = w


def _latent(cfg: ModelConfig, r: _Reader, p: str, x: dict, i: int) -> None:
    """One layer's latent attention norms and kv_b_proj [N * (Hn + Hv), R], split into the
    key up-projection w_uk [N, Hn, R] (absorbed into queries) and w_uv [N, R, Hv]."""
    N, Hn, Hv, R = cfg.num_heads, cfg.qk_nope_dim, cfg.v_head_dim, cfg.kv_lora_rank
    x["kv_a_norm"][i] = r.get(p + "self_attn.kv_a_layernorm.weight", (R,))
    if cfg.q_lora_rank:
        x["q_a_norm"][i] = r.get(p + "self_attn.q_a_layernorm.weight", (cfg.q_lora_rank,))
    name = p + "self_attn.kv_b_proj.weight"
    kv_b = r.get(name, (N * (Hn + Hv), R)).reshape(N, Hn + Hv, R)
    s = r.fp8_scales(name, (N * (Hn + Hv), R)) if x["w_uk"].takes_scales else None
    s = None if s is None else s.reshape(N, Hn + Hv, R)
    _put(x["w_uk"], i, kv_b[:, :Hn], None if s is None else s[:, :Hn], name)
    _put(x["w_uv"], i, kv_b[:, Hn:].swapaxes(1, 2),
         None if s is None else s[:, Hn:].swapaxes(1, 2), name)


def _qk_norm(r: _Reader, p: str, key: str, shape: tuple[int, ...]) -> np.ndarray:
    """One layer's q or k norm weights, flat: one tensor ([H], OLMo 2's [N * H], Cohere's
    [N, H]) or StableLM's one LayerNorm per head (q_layernorm.norms.{h})."""
    n = int(np.prod(shape))
    name = f"{p}self_attn.{key}.weight"
    if name in r or len(shape) == 1:
        return r.get(name, (n,), reshape=True)
    return np.concatenate([r.get(f"{p}self_attn.{key[0]}_layernorm.norms.{h}.weight",
                                 shape[1:]) for h in range(shape[0])])
