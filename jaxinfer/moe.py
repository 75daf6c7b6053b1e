"""Mixture-of-experts MLP (Mixtral, Qwen3-MoE) as a pure function.

    router_DE                 the router's logits per expert
    gate_EDF, up_EDF, down_EFD  every expert's gated MLP, stacked on E
    returns [B, T, D]: sum over each token's C chosen experts of weight * expert(x)

Routing is the reference's: softmax over the E router logits in float32, the top C,
renormalised to sum 1 (`norm_topk`). Two ways to run the experts, picked from static
shapes so a program never switches:
  - few tokens (decode: B * T * C <= E): gather the chosen experts' weights, so a step
    reads C experts per token, not all E;
  - many tokens (prefill): run every expert on every token and weight the outputs by the
    router's (mostly zero) combine weights: E / C times the FLOPs of the sparse result,
    but dense einsums that shard like the dense MLP. On CPU this beat
    `lax.ragged_dot` (grouped matmul), which XLA:CPU runs as a slow loop; a
    grouped-matmul kernel for accelerators is the follow-up.
Expert weights may be quantized (QArrays): `layers.dot` dequantizes inside each dot, and
the gather takes the chosen experts' integers and scales alike.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxinfer.config import ModelConfig
from jaxinfer.layers import activate, dot


def route(cfg: ModelConfig, x_BTD: jax.Array, router_DE: jax.Array
          ) -> tuple[jax.Array, jax.Array]:
    """(weights [B, T, C] in x's dtype, expert ids i32[B, T, C]) of each token's experts."""
    logits = jnp.einsum("BTD,DE->BTE", x_BTD, router_DE, preferred_element_type=jnp.float32)
    top_BTC, ids_BTC = jax.lax.top_k(jax.nn.softmax(logits, axis=-1), cfg.experts_per_token)
    if cfg.norm_topk:
        top_BTC = top_BTC / jnp.sum(top_BTC, axis=-1, keepdims=True)
    return top_BTC.astype(x_BTD.dtype), ids_BTC


def moe(cfg: ModelConfig, x_BTD: jax.Array, w: dict) -> jax.Array:
    """The layer's expert MLPs on the normed input x; w holds router, moe_gate/up/down."""
    B, T, _ = x_BTD.shape
    E, C = cfg.num_experts, cfg.experts_per_token
    top_BTC, ids_BTC = route(cfg, x_BTD, w["router"])
    if B * T * C <= E:  # read only the chosen experts
        pick = lambda name: jax.tree.map(lambda a: a[ids_BTC], w[name])  # QArrays too
        g = dot(x_BTD, pick("moe_gate"), "BTD,BTCDF->BTCF")
        u = dot(x_BTD, pick("moe_up"), "BTD,BTCDF->BTCF")
        h = activate(g, cfg.activation) * u * top_BTC[..., None]
        return dot(h, pick("moe_down"), "BTCF,BTCFD->BTD")
    combine_BTE = jnp.sum(jax.nn.one_hot(ids_BTC, E, dtype=x_BTD.dtype) * top_BTC[..., None],
                          axis=-2)
    g = dot(x_BTD, w["moe_gate"], "BTD,EDF->BTEF")
    u = dot(x_BTD, w["moe_up"], "BTD,EDF->BTEF")
    h = activate(g, cfg.activation) * u * combine_BTE[..., None]
    return dot(h, w["moe_down"], "BTEF,EFD->BTD")
