"""Speculative decoding: exact greedy output on the real model; the target's distribution
under sampling (chi-square against exact probabilities on a tiny model)."""

import dataclasses
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxinfer import generate as gen
from jaxinfer import model, speculative
from jaxinfer.config import ModelConfig
from jaxinfer.errors import BadRequestError
from jaxinfer.kv_cache import init_cache
from jaxinfer.llm import LLM
from jaxinfer.prune import prune_weights
from jaxinfer.sampling import GREEDY, SamplingArrays, SamplingParams
from jaxinfer.weights import init_weights, weight_specs

from .engine_helpers import CharTokenizer
from .helpers import TINY, tiny_weights

ROOT = Path(__file__).resolve().parents[1]


def test_ngram_proposal_continues_latest_match():
    seq = jnp.array([[5, 6, 7, 1, 5, 6, 8, 2, 5, 6, 0, 0],
                     [9, 9, 9, 9, 4, 0, 0, 0, 0, 0, 0, 0]], jnp.int32)
    lens = jnp.array([10, 5], jnp.int32)
    got = np.asarray(speculative.ngram_propose(seq, lens, 3, 3))
    # Row 0 ends "5 6": the latest earlier "5 6" is at 4..5, followed by 8 2 5.
    assert got[0].tolist() == [8, 2, 5]
    # Row 1 ends "4": no earlier occurrence of any suffix -> repeats the last token.
    assert got[1].tolist() == [4, 4, 4]


@pytest.mark.slow
def test_greedy_equals_target_tiny():
    cfg = TINY
    w = tiny_weights(cfg, 0)
    cfg1 = cfg.replace(num_layers=1)
    prompts, max_new, eos = [[5, 6, 7, 8, 5, 6, 7], [9, 10, 11], [12]], [20, 13, 7], [3]
    prompt_BT, lens_B, cache, M = gen.prepare(prompts, max_new, cfg, jnp.float32)
    st = gen.start(w, prompt_BT, lens_B, cache, SamplingArrays.from_params([GREEDY] * 3),
                   np.array(max_new, np.int32), np.array(eos, np.int32), cfg=cfg, max_out=M)
    st = gen.run_loop(w, st, cfg=cfg)
    want = [np.asarray(st.output_BM[b, : st.num_generated_B[b]]).tolist() for b in range(3)]
    for name, dw, dcfg in [("self", w, cfg), ("small", tiny_weights(cfg1, 1), cfg1),
                           ("ngram", None, None)]:
        r = speculative.generate_ids(w, dw, cfg, dcfg, prompts, [GREEDY] * 3, max_new,
                                     np.array(eos, np.int32), k=3)
        assert r.tokens == want, name
        if name == "self":  # a draft equal to the target is always right
            assert all(r.acceptance_rate(b) == 1.0 for b in range(3))


# ---- the real model: exact greedy equality ------------------------------------------------
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ",
           "Here is a list of colors: red, green, blue, red, green,",
           "Once upon a time, in a small village by the sea,"]


@pytest.fixture(scope="module")
def smollm2(smollm2_checkpoint):
    return LLM.load(smollm2_checkpoint)


@pytest.mark.slow
def test_greedy_equals_target_smollm2(smollm2):
    cfg8, w8 = prune_weights(smollm2.params, smollm2.cfg, range(8))  # first 8 of 30 layers
    draft = LLM(cfg8, w8, smollm2.tokenizer)
    want = [c.token_ids for c in smollm2.generate(PROMPTS, GREEDY, 32)]
    for d in (draft, "ngram"):
        got = smollm2.generate(PROMPTS, GREEDY, 32, draft=d, num_speculative_tokens=4)
        assert [c.token_ids for c in got] == want, d
        assert all(0 <= c.acceptance_rate <= 1 and c.verify_passes <= 32 for c in got)
    assert max(c.acceptance_rate for c in got) > 0  # the repeated list is easy to look up


@pytest.mark.slow
def test_generate_script_reports_acceptance(smollm2_checkpoint):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "generate.py"), "--prompt",
                        PROMPTS[2], "--temperature", "0", "--max_new_tokens", "12",
                        "--ngram_draft", "--output_format", "json"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(out["token_ids"]) == 12 and 0 < out["acceptance_rate"] <= 1
    assert out["decode_tokens_per_s"] > 0 and out["num_speculative_tokens"] == 4
    # Text mode streams with a draft too, the same text, acceptance on stderr.
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "generate.py"), "--prompt",
                        PROMPTS[2], "--temperature", "0", "--max_new_tokens", "12",
                        "--ngram_draft"], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == out["text"].strip() and "acceptance=" in r.stderr


@pytest.mark.slow
def test_stream_with_a_draft_equals_generate():
    """LLM.stream(draft=) yields, round by round, the text LLM.generate(draft=) returns,
    greedy and seeded, under a stop string and under a constraint."""
    from jaxinfer.structured import Constraint

    cfg1 = TINY.replace(num_layers=1)
    llm = LLM(TINY, tiny_weights(TINY, 0), CharTokenizer())
    draft = LLM(cfg1, tiny_weights(cfg1, 1), CharTokenizer())
    prompt, kw = [5, 6, 7, 8, 5, 6, 7], dict(max_new_tokens=20, num_speculative_tokens=3)
    full = llm.generate(prompt, GREEDY, draft=draft, **kw)
    cases = [dict(sampling=GREEDY), dict(sampling=SamplingParams(temperature=1.0, seed=4)),
             dict(sampling=GREEDY, stop=[full.text[4:6]]),
             dict(sampling=GREEDY, constraint=Constraint(regex=r"[a-c]{3}-[0-9]{2}"))]
    for case in cases:
        want = llm.generate(prompt, draft=draft, **kw, **case)
        res: list = []
        deltas = list(llm.stream(prompt, draft=draft, result=res, **kw, **case))
        got = res[0]
        assert "".join(deltas) == got.text == want.text and len(deltas) > 1, case
        assert (got.token_ids, got.finish_reason) == (want.token_ids, want.finish_reason)
        if "stop" not in case:  # a stream stops at the stop string, generate decodes on
            assert got.verify_passes == want.verify_passes
            assert got.acceptance_rate == want.acceptance_rate
    assert want.finish_reason == "stop" and len(want.text) == 6  # the regex is complete


@pytest.mark.slow
def test_greedy_with_penalties_bias_and_stop_conditions_equals_target():
    """Penalties (over the prompt and every earlier token, drafted ones included),
    logit_bias, allowed_token_ids, bad words, min_tokens and stop ids shape the target's
    distribution at each verified position exactly as the plain sampler's: greedy output
    is the target's, token for token, with a model draft (which sees bias, allowed ids and
    min_tokens but not penalties or bad words) and with prompt lookup."""
    cfg = TINY
    w = tiny_weights(cfg, 0)
    cfg1 = cfg.replace(num_layers=1)
    prompts = [[5, 6, 7, 8, 5, 6, 7], [9, 10, 11, 9, 10, 11], [12, 13], [5, 6, 5, 6],
               [20, 21, 22]]
    max_new, eos = [20, 16, 12, 14, 10], np.array([3], np.int32)
    plain = [SamplingParams(temperature=0, repetition_penalty=1.5),
             SamplingParams(temperature=0, presence_penalty=0.8, frequency_penalty=0.6),
             SamplingParams(temperature=0, logit_bias={3: 8.0}, min_tokens=6),
             SamplingParams(temperature=0, logit_bias={7: -100, 8: 3.0}, stop_token_ids=[8]),
             SamplingParams(temperature=0, allowed_token_ids=[30, 31, 32, 33])]
    llm = LLM(cfg, w, CharTokenizer())
    # bad words: a pair from the free output (the ban bites after its first token)
    prompts.append([40, 41, 42])
    max_new.append(12)
    alone = llm.generate(prompts[-1], GREEDY, 12).token_ids
    plain.append(SamplingParams(temperature=0, bad_words_token_ids=[alone[1:3], alone[5:6]]))
    want = [c.token_ids for c in llm.generate(prompts, plain, max_new)]
    free = [c.token_ids for c in llm.generate(prompts, GREEDY, max_new)]
    assert all(a != b for a, b in zip(want, free, strict=True))  # every setting bites
    assert want[2][:6].count(3) == 0 and want[2][6] == 3  # EOS, favoured, waits 6 tokens
    assert want[3][-1] == 8 and len(want[3]) < max_new[3]  # a stop id ends the row
    assert set(want[4]) <= {30, 31, 32, 33}  # allowed_token_ids
    for name, dw, dcfg in [("small", tiny_weights(cfg1, 1), cfg1), ("ngram", None, None)]:
        r = speculative.generate_ids(w, dw, cfg, dcfg, prompts, plain, max_new, eos, k=3)
        assert r.tokens == want, name
    # Logprobs (raw, the target's) with a draft equal those without one.
    lp = [dataclasses.replace(p, logprobs=2) for p in plain]
    ref = llm.generate(prompts, lp, max_new)
    for d in (LLM(cfg1, tiny_weights(cfg1, 1), CharTokenizer()), "ngram"):
        got = llm.generate(prompts, lp, max_new, draft=d, num_speculative_tokens=3)
        for g, r in zip(got, ref, strict=True):
            assert g.token_ids == r.token_ids and len(g.logprobs) == len(r.token_ids)
            np.testing.assert_allclose([e.logprob for e in g.logprobs],
                                       [e.logprob for e in r.logprobs], atol=1e-4)
            assert [e.top for e in g.logprobs][0][0][0] == r.logprobs[0].top[0][0]


def test_bad_requests():
    w = tiny_weights()
    with pytest.raises(BadRequestError, match="num_speculative_tokens"):
        speculative.generate_ids(w, None, TINY, None, [[1, 2]], [GREEDY], [4],
                                 np.array([3], np.int32), k=0)
    with pytest.raises(BadRequestError, match="vocab_size"):
        speculative.check_settings(2, 3, TINY, TINY.replace(vocab_size=50))


# ---- sampling: the target's distribution, exactly -------------------------------------------
V = 16
SMALL = ModelConfig(vocab_size=V, d_model=32, mlp_dim=64, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=8, max_seq_len=16, name="small")
PROMPT = [3, 7, 3, 7, 3]  # repeats, so the n-gram draft proposes real continuations
N = 8000  # samples (one batch row each, each with its own seed)
P_MIN = 1e-3  # chi-square p-value below which we call the distributions different


def _exact(w, cfg, temperature, top_k, penalties=(1.0, 0.0, 0.0)):
    """Exact target probabilities of tokens 1..4 after PROMPT, from model.forward on every
    continuation (numpy penalties, temperature and top-k: independent of the code under
    test). `penalties`: (repetition, presence, frequency), HF's and OpenAI's rules."""
    cont = np.array(list(itertools.product(range(V), repeat=3)), np.int32)  # [V^3, 3]
    toks = np.concatenate([np.tile(PROMPT, (len(cont), 1)), cont], 1)
    cache = init_cache(cfg, len(toks), toks.shape[1])
    logits, _ = model.forward(w, jnp.asarray(toks), cache, cfg)
    x = np.asarray(logits[:, len(PROMPT) - 1:], np.float64)  # [V^3, 4, V]
    rep, presence, frequency = penalties
    onehot = np.eye(V)[cont]  # [V^3, 3, V]
    counts = np.concatenate([np.zeros_like(onehot[:, :1]), np.cumsum(onehot, 1)], 1)
    seen = (counts > 0) | np.isin(np.arange(V), PROMPT)
    x = np.where(seen, np.where(x > 0, x / rep, x * rep), x)
    x = (x - frequency * counts - presence * (counts > 0)) / temperature
    if top_k:
        kth = np.sort(x, -1)[..., -top_k][..., None]
        x = np.where(x >= kth, x, -np.inf)
    p = np.exp(x - x.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    p = p.reshape(V, V, V, 4, V)
    joint = (p[0, 0, 0, 0][:, None, None, None] * p[:, 0, 0, 1][:, :, None, None]
             * p[:, :, 0, 2][:, :, :, None] * p[:, :, :, 3])  # [t1, t2, t3, t4]
    return {"t2": joint.sum((0, 2, 3)), "t3": joint.sum((0, 1, 3)), "t4": joint.sum((0, 1, 2)),
            "t2t3": joint.sum((0, 3)).ravel()}


def _chi2_p(counts, probs):
    """Chi-square goodness-of-fit p-value; bins expected < 5 are pooled. A count in a bin
    of probability 0 is impossible under the reference: p-value 0."""
    counts, exp = np.asarray(counts, float), np.asarray(probs, float) * counts.sum()
    if counts[exp == 0].sum() > 0:
        return 0.0
    small = exp < 5
    c = np.append(counts[~small], counts[small].sum())
    e = np.append(exp[~small], exp[small].sum())
    c, e = c[e > 0], e[e > 0]
    return stats.chisquare(c, e * c.sum() / e.sum()).pvalue


PENALIZED = (1.4, 0.5, 0.4)


@pytest.mark.parametrize("draft,temperature,top_k,penalties", [
    ("model", 1.0, 0, (1.0, 0.0, 0.0)),
    ("model", 1.0, 0, PENALIZED),
    pytest.param("ngram", 1.0, 0, (1.0, 0.0, 0.0), marks=pytest.mark.slow),
    pytest.param("ngram", 1.0, 0, PENALIZED, marks=pytest.mark.slow),
    pytest.param("model", 0.7, 6, (1.0, 0.0, 0.0), marks=pytest.mark.slow)])
@pytest.mark.slow
def test_sampling_matches_target_distribution(draft, temperature, top_k, penalties):
    """Tokens 2-4 (and 2-3 jointly) of 8000 seeded rows against the exact distribution;
    with penalties, each verified position is penalized by the tokens before it, drafted
    ones included (the draft itself proposes unpenalized)."""
    w = init_weights(weight_specs(SMALL), jax_key(0))
    dw = init_weights(weight_specs(SMALL), jax_key(1)) if draft == "model" else None
    exact = _exact(w, SMALL, temperature, top_k, penalties)
    rep, presence, frequency = penalties
    sp = [SamplingParams(temperature=temperature, top_k=top_k, seed=s, repetition_penalty=rep,
                         presence_penalty=presence, frequency_penalty=frequency)
          for s in range(N)]
    r = speculative.generate_ids(w, dw, SMALL, SMALL if dw is not None else None,
                                 [PROMPT] * N, sp, [4] * N, np.array([-1], np.int32), k=2)
    toks = np.array(r.tokens)  # [N, 4]
    accepted, proposed = sum(r.accepted), 2 * sum(r.rounds)
    assert accepted > 100 and proposed - accepted > 100  # both paths are exercised
    observed = {"t2": np.bincount(toks[:, 1], minlength=V),
                "t3": np.bincount(toks[:, 2], minlength=V),
                "t4": np.bincount(toks[:, 3], minlength=V),
                "t2t3": np.bincount(toks[:, 1] * V + toks[:, 2], minlength=V * V)}
    for name, counts in observed.items():
        assert _chi2_p(counts, exact[name]) > P_MIN, name
    if draft == "model":
        # Power check: the same test tells the draft's own distribution from the target's,
        # and penalized from unpenalized.
        wrong = _exact(dw, SMALL, temperature, top_k, penalties)
        assert _chi2_p(observed["t2"], wrong["t2"]) < 1e-6
        other = _exact(w, SMALL, temperature, top_k, PENALIZED if penalties != PENALIZED
                       else (1.0, 0.0, 0.0))
        assert _chi2_p(observed["t3"], other["t3"]) < 1e-6


def jax_key(seed):
    import jax

    return jax.random.key(seed)
