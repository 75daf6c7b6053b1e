"""Beam search as one jitted `lax.while_loop` over fixed shapes (vLLM's `LLM.beam_search`,
Hugging Face's `num_beams`).

Each of B prompts keeps W running beams (rows b * W + w of the KV cache) and W finished
hypotheses. A step extends every running beam by every token, scores candidates by
cumulative log-probability, and takes the top K = max(2, 1 + #EOS ids) * W of each prompt:
candidates ending in EOS (or at the token budget) among the first W may join the finished
set with score sum_logprobs / length ** length_penalty; the best W that did not end keep
running, and the cache rows follow their parents (a gather along the batch axis). The
search stops when no running beam can beat the worst finished one (the length-penalty
heuristic Hugging Face uses by default, `early_stopping=False`; True stops once W are
finished) or at the budget. These are HF's rules, so on the same weights the hypotheses
and scores equal `generate(num_beams=W)`'s (tests/test_e2e_smollm2.py).

    search(weights, prompt_BT, prompt_len_B, cache, eos_E, max_new, length_penalty, ...)
        -> BeamState (pure, jitted, cache donated);  outputs(state, ...) -> host results
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jaxinfer.config import ModelConfig
from jaxinfer.kv_cache import KVCache
from jaxinfer.lora import LoraStack
from jaxinfer.model import decode_logits, prefill
from jaxinfer.weights import Weights

_NEG = -1.0e9  # HF's "impossible" score: far below any sum of log-probabilities
MAX_WIDTH = 64  # beams per prompt (each is a KV-cache row)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class BeamState:
    cache: KVCache  # B * W rows, beam w of prompt b at row b * W + w
    logprobs_BWV: jax.Array  # f32[B, W, V] next-token log-probabilities of each beam
    run_seq_BWM: jax.Array  # i32[B, W, M] running beams' generated tokens
    run_score_BW: jax.Array  # f32[B, W] their cumulative log-probabilities
    seq_BWM: jax.Array  # i32[B, W, M] finished hypotheses' tokens
    score_BW: jax.Array  # f32[B, W] their length-penalized scores (_NEG: empty)
    len_BW: jax.Array  # i32[B, W] their lengths
    ended_BW: jax.Array  # bool[B, W] ended on EOS (vs the token budget)
    open_B: jax.Array  # bool[B] a running beam may still beat the finished ones
    step: jax.Array  # i32[] tokens generated so far
    done: jax.Array  # bool[]


def _gather(x: jax.Array, idx_BN: jax.Array) -> jax.Array:
    """x[b, idx[b, n], ...] for [B, K, ...] x."""
    return jnp.take_along_axis(x, idx_BN.reshape(idx_BN.shape + (1,) * (x.ndim - 2)), 1)


def _step(state: BeamState, eos_E: jax.Array, max_new: jax.Array, length_penalty: jax.Array,
          early_stopping: bool) -> tuple[BeamState, tuple[jax.Array, jax.Array]]:
    """One beam step on the current log-probabilities; returns the state (cache not yet
    reordered), the flat parent row of each next running beam (i32[B * W]) and its newest
    token (i32[B, W])."""
    B, W, V = state.logprobs_BWV.shape
    K = max(2, 1 + eos_E.shape[0]) * W
    t = state.step
    acc = (state.logprobs_BWV + state.run_score_BW[:, :, None]).reshape(B, W * V)
    top_score_BK, top_idx_BK = jax.lax.top_k(acc, K)
    parent_BK, tok_BK = top_idx_BK // V, (top_idx_BK % V).astype(jnp.int32)
    cand_BKM = _gather(state.run_seq_BWM, parent_BK).at[:, :, t].set(tok_BK)
    is_eos = jnp.any(tok_BK[..., None] == eos_E, -1)
    hits_BK = is_eos | (t + 1 >= max_new)
    # Running beams: the best W candidates that did not stop.
    run_scores = top_score_BK + jnp.where(hits_BK, _NEG, 0.0)
    _, keep_BW = jax.lax.top_k(run_scores, W)
    run_seq = _gather(cand_BKM, keep_BW)
    run_score = _gather(run_scores, keep_BW)
    rows = (jnp.arange(B)[:, None] * W + _gather(parent_BK, keep_BW)).reshape(-1)
    # Finished hypotheses: stopped candidates among the first W, if they can still matter.
    penalized = top_score_BK / (t + 1.0) ** length_penalty
    full = jnp.all(state.score_BW > _NEG / 2, -1, keepdims=True) & early_stopping
    can_join = hits_BK & (jnp.arange(K) < W)[None] & state.open_B[:, None] & ~full
    penalized = jnp.where(can_join, penalized, penalized + _NEG)
    merged_score = jnp.concatenate([state.score_BW, penalized], 1)
    _, best_BW = jax.lax.top_k(merged_score, W)
    merged_seq = jnp.concatenate([state.seq_BWM, cand_BKM], 1)
    merged_len = jnp.concatenate([state.len_BW, jnp.full((B, K), t + 1, jnp.int32)], 1)
    merged_ended = jnp.concatenate([state.ended_BW, is_eos], 1)
    score = _gather(merged_score, best_BW)
    finished = score > _NEG / 2
    # HF's default heuristic: the best running beam, scored at its current length, must
    # beat the worst finished hypothesis while any slot is still empty or it does.
    best_running = run_score[:, :1] / (t + 1.0) ** length_penalty
    worst = jnp.where(finished, jnp.min(score, 1, keepdims=True), _NEG)
    open_B = state.open_B & jnp.any(best_running > worst, -1)
    all_done = ~jnp.any(open_B) | jnp.all(hits_BK) | (
        early_stopping & jnp.all(finished))
    return dataclasses.replace(
        state, run_seq_BWM=run_seq, run_score_BW=run_score,
        seq_BWM=_gather(merged_seq, best_BW), score_BW=score,
        len_BW=_gather(merged_len, best_BW), ended_BW=_gather(merged_ended, best_BW),
        open_B=open_B, step=t + 1, done=all_done), (rows, _gather(tok_BK, keep_BW))


def _reorder(cache: KVCache, rows: jax.Array) -> KVCache:
    take = lambda x: None if x is None else jnp.take(x, rows, axis=1)
    return KVCache(k=take(cache.k), v=take(cache.v), lengths=jnp.take(cache.lengths, rows),
                   k_scale=take(cache.k_scale), v_scale=take(cache.v_scale))


@functools.partial(jax.jit, static_argnames=("cfg", "max_out", "early_stopping", "impl"),
                   donate_argnames=("cache",))
def search(weights: Weights, prompt_BT: jax.Array, prompt_len_B: jax.Array, cache: KVCache,
           eos_E: jax.Array, max_new: jax.Array, length_penalty: jax.Array, *,
           cfg: ModelConfig, max_out: int, early_stopping: bool = False,
           impl: str = "xla", lora: LoraStack | None = None,
           adapter_B: jax.Array | None = None) -> BeamState:
    """Prefill B right-padded prompts into the B * W rows of `cache` (W = its rows / B;
    each prompt's rows alike) and search for up to `max_new` (<= max_out) tokens; the
    state's seq/score/len/ended hold each prompt's W hypotheses, best first. The budget
    and length penalty are traced: only the prompt bucket, W and max_out compile. With
    `lora`, prompt b's beams all run adapter adapter_B[b] (regathering never moves a row
    to another prompt)."""
    B = prompt_BT.shape[0]
    W = cache.batch_size // B
    rep = lambda x: jnp.repeat(x, W, axis=0)
    ids = None if lora is None else rep(adapter_B)
    logits, cache = prefill(weights, rep(prompt_BT), rep(prompt_len_B), cache, cfg, impl,
                            lora, ids)
    V = logits.shape[-1]
    lp = jax.nn.log_softmax(logits.astype(jnp.float32), -1).reshape(B, W, V)
    zeros = jnp.zeros((B, W, max_out), jnp.int32)
    state = BeamState(
        cache=cache, logprobs_BWV=lp, run_seq_BWM=zeros,
        run_score_BW=jnp.zeros((B, W)).at[:, 1:].set(_NEG),  # beams start identical
        seq_BWM=zeros, score_BW=jnp.full((B, W), _NEG), len_BW=jnp.zeros((B, W), jnp.int32),
        ended_BW=jnp.zeros((B, W), bool), open_B=jnp.ones((B,), bool),
        step=jnp.int32(0), done=jnp.bool_(False))

    def body(s: BeamState) -> BeamState:
        s, (rows, tok_BW) = _step(s, eos_E, max_new, length_penalty, early_stopping)

        def advance(s: BeamState) -> BeamState:
            logits, c = decode_logits(weights, tok_BW.reshape(-1), _reorder(s.cache, rows),
                                      cfg, impl, lora, ids)
            lp = jax.nn.log_softmax(logits.astype(jnp.float32), -1).reshape(B, W, V)
            return dataclasses.replace(s, cache=c, logprobs_BWV=lp)

        return jax.lax.cond(s.done, lambda s: s, advance, s)

    return jax.lax.while_loop(lambda s: ~s.done, body, state)


@dataclasses.dataclass
class BeamSequence:
    text: str
    token_ids: list[int]  # an ending EOS id included, as in Completion
    score: float  # sum of log-probabilities / len(token_ids) ** length_penalty
    finish_reason: str  # "stop" (EOS) or "length"


@dataclasses.dataclass
class BeamSearchOutput:
    sequences: list[BeamSequence]  # best first
    prompt_tokens: int


def outputs(state: BeamState, prompt_lens: list[int], tokenizer) -> list[BeamSearchOutput]:
    """Each prompt's hypotheses, read back from the final state."""
    seq, score, n, ended = (jax.device_get(x) for x in (state.seq_BWM, state.score_BW,
                                                         state.len_BW, state.ended_BW))
    out = []
    for b, plen in enumerate(prompt_lens):
        hyps = []
        for w in range(score.shape[1]):
            if score[b, w] <= _NEG / 2:
                continue  # an empty slot (never filled)
            ids = [int(t) for t in seq[b, w, :n[b, w]]]
            hyps.append(BeamSequence(tokenizer.decode(ids, skip_special_tokens=True), ids,
                                     float(score[b, w]), "stop" if ended[b, w] else "length"))
        out.append(BeamSearchOutput(hyps, plen))
    return out
