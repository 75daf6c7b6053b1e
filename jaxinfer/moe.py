"""Mixture-of-experts MLP (Mixtral, Qwen2/3-MoE, OLMoE, Llama 4) as a pure function.

    router_DE                   the router's logits per expert
    gate_EDF, up_EDF, down_EFD  every expert's gated MLP, stacked on E
    returns [B, T, D]: sum over each token's C chosen experts of weight * expert(x)
    (+ sigmoid(x . shared_router_D) * shared expert(x) with Qwen2-MoE's shared expert)

Routing is the reference's: softmax over the E router logits in float32, the top C,
renormalised to sum 1 (`norm_topk`); DeepSeek V2/V3 and GLM-4.5 choose within the best
groups of experts, V3 by sigmoid scores plus a choice-only bias (`_deepseek_route`);
Phi-3.5-MoE by its sparsemixer (`_sparsemixer_route`);
Llama 4 (`moe_scale_inputs`) takes a sigmoid of the top C logits and multiplies each
chosen expert's input, not its output, by it. Two ways to run the experts, picked
from static shapes so a program never switches:
  - few tokens (decode: B * T * C <= E): `chosen_experts` loops (lax.scan) over the
    (token, expert) pairs, slicing one expert's weights per step, so a step reads C
    experts per token and nothing else;
  - many tokens (prefill): `all_experts` runs every expert on every token and weights the
    outputs by the router's (mostly zero) combine weights: E / C times the FLOPs of the
    sparse result, but dense einsums that shard like the dense MLP.
`scripts/benchmark.py --experiments=moe` times both against the alternatives on one layer
(docs/benchmarks.md): a gather of the chosen experts' weights (which XLA:CPU copies out
before the dot) and `lax.ragged_dot` (grouped matmul over tokens sorted by expert).
Expert weights may be quantized (QArrays): `layers.dot` dequantizes inside each dot, and
the slices take the chosen expert's integers and scales alike.

Expert parallelism: when the context mesh (`sharding.mesh_context`) has an `expert` axis
the experts divide, each device runs its own E / n experts inside a `shard_map` on the
tokens routed to them (the others skip: a decode step reads only the chosen experts that
are local) and the outputs are summed over the axis: one all-reduce of [tokens, D], or,
where the batch is split over `expert` too (attention data-parallel over it), an
all-gather of the tokens before and a reduce-scatter of the sums after. Left to GSPMD,
slicing a chosen expert out of expert-sharded weights all-gathers every expert's weights
inside the per-pair loop instead (docs/sharding.md).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxinfer.config import ModelConfig
from jaxinfer.layers import dot, glu, mlp
from jaxinfer.sharding import ACTIVATION_RULES, EXPERT_AXIS, expert_parallelism, logical_to_spec

EXPERT_WEIGHTS = ("moe_gate", "moe_up", "moe_down")
EXPERT_BIASES = ("moe_b_gate", "moe_b_up", "moe_b_down")  # gpt-oss (linear_bias)


def _num_local(w: dict) -> int:
    """Experts in w: all of them, or one device's share inside the shard_map."""
    return jax.tree.leaves(w["moe_gate"])[0].shape[0]


def route(cfg: ModelConfig, x_BTD: jax.Array, router_DE: jax.Array,
          router_b_E: jax.Array | None = None, choice_b_E: jax.Array | None = None
          ) -> tuple[jax.Array, jax.Array]:
    """(weights [B, T, C] in float32, expert ids i32[B, T, C]) of each token's experts."""
    logits = jnp.einsum("BTD,DE->BTE", x_BTD, router_DE, preferred_element_type=jnp.float32)
    if router_b_E is not None:  # gpt-oss
        logits = logits + router_b_E.astype(jnp.float32)
    if cfg.router_sigmoid or cfg.router_groups or cfg.routed_scale != 1.0:
        return _deepseek_route(cfg, logits, choice_b_E)
    if cfg.router_sparsemixer is not None:
        return _sparsemixer_route(cfg.router_sparsemixer, logits)
    if cfg.moe_scale_inputs:  # Llama 4: a sigmoid of each chosen expert's logit
        top_BTC, ids_BTC = jax.lax.top_k(logits, cfg.experts_per_token)
        return jax.nn.sigmoid(top_BTC), ids_BTC
    top_BTC, ids_BTC = jax.lax.top_k(jax.nn.softmax(logits, axis=-1), cfg.experts_per_token)
    if cfg.norm_topk:
        top_BTC = top_BTC / jnp.sum(top_BTC, axis=-1, keepdims=True)
    return top_BTC, ids_BTC


def _deepseek_route(cfg: ModelConfig, logits_BTE: jax.Array, choice_b_E: jax.Array | None
                    ) -> tuple[jax.Array, jax.Array]:
    """DeepSeek's routing: sigmoid (V3) or softmax (V2) scores; the bias-corrected scores
    choose (V3), within the best groups of experts where the model groups them; the chosen
    experts' own scores weigh, renormalised (norm_topk) and times routed_scale."""
    scores = (jax.nn.sigmoid(logits_BTE) if cfg.router_sigmoid
              else jax.nn.softmax(logits_BTE, axis=-1))
    choice = scores if choice_b_E is None else scores + choice_b_E.astype(jnp.float32)
    if cfg.router_groups:
        groups, kept = cfg.router_groups
        by_group = choice.reshape(*choice.shape[:-1], groups, -1)
        rank = (jnp.sum(jax.lax.top_k(by_group, 2)[0], axis=-1) if cfg.router_group_top2
                else jnp.max(by_group, axis=-1))
        best = jnp.sum(jax.nn.one_hot(jax.lax.top_k(rank, kept)[1], groups, dtype=bool),
                       axis=-2)
        choice = jnp.where(best[..., None], by_group, -jnp.inf).reshape(choice.shape)
    ids_BTC = jax.lax.top_k(choice, cfg.experts_per_token)[1]
    top_BTC = jnp.take_along_axis(scores, ids_BTC, axis=-1)
    if cfg.norm_topk:
        top_BTC = top_BTC / (jnp.sum(top_BTC, axis=-1, keepdims=True) + 1e-20)
    return top_BTC * cfg.routed_scale, ids_BTC


def _sparsemixer_route(eps: float, logits_BTE: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Phi-3.5-MoE's sparsemixer at inference: the best expert, weighed by its softmax over
    the experts whose logits are within 2 eps of it relative to max(|logit|, best); then
    the same for the best of the rest (the first masked out, the threshold still measured
    on every logit)."""
    ids, weights = [], []
    masked = logits_BTE
    for _ in range(2):
        best = jnp.max(masked, axis=-1, keepdims=True)
        idx = jnp.argmax(masked, axis=-1, keepdims=True)
        far = (best - logits_BTE) / jnp.maximum(jnp.abs(logits_BTE), best) > 2 * eps
        gates = jax.nn.softmax(jnp.where(far, -jnp.inf, masked), axis=-1)
        ids.append(idx)
        weights.append(jnp.take_along_axis(gates, idx, axis=-1))
        masked = jnp.where(jnp.arange(masked.shape[-1]) == idx, -jnp.inf, masked)
    return jnp.concatenate(weights, axis=-1), jnp.concatenate(ids, axis=-1).astype(jnp.int32)


def chosen_experts(cfg: ModelConfig, x_MD: jax.Array, w: dict, ids_MC: jax.Array,
                   top_MC: jax.Array) -> jax.Array:
    """Each token through its chosen experts only, one (token, expert) pair per step.
    Ids outside w's experts (another device's, under expert parallelism) are skipped."""
    M, C = ids_MC.shape
    E = _num_local(w)
    biased = "moe_b_gate" in w

    def body(y_MD, mc):
        m, c = mc // C, mc % C
        pick = lambda name: jax.tree.map(  # one expert's weights (QArrays too)
            lambda a: jax.lax.dynamic_index_in_dim(a, ids_MC[m, c], 0, keepdims=False),
            w[name])

        def expert(y_MD):
            x_D, weight = x_MD[m], top_MC[m, c]
            if cfg.moe_scale_inputs:  # Llama 4 weighs the expert's input instead
                x_D, weight = (x_D * weight).astype(x_MD.dtype), 1.0
            g_F = dot(x_D, pick("moe_gate"), "D,DF->F")
            u_F = dot(x_D, pick("moe_up"), "D,DF->F")
            if biased:
                g_F, u_F = g_F + pick("moe_b_gate"), u_F + pick("moe_b_up")
            out_D = dot(glu(cfg, g_F, u_F), pick("moe_down"), "F,FD->D")
            out_D = (out_D + pick("moe_b_down") if biased else out_D).astype(jnp.float32)
            return y_MD.at[m].add(weight * out_D)

        if E == cfg.num_experts:  # every id is here
            return expert(y_MD), None
        here = (ids_MC[m, c] >= 0) & (ids_MC[m, c] < E)
        return jax.lax.cond(here, expert, lambda y: y, y_MD), None

    y_MD, _ = jax.lax.scan(body, jnp.zeros(x_MD.shape, jnp.float32), jnp.arange(M * C))
    return y_MD.astype(x_MD.dtype)


def all_experts(cfg: ModelConfig, x_MD: jax.Array, w: dict, ids_MC: jax.Array,
                top_MC: jax.Array) -> jax.Array:
    """Every expert on every token, weighted by the (sparse) combine weights; ids outside
    w's experts (another device's) weigh nothing here."""
    combine_ME = jnp.sum(jax.nn.one_hot(ids_MC, _num_local(w), dtype=jnp.float32)
                         * top_MC[..., None], axis=-2).astype(x_MD.dtype)
    g = dot(x_MD, w["moe_gate"], "MD,EDF->MEF")
    u = dot(x_MD, w["moe_up"], "MD,EDF->MEF")
    if cfg.moe_scale_inputs:  # expert(x * c) of Llama 4: the projections are linear in x
        c = combine_ME[..., None]
        return dot(glu(cfg, g * c, u * c), w["moe_down"], "MEF,EFD->MD")
    if "moe_b_gate" in w:  # gpt-oss: each expert's biases, the down one weighted too
        g, u = g + w["moe_b_gate"], u + w["moe_b_up"]
        out = dot(glu(cfg, g, u) * combine_ME[..., None], w["moe_down"], "MEF,EFD->MD")
        return out + jnp.einsum("ME,ED->MD", combine_ME, w["moe_b_down"].astype(out.dtype))
    h = glu(cfg, g, u) * combine_ME[..., None]
    return dot(h, w["moe_down"], "MEF,EFD->MD")


def moe(cfg: ModelConfig, x_BTD: jax.Array, w: dict) -> jax.Array:
    """The layer's expert MLPs on the normed input x; w holds router, moe_gate/up/down
    (and the shared expert's shared_gate/up/down, shared_router)."""
    B, T, D = x_BTD.shape
    top_BTC, ids_BTC = route(cfg, x_BTD, w["router"], w["router_b"] if cfg.router_bias else None,
                             w["router_choice_b"] if cfg.router_choice_bias else None)
    C = cfg.experts_per_token
    run = chosen_experts if B * T * C <= cfg.num_experts else all_experts
    args = (x_BTD.reshape(B * T, D), ids_BTC.reshape(B * T, C), top_BTC.reshape(B * T, C))
    experts = {name: w[name] for name in EXPERT_WEIGHTS + EXPERT_BIASES if name in w}
    y = _routed(cfg, run, args, experts, B).reshape(B, T, D)
    if cfg.shared_expert_dim:  # Qwen2-MoE: every token's expert, tensor-parallel as the MLP
        s = mlp(x_BTD, w["shared_gate"], w["shared_up"], w["shared_down"], cfg.activation)
        if cfg.shared_expert_gate:
            g = jnp.einsum("BTD,D->BT", x_BTD, w["shared_router"],
                           preferred_element_type=jnp.float32)
            s = (jax.nn.sigmoid(g)[..., None] * s).astype(s.dtype)
        y = y + s
    return y


def _routed(cfg: ModelConfig, run, args: tuple, experts: dict, B: int) -> jax.Array:
    """run(cfg, x_MD, experts, ids_MC, top_MC) for the M = B * T tokens in args, on one
    device or split over the context mesh's `expert` axis."""
    mesh = jax.sharding.get_abstract_mesh()
    n = expert_parallelism(mesh, cfg.num_experts)
    if n == 1:
        return run(cfg, args[0], experts, *args[1:])
    # Is the batch split over `expert` too (attention data-parallel over it)? The same
    # rule as the cache's; GSPMD reshards if the tokens arrived otherwise.
    batch = logical_to_spec(("batch",), ACTIVATION_RULES, mesh, (B,), warn=False)[0]
    split = EXPERT_AXIS in ((batch,) if isinstance(batch, str) else batch or ())

    def local(x_MD, ids_MC, top_MC, experts):
        if split:  # every device's experts see every token: gather them, scatter the sums
            x_MD, ids_MC, top_MC = (jax.lax.all_gather(a, EXPERT_AXIS, axis=0, tiled=True)
                                    for a in (x_MD, ids_MC, top_MC))
        first = jax.lax.axis_index(EXPERT_AXIS) * (cfg.num_experts // n)
        y_MD = run(cfg, x_MD, experts, ids_MC - first, top_MC)
        if split:
            return jax.lax.psum_scatter(y_MD, EXPERT_AXIS, scatter_dimension=0, tiled=True)
        return jax.lax.psum(y_MD, EXPERT_AXIS)

    tokens = P(EXPERT_AXIS) if split else P()
    return jax.shard_map(local, in_specs=(tokens, tokens, tokens, P(EXPERT_AXIS)),
                         out_specs=tokens, axis_names={EXPERT_AXIS},
                         check_vma=False)(*args, experts)
