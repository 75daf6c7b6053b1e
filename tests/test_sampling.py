"""Samplers: greedy, filters (top-k/top-p/min-p), penalties, seeding, batch invariance,
no recompiles on new parameter values, and parameter validation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.errors import BadRequestError
from jaxinfer.sampling import (
    GREEDY,
    MAX_BAD_WORD_TOKENS,
    MAX_BAD_WORDS,
    NO_ID,
    RECENT,
    SamplingArrays,
    SamplingParams,
    ban_ends,
    ban_words,
    check_vocab,
    ends_row,
    filter_logits,
    penalize_logits,
    sample,
    token_logprobs,
    update_counts,
)

_sample = jax.jit(sample)


def _logits(seed: int, B: int, V: int, scale: float = 3.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((B, V)) * scale).astype(np.float32)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _draws(logits_V: np.ndarray, params: SamplingParams, n_seeds: int, n_steps: int
           ) -> np.ndarray:
    """Tokens from n_seeds rows (one seed each) x n_steps steps of one logits row."""
    rows = [dataclasses.replace(params, seed=s) for s in range(n_seeds)]
    arrays = SamplingArrays.from_params(rows)
    logits_BV = jnp.broadcast_to(jnp.asarray(logits_V), (n_seeds, logits_V.shape[-1]))
    steps_NB = jnp.broadcast_to(jnp.arange(n_steps, dtype=jnp.int32)[:, None],
                                (n_steps, n_seeds))
    f = jax.jit(jax.vmap(lambda s: sample(logits_BV, arrays, s)))
    return np.asarray(f(steps_NB)).ravel()


def test_greedy_is_argmax_in_float32():
    logits = _logits(0, 6, 1000)
    arrays = SamplingArrays.from_params([GREEDY] * 6)
    tok = _sample(jnp.asarray(logits, jnp.bfloat16), arrays, jnp.zeros(6, jnp.int32))
    assert tok.dtype == jnp.int32
    want = np.argmax(np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32)), -1)
    np.testing.assert_array_equal(tok, want)
    np.testing.assert_array_equal(_sample(jnp.asarray(logits), arrays, jnp.zeros(6, jnp.int32)),
                                  np.argmax(logits, -1))


def test_mixed_batch_greedy_and_sampling_rows():
    B, V = 4, 1000
    logits = _logits(1, B, V, scale=0.1)  # nearly flat: sampled rows rarely hit the argmax
    params = [GREEDY, SamplingParams(seed=1), GREEDY, SamplingParams(seed=2)]
    arrays = SamplingArrays.from_params(params)
    toks = np.stack([_sample(logits, arrays, jnp.full(B, s, jnp.int32)) for s in range(20)])
    np.testing.assert_array_equal(toks[:, [0, 2]], np.tile(np.argmax(logits, -1)[[0, 2]], (20, 1)))
    for b in (1, 3):
        assert len(set(toks[:, b].tolist())) > 10


def test_top_k_only_emits_the_k_best():
    V, k = 64, 5
    logits = _logits(2, 1, V)[0]
    toks = _draws(logits, SamplingParams(temperature=2.0, top_k=k), 64, 64)
    best = set(np.argsort(-logits)[:k].tolist())
    assert set(toks.tolist()) == best  # all of them, and nothing else


def test_top_k_one_is_greedy_and_k_above_vocab_is_off():
    B, V = 5, 300
    logits = jnp.asarray(_logits(3, B, V))
    steps = jnp.arange(B, dtype=jnp.int32)
    arrays = SamplingArrays.from_params([SamplingParams(top_k=1, seed=b) for b in range(B)])
    np.testing.assert_array_equal(_sample(logits, arrays, steps), np.argmax(logits, -1))
    # A filtering row forces the sort path; k > V must then match k = 0 exactly.
    other = SamplingParams(top_p=0.5, seed=99)
    off = SamplingArrays.from_params([SamplingParams(top_k=0, seed=7), other])
    big = SamplingArrays.from_params([SamplingParams(top_k=V + 10, seed=7), other])
    huge = SamplingArrays.from_params([SamplingParams(top_k=1 << 40, seed=7), other])
    for s in range(10):
        st = jnp.full(2, s, jnp.int32)
        want = _sample(logits[:2], off, st)[0]
        assert _sample(logits[:2], big, st)[0] == want
        assert _sample(logits[:2], huge, st)[0] == want


def _nucleus(probs: np.ndarray, p: float) -> np.ndarray:
    order = np.argsort(-probs)
    before = np.cumsum(probs[order]) - probs[order]
    return order[before < p]


def test_top_p_keeps_nucleus_with_renormalized_frequencies():
    V, p, temp = 40, 0.7, 0.8
    logits = _logits(4, 1, V, scale=1.5)[0]
    probs = _softmax(logits / temp)  # temperature applies before top-p
    keep = _nucleus(probs, p)
    assert 3 <= len(keep) < V // 2
    toks = _draws(logits, SamplingParams(temperature=temp, top_p=p), 128, 250)
    assert set(toks.tolist()) <= set(keep.tolist())
    n = len(toks)
    expected = probs[keep] / probs[keep].sum() * n
    observed = np.bincount(toks, minlength=V)[keep]
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    df = len(keep) - 1
    assert chi2 < df + 6 * np.sqrt(2 * df), (chi2, df)


def _reference_keep(x: np.ndarray, k: int, p: float, min_p: float) -> np.ndarray:
    """Sort-based top-k -> top-p -> min-p, written the obvious way; ties at a cutoff stay."""
    srt = np.sort(x)[::-1]
    cut = srt[k - 1] if 0 < k < len(x) else -np.inf
    if p < 1:
        probs = _softmax(np.where(srt >= cut, srt, -np.inf).astype(np.float64))
        before = np.cumsum(probs) - probs
        cut = max(cut, srt[max(int((before < p).sum()), 1) - 1])
    if min_p > 0:
        cut = max(cut, srt[0] + np.log(min_p))
    return x >= cut


def test_filter_matches_sort_reference_with_ties_and_masked_tokens():
    rng = np.random.default_rng(16)
    B, V = 256, 48
    x = np.round(rng.standard_normal((B, V)) * 2, 0).astype(np.float32)  # many ties
    x[rng.random((B, V)) < 0.1] = -np.inf
    x[:, 0] = np.maximum(x[:, 0], 0)  # at least one finite logit per row
    ks = rng.choice([0, 1, 3, 10, V, V + 5], B)
    ps = rng.choice([1.0, 0.05, 0.3, 0.6, 0.9], B)
    mps = rng.choice([0.0, 0.01, 0.2], B)
    arrays = SamplingArrays.from_params([
        SamplingParams(top_k=int(k), top_p=float(p), min_p=float(m))
        for k, p, m in zip(ks, ps, mps, strict=True)])
    got = np.isfinite(np.asarray(jax.jit(filter_logits)(jnp.asarray(x), arrays)))
    for b in range(B):
        want = _reference_keep(x[b], ks[b], ps[b], mps[b]) & np.isfinite(x[b])
        np.testing.assert_array_equal(got[b], want, err_msg=f"row {b}")


def test_min_p_never_emits_below_threshold():
    V, min_p = 64, 0.2
    logits = _logits(5, 1, V, scale=1.5)[0]
    probs = _softmax(logits)
    allowed = set(np.nonzero(probs >= min_p * probs.max())[0].tolist())
    assert 2 <= len(allowed) < V // 2
    toks = _draws(logits, SamplingParams(min_p=min_p), 64, 64)
    assert set(toks.tolist()) == allowed


def test_fixed_seed_reproduces_and_seeds_differ():
    V = 500
    logits = jnp.asarray(_logits(6, 1, V, scale=0.5))

    def run(seed):
        arrays = SamplingArrays.from_params([SamplingParams(seed=seed)])
        return [int(_sample(logits, arrays, jnp.array([s], jnp.int32))[0]) for s in range(16)]

    assert run(1234) == run(1234)
    assert run(1234) != run(1235)
    assert run(None) != run(None)  # unseeded rows draw fresh host entropy


@pytest.mark.parametrize("req", [
    SamplingParams(temperature=0.9, seed=42),  # batch 1 takes the no-sort, no-penalty path
    SamplingParams(temperature=0.9, top_p=0.95, seed=42),
])
def test_same_request_same_tokens_in_any_batch(req):
    V = 400
    row = _logits(7, 1, V, scale=0.7)[0]
    # Batch 1: request first, others neither filter nor penalise.
    b1 = np.concatenate([row[None], _logits(8, 2, V)])
    a1 = SamplingArrays.from_params([req, SamplingParams(seed=1), GREEDY])
    # Batch 2: request third, others use top-k/min-p/penalties, different batch size.
    b2 = np.concatenate([_logits(9, 2, V), row[None], _logits(10, 2, V)])
    a2 = SamplingArrays.from_params([
        SamplingParams(top_k=3, seed=5), GREEDY, req, SamplingParams(min_p=0.3),
        SamplingParams(temperature=0.5, presence_penalty=1.0, seed=6)])
    c2 = jnp.zeros((5, V), jnp.int32).at[4, :10].set(1)
    toks = []
    for s in range(12):
        t1 = _sample(b1, a1, jnp.array([s, 3, 0], jnp.int32))
        t2 = _sample(b2, a2, jnp.array([0, 1, s, 5, 2], jnp.int32), c2)
        assert int(t1[0]) == int(t2[2]), s
        toks.append(int(t1[0]))
    assert len(set(toks)) > 6  # really sampling, not stuck on one token


def test_with_row_inside_jit_replaces_one_slot():
    V = 200
    logits = jnp.asarray(_logits(11, 3, V, scale=0.5))
    g0, g2 = SamplingParams(temperature=0, seed=0), SamplingParams(temperature=0, seed=2)
    base = SamplingArrays.from_params([g0, GREEDY, g2])
    req = SamplingParams(temperature=0.7, top_k=20, seed=9)
    put = jax.jit(lambda a, i, r: a.with_row(i, r))
    arrays = put(base, jnp.int32(1), SamplingArrays.from_params([req]))
    direct = SamplingArrays.from_params([g0, req, g2])
    for got, want in zip(jax.tree.leaves(arrays), jax.tree.leaves(direct), strict=True):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
    steps = jnp.array([0, 4, 0], jnp.int32)
    np.testing.assert_array_equal(_sample(logits, arrays, steps), _sample(logits, direct, steps))


def _hf_repetition(logits, seen, penalty):
    out = logits.copy()
    s = out[seen]
    out[seen] = np.where(s < 0, s * penalty, s / penalty)
    return out


def test_repetition_penalty_matches_hf_rule():
    B, V = 3, 50
    rng = np.random.default_rng(12)
    logits = _logits(12, B, V)
    prompt = rng.random((B, V)) < 0.2
    counts = (rng.random((B, V)) < 0.2) * rng.integers(1, 4, (B, V))
    pens = [1.3, 1.0, 0.7]
    arrays = SamplingArrays.from_params([SamplingParams(repetition_penalty=r) for r in pens])
    got = penalize_logits(jnp.asarray(logits), arrays, jnp.asarray(counts, jnp.int32),
                          jnp.asarray(prompt))
    for b in range(B):
        want = _hf_repetition(logits[b], prompt[b] | (counts[b] > 0), pens[b])
        np.testing.assert_allclose(got[b], want, rtol=1e-6)
    # Greedy decoding picks the argmax of the penalized logits: penalise the argmax away.
    top = int(np.argmax(logits[0]))
    mask = np.zeros((1, V), bool)
    mask[0, top] = True
    arr = SamplingArrays.from_params([SamplingParams(temperature=0, repetition_penalty=1e3)])
    tok = _sample(jnp.asarray(logits[:1]), arr, jnp.zeros(1, jnp.int32), None, mask)
    assert int(tok[0]) == int(np.argmax(_hf_repetition(logits[0], mask[0], 1e3)))
    assert int(tok[0]) != top


def test_presence_and_frequency_match_openai_formula():
    B, V = 3, 50
    rng = np.random.default_rng(13)
    logits = _logits(13, B, V)
    counts = (rng.random((B, V)) < 0.3) * rng.integers(1, 5, (B, V))
    pp, fp = [0.5, 0.0, -1.0], [0.0, 0.8, 0.3]
    arrays = SamplingArrays.from_params(
        [SamplingParams(presence_penalty=p, frequency_penalty=f)
         for p, f in zip(pp, fp, strict=True)])
    got = penalize_logits(jnp.asarray(logits), arrays, jnp.asarray(counts, jnp.int32),
                          jnp.zeros((B, V), bool))
    want = (logits - counts * np.array(fp)[:, None]
            - (counts > 0) * np.array(pp)[:, None])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    # And `sample` uses them: greedy rows pick the penalized argmax.
    greedy = SamplingArrays.from_params(
        [SamplingParams(temperature=0, presence_penalty=p, frequency_penalty=f)
         for p, f in zip(pp, fp, strict=True)])
    tok = _sample(jnp.asarray(logits), greedy, jnp.zeros(B, jnp.int32),
                  jnp.asarray(counts, jnp.int32))
    np.testing.assert_array_equal(tok, np.argmax(want, -1))


def test_update_counts_skips_inactive_rows():
    counts = jnp.zeros((3, 8), jnp.int32).at[0, 2].set(1)
    out = update_counts(counts, jnp.array([2, 5, 7]), jnp.array([True, False, True]))
    want = np.zeros((3, 8), np.int32)
    want[0, 2], want[2, 7] = 2, 1
    np.testing.assert_array_equal(out, want)


def test_token_logprobs_is_log_softmax():
    logits = _logits(14, 4, 30)
    toks = np.array([0, 5, 29, 7])
    got = token_logprobs(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(toks))
    assert got.dtype == jnp.float32
    x = np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32))
    want = np.log(_softmax(x))[np.arange(4), toks]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_new_parameter_values_do_not_recompile():
    traces = 0

    def f(logits, arrays, step, counts, mask):
        nonlocal traces
        traces += 1
        return sample(logits, arrays, step, counts, mask)

    jf = jax.jit(f)
    B, V = 4, 128
    logits = jnp.asarray(_logits(15, B, V))
    counts = jnp.zeros((B, V), jnp.int32)
    mask = jnp.zeros((B, V), bool)
    settings = [
        [GREEDY] * B,
        [SamplingParams(seed=i) for i in range(B)],
        [SamplingParams(temperature=0.3, top_k=7, top_p=0.8, min_p=0.1, seed=i)
         for i in range(B)],
        [SamplingParams(repetition_penalty=1.2, presence_penalty=0.4, frequency_penalty=0.1),
         GREEDY, SamplingParams(top_k=1000), SamplingParams(temperature=2.0, top_p=0.3)],
        [SamplingParams(logit_bias={"5": 100}), GREEDY, GREEDY,
         SamplingParams(logit_bias={i: -1 for i in range(300)})],
        [SamplingParams(bad_words_token_ids=[[5], [6, 7]]), GREEDY, GREEDY, GREEDY],
    ]
    for s, params in enumerate(settings):
        jf(logits, SamplingArrays.from_params(params), jnp.full(B, s, jnp.int32), counts, mask)
    assert traces == 1
    assert jf._cache_size() == 1


@pytest.mark.parametrize("kwargs, name, value", [
    (dict(temperature=-1), "temperature", "-1"),
    (dict(top_p=0), "top_p", "0"),
    (dict(top_p=1.5), "top_p", "1.5"),
    (dict(top_k=-1), "top_k", "-1"),
    (dict(min_p=1.0), "min_p", "1.0"),
    (dict(repetition_penalty=0), "repetition_penalty", "0"),
    (dict(temperature=float("nan")), "temperature", "nan"),
    (dict(top_k=2.5), "top_k", "2.5"),
    (dict(seed="x"), "seed", "'x'"),
    (dict(stop_token_ids=[-1]), "stop_token_ids", "-1"),
    (dict(stop_token_ids="ab"), "stop_token_ids", "'ab'"),
    (dict(stop_token_ids=list(range(33))), "stop_token_ids", "33 ids"),
    (dict(min_tokens=-1), "min_tokens", "-1"),
    (dict(ignore_eos="yes"), "ignore_eos", "'yes'"),
    (dict(skip_special_tokens=0), "skip_special_tokens", "0"),
    (dict(include_stop_str_in_output="no"), "include_stop_str_in_output", "'no'"),
    (dict(stop=[1]), "stop", r"\[1\]"),
    (dict(truncate_prompt_tokens=0), "truncate_prompt_tokens", "0"),
    (dict(allowed_token_ids=[]), "allowed_token_ids", r"\[\]"),
    (dict(allowed_token_ids=list(range(513))), "allowed_token_ids", "513 ids"),
    (dict(logprobs=21), "logprobs", "21"),
    (dict(bad_words=[""]), "bad_words", r"\[''\]"),
    (dict(bad_words=[3]), "bad_words", r"\[3\]"),
    (dict(bad_words_token_ids=[[]]), "bad_words_token_ids", r"\[\[\]\]"),
    (dict(bad_words_token_ids=[1, 2]), "bad_words_token_ids", r"\[1, 2\]"),
    (dict(bad_words_token_ids=[[-1]]), "bad_words_token_ids", r"\[\[-1\]\]"),
])
def test_bad_parameters_raise_bad_request(kwargs, name, value):
    """Each message names the value, and `param` the field (the server's error param)."""
    with pytest.raises(BadRequestError, match=f"{name}.*{value}") as e:
        SamplingParams(**kwargs)
    assert e.value.param == name


def test_ends_row_and_ban_ends():
    """A row ends on EOS (unless it ignores EOS) or on one of its stop ids, for one token
    per row or a [B, T] window (speculative rounds); short of min_tokens, both are banned."""
    eos_E = jnp.array([2, -1], jnp.int32)  # -1 pads, as the engine's EOS list does
    arrays = SamplingArrays.from_params([
        SamplingParams(), SamplingParams(stop_token_ids=[5, 6]),
        SamplingParams(ignore_eos=True, stop_token_ids=[6], min_tokens=3)])
    np.testing.assert_array_equal(
        ends_row(jnp.array([[2, 5, 6], [2, 5, 6], [2, 5, 6]]), eos_E, arrays),
        [[True, False, False], [True, True, True], [False, False, True]])
    np.testing.assert_array_equal(ends_row(jnp.array([1, 6, 2]), eos_E, arrays),
                                  [False, True, False])
    logits = jnp.zeros((3, 8))
    for step, banned_row2 in ((2, True), (3, False)):
        x = np.asarray(ban_ends(logits, eos_E, arrays, jnp.full((3,), step, jnp.int32)))
        assert np.isfinite(x[:2]).all()  # min_tokens 0
        assert (np.isneginf(x[2]) == (banned_row2 & np.isin(np.arange(8), [2, 6]))).all()
    assert SamplingParams(stop_token_ids=(7, 3, 7)).stop_token_ids == (3, 7)
    assert SamplingParams(ignore_eos=True).ends(2, {2}) is False
    assert SamplingParams(stop_token_ids=[4]).ends(4, {2})


def test_from_params_dtypes_and_empty_batch():
    arrays = SamplingArrays.from_params([SamplingParams(seed=(3 << 32) | 5), GREEDY])
    assert arrays.batch_size == 2
    assert arrays.temperature.dtype == jnp.float32 and arrays.top_k.dtype == jnp.int32
    assert arrays.key.dtype == jnp.uint32 and arrays.key.shape == (2, 2)
    np.testing.assert_array_equal(arrays.key[0], [3, 5])
    with pytest.raises(BadRequestError):
        SamplingArrays.from_params([])


def test_logit_bias_forces_bans_and_validates():
    """OpenAI's logit_bias: added to the logits before penalties and sampling; +100 forces
    a token, -100 bans one; JSON's string keys work; bad entries are BadRequestErrors."""
    logits = _logits(21, 2, 64)
    best = int(np.argmax(logits[0]))
    arrays = SamplingArrays.from_params([
        SamplingParams(temperature=0, logit_bias={"7": 100}),
        SamplingParams(temperature=0, logit_bias=[(int(np.argmax(logits[1])), -100)])])
    got = np.asarray(_sample(jnp.asarray(logits), arrays, jnp.zeros(2, jnp.int32)))
    assert got[0] == 7
    assert got[1] == int(np.argsort(-logits[1])[1])
    banned = _draws(logits[0], SamplingParams(logit_bias={best: -100}), 16, 8)
    assert best not in banned
    assert SamplingParams(logit_bias={"3": 1, 2: -1.5}).logit_bias == ((2, -1.5), (3, 1.0))
    for bad, match in [({"x": 1}, "keys"), ({1: 101}, r"\[-100, 100\]"), ({-1: 1}, "keys"),
                       ({i: 1 for i in range(301)}, "at most 300"), (5, "map token ids")]:
        with pytest.raises(BadRequestError, match=match):
            SamplingParams(logit_bias=bad)


def test_stop_strings_in_sampling_params():
    """vLLM's SamplingParams(stop=...): a string or a list, merged with a call's stop."""
    assert SamplingParams(stop="a").stop == ("a",)
    assert SamplingParams(stop=["a", "b"]).stops(["c", "a"]) == ("c", "a", "b")
    assert SamplingParams().stops("x") == ("x",)


def test_allowed_token_ids_restrict_sampling():
    """A row with allowed_token_ids samples only among them (greedy: their argmax); other
    rows in the batch are untouched."""
    logits = jax.random.normal(jax.random.key(0), (3, 64)) * 3
    allowed = [5, 9, 40]
    rows = [SamplingParams(temperature=0, allowed_token_ids=allowed), SamplingParams(
        temperature=0), SamplingParams(temperature=2.0, seed=1, allowed_token_ids=allowed)]
    arrays = SamplingArrays.from_params(rows)
    got = np.asarray(_sample(logits, arrays, jnp.zeros((3,), jnp.int32)))
    assert got[0] == allowed[int(np.argmax(np.asarray(logits)[0, allowed]))]
    assert got[1] == int(np.argmax(np.asarray(logits)[1]))
    draws = {int(np.asarray(_sample(logits, arrays, jnp.full((3,), i, jnp.int32)))[2])
             for i in range(40)}
    assert draws <= set(allowed) and len(draws) > 1
    with pytest.raises(BadRequestError, match="allowed_token_ids token id 64"):
        check_vocab([SamplingParams(allowed_token_ids=[64])], 64)


def _banned_reference(words, history):
    """HF's / vLLM's rule, in Python: a word's last token is banned when the tokens before
    it end the history (a one-token word always)."""
    out = set()
    for w in words:
        *prefix, last = w
        if not prefix or (len(prefix) <= len(history) and list(history[-len(prefix):])
                          == prefix):
            out.add(last)
    return out


def test_ban_words_matches_the_reference_rule():
    rng = np.random.default_rng(3)
    V, B = 12, 64  # a small vocabulary, so prefixes often match the history
    rows, histories = [], []
    for _ in range(B):
        words = {tuple(int(t) for t in rng.integers(0, V, rng.integers(1, 5)))
                 for _w in range(rng.integers(0, 6))}
        rows.append(SamplingParams(bad_words_token_ids=sorted(words)))
        histories.append([int(t) for t in rng.integers(0, V, rng.integers(0, 12))])
    recent = np.stack([np.concatenate([np.full(RECENT, NO_ID), h])[-RECENT:]
                       for h in histories]).astype(np.int32)
    x = np.asarray(jax.jit(ban_words)(jnp.zeros((B, V)), SamplingArrays.from_params(rows),
                                      jnp.asarray(recent)))
    for b in range(B):
        want = _banned_reference(rows[b].bad_words_token_ids, histories[b])
        assert set(np.nonzero(np.isneginf(x[b]))[0].tolist()) == want, b
    assert any(len(_banned_reference(r.bad_words_token_ids, h)) > 1
               for r, h in zip(rows, histories, strict=True))


def test_bad_words_limits_and_resolution():
    class Chars:  # id = character code, so encodings are easy to read
        def encode(self, text, add_bos=None):
            return [ord(c) for c in text]

    sp = SamplingParams(bad_words=["ab", " c"], bad_words_token_ids=[[1, 2]])
    assert sp.resolve_bad_words(Chars()).bad_words_token_ids == (
        (1, 2), (97, 98), (32, 97, 98), (99,), (32, 99))
    with pytest.raises(BadRequestError, match="resolve_bad_words"):
        SamplingArrays.from_params([sp])
    with pytest.raises(BadRequestError, match=f"at most {MAX_BAD_WORD_TOKENS}"):
        SamplingParams(bad_words_token_ids=[list(range(MAX_BAD_WORD_TOKENS + 1))])
    with pytest.raises(BadRequestError, match=f"at most {MAX_BAD_WORDS}") as e:
        SamplingParams(bad_words_token_ids=[[i] for i in range(MAX_BAD_WORDS + 1)])
    assert e.value.param == "bad_words"
    with pytest.raises(BadRequestError, match="bad_words_token_ids token id 64"):
        check_vocab([SamplingParams(bad_words_token_ids=[[1, 64]])], 64)


def test_recent_tails_on_device_equal_recent_tokens_on_host():
    from jaxinfer.sampling import recent_tails, recent_tokens

    rng = np.random.default_rng(5)
    lens = [0, 1, RECENT - 1, RECENT, RECENT + 5, 20]
    seq = rng.integers(0, 50, (len(lens), 24)).astype(np.int32)
    got = np.asarray(recent_tails(jnp.asarray(seq), jnp.asarray(lens, jnp.int32)))
    want = np.stack([recent_tokens(seq[b, :n]) for b, n in enumerate(lens)])
    np.testing.assert_array_equal(got, want)
