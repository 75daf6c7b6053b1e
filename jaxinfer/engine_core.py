"""The serving engine's functional core: pure jitted functions over a donated DecodeState.

The scheduler (engine.py) is host code that only calls these, in MaxText's order:

    prefill(weights, tokens_1T, num_new_1, row, ...)  -> Prefix     one request, one row
    prefill_scored(..., targets_1T, ...)  -> Prefix, Logprobs     the same, prompt scored
    insert(prefix, state, slot, resume)               -> state      state donated
    generate_step(weights, state, want_logprobs, mask_BW)
                                              -> state, out_2B, Logprobs   every slot
    release(state, slot)                              -> state      host ended a row early
    load_prefix(pools, table_J, n)                    -> KVCache    prefix-cache blocks -> row
    save_blocks(pools, row, src_J, dst_J)             -> pools      pools donated

Shapes: the decode state has B slots of S cache positions each (`cache.k` [L, B, K, S, H]);
a request's row is a one-row cache [L, 1, K, S, H]. The prefix-cache pool holds P blocks of
`blk` tokens, one pool per cache tensor: `k`, `v` [L, P, K, blk, H], and for an int8 cache
`k_scale`, `v_scale` [L, P, K, blk]; a row is J = S // blk blocks. A row's sampling key
is folded with the row's own generated-token count (`num_generated_B`), so a seeded request
samples the same tokens whatever slot it lands in and whoever its neighbours are. `mask_BW`
and `mask_1W` are int32 bitmasks of the tokens each row may sample (structured.py); all
ones for an unconstrained row. With LoRA adapters (lora.py) the prefills take the stack
and the request's adapter (`adapter_1`), which `insert` records in the slot
(`adapter_B`) for generate_step.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer import generate as gen
from jaxinfer import model
from jaxinfer.config import ModelConfig
from jaxinfer.kv_cache import KVCache, cache_shardings, init_cache, kv_shapes, scaled
from jaxinfer.lora import LoraStack
from jaxinfer.sampling import (
    IDLE_ROW,
    NO_ID,
    RECENT,
    Logprobs,
    SamplingArrays,
    ban_ends,
    ban_words,
    ends_row,
    push_recent,
    recent_tokens,
    sample,
    step_logprobs,
)
from jaxinfer.structured import apply_bitmask
from jaxinfer.weights import Weights


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Prefix:
    """Everything one prefilled request brings to its slot (MaxText's "prefix")."""

    cache: KVCache  # k, v [L, 1, K, S, H]; lengths i32[1] = prompt length
    token_1: jax.Array  # i32[1] first sampled token
    prompt_mask_1V: jax.Array  # bool[1, V] prompt tokens (repetition penalty)
    sampling: SamplingArrays  # one row
    max_new_1: jax.Array  # i32[1] token budget, the first token included
    logprobs: Logprobs  # of token_1 (zeros unless asked for)
    recent_1R: jax.Array  # i32[1, RECENT] the prompt's last tokens and token_1 (bad words)
    adapter_1: jax.Array | None = None  # i32[1] its LoRA adapter, with adapters loaded


def init_decode_state(cfg: ModelConfig, num_slots: int, max_len: int, dtype,
                      eos_E: jax.Array, device: jax.Device | None,
                      mesh: jax.sharding.Mesh | None = None, lora: bool = False
                      ) -> gen.DecodeState:
    """B empty slots, all done: a step over them computes nothing anyone reads. Committed
    to `device`, or under `mesh` with the cache sharded like `LLM.generate`'s (slots over
    `data`, KV heads over `model`) and the rest replicated, as every later state (a jit
    output) is, so warm-up compiles the same programs that traffic runs (committedness is
    part of jit's cache key)."""
    B = num_slots
    zeros_B = lambda: jnp.zeros((B,), jnp.int32)  # distinct buffers: the state is donated
    state = gen.DecodeState(
        cache=None, tokens_B=zeros_B(), num_generated_B=zeros_B(),
        max_new_B=zeros_B(), done_B=jnp.ones((B,), bool), finish_eos_B=jnp.zeros((B,), bool),
        counts_BV=jnp.zeros((B, cfg.vocab_size), jnp.int32),
        prompt_mask_BV=jnp.zeros((B, cfg.vocab_size), bool),
        sampling=SamplingArrays.from_params([IDLE_ROW] * B), eos_E=jnp.asarray(eos_E, jnp.int32),
        output_BM=jnp.zeros((B, 1), jnp.int32),  # unused: the host reads each step's tokens
        recent_BR=jnp.full((B, RECENT), NO_ID, jnp.int32),
        adapter_B=zeros_B() if lora else None)
    return dataclasses.replace(jax.device_put(state, placement(device, mesh)),
                               cache=slots_cache(cfg, B, max_len, dtype, device, mesh))


def placement(device: jax.Device | None, mesh: jax.sharding.Mesh | None):
    """Where unsharded engine state lives: the device, or replicated over the mesh."""
    if mesh is None:
        return device
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def put(x, place):
    """A host array on `place` (a device, or a sharding over the mesh). Multi-process, a
    replicated array is assembled from local copies: jax.device_put would first check,
    with a collective, that every process passed the same value."""
    if isinstance(place, jax.sharding.Sharding) and jax.process_count() > 1:
        local = [jax.device_put(x, d) for d in place.addressable_devices]
        return jax.make_array_from_single_device_arrays(x.shape, place, local)
    return jax.device_put(x, place)


def slots_cache(cfg: ModelConfig, B: int, S: int, dtype, device: jax.Device | None,
                mesh: jax.sharding.Mesh | None) -> KVCache:
    """An empty B-slot cache on `device`, or sharded over `mesh` as LLM.generate's is."""
    if mesh is None:
        return jax.device_put(init_cache(cfg, B, S, dtype), device)
    return init_cache(cfg, B, S, dtype, cache_shardings(cfg, B, S, mesh))


def slots_bytes(cfg: ModelConfig, B: int, S: int, dtype, mesh: jax.sharding.Mesh | None
                ) -> int:
    """Bytes one device holds for the B-slot cache `slots_cache` makes (K, V and an int8
    cache's scales), from its shard shape under `mesh`."""
    dtype = jnp.dtype(dtype)
    sharding = None if mesh is None else cache_shardings(cfg, B, S, mesh).k
    total = 0
    for shape in kv_shapes(cfg, B, S):  # K, V and (int8) their scales
        if sharding is not None:
            shape = sharding.shard_shape(shape)
        n = math.prod(shape)
        total += n * dtype.itemsize + (math.prod(shape[:4]) * 4 if scaled(dtype) else 0)
    return total


def put_row(dst: KVCache, src: KVCache, slot: jax.Array) -> KVCache:
    """`dst` ([L, B, K, S, H] and scales) with row `slot` replaced by the one-row `src`."""
    def put(d, s):
        if d is None:
            return None
        return jax.lax.dynamic_update_slice(d, s.astype(d.dtype), (0, slot) + (0,) * (d.ndim - 2))

    return KVCache(k=put(dst.k, src.k), v=put(dst.v, src.v),
                   lengths=dst.lengths.at[slot].set(src.lengths[0]),
                   k_scale=put(dst.k_scale, src.k_scale), v_scale=put(dst.v_scale, src.v_scale))


@functools.partial(jax.jit, static_argnames=("cfg", "impl"), donate_argnames=("row",))
def prefill(weights: Weights, tokens_1T: jax.Array, num_new_1: jax.Array, row: KVCache,
            sampling: SamplingArrays, prompt_mask_1V: jax.Array, recent_1R: jax.Array,
            max_new_1: jax.Array, want_logprobs: jax.Array, mask_1W: jax.Array,
            eos_E: jax.Array, cfg: ModelConfig, impl: str = "xla",
            lora: LoraStack | None = None, adapter_1: jax.Array | None = None) -> Prefix:
    """Write a request's (padded) prompt tokens after the row's cached prefix and sample
    its first token exactly as `generate.start` does (step 0, zero counts; `recent_1R` is
    the whole prompt's tail, sampling.recent_tokens)."""
    logits_1V, row = model.prefill(weights, tokens_1T, num_new_1, row, cfg, impl, lora,
                                   adapter_1)
    return _first_token(logits_1V, row, sampling, prompt_mask_1V, recent_1R, max_new_1,
                        want_logprobs, mask_1W, eos_E, cfg, adapter_1)


@functools.partial(jax.jit, static_argnames=("cfg", "impl"), donate_argnames=("row",))
def prefill_scored(weights: Weights, tokens_1T: jax.Array, num_new_1: jax.Array,
                   row: KVCache, targets_1T: jax.Array, sampling: SamplingArrays,
                   prompt_mask_1V: jax.Array, recent_1R: jax.Array, max_new_1: jax.Array,
                   want_logprobs: jax.Array, mask_1W: jax.Array, eos_E: jax.Array,
                   cfg: ModelConfig, impl: str = "xla", lora: LoraStack | None = None,
                   adapter_1: jax.Array | None = None) -> tuple[Prefix, Logprobs]:
    """`prefill` that also scores the prompt: at each of the T positions, log p(target)
    with targets_1T[0, t] the prompt token after position t, and the likeliest tokens
    (prompt_logprobs). A separate program, compiled only once somebody asks: it unembeds
    every position, [T, V] logits instead of one row."""
    x, row = model.hidden_states(weights, tokens_1T, row, cfg, impl, lora, adapter_1)
    logits_TV = model.unembed(weights, x[0], cfg)
    scored = step_logprobs(logits_TV, targets_1T[0], jnp.bool_(True))
    last = jnp.clip(num_new_1[0] - 1, 0, tokens_1T.shape[1] - 1)
    prefix = _first_token(logits_TV[last][None], row.with_lengths(row.lengths + num_new_1),
                          sampling, prompt_mask_1V, recent_1R, max_new_1, want_logprobs,
                          mask_1W, eos_E, cfg, adapter_1)
    return prefix, scored


def _first_token(logits_1V: jax.Array, row: KVCache, sampling: SamplingArrays,
                 prompt_mask_1V: jax.Array, recent_1R: jax.Array, max_new_1: jax.Array,
                 want_logprobs: jax.Array, mask_1W: jax.Array, eos_E: jax.Array,
                 cfg: ModelConfig, adapter_1: jax.Array | None = None) -> Prefix:
    counts_1V = jnp.zeros((1, cfg.vocab_size), jnp.int32)
    step_1 = jnp.zeros((1,), jnp.int32)
    allowed = ban_words(ban_ends(apply_bitmask(logits_1V, mask_1W), eos_E, sampling, step_1),
                        sampling, recent_1R)
    token_1 = sample(allowed, sampling, step_1, counts_1V, prompt_mask_1V)
    return Prefix(cache=row, token_1=token_1, prompt_mask_1V=prompt_mask_1V,
                  sampling=sampling, max_new_1=max_new_1,
                  logprobs=step_logprobs(logits_1V, token_1, want_logprobs),
                  recent_1R=push_recent(recent_1R, token_1, jnp.ones((1,), bool)),
                  adapter_1=adapter_1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Resume:
    """What a preempted request (priority scheduling) had when it left its slot; its
    prefix then holds the K/V of its prompt and all its tokens but the last. `num_generated`
    0 marks a new request (the other fields unread)."""

    num_generated: jax.Array  # i32[]
    token: jax.Array  # i32[] its last token, which the next step feeds
    generated_S: jax.Array  # i32[S] its tokens, -1 after them (the penalties' counts)
    recent_R: jax.Array  # i32[RECENT] prompt and output tail (bad words)

    def counts(self, V: int) -> jax.Array:
        """i32[V]: how often each token occurs in its output (the penalties' counts)."""
        return jnp.zeros((V,), jnp.int32).at[
            jnp.where(self.generated_S < 0, V, self.generated_S)].add(1, mode="drop")

    @staticmethod
    def of(generated: list[int], prompt: list[int], max_len: int) -> Resume:
        gen_S = np.full((max_len,), -1, np.int32)
        gen_S[:len(generated)] = generated
        return Resume(np.int32(len(generated)), np.int32(generated[-1] if generated else 0),
                      gen_S, recent_tokens(prompt + generated))


@functools.partial(jax.jit, donate_argnames=("state",))
def insert(prefix: Prefix, state: gen.DecodeState, slot: jax.Array, resume: Resume
           ) -> gen.DecodeState:
    """Put a prefilled request into slot `slot` (traced: one compile for every slot). A
    preempted one (`resume`) comes back as it left: the token its prefill sampled is
    dropped for its own last token, step, counts and recent tokens, so a seeded request
    draws the tokens it would have drawn unpreempted. One program for both kinds: a
    preemption never compiles."""
    state = _insert(prefix, state, slot)
    back = resume.num_generated > 0
    counts_V = resume.counts(state.counts_BV.shape[1])

    def pick(x_B, new):
        return x_B.at[slot].set(jnp.where(back, new, x_B[slot]))

    return dataclasses.replace(
        state, tokens_B=pick(state.tokens_B, resume.token),
        num_generated_B=pick(state.num_generated_B, resume.num_generated),
        done_B=pick(state.done_B, False), finish_eos_B=pick(state.finish_eos_B, False),
        counts_BV=pick(state.counts_BV, counts_V), recent_BR=pick(state.recent_BR,
                                                                  resume.recent_R))


def _insert(prefix: Prefix, state: gen.DecodeState, slot: jax.Array) -> gen.DecodeState:
    cache = put_row(state.cache, prefix.cache, slot)
    tok = prefix.token_1[0]
    is_eos = ends_row(prefix.token_1, state.eos_E, prefix.sampling)[0]
    max_new = prefix.max_new_1[0]
    V = state.counts_BV.shape[1]
    if state.adapter_B is not None:
        state = dataclasses.replace(
            state, adapter_B=state.adapter_B.at[slot].set(prefix.adapter_1[0]))
    return dataclasses.replace(
        state, cache=cache, tokens_B=state.tokens_B.at[slot].set(tok),
        num_generated_B=state.num_generated_B.at[slot].set(1),
        max_new_B=state.max_new_B.at[slot].set(max_new),
        done_B=state.done_B.at[slot].set(is_eos | (max_new <= 1)),
        finish_eos_B=state.finish_eos_B.at[slot].set(is_eos),
        counts_BV=state.counts_BV.at[slot].set(jnp.zeros((V,), jnp.int32).at[tok].add(1)),
        prompt_mask_BV=state.prompt_mask_BV.at[slot].set(prefix.prompt_mask_1V[0]),
        sampling=state.sampling.with_row(slot, prefix.sampling),
        recent_BR=state.recent_BR.at[slot].set(prefix.recent_1R[0]))


# One token for every slot, each drawn from the tokens its `mask_BW` row allows; the
# (token, done) pairs come back as a fresh buffer, and raw logprobs when some slot asked.
generate_step = gen.step


@functools.partial(jax.jit, donate_argnames=("state",))
def release(state: gen.DecodeState, slot: jax.Array) -> gen.DecodeState:
    """Freeze a slot the host finished early (stop string, cancel): it stops growing."""
    return dataclasses.replace(state, done_B=state.done_B.at[slot].set(True))


def cache_tensors(cache: KVCache) -> tuple[jax.Array, ...]:
    """The per-position tensors of a cache: (k, v) or, int8, (k, v, k_scale, v_scale)."""
    return tuple(x for x in (cache.k, cache.v, cache.k_scale, cache.v_scale) if x is not None)


@jax.jit
def load_prefix(pools: tuple[jax.Array, ...], table_J: jax.Array,
                num_cached: jax.Array) -> KVCache:
    """A fresh one-row cache whose first `num_cached` positions come from pool blocks
    `table_J` (i32[J]; entries past the prefix are arbitrary: stale slots are masked)."""
    def row(pool):  # [L, P, K, blk, (H)] -> [L, 1, K, J * blk, (H)]
        L, _, K, _ = pool.shape[:4]
        blocks = jnp.take(pool, table_J, axis=1)  # [L, J, K, blk, (H)]
        blocks = jnp.moveaxis(blocks, 2, 1)  # [L, K, J, blk, (H)]
        J, blk = blocks.shape[2:4]  # (spelled out: latent attention's V pool has H = 0)
        return blocks.reshape(L, 1, K, J * blk, *pool.shape[4:])

    k, v, *scales = (row(p) for p in pools)
    ks, vs = scales or (None, None)
    return KVCache(k=k, v=v, lengths=jnp.reshape(num_cached, (1,)).astype(jnp.int32),
                   k_scale=ks, v_scale=vs)


@functools.partial(jax.jit, donate_argnames=("pools",))
def save_blocks(pools: tuple[jax.Array, ...], row: KVCache, src_J: jax.Array,
                dst_J: jax.Array) -> tuple[jax.Array, ...]:
    """Copy row blocks `src_J` into pool blocks `dst_J`; dst = P (out of range) drops."""
    def put(pool, x):  # x [L, 1, K, S, (H)]
        L, _, K, blk = pool.shape[:4]
        blocks = x[:, 0].reshape(L, K, x.shape[3] // blk, blk, *pool.shape[4:])
        blocks = jnp.moveaxis(jnp.take(blocks, src_J, axis=2), 2, 1)  # [L, J, K, blk, (H)]
        return pool.at[:, dst_J].set(blocks.astype(pool.dtype), mode="drop")

    return tuple(put(p, x) for p, x in zip(pools, cache_tensors(row), strict=True))
