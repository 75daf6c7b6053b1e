"""The Llama-family decoder (Gemma and mixture-of-experts variants too) as pure functions
over the weight tree (weights.py).

    forward(weights, tokens_BT, cache, cfg)  -> logits_BTV, cache   (all positions)
    prefill(weights, tokens_BT, num_new_B, cache, cfg) -> logits_BV at each row's last token
    decode_step(weights, tokens_B, cache, cfg) -> logits_BV

Each also takes `lora` (a lora.LoraStack of adapters) and `adapter_B` (i32[B], each row's
adapter; 0 = none): the adapters' deltas are added beside the base projections.

New tokens are written at positions cache.lengths[b] + t, so `prefill` on a non-empty
cache continues a sequence (prefix caching, chunked prefill, speculative verification).
Layers run under `lax.scan`; the stacked cache rides in the scan carry and is updated in
place, and jit donates it, so a step never copies the cache. Gemma's local and global
layers share the scanned body: the layer index picks its window and RoPE frequencies.
Cohere, Phi-2, StableLM 2 12B and GPT-NeoX run attention and the MLP side by side
(`parallel_block`).
DeepSeek's leading dense layers are a second stack scanned first, over the same cache
(Llama 4 Maverick's, between its expert layers, run in one scan over groups);
its latent attention caches one [latent, RoPE key] row per token (`latent_qk`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.attention import attention
from jaxinfer.config import ModelConfig
from jaxinfer.kv_cache import KVCache, read_kv, write_kv
from jaxinfer.layers import (
    apply_rope,
    dot,
    mlp,
    norm,
    norm_heads,
    rms_norm,
    rope_angles,
    softcap,
    unit_rms,
)
from jaxinfer.lora import LoraStack, bind
from jaxinfer.moe import moe
from jaxinfer.quant import take_rows
from jaxinfer.weights import LAYER_STACKS, Weights


def qkv(cfg: ModelConfig, w: Weights, h_BTD: jax.Array, pos_BT: jax.Array,
        layer: jax.Array | None = None, context: int = 0
        ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A layer's q [B,T,N,H], k and v [B,T,K,H] of the normed input, RoPE applied: biases
    (Qwen2), q/k RMSNorm per head (Qwen3, Gemma 3) or across heads (OLMo 2) and a query
    scale (Gemma, Granite) where the model has them. `layer` (traced) picks local-layer
    RoPE frequencies (Gemma 3) and NoPE layers (SmolLM3); `context` (the cache length)
    LongRoPE's factors. Ministral 3 (Llama 4: on NoPE layers) scales q by its position's
    temperature; Llama 4 RMS-normalises q and k after RoPE."""
    q = dot(h_BTD, w["wq"], "BTD,DNH->BTNH")
    k = dot(h_BTD, w["wk"], "BTD,DKH->BTKH")
    v = dot(h_BTD, w["wv"], "BTD,DKH->BTKH")
    if cfg.qkv_bias:
        q, k, v = q + w["bq"], k + w["bk"], v + w["bv"]
    if cfg.qk_norm_full:  # OLMo 2: over all heads at once, as over the [N*H] projection
        q, k = norm_heads(cfg, q, w["q_norm"]), norm_heads(cfg, k, w["k_norm"])
    elif cfg.qk_norm:
        q, k = norm(cfg, q, w["q_norm"]), norm(cfg, k, w["k_norm"])
    if cfg.query_scale is not None:  # attention scales scores by H ** -0.5
        q = (q * (cfg.query_scale * cfg.head_dim ** 0.5)).astype(q.dtype)
    local = None
    if cfg.rope_local_theta and any(cfg.local_L):
        if layer is None:
            raise ValueError(f"{cfg.name} has local layers: qkv needs the layer index")
        local = jnp.asarray(cfg.local_L)[layer]
    angles = rope_angles(cfg, pos_BT, local, context)
    scale = cfg.rope_attention_factor
    q_rot, k_rot = apply_rope(q, angles, scale), apply_rope(k, angles, scale)
    nope = False
    if any(cfg.nope_layers):  # SmolLM3's NoPE layers take q and k unrotated
        if layer is None:
            raise ValueError(f"{cfg.name} has NoPE layers: qkv needs the layer index")
        nope = jnp.asarray(cfg.nope_layers)[layer]
        q_rot, k_rot = jnp.where(nope, q, q_rot), jnp.where(nope, k, k_rot)
    if cfg.qk_l2_norm:  # Llama 4: after RoPE, on RoPE layers only
        q_rot = jnp.where(nope, q_rot, unit_rms(q_rot, cfg.rms_norm_eps))
        k_rot = jnp.where(nope, k_rot, unit_rms(k_rot, cfg.rms_norm_eps))
    if cfg.attn_temperature:  # sharper attention past the original context
        beta, length = cfg.attn_temperature  # (Llama 4: NoPE layers only, from p + 1)
        p = pos_BT.astype(jnp.float32) + (1.0 if cfg.attn_temperature_nope else 0.0)
        t = 1.0 + beta * jnp.log1p(jnp.floor(p / length))
        hot = (q_rot * t[:, :, None, None]).astype(q.dtype)
        q_rot = jnp.where(nope, hot, q_rot) if cfg.attn_temperature_nope else hot
    return q_rot, k_rot, v


# transformers' latent norms take RMSNorm's default epsilon whatever the config says (equal
# for DeepSeek's configs, not for GLM-4.7-Flash's 1e-5); the reference decides.
LATENT_NORM_EPS = 1e-6


def latent_qk(cfg: ModelConfig, w: Weights, h_BTD: jax.Array, pos_BT: jax.Array,
              context: int = 0) -> tuple[jax.Array, jax.Array]:
    """Latent attention's (DeepSeek V2/V3) q [B,T,N,R+Hr] and cached key [B,T,1,R+Hr]: the
    key is the normed latent c beside the RoPE key, shared by every head; each query head's
    non-RoPE part is absorbed into its key up-projection (q_nope . W_uk c = (q_nope W_uk) .
    c), so scores are one MQA dot against the cache. Scaled for the model's score scale
    (attention divides by sqrt(R + Hr))."""
    Hn, R = cfg.qk_nope_dim, cfg.kv_lora_rank
    if cfg.q_lora_rank:
        c = dot(h_BTD, w["wq_a"], "BTD,DR->BTR")
        q = dot(rms_norm(c, w["q_a_norm"], LATENT_NORM_EPS), w["wq_b"], "BTR,RNH->BTNH")
    else:
        q = dot(h_BTD, w["wq"], "BTD,DNH->BTNH")
    kv = dot(h_BTD, w["wkv_a"], "BTD,DR->BTR")
    angles = rope_angles(cfg, pos_BT, None, context)
    q_rope = apply_rope(q[..., Hn:], angles, cfg.rope_attention_factor)
    k_rope = apply_rope(kv[:, :, None, R:], angles, cfg.rope_attention_factor)
    q_latent = dot(q[..., :Hn], w["w_uk"], "BTNH,NHR->BTNR")
    q = jnp.concatenate([q_latent, q_rope], axis=-1)
    q = (q * (cfg.query_scale * cfg.head_dim ** 0.5)).astype(q.dtype)
    k = jnp.concatenate([rms_norm(kv[:, :, None, :R], w["kv_a_norm"], LATENT_NORM_EPS), k_rope],
                        axis=-1)
    return q, k


def layer_window(cfg: ModelConfig, layer: jax.Array) -> jax.Array | None:
    """The layer's sliding window as a traced i32 (no window: more than any position), or
    None when the model has no local layers."""
    if not any(cfg.local_L):
        return None
    return jnp.where(jnp.asarray(cfg.local_L)[layer], cfg.sliding_window, np.int32(2**30))


def _bias(cfg: ModelConfig, w: Weights, norm_name: str) -> jax.Array | None:
    """A norm's bias where the model has them (StableLM, StarCoder2, Phi-2)."""
    return w[norm_name + "_bias"] if cfg.norm_bias else None


def embed(cfg: ModelConfig, weights: Weights, tokens_BT: jax.Array) -> jax.Array:
    """Embedding rows in the weights' dtype; Gemma scales them by sqrt(D) (in that dtype,
    as its reference does)."""
    dtype = weights["embed"].dtype
    x = take_rows(weights["embed"], tokens_BT, dtype)
    if cfg.scale_embeddings:
        x = x * jnp.asarray(cfg.d_model ** 0.5, dtype)
    if cfg.embedding_multiplier != 1.0:  # Granite
        x = x * jnp.asarray(cfg.embedding_multiplier, dtype)
    return x


def _block(cfg: ModelConfig, impl: str, adapter_B: jax.Array | None, experts: bool, carry,
           xs):
    """One decoder layer (its MLP experts or dense, static per stack). carry = (x_BTD,
    k [L,B,K,S,H], v, k/v scales [L,B,K,S] or None, positions_BT, rows_B1); xs = (the
    layer's weights, its index, its adapters' (a, b) or None)."""
    x, ck, cv, ks, vs, pos_BT, rows_B1 = carry
    w, i, ab = xs
    if ab is not None:
        w = bind(w, *ab, adapter_B)
    window = layer_window(cfg, i)
    with jax.named_scope("attention"):
        h = norm(cfg, x, w["attn_norm"], _bias(cfg, w, "attn_norm")) if cfg.pre_norms else x
        if cfg.kv_lora_rank:
            q, k = latent_qk(cfg, w, h, pos_BT, ck.shape[3])
            ck, ks = write_kv(ck, ks, i, rows_B1, pos_BT, k)
            values, value_scales = ck, ks  # the keys' latent part: one cache, read twice
        else:
            q, k, v = qkv(cfg, w, h, pos_BT, i, ck.shape[3])
            # Scatter the new K/V of every row at its own positions; out-of-range slots drop.
            ck, ks = write_kv(ck, ks, i, rows_B1, pos_BT, k)
            cv, vs = write_kv(cv, vs, i, rows_B1, pos_BT, v)
            values, value_scales = cv, vs
        kw = dict(window=window, softcap=cfg.attn_softcap, chunked=cfg.chunked_local,
                  sinks_N=w["sinks"] if cfg.attn_sinks else None)
        if ck.dtype == q.dtype and ks is None:  # kernels read layer i of the stacked cache in place
            o = attention(q, ck, values, pos_BT, impl, layer=i, **kw)
        else:
            o = attention(q, read_kv(ck, ks, i, q.dtype),
                          read_kv(values, value_scales, i, q.dtype), pos_BT, impl, **kw)
        if cfg.kv_lora_rank:  # each head's latent output lifted to its values
            o = dot(o[..., :cfg.kv_lora_rank], w["w_uv"], "BTNR,NRH->BTNH")
        o = dot(o, w["wo"], "BTNH,NHD->BTD")
        o = o + w["bo"] if cfg.attn_out_bias else o
        o = norm(cfg, o, w["post_attn_norm"]) if cfg.post_norms else o
        o = o * cfg.residual_multiplier if cfg.residual_multiplier != 1.0 else o
    with jax.named_scope("mlp"):
        if not cfg.parallel_block:  # (parallel: the MLP reads attention's normed input h,
            x = x + o  # or its own norm of x: GPT-NeoX)
            h = norm(cfg, x, w["mlp_norm"], _bias(cfg, w, "mlp_norm")) if cfg.pre_norms else x
        elif cfg.parallel_mlp_norm:
            h = norm(cfg, x, w["mlp_norm"], _bias(cfg, w, "mlp_norm"))
        h = (moe(cfg, h, w) if experts
             else mlp(h, w.get("w_gate"), w["w_up"], w["w_down"], cfg.activation,
                      *((w["b_up"], w["b_down"]) if cfg.linear_bias else ())))
        h = norm(cfg, h, w["post_mlp_norm"]) if cfg.post_norms else h
        h = h * cfg.residual_multiplier if cfg.residual_multiplier != 1.0 else h
        x = x + o + h if cfg.parallel_block else x + h  # the references' order of adds
    return (x, ck, cv, ks, vs, pos_BT, rows_B1), None


def _stacked(cfg: ModelConfig, impl: str, adapter_B: jax.Array | None, weights: Weights,
             ab, carry):
    """The layers as one scan per stack (DeepSeek's leading dense layers first; most
    models have one stack), threading the one cache through."""
    first = 0
    for stack in LAYER_STACKS:
        if stack not in weights:
            continue
        n = jax.tree.leaves(weights[stack])[0].shape[0]
        part = slice(first, first + n)
        experts = bool(cfg.num_experts) and stack == "layers"
        carry, _ = jax.lax.scan(
            functools.partial(_block, cfg, impl, adapter_B, experts), carry,
            (weights[stack], jnp.arange(first, first + n, dtype=jnp.int32),
             None if ab is None else jax.tree.map(lambda a, part=part: a[part], ab)))
        first += n
    return carry


def _interleaved(cfg: ModelConfig, impl: str, adapter_B: jax.Array | None, weights: Weights,
                 ab, carry):
    """Llama 4 Maverick's layers: one scan over groups of moe_every layers, the group's
    dense layers (from the dense stack) and then its expert layer."""
    step, G = cfg.moe_every, cfg.num_layers // cfg.moe_every
    ids = np.arange(cfg.num_layers, dtype=np.int32).reshape(G, step)
    dense = jax.tree.map(lambda a: a.reshape(G, step - 1, *a.shape[1:]), weights["dense_layers"])
    ab_dense = ab_moe = None
    if ab is not None:  # adapters are stacked over all layers: each group's own
        ab_dense = jax.tree.map(lambda a: a[ids[:, :-1]], ab)
        ab_moe = jax.tree.map(lambda a: a[ids[:, -1]], ab)

    def group(carry, xs):
        w_dense, w_moe, ids_g, ab_d, ab_m = xs
        for j in range(step - 1):
            pick = lambda t, j=j: None if t is None else jax.tree.map(lambda a: a[j], t)
            carry, _ = _block(cfg, impl, adapter_B, False, carry,
                              (pick(w_dense), ids_g[j], pick(ab_d)))
        carry, _ = _block(cfg, impl, adapter_B, True, carry, (w_moe, ids_g[-1], ab_m))
        return carry, None

    carry, _ = jax.lax.scan(group, carry, (dense, weights["layers"], jnp.asarray(ids), ab_dense,
                                           ab_moe))
    return carry


def hidden_states(weights: Weights, tokens_BT: jax.Array, cache: KVCache, cfg: ModelConfig,
                  impl: str = "xla", lora: LoraStack | None = None,
                  adapter_B: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
    """Final-norm hidden states [B, T, D] and the cache with the new K/V written.

    cache.lengths is NOT advanced here: callers know how many of the T tokens are real.
    """
    B, T = tokens_BT.shape
    x = embed(cfg, weights, tokens_BT)
    pos_BT = cache.lengths[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
    rows_B1 = jnp.arange(B, dtype=jnp.int32)[:, None]
    ab = None
    if lora is not None:
        ab = (lora.a, lora.b)
        adapter_B = jnp.zeros((B,), jnp.int32) if adapter_B is None else adapter_B
    carry = (x, cache.k, cache.v, cache.k_scale, cache.v_scale, pos_BT, rows_B1)
    run = _interleaved if cfg.moe_every > 1 else _stacked
    x, ck, cv, ks, vs, _, _ = run(cfg, impl, adapter_B, weights, ab, carry)
    x = norm(cfg, x, weights["final_norm"], _bias(cfg, weights, "final_norm"))
    return x, KVCache(k=ck, v=cv, lengths=cache.lengths, k_scale=ks, v_scale=vs)


def unembed(weights: Weights, x_BxD: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Logits in float32; tied models reuse the embedding matrix; Gemma 2 soft-caps them."""
    if "lm_head" in weights:
        logits = dot(x_BxD, weights["lm_head"], "...D,DV->...V",
                     preferred_element_type=jnp.float32)
    else:
        logits = dot(x_BxD, weights["embed"], "...D,VD->...V",
                     preferred_element_type=jnp.float32)
    if cfg.lm_head_bias:  # Phi-2
        logits = logits + weights["lm_head_bias"].astype(jnp.float32)
    if cfg.logits_scaling != 1.0:  # Granite
        logits = logits / cfg.logits_scaling
    return softcap(logits, cfg.final_softcap)


@functools.partial(jax.jit, static_argnames=("cfg", "impl"), donate_argnames=("cache",))
def forward(weights: Weights, tokens_BT: jax.Array, cache: KVCache, cfg: ModelConfig,
            impl: str = "xla", lora: LoraStack | None = None,
            adapter_B: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
    """Logits for all T positions [B, T, V]; advances every row by T."""
    x, cache = hidden_states(weights, tokens_BT, cache, cfg, impl, lora, adapter_B)
    cache = cache.with_lengths(cache.lengths + tokens_BT.shape[1])
    return unembed(weights, x, cfg), cache


@functools.partial(jax.jit, static_argnames=("cfg", "impl"), donate_argnames=("cache",))
def prefill(weights: Weights, tokens_BT: jax.Array, num_new_B: jax.Array, cache: KVCache,
            cfg: ModelConfig, impl: str = "xla", lora: LoraStack | None = None,
            adapter_B: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
    """Write a (padded) chunk of prompt tokens; logits [B, V] at each row's last real token.

    tokens_BT is right-padded to a bucket length T; num_new_B (i32[B]) counts the real
    tokens per row. Padding K/V lands beyond the new lengths and is overwritten later.
    """
    x, cache = hidden_states(weights, tokens_BT, cache, cfg, impl, lora, adapter_B)
    last = jnp.clip(num_new_B - 1, 0, tokens_BT.shape[1] - 1)
    x_BD = jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
    return unembed(weights, x_BD, cfg), cache.with_lengths(cache.lengths + num_new_B)


def decode_logits(weights: Weights, tokens_B: jax.Array, cache: KVCache, cfg: ModelConfig,
                  impl: str = "xla", lora: LoraStack | None = None,
                  adapter_B: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
    """One token per row (unjitted body, for use inside larger jitted loops)."""
    x, cache = hidden_states(weights, tokens_B[:, None], cache, cfg, impl, lora, adapter_B)
    return unembed(weights, x[:, 0], cfg), cache.with_lengths(cache.lengths + 1)


decode_step = jax.jit(decode_logits, static_argnames=("cfg", "impl"), donate_argnames=("cache",))
