"""Speculative decoding: a cheap draft proposes k tokens, the target checks them in one pass.

One round, per row (pure, jitted, batched):
    draft   d_1..d_k with proposal distributions q_1..q_k (a small model, or prompt lookup)
    verify  target distributions p_0..p_k for [x_0, d_1..d_k] in ONE forward over the cache
    accept  d_i while u_i < p_{i-1}(d_i) / q_{i-1}(d_i); at the first rejection draw from
            norm(max(0, p - q)); if all k pass, draw a bonus token from p_k
    rollback set cache.lengths to the accepted length: K/V written beyond it are hidden by
            the absolute-position causal mask and overwritten by the next round.
This is the rule of Leviathan et al. and Chen et al. (2023): every emitted token has
exactly the target's sampling distribution. Greedy rows use one-hot p and q, so they accept
exactly the draft tokens equal to the target's argmax and reproduce the target's greedy
output. The prompt-lookup draft is deterministic (q one-hot): it accepts d with prob p(d).

Shapes: B rows, k = num_speculative_tokens, V vocab, S sequence buffer = cache length.
    seq_BS     i32[B, S] prompt + generated tokens (the prompt-lookup draft's haystack)
    seq_len_B  i32[B]    tokens in seq_BS; both caches hold K/V for the first seq_len - 1
                         (the last token is the next round's first input)
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer import generate as gen
from jaxinfer.config import ModelConfig
from jaxinfer.errors import BadRequestError
from jaxinfer.kv_cache import KVCache, cache_shardings, init_cache
from jaxinfer.lora import LoraStack
from jaxinfer.model import decode_logits, hidden_states, prefill, unembed
from jaxinfer.runtime import to_host
from jaxinfer.sampling import (
    RECENT,
    Logprobs,
    SamplingArrays,
    SamplingParams,
    add_logit_bias,
    ban_ends,
    ban_words,
    ends_row,
    filter_logits,
    penalize_logits,
    recent_tails,
    step_logprobs,
)
from jaxinfer.structured import apply_bitmask
from jaxinfer.weights import Weights

log = logging.getLogger(__name__)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SpecState:
    target_cache: KVCache
    draft_cache: KVCache | None  # None for the prompt-lookup draft
    seq_BS: jax.Array  # i32[B, S]
    seq_len_B: jax.Array  # i32[B]
    num_generated_B: jax.Array  # i32[B]
    max_new_B: jax.Array  # i32[B]
    done_B: jax.Array  # bool[B]
    finish_eos_B: jax.Array  # bool[B]
    sampling: SamplingArrays
    eos_E: jax.Array  # i32[E]
    output_BM: jax.Array  # i32[B, M]
    rounds_B: jax.Array  # i32[B] verification passes
    accepted_B: jax.Array  # i32[B] draft tokens accepted (of k per round)
    counts_BV: jax.Array  # i32[B, V] generated-token counts (presence/frequency penalty)
    prompt_mask_BV: jax.Array  # bool[B, V] the prompt's tokens (repetition penalty)
    # With logprobs (while-loop path), as DecodeState's: f32[B, M], i32/f32[B, M, N].
    logprobs_out: tuple[jax.Array, jax.Array, jax.Array] | None = None
    # With LoRA adapters: i32[B] each row's target adapter (the draft has none: its
    # proposals only change how many are accepted, never the output distribution).
    adapter_B: jax.Array | None = None


def _per_position(arrays: SamplingArrays, T: int) -> SamplingArrays:
    """Each row's sampling arrays repeated for its T positions: rows b * T + t."""
    return jax.tree.map(lambda a: jnp.repeat(a, T, axis=0), arrays)


def processed_logits(logits_BTV: jax.Array, state: SpecState, d_BK: jax.Array) -> jax.Array:
    """The target's logits at the k + 1 verified positions as the plain sampler would see
    them there, f32[B, T, V]: logit_bias, then penalties over the prompt and everything
    generated before that position (earlier drafted tokens included), then min_tokens'
    ban on EOS and stop ids. The accept/reject rule then keeps exactly that distribution
    (whatever the draft proposes from)."""
    B, T, V = logits_BTV.shape
    a = state.sampling
    rows = _per_position(a, T)
    x = add_logit_bias(logits_BTV.reshape(B * T, V), rows)

    def penalize(x):
        # Counts before position t: the round's counts plus drafted tokens 1..t.
        drafted = jnp.cumsum(jax.nn.one_hot(d_BK[:, :T - 1], V, dtype=jnp.int32), 1)
        counts = state.counts_BV[:, None] + jnp.pad(drafted, ((0, 0), (1, 0), (0, 0)))
        prompt = jnp.repeat(state.prompt_mask_BV, T, axis=0)
        return penalize_logits(x, rows, counts.reshape(B * T, V), prompt)

    penalized = (a.repetition_penalty != 1) | (a.presence_penalty != 0) | (
        a.frequency_penalty != 0)
    x = jax.lax.cond(jnp.any(penalized), penalize, lambda x: x, x)
    step = (state.num_generated_B[:, None] + jnp.arange(T)[None]).reshape(-1)
    return ban_words(ban_ends(x, state.eos_E, rows, step), rows,
                     _recent_per_position(state, d_BK, T)).reshape(B, T, V)


def _recent_per_position(state: SpecState, d_BK: jax.Array, T: int) -> jax.Array:
    """i32[B * T, RECENT]: the tokens before each verified position (the sequence so far,
    then the drafted tokens before it), as the plain sampler's recent_BR would hold them."""
    ext = jnp.concatenate([recent_tails(state.seq_BS, state.seq_len_B), d_BK[:, :T - 1]], 1)
    windows = jnp.stack([ext[:, t:t + RECENT] for t in range(T)], 1)  # [B, T, RECENT]
    return windows.reshape(-1, RECENT)


def probs(logits_BTV: jax.Array, arrays: SamplingArrays) -> jax.Array:
    """The distribution each row samples from, f32[B, T, V]: temperature, top-k/p, min-p
    as in sampling.py; greedy rows (temperature 0) get the one-hot of the argmax."""
    B, T, V = logits_BTV.shape
    rows = _per_position(arrays, T)
    raw = logits_BTV.reshape(B * T, V).astype(jnp.float32)
    sampling = rows.temperature > 0
    x = raw / jnp.where(sampling, rows.temperature, 1.0)[:, None]
    filters = ((rows.top_k > 0) & (rows.top_k < V)) | (rows.top_p < 1) | (rows.min_p > 0)
    x = jax.lax.cond(jnp.any(filters & sampling), lambda x: filter_logits(x, rows),
                     lambda x: x, x)
    p = jnp.where(sampling[:, None], jax.nn.softmax(x, -1),
                  jax.nn.one_hot(jnp.argmax(raw, -1), V, dtype=jnp.float32))
    return p.reshape(B, T, V)


def _draw(keys_B: jax.Array, p_BV: jax.Array) -> jax.Array:
    return jax.vmap(jax.random.categorical)(keys_B, jnp.log(p_BV)).astype(jnp.int32)


def ngram_propose(seq_BS: jax.Array, seq_len_B: jax.Array, ngram_size: int, k: int
                  ) -> jax.Array:
    """Prompt lookup: find the latest earlier occurrence of the last n tokens (n from
    ngram_size down to 1) and propose the k tokens that followed it, i32[B, k]. Without a
    match it proposes the last token repeated (any deterministic guess keeps the rule exact).
    """
    B, S = seq_BS.shape
    pos_S = jnp.arange(S, dtype=jnp.int32)
    tail = lambda t: jnp.take_along_axis(seq_BS, jnp.maximum(seq_len_B - 1 - t, 0)[:, None],
                                         1)
    best_B = jnp.full((B,), -1, jnp.int32)
    for n in range(ngram_size, 0, -1):
        # match_BS[b, j]: seq[j - t] == seq[seq_len - 1 - t] for t < n, j an earlier end.
        match = (pos_S >= n - 1)[None] & (pos_S[None] <= seq_len_B[:, None] - 2)
        match &= (seq_len_B >= n + 1)[:, None]
        for t in range(n):
            shifted = jnp.pad(seq_BS, ((0, 0), (t, 0)))[:, :S]  # shifted[j] = seq[j - t]
            match &= shifted == tail(t)
        j_B = jnp.max(jnp.where(match, pos_S[None], -1), axis=1)
        best_B = jnp.where(best_B < 0, j_B, best_B)
    idx_BK = jnp.where(best_B[:, None] >= 0, best_B[:, None] + 1 + jnp.arange(k)[None],
                       seq_len_B[:, None] - 1)
    return jnp.take_along_axis(seq_BS, jnp.minimum(idx_BK, seq_len_B[:, None] - 1), 1)


def _draft_model(dw: Weights, state: SpecState, dcfg: ModelConfig, k: int, key,
                 impl: str, mask0_BW: jax.Array | None = None
                 ) -> tuple[jax.Array, jax.Array, KVCache]:
    """k draft decode steps. The first step re-feeds the last two tokens at seq_len - 2, so
    the draft catches up whatever the previous round accepted (at most one token behind).
    `mask0_BW` (structured output) restricts the first proposal to the tokens the grammar
    allows now; later ones depend on the drafted tokens, so only the target is masked there
    (any proposal keeps the rule exact)."""
    seq, n = state.seq_BS, state.seq_len_B
    two_B2 = jnp.take_along_axis(seq, jnp.stack([n - 2, n - 1], 1), 1)
    dc = state.draft_cache
    x, dc = hidden_states(dw, two_B2, dc.with_lengths(n - 2), dcfg, impl)
    logits_BV = unembed(dw, x[:, 1], dcfg)
    dc = dc.with_lengths(n)
    toks, qs = [], []
    for i in range(k):
        # logit_bias and min_tokens here too, so the draft proposes what the target may
        # accept (penalties are left to the target: any proposal keeps the rule exact).
        x = ban_ends(add_logit_bias(logits_BV, state.sampling), state.eos_E, state.sampling,
                     state.num_generated_B + i)
        if i == 0 and mask0_BW is not None:
            x = apply_bitmask(x, mask0_BW)
        q_BV = probs(x[:, None], state.sampling)[:, 0]
        d_B = _draw(key(i), q_BV)
        toks.append(d_B)
        qs.append(q_BV)
        if i < k - 1:
            logits_BV, dc = decode_logits(dw, d_B, dc, dcfg, impl)
    return jnp.stack(toks, 1), jnp.stack(qs, 1), dc


def _round_key(state: SpecState):
    """Per-row randomness of this round, from the row's own seed and step: batch-independent
    and reproducible. key(j) gives the B keys of draw j."""
    round_keys = jax.vmap(jax.random.fold_in)(state.sampling.keys(),
                                              state.num_generated_B.astype(jnp.uint32))
    return lambda j: jax.vmap(jax.random.fold_in, (0, None))(round_keys, j)


def propose(dw: Weights | None, state: SpecState, dcfg: ModelConfig | None, k: int,
            ngram_size: int, impl: str, mask0_BW: jax.Array | None = None
            ) -> tuple[SpecState, jax.Array, jax.Array | None]:
    """A round's first half: the draft's k tokens d_BK and their proposal distributions
    q_BKV (None for prompt lookup, whose q is one-hot); the state carries the draft cache."""
    if dw is None:
        return state, ngram_propose(state.seq_BS, state.seq_len_B, ngram_size, k), None
    d_BK, q_BKV, dc = _draft_model(dw, state, dcfg, k, _round_key(state), impl, mask0_BW)
    return dataclasses.replace(state, draft_cache=dc), d_BK, q_BKV


def _round(tw: Weights, dw: Weights | None, state: SpecState, cfg: ModelConfig,
           dcfg: ModelConfig | None, k: int, ngram_size: int, impl: str,
           want_logprobs: jax.Array | None = None, lora: LoraStack | None = None
           ) -> tuple[SpecState, Logprobs | None]:
    """One round: propose, then verify."""
    state, d_BK, q_BKV = propose(dw, state, dcfg, k, ngram_size, impl)
    return verify(tw, state, d_BK, q_BKV, cfg, k, impl, want_logprobs, lora=lora)


def verify(tw: Weights, state: SpecState, d_BK: jax.Array, q_BKV: jax.Array | None,
           cfg: ModelConfig, k: int, impl: str, want_logprobs: jax.Array | None = None,
           mask_BTW: jax.Array | None = None, lora: LoraStack | None = None
           ) -> tuple[SpecState, Logprobs | None]:
    """A round's second half: the target scores [x_0, d_1..d_k] in one pass, accepts and
    corrects. `mask_BTW` (structured output) restricts the target at each of the k + 1
    positions to what the grammar allows after the drafted tokens before it. The raw target
    log-probabilities of the k + 1 candidate tokens (rows b * (k + 1) + t) come back when
    `want_logprobs` is given (computed only if it is set), and are written into
    `state.logprobs_out` when the state records them. `lora`: the target's adapters, row b
    running state.adapter_B[b]."""
    B, S = state.seq_BS.shape
    M = state.output_BM.shape[1]
    active = ~state.done_B
    seq_len = state.seq_len_B
    key = _round_key(state)
    dc = state.draft_cache

    last_B = jnp.take_along_axis(state.seq_BS, (seq_len - 1)[:, None], 1)[:, 0]
    tc = state.target_cache
    x, tc = hidden_states(tw, jnp.concatenate([last_B[:, None], d_BK], 1),
                          tc.with_lengths(seq_len - 1), cfg, impl, lora, state.adapter_B)
    logits_BTV = unembed(tw, x, cfg)
    z_BTV = processed_logits(logits_BTV, state, d_BK)
    if mask_BTW is not None:
        z_BTV = apply_bitmask(z_BTV.reshape(B * (k + 1), -1),
                              mask_BTW.reshape(B * (k + 1), -1)).reshape(z_BTV.shape)
    p_BTV = probs(z_BTV, state.sampling)  # T = k + 1

    p_d = jnp.take_along_axis(p_BTV[:, :k], d_BK[..., None], -1)[..., 0]
    q_d = (jnp.ones_like(p_d) if q_BKV is None
           else jnp.take_along_axis(q_BKV, d_BK[..., None], -1)[..., 0])
    u_BK = jax.vmap(lambda kk: jax.random.uniform(kk, (k,)))(key(k))
    ok_BK = u_BK * q_d < p_d  # u < p/q without dividing by q
    n_acc = jnp.sum(jnp.cumprod(ok_BK.astype(jnp.int32), 1), 1)

    # Correction (or bonus) from norm(max(0, p_j - q_j)) at j = n_acc; q_k = 0 (bonus).
    p_j = jnp.take_along_axis(p_BTV, n_acc[:, None, None], 1)[:, 0]
    if q_BKV is None:
        d_j = jnp.take_along_axis(d_BK, jnp.minimum(n_acc, k - 1)[:, None], 1)[:, 0]
        q_j = jax.nn.one_hot(d_j, p_j.shape[-1]) * (n_acc < k)[:, None]
    else:
        q_pad = jnp.concatenate([q_BKV, jnp.zeros_like(q_BKV[:, :1])], 1)
        q_j = jnp.take_along_axis(q_pad, n_acc[:, None, None], 1)[:, 0]
    r_BV = jnp.maximum(p_j - q_j, 0.0)
    r_BV = jnp.where(jnp.sum(r_BV, -1, keepdims=True) > 0, r_BV, p_j)
    c_B = _draw(key(k + 1), r_BV)

    # Emit d_1..d_{n_acc}, then c; cut at the first EOS and at the row's budget.
    ar = jnp.arange(k + 1, dtype=jnp.int32)[None]
    e_BT = jnp.where(ar == n_acc[:, None], c_B[:, None],
                     jnp.concatenate([d_BK, jnp.zeros_like(d_BK[:, :1])], 1))
    eos_BT = ends_row(e_BT, state.eos_E, state.sampling) & (ar <= n_acc[:, None])
    first_eos = jnp.where(jnp.any(eos_BT, 1), jnp.argmax(eos_BT, 1), k + 1)
    n_emit = jnp.minimum(jnp.minimum(n_acc + 1, first_eos + 1),
                         state.max_new_B - state.num_generated_B)
    n_emit = jnp.where(active, n_emit, 0)
    emit = ar < n_emit[:, None]
    rows = jnp.arange(B)[:, None]
    out = state.output_BM.at[rows, jnp.where(emit, state.num_generated_B[:, None] + ar, M)
                             ].set(e_BT, mode="drop")
    seq = state.seq_BS.at[rows, jnp.where(emit, seq_len[:, None] + ar, S)].set(e_BT,
                                                                               mode="drop")
    n_gen = state.num_generated_B + n_emit
    eos_hit = active & (first_eos < n_emit)
    new_len = seq_len + n_emit
    counts = state.counts_BV.at[rows, e_BT].add(emit.astype(jnp.int32))
    lp, lp_out = None, state.logprobs_out
    if want_logprobs is not None or lp_out is not None:
        want = jnp.any(active) if want_logprobs is None else want_logprobs
        lp = step_logprobs(logits_BTV.reshape(B * (k + 1), -1), e_BT.reshape(-1), want)
    if lp_out is not None:
        col = jnp.where(emit, state.num_generated_B[:, None] + ar, M)
        lp_out = tuple(a.at[rows, col].set(x.reshape(B, k + 1, *x.shape[1:]), mode="drop")
                       for a, x in zip(lp_out, (lp.token_B, lp.top_ids_BN, lp.top_BN),
                                       strict=True))
    return dataclasses.replace(
        state, target_cache=tc.with_lengths(new_len - 1), draft_cache=dc, seq_BS=seq,
        seq_len_B=new_len, num_generated_B=n_gen, output_BM=out, counts_BV=counts,
        done_B=state.done_B | eos_hit | (n_gen >= state.max_new_B),
        finish_eos_B=state.finish_eos_B | eos_hit,
        rounds_B=state.rounds_B + active, accepted_B=state.accepted_B + jnp.where(
            active, n_acc, 0), logprobs_out=lp_out), lp


_STATIC = ("cfg", "draft_cfg", "k", "ngram_size", "impl")


@functools.partial(jax.jit, static_argnames=_STATIC, donate_argnames=("state",))
def step(target_weights: Weights, draft_weights: Weights | None, state: SpecState,
         cfg: ModelConfig, draft_cfg: ModelConfig | None, k: int, ngram_size: int = 3,
         impl: str = "xla", lora: LoraStack | None = None) -> SpecState:
    """One draft-and-verify round (1..k+1 new tokens per active row)."""
    return _round(target_weights, draft_weights, state, cfg, draft_cfg, k, ngram_size,
                  impl, lora=lora)[0]


@functools.partial(jax.jit, static_argnames=_STATIC, donate_argnames=("state",))
def run_loop(target_weights: Weights, draft_weights: Weights | None, state: SpecState,
             cfg: ModelConfig, draft_cfg: ModelConfig | None, k: int, ngram_size: int = 3,
             impl: str = "xla", lora: LoraStack | None = None) -> SpecState:
    """Rounds until every row is done, on device."""
    return jax.lax.while_loop(
        lambda s: ~jnp.all(s.done_B),
        lambda s: _round(target_weights, draft_weights, s, cfg, draft_cfg, k, ngram_size,
                         impl, lora=lora)[0], state)


@functools.partial(jax.jit, static_argnames=("cfg", "draft_cfg", "max_out", "impl", "logprobs",
                                             "prompt_logprobs"),
                   donate_argnames=("target_cache", "draft_cache"))
def start(target_weights: Weights, draft_weights: Weights | None, prompt_BT: jax.Array,
          prompt_len_B: jax.Array, target_cache: KVCache, draft_cache: KVCache | None,
          sampling: SamplingArrays, max_new_B: jax.Array, eos_E: jax.Array, cfg: ModelConfig,
          draft_cfg: ModelConfig | None, max_out: int, impl: str = "xla",
          logprobs: bool = False, prompt_logprobs: bool = False,
          mask_BW: jax.Array | None = None, lora: LoraStack | None = None,
          adapter_B: jax.Array | None = None
          ) -> tuple[SpecState, tuple[jax.Array, jax.Array, jax.Array] | None]:
    """Prefill both models with the prompts; the target samples each row's first token.
    With `logprobs` the state records every emitted token's logprob and alternatives;
    `mask_BW` restricts the first tokens (structured output); with `prompt_logprobs` the
    target also scores every prompt token (returned beside the
    state, as gen.start's `prompt_logprobs_out`, so the decode loop never carries it)."""
    st = gen.start(target_weights, prompt_BT, prompt_len_B, target_cache, sampling, max_new_B,
                   eos_E, cfg=cfg, max_out=max_out, impl=impl, logprobs=logprobs,
                   mask_BW=mask_BW, prompt_logprobs=prompt_logprobs, lora=lora,
                   adapter_B=adapter_B)
    if draft_weights is not None:
        _, draft_cache = prefill(draft_weights, prompt_BT, prompt_len_B, draft_cache,
                                 draft_cfg, impl)
    B, T = prompt_BT.shape
    seq = jnp.zeros((B, target_cache.max_len), jnp.int32).at[:, :T].set(prompt_BT)
    seq = seq.at[jnp.arange(B), prompt_len_B].set(st.tokens_B)
    zeros = jnp.zeros((B,), jnp.int32)
    return SpecState(
        target_cache=st.cache, draft_cache=draft_cache, seq_BS=seq,
        seq_len_B=prompt_len_B + 1, num_generated_B=st.num_generated_B, max_new_B=max_new_B,
        done_B=st.done_B, finish_eos_B=st.finish_eos_B, sampling=sampling, eos_E=eos_E,
        output_BM=st.output_BM, rounds_B=zeros, accepted_B=zeros, counts_BV=st.counts_BV,
        prompt_mask_BV=st.prompt_mask_BV, logprobs_out=st.logprobs_out, adapter_B=st.adapter_B
    ), st.prompt_logprobs_out


@functools.partial(jax.jit, static_argnames=("draft_cfg", "k", "ngram_size", "impl"),
                   donate_argnames=("state",))
def propose_step(draft_weights: Weights | None, state: SpecState, mask0_BW: jax.Array, *,
                 draft_cfg: ModelConfig | None, k: int, ngram_size: int, impl: str = "xla"
                 ) -> tuple[SpecState, jax.Array, jax.Array | None]:
    """A round split in two for structured output, part one: the drafted tokens d_BK (the
    host reads them to mask each drafted position) and their proposal distributions; the
    first proposal obeys `mask0_BW`."""
    return propose(draft_weights, state, draft_cfg, k, ngram_size, impl, mask0_BW)


@functools.partial(jax.jit, static_argnames=("cfg", "k", "impl"), donate_argnames=("state",))
def verify_step(target_weights: Weights, state: SpecState, d_BK: jax.Array,
                q_BKV: jax.Array | None, mask_BTW: jax.Array, lora: LoraStack | None = None,
                *, cfg: ModelConfig, k: int, impl: str = "xla") -> SpecState:
    """Part two: the target verifies under the masks of the k + 1 positions."""
    return verify(target_weights, state, d_BK, q_BKV, cfg, k, impl, mask_BTW=mask_BTW,
                  lora=lora)[0]


class RowGrammars:
    """The constrained rows of a speculative batch, on the host: feeds each round's emitted
    tokens to the rows' llguidance matchers, ends a row as soon as its grammar is complete
    (later tokens of that round are dropped), and runs a round split in two for them
    (propose_step, the masks along the drafted tokens, verify_step)."""

    def __init__(self, matchers: list, grammars, sampling: list[SamplingParams],
                 eos_ids: frozenset[int]):
        self.matchers, self.grammars = list(matchers), grammars
        self.complete = [False] * len(matchers)  # rows that ended on completing their grammar
        self._fed = [0] * len(matchers)  # tokens of each row its matcher has seen
        self._ends = [lambda t, sp=sp: sp.ends(t, eos_ids) for sp in sampling]

    @property
    def live(self) -> list[int]:
        return [b for b, m in enumerate(self.matchers) if m is not None]

    def mask(self) -> np.ndarray | None:
        """Each row's allowed next tokens (an int32 bitmask), None when no row is live."""
        return self.grammars.masks(self.matchers)

    def feed(self, state: SpecState) -> SpecState:
        """Advance the live rows' grammars over their new tokens; a completed row is frozen
        like one that hit EOS, cut right after the completing token."""
        out, n_gen, done = to_host((state.output_BM, state.num_generated_B, state.done_B))
        n_gen, cut = n_gen.copy(), []
        for b in self.live:
            m = self.matchers[b]
            for j in range(self._fed[b], int(n_gen[b])):
                tok = int(out[b, j])
                if self._ends[b](tok):
                    break
                if not m.consume_token(tok):
                    log.warning("a constrained row left its grammar: %s", m.get_error())
                if m.is_stopped():  # complete: nothing but EOS could follow
                    self.complete[b], n_gen[b] = True, j + 1
                    cut.append(b)
                    break
            self._fed[b] = int(n_gen[b])
            if done[b] or self.complete[b]:
                self.matchers[b] = None
        if not cut:
            return state
        rows = np.asarray(cut)
        return dataclasses.replace(
            state, done_B=state.done_B.at[rows].set(True),
            finish_eos_B=state.finish_eos_B.at[rows].set(False),
            num_generated_B=state.num_generated_B.at[rows].set(n_gen[rows]))

    def round(self, tw: Weights, dw: Weights | None, state: SpecState, cfg: ModelConfig,
              dcfg: ModelConfig | None, k: int, ngram_size: int, impl: str,
              lora: LoraStack | None = None) -> SpecState:
        """One split round: the draft proposes (its first token masked), the host masks
        every position along the drafted tokens, the target verifies under the masks."""
        state, d_BK, q_BKV = propose_step(dw, state, self.mask(), draft_cfg=dcfg, k=k,
                                          ngram_size=ngram_size, impl=impl)
        masks = self.grammars.drafted_masks(
            to_host(d_BK), {b: (self.matchers[b], self._ends[b]) for b in self.live})
        return verify_step(tw, state, d_BK, q_BKV, masks, lora, cfg=cfg, k=k, impl=impl)


def check_settings(k: int, ngram_size: int, cfg: ModelConfig,
                   draft_cfg: ModelConfig | None) -> None:
    """Bad speculative settings raise BadRequestError naming the value (every sampling
    setting works with a draft)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise BadRequestError(f"num_speculative_tokens must be a positive integer, got {k!r}")
    if draft_cfg is None and (isinstance(ngram_size, bool) or not isinstance(ngram_size, int)
                              or ngram_size < 1):
        raise BadRequestError(f"ngram_size must be a positive integer, got {ngram_size!r}")
    if draft_cfg is not None and draft_cfg.vocab_size != cfg.vocab_size:
        raise BadRequestError(f"draft vocab_size={draft_cfg.vocab_size} differs from the "
                              f"target's {cfg.vocab_size}; the models must share a tokenizer")


def prepare(prompts: list[list[int]], max_new: list[int], k: int, cfg: ModelConfig,
            draft_cfg: ModelConfig | None, dtype, mesh: jax.sharding.Mesh | None = None,
            draft_dtype=None):
    """Pad prompts to a bucket; allocate both caches (K/V in `dtype` and `draft_dtype`,
    int8 included) with room for k + 1 look-ahead slots."""
    for p, m in zip(prompts, max_new, strict=True):
        gen.validate_lengths(len(p), m, cfg)
    B = len(prompts)
    T = gen.bucket(max(len(p) for p in prompts), gen.MIN_PROMPT_BUCKET, cfg.max_seq_len)
    need = max(len(p) + m for p, m in zip(prompts, max_new, strict=True)) + k + 1
    S = max(T, gen.bucket(need, gen.MIN_CACHE_BUCKET, cfg.max_seq_len + k + 1))
    M = gen.bucket(max(max_new), 16, cfg.max_seq_len)
    prompt_BT = np.full((B, T), cfg.pad_token_id, np.int32)
    for b, p in enumerate(prompts):
        prompt_BT[b, : len(p)] = p

    def cache(c: ModelConfig, dt) -> KVCache:
        return init_cache(c, B, S, dt, cache_shardings(c, B, S, mesh) if mesh else None)

    draft_cache = (cache(draft_cfg, dtype if draft_dtype is None else draft_dtype)
                   if draft_cfg is not None else None)
    return (prompt_BT, np.array([len(p) for p in prompts], np.int32), cache(cfg, dtype),
            draft_cache, M)


@dataclasses.dataclass
class SpecResult:
    """Host-side outcome of a batch: tokens per row, timing and acceptance counts."""

    tokens: list[list[int]]
    finish_eos: list[bool]
    rounds: list[int]
    accepted: list[int]
    k: int
    ttft_s: float
    decode_s: float
    logprobs: tuple | None = None  # host logprobs_out (f32[B, M], [B, M, N] ids and values)
    prompt_logprobs: tuple | None = None  # host prompt_logprobs_out ([B, T], [B, T, N] x 2)
    complete: list[bool] | None = None  # rows that ended on completing their grammar

    def acceptance_rate(self, b: int) -> float:
        """Accepted draft tokens / proposed draft tokens for row b."""
        return self.accepted[b] / (self.k * self.rounds[b]) if self.rounds[b] else 0.0


def generate_ids(target_weights: Weights, draft_weights: Weights | None, cfg: ModelConfig,
                 draft_cfg: ModelConfig | None, prompts: list[list[int]],
                 sampling: list[SamplingParams], max_new: list[int], eos_E: np.ndarray,
                 k: int, ngram_size: int = 3, dtype=jnp.float32,
                 mesh: jax.sharding.Mesh | None = None, impl: str = "xla",
                 draft_dtype=None, matchers: list | None = None, grammars=None,
                 lora: LoraStack | None = None, adapter_B: np.ndarray | None = None
                 ) -> SpecResult:
    """Speculative generation for a batch of token-id prompts (draft_weights None: n-gram).
    `matchers` (one llguidance matcher or None per row, from `grammars`, a
    structured.Grammars) constrain rows to their grammars; with `lora` row b's target runs
    adapter adapter_B[b]."""
    import time

    check_settings(k, ngram_size, cfg, draft_cfg)
    prompt_BT, lens_B, tc, dc, M = prepare(prompts, max_new, k, cfg, draft_cfg, dtype, mesh,
                                           draft_dtype)
    rows = (RowGrammars(matchers, grammars, sampling, frozenset(int(e) for e in eos_E))
            if matchers is not None and any(m is not None for m in matchers) else None)
    t0 = time.perf_counter()
    state, prompt_lp = start(
        target_weights, draft_weights, prompt_BT, lens_B, tc, dc,
        SamplingArrays.from_params(sampling), np.asarray(max_new, np.int32), eos_E, cfg=cfg,
        draft_cfg=draft_cfg, max_out=M, impl=impl,
        logprobs=any(p.logprobs is not None for p in sampling),
        prompt_logprobs=any(p.prompt_logprobs is not None for p in sampling),
        mask_BW=None if rows is None else rows.mask(), lora=lora, adapter_B=adapter_B)
    state.num_generated_B.block_until_ready()
    ttft = time.perf_counter() - t0
    prompt_lp = to_host(prompt_lp)
    while rows is not None:  # the host in the loop while a constrained row is live
        state = rows.feed(state)
        if not rows.live:
            break
        state = rows.round(target_weights, draft_weights, state, cfg, draft_cfg, k,
                           ngram_size, impl, lora)
    state = run_loop(target_weights, draft_weights, state, cfg=cfg, draft_cfg=draft_cfg,
                     k=k, ngram_size=ngram_size, impl=impl, lora=lora)
    out, n, eos, rounds, acc, lp = to_host((
        state.output_BM, state.num_generated_B, state.finish_eos_B, state.rounds_B,
        state.accepted_B, state.logprobs_out))
    dt = time.perf_counter() - t0 - ttft
    return SpecResult([[int(t) for t in out[b, : n[b]]] for b in range(len(prompts))],
                      [bool(e) for e in eos], [int(r) for r in rounds],
                      [int(a) for a in acc], k, ttft, dt, lp, prompt_lp,
                      [False] * len(prompts) if rows is None else rows.complete)
