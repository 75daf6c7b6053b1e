"""Model configuration: one frozen dataclass for every Llama-family checkpoint.

Dimension alphabet used across jaxinfer: B batch, T query positions, S key/value
positions, D model width, F MLP width, N query heads, K KV heads, G query heads per
KV head (N // K), H head dim, L layers, V vocab.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from jaxinfer.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shapes and constants of a Llama-family decoder (Llama 2/3, Mistral, Qwen2/3, SmolLM2)."""

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
    rms_norm_eps: float = 1e-5
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 carries biases on q/k/v projections.
    qk_norm: bool = False  # Qwen3 RMS-normalises each head's q and k before RoPE.
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0
    add_bos: bool = False  # whether prompts are prefixed with BOS
    name: str = "llama"

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
        if self.rope_scaling is not None:
            object.__setattr__(self, "rope_scaling", tuple(self.rope_scaling))

    @property
    def q_per_kv(self) -> int:  # G
        return self.num_heads // self.num_kv_heads

    def replace(self, **kw: Any) -> ModelConfig:
        return dataclasses.replace(self, **kw)

    # ---- serialisation -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        d["rope_scaling"] = list(self.rope_scaling) if self.rope_scaling else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown ModelConfig fields: {sorted(unknown)}")
        d = dict(d)
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = tuple(d["rope_scaling"])
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
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
        """From a Hugging Face `config.json` dict of a Llama/Mistral/Qwen2/Qwen3 model."""
        try:
            n = int(hf["num_attention_heads"])
            d = int(hf["hidden_size"])
            eos = hf.get("eos_token_id")
            eos = [] if eos is None else (eos if isinstance(eos, list) else [eos])
            scaling = None
            rs = hf.get("rope_scaling") or None
            if rs:
                kind = rs.get("rope_type", rs.get("type"))
                if kind != "llama3":
                    raise ConfigError(f"unsupported rope_scaling type {kind!r}")
                scaling = (float(rs["factor"]), float(rs["low_freq_factor"]),
                           float(rs["high_freq_factor"]),
                           int(rs["original_max_position_embeddings"]))
            arch = (hf.get("architectures") or [hf.get("model_type", "llama")])[0]
            return cls(
                vocab_size=int(hf["vocab_size"]),
                d_model=d,
                mlp_dim=int(hf["intermediate_size"]),
                num_layers=int(hf["num_hidden_layers"]),
                num_heads=n,
                num_kv_heads=int(hf.get("num_key_value_heads") or n),
                head_dim=int(hf.get("head_dim") or d // n),
                rope_theta=float(hf.get("rope_theta", 10_000.0)),
                rope_scaling=scaling,
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
                max_seq_len=int(hf.get("max_position_embeddings", 2048)),
                tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                qkv_bias=bool(hf.get("attention_bias", hf.get("model_type") == "qwen2")),
                qk_norm=hf.get("model_type") == "qwen3",
                bos_token_id=hf.get("bos_token_id"),
                eos_token_ids=tuple(int(e) for e in eos),
                pad_token_id=int(hf.get("pad_token_id") or 0),
                name=name or str(arch),
            )
        except KeyError as e:
            raise ConfigError(f"Hugging Face config lacks field {e.args[0]!r}") from e

    def to_hf(self) -> dict[str, Any]:
        """A Hugging Face LlamaConfig (Qwen3Config with qk_norm) dict of the same shapes (for
        parity tests and export)."""
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
        if self.rope_scaling:
            f, lo, hi, orig = self.rope_scaling
            hf["rope_scaling"] = {"rope_type": "llama3", "factor": f, "low_freq_factor": lo,
                                  "high_freq_factor": hi, "original_max_position_embeddings": orig}
        return hf
