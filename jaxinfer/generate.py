"""Generation loops over the pure model: prefill, then decode steps with sampling.

The functional core is three jitted functions over a donated `DecodeState`:
    start(weights, prompt_BT, prompt_len_B, ...) -> DecodeState   prefill + first token
    step(weights, state, want_logprobs) -> (state, out_2B, Logprobs)   one token per row
                                                                       (streaming path)
    run_loop(weights, state, n)   -> state             lax.while_loop, no host round trip
Each takes `lora` (a lora.LoraStack) where adapters are loaded; `start` records each row's
adapter (`adapter_B`) in the state, which the later steps read.
Shapes are bucketed (prompt length, cache length, output length) so new prompt lengths
inside a bucket reuse compiled code, and sampling parameters are traced arrays.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.config import ModelConfig
from jaxinfer.errors import BadRequestError
from jaxinfer.kv_cache import KVCache, cache_shardings, init_cache
from jaxinfer.lora import LoraStack
from jaxinfer.model import decode_logits, hidden_states, unembed
from jaxinfer.sampling import (
    MAX_LOGPROBS,
    Logprobs,
    SamplingArrays,
    ban_ends,
    ban_words,
    ends_row,
    push_recent,
    recent_tails,
    sample,
    step_logprobs,
    update_counts,
)
from jaxinfer.structured import apply_bitmask
from jaxinfer.weights import Weights

MIN_PROMPT_BUCKET = 32
MIN_CACHE_BUCKET = 256


def bucket(n: int, minimum: int, maximum: int) -> int:
    """Next power of two >= n (at least `minimum`), capped at `maximum`."""
    b = max(minimum, 1 << max(0, (n - 1).bit_length()))
    return min(b, maximum)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    cache: KVCache
    tokens_B: jax.Array  # i32[B] last sampled token, the next step's input
    num_generated_B: jax.Array  # i32[B] tokens sampled so far (the first comes from prefill)
    max_new_B: jax.Array  # i32[B] per-row budget
    done_B: jax.Array  # bool[B]
    finish_eos_B: jax.Array  # bool[B] ended on an EOS or stop token (vs length)
    counts_BV: jax.Array  # i32[B, V] generated-token counts (presence/frequency penalty)
    prompt_mask_BV: jax.Array  # bool[B, V] tokens of the prompt (repetition penalty)
    sampling: SamplingArrays
    eos_E: jax.Array  # i32[E] token ids that end a row
    output_BM: jax.Array  # i32[B, M] generated tokens (while-loop path)
    recent_BR: jax.Array  # i32[B, RECENT] last tokens, prompt then generated (bad words)
    # With logprobs (while-loop path): f32[B, M] each token's, i32/f32[B, M, N] the top N.
    logprobs_out: tuple[jax.Array, jax.Array, jax.Array] | None = None
    # With prompt_logprobs: the same over the prompt, [B, T]: position t scores token t + 1.
    prompt_logprobs_out: tuple[jax.Array, jax.Array, jax.Array] | None = None
    adapter_B: jax.Array | None = None  # i32[B] each row's LoRA adapter (0: none), with LoRA


def _advance(state: DecodeState, logits_BV: jax.Array, cache: KVCache,
             mask_BW: jax.Array | None = None) -> DecodeState:
    """Sample one token per row from logits and record it; finished rows stay frozen. A
    row ends on an EOS id or one of its stop ids, neither allowed before its min_tokens.
    `mask_BW` (structured output's bitmask) restricts what is sampled; logprobs are the
    raw model's either way."""
    active = ~state.done_B
    x = logits_BV if mask_BW is None else apply_bitmask(logits_BV, mask_BW)
    x = ban_words(ban_ends(x, state.eos_E, state.sampling, state.num_generated_B),
                  state.sampling, state.recent_BR)
    tok = sample(x, state.sampling, state.num_generated_B, state.counts_BV,
                 state.prompt_mask_BV)
    tok = jnp.where(active, tok, state.tokens_B)
    n = state.num_generated_B
    B, M = state.output_BM.shape
    output = state.output_BM.at[jnp.arange(B), jnp.where(active, n, M)].set(tok, mode="drop")
    lp_out = state.logprobs_out
    if lp_out is not None:
        col, rows = jnp.where(active, n, M), jnp.arange(B)
        lp = step_logprobs(logits_BV, tok, jnp.any(active))
        lp_out = tuple(a.at[rows, col].set(x, mode="drop") for a, x in
                       zip(lp_out, (lp.token_B, lp.top_ids_BN, lp.top_BN), strict=True))
    n = n + active.astype(jnp.int32)
    is_eos = ends_row(tok, state.eos_E, state.sampling) & active
    done = state.done_B | is_eos | (n >= state.max_new_B)
    return dataclasses.replace(
        state, cache=cache, tokens_B=tok, num_generated_B=n, done_B=done,
        finish_eos_B=state.finish_eos_B | is_eos, output_BM=output,
        counts_BV=update_counts(state.counts_BV, tok, active), logprobs_out=lp_out,
        recent_BR=push_recent(state.recent_BR, tok, active))


@functools.partial(jax.jit, static_argnames=("cfg", "max_out", "impl", "logprobs",
                                             "prompt_logprobs"), donate_argnames=("cache",))
def start(weights: Weights, prompt_BT: jax.Array, prompt_len_B: jax.Array, cache: KVCache,
          sampling: SamplingArrays, max_new_B: jax.Array, eos_E: jax.Array, cfg: ModelConfig,
          max_out: int, impl: str = "xla", logprobs: bool = False,
          mask_BW: jax.Array | None = None, prompt_logprobs: bool = False,
          lora: LoraStack | None = None, adapter_B: jax.Array | None = None) -> DecodeState:
    """Prefill right-padded prompts into an empty cache and sample each row's first token
    (from the tokens `mask_BW` allows, if given). With `logprobs` the state also records
    every token's logprob and top alternatives; with `prompt_logprobs`, every prompt
    token's (unembedding each position: one row's [T, V] logits at a time). With `lora`,
    row b runs adapter adapter_B[b] (default: none) now and in every later step."""
    B, T = prompt_BT.shape
    if lora is not None and adapter_B is None:
        adapter_B = jnp.zeros((B,), jnp.int32)
    x, cache = hidden_states(weights, prompt_BT, cache, cfg, impl, lora, adapter_B)
    last = jnp.clip(prompt_len_B - 1, 0, T - 1)
    logits = unembed(weights, jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0], cfg)
    cache = cache.with_lengths(cache.lengths + prompt_len_B)
    valid_BT = jnp.arange(T)[None, :] < prompt_len_B[:, None]
    prompt_mask = jnp.zeros((B, cfg.vocab_size), bool).at[
        jnp.arange(B)[:, None], prompt_BT].max(valid_BT)
    state = DecodeState(
        cache=cache, tokens_B=jnp.zeros((B,), jnp.int32),
        num_generated_B=jnp.zeros((B,), jnp.int32), max_new_B=max_new_B,
        done_B=jnp.zeros((B,), bool), finish_eos_B=jnp.zeros((B,), bool),
        counts_BV=jnp.zeros((B, cfg.vocab_size), jnp.int32), prompt_mask_BV=prompt_mask,
        sampling=sampling, eos_E=eos_E, output_BM=jnp.zeros((B, max_out), jnp.int32),
        recent_BR=recent_tails(prompt_BT, prompt_len_B),
        adapter_B=None if lora is None else adapter_B)
    if logprobs:
        N = min(MAX_LOGPROBS, cfg.vocab_size)
        state.logprobs_out = (jnp.zeros((B, max_out), jnp.float32),
                              jnp.zeros((B, max_out, N), jnp.int32),
                              jnp.zeros((B, max_out, N), jnp.float32))
    if prompt_logprobs:
        targets_BT = jnp.pad(prompt_BT[:, 1:], ((0, 0), (0, 1)))

        def score(row):
            x_TD, t_T = row
            lp = step_logprobs(unembed(weights, x_TD, cfg), t_T, jnp.bool_(True))
            return lp.token_B, lp.top_ids_BN, lp.top_BN

        state.prompt_logprobs_out = jax.lax.map(score, (x, targets_BT))
    return _advance(state, logits, cache, mask_BW)


def _step_logits(weights: Weights, state: DecodeState, cfg: ModelConfig, impl: str,
                 mask_BW: jax.Array | None = None, lora: LoraStack | None = None
                 ) -> tuple[DecodeState, jax.Array]:
    """One decode step, and the raw logits; `mask_BW` restricts what may be sampled
    (structured output)."""
    logits, cache = decode_logits(weights, state.tokens_B, state.cache, cfg, impl, lora,
                                  state.adapter_B)
    # Rows already done must not grow: undo their length increment.
    cache = cache.with_lengths(jnp.where(state.done_B, state.cache.lengths, cache.lengths))
    return _advance(state, logits, cache, mask_BW), logits


def _step(weights: Weights, state: DecodeState, cfg: ModelConfig, impl: str,
          lora: LoraStack | None = None) -> DecodeState:
    return _step_logits(weights, state, cfg, impl, lora=lora)[0]


@functools.partial(jax.jit, static_argnames=("cfg", "impl"), donate_argnames=("state",))
def step(weights: Weights, state: DecodeState, want_logprobs: jax.Array,
         mask_BW: jax.Array | None = None, lora: LoraStack | None = None, *,
         cfg: ModelConfig, impl: str = "xla") -> tuple[DecodeState, jax.Array, Logprobs]:
    """One decode step, each row drawing from the tokens its `mask_BW` row allows (int32
    bitmask words, structured.py; None: any). Also returns i32[2, B] (token, done) as a
    fresh buffer that the host can read while the next step (which donates `state`) is
    already running, and the tokens' raw log-probabilities, computed only if
    `want_logprobs` (bool[], traced: asking never recompiles; pass an np.bool_ so the
    argument's type never changes)."""
    state, logits = _step_logits(weights, state, cfg, impl, mask_BW, lora)
    lp = step_logprobs(logits, state.tokens_B, want_logprobs)
    return state, jnp.stack([state.tokens_B, state.done_B.astype(jnp.int32)]), lp


@functools.partial(jax.jit, static_argnames=("cfg", "impl"), donate_argnames=("state",))
def run_loop(weights: Weights, state: DecodeState, cfg: ModelConfig, impl: str = "xla",
             lora: LoraStack | None = None) -> DecodeState:
    """Decode until every row is done, on device, with no host round trip per token."""
    return jax.lax.while_loop(lambda s: ~jnp.all(s.done_B),
                              lambda s: _step(weights, s, cfg, impl, lora), state)


def validate_lengths(prompt_len: int, max_new_tokens: int, cfg: ModelConfig) -> None:
    if prompt_len <= 0:
        raise BadRequestError("prompt is empty (0 tokens)")
    if max_new_tokens <= 0:
        raise BadRequestError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if prompt_len + max_new_tokens > cfg.max_seq_len:
        raise BadRequestError(
            f"prompt of {prompt_len} tokens + max_new_tokens={max_new_tokens} exceeds the "
            f"model's context of {cfg.max_seq_len} tokens")


def prepare(prompts: list[list[int]], max_new: list[int], cfg: ModelConfig,
            cache_dtype, mesh: jax.sharding.Mesh | None = None):
    """Host-side batching: pad prompts to a bucket and allocate a bucketed cache."""
    for p, m in zip(prompts, max_new, strict=True):
        validate_lengths(len(p), m, cfg)
    longest = max(len(p) for p in prompts)
    T = bucket(longest, MIN_PROMPT_BUCKET, cfg.max_seq_len)
    S = bucket(max(len(p) + m for p, m in zip(prompts, max_new, strict=True)),
               MIN_CACHE_BUCKET, cfg.max_seq_len)
    M = bucket(max(max_new), 16, cfg.max_seq_len)
    B = len(prompts)
    prompt_BT = np.full((B, T), cfg.pad_token_id, np.int32)
    for b, p in enumerate(prompts):
        prompt_BT[b, : len(p)] = p
    shardings = cache_shardings(cfg, B, S, mesh) if mesh is not None else None
    cache = init_cache(cfg, B, S, cache_dtype, shardings)
    return prompt_BT, np.array([len(p) for p in prompts], np.int32), cache, M
