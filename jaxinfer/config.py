"""Model configuration: one frozen dataclass for every Llama-family checkpoint.

Dimension alphabet used across jaxinfer: B batch, T query positions, S key/value
positions, D model width, F MLP width, N query heads, K KV heads, G query heads per
KV head (N // K), H head dim, L layers, V vocab; in mixture-of-experts layers E experts
and C experts chosen per token.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from jaxinfer.errors import ConfigError

ACTIVATIONS = ("silu", "gelu_tanh", "gelu")
GEMMA_TYPES = ("gemma", "gemma2", "gemma3_text", "gemma3")
DEEPSEEK_TYPES = ("deepseek_v2", "deepseek_v3", "glm4_moe_lite")  # latent attention
MOE_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "granitemoe", "olmoe", "gpt_oss", "glm4_moe",
             "phimoe", "minimax_m2", *DEEPSEEK_TYPES)
COHERE_TYPES = ("cohere", "cohere2")
GLM_TYPES = ("glm", "glm4")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shapes and constants of a Llama-family decoder (Llama 2/3, Mistral, Qwen2/3, Phi-3,
    SmolLM2/3, Granite, OLMo 2, Cohere, StableLM 2, GLM-4, StarCoder2, Phi-2), of Gemma 1/2/3
    or of a mixture of experts (Mixtral, Qwen2/3-MoE, OLMoE, Llama 4, gpt-oss, DeepSeek,
    GLM-4.5): their differences are the switches after `name`, all off for Llama."""

    vocab_size: int  # V
    d_model: int  # D
    mlp_dim: int  # F
    num_layers: int  # L
    num_heads: int  # N
    num_kv_heads: int  # K
    head_dim: int  # H
    rope_theta: float = 10_000.0
    # Llama-3 style frequency scaling: (factor, low_freq_factor, high_freq_factor,
    # original_max_position_embeddings), or None.
    rope_scaling: tuple[float, float, float, int] | None = None
    rms_norm_eps: float = 1e-5  # every norm's epsilon (LayerNorm's too)
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 carries biases on q/k/v projections.
    qk_norm: bool = False  # Qwen3 RMS-normalises each head's q and k before RoPE.
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0
    add_bos: bool = False  # whether prompts are prefixed with BOS
    name: str = "llama"
    # Gemma: GeGLU MLP, RMSNorm scaling by (1 + w), embeddings times sqrt(D), and (Gemma 2/3)
    # a second RMSNorm on the attention and MLP outputs before each residual add.
    activation: str = "silu"  # "silu" (SwiGLU), "gelu_tanh" (GeGLU), "gelu" (exact, erf)
    norm_plus_one: bool = False
    scale_embeddings: bool = False
    post_norms: bool = False
    query_scale: float | None = None  # attention score scale; None: head_dim ** -0.5
    attn_softcap: float | None = None  # Gemma 2: scores -> c * tanh(scores / c)
    final_softcap: float | None = None  # Gemma 2: logits -> c * tanh(logits / c)
    # Sliding-window ("local") layers see only the last `sliding_window` positions;
    # local_layers marks them (Gemma 2: every other layer, Gemma 3: five of six); an empty
    # tuple with a window makes every layer local (Mistral v0.1).
    sliding_window: int | None = None
    local_layers: tuple[bool, ...] = ()
    # Llama 4: local layers attend within aligned chunks of sliding_window positions (a
    # query at p sees p - p % window onwards) instead of a sliding window.
    chunked_local: bool = False
    rope_local_theta: float | None = None  # Gemma 3: RoPE base of local layers
    rope_linear_factor: float = 1.0  # linear position scaling of the global layers
    # Long-context RoPE variants (transformers' rope_type "yarn" and "longrope"):
    # YaRN (Qwen2.5/3, DeepSeek): (factor, original_max_position_embeddings, beta_fast,
    # beta_slow, truncate), the frequencies blended between interpolated and original.
    rope_yarn: tuple[float, int, float, float, bool] | None = None
    # LongRoPE (Phi-3.5, Phi-4-mini): (short factors, long factors, original_max_position_
    # embeddings), per-frequency divisors; a run whose KV cache is longer than the original
    # context uses the long ones throughout (vLLM's rule for max_model_len).
    rope_longrope: tuple[tuple[float, ...], tuple[float, ...], int] | None = None
    rope_attention_factor: float = 1.0  # cos and sin scaled by it (YaRN, LongRoPE)
    rope_dim: int | None = None  # rotated dims of each head (Phi-4-mini: 3/4); None: all
    # Ministral 3's query temperature (transformers' llama_4_scaling_beta): (beta, length),
    # q at position p scaled by 1 + beta * ln(1 + floor(p / length)), so attention stays
    # sharp past the original context.
    attn_temperature: tuple[float, int] | None = None
    # Llama 4's variant: only NoPE layers, positions counted from 1 (floor((p + 1) / length)).
    attn_temperature_nope: bool = False
    # Llama 4: q and k RMS-normalised without weights after RoPE, on RoPE layers only.
    qk_l2_norm: bool = False
    # Cohere's and GLM's Hugging Face checkpoints (and so their LoRA adapters) pair each
    # head's rotated dims interleaved; converters reorder q/k rows to the rotate-half layout
    # the model runs.
    rope_interleaved: bool = False
    # SmolLM3: layers without positional encoding (NoPE: every fourth); empty: none.
    nope_layers: tuple[bool, ...] = ()
    # Granite: embeddings times embedding_multiplier, each attention / MLP output times
    # residual_multiplier before its residual add, logits divided by logits_scaling (the
    # attention multiplier is query_scale).
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0
    # OLMo 2: no norm before attention and the MLP (only post_norms after them), and q and
    # k RMS-normalised across all heads at once (weights [N*H], [K*H]) with qk_norm.
    pre_norms: bool = True
    qk_norm_full: bool = False
    # Cohere and StableLM 2: LayerNorm (mean subtracted) instead of RMSNorm, with a bias on
    # the block and final norms (StableLM); q/k norm weights per head, [N, H] and [K, H]
    # (each head normalised alone; OLMo 2's qk_norm_full sets it too); attention and the
    # MLP reading the same normed input, both added to the residual (parallel_block:
    # Cohere, StableLM 2 12B; no mlp_norm).
    layer_norm: bool = False
    norm_bias: bool = False
    qk_norm_heads: bool = False
    parallel_block: bool = False
    # GPT-NeoX (Pythia): the parallel MLP reads its own norm of the block's input (mlp_norm)
    # instead of attention's.
    parallel_mlp_norm: bool = False
    # StarCoder2 and Phi-2: a plain MLP (up, activation, down: no gate) and biases on the
    # attention output and both MLP projections (q/k/v biases are qkv_bias); Phi-2's
    # lm_head has a bias too.
    mlp_gated: bool = True
    linear_bias: bool = False
    lm_head_bias: bool = False
    o_bias: bool = False  # Phi-3.5-MoE: a bias on the attention output only
    # Mixture of experts (Mixtral, Qwen2/3-MoE): every layer's MLP is num_experts experts of
    # width mlp_dim; a softmax router sends each token to its top experts_per_token, whose
    # outputs are summed with the router weights (renormalised to sum 1 with norm_topk).
    num_experts: int = 0  # E; 0: a dense MLP
    experts_per_token: int = 0  # C
    norm_topk: bool = True
    # Qwen2-MoE: a shared expert (a dense gated MLP of this width) every token also goes
    # through, its output scaled by sigmoid(x . shared_expert_gate) when gated.
    shared_expert_dim: int = 0
    shared_expert_gate: bool = False
    # Llama 4: the router's top logits through a sigmoid scale each chosen expert's input
    # (not its output), and nothing renormalises them.
    moe_scale_inputs: bool = False
    # gpt-oss: a bias on the router's logits, per-head attention sinks (a learned logit
    # each query's softmax also normalises over, attending to nothing), and experts whose
    # gated unit clamps: min(g, limit) * sigmoid(alpha * min(g, limit)) * (clip(u, +-limit)
    # + 1). With experts, linear_bias means the experts' and the attention output's biases.
    router_bias: bool = False
    attn_sinks: bool = False
    swiglu_limit: float | None = None
    swiglu_alpha: float = 1.702
    # DeepSeek V2/V3, GLM-4.5: the first `dense_layers` layers have a dense MLP of width
    # dense_mlp_dim instead of experts (their own scanned stack, weights["dense_layers"]).
    dense_layers: int = 0
    dense_mlp_dim: int = 0
    # Llama 4 Maverick: only every moe_every-th layer has experts (layers moe_every - 1,
    # 2 moe_every - 1, ...), the others a dense MLP of dense_mlp_dim, in the dense stack.
    moe_every: int = 1
    # DeepSeek's routing: sigmoid scores (V3, GLM-4.5; softmax otherwise); experts in
    # router_groups = (groups, groups kept), a group ranked by its best score (V2) or the sum
    # of its best two (router_group_top2: V3); a per-expert bias on the scores that picks
    # experts but does not weigh them (router_choice_bias: e_score_correction_bias); the
    # chosen weights times routed_scale.
    router_sigmoid: bool = False
    # Phi-3.5-MoE's sparsemixer (two experts, `router_sparsemixer` its jitter eps): the best
    # expert, weighed by its softmax over the experts whose logits are within 2 eps
    # (relative) of it; then the same for the best of the others.
    router_sparsemixer: float | None = None
    router_groups: tuple[int, int] | None = None
    router_group_top2: bool = False
    router_choice_bias: bool = False
    routed_scale: float = 1.0
    # Multi-head latent attention (DeepSeek V2/V3) where kv_lora_rank > 0: keys and values
    # come from one RMS-normed latent c of kv_lora_rank dims per token plus one shared RoPE
    # key of rope_dim, and the cache holds just [c, k_rope] (head_dim = kv_lora_rank +
    # rope_dim, one KV head, no separate values). Each query head's non-RoPE part
    # (qk_nope_dim) is absorbed into its key up-projection, so attention runs in latent
    # space, and the output is lifted to v_head_dim per head. q_lora_rank > 0: queries
    # through a normed low-rank bottleneck too.
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_dim: int = 0
    v_head_dim: int = 0

    def __post_init__(self):
        for f in ("vocab_size", "d_model", "mlp_dim", "num_layers", "num_heads",
                  "num_kv_heads", "head_dim", "max_seq_len"):
            v = getattr(self, f)
            if not isinstance(v, int) or v <= 0:
                raise ConfigError(f"{f} must be a positive integer, got {v!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        object.__setattr__(self, "eos_token_ids", tuple(int(e) for e in self.eos_token_ids))
        object.__setattr__(self, "local_layers", tuple(bool(b) for b in self.local_layers))
        object.__setattr__(self, "nope_layers", tuple(bool(b) for b in self.nope_layers))
        if self.nope_layers and len(self.nope_layers) != self.num_layers:
            raise ConfigError(f"nope_layers has {len(self.nope_layers)} entries for "
                              f"num_layers={self.num_layers}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.sliding_window is not None and (
                not isinstance(self.sliding_window, int) or self.sliding_window <= 0):
            raise ConfigError(f"sliding_window must be a positive integer or None, got "
                              f"{self.sliding_window!r}")
        if self.qk_norm_full and not self.qk_norm:
            raise ConfigError("qk_norm_full needs qk_norm")
        if self.qk_norm_full:  # its weights are per head
            object.__setattr__(self, "qk_norm_heads", True)
        if self.parallel_block and (self.post_norms or not self.pre_norms):
            raise ConfigError("parallel_block takes one norm before each block, not "
                              "post_norms")
        if self.parallel_mlp_norm and not self.parallel_block:
            raise ConfigError("parallel_mlp_norm needs parallel_block")
        if not (self.pre_norms or self.post_norms):
            raise ConfigError("a model needs pre_norms, post_norms or both")
        if self.num_experts and not self.mlp_gated:
            raise ConfigError("experts are gated MLPs (mlp_gated)")
        if (self.router_bias or self.swiglu_limit is not None) and not self.num_experts:
            raise ConfigError("router_bias and swiglu_limit are for experts (num_experts)")
        if self.router_sparsemixer is not None and (
                self.experts_per_token != 2 or self.router_sparsemixer < 0):
            raise ConfigError(f"router_sparsemixer (eps {self.router_sparsemixer!r}) needs "
                              f"eps >= 0 and experts_per_token=2, got "
                              f"{self.experts_per_token}")
        if self.chunked_local and self.sliding_window is None:
            raise ConfigError("chunked_local needs sliding_window (the chunk length)")
        if self.attn_temperature_nope and self.attn_temperature is None:
            raise ConfigError("attn_temperature_nope needs attn_temperature")
        if self.lm_head_bias and self.tie_embeddings:
            raise ConfigError("lm_head_bias needs an lm_head (tie_embeddings=False)")
        if self.shared_expert_dim and not self.num_experts:
            raise ConfigError("shared_expert_dim needs num_experts (a mixture of experts)")
        if self.num_experts and not 1 <= self.experts_per_token <= self.num_experts:
            raise ConfigError(f"experts_per_token must be in [1, num_experts="
                              f"{self.num_experts}], got {self.experts_per_token!r}")
        if self.local_layers and len(self.local_layers) != self.num_layers:
            raise ConfigError(f"local_layers has {len(self.local_layers)} entries for "
                              f"num_layers={self.num_layers}")
        if self.rope_scaling is not None:
            object.__setattr__(self, "rope_scaling", tuple(self.rope_scaling))
        if self.rope_yarn is not None:
            object.__setattr__(self, "rope_yarn", tuple(self.rope_yarn))
        if self.attn_temperature is not None:
            beta, length = self.attn_temperature
            if not isinstance(length, int) or length <= 0:
                raise ConfigError(f"attn_temperature's length must be a positive integer, got "
                                  f"{length!r}")
            object.__setattr__(self, "attn_temperature", (float(beta), length))
        if self.dense_layers and not (self.num_experts and 0 < self.dense_layers < self.num_layers
                                      and self.dense_mlp_dim > 0):
            raise ConfigError(f"dense_layers={self.dense_layers} needs experts in the other "
                              f"layers (num_experts, fewer than num_layers={self.num_layers}) "
                              f"and dense_mlp_dim > 0")
        if self.moe_every != 1 and not (
                self.num_experts and self.moe_every > 1 and not self.dense_layers
                and self.num_layers % self.moe_every == 0 and self.dense_mlp_dim > 0):
            raise ConfigError(f"moe_every={self.moe_every} needs experts, num_layers="
                              f"{self.num_layers} a multiple of it, dense_mlp_dim > 0 and no "
                              f"leading dense_layers")
        if self.router_groups is not None:
            groups, kept = self.router_groups
            object.__setattr__(self, "router_groups", (int(groups), int(kept)))
            if groups <= 0 or self.num_experts % groups or not 0 < kept <= groups:
                raise ConfigError(f"router_groups={self.router_groups} must split num_experts="
                                  f"{self.num_experts} into groups and keep 1 to all of them")
        if self.kv_lora_rank:
            if (self.num_kv_heads != 1 or not self.rope_dim or self.qk_nope_dim <= 0
                    or self.v_head_dim <= 0
                    or self.head_dim != self.kv_lora_rank + self.rope_dim):
                raise ConfigError(
                    f"latent attention (kv_lora_rank={self.kv_lora_rank}) needs num_kv_heads=1, "
                    f"head_dim = kv_lora_rank + rope_dim, qk_nope_dim and v_head_dim; got "
                    f"{self.num_kv_heads}, {self.head_dim}, {self.rope_dim}, {self.qk_nope_dim}, "
                    f"{self.v_head_dim}")
        rot = self.rope_dim or self.head_dim
        if not isinstance(rot, int) or not 0 < rot <= self.head_dim or rot % 2:
            raise ConfigError(f"rope_dim must be an even integer in (0, head_dim="
                              f"{self.head_dim}], got {self.rope_dim!r}")
        if self.rope_longrope is not None:
            short, long, orig = self.rope_longrope
            short, long = tuple(map(float, short)), tuple(map(float, long))
            if len(short) != rot // 2 or len(long) != rot // 2:
                raise ConfigError(f"rope_longrope needs {rot // 2} short and long factors "
                                  f"(one per rotated frequency), got {len(short)} and "
                                  f"{len(long)}")
            object.__setattr__(self, "rope_longrope", (short, long, int(orig)))

    @property
    def num_dense_layers(self) -> int:
        """Layers of a mixture of experts with a dense MLP instead (the dense stack)."""
        return self.num_layers - self.num_layers // self.moe_every + self.dense_layers

    def layer_slot(self, n: int) -> tuple[str, int]:
        """Which weight stack holds layer n ("dense_layers" or "layers"), and where: DeepSeek's
        leading dense layers, or Maverick's dense layers between expert ones."""
        if self.moe_every > 1:
            g, j = divmod(n, self.moe_every)
            return (("layers", g) if j == self.moe_every - 1
                    else ("dense_layers", g * (self.moe_every - 1) + j))
        return (("dense_layers", n) if n < self.dense_layers
                else ("layers", n - self.dense_layers))

    @property
    def shared_input_norm(self) -> bool:
        """Whether attention and the MLP read one normed input (a parallel block without
        GPT-NeoX's second norm): the layers then have no mlp_norm."""
        return self.parallel_block and not self.parallel_mlp_norm

    @property
    def attn_out_bias(self) -> bool:
        """Whether the attention output has a bias (bo): with every linear bias, or alone
        (Phi-3.5-MoE)."""
        return self.linear_bias or self.o_bias

    @property
    def value_dim(self) -> int:
        """Head dim of the value cache: 0 with latent attention (values are the keys' latent
        part, so nothing is stored twice)."""
        return 0 if self.kv_lora_rank else self.head_dim

    @property
    def q_per_kv(self) -> int:  # G
        return self.num_heads // self.num_kv_heads

    @property
    def local_L(self) -> tuple[bool, ...]:
        """Per layer: whether it attends through the sliding window."""
        if self.sliding_window is None:
            return (False,) * self.num_layers
        return self.local_layers or (True,) * self.num_layers

    @property
    def llama_layers(self) -> bool:
        """Whether every layer is the plain Llama block (what pruning understands)."""
        return (self.activation == "silu" and not self.norm_plus_one and not self.post_norms
                and not self.scale_embeddings and self.query_scale is None
                and self.attn_softcap is None and self.final_softcap is None
                and self.sliding_window is None and not self.num_experts
                and self.pre_norms and not self.qk_norm_full
                and not any(self.nope_layers) and self.embedding_multiplier == 1.0
                and self.residual_multiplier == 1.0 and self.logits_scaling == 1.0
                and not self.layer_norm and not self.norm_bias and not self.parallel_block
                and not self.qk_norm_heads and self.mlp_gated and not self.linear_bias
                and not self.o_bias
                and not self.lm_head_bias and not self.qk_l2_norm and not self.attn_sinks
                and not self.kv_lora_rank)

    def replace(self, **kw: Any) -> ModelConfig:
        return dataclasses.replace(self, **kw)

    # ---- serialisation -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        d["rope_scaling"] = list(self.rope_scaling) if self.rope_scaling else None
        d["local_layers"] = list(self.local_layers)
        d["nope_layers"] = list(self.nope_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown ModelConfig fields: {sorted(unknown)}")
        d = dict(d)
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = tuple(d["rope_scaling"])  # (the others __post_init__ fixes)
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        d["local_layers"] = tuple(d.get("local_layers", ()))
        d["nope_layers"] = tuple(d.get("nope_layers", ()))
        return cls(**d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError, TypeError) as e:
            raise ConfigError(f"cannot read model config {str(path)!r}: {e}") from e

    # ---- foreign formats -------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf: dict[str, Any], name: str | None = None) -> ModelConfig:
        """From a Hugging Face `config.json` dict of a Llama, Mistral (Ministral 8B,
        Ministral 3), Qwen2/3, Phi-2, Phi-3, SmolLM3, Granite, OLMo 2, EXAONE 4, Cohere (Command R,
        Aya; Cohere2: Command R7B, Command A), StableLM 2, GLM-4, StarCoder2, GPT-NeoX
        (Pythia) or Gemma 1/2/3
        model (a multimodal Gemma 3 or Mistral 3: its language model). Reads transformers
        5's `rope_parameters` and the older `rope_theta` / `rope_scaling` keys alike. Llama 4
        (Scout and Maverick), the mixtures of experts (MOE_TYPES: DeepSeek V2/V3, GLM-4.5,
        GLM-4.7-Flash among them) too."""
        if hf.get("model_type") == "gemma3" and "text_config" in hf:
            arch = (hf.get("architectures") or ["Gemma3ForConditionalGeneration"])[0]
            # saved text configs omit the fields that equal transformers' defaults
            hf = {**_GEMMA3_TEXT_DEFAULTS, **hf["text_config"], "model_type": "gemma3_text",
                  "architectures": [arch]}
        wrapped = {"mistral3": "Mistral3ForConditionalGeneration",  # Mistral Small 3.1+
                   "llama4": "Llama4ForConditionalGeneration"}
        if hf.get("model_type") in wrapped and "text_config" in hf:
            arch = (hf.get("architectures") or [wrapped[hf["model_type"]]])[0]
            hf = {**hf["text_config"], "architectures": [arch]}
        kind = hf.get("model_type", "llama")
        gemma = kind in GEMMA_TYPES
        if kind in (*GLM_TYPES, "phi", "glm4_moe"):  # older configs leave the default out
            hf = {"partial_rotary_factor": 0.5, **hf}
        if kind == "gpt_neox":  # transformers 4 names; its MLP biases are not optional
            if not hf.get("attention_bias", True):
                raise ConfigError("GPT-NeoX without attention biases (attention_bias=false) "
                                  "is not supported")
            hf = {"partial_rotary_factor": hf.get("rotary_pct", 0.25),
                  "rope_theta": hf.get("rotary_emb_base", 10_000.0), **hf}
        if kind == "minimax_m2":
            hf = _minimax_m2(hf)
        if kind == "ernie4_5" and hf.get("use_bias"):  # (no release has them)
            raise ConfigError("ERNIE 4.5 with biases on every projection (use_bias) is not "
                              "supported")
        if kind == "phi" and hf.get("qk_layernorm"):
            raise ConfigError("Phi's qk_layernorm is not supported")
        if hf.get("clip_qkv"):  # OLMo / OLMoE variants that clamp q, k and v
            raise ConfigError(f"clip_qkv={hf['clip_qkv']!r} is not supported")
        try:
            n = int(hf["num_attention_heads"])
            d = int(hf["hidden_size"])
            L = int(hf["num_hidden_layers"])
            eos = hf.get("eos_token_id")
            eos = [] if eos is None else (eos if isinstance(eos, list) else [eos])
            theta, local_theta, scaling = _rope(hf)
            head_dim = int(hf.get("head_dim") or d // n)
            rope = _rope_scaling(hf, scaling or {}, head_dim)
            if kind == "phimoe" and "rope_longrope" in rope:  # its cos/sin scale: an mscale
                rope["rope_attention_factor"] = _phimoe_mscale(scaling)
            mla = _latent_attention(hf, kind, scaling or {})
            if mla:  # the cache's head: [latent, RoPE key]
                head_dim = mla["kv_lora_rank"] + mla["rope_dim"]
                rope["rope_dim"] = mla.pop("rope_dim")
            act = hf.get("hidden_activation") or ("gelu_pytorch_tanh" if gemma
                                                  else hf.get("hidden_act", "silu"))
            if act not in _HF_ACTIVATIONS:
                raise ConfigError(f"unsupported activation {act!r} (supported: "
                                  f"{', '.join(_HF_ACTIVATIONS)})")
            window, local = _sliding(hf, kind, L)
            experts, chosen, mlp_dim = _moe(hf, kind)
            shared = int(hf.get("shared_expert_intermediate_size") or 0) if experts else 0
            deepseek = kind in (*DEEPSEEK_TYPES, "glm4_moe")  # DeepSeek's MoE layout
            if deepseek:
                shared = int(hf.get("n_shared_experts") or 0) * mlp_dim
            llama4, oss = kind == "llama4_text", kind == "gpt_oss"
            every = _llama4_moe_every(hf) if llama4 else 1  # Maverick: 2
            if llama4:  # every token also goes through an ungated shared expert
                shared = mlp_dim
            qpas = hf.get("query_pre_attn_scalar") if kind != "gemma" else None
            query_scale = None if qpas is None else float(qpas) ** -0.5
            if mla:
                query_scale = mla.pop("query_scale")
            if kind in ("granite", "granitemoe"):
                query_scale = float(hf.get("attention_multiplier", 1.0))
            nope = ()
            if kind == "smollm3":
                nope = tuple(not use for use in hf.get("no_rope_layers") or [
                    (i + 1) % int(hf.get("no_rope_layer_interval", 4)) != 0 for i in range(L)])
            if kind in ("cohere2", "exaone4") and window:  # global layers take no RoPE
                nope = tuple(not b for b in local)
            if llama4:  # no_rope_layers: 1 where a layer uses RoPE
                nope = tuple(not use for use in hf.get("no_rope_layers") or [
                    (i + 1) % int(hf.get("no_rope_layer_interval", 4)) != 0 for i in range(L)])
            cohere, stablelm, phimoe = kind in COHERE_TYPES, kind == "stablelm", kind == "phimoe"
            neox = kind == "gpt_neox"
            plain = kind in ("starcoder2", "phi", "gpt_neox")  # LayerNorm, plain MLP, biases
            biases = (bool(hf.get("use_bias", True)) if kind == "starcoder2"
                      else bool(hf.get("attention_bias", True)) if kind == "gpt_oss"
                      else kind in ("phi", "gpt_neox"))
            parallel = kind in ("cohere", "phi") or bool(
                hf.get("use_parallel_residual", neox) if stablelm or neox
                else kind == "cohere2")
            eps = (hf.get("layer_norm_eps", 1e-5) if cohere or stablelm or kind == "phi" or neox
                   else hf.get("norm_epsilon", 1e-5) if kind == "starcoder2"
                   else hf.get("rms_norm_eps", 1e-6 if gemma else 1e-5))
            arch = (hf.get("architectures") or [kind])[0]
            return cls(
                vocab_size=int(hf["vocab_size"]),
                d_model=d,
                mlp_dim=mlp_dim,
                num_layers=L,
                num_heads=n,
                num_kv_heads=1 if mla else int(hf.get("num_key_value_heads") or n),
                head_dim=head_dim,
                rope_theta=float(theta),
                rms_norm_eps=float(eps),
                max_seq_len=int(hf.get("max_position_embeddings", 2048)),
                tie_embeddings=bool(hf.get("tie_word_embeddings",
                                           gemma or cohere or kind == "starcoder2")),
                qkv_bias=bool(hf.get("qkv_bias", True) if kind == "qwen2_moe"
                              else hf.get("use_qkv_bias", False) if stablelm
                              else biases if plain or kind == "gpt_oss"
                              else hf.get("attention_bias", kind == "qwen2")),
                qk_norm=(kind in ("qwen3", "gemma3_text", "qwen3_moe", "olmo2", "exaone4",
                                  "olmoe")
                         or bool((cohere or kind == "glm4_moe") and hf.get("use_qk_norm"))
                         or bool(kind == "minimax_m2" and hf.get("use_qk_norm", True))
                         or bool(stablelm and hf.get("qk_layernorm"))),
                qk_norm_full=kind in ("olmo2", "olmoe", "minimax_m2"),
                qk_norm_heads=cohere or stablelm,
                layer_norm=cohere or stablelm or plain or phimoe,
                mlp_gated=not plain,
                linear_bias=biases,
                lm_head_bias=kind == "phi" or bool(phimoe and hf.get("lm_head_bias")),
                o_bias=phimoe and bool(hf.get("attention_bias")),
                router_sparsemixer=(float(hf.get("router_jitter_noise", 0.01)) if phimoe
                                    else None),
                rope_interleaved=(cohere or kind in (*GLM_TYPES, "ernie4_5") or llama4
                                  or kind == "deepseek_v2"
                                  or (kind in DEEPSEEK_TYPES and hf.get("rope_interleave", True))),
                chunked_local=llama4 and window is not None,
                qk_l2_norm=llama4 and bool(hf.get("use_qk_norm", True)),
                moe_scale_inputs=llama4,
                router_bias=oss,
                attn_sinks=oss,
                swiglu_limit=float(hf.get("swiglu_limit", 7.0)) if oss else None,
                swiglu_alpha=float(hf.get("swiglu_alpha", 1.702)),
                norm_bias=stablelm or plain or phimoe,
                parallel_block=parallel,
                parallel_mlp_norm=neox and parallel,
                pre_norms=kind not in ("olmo2", "exaone4"),
                bos_token_id=hf.get("bos_token_id"),
                eos_token_ids=tuple(int(e) for e in eos),
                pad_token_id=int(hf.get("pad_token_id") or 0),
                name=name or str(arch),
                activation=_HF_ACTIVATIONS[act],
                norm_plus_one=gemma,
                scale_embeddings=gemma,
                post_norms=(gemma and kind != "gemma") or kind in ("olmo2", "glm4", "exaone4"),
                query_scale=query_scale,
                nope_layers=nope if any(nope) else (),
                embedding_multiplier=float(hf.get("embedding_multiplier", 1.0)),
                residual_multiplier=float(hf.get("residual_multiplier", 1.0)),
                logits_scaling=(1.0 / float(hf.get("logit_scale", 0.0625)) if cohere
                                else float(hf.get("logits_scaling", 1.0))),
                attn_softcap=_float_or_none(hf.get("attn_logit_softcapping")),
                final_softcap=_float_or_none(hf.get("final_logit_softcapping")),
                sliding_window=window,
                local_layers=local,
                rope_local_theta=None if local_theta is None else float(local_theta),
                **rope,
                **_llama4_temperature(hf, kind),
                num_experts=experts,
                experts_per_token=chosen,
                norm_topk=kind != "deepseek_v2" and bool(  # (V2 never renormalises)
                    hf.get("norm_topk_prob", kind not in ("qwen2_moe", "olmoe"))),
                shared_expert_dim=shared,
                shared_expert_gate=bool(shared) and not llama4 and not deepseek,
                **(_deepseek_moe(hf, kind) if deepseek else {}),
                **({"router_sigmoid": True, "router_choice_bias": bool(
                    hf.get("use_routing_bias", True))} if kind == "minimax_m2" else {}),
                **({"moe_every": every, "dense_mlp_dim": int(hf["intermediate_size_mlp"])}
                   if every > 1 else {}),
                **mla,
            )
        except KeyError as e:
            raise ConfigError(f"Hugging Face config lacks field {e.args[0]!r}") from e

    def to_hf(self) -> dict[str, Any]:
        """A Hugging Face LlamaConfig (Qwen3Config with qk_norm) dict of the same shapes (for
        parity tests and export); Gemma configs come from their own checkpoints."""
        if not self.llama_layers:
            raise ConfigError(f"{self.name}: only dense Llama-family configs convert back to "
                              "a Hugging Face config")
        hf = {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": self.vocab_size, "hidden_size": self.d_model,
            "intermediate_size": self.mlp_dim, "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim, "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps, "max_position_embeddings": self.max_seq_len,
            "tie_word_embeddings": self.tie_embeddings, "attention_bias": self.qkv_bias,
            "bos_token_id": self.bos_token_id, "pad_token_id": self.pad_token_id,
            "eos_token_id": list(self.eos_token_ids), "hidden_act": "silu",
        }
        if self.qk_norm:
            hf.update(architectures=["Qwen3ForCausalLM"], model_type="qwen3")
        if self.rope_dim is not None:
            raise ConfigError(f"{self.name}: partial rotary dims have no Llama config")
        if self.attn_temperature is not None:
            raise ConfigError(f"{self.name}: a query temperature has no Llama config")
        if self.rope_scaling:
            f, lo, hi, orig = self.rope_scaling
            hf["rope_scaling"] = {"rope_type": "llama3", "factor": f, "low_freq_factor": lo,
                                  "high_freq_factor": hi, "original_max_position_embeddings": orig}
        if self.rope_yarn:
            f, orig, fast, slow, truncate = self.rope_yarn
            hf["rope_scaling"] = {"rope_type": "yarn", "factor": f, "beta_fast": fast,
                                  "beta_slow": slow, "truncate": truncate,
                                  "original_max_position_embeddings": orig,
                                  "attention_factor": self.rope_attention_factor}
        if self.rope_longrope:
            short, long, orig = self.rope_longrope
            hf["rope_scaling"] = {"rope_type": "longrope", "short_factor": list(short),
                                  "long_factor": list(long), "attention_factor":
                                  self.rope_attention_factor,
                                  "original_max_position_embeddings": orig}
        return hf


# transformers' hidden activation names -> ours
_HF_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh",
                   "gelu_new": "gelu_tanh", "gelu": "gelu"}

# Gemma3TextConfig's defaults (transformers), which a multimodal checkpoint's text_config
# leaves out (its 4B/12B/27B checkpoints list only the fields that differ).
_GEMMA3_TEXT_DEFAULTS = {
    "vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216,
    "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4,
    "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "pad_token_id": 0,
    "eos_token_id": 1, "bos_token_id": 2, "tie_word_embeddings": True, "rope_theta": 1e6,
    "rope_local_base_freq": 10000.0, "query_pre_attn_scalar": 256, "sliding_window": 4096,
    "sliding_window_pattern": 6,
}


def _float_or_none(x: Any) -> float | None:
    return None if x is None else float(x)


def _rope(hf: dict[str, Any]) -> tuple[float, float | None, dict | None]:
    """(global theta, local-layer theta or None, scaling dict or None) from either
    transformers 5's `rope_parameters` (flat, or per layer type) or the older keys."""
    rp = hf.get("rope_parameters")
    if isinstance(rp, dict) and isinstance(rp.get("full_attention"), dict):
        glob, loc = rp["full_attention"], rp.get("sliding_attention") or {}
        return (glob.get("rope_theta", hf.get("rope_theta", 10_000.0)), loc.get("rope_theta"),
                glob)
    if isinstance(rp, dict):
        return rp.get("rope_theta", hf.get("rope_theta", 10_000.0)), None, rp
    return (hf.get("rope_theta", 10_000.0), hf.get("rope_local_base_freq"),
            hf.get("rope_scaling") or None)


def _rope_scaling(hf: dict[str, Any], scaling: dict[str, Any], head_dim: int
                  ) -> dict[str, Any]:
    """ModelConfig's RoPE fields from a scaling dict (`rope_parameters` or `rope_scaling`):
    Llama 3, linear, YaRN, LongRoPE (Phi-3's older name "su"); partial rotary dims
    (`partial_rotary_factor`, top level or in the dict); Ministral 3's query temperature.
    transformers' defaults apply to what is left out (YaRN's betas 32 and 1, truncation on;
    the attention factors)."""
    out: dict[str, Any] = {}
    part = float(scaling.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)))
    if part != 1.0:
        out["rope_dim"] = int(head_dim * part)
    rtype = scaling.get("rope_type", scaling.get("type", "default"))
    orig = scaling.get("original_max_position_embeddings",
                       hf.get("original_max_position_embeddings"))
    if scaling.get("llama_4_scaling_beta"):  # Ministral 3's query temperature
        if orig is None:
            raise KeyError("original_max_position_embeddings")
        out["attn_temperature"] = (float(scaling["llama_4_scaling_beta"]), int(orig))
    factor = scaling.get("factor")
    if rtype == "llama3":
        out["rope_scaling"] = (float(factor), float(scaling["low_freq_factor"]),
                               float(scaling["high_freq_factor"]), int(orig))
    elif rtype == "linear":
        out["rope_linear_factor"] = float(factor)
    elif rtype == "yarn":
        if orig is None:
            raise KeyError("original_max_position_embeddings")
        factor = float(factor if factor is not None
                       else int(hf["max_position_embeddings"]) / int(orig))
        att = scaling.get("attention_factor")
        if att is None:
            mscale, all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
            att = (_yarn_mscale(factor, mscale) / _yarn_mscale(factor, all_dim)
                   if mscale and all_dim else _yarn_mscale(factor))
        out.update(rope_yarn=(factor, int(orig), float(scaling.get("beta_fast") or 32),
                              float(scaling.get("beta_slow") or 1),
                              bool(scaling.get("truncate", True))),
                   rope_attention_factor=float(att))
    elif rtype in ("longrope", "su"):
        orig = int(orig if orig is not None else hf["max_position_embeddings"])
        factor = float(factor if factor is not None
                       else int(hf["max_position_embeddings"]) / orig)
        att = scaling.get("attention_factor")
        if att is None:
            att = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(orig))
        out.update(rope_longrope=(tuple(scaling["short_factor"]), tuple(scaling["long_factor"]),
                                  orig), rope_attention_factor=float(att))
    elif rtype != "default":
        raise ConfigError(f"unsupported rope_scaling type {rtype!r} (supported: llama3, "
                          "linear, yarn, longrope)")
    return out


def _phimoe_mscale(scaling: dict[str, Any]) -> float:
    """Phi-3.5-MoE scales cos and sin by short_mscale within the original context and by
    long_mscale past it (equal in the released model); one factor per run here."""
    short, long = scaling.get("short_mscale"), scaling.get("long_mscale")
    if short is None or long is None or float(short) != float(long):
        raise ConfigError(f"Phi-3.5-MoE LongRoPE needs short_mscale == long_mscale, got "
                          f"{short!r} and {long!r}")
    return float(short)


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def local_pattern(pattern: int, num_layers: int) -> tuple[bool, ...]:
    """Every `pattern`-th layer global, the others local (Gemma 2: 2, Gemma 3: 6)."""
    return tuple((i + 1) % pattern != 0 for i in range(num_layers))


def _llama4_temperature(hf: dict[str, Any], kind: str) -> dict[str, Any]:
    """Llama 4's query temperature on its NoPE layers (attn_temperature_tuning)."""
    if kind != "llama4_text" or not hf.get("attn_temperature_tuning", True):
        return {}
    return {"attn_temperature": (float(hf.get("attn_scale", 0.1)),
                                 int(hf.get("floor_scale", 8192))),
            "attn_temperature_nope": True}


def _llama4_moe_every(hf: dict[str, Any]) -> int:
    """Llama 4's step between expert layers (Scout 1, Maverick 2: experts in layers step - 1,
    2 step - 1, ...); other `moe_layers` lists are refused."""
    L = int(hf["num_hidden_layers"])
    step = int(hf.get("interleave_moe_layer_step", 1))
    if step < 1 or L % step or list(hf.get("moe_layers") or range(step - 1, L, step)) != \
            list(range(step - 1, L, step)):
        raise ConfigError(f"Llama 4 moe_layers={hf.get('moe_layers')!r} are not every "
                          f"interleave_moe_layer_step={step}-th layer: not supported")
    return step


def _sliding(hf: dict[str, Any], kind: str, L: int) -> tuple[int | None, tuple[bool, ...]]:
    """(window, local_layers): Gemma 2/3 alternate local and global layers (`layer_types`,
    or their fixed patterns in older configs), as Cohere2's and EXAONE 4's do (three local,
    one global); Mistral's window covers every layer."""
    window = hf.get("sliding_window")
    if kind == "llama4_text":  # chunked attention on the RoPE layers (chunked_local)
        chunk = hf.get("attention_chunk_size")
        types = hf.get("layer_types") or ["chunked_attention" if use else "full_attention"
                                          for use in hf.get("no_rope_layers") or []]
        local = tuple(t == "chunked_attention" for t in types)
        return (int(chunk), local) if chunk and any(local) else (None, ())
    if kind == "ministral" and window and hf.get("layer_types"):  # Ministral 8B
        types = hf["layer_types"]
        local = tuple(t == "sliding_attention" for t in types)
        return (int(window), local) if any(local) else (None, ())
    if kind in ("gemma2", "gemma3_text", "cohere2", "exaone4", "gpt_oss") and window:
        types = hf.get("layer_types")
        if types:
            return int(window), tuple(t == "sliding_attention" for t in types)
        pattern = hf.get("sliding_window_pattern")  # EXAONE 4 may spell it "LLLG"
        pattern = 2 if kind in ("gemma2", "gpt_oss") else int(
            (len(pattern) if isinstance(pattern, str) else pattern)
            or (6 if kind == "gemma3_text" else 4))
        return int(window), local_pattern(pattern, L)
    if kind in ("mistral", "mixtral", "phi3", "ministral", "ministral3", "starcoder2",
                "phimoe") and window:
        return int(window), ()
    if hf.get("use_sliding_window"):
        raise ConfigError(f"sliding-window attention of model_type {kind!r} is not supported")
    return None, ()


def _latent_attention(hf: dict[str, Any], kind: str, scaling: dict[str, Any]
                      ) -> dict[str, Any]:
    """DeepSeek V2/V3's latent attention fields (and rope_dim, query_scale, which the caller
    places), or {}. The score scale is qk_head_dim ** -0.5 times YaRN's mscale(factor,
    mscale_all_dim) squared, as transformers computes it."""
    if kind not in DEEPSEEK_TYPES:
        return {}
    if hf.get("attention_bias"):
        raise ConfigError(f"{kind} with attention_bias is not supported")
    nope, rot = int(hf["qk_nope_head_dim"]), int(hf["qk_rope_head_dim"])
    scale = (nope + rot) ** -0.5
    if scaling.get("rope_type", scaling.get("type", "default")) != "default" \
            and scaling.get("mscale_all_dim"):
        scale *= _yarn_mscale(float(scaling["factor"]), float(scaling["mscale_all_dim"])) ** 2
    return {"q_lora_rank": int(hf.get("q_lora_rank") or 0),
            "kv_lora_rank": int(hf["kv_lora_rank"]), "qk_nope_dim": nope,
            "v_head_dim": int(hf["v_head_dim"]), "rope_dim": rot, "query_scale": scale}


def _minimax_m2(hf: dict[str, Any]) -> dict[str, Any]:
    """MiniMax-M2's config as the common fields read it: its partial RoPE as a factor (the
    releases give `rotary_dim`); what its releases never vary (sigmoid routing, q/k norms
    across all heads) is checked, not read."""
    if hf.get("scoring_func", "sigmoid") != "sigmoid":
        raise ConfigError(f"minimax_m2 scoring_func={hf['scoring_func']!r} is not supported")
    if hf.get("use_qk_norm", True) and hf.get("qk_norm_type", "per_layer") != "per_layer":
        raise ConfigError(f"minimax_m2 qk_norm_type={hf['qk_norm_type']!r} is not supported")
    if any(int(t) != 1 for t in hf.get("attn_type_list") or ()):  # 0: linear attention
        raise ConfigError("minimax_m2 with linear-attention layers (attn_type_list) is not "
                          "supported")
    if hf.get("rotary_dim"):
        n = int(hf["num_attention_heads"])
        head_dim = int(hf.get("head_dim") or int(hf["hidden_size"]) // n)
        hf = {"partial_rotary_factor": int(hf["rotary_dim"]) / head_dim, **hf}
    return hf


def _deepseek_moe(hf: dict[str, Any], kind: str) -> dict[str, Any]:
    """DeepSeek V2/V3's and GLM-4.5's routing and leading dense layers: V2 softmax scores,
    groups ranked by their best expert (topk_method group_limited_greedy) or no groups
    (greedy); V3 and GLM-4.5 sigmoid scores, a choice bias, groups ranked by their best two."""
    v2 = kind == "deepseek_v2"
    method = hf.get("topk_method", "greedy" if v2 else "noaux_tc")
    if method not in (("greedy", "group_limited_greedy") if v2 else ("noaux_tc",)):
        raise ConfigError(f"{kind} topk_method={method!r} is not supported")
    groups = None
    if method != "greedy" and int(hf.get("n_group") or 1) > 1:
        groups = (int(hf["n_group"]), int(hf["topk_group"]))
    dense = int(hf.get("first_k_dense_replace") or 0)
    if hf.get("mlp_layer_types"):  # GLM-4.7-Flash: "dense" then "sparse" layers
        types = list(hf["mlp_layer_types"])
        dense = types.index("sparse") if "sparse" in types else len(types)
        if types != ["dense"] * dense + ["sparse"] * (len(types) - dense):
            raise ConfigError(f"{kind} mlp_layer_types with dense layers after sparse ones "
                              "are not supported")
    return {"dense_layers": dense,
            "dense_mlp_dim": int(hf["intermediate_size"]), "router_sigmoid": not v2,
            "router_groups": groups, "router_group_top2": not v2, "router_choice_bias": not v2,
            "routed_scale": float(hf.get("routed_scaling_factor") or 1.0)}


def _moe(hf: dict[str, Any], kind: str) -> tuple[int, int, int]:
    """(experts, experts per token, expert MLP width); (0, 0, intermediate_size) if dense.
    Qwen2/3-MoE configs can mix in dense layers; none released does, and that is refused."""
    # transformers 5 writes num_local_experts for both; Qwen's own configs num_experts
    experts = hf.get("num_local_experts", hf.get("num_experts"))
    if kind == "llama4_text":  # Scout: experts in every layer; Maverick alternates
        _llama4_moe_every(hf)
        return (int(hf["num_local_experts"]), int(hf.get("num_experts_per_tok", 1)),
                int(hf["intermediate_size"]))
    if kind in ("mixtral", "granitemoe", "olmoe", "gpt_oss", "phimoe", "minimax_m2"):
        if experts is None:
            raise KeyError("num_local_experts")
        return int(experts), int(hf["num_experts_per_tok"]), int(hf["intermediate_size"])
    if kind in (*DEEPSEEK_TYPES, "glm4_moe"):  # after first_k_dense_replace dense layers
        if int(hf.get("moe_layer_freq") or 1) != 1:
            raise ConfigError(f"{kind} with moe_layer_freq={hf['moe_layer_freq']} is not "
                              "supported")
        return (int(hf["n_routed_experts"]), int(hf["num_experts_per_tok"]),
                int(hf["moe_intermediate_size"]))
    if kind in ("qwen2_moe", "qwen3_moe"):
        if hf.get("mlp_only_layers") or int(hf.get("decoder_sparse_step", 1)) != 1:
            raise ConfigError(f"{kind} configs with dense layers (mlp_only_layers, "
                              "decoder_sparse_step) are not supported")
        if experts is None:
            raise KeyError("num_experts")
        return int(experts), int(hf["num_experts_per_tok"]), int(hf["moe_intermediate_size"])
    return 0, 0, int(hf["intermediate_size"])
