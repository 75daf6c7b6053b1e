"""The abstract weight tree: one declaration per weight, the single source of truth.

`weight_specs(cfg)` returns a nested dict whose leaves are `ArrayInfo`. From it come the
shapes and dtypes (`abstract_weights`), the shardings (`weight_shardings`), random init
(`init_weights`), the Orbax restore target (checkpoint.py) and the converters' targets.

Tree layout (layers stacked on a leading L axis and run with lax.scan):
    embed       [V, D]
    layers/attn_norm [L, D]      layers/mlp_norm [L, D]
    layers/post_attn_norm [L, D] layers/post_mlp_norm [L, D]   (post_norms only: Gemma 2/3)
    layers/q_norm [L, H]         layers/k_norm [L, H]          (qk_norm only;
                                   [L, N, H], [L, K, H] with qk_norm_heads: Cohere, OLMo 2)
    layers/attn_norm_bias [L, D] layers/mlp_norm_bias [L, D]   (norm_bias only: StableLM;
    final_norm_bias [D]                                        no mlp_norm: parallel_block,
                                                               but for parallel_mlp_norm)
    layers/wq   [L, D, N, H]     layers/bq [L, N, H]   (qkv_bias only)
    layers/wk   [L, D, K, H]     layers/bk [L, K, H]
    layers/wv   [L, D, K, H]     layers/bv [L, K, H]
    layers/wo   [L, N, H, D]
    (latent attention instead, DeepSeek: layers/wq_a [L, D, Rq], q_a_norm [L, Rq],
     wq_b [L, Rq, N, Hn + Hr] (or wq [L, D, N, Hn + Hr] without q_lora_rank),
     wkv_a [L, D, R + Hr], kv_a_norm [L, R], w_uk [L, N, Hn, R], w_uv [L, N, R, Hv],
     wo [L, N, Hv, D]; R kv_lora_rank, Hn qk_nope_dim, Hr rope_dim, Hv v_head_dim)
    layers/w_gate [L, D, F]   layers/w_up [L, D, F]   layers/w_down [L, F, D]
    (no w_gate without mlp_gated; linear_bias (o_bias: bo only) adds layers/bo [L, D], b_up [L, F],
     b_down [L, D]: StarCoder2, Phi-2)
    (mixture of experts instead: layers/router [L, D, E], layers/moe_gate [L, E, D, F],
     layers/moe_up [L, E, D, F], layers/moe_down [L, E, F, D]; a shared expert adds
     layers/shared_gate, shared_up [L, D, Fs], shared_down [L, Fs, D], shared_router [L, D];
     gpt-oss: layers/router_b [L, E], moe_b_gate, moe_b_up [L, E, F], moe_b_down [L, E, D],
     and layers/sinks [L, N])
    (DeepSeek V3 adds layers/router_choice_b [L, E]; DeepSeek's and GLM-4.5's leading
     dense layers, and Llama 4 Maverick's between its expert layers, are a second stack,
     dense_layers/..., of the same names with a dense MLP of width dense_mlp_dim;
     ModelConfig.layer_slot says where each layer is)
    final_norm  [D]
    lm_head     [D, V]           (absent when embeddings are tied)
    lm_head_bias [V]             (lm_head_bias only: Phi-2)
Q/K use the Hugging Face "rotate half" RoPE layout.

With `quant` (quant.QuantConfig) the linear weights (and the embedding / lm_head) become
`QArray(values, scales[, offsets])` nodes of ArrayInfo leaves; scales keep the weight's
logical axes, so the one rules table shards them with their weights.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.config import ModelConfig
from jaxinfer.errors import ConfigError
from jaxinfer.quant import QArray, QuantConfig, QuantSpec, is_qarray, quantize, scales_shape
from jaxinfer.sharding import ShardingRules, logical_to_spec

Weights = dict[str, Any]  # nested dict of arrays, the layout above


@dataclasses.dataclass(frozen=True)
class ArrayInfo:
    """One weight: shape, dtype, logical axis names (see sharding.py) and an init rule."""

    shape: tuple[int, ...]
    dtype: Any
    logical_axes: tuple[str | None, ...]
    init: str = "normal"  # "normal" (fan-in scaled), "ones", "zeros" or "int" (quantized)
    fan_in_axes: tuple[int, ...] = ()  # axes whose product is the fan-in, for "normal"
    fill: float = 1.0  # the value of "ones" (quantization scales)

    def __post_init__(self):
        assert len(self.shape) == len(self.logical_axes), (self.shape, self.logical_axes)


def is_info(x: Any) -> bool:
    return isinstance(x, ArrayInfo)


# Quantizable weights: (contraction axes, group axis), counted from the end so they hold
# for the stacked [L, ...] arrays and for one layer's slice inside the scan.
LINEAR_QUANT_AXES = {"wq": ((-3,), -3), "wk": ((-3,), -3), "wv": ((-3,), -3),
                     "wo": ((-3, -2), -2), "w_gate": ((-2,), -2), "w_up": ((-2,), -2),
                     "w_down": ((-2,), -2), "moe_gate": ((-2,), -2), "moe_up": ((-2,), -2),
                     "moe_down": ((-2,), -2), "shared_gate": ((-2,), -2),
                     "shared_up": ((-2,), -2), "shared_down": ((-2,), -2),
                     "wq_a": ((-2,), -2), "wq_b": ((-3,), -3), "wkv_a": ((-2,), -2),
                     "w_uk": ((-2,), -2), "w_uv": ((-2,), -2)}
EMBED_QUANT_AXES = {"embed": ((-1,), -1), "lm_head": ((-2,), -2)}


def _quant_info(a: ArrayInfo, spec: QuantSpec, contract: tuple[int, ...], group_axis: int
                ) -> QArray:
    shape = scales_shape(a.shape, contract, group_axis, spec.group_size)
    axes = tuple(ax if n == full or n > 1 else None
                 for ax, n, full in zip(a.logical_axes, shape, a.shape, strict=True))
    fan_in = int(np.prod([a.shape[i] for i in a.fan_in_axes])) if a.fan_in_axes else 1
    scale = ArrayInfo(shape, a.dtype, axes, "ones", fill=1.0 / (4.32 * np.sqrt(fan_in)))
    return QArray(values=ArrayInfo(a.shape, spec.dtype, a.logical_axes, "int"), scales=scale,
                  offsets=ArrayInfo(shape, a.dtype, axes, "zeros") if spec.offsets else None,
                  group_axis=None if spec.group_size is None else group_axis)


# The layer stacks: a mixture of experts' dense layers (DeepSeek's leading ones, run first;
# Llama 4 Maverick's, run in groups with the expert layers), and the rest (for most models
# every layer).
LAYER_STACKS = ("dense_layers", "layers")


def weight_specs(cfg: ModelConfig, dtype: Any = jnp.float32,
                 quant: QuantConfig | None = None) -> Weights:
    D, V = cfg.d_model, cfg.vocab_size
    A = lambda shape, axes, init="normal", fan_in=(): ArrayInfo(shape, dtype, axes, init, fan_in)
    one = "zeros" if cfg.norm_plus_one else "ones"  # a norm's identity scale
    tree = {"embed": A((V, D), ("vocab", "embed"), fan_in=(1,))}
    if cfg.num_dense_layers:  # DeepSeek's leading, Maverick's in-between dense layers
        tree["dense_layers"] = _layer_specs(cfg, cfg.num_dense_layers, False, A, one)
    tree["layers"] = _layer_specs(cfg, cfg.num_layers - cfg.num_dense_layers,
                                  bool(cfg.num_experts), A, one)
    tree["final_norm"] = A((D,), ("norm",), one)
    if cfg.norm_bias:
        tree["final_norm_bias"] = A((D,), ("norm",), "zeros")
    if not cfg.tie_embeddings:
        tree["lm_head"] = A((D, V), ("embed", "vocab"), fan_in=(0,))
    if cfg.lm_head_bias:
        tree["lm_head_bias"] = A((V,), ("vocab",), "zeros")
    if quant is not None and quant.linear is not None:
        for stack in LAYER_STACKS:
            layers = tree.get(stack, {})
            for name, (contract, group) in LINEAR_QUANT_AXES.items():
                if name in layers:  # dense MLP or experts, whichever the model has
                    layers[name] = _quant_info(layers[name], quant.linear, contract, group)
    if quant is not None and quant.embed is not None:
        for name, (contract, group) in EMBED_QUANT_AXES.items():
            if name in tree:
                tree[name] = _quant_info(tree[name], quant.embed, contract, group)
    return tree


def _layer_specs(cfg: ModelConfig, L: int, experts: bool, A: Callable, one: str) -> Weights:
    """One stack of L layers, with experts or a dense MLP (dense_mlp_dim wide in the dense
    stack of a mixture of experts)."""
    D, N, K, H = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    F = cfg.dense_mlp_dim if cfg.num_dense_layers and not experts else cfg.mlp_dim
    layers = {
        "attn_norm": A((L, D), ("layers", "norm"), one),
        "wq": A((L, D, N, H), ("layers", "embed", "q_heads", "head_dim"), fan_in=(1,)),
        "wk": A((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim"), fan_in=(1,)),
        "wv": A((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim"), fan_in=(1,)),
        "wo": A((L, N, H, D), ("layers", "q_heads", "head_dim", "embed"), fan_in=(1, 2)),
        "mlp_norm": A((L, D), ("layers", "norm"), one),
        "w_gate": A((L, D, F), ("layers", "embed", "mlp"), fan_in=(1,)),
        "w_up": A((L, D, F), ("layers", "embed", "mlp"), fan_in=(1,)),
        "w_down": A((L, F, D), ("layers", "mlp", "embed"), fan_in=(1,)),
    }
    if experts:
        E = cfg.num_experts
        for name in ("w_gate", "w_up", "w_down"):
            del layers[name]
        layers["router"] = A((L, D, E), ("layers", "embed", "router_experts"), fan_in=(1,))
        layers["moe_gate"] = A((L, E, D, F), ("layers", "experts", "embed", "mlp"), fan_in=(2,))
        layers["moe_up"] = A((L, E, D, F), ("layers", "experts", "embed", "mlp"), fan_in=(2,))
        layers["moe_down"] = A((L, E, F, D), ("layers", "experts", "mlp", "embed"), fan_in=(2,))
        if cfg.shared_expert_dim:  # every token's expert: a dense MLP beside the routed ones
            Fs = cfg.shared_expert_dim
            layers["shared_gate"] = A((L, D, Fs), ("layers", "embed", "mlp"), fan_in=(1,))
            layers["shared_up"] = A((L, D, Fs), ("layers", "embed", "mlp"), fan_in=(1,))
            layers["shared_down"] = A((L, Fs, D), ("layers", "mlp", "embed"), fan_in=(1,))
        if cfg.shared_expert_gate:
            layers["shared_router"] = A((L, D), ("layers", "embed"), fan_in=(1,))
        if cfg.router_bias:
            layers["router_b"] = A((L, E), ("layers", "router_experts"), "zeros")
        if cfg.linear_bias:  # gpt-oss: each expert's biases
            layers["moe_b_gate"] = A((L, E, F), ("layers", "experts", "mlp"), "zeros")
            layers["moe_b_up"] = A((L, E, F), ("layers", "experts", "mlp"), "zeros")
            layers["moe_b_down"] = A((L, E, D), ("layers", "experts", "norm"), "zeros")
    if cfg.post_norms:
        layers["post_attn_norm"] = A((L, D), ("layers", "norm"), one)
        layers["post_mlp_norm"] = A((L, D), ("layers", "norm"), one)
    if cfg.qk_norm and cfg.qk_norm_heads:  # per head (Cohere, StableLM; OLMo 2 across them)
        layers["q_norm"] = A((L, N, H), ("layers", "q_heads", "head_dim"), one)
        layers["k_norm"] = A((L, K, H), ("layers", "kv_heads", "head_dim"), one)
    elif cfg.qk_norm:
        layers["q_norm"] = A((L, H), ("layers", "head_dim"), one)
        layers["k_norm"] = A((L, H), ("layers", "head_dim"), one)
    if not cfg.pre_norms:  # OLMo 2: norms after attention and the MLP only
        del layers["attn_norm"], layers["mlp_norm"]
    if cfg.shared_input_norm:  # attention and the MLP share the one input norm
        del layers["mlp_norm"]
    if not cfg.mlp_gated:  # StarCoder2, Phi-2: up, activation, down
        del layers["w_gate"]
    if cfg.attn_out_bias:
        layers["bo"] = A((L, D), ("layers", "norm"), "zeros")
    if cfg.linear_bias:
        if not experts:
            layers["b_up"] = A((L, F), ("layers", "mlp"), "zeros")
            layers["b_down"] = A((L, D), ("layers", "norm"), "zeros")
    if cfg.attn_sinks:  # gpt-oss
        layers["sinks"] = A((L, N), ("layers", "q_heads"), "zeros")
    if cfg.norm_bias:  # StableLM's LayerNorms
        for name in ("attn_norm", "mlp_norm"):
            if name in layers:
                layers[name + "_bias"] = A((L, D), ("layers", "norm"), "zeros")
    if cfg.qkv_bias:
        layers["bq"] = A((L, N, H), ("layers", "q_heads", "head_dim"), "zeros")
        layers["bk"] = A((L, K, H), ("layers", "kv_heads", "head_dim"), "zeros")
        layers["bv"] = A((L, K, H), ("layers", "kv_heads", "head_dim"), "zeros")
    if cfg.kv_lora_rank:  # DeepSeek's latent attention replaces q/k/v/o
        R, Rq, Hn, Hr, Hv = (cfg.kv_lora_rank, cfg.q_lora_rank, cfg.qk_nope_dim, cfg.rope_dim,
                             cfg.v_head_dim)
        for name in ("wq", "wk", "wv", "wo"):
            del layers[name]
        if Rq:
            layers["wq_a"] = A((L, D, Rq), ("layers", "embed", "latent"), fan_in=(1,))
            layers["q_a_norm"] = A((L, Rq), ("layers", "latent"), one)
            layers["wq_b"] = A((L, Rq, N, Hn + Hr), ("layers", "latent", "q_heads", "head_dim"),
                               fan_in=(1,))
        else:
            layers["wq"] = A((L, D, N, Hn + Hr), ("layers", "embed", "q_heads", "head_dim"),
                             fan_in=(1,))
        layers["wkv_a"] = A((L, D, R + Hr), ("layers", "embed", "latent"), fan_in=(1,))
        layers["kv_a_norm"] = A((L, R), ("layers", "latent"), one)
        layers["w_uk"] = A((L, N, Hn, R), ("layers", "q_heads", "head_dim", "latent"),
                           fan_in=(2,))
        layers["w_uv"] = A((L, N, R, Hv), ("layers", "q_heads", "latent", "head_dim"),
                           fan_in=(2,))
        layers["wo"] = A((L, N, Hv, D), ("layers", "q_heads", "head_dim", "embed"),
                         fan_in=(1, 2))
    if cfg.router_choice_bias and experts:  # DeepSeek V3: picks experts, weighs nothing
        layers["router_choice_b"] = A((L, cfg.num_experts), ("layers", "router_experts"),
                                      "zeros")
    return layers


def quantize_weights(weights: Weights, quant: QuantConfig, shardings: Weights | None = None
                     ) -> Weights:
    """Quantize a float weight tree per `quant`; with `shardings` (from
    `weight_shardings(weight_specs(cfg, dtype, quant), mesh)`) each result lands sharded."""
    out = dict(weights)
    stacks = {k: dict(weights[k]) for k in LAYER_STACKS if k in weights}
    todo = [(layers, n, quant.linear, ax, (k, n)) for k, layers in stacks.items()
            for n, ax in LINEAR_QUANT_AXES.items() if n in layers]
    todo += [(out, n, quant.embed, ax, (n,)) for n, ax in EMBED_QUANT_AXES.items() if n in out]
    for tree, name, spec, (contract, group), path in todo:
        if spec is None:
            continue
        w = tree[name]
        if is_qarray(w):
            raise ConfigError(f"weight {'/'.join(path)} is already quantized")
        sh = shardings
        for k in path:
            sh = None if sh is None else sh[k]
        tree[name] = quantize_fn(spec, contract, group, jnp.dtype(w.dtype), sh)(w)
    out.update(stacks)
    return out


@functools.lru_cache(maxsize=128)
def quantize_fn(spec: QuantSpec, contract: tuple[int, ...], group: int, dtype: Any,
                 sharding: Any) -> Callable:
    """One jitted quantizer per (spec, axes, dtype, sharding): repeated loads reuse it."""
    return jax.jit(lambda w: quantize(w, spec, contract, group, dtype), out_shardings=sharding)


def map_specs(fn: Callable[[ArrayInfo], Any], specs: Weights) -> Weights:
    return jax.tree.map(fn, specs, is_leaf=is_info)


def weight_shardings(specs: Weights, mesh: jax.sharding.Mesh,
                     rules: ShardingRules | None = None) -> Weights:
    """NamedShardings for every weight, from the one logical-to-mesh table."""
    rules = rules or ShardingRules.default()

    def one(path, a: ArrayInfo):
        spec = logical_to_spec(a.logical_axes, rules.weights, mesh, a.shape,
                               jax.tree_util.keystr(path))
        return jax.sharding.NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(one, specs, is_leaf=is_info)


def abstract_weights(specs: Weights, shardings: Weights | None = None) -> Weights:
    """ShapeDtypeStructs (with shardings if given): the restore target and jit avals."""
    if shardings is None:
        return map_specs(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), specs)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        specs, shardings, is_leaf=is_info)


def init_weights(specs: Weights, key: jax.Array, shardings: Weights | None = None) -> Weights:
    """Random weights of the declared shapes (tests, benchmarks of unreleased sizes)."""
    leaves, treedef = jax.tree.flatten(specs, is_leaf=is_info)
    keys = jax.random.split(key, len(leaves))

    def one(a: ArrayInfo, k):
        if a.init == "ones":
            return jnp.full(a.shape, a.fill, a.dtype)
        if a.init == "int":  # quantized values: uniform in [-7, 7] (std 4.32)
            return jax.random.randint(k, a.shape, -7, 8, jnp.int8).astype(a.dtype)
        if a.init == "zeros":
            return jnp.zeros(a.shape, a.dtype)
        fan_in = int(np.prod([a.shape[i] for i in a.fan_in_axes])) if a.fan_in_axes else 1
        return (jax.random.normal(k, a.shape, jnp.float32) / np.sqrt(fan_in)).astype(a.dtype)

    out = []
    shard_leaves = (jax.tree.leaves(shardings) if shardings is not None
                    else [None] * len(leaves))
    for a, k, s in zip(leaves, keys, shard_leaves, strict=True):
        fn = jax.jit(lambda k, a=a: one(a, k), out_shardings=s)
        out.append(fn(k))
    return jax.tree.unflatten(treedef, out)


def count_params(specs: Weights) -> int:
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(specs, is_leaf=is_info))


def check_weights(specs: Weights, weights: Weights) -> None:
    """Raise ConfigError if `weights` does not have exactly the declared tree and shapes."""
    want = jax.tree.flatten_with_path(specs, is_leaf=is_info)[0]
    got = dict(jax.tree.flatten_with_path(weights)[0])
    if len(got) != len(want):
        names = lambda t: sorted(jax.tree_util.keystr(p) for p, _ in t)
        raise ConfigError(f"weight tree mismatch: expected {names(want)}, got {names(got.items())}")
    for path, a in want:
        if path not in got:
            raise ConfigError(f"missing weight {jax.tree_util.keystr(path)}")
        if tuple(got[path].shape) != a.shape:
            raise ConfigError(f"weight {jax.tree_util.keystr(path)} has shape "
                              f"{tuple(got[path].shape)}, expected {a.shape}")
