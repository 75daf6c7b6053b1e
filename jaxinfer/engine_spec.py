"""Speculative decoding in the serving engine: the functional core over B slots.

The scheduler (engine.py) calls these in place of engine_core's insert / generate_step
when it runs with a draft (a smaller model, or prompt lookup):

    init_state(...)                                   -> SpecState   B empty slots
    prefill_draft(draft_weights, tokens_1T, n_1, row) -> KVCache     the draft's prompt row
    insert(prefix, draft_row, seq_1S, n, state, slot, resume) -> state  state donated
    step(target, draft, state)                        -> state, out_BR   one round, every slot
    speculative.propose_step(draft, state, mask0)    -> state, d_BK, q
    verify(target, state, d_BK, q, masks)             -> state, out_BR   the same round split
                                                      for structured output: the host masks
                                                      each drafted position in between

A round is speculative.py's `_round` (the same accept/reject rule, so greedy slots give the
target's tokens exactly and sampled slots keep its distribution); `out_BR` brings back,
per slot, R = k + 4 ints: [tokens emitted, done, draft tokens accepted, t_1 .. t_{k+1}].
Keys fold each slot's seed with its own generated-token count, as in LLM.generate(draft=),
so a seeded request gives the same tokens in any slot, beside any neighbours.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jaxinfer import model
from jaxinfer import speculative as spec
from jaxinfer.config import ModelConfig
from jaxinfer.engine_core import Prefix, Resume, placement, put_row, slots_cache
from jaxinfer.kv_cache import KVCache
from jaxinfer.lora import LoraStack
from jaxinfer.sampling import IDLE_ROW, Logprobs, SamplingArrays, ends_row
from jaxinfer.weights import Weights


def init_state(cfg: ModelConfig, draft_cfg: ModelConfig | None, num_slots: int, max_len: int,
               dtype, draft_dtype, eos_E: jax.Array, device: jax.Device | None,
               mesh: jax.sharding.Mesh | None = None, lora: bool = False) -> spec.SpecState:
    """B empty, finished slots, placed as engine_core.init_decode_state places its state."""
    B, S = num_slots, max_len
    zeros_B = lambda: jnp.zeros((B,), jnp.int32)  # distinct buffers: the state is donated
    state = spec.SpecState(
        target_cache=None, draft_cache=None, seq_BS=jnp.zeros((B, S), jnp.int32),
        seq_len_B=jnp.full((B,), 2, jnp.int32), num_generated_B=zeros_B(),
        max_new_B=zeros_B(), done_B=jnp.ones((B,), bool), finish_eos_B=jnp.zeros((B,), bool),
        sampling=SamplingArrays.from_params([IDLE_ROW] * B), eos_E=jnp.asarray(eos_E, jnp.int32),
        output_BM=jnp.zeros((B, S), jnp.int32), rounds_B=zeros_B(), accepted_B=zeros_B(),
        counts_BV=jnp.zeros((B, cfg.vocab_size), jnp.int32),
        prompt_mask_BV=jnp.zeros((B, cfg.vocab_size), bool),
        adapter_B=zeros_B() if lora else None)

    return dataclasses.replace(
        jax.device_put(state, placement(device, mesh)),
        target_cache=slots_cache(cfg, B, S, dtype, device, mesh),
        draft_cache=None if draft_cfg is None else slots_cache(draft_cfg, B, S, draft_dtype,
                                                               device, mesh))


@functools.partial(jax.jit, static_argnames=("cfg", "impl"), donate_argnames=("row",))
def prefill_draft(weights: Weights, tokens_1T: jax.Array, num_new_1: jax.Array, row: KVCache,
                  cfg: ModelConfig, impl: str = "xla") -> KVCache:
    """The draft model's K/V for a whole (padded) prompt."""
    return model.prefill(weights, tokens_1T, num_new_1, row, cfg, impl)[1]


@functools.partial(jax.jit, donate_argnames=("state",))
def insert(prefix: Prefix, draft_row: KVCache | None, seq_1S: jax.Array, prompt_len: jax.Array,
           state: spec.SpecState, slot: jax.Array, resume: Resume) -> spec.SpecState:
    """Put a prefilled request into slot `slot`: both caches' rows, its token sequence
    (prompt + first token, the n-gram draft's haystack) and its counters. A preempted one
    (`resume`, as engine_core.insert takes it; `seq_1S` then holds its prompt and output
    but the last token) comes back with its last token, output and counts, so its next
    round draws the keys it would have drawn unpreempted. One program for both kinds."""
    back = resume.num_generated > 0
    tok = jnp.where(back, resume.token, prefix.token_1[0])
    max_new = prefix.max_new_1[0]
    is_eos = ends_row(prefix.token_1, state.eos_E, prefix.sampling)[0] & ~back
    seq = seq_1S[0].at[prompt_len].set(tok)
    M, V = state.output_BM.shape[1], state.counts_BV.shape[1]
    gen_M = jnp.where(back, jnp.maximum(resume.generated_S[:M], 0),
                      jnp.zeros((M,), jnp.int32).at[0].set(tok))
    counts_V = jnp.where(back, resume.counts(V), jnp.zeros((V,), jnp.int32).at[tok].add(1))
    n_gen = jnp.where(back, resume.num_generated, 1)
    dc = state.draft_cache
    if state.adapter_B is not None:
        state = dataclasses.replace(
            state, adapter_B=state.adapter_B.at[slot].set(prefix.adapter_1[0]))
    return dataclasses.replace(
        state, target_cache=put_row(state.target_cache, prefix.cache, slot),
        draft_cache=None if dc is None else put_row(dc, draft_row, slot),
        seq_BS=state.seq_BS.at[slot].set(seq), seq_len_B=state.seq_len_B.at[slot].set(
            prompt_len + 1), num_generated_B=state.num_generated_B.at[slot].set(n_gen),
        max_new_B=state.max_new_B.at[slot].set(max_new),
        done_B=state.done_B.at[slot].set(is_eos | (max_new <= n_gen)),
        finish_eos_B=state.finish_eos_B.at[slot].set(is_eos),
        sampling=state.sampling.with_row(slot, prefix.sampling),
        output_BM=state.output_BM.at[slot].set(gen_M),
        rounds_B=state.rounds_B.at[slot].set(0), accepted_B=state.accepted_B.at[slot].set(0),
        counts_BV=state.counts_BV.at[slot].set(counts_V),
        prompt_mask_BV=state.prompt_mask_BV.at[slot].set(prefix.prompt_mask_1V[0]))


@functools.partial(jax.jit, static_argnames=("cfg", "draft_cfg", "k", "ngram_size", "impl"),
                   donate_argnames=("state",))
def step(target_weights: Weights, draft_weights: Weights | None, state: spec.SpecState,
         want_logprobs: jax.Array, lora: LoraStack | None = None, *, cfg: ModelConfig,
         draft_cfg: ModelConfig | None, k: int, ngram_size: int, impl: str = "xla"
         ) -> tuple[spec.SpecState, jax.Array, Logprobs]:
    """One draft-and-verify round for every slot; out_BR as in the module docstring, and
    the raw logprobs of each slot's k + 1 candidate tokens (row slot * (k + 1) + t),
    computed only when `want_logprobs` (traced: asking never recompiles)."""
    before = state
    state, lp = spec._round(target_weights, draft_weights, state, cfg, draft_cfg, k,
                            ngram_size, impl, want_logprobs, lora)
    return state, _out(before, state, k), lp


@functools.partial(jax.jit, static_argnames=("cfg", "k", "impl"), donate_argnames=("state",))
def verify(target_weights: Weights, state: spec.SpecState, d_BK: jax.Array,
           q_BKV: jax.Array | None, mask_BTW: jax.Array, want_logprobs: jax.Array,
           lora: LoraStack | None = None, *, cfg: ModelConfig, k: int, impl: str = "xla"
           ) -> tuple[spec.SpecState, jax.Array, Logprobs]:
    """A round split for structured output, part two (part one is speculative.propose_step):
    the target verifies under the masks of the k + 1 positions; returns as `step` does."""
    before = state
    state, lp = spec.verify(target_weights, state, d_BK, q_BKV, cfg, k, impl, want_logprobs,
                            mask_BTW, lora)
    return state, _out(before, state, k), lp


def _out(before: spec.SpecState, state: spec.SpecState, k: int) -> jax.Array:
    """out_BR of a round (module docstring) from the states before and after it."""
    M = state.output_BM.shape[1]
    n0_B = before.num_generated_B
    idx = jnp.minimum(n0_B[:, None] + jnp.arange(k + 1)[None], M - 1)
    toks = jnp.take_along_axis(state.output_BM, idx, 1)
    return jnp.concatenate([(state.num_generated_B - n0_B)[:, None],
                            state.done_B.astype(jnp.int32)[:, None],
                            (state.accepted_B - before.accepted_B)[:, None], toks], 1)
