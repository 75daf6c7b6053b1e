"""The speed-work comparisons, each an A/B on the same model and prompt.

    dtype   float32 vs bfloat16 compute (batch-1 decode through the while loop)
    quant   float weights vs int8 vs int4 (weight-only, dequantized inside the dot), the
            variants interleaved round by round so load drift on a shared machine hits all
    donate  the decode step with the state donated vs copied (host loop, one step ahead)
    loop    the jitted while loop vs a host loop of one dispatch per token
    bucket  decode speed vs cache length S (the XLA attention reads the whole bucket)
    chunked the serving engine: decoding streams' inter-token gaps while long prompts are
            prefilled, chunked prefill vs whole prompts (and the long prompts' TTFT)
    structured  the serving engine: one request's decode speed, unconstrained vs under a
            JSON schema (per-step bitmask, no step overlap)
    structured_draft  the serving engine: JSON extraction (values copied from the prompt)
            without a draft vs with prompt lookup (split rounds masked along the drafts)
    lora    decode with per-row LoRA adapters (two random rank-16 adapters on all seven
            projections, rows alternating between them) vs the same model without adapters
            (= an adapter merged into the weights), interleaved round by round
    layers  the forward alone (greedy, no sampling): layers under lax.scan (the model) vs a
            Python loop over static layer slices, to see what the scan's per-layer
            dynamic slice of the stacked weights costs
    moe     one mixture-of-experts layer's experts (E = 8, C = 2 at the model's D and F, or
            the model's own E and C) on 1 to 256 tokens: moe.py's two ways (a scan over
            the chosen (token, expert) pairs; every expert on every token, weighted) vs a
            gather of the chosen experts' weights vs lax.ragged_dot; milliseconds

Run at batch 1 and at min(largest batch, 8). Every figure is decode tokens/s (rows x
steps / seconds), median over repeats, after one untimed run compiles.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer import generate as gen
from jaxinfer.errors import ConfigError
from jaxinfer.kv_cache import init_cache
from jaxinfer.sampling import IDLE_ROW, SamplingArrays

EXPERIMENTS = ("dtype", "quant", "donate", "loop", "bucket", "layers", "chunked",
               "structured", "structured_draft", "lora", "moe")


def _start(llm, ids: list[int], batch: int, S: int, n: int, lora: Any = None
           ) -> gen.DecodeState:
    """A started batch; with `lora` (a LoraStack) rows cycle through adapters 1..A."""
    T = gen.bucket(len(ids), gen.MIN_PROMPT_BUCKET, S)
    prompt_BT = np.zeros((batch, T), np.int32)
    prompt_BT[:, : len(ids)] = ids
    adapter_B = (None if lora is None else
                 1 + np.arange(batch, dtype=np.int32) % (lora.num_adapters - 1))
    return gen.start(llm.params, prompt_BT, np.full((batch,), len(ids), np.int32),
                     init_cache(llm.cfg, batch, S, llm.dtype),
                     SamplingArrays.from_params([IDLE_ROW] * batch),
                     np.full((batch,), n, np.int32), np.array([-1], np.int32), cfg=llm.cfg,
                     max_out=gen.bucket(n, 16, S), impl=llm.impl, lora=lora,
                     adapter_B=adapter_B)


def _step_copied(weights, state, cfg, impl):
    state = gen._step(weights, state, cfg, impl)
    return state, jnp.stack([state.tokens_B, state.done_B.astype(jnp.int32)])


def _step_donated(weights, state, cfg, impl):
    state, out, _ = gen.step(weights, state, np.bool_(False), cfg=cfg, impl=impl)
    return state, out


# The same step as generate.step, but its input state is not donated: XLA must copy the
# cache (and every other state buffer) into fresh outputs each step.
step_copied = jax.jit(_step_copied, static_argnames=("cfg", "impl"))


def _while_loop(llm, state, n: int) -> float:
    state = gen.run_loop(llm.params, state, cfg=llm.cfg, impl=llm.impl)
    state.tokens_B.block_until_ready()
    return n - 1


def _host_loop(step_fn: Callable, llm, state, n: int) -> float:
    """The streaming pattern: dispatch step i+1, then read token i on the host."""
    pending = None
    for _ in range(n - 1):
        state, out = step_fn(llm.params, state, cfg=llm.cfg, impl=llm.impl)
        if pending is not None:
            np.asarray(pending)
        pending = out
    np.asarray(pending)
    return n - 1


def decode_tps(llm, ids: list[int], batch: int, S: int, n: int, runner: Callable,
               repeats: int) -> float:
    """Rows x decode steps / seconds (prefill excluded), median of `repeats` after a warm-up."""
    rates = []
    for r in range(repeats + 1):
        state = _start(llm, ids, batch, S, n)
        state.tokens_B.block_until_ready()
        t0 = time.perf_counter()
        steps = runner(llm, state, n)
        if r:
            rates.append(batch * steps / (time.perf_counter() - t0))
    return statistics.median(rates)


def _unrolled_logits(weights, tokens_B, cache, cfg, impl):
    """model.decode_logits with the layer scan unrolled into static slices (mirrors
    model.hidden_states; keep the two in step)."""
    from jaxinfer.layers import norm
    from jaxinfer.model import _block, embed, unembed

    B = tokens_B.shape[0]
    x = embed(cfg, weights, tokens_B[:, None])
    carry = (x, cache.k, cache.v, cache.k_scale, cache.v_scale, cache.lengths[:, None],
             jnp.arange(B, dtype=jnp.int32)[:, None])
    for i in range(cfg.num_layers):
        stack, j = cfg.layer_slot(i)
        w = jax.tree.map(lambda a, j=j: a[j], weights[stack])
        experts = bool(cfg.num_experts) and stack == "layers"
        carry, _ = _block(cfg, impl, None, experts, carry, (w, jnp.int32(i), None))
    x = norm(cfg, carry[0], weights["final_norm"])
    _, ck, cv, ks, vs, _, _ = carry
    return unembed(weights, x[:, 0], cfg), dataclasses.replace(
        cache, k=ck, v=cv, k_scale=ks, v_scale=vs, lengths=cache.lengths + 1)


@functools.partial(jax.jit, static_argnames=("cfg", "impl", "n", "unrolled"),
                   donate_argnames=("cache",))
def _greedy_steps(weights, tokens_B, cache, cfg, impl, n, unrolled):
    from jaxinfer.model import decode_logits

    fn = _unrolled_logits if unrolled else decode_logits

    def body(_, c):
        tok, cache = c
        logits, cache = fn(weights, tok, cache, cfg, impl)
        return jnp.argmax(logits, -1).astype(jnp.int32), cache

    return jax.lax.fori_loop(0, n, body, (tokens_B, cache))


def forward_tps(llm, batch: int, S: int, n: int, unrolled: bool, repeats: int) -> float:
    rates = []
    for r in range(repeats + 1):
        cache = init_cache(llm.cfg, batch, S, llm.dtype)
        tok = jnp.zeros((batch,), jnp.int32)
        jax.block_until_ready(cache)
        t0 = time.perf_counter()
        out = _greedy_steps(llm.params, tok, cache, cfg=llm.cfg, impl=llm.impl, n=n,
                            unrolled=unrolled)
        jax.block_until_ready(out)
        if r:
            rates.append(batch * n / (time.perf_counter() - t0))
    return statistics.median(rates)


def random_adapters(cfg, count: int, rank: int, dtype) -> Any:
    """`count` random LoRA adapters of rank `rank` on every projection, stacked."""
    from jaxinfer.convert.lora import LoraFactors, stack_adapters
    from jaxinfer.convert.safetensors import hf_linears, hf_shape

    rng = np.random.default_rng(0)
    adapters = []
    for _ in range(count):
        ad = {}
        for key, shape, n_in in hf_linears(cfg).values():
            n_out, n_inp = hf_shape(shape, n_in)
            ad[key] = LoraFactors(
                rng.normal(0, 0.02, (cfg.num_layers, rank, n_inp)).astype(np.float32),
                rng.normal(0, 0.02, (cfg.num_layers, n_out, rank)).astype(np.float32),
                1.0, shape)
        adapters.append(ad)
    return stack_adapters(adapters, dtype)


def lora_tps(llm, ids: list[int], batch: int, S: int, n: int, repeats: int,
             rank: int = 16) -> dict[str, float]:
    """Decode tokens/s without adapters and with rows on two adapters, interleaved."""
    stack = random_adapters(llm.cfg, 2, rank, llm.dtype)
    rates: dict[str, list[float]] = {"no_adapters": [], f"adapters_rank{rank}": []}
    for r in range(repeats + 1):
        for k, lora in zip(rates, (None, stack), strict=True):
            state = _start(llm, ids, batch, S, n, lora)
            state.tokens_B.block_until_ready()
            t0 = time.perf_counter()
            state = gen.run_loop(llm.params, state, cfg=llm.cfg, impl=llm.impl, lora=lora)
            state.tokens_B.block_until_ready()
            if r:
                rates[k].append(batch * (n - 1) / (time.perf_counter() - t0))
    return {k: statistics.median(v) for k, v in rates.items()}


def moe_paths(cfg, repeats: int, tokens: tuple[int, ...] = (1, 2, 4, 8, 256)
              ) -> dict[str, Any]:
    """Milliseconds per call of four ways to run one MoE layer's experts on random float32
    weights and routes (median of `repeats`): moe.py's two (`chosen`: a scan over the
    (token, expert) pairs, `all`: every expert, weighted) and two it does not use
    (`gathered`: the chosen experts' weights gathered, then one einsum; `ragged_dot`)."""
    from jaxinfer.moe import all_experts, chosen_experts

    E, C = (cfg.num_experts, cfg.experts_per_token) if cfg.num_experts else (8, 2)
    mcfg = cfg.replace(num_experts=E, experts_per_token=C)
    D, F = cfg.d_model, cfg.mlp_dim
    rng = np.random.default_rng(0)
    w = {f"moe_{k}": jnp.asarray(rng.normal(0, D ** -0.5, (E, *shape)), jnp.float32)
         for k, shape in (("gate", (D, F)), ("up", (D, F)), ("down", (F, D)))}
    act = jax.nn.silu

    @jax.jit
    def gathered(x, ids, top):
        g = jnp.einsum("MD,MCDF->MCF", x, w["moe_gate"][ids])
        u = jnp.einsum("MD,MCDF->MCF", x, w["moe_up"][ids])
        return jnp.einsum("MCF,MCFD->MD", act(g) * u * top[..., None], w["moe_down"][ids])

    @jax.jit
    def ragged(x, ids, top):
        order = jnp.argsort(ids.reshape(-1))
        tok = order // C
        xs = x[tok]
        sizes = jnp.bincount(ids.reshape(-1), length=E).astype(jnp.int32)
        h = (act(jax.lax.ragged_dot(xs, w["moe_gate"], sizes))
             * jax.lax.ragged_dot(xs, w["moe_up"], sizes))
        y = jax.lax.ragged_dot(h, w["moe_down"], sizes) * top.reshape(-1)[order][:, None]
        return jnp.zeros(x.shape, y.dtype).at[tok].add(y)

    ways = (("chosen", jax.jit(lambda x, ids, top: chosen_experts(mcfg, x, w, ids, top))),
            ("all", jax.jit(lambda x, ids, top: all_experts(mcfg, x, w, ids, top))),
            ("gathered", gathered), ("ragged_dot", ragged))
    out: dict[str, Any] = {"experts": E, "chosen": C, "d_model": D, "mlp_dim": F}
    for M in tokens:
        x = jnp.asarray(rng.normal(size=(M, D)), jnp.float32)
        ids = jnp.asarray(np.stack([rng.choice(E, C, replace=False) for _ in range(M)]),
                          jnp.int32)
        top = jnp.full((M, C), 1.0 / C, jnp.float32)
        row, ys = {}, []
        for name, fn in ways:
            ys.append(np.asarray(fn(x, ids, top)))
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn(x, ids, top).block_until_ready()
                times.append(1e3 * (time.perf_counter() - t0))
            row[name] = statistics.median(times)
        row["max_abs_diff"] = float(max(np.abs(y - ys[1]).max() for y in ys))  # same math
        out[str(M)] = row
    return out


def interleaved_tps(llms: dict[str, Any], ids: list[int], batch: int, S: int, n: int,
                    repeats: int) -> dict[str, float]:
    """decode_tps of several models, one timed run of each per round (after a warm-up)."""
    rates: dict[str, list[float]] = {k: [] for k in llms}
    for r in range(repeats + 1):
        for k, llm in llms.items():
            state = _start(llm, ids, batch, S, n)
            state.tokens_B.block_until_ready()
            t0 = time.perf_counter()
            steps = _while_loop(llm, state, n)
            if r:
                rates[k].append(batch * steps / (time.perf_counter() - t0))
    return {k: statistics.median(v) for k, v in rates.items()}


def run(llm, which: list[str], ids: list[int], n: int, batch: int, repeats: int,
        load: Callable[..., Any], progress: Callable[[str], None]) -> dict[str, Any]:
    """`load(dtype=None, quantize=None)` loads the same model another way (quantize=""
    for float weights)."""
    """The selected experiments on `llm` (decode at 1 and `batch` rows where it matters)."""
    S = gen.bucket(len(ids) + n, gen.MIN_CACHE_BUCKET, llm.cfg.max_seq_len)
    donated = functools.partial(_host_loop, _step_donated)
    copied = functools.partial(_host_loop, step_copied)
    out: dict[str, Any] = {"cache_len": S}
    tps = functools.partial(decode_tps, ids=ids, n=n, repeats=repeats)
    if "dtype" in which:
        progress("experiment dtype: float32 vs bfloat16")
        out["dtype"] = {str(jnp.dtype(llm.dtype)): tps(llm, batch=1, S=S, runner=_while_loop)}
        other = load(dtype="bfloat16")
        out["dtype"][str(jnp.dtype(other.dtype))] = tps(other, batch=1, S=S,
                                                        runner=_while_loop)
        del other
    if "quant" in which:
        progress("experiment quant: float vs int8 vs int4 weights (interleaved)")
        llms, errors = {}, {}
        for q in ("", "int8", "int4"):
            try:
                llms[q or str(jnp.dtype(llm.dtype))] = load(quantize=q)
            except ConfigError as e:  # e.g. a group size that does not divide a toy shape
                errors[q] = str(e)
        out["quant"] = {str(b): interleaved_tps(llms, ids, b, S, n, repeats)
                        for b in sorted({1, batch})} | {"errors": errors}
        del llms
    if "donate" in which:
        progress(f"experiment donate: donated vs copied state, batch {batch}")
        out["donate"] = {"batch": batch,
                         "donated": tps(llm, batch=batch, S=S, runner=donated),
                         "copied": tps(llm, batch=batch, S=S, runner=copied)}
    if "loop" in which:
        progress("experiment loop: while loop vs host loop")
        out["loop"] = {str(b): {"while_loop": tps(llm, batch=b, S=S, runner=_while_loop),
                                "host_loop": tps(llm, batch=b, S=S, runner=donated)}
                       for b in sorted({1, batch})}
    if "bucket" in which:
        progress("experiment bucket: decode speed vs cache length")
        sizes = [s for s in (S, 4 * S, 16 * S) if s <= llm.cfg.max_seq_len]
        out["bucket"] = {str(b): {str(s): tps(llm, batch=b, S=s, runner=_while_loop)
                                  for s in sizes} for b in sorted({1, batch})}
    if "layers" in which:
        progress("experiment layers: scanned vs unrolled layers (forward + argmax)")
        out["layers"] = {str(b): {k: forward_tps(llm, b, S, n, k == "unrolled", repeats)
                                  for k in ("scan", "unrolled")} for b in sorted({1, batch})}
    if "lora" in which:
        progress("experiment lora: per-row LoRA adapters vs none (interleaved)")
        out["lora"] = {str(b): lora_tps(llm, ids, b, S, n, repeats) for b in sorted({1, batch})}
    if "moe" in which:
        progress("experiment moe: gathered vs dense experts vs ragged_dot, one layer")
        out["moe"] = moe_paths(llm.cfg, max(repeats, 5))
    if "chunked" in which:
        from jaxinfer.bench.measure import engine_stall

        progress("experiment chunked: chunked prefill vs whole prompts in the engine")
        long_len = min(1024, llm.cfg.max_seq_len - 32)
        out["chunked"] = [engine_stall(llm, c, long_len, 128) for c in (True, False)]
    if "structured" in which:
        from jaxinfer.bench.measure import engine_structured

        progress("experiment structured: a JSON-schema constraint vs none in the engine")
        out["structured"] = engine_structured(llm, n, repeats)
    if "structured_draft" in which:
        from jaxinfer.bench.measure import engine_structured_draft

        progress("experiment structured_draft: JSON extraction, prompt lookup vs no draft")
        out["structured_draft"] = engine_structured_draft(llm, max(n, 96), repeats)
    return out
