"""Per-row token samplers, kept apart from the model.

Every sampling parameter is a per-row array traced through jit, so changing temperature,
top-k, seed, ... between requests never recompiles; the cheap paths (no penalties, no
filtering, all greedy) are `lax.cond` branches picked at run time from those arrays, and
top-k/top-p find their cutoffs by radix select instead of sorting the vocabulary.

Order, as in HF and vLLM: penalties -> temperature -> top-k -> top-p -> min-p -> draw.
A row's draw uses `fold_in(key_b, step_b)`, so its tokens depend only on its own seed and
step: a fixed seed reproduces and a request samples the same tokens whatever else is in
the batch. Everything is computed in float32 whatever the logits' dtype.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.errors import BadRequestError

MAX_LOGPROBS = 20  # most alternatives a request may ask for (OpenAI's top_logprobs limit)
MAX_N = 16  # completions per prompt (`n`; each is a row / an engine request)
MAX_LOGIT_BIAS = 300  # logit_bias entries per request (fixed, so the arrays never recompile)
MAX_STOP_TOKEN_IDS = 32  # stop_token_ids per request (likewise)
MAX_ALLOWED_TOKEN_IDS = 512  # allowed_token_ids per request (likewise)
MAX_BAD_WORDS = 64  # banned token sequences per request (a word spelled with and without
MAX_BAD_WORD_TOKENS = 8  # a leading space counts twice), each at most this many tokens
RECENT = MAX_BAD_WORD_TOKENS - 1  # tokens of context a decode state keeps for the bans
NO_ID = np.iinfo(np.int32).max  # padding of id arrays: matches no token, scatters nowhere
_KEY_IMPL = "threefry2x32"  # fixed, so u32[B, 2] key data means the same on every backend
_U32 = 0xFFFFFFFF


def _number(name: str, value: object, param: str | None = None) -> float:
    param = param or name
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise BadRequestError(f"{name} must be a number, got {value!r}", param)
    if not math.isfinite(value):
        raise BadRequestError(f"{name} must be finite, got {value!r}", param)
    return float(value)


def _is_int(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _stop_strings(stop: Any) -> tuple[str, ...]:
    """Stop strings as a tuple, from a string or a list of them; BadRequestError else."""
    strings = (stop,) if isinstance(stop, str) else stop
    if not isinstance(strings, (list, tuple)) or not all(isinstance(x, str) for x in strings):
        raise BadRequestError(f"stop must be a string or a list of strings, got {stop!r}",
                              "stop")
    return tuple(strings)


def _token_sequences(seqs: Any) -> tuple[tuple[int, ...], ...]:
    """bad_words_token_ids as a tuple of non-empty token-id tuples within the limits."""
    msg = f"bad_words_token_ids must be a list of token-id lists, got {seqs!r}"
    if isinstance(seqs, (str, bytes)) or not hasattr(seqs, "__iter__"):
        raise BadRequestError(msg, "bad_words_token_ids")
    out = []
    for seq in seqs:
        if isinstance(seq, (str, bytes)) or not hasattr(seq, "__iter__"):
            raise BadRequestError(msg, "bad_words_token_ids")
        seq = tuple(seq)
        if not seq or not all(_is_int(t) and 0 <= t < NO_ID for t in seq):
            raise BadRequestError(msg, "bad_words_token_ids")
        if len(seq) > MAX_BAD_WORD_TOKENS:
            raise BadRequestError(f"a bad word is {len(seq)} tokens {list(seq)}; at most "
                                  f"{MAX_BAD_WORD_TOKENS}", "bad_words")
        out.append(tuple(int(t) for t in seq))
    out = list(dict.fromkeys(out))
    if len(out) > MAX_BAD_WORDS:
        raise BadRequestError(f"{len(out)} bad word token sequences; at most {MAX_BAD_WORDS} "
                              "(a word counts twice: with and without a leading space)",
                              "bad_words")
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """One request's sampling settings, host side; bad values raise `BadRequestError`."""

    temperature: float = 1.0  # >= 0; 0 means greedy (argmax of the penalized logits)
    top_k: int = 0  # >= 0; 0 (or >= vocab size) means off
    top_p: float = 1.0  # in (0, 1]; 1 means off
    min_p: float = 0.0  # in [0, 1); 0 means off
    repetition_penalty: float = 1.0  # > 0; HF/CTRL rule over prompt and generated tokens
    presence_penalty: float = 0.0  # OpenAI: subtracted once from every generated token
    frequency_penalty: float = 0.0  # OpenAI: subtracted once per occurrence
    seed: int | None = None  # None: drawn from host entropy when the batch is built
    logprobs: int | None = None  # None: off; n: each token's logprob and the n most likely
    prompt_logprobs: int | None = None  # the same for every prompt token but the first
    # OpenAI's logit_bias: {token id: bias in [-100, 100]} added to the logits (at most
    # MAX_LOGIT_BIAS entries); kept as sorted (id, bias) pairs.
    logit_bias: Any = None
    # vLLM's stop conditions, applied on device: `stop_token_ids` end a row like EOS (the
    # id is in token_ids, not in the text); `min_tokens` bans EOS and the stop ids until
    # that many tokens are out; `ignore_eos` keeps decoding past EOS (benchmarks).
    stop_token_ids: tuple[int, ...] = ()
    min_tokens: int = 0
    ignore_eos: bool = False
    # vLLM's output-text settings (host side, never traced): leave special tokens (chat
    # markers) out of the text; keep a matched stop string at the end of the text.
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # Stop strings (as vLLM's SamplingParams takes them), on top of those the call passes.
    stop: tuple[str, ...] = ()
    # vLLM's truncate_prompt_tokens: keep only the prompt's last n tokens (left truncation).
    truncate_prompt_tokens: int | None = None
    # vLLM's allowed_token_ids: sample only these (at most MAX_ALLOWED_TOKEN_IDS); None: all.
    allowed_token_ids: tuple[int, ...] | None = None
    # vLLM's bad_words: never complete one of these words (each tokenized as it would
    # start the text and after a space, by `resolve_bad_words` when the request is made);
    # bad_words_token_ids (HF's bad_words_ids) gives the token sequences directly.
    bad_words: tuple[str, ...] = ()
    bad_words_token_ids: tuple[tuple[int, ...], ...] = ()
    # vLLM's n: completions per prompt, each its own row; choice j samples with seed + j
    # (when a seed is given), so they differ and choice 0 is what n=1 gives (`choice`).
    n: int = 1

    GREEDY: ClassVar[SamplingParams]

    def __post_init__(self) -> None:
        t = _number("temperature", self.temperature)
        if t < 0:
            raise BadRequestError(f"temperature must be >= 0 (0 means greedy), got {t}",
                                  "temperature")
        if not _is_int(self.top_k):
            raise BadRequestError(f"top_k must be an integer, got {self.top_k!r}", "top_k")
        if self.top_k < 0:
            raise BadRequestError(f"top_k must be >= 0 (0 means off), got {self.top_k}",
                                  "top_k")
        p = _number("top_p", self.top_p)
        if not 0 < p <= 1:
            raise BadRequestError(f"top_p must be in (0, 1], got {p}", "top_p")
        m = _number("min_p", self.min_p)
        if not 0 <= m < 1:
            raise BadRequestError(f"min_p must be in [0, 1), got {m}", "min_p")
        r = _number("repetition_penalty", self.repetition_penalty)
        if r <= 0:
            raise BadRequestError(f"repetition_penalty must be > 0, got {r}",
                                  "repetition_penalty")
        _number("presence_penalty", self.presence_penalty)
        _number("frequency_penalty", self.frequency_penalty)
        if self.seed is not None and not _is_int(self.seed):
            raise BadRequestError(f"seed must be an integer or None, got {self.seed!r}", "seed")
        if self.logit_bias is not None:
            object.__setattr__(self, "logit_bias", _bias_pairs(self.logit_bias))
        for name in ("logprobs", "prompt_logprobs"):
            n = getattr(self, name)
            if n is not None and (not _is_int(n) or not 0 <= n <= MAX_LOGPROBS):
                raise BadRequestError(f"{name} must be an integer in [0, {MAX_LOGPROBS}] or "
                                      f"None, got {n!r}", name)
        ids = self.stop_token_ids
        if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__") or not all(
                _is_int(t) and 0 <= t < NO_ID for t in ids):
            raise BadRequestError(f"stop_token_ids must be a list of token ids, got {ids!r}",
                                  "stop_token_ids")
        ids = tuple(sorted({int(t) for t in ids}))
        if len(ids) > MAX_STOP_TOKEN_IDS:
            raise BadRequestError(f"stop_token_ids has {len(ids)} ids; at most "
                                  f"{MAX_STOP_TOKEN_IDS}", "stop_token_ids")
        object.__setattr__(self, "stop_token_ids", ids)
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise BadRequestError(f"min_tokens must be an integer >= 0, got "
                                  f"{self.min_tokens!r}", "min_tokens")
        object.__setattr__(self, "stop", _stop_strings(self.stop))
        allowed = self.allowed_token_ids
        if allowed is not None:
            if isinstance(allowed, (str, bytes)) or not hasattr(allowed, "__iter__") or not all(
                    _is_int(t) and 0 <= t < NO_ID for t in allowed) or not len(allowed):
                raise BadRequestError(f"allowed_token_ids must be a non-empty list of token "
                                      f"ids or None, got {allowed!r}", "allowed_token_ids")
            allowed = tuple(sorted({int(t) for t in allowed}))
            if len(allowed) > MAX_ALLOWED_TOKEN_IDS:
                raise BadRequestError(f"allowed_token_ids has {len(allowed)} ids; at most "
                                      f"{MAX_ALLOWED_TOKEN_IDS}", "allowed_token_ids")
            object.__setattr__(self, "allowed_token_ids", allowed)
        words = (self.bad_words,) if isinstance(self.bad_words, str) else self.bad_words
        if not isinstance(words, (list, tuple)) or not all(
                isinstance(w, str) and w.strip() for w in words):
            raise BadRequestError(f"bad_words must be a list of non-empty strings, got "
                                  f"{self.bad_words!r}", "bad_words")
        object.__setattr__(self, "bad_words", tuple(words))
        object.__setattr__(self, "bad_words_token_ids",
                           _token_sequences(self.bad_words_token_ids))
        t = self.truncate_prompt_tokens
        if t is not None and (not _is_int(t) or t < 1):
            raise BadRequestError(f"truncate_prompt_tokens must be an integer >= 1 or None, "
                                  f"got {t!r}", "truncate_prompt_tokens")
        if not _is_int(self.n) or not 1 <= self.n <= MAX_N:
            raise BadRequestError(f"n must be an integer in [1, {MAX_N}], got {self.n!r}", "n")
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise BadRequestError(f"{name} must be true or false, got "
                                      f"{getattr(self, name)!r}", name)

    def choice(self, j: int) -> SamplingParams:
        """Completion j of the n: one row's settings (n=1), a given seed becoming seed + j."""
        seed = self.seed + j if j and self.seed is not None else self.seed
        return dataclasses.replace(self, n=1, seed=seed)

    def stops(self, extra: str | Sequence[str] = ()) -> tuple[str, ...]:
        """This request's stop strings: `extra` (a call's `stop` argument, checked like the
        field) and its own."""
        return tuple(dict.fromkeys(_stop_strings(extra) + self.stop))

    def truncate(self, prompt_ids: list[int]) -> list[int]:
        """The prompt as this request decodes it: its last truncate_prompt_tokens tokens."""
        n = self.truncate_prompt_tokens
        return list(prompt_ids[-n:]) if n is not None else prompt_ids

    def check_lengths(self, max_tokens: int) -> None:
        """BadRequestError unless min_tokens fits in the request's token budget."""
        if self.min_tokens > max_tokens:
            raise BadRequestError(f"min_tokens={self.min_tokens} exceeds max_tokens="
                                  f"{max_tokens}", "min_tokens")

    def resolve_bad_words(self, tokenizer: Any) -> SamplingParams:
        """These params with bad_words turned into token sequences (vLLM's rule: each word
        as it would start the text and after a space), added to bad_words_token_ids."""
        if not self.bad_words:
            return self
        seqs = list(self.bad_words_token_ids)
        for word in self.bad_words:
            for text in (word.lstrip(), " " + word.lstrip()):
                ids = tuple(tokenizer.encode(text, add_bos=False))
                if ids and ids not in seqs:
                    seqs.append(ids)
        return dataclasses.replace(self, bad_words=(), bad_words_token_ids=tuple(seqs))

    def ends(self, token: int, eos_ids: frozenset[int] | Sequence[int]) -> bool:
        """Whether `token` ends this request (host side of `ends_row`)."""
        return (token in eos_ids and not self.ignore_eos) or token in self.stop_token_ids


SamplingParams.GREEDY = SamplingParams(temperature=0.0)
GREEDY = SamplingParams.GREEDY
def _bias_pairs(bias: Any) -> tuple[tuple[int, float], ...] | None:
    """logit_bias as sorted (token id, bias) pairs, from a {id: bias} mapping (JSON's
    string keys too) or pairs; BadRequestError names a bad entry."""
    items = bias.items() if isinstance(bias, dict) else bias
    try:
        pairs = [(k, v) for k, v in items]
    except (TypeError, ValueError):
        raise BadRequestError(f"logit_bias must map token ids to biases, got {bias!r}",
                              "logit_bias") from None
    out = {}
    for k, v in pairs:
        try:
            i = int(k)
        except (TypeError, ValueError):
            raise BadRequestError(f"logit_bias keys must be token ids, got {k!r}",
                                  "logit_bias") from None
        if isinstance(k, bool) or isinstance(k, float) or i < 0:
            raise BadRequestError(f"logit_bias keys must be token ids, got {k!r}", "logit_bias")
        b = _number("logit_bias value", v, "logit_bias")
        if not -100 <= b <= 100:
            raise BadRequestError(f"logit_bias values must be in [-100, 100], got {b} for "
                                  f"token {i}", "logit_bias")
        out[i] = float(b)
    if len(out) > MAX_LOGIT_BIAS:
        raise BadRequestError(f"logit_bias has {len(out)} entries; at most {MAX_LOGIT_BIAS}",
                              "logit_bias")
    return tuple(sorted(out.items())) or None


def token_ids(ids: Any, vocab_size: int, name: str = "prompt") -> list[int]:
    """`ids` as a list of ints, or BadRequestError naming the first that is not an integer
    token id of the vocabulary (an out-of-range id would otherwise be clamped by the
    embedding gather: a silently different prompt)."""
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence | np.ndarray):
        raise BadRequestError(f"{name} must be a string or a list of token ids, got "
                              f"{ids!r}", name)
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, int | np.integer):
            raise BadRequestError(f"{name} token ids must be integers, got {t!r}", name)
        if not 0 <= t < vocab_size:
            raise BadRequestError(f"{name} token id {t} is outside the vocabulary of "
                                  f"{vocab_size}", name)
    return [int(t) for t in ids]


def check_vocab(params: Sequence[SamplingParams], vocab_size: int) -> None:
    """BadRequestError if a logit_bias, stop_token_ids or allowed_token_ids names a token
    outside the vocabulary."""
    for p in params:
        for name, ids in (("logit_bias", [i for i, _ in p.logit_bias or ()]),
                          ("stop_token_ids", p.stop_token_ids),
                          ("allowed_token_ids", p.allowed_token_ids or ()),
                          ("bad_words_token_ids",
                           [t for seq in p.bad_words_token_ids for t in seq])):
            token_ids(list(ids), vocab_size, name)


# A free slot's row: greedy with a fixed key, so it is the same on every process.
IDLE_ROW = SamplingParams(temperature=0.0, seed=0)


def _key_data(seed: int | None) -> tuple[int, int]:
    """Threefry key words of a seed (any int, taken mod 2**64); None draws a fresh one."""
    s = secrets.randbits(64) if seed is None else int(seed) & ((1 << 64) - 1)
    return (s >> 32) & _U32, s & _U32


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplingArrays:
    """Device-side sampling parameters, one row per sequence, traced through jit."""

    temperature: jax.Array  # f32[B]
    top_k: jax.Array  # i32[B]
    top_p: jax.Array  # f32[B]
    min_p: jax.Array  # f32[B]
    repetition_penalty: jax.Array  # f32[B]
    presence_penalty: jax.Array  # f32[B]
    frequency_penalty: jax.Array  # f32[B]
    key: jax.Array  # u32[B, 2] raw threefry key data (wrap with `keys()`)
    bias_ids: jax.Array  # i32[B, MAX_LOGIT_BIAS] logit_bias token ids (padding: 0 ...
    bias: jax.Array  # f32[B, MAX_LOGIT_BIAS] ... with bias 0, which adds nothing)
    stop_ids: jax.Array  # i32[B, MAX_STOP_TOKEN_IDS] stop_token_ids (padding: NO_ID)
    allowed_ids: jax.Array  # i32[B, MAX_ALLOWED_TOKEN_IDS] (all NO_ID: any token)
    # i32[B, MAX_BAD_WORDS, MAX_BAD_WORD_TOKENS] banned sequences, right-aligned (NO_ID
    # before a shorter one's first token; a row of NO_ID bans nothing)
    bad_ids: jax.Array
    min_tokens: jax.Array  # i32[B]
    ignore_eos: jax.Array  # bool[B]

    @classmethod
    def from_params(cls, params: Sequence[SamplingParams]) -> SamplingArrays:
        """Stack requests into rows; unseeded rows get their key from host entropy here."""
        if not params:
            raise BadRequestError("need at least one SamplingParams to build a batch, got 0")

        def col(name: str, dtype: type) -> jax.Array:
            return jnp.asarray(np.array([getattr(p, name) for p in params], dtype))

        big = np.iinfo(np.int32).max  # any k >= V is off; clamp so int32 cannot overflow
        return cls(
            temperature=col("temperature", np.float32),
            top_k=jnp.asarray(np.array([min(p.top_k, big) for p in params], np.int32)),
            top_p=col("top_p", np.float32), min_p=col("min_p", np.float32),
            repetition_penalty=col("repetition_penalty", np.float32),
            presence_penalty=col("presence_penalty", np.float32),
            frequency_penalty=col("frequency_penalty", np.float32),
            key=jnp.asarray(np.array([_key_data(p.seed) for p in params], np.uint32)),
            min_tokens=col("min_tokens", np.int32), ignore_eos=col("ignore_eos", bool),
            **_bias_arrays(params))

    @property
    def batch_size(self) -> int:
        return self.temperature.shape[0]

    def keys(self) -> jax.Array:
        """Typed per-row PRNG keys, key<threefry2x32>[B]."""
        return jax.random.wrap_key_data(self.key, impl=_KEY_IMPL)

    def with_row(self, i: int | jax.Array, row: SamplingArrays) -> SamplingArrays:
        """Copy with row `i` replaced by the one-row `row`: pure and jit-safe (traced `i`),
        so an engine can put a new request into slot i without rebuilding the batch."""
        return jax.tree.map(lambda a, r: a.at[i].set(r[0].astype(a.dtype)), self, row)


def _bias_arrays(params: Sequence[SamplingParams]) -> dict[str, jax.Array]:
    ids = np.zeros((len(params), MAX_LOGIT_BIAS), np.int32)
    vals = np.zeros((len(params), MAX_LOGIT_BIAS), np.float32)
    for b, p in enumerate(params):
        for j, (i, v) in enumerate(p.logit_bias or ()):
            ids[b, j], vals[b, j] = i, v
    stop = np.full((len(params), MAX_STOP_TOKEN_IDS), NO_ID, np.int32)
    for b, p in enumerate(params):
        stop[b, :len(p.stop_token_ids)] = p.stop_token_ids
    allowed = np.full((len(params), MAX_ALLOWED_TOKEN_IDS), NO_ID, np.int32)
    for b, p in enumerate(params):
        allowed[b, :len(p.allowed_token_ids or ())] = p.allowed_token_ids or ()
    bad = np.full((len(params), MAX_BAD_WORDS, MAX_BAD_WORD_TOKENS), NO_ID, np.int32)
    for b, p in enumerate(params):
        if p.bad_words:
            raise BadRequestError("bad_words need the tokenizer: resolve them with "
                                  "SamplingParams.resolve_bad_words (LLM.generate and "
                                  "Engine.submit do)", "bad_words")
        for w, seq in enumerate(p.bad_words_token_ids):
            bad[b, w, MAX_BAD_WORD_TOKENS - len(seq):] = seq
    return {"bias_ids": jnp.asarray(ids), "bias": jnp.asarray(vals),
            "stop_ids": jnp.asarray(stop), "allowed_ids": jnp.asarray(allowed),
            "bad_ids": jnp.asarray(bad)}


def ends_row(tokens: jax.Array, eos_E: jax.Array, arrays: SamplingArrays) -> jax.Array:
    """bool, the shape of `tokens` (i32[B] or i32[B, T]): which tokens end their row: an
    EOS id (unless the row ignores EOS) or one of the row's stop_token_ids."""
    t = tokens[..., None]
    lead = (arrays.batch_size,) + (1,) * (tokens.ndim - 1)
    eos = jnp.any(t == eos_E, -1) & ~arrays.ignore_eos.reshape(lead)
    return eos | jnp.any(t == arrays.stop_ids.reshape(*lead, -1), -1)


def ban_ends(logits_BV: jax.Array, eos_E: jax.Array, arrays: SamplingArrays,
             step_B: jax.Array) -> jax.Array:
    """Rows short of their min_tokens (`step_B` tokens out) cannot sample EOS or a stop
    id: those logits become -inf (skipped when no row is short)."""
    B = logits_BV.shape[0]
    short_B = step_B < arrays.min_tokens

    def ban(x):
        ids = jnp.concatenate([jnp.broadcast_to(eos_E, (B, eos_E.shape[0])),
                               arrays.stop_ids], 1)
        ids = jnp.where(short_B[:, None] & (ids >= 0), ids, NO_ID)  # eos_E pads with -1
        return x.at[jnp.arange(B)[:, None], ids].set(-jnp.inf, mode="drop")

    return jax.lax.cond(jnp.any(short_B), ban, lambda x: x, logits_BV)


def recent_tokens(ids: Sequence[int]) -> np.ndarray:
    """i32[RECENT]: the last RECENT of `ids`, right-aligned, NO_ID before a short one's
    first (a decode state's context for ban_words, from a prompt on the host)."""
    out = np.full((RECENT,), NO_ID, np.int32)
    tail = list(ids)[-RECENT:]
    if tail:
        out[RECENT - len(tail):] = tail
    return out


def recent_tails(seq_BS: jax.Array, len_B: jax.Array) -> jax.Array:
    """i32[B, RECENT]: each right-padded row's last RECENT tokens before `len_B`, as
    recent_tokens makes them on the host (a decode state's context for ban_words)."""
    idx = len_B[:, None] - RECENT + jnp.arange(RECENT)[None]
    tail = jnp.take_along_axis(seq_BS, jnp.maximum(idx, 0), 1)
    return jnp.where(idx >= 0, tail, NO_ID)


def push_recent(recent_BR: jax.Array, tokens_B: jax.Array, active_B: jax.Array) -> jax.Array:
    """The context after each active row's new token."""
    pushed = jnp.concatenate([recent_BR[:, 1:], tokens_B[:, None]], 1)
    return jnp.where(active_B[:, None], pushed, recent_BR)


def ban_words(logits_BV: jax.Array, arrays: SamplingArrays, recent_BR: jax.Array
              ) -> jax.Array:
    """-inf for each token that would complete one of a row's bad words: its last token,
    where the row's last tokens (`recent_BR`: prompt, then generated) equal the word's
    other tokens (a one-token word always). Skipped when no row has bad words."""
    def ban(x):
        prefix = arrays.bad_ids[..., :-1]  # [B, W, RECENT]
        match = jnp.all((prefix == NO_ID) | (prefix == recent_BR[:, None, :]), -1)
        last = jnp.where(match, arrays.bad_ids[..., -1], NO_ID)
        return x.at[jnp.arange(x.shape[0])[:, None], last].set(-jnp.inf, mode="drop")

    return jax.lax.cond(jnp.any(arrays.bad_ids[..., -1] != NO_ID), ban, lambda x: x,
                        logits_BV)


def add_logit_bias(logits_BV: jax.Array, arrays: SamplingArrays) -> jax.Array:
    """The logits (f32) plus each row's logit_bias, and -inf outside a row's
    allowed_token_ids: the per-request edits of the logits, each skipped when no row has
    one."""
    rows = jnp.arange(logits_BV.shape[0])[:, None]
    x = jax.lax.cond(
        jnp.any(arrays.bias != 0),
        lambda x: x.astype(jnp.float32).at[rows, arrays.bias_ids].add(arrays.bias,
                                                                      mode="drop"),
        lambda x: x.astype(jnp.float32), logits_BV)
    free_B1 = arrays.allowed_ids[:, :1] == NO_ID  # sorted ids: the first is padding

    def restrict(x):
        allowed = jnp.zeros(x.shape, bool).at[rows, arrays.allowed_ids].set(True, mode="drop")
        return jnp.where(allowed | free_B1, x, -jnp.inf)

    return jax.lax.cond(jnp.all(free_B1), lambda x: x, restrict, x)


def penalize_logits(logits_BV: jax.Array, arrays: SamplingArrays,
                    counts_BV: jax.Array | None = None,
                    prompt_mask_BV: jax.Array | None = None) -> jax.Array:
    """Repetition (HF: divide positive, multiply negative logits of tokens in the prompt
    or output) then presence/frequency (OpenAI: generated tokens only); f32[B, V]."""
    x = logits_BV.astype(jnp.float32)
    if counts_BV is None and prompt_mask_BV is None:
        return x  # nothing seen yet: every penalty is a no-op
    seen = jnp.zeros(x.shape, bool)
    if prompt_mask_BV is not None:
        seen = seen | prompt_mask_BV
    if counts_BV is not None:
        seen = seen | (counts_BV > 0)
    r = arrays.repetition_penalty[:, None]
    x = jnp.where(seen, jnp.where(x > 0, x / r, x * r), x)
    if counts_BV is not None:
        c = counts_BV.astype(jnp.float32)
        x = (x - c * arrays.frequency_penalty[:, None]
             - (c > 0) * arrays.presence_penalty[:, None])
    return x


def _ordered_u32(x: jax.Array) -> jax.Array:
    """Map float32 to uint32 keeping order, so a threshold search can run on bits
    (-0.0 becomes +0.0 first: they compare equal as floats and must tie here too)."""
    u = jax.lax.bitcast_convert_type(jnp.where(x == 0, 0.0, x), jnp.uint32)
    return jnp.where(u >> 31 == 1, ~u, u | jnp.uint32(1 << 31))


def _largest_passing(pred: Callable[[jax.Array], jax.Array], B: int) -> jax.Array:
    """Per row, the largest u32 t with pred(t) true, for pred monotone (true below some
    point); 0 if none. Built bit by bit from the top: 32 cheap passes instead of a sort."""
    def body(i: jax.Array, t_B: jax.Array) -> jax.Array:
        cand_B = t_B | (jnp.uint32(1) << (31 - i).astype(jnp.uint32))
        return jnp.where(pred(cand_B[:, None]), cand_B, t_B)

    return jax.lax.fori_loop(0, 32, body, jnp.zeros((B,), jnp.uint32))


def filter_logits(x_BV: jax.Array, arrays: SamplingArrays) -> jax.Array:
    """Mask to -inf what top-k, then top-p, then min-p drop. Each rule keeps the tokens at
    or above a per-row cutoff (ties kept); top-k and top-p cutoffs are found by radix
    select on the logits' bits, exact and ~50x cheaper than a full-vocab sort on CPU."""
    B, V = x_BV.shape
    key_BV = _ordered_u32(x_BV)
    zero_B = jnp.zeros((B,), jnp.uint32)  # cutoff 0 keeps every token
    k_B = arrays.top_k
    use_k_B = (k_B > 0) & (k_B < V)
    # top-k: largest t with at least k tokens at or above it, i.e. the k-th largest logit.
    cut_k_B = jax.lax.cond(
        jnp.any(use_k_B),
        lambda: jnp.where(use_k_B, _largest_passing(
            lambda t: jnp.sum(key_BV >= t, -1) >= k_B, B), zero_B),
        lambda: zero_B)

    # top-p over the top-k survivors: largest t whose mass at or above it is >= p, which
    # is the smallest set reaching p in sorted order (rounding short of p keeps all).
    def top_p() -> jax.Array:
        probs_BV = jax.nn.softmax(jnp.where(key_BV >= cut_k_B[:, None], x_BV, -jnp.inf), -1)
        cut_B = _largest_passing(
            lambda t: jnp.sum(jnp.where(key_BV >= t, probs_BV, 0.0), -1) >= arrays.top_p, B)
        return jnp.where(arrays.top_p < 1, cut_B, zero_B)

    cut_p_B = jax.lax.cond(jnp.any(arrays.top_p < 1), top_p, lambda: zero_B)
    # min-p: p_i < min_p * p_max  <=>  x_i < x_max + log(min_p); the top token survives
    # top-k/top-p, so no renormalisation is needed. log(0) = -inf: off.
    cut_m_B = jnp.max(x_BV, -1) + jnp.log(arrays.min_p)
    keep_BV = (key_BV >= jnp.maximum(cut_k_B, cut_p_B)[:, None]) & (x_BV >= cut_m_B[:, None])
    return jnp.where(keep_BV, x_BV, -jnp.inf)


def _draw(x_BV: jax.Array, arrays: SamplingArrays, step_B: jax.Array) -> jax.Array:
    """Temperature, filters (skipped when no sampling row filters), then one categorical
    draw per row with that row's own key folded with its step."""
    V = x_BV.shape[-1]
    sampling_B = arrays.temperature > 0
    x_BV = x_BV / jnp.where(sampling_B, arrays.temperature, 1.0)[:, None]
    filters_B = (((arrays.top_k > 0) & (arrays.top_k < V)) | (arrays.top_p < 1)
                 | (arrays.min_p > 0))
    x_BV = jax.lax.cond(jnp.any(filters_B & sampling_B),
                        lambda x: filter_logits(x, arrays), lambda x: x, x_BV)
    keys_B = jax.vmap(jax.random.fold_in)(arrays.keys(), step_B.astype(jnp.uint32))
    return jax.vmap(jax.random.categorical)(keys_B, x_BV).astype(jnp.int32)


def sample(logits_BV: jax.Array, arrays: SamplingArrays, step_B: jax.Array,
           counts_BV: jax.Array | None = None,
           prompt_mask_BV: jax.Array | None = None) -> jax.Array:
    """One token per row, i32[B]. `step_B` is the index of the token being generated,
    `counts_BV` how often each token was generated so far, `prompt_mask_BV` the prompt's
    tokens. Rows with temperature 0 take the argmax of the penalized logits."""
    penalized = (arrays.repetition_penalty != 1) | (arrays.presence_penalty != 0) | (
        arrays.frequency_penalty != 0)
    x_BV = jax.lax.cond(
        jnp.any(penalized),
        lambda x: penalize_logits(x, arrays, counts_BV, prompt_mask_BV),
        lambda x: x.astype(jnp.float32), add_logit_bias(logits_BV, arrays))
    greedy_B = jnp.argmax(x_BV, axis=-1).astype(jnp.int32)
    return jax.lax.cond(
        jnp.all(arrays.temperature == 0), lambda x: greedy_B,
        lambda x: jnp.where(arrays.temperature == 0, greedy_B, _draw(x, arrays, step_B)), x_BV)


def update_counts(counts_BV: jax.Array, tokens_B: jax.Array, active_B: jax.Array) -> jax.Array:
    """Count each active row's new token (for presence/frequency penalties); pure."""
    B = counts_BV.shape[0]
    return counts_BV.at[jnp.arange(B), tokens_B].add(active_B.astype(counts_BV.dtype))


def token_logprobs(logits_BV: jax.Array, tokens_B: jax.Array) -> jax.Array:
    """f32[B] log-probability of each row's token under the raw (unpenalized, T=1) model."""
    logp_BV = jax.nn.log_softmax(logits_BV.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp_BV, tokens_B[:, None].astype(jnp.int32), -1)[:, 0]


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability under the raw model (before penalties and
    temperature), and the request's `logprobs` most likely tokens at that step."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # (token id, logprob), most likely first


def host_logprobs(token_ids: Sequence[int], lp_T, top_ids_TN, top_TN, n: int
                  ) -> list[TokenLogprob]:
    """One row's device logprobs (numpy, one entry per generated token) as TokenLogprobs
    with the `n` alternatives the request asked for."""
    return [TokenLogprob(int(t), float(lp_T[i]),
                         tuple((int(a), float(b)) for a, b in zip(top_ids_TN[i, :n],
                                                                  top_TN[i, :n], strict=True)))
            for i, t in enumerate(token_ids)]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Logprobs:
    """Per-row log-probabilities of a step's tokens: what `logprobs=n` requests get back."""

    token_B: jax.Array  # f32[B] log p(chosen token)
    top_ids_BN: jax.Array  # i32[B, N] the N = min(MAX_LOGPROBS, V) likeliest, best first
    top_BN: jax.Array  # f32[B, N] their log-probabilities


def step_logprobs(logits_BV: jax.Array, tokens_B: jax.Array, want: jax.Array) -> Logprobs:
    """Log-probabilities under the raw model (log_softmax of the logits before penalties,
    temperature and filters: vLLM's default "raw" logprobs), so they mean the same thing
    for a greedy and a sampled request. Computed only when `want` (a traced bool) is set,
    zeros otherwise: a batch where nobody asked pays nothing, and asking never recompiles."""
    B, V = logits_BV.shape
    N = min(MAX_LOGPROBS, V)

    def compute(x):
        logp_BV = jax.nn.log_softmax(x.astype(jnp.float32), axis=-1)
        top_BN, ids_BN = jax.lax.top_k(logp_BV, N)
        tok_B = jnp.take_along_axis(logp_BV, tokens_B[:, None].astype(jnp.int32), -1)[:, 0]
        return Logprobs(tok_B, ids_BN.astype(jnp.int32), top_BN)

    def skip(x):
        return Logprobs(jnp.zeros((B,), jnp.float32), jnp.zeros((B, N), jnp.int32),
                        jnp.zeros((B, N), jnp.float32))

    return jax.lax.cond(want, compute, skip, logits_BV)
