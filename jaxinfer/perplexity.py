"""Quality of a (quantized) model: perplexity over a text, agreement with a reference model.

The text is cut into non-overlapping windows of `context_len` tokens; each window starts
from an empty cache and scores its tokens 1..n-1, so every variant sees the same
contexts. Windows are padded to one length so the whole text compiles once.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer import model
from jaxinfer.config import ModelConfig
from jaxinfer.errors import BadRequestError
from jaxinfer.kv_cache import KVCache
from jaxinfer.sampling import GREEDY
from jaxinfer.sharding import mesh_context
from jaxinfer.weights import Weights


@dataclasses.dataclass
class Perplexity:
    nll_sum: float  # summed negative log-likelihood (nats)
    num_tokens: int  # tokens scored
    top1: np.ndarray  # i32[num_tokens] the model's argmax prediction at each scored token

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll_sum / self.num_tokens)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _window(weights: Weights, tokens_1T: jax.Array, cache: KVCache, cfg: ModelConfig
            ) -> tuple[jax.Array, jax.Array]:
    """NLL and argmax for predicting tokens 1..T-1 of one window from its own prefix."""
    x, _ = model.hidden_states(weights, tokens_1T, cache, cfg)
    logits = model.unembed(weights, x[:, :-1], cfg).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, tokens_1T[:, 1:, None], axis=-1)[..., 0]
    return nll[0], jnp.argmax(logits, axis=-1)[0].astype(jnp.int32)


def perplexity(llm, token_ids: list[int], context_len: int = 512) -> Perplexity:
    """Perplexity of `llm` (an LLM) over `token_ids` in windows of `context_len` tokens."""
    if context_len < 2 or context_len > llm.cfg.max_seq_len:
        raise BadRequestError(f"context_len must be in [2, {llm.cfg.max_seq_len}], "
                              f"got {context_len}")
    if len(token_ids) < 2:
        raise BadRequestError(f"need at least 2 tokens to score, got {len(token_ids)}")
    nll_sum, n, top1 = 0.0, 0, []
    for start in range(0, len(token_ids), context_len):
        win = token_ids[start:start + context_len]
        if len(win) < 2:
            break
        padded = np.full((1, context_len), llm.cfg.pad_token_id, np.int32)
        padded[0, :len(win)] = win
        with mesh_context(llm.mesh):  # an expert mesh traces its shard_map in it
            nll, pred = _window(llm.params, jnp.asarray(padded),
                                llm.init_cache(1, context_len), cfg=llm.cfg)
        k = len(win) - 1  # padding sits after the real tokens: causal, so it never leaks
        nll_sum += float(np.asarray(nll[:k], np.float64).sum())
        top1.append(np.asarray(pred[:k]))
        n += k
    return Perplexity(nll_sum, n, np.concatenate(top1))


def greedy_tokens(llm, prompts: list[str], max_new_tokens: int = 32) -> list[list[int]]:
    """Greedy continuations of `prompts` (one batch), as token ids."""
    out = llm.generate(prompts, sampling=GREEDY, max_new_tokens=max_new_tokens)
    return [c.token_ids for c in out]


def agreement(ref: list[list[int]], got: list[list[int]]) -> tuple[float, float]:
    """(fraction of positions with the same token, mean fraction before the first
    difference) of two lists of greedy continuations."""
    same, prefix, total = 0, 0.0, 0
    for a, b in zip(ref, got, strict=True):
        m = max(len(a), len(b))
        same += sum(x == y for x, y in zip(a, b, strict=False))
        first = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                     min(len(a), len(b)))
        prefix += first / m if m else 1.0
        total += m
    return same / max(total, 1), prefix / max(len(ref), 1)
