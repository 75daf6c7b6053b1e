"""GGUF (llama.cpp) files into a ModelConfig and the jaxinfer weight tree.

Block formats are decoded by the `gguf` package's own dequantizers, so every type it
knows (F32/F16/BF16, Q8_0, Q4_0, Q4_1, K-quants, ...) works here and none is re-implemented.
Weights come out float32, or with `quantized=True` Q8_0/Q4_0/Q4_1 blocks become QArrays
directly (gguf_quant.py), keeping the file's own scales.

llama.cpp's converter permutes the rows of each Q/K head of `llama` models from Hugging
Face's rotate-half RoPE layout into interleaved pairs; we permute them back, because the
engine (and the HF parity tests) use rotate-half. Cohere (`command-r`, `cohere2`) and
GLM-4 files keep their checkpoints' own interleaved pairs (GLM-4: in the rotated half of
each head), reordered the same way. `qwen2`, `qwen3` and Gemma files use NeoX RoPE and
are stored unpermuted.

Gemma files differ from the Hugging Face checkpoints in two conventions of llama.cpp's
converter, kept here: norm weights are stored with Gemma's +1 already added (so they load
as plain RMSNorm scales), and the hyperparameters llama.cpp hard-codes rather than stores
(Gemma 3's local RoPE base 10000 and window pattern, the 27B models' query scale) are
set the way llama.cpp sets them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from jaxinfer.config import ModelConfig, local_pattern
from jaxinfer.convert.gguf_hf import VIA_HF, HFView, hf_config
from jaxinfer.convert.gguf_quant import (
    BLOCK,
    expert_tensors,
    final_norm,
    layer_vectors,
    mxfp4_blocks,
    norms,
    qk_norms,
    quantized_weights,
    shared_router,
    stacked_experts,
)
from jaxinfer.convert.layout import to_rotate_half
from jaxinfer.convert.safetensors import reader_weights
from jaxinfer.convert.stacks import (
    IN_MEMORY,
    Storage,
    quantize_embeddings,
    results,
    source_groups,
    stacks,
)
from jaxinfer.errors import ConversionError
from jaxinfer.gguf_file import open_gguf
from jaxinfer.quant import QuantConfig
from jaxinfer.weights import check_weights, weight_specs

# general.architecture -> whether llama.cpp interleaved the Q/K rows for its RoPE.
_ARCHS = {"llama": True, "qwen2": False, "qwen3": False, "qwen2moe": False, "qwen3moe": False,
          "gemma": False, "gemma2": False, "gemma3": False, "phi3": False, "smollm3": True,
          "granite": True, "granitemoe": True, "olmo2": False,
          # Cohere's and GLM-4's own checkpoints pair RoPE dims interleaved (llama.cpp keeps
          # them so; GLM-4 rotates the first half of each head)
          "command-r": True, "cohere2": True, "stablelm": False, "glm4": True, "chatglm": True,
          "ernie4_5": True,
          "mistral3": True, "starcoder2": False, "phi2": False, "exaone4": False,
          "olmoe": False, "gpt-oss": False, "gptneox": False}
# Gemma 2/3: every n-th layer is global, the others local (llama.cpp's fixed patterns), and
# the layer count that marks the 27B models, whose query scale is (D / N) ** -0.5.
_GEMMA_PATTERN = {"gemma2": 2, "gemma3": 6}
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}
# Tokens that end a chat turn; generation stops on them even when metadata names another eos.
_TURN_END = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>")
_QUANT_SUFFIX = re.compile(r"[.-](?:[A-Z]*Q\d\w*|BF16|F16|F32)$", re.IGNORECASE)

Progress = Callable[[int, int], None]


def load_gguf(path: str | Path, progress: Progress | None = None, quantized: bool = False,
              quant: QuantConfig | None = None, storage: Storage = IN_MEMORY
              ) -> tuple[ModelConfig, dict]:
    """Read a GGUF file into `(config, weights)`; weights are float32 numpy arrays, or with
    `quantized` the file's Q8_0/Q4_0/Q4_1 blocks as QArrays (quant.infer_config tells how),
    or with `quant` any block type dequantized and requantized layer by layer as read
    (so a K-quant file never needs the whole model in float). `storage` holds the float
    weights (stacks.Storage: the checkpoint's dtype, or files in a scratch directory).

    `progress(done, total)` is called after each layer, since large files take a while.
    Raises ConversionError (naming the path) on corrupt, truncated or unsupported files.
    """
    path = Path(path)
    try:
        reader = open_gguf(path)
    except Exception as e:  # the reader fails with assorted ValueError/struct/numpy errors
        raise ConversionError(f"not a readable GGUF file: {path} ({type(e).__name__}: {e})") \
            from e
    tensors = {t.name: t for t in reader.tensors}
    if quantized and quant is not None:
        raise ConversionError("load_gguf: quantized (keep the file's blocks) and quant "
                              "(requantize) exclude each other")
    if _field(reader, "general.architecture") in VIA_HF:
        return _via_hf(reader, tensors, path, progress, quantized, quant, storage)
    cfg = _config(reader, tensors, path)
    tensors = _unfused(tensors, cfg)
    if _arch(reader, path) == "gpt-oss":  # its MLP's input norm is post_attention_norm
        tensors.update({f"blk.{i}.ffn_norm.weight": tensors[f"blk.{i}.post_attention_norm.weight"]
                        for i in range(cfg.num_layers)
                        if f"blk.{i}.post_attention_norm.weight" in tensors})
    get = _getter(tensors, path)
    quant = source_groups(cfg, quant, mxfp4=any(t.tensor_type.name == "MXFP4"
                                                 for t in tensors.values()))
    try:
        permuted = _ARCHS[_arch(reader, path)]
        if quantized:
            qc, weights = quantized_weights(
                cfg, tensors, permuted, get,
                lambda w, heads: to_rotate_half(w, heads, cfg.rope_dim), path, progress)
        else:
            qc = quant
            weights = quantize_embeddings(
                _weights(cfg, get, permuted, progress, quant, storage, tensors), quant)
        check_weights(weight_specs(cfg, quant=qc), weights)
    except ConversionError:
        raise
    except (ValueError, NotImplementedError) as e:  # ConfigError is a ValueError too
        raise ConversionError(f"cannot convert GGUF file {path}: {e}") from e
    return cfg, weights


# ---- metadata ----------------------------------------------------------------------------
def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.get_field(key)
    return default if f is None else f.contents()


def _arch(reader: Any, path: Path) -> str:
    arch = _field(reader, "general.architecture")
    if arch not in _ARCHS:
        raise ConversionError(f"unsupported GGUF architecture {arch!r} in {path} "
                              f"(supported: {', '.join([*_ARCHS, *VIA_HF])})")
    return arch


def _config(reader: Any, tensors: dict[str, Any], path: Path) -> ModelConfig:
    arch = _arch(reader, path)
    m = lambda key, default=None: _field(reader, f"{arch}.{key}", default)
    try:
        d, n = int(m("embedding_length")), int(m("attention.head_count"))
        if "token_embd.weight" not in tensors:
            raise ConversionError(f"GGUF file {path} has no token_embd.weight tensor")
        vocab = int(tensors["token_embd.weight"].shape[-1])  # ggml order: [D, V]
        kind = m("rope.scaling.type")
        if kind not in (None, "none", "linear", "yarn"):
            raise ConversionError(f"unsupported RoPE scaling {kind!r} in {path}")
        linear = float(m("rope.scaling.factor", 1.0)) if kind == "linear" else 1.0
        head_dim = int(m("attention.key_length") or d // n)
        variant = {**_long_rope(m, tensors, kind, head_dim, arch), **_llama_family(arch, m),
                   **_layernorm_family(arch, m, tensors)}
        theta = float(m("rope.freq_base", 10_000.0))
        scaling = None
        if "rope_freqs.weight" in tensors:
            freqs = _dequantize(tensors["rope_freqs.weight"])
            orig_ctx = m("rope.scaling.original_context_length")
            scaling = _llama3_scaling(freqs, theta, head_dim, orig_ctx, path)
        return ModelConfig(
            vocab_size=vocab, d_model=d,
            mlp_dim=int(m("expert_feed_forward_length") or m("feed_forward_length")),
            num_layers=int(m("block_count")), num_heads=n,
            num_kv_heads=int(m("attention.head_count_kv") or n), head_dim=head_dim,
            rope_theta=theta, rope_scaling=scaling, **_token_fields(reader, path, arch),
            rms_norm_eps=float(m("attention.layer_norm_rms_epsilon")
                               or m("attention.layer_norm_epsilon", 1e-5)),
            max_seq_len=int(m("context_length", 2048)),
            tie_embeddings="output.weight" not in tensors,
            qkv_bias="blk.0.attn_q.bias" in tensors or "blk.0.attn_qkv.bias" in tensors,
            qk_norm="blk.0.attn_q_norm.weight" in tensors,
            rope_linear_factor=linear, **variant, **_gemma(arch, m, tensors, d, n),
            **_experts(m, tensors, path, arch))
    except ConversionError:
        raise
    except (TypeError, ValueError) as e:  # a missing key (None), a bad value, a ConfigError
        raise ConversionError(f"GGUF file {path} has missing or invalid {arch} metadata: {e}") \
            from e


def _token_fields(reader: Any, path: Path, arch: str) -> dict[str, Any]:
    """The ModelConfig fields the tokenizer metadata and the file name give."""
    tok = lambda key, default=None: _field(reader, f"tokenizer.ggml.{key}", default)
    eos = tok("eos_token_id")
    eos_ids = [] if eos is None else [int(eos)]
    tokens = _field(reader, "tokenizer.ggml.tokens") or []
    eos_ids += [tokens.index(t) for t in _TURN_END if t in tokens]
    bos = tok("bos_token_id")
    return dict(bos_token_id=None if bos is None else int(bos),
                eos_token_ids=tuple(dict.fromkeys(eos_ids)),
                pad_token_id=int(tok("padding_token_id", eos) or 0),
                add_bos=bool(tok("add_bos_token", tok("model") == "llama")),
                name=_QUANT_SUFFIX.sub("", path.name.removesuffix(".gguf")) or arch)


def _via_hf(reader: Any, tensors: dict[str, Any], path: Path, progress: Progress | None,
            quantized: bool, quant: QuantConfig | None, storage: Storage
            ) -> tuple[ModelConfig, dict]:
    """A DeepSeek V2 / V3, GLM-4.5 or Llama 4 file, through the Hugging Face converter
    (convert/gguf_hf.py)."""
    arch = _field(reader, "general.architecture")
    if quantized:
        raise ConversionError(f"GGUF file {path}: keeping its blocks (--quantize=gguf) is not "
                              f"supported for {arch}; convert it to float or use "
                              "--quantize=int8")
    try:
        m = lambda key: _field(reader, f"{arch}.{key}")
        hf = hf_config(arch, m, tensors, path)
        cfg = ModelConfig.from_hf(hf).replace(**_token_fields(reader, path, arch))
        if "rope_freqs.weight" in tensors:  # Llama 3-style scaling (Llama 4)
            cfg = cfg.replace(rope_scaling=_llama3_scaling(
                _dequantize(tensors["rope_freqs.weight"]), cfg.rope_theta, cfg.head_dim,
                m("rope.scaling.original_context_length"), path))
    except ConversionError:
        raise
    except (KeyError, TypeError, ValueError) as e:  # a missing key (None), a ConfigError
        raise ConversionError(f"GGUF file {path} has missing or invalid {arch} metadata: "
                              f"{e}") from e
    view = HFView(tensors, _getter(tensors, path), path, arch, hf["model_type"],
                  int(_field(reader, f"{arch}.block_count")), cfg.num_experts)
    return cfg, reader_weights(cfg, view, progress, quant, storage)


def _long_rope(m: Callable[..., Any], tensors: dict[str, Any], kind: str | None,
               head_dim: int, arch: str = "") -> dict[str, Any]:
    """Partial rotary dims, YaRN and LongRoPE (Phi-3's rope_factors_short/long tensors)
    as llama.cpp runs them: YaRN's betas default to 32 and 1, its attention factor is
    0.1 ln(factor) + 1 times the file's (1 with a log multiplier: the mscale pair); gpt-oss
    keeps the model's own YaRN, which does not round the ramp's bounds."""
    out: dict[str, Any] = {}
    rot = m("rope.dimension_count")
    if rot and int(rot) != head_dim:
        out["rope_dim"] = int(rot)
    orig = m("rope.scaling.original_context_length")
    if kind == "yarn":
        factor = float(m("rope.scaling.factor"))
        # a log multiplier (DeepSeek's mscale_all_dim, Ministral 3) means transformers'
        # mscale pair, which cancels for the released models (mscale == mscale_all_dim)
        att = 1.0 if m("rope.scaling.yarn_log_multiplier") else 0.1 * math.log(factor) + 1
        out.update(rope_yarn=(factor, int(orig), float(m("rope.scaling.yarn_beta_fast") or 32),
                              float(m("rope.scaling.yarn_beta_slow") or 1),
                              arch != "gpt-oss"),
                   rope_attention_factor=att * float(m("rope.scaling.yarn_attn_factor") or 1))
    if "rope_factors_long.weight" in tensors:
        short, long = (tuple(_dequantize(tensors[f"rope_factors_{k}.weight"]).tolist())
                       for k in ("short", "long"))
        orig = int(orig or m("context_length"))
        factor = int(m("context_length")) / orig
        att = m("rope.scaling.attn_factor")
        if att is None:
            att = math.sqrt(1 + math.log(factor) / math.log(orig)) if factor > 1 else 1.0
        out.update(rope_longrope=(short, long, orig), rope_attention_factor=float(att))
    return out


def _llama_family(arch: str, m: Callable[..., Any]) -> dict[str, Any]:
    """The switches of the Llama-family variants (none for other archs): Phi-3's sliding
    window (0: none, Phi-4), SmolLM3's NoPE layers (llama.cpp's fixed step of four),
    OLMo 2's, EXAONE 4's and GLM-4's norm placement (EXAONE 4 32B's windows), Granite's
    multipliers, Ministral 3's query
    temperature (its length: the YaRN original context)."""
    if arch == "phi3" and m("attention.sliding_window"):
        return {"sliding_window": int(m("attention.sliding_window"))}
    if arch == "smollm3":
        return {"nope_layers": tuple(not b for b in local_pattern(4, int(m("block_count"))))}
    if arch == "olmo2":  # norms after attention and the MLP only; q/k over all heads
        return {"pre_norms": False, "post_norms": True, "qk_norm_full": True}
    if arch == "olmoe":  # q/k over all heads, OLMo 2's way, with the usual norms
        return {"qk_norm_full": True}
    if arch == "gpt-oss":  # llama.cpp's fixed clamp, windows on even layers; YaRN as the
        window = m("attention.sliding_window")  # model defines it (no truncation)
        out = {"attn_sinks": True, "router_bias": True, "linear_bias": True,
               "swiglu_limit": 7.0, "swiglu_alpha": 1.702}
        if window:
            out.update(sliding_window=int(window),
                       local_layers=local_pattern(2, int(m("block_count"))))
        return out
    if arch == "exaone4":  # OLMo 2's norm placement; llama.cpp gives only the 64-layer
        out = {"pre_norms": False, "post_norms": True}  # 32B its windows (4096, 3 of 4)
        L = int(m("block_count"))
        if L == 64:
            local = local_pattern(4, L)
            out.update(sliding_window=int(m("attention.sliding_window") or 4096),
                       local_layers=local, nope_layers=tuple(not b for b in local))
        return out
    if arch == "glm4":  # Gemma 2's sandwich norms; interleaved pairs of the rotated half
        return {"post_norms": True, "rope_interleaved": True}
    if arch in ("chatglm", "ernie4_5"):  # GLM-4-9B (GlmForCausalLM; llama.cpp names it
        return {"rope_interleaved": True}  # chatglm), ERNIE 4.5: interleaved pairs
    if arch == "mistral3" and m("attention.temperature_scale"):  # Ministral 3, as llama.cpp
        return {"attn_temperature": (float(m("attention.temperature_scale")),  # reads it
                                     int(m("rope.scaling.original_context_length")))}
    if arch in ("granite", "granitemoe"):
        out = {"embedding_multiplier": float(m("embedding_scale", 1.0)),
               "residual_multiplier": float(m("residual_scale", 1.0)),
               "logits_scaling": float(m("logit_scale", 1.0))}
        if m("attention.scale") is not None:
            out["query_scale"] = float(m("attention.scale"))
        return out
    return {}


def _layernorm_family(arch: str, m: Callable[..., Any], tensors: dict[str, Any]
                      ) -> dict[str, Any]:
    """Cohere (`command-r`), Cohere2, StableLM 2, StarCoder2, Phi-2 and GPT-NeoX: LayerNorm,
    per-head q/k norms, a parallel block (Cohere and Phi-2 always; StableLM 12B, whose files have no
    ffn_norm), Cohere's logit scale, Cohere2's window over three of four layers (llama.cpp's
    fixed pattern), the fourth without RoPE; StarCoder2's and Phi-2's plain GELU MLP and
    biases on every projection (and Phi-2's lm_head); GPT-NeoX's exact GELU and its parallel
    block (`use_parallel_residual`) with a norm for each side."""
    if arch == "gptneox":
        parallel = bool(m("use_parallel_residual", True))
        return {"layer_norm": True, "norm_bias": True, "mlp_gated": False, "linear_bias": True,
                "activation": "gelu", "parallel_block": parallel, "parallel_mlp_norm": parallel}
    if arch in ("starcoder2", "phi2"):
        window = m("attention.sliding_window")
        return {"layer_norm": True, "norm_bias": True, "mlp_gated": False,
                "linear_bias": True, "activation": "gelu_tanh",
                "parallel_block": arch == "phi2", "lm_head_bias": "output.bias" in tensors,
                **({"sliding_window": int(window)} if window else {})}
    if arch not in ("command-r", "cohere2", "stablelm"):
        return {}
    out = {"layer_norm": True, "qk_norm_heads": True,
           "parallel_block": arch != "stablelm" or "blk.0.ffn_norm.weight" not in tensors}
    if arch == "stablelm":
        return {**out, "norm_bias": True}
    out.update(rope_interleaved=True, logits_scaling=1.0 / float(m("logit_scale", 1.0)))
    if arch == "cohere2" and m("attention.sliding_window"):
        local = local_pattern(4, int(m("block_count")))
        out.update(sliding_window=int(m("attention.sliding_window")), local_layers=local,
                   nope_layers=tuple(not b for b in local))
    return out


def _gemma(arch: str, m: Callable[..., Any], tensors: dict[str, Any], d: int, n: int
           ) -> dict[str, Any]:
    """The Gemma switches of ModelConfig for a Gemma file (none for other archs)."""
    if not arch.startswith("gemma"):
        return {}
    L = int(m("block_count"))
    window = m("attention.sliding_window")
    window = int(window) if window else None
    pattern = _GEMMA_PATTERN.get(arch)
    out = dict(activation="gelu_tanh", scale_embeddings=True,
               post_norms="blk.0.post_attention_norm.weight" in tensors,
               attn_softcap=_positive(m("attn_logit_softcapping")),
               final_softcap=_positive(m("final_logit_softcapping")))
    if window and pattern:
        out.update(sliding_window=window, local_layers=local_pattern(pattern, L))
        if arch == "gemma3":
            out["rope_local_theta"] = 10_000.0
    if L == _GEMMA_27B_LAYERS.get(arch):
        out["query_scale"] = (d // n) ** -0.5
    return out


def _experts(m: Callable[..., Any], tensors: dict[str, Any], path: Path, arch: str = ""
             ) -> dict[str, Any]:
    """A mixture of experts' ModelConfig fields (Qwen2/3-MoE, Mixtral as `llama`): experts
    stacked per layer as llama.cpp writes them now (ffn_*_exps) or one tensor per expert as
    early Mixtral files hold them (ffn_*.E), softmax routing with the top weights
    renormalised except for Qwen2-MoE and OLMoE: llama.cpp's graph for each architecture
    fixes this and never reads the file's expert_weights_norm (only deepseek2 and glm4moe,
    read through gguf_hf, do); Qwen2-MoE's shared expert (ffn_*_shexp, gated by
    ffn_gate_inp_shexp)."""
    experts = int(m("expert_count") or 0)
    if not experts:
        return {}
    if expert_tensors(tensors, "blk.0.ffn_gate_exps.weight", experts) is None:
        raise ConversionError(f"GGUF file {path} has expert_count {experts} but no tensor "
                              "blk.0.ffn_gate_exps.weight (nor one per expert)")
    shared = 0
    if "blk.0.ffn_gate_shexp.weight" in tensors:  # older files: feed_forward_length, as
        shared = int(m("expert_shared_feed_forward_length")  # llama.cpp reads them
                     or m("feed_forward_length"))
    return dict(num_experts=experts, experts_per_token=int(m("expert_used_count")),
                norm_topk=arch not in ("qwen2moe", "olmoe"),
                shared_expert_dim=shared,
                shared_expert_gate="blk.0.ffn_gate_inp_shexp.weight" in tensors)


def _positive(x: Any) -> float | None:
    return float(x) if x else None


def _llama3_scaling(divisors: np.ndarray, theta: float, head_dim: int, orig_ctx: Any,
                    path: Path) -> tuple[float, float, float, int]:
    """Recover Llama-3 RoPE scaling parameters from llama.cpp's `rope_freqs` tensor.

    llama.cpp stores only the per-frequency divisors, not the parameters that produced them.
    With Llama 3's low/high frequency factors (1, 4), the original context length follows
    from any divisor strictly between 1 and the factor; accept it only if it reproduces
    every divisor.
    """
    lo, hi = 1.0, 4.0
    inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    factor = float(divisors.max())
    candidates = [orig_ctx, 8192]
    mid = (divisors > 1 + 1e-6) & (divisors < factor - 1e-6)
    if mid.any() and divisors.shape == wavelen.shape:
        smooth = (1 / divisors[mid] - 1 / factor) / (1 - 1 / factor)
        candidates.insert(0, round(float(np.median(wavelen[mid] * (smooth * (hi - lo) + lo)))))
    for orig in dict.fromkeys(int(c) for c in candidates if c):
        smooth = np.clip((orig / wavelen - lo) / (hi - lo), 0.0, 1.0)
        want = 1.0 / ((1 - smooth) / factor + smooth)
        if divisors.shape == want.shape and np.allclose(divisors, want, rtol=1e-4):
            return (factor, lo, hi, orig)
    raise ConversionError(f"unsupported rope_freqs tensor in {path}: not Llama-3 style scaling")


# ---- tensors -----------------------------------------------------------------------------
def _unfused(tensors: dict[str, Any], cfg: ModelConfig) -> dict[str, Any]:
    """Phi-3 files fuse q/k/v (attn_qkv; older Phi-2 files too, with its bias) and gate/up
    (ffn_up, 2F rows): each part becomes a row view under its own name (rows are whole
    ggml blocks), so the float and the block-quantized imports read them as they read any
    file."""
    NH, KH, F = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.mlp_dim
    out = dict(tensors)
    for i in range(cfg.num_layers):
        p = f"blk.{i}."
        parts = []
        if p + "attn_qkv.weight" in tensors:
            parts.append(("attn_qkv", (("attn_q", 0, NH), ("attn_k", NH, KH),
                                       ("attn_v", NH + KH, KH))))
        if p + "ffn_up.weight" in tensors and p + "ffn_gate.weight" not in tensors \
                and not cfg.num_experts and cfg.mlp_gated:
            parts.append(("ffn_up", (("ffn_gate", 0, F), ("ffn_up", F, F))))
        for whole, split in parts:
            t = tensors[p + whole + ".weight"]
            if int(t.shape[-1]) != split[-1][1] + split[-1][2]:
                continue  # not fused after all: the shape checks name the tensor later
            for kind in ("weight", "bias"):  # (Phi-2's fused q/k/v carry biases too)
                if kind == "bias" and p + whole + ".bias" not in tensors:
                    continue
                t = tensors[p + whole + "." + kind]
                for name, start, rows in split:
                    data = t.data[start:start + rows]
                    shape = [t.shape[0], rows] if kind == "weight" else [rows]
                    out[f"{p}{name}.{kind}"] = t._replace(
                        name=f"{p}{name}.{kind}", shape=np.array(shape),
                        n_elements=int(np.prod(shape)), n_bytes=data.nbytes, data=data)
    return out


_DEQUANTIZE_CHUNK = 16 * 2**20  # bytes of float32 output per dequantize call


def _dequantize(t: Any) -> np.ndarray:
    """A tensor as float32 in numpy order (ggml lists dims innermost first), dequantized
    a few rows at a time into the result: the `gguf` package's dequantizers make several
    temporaries the size of their input, which for a whole embedding table of a large
    vocabulary was gigabytes on top of the table."""
    import gguf

    shape = [int(s) for s in reversed(t.shape)]
    # A plain ndarray view: numpy.memmap's per-slice bookkeeping triples dequantize time.
    raw = t.data.view(np.ndarray)
    rows = raw.reshape(-1, raw.shape[-1])
    out = np.empty((rows.shape[0], shape[-1]), np.float32)
    step = max(1, _DEQUANTIZE_CHUNK // (4 * shape[-1]))
    for r in range(0, rows.shape[0], step):
        out[r:r + step] = gguf.quants.dequantize(rows[r:r + step], t.tensor_type).reshape(
            -1, shape[-1])
    return out.reshape(shape)


def _getter(tensors: dict[str, Any], path: Path) -> Callable[[str, tuple[int, ...]], np.ndarray]:
    def get(name: str, shape: tuple[int, ...], reshape: bool = False) -> np.ndarray:
        """`reshape`: any shape of as many values (per-head norms: [N * H] or [N, H])."""
        if name not in tensors:
            raise ConversionError(f"GGUF file {path} lacks tensor {name!r}")
        try:
            a = _dequantize(tensors[name])
        except (ValueError, NotImplementedError) as e:  # truncated data, unknown block type
            raise ConversionError(f"cannot read tensor {name!r} of GGUF file {path}: {e}") from e
        if a.shape != shape and (reshape and a.size == int(np.prod(shape)) or [
                n for n in a.shape if n != 1] == [n for n in shape if n != 1]):
            a = a.reshape(shape)  # a [1, D] written where llama.cpp reads [D] (or back)
        if a.shape != shape:
            raise ConversionError(f"tensor {name!r} in {path} has shape {a.shape}, "
                                  f"expected {shape}")
        return a

    return get


def _weights(cfg: ModelConfig, get: Callable[..., np.ndarray], permuted: bool,
             progress: Progress | None, quant: QuantConfig | None, storage: Storage,
             tensors: dict[str, Any]) -> dict:
    """The float weight tree, filled layer by layer (quantized per `quant` as read; with
    int8 groups of 32, MXFP4 experts among `tensors` are kept exactly)."""
    L, D, F, N, K, H, V = (cfg.num_layers, cfg.d_model, cfg.mlp_dim, cfg.num_heads,
                           cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size)
    fix = ((lambda w, heads: to_rotate_half(w, heads, cfg.rope_dim)) if permuted
           else (lambda w, heads: w))
    # Filled layer by layer so peak memory stays one stacked copy of the model.
    E = cfg.num_experts
    mlp = ({"router": (D, E), "moe_gate": (E, D, F), "moe_up": (E, D, F), "moe_down": (E, F, D)}
           if E else {"w_gate": (D, F), "w_up": (D, F), "w_down": (F, D)})
    if not cfg.mlp_gated:
        del mlp["w_gate"]
    Fs = cfg.shared_expert_dim
    shared = {"shared_gate": ("ffn_gate_shexp", (D, Fs)), "shared_up": ("ffn_up_shexp", (D, Fs)),
              "shared_down": ("ffn_down_shexp", (Fs, D))} if Fs else {}
    mlp.update({key: shape for key, (_, shape) in shared.items()})
    layers = stacks({"wq": (D, N, H), "wk": (D, K, H), "wv": (D, K, H), "wo": (N, H, D), **mlp},
                    L, quant, storage)
    if cfg.qkv_bias:
        layers.update(bq=storage.empty((L, N, H)), bk=storage.empty((L, K, H)),
                      bv=storage.empty((L, K, H)))
    layers.update(qk_norms(cfg, get, fix if permuted else None))
    layers.update(norms(cfg, get))
    for i in range(L):
        p = f"blk.{i}."
        x = layers
        x["wq"][i] = fix(get(p + "attn_q.weight", (N * H, D)), N).T.reshape(D, N, H)
        x["wk"][i] = fix(get(p + "attn_k.weight", (K * H, D)), K).T.reshape(D, K, H)
        x["wv"][i] = get(p + "attn_v.weight", (K * H, D)).T.reshape(D, K, H)
        x["wo"][i] = get(p + "attn_output.weight", (D, N * H)).T.reshape(N, H, D)
        if E:  # [E, out, in] -> [E, in, out]
            x["router"][i] = get(p + "ffn_gate_inp.weight", (E, D)).T
            for key, gname, shape in (("moe_gate", "ffn_gate_exps", (E, F, D)),
                                      ("moe_up", "ffn_up_exps", (E, F, D)),
                                      ("moe_down", "ffn_down_exps", (E, D, F))):
                t = tensors.get(p + gname + ".weight")
                if (x[key].takes_groups(BLOCK) and t is not None
                        and t.tensor_type.name == "MXFP4"):  # kept exactly: int8 groups of 32
                    v, sc = mxfp4_blocks(t)
                    x[key].set_quantized(i, v.reshape(shape).swapaxes(1, 2),
                                         sc.reshape(*shape[:2], -1).swapaxes(1, 2))
                else:
                    x[key][i] = stacked_experts(get, tensors, p + gname + ".weight", E,
                                                shape).swapaxes(1, 2)
            for key, (gname, shape) in shared.items():
                x[key][i] = get(p + gname + ".weight", shape[::-1]).T
        else:
            if cfg.mlp_gated:
                x["w_gate"][i] = get(p + "ffn_gate.weight", (F, D)).T
            x["w_up"][i] = get(p + "ffn_up.weight", (F, D)).T
            x["w_down"][i] = get(p + "ffn_down.weight", (D, F)).T
        if cfg.qkv_bias:
            x["bq"][i] = fix(get(p + "attn_q.bias", (N * H,)), N).reshape(N, H)
            x["bk"][i] = fix(get(p + "attn_k.bias", (K * H,)), K).reshape(K, H)
            x["bv"][i] = get(p + "attn_v.bias", (K * H,)).reshape(K, H)
        if progress:
            progress(i + 1, L)
    layers.update(shared_router(cfg, get))
    layers.update(layer_vectors(cfg, get))
    weights = {"embed": storage.put(get("token_embd.weight", (V, D))),
               "layers": results(layers), **final_norm(cfg, get)}
    if not cfg.tie_embeddings:
        weights["lm_head"] = storage.put(np.ascontiguousarray(get("output.weight", (V, D)).T))
    return weights
