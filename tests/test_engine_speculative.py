"""Speculative decoding inside the serving engine: continuous batching with a draft (a
smaller model or prompt lookup) gives the target's greedy tokens exactly, the same seeded
samples as LLM.generate(draft=...), and reports its acceptance rate."""

import collections
import dataclasses
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.engine import ContextLengthError, Engine, EngineConfig
from jaxinfer.errors import CheckpointError, ConfigError
from jaxinfer.llm import LLM
from jaxinfer.prune import prune_weights
from jaxinfer.sampling import GREEDY, SamplingParams
from jaxinfer.structured import Constraint

from .engine_helpers import CharTokenizer, W
from .helpers import TINY, tiny_weights

RNG = np.random.default_rng(1)
# Repetitive prompts give the n-gram draft something to find; random ones test rejection.
PROMPTS = ([[5, 6, 7, 8] * 6, [9, 10, 11, 12, 13] * 3 + [9, 10]]
           + [RNG.integers(4, TINY.vocab_size, n).tolist() for n in (3, 17, 40, 9, 25)])
MAX_NEW = [20, 13, 7, 16, 9, 12, 5]
DRAFT_CFG = TINY.replace(num_layers=1)


def _target() -> LLM:
    return LLM(TINY, W, CharTokenizer())


def _drafts():
    small = LLM(DRAFT_CFG, jax.device_put(tiny_weights(DRAFT_CFG, 1), jax.devices()[0]),
                CharTokenizer())
    return {"ngram": "ngram", "model": small, "self": _target()}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ngram", "model", "self"])
def test_greedy_equals_target_alone(name):
    target, draft = _target(), _drafts()[name]
    want = [c.token_ids for c in target.generate(PROMPTS, sampling=GREEDY,
                                                   max_new_tokens=MAX_NEW)]
    cfg = EngineConfig(num_slots=3, max_len=128, prefix_block=16)
    with Engine.from_llm(target, cfg, draft=draft, num_speculative_tokens=3) as eng:
        eng.warmup()
        compiles = eng.compile_count
        reqs = [eng.submit(p, sampling=GREEDY, max_tokens=m)
                for p, m in zip(PROMPTS, MAX_NEW, strict=True)]  # 7 requests, 3 slots
        got = [r.result(timeout=120) for r in reqs]
        assert eng.compile_count == compiles  # traffic after warm-up never recompiles
        rate = eng.gauges()["speculative_acceptance_rate"][0]
        assert "jaxinfer_speculative_acceptance_rate" in eng.prometheus()
    for g, w in zip(got, want, strict=True):
        assert g.token_ids == w
    if name == "self":  # a draft equal to the target is always right
        assert rate == 1.0
    elif name == "ngram":  # the repetitive prompts let lookup guess some tokens, not all
        assert 0.0 < rate < 1.0, rate
    else:  # an unrelated random 1-layer model rarely agrees with the target
        assert 0.0 <= rate < 1.0, rate


@pytest.mark.slow
def test_seeded_sampling_matches_llm_generate_with_the_draft():
    """Keys fold each slot's seed with its own token count, so a seeded request samples
    the same tokens in the engine (any slot, any neighbours) as in LLM.generate(draft=)."""
    target, draft = _target(), _drafts()["model"]
    sps = [SamplingParams(temperature=1.0, seed=s, top_k=20 if s % 2 else 0) for s in range(5)]
    prompts, max_new = PROMPTS[:5], MAX_NEW[:5]
    want = [target.generate(p, sampling=sp, max_new_tokens=m, draft=draft,
                            num_speculative_tokens=3).token_ids
            for p, sp, m in zip(prompts, sps, max_new, strict=True)]
    with Engine.from_llm(target, EngineConfig(num_slots=2, max_len=128), draft=draft,
                         num_speculative_tokens=3) as eng:
        got = [r.result(timeout=120).token_ids for r in
               [eng.submit(p, sampling=sp, max_tokens=m)
                for p, sp, m in zip(prompts, sps, max_new, strict=True)]]
    assert got == want


@pytest.mark.slow
def test_penalties_bias_and_stop_conditions_with_drafts():
    """Penalties, logit_bias, bad words, min_tokens and stop ids in the engine's speculative
    rounds:
    greedy rows give the plain target's tokens, seeded sampled rows LLM.generate(draft=)'s
    tokens, in any slot beside any neighbours."""
    target, draft = _target(), _drafts()["model"]
    sps = [SamplingParams(temperature=0, repetition_penalty=1.5, logprobs=3),
           SamplingParams(temperature=0, presence_penalty=0.8, frequency_penalty=0.6,
                          logit_bias={3: 6.0}, min_tokens=5),
           SamplingParams(temperature=1.0, seed=4, repetition_penalty=1.3, top_k=30),
           SamplingParams(temperature=0.8, seed=9, frequency_penalty=0.5, stop_token_ids=[7])]
    prompts, max_new = PROMPTS[:4], [20, 13, 12, 16]
    # bad words: a pair of row 1's output, banned after its first token
    free = target.generate(prompts[1], sampling=sps[1], max_new_tokens=13).token_ids
    sps[1] = dataclasses.replace(sps[1], bad_words_token_ids=[free[2:4]])
    plain = target.generate(prompts[:2], sampling=sps[:2], max_new_tokens=max_new[:2])
    j = next(i for i in range(1, len(free)) if (free[i - 1], free[i]) == tuple(free[2:4]))
    assert plain[1].token_ids[:j] == free[:j] and plain[1].token_ids[j] != free[j]
    want = [c.token_ids for c in plain]
    want += [target.generate(p, sampling=sp, max_new_tokens=m, draft=draft,
                             num_speculative_tokens=3).token_ids
             for p, sp, m in zip(prompts[2:], sps[2:], max_new[2:], strict=True)]
    with Engine.from_llm(target, EngineConfig(num_slots=2, max_len=128), draft=draft,
                         num_speculative_tokens=3) as eng:
        res = [r.result(timeout=120) for r in
               [eng.submit(p, sampling=sp, max_tokens=m)
                for p, sp, m in zip(prompts, sps, max_new, strict=True)]]
    assert [r.token_ids for r in res] == want
    # Logprobs of accepted draft tokens, corrections and bonus tokens alike: the target's.
    for g, w in zip(res[0].logprobs, plain[0].logprobs, strict=True):
        assert g.token_id == w.token_id and [t for t, _ in g.top] == [t for t, _ in w.top]
        np.testing.assert_allclose([g.logprob, *(x for _, x in g.top)],
                                   [w.logprob, *(x for _, x in w.top)], atol=1e-4)


@pytest.mark.slow  # (~40 s per draft on 2 cores; test_engine's preemption tests stay fast)
@pytest.mark.parametrize("name", ["ngram", "model"])
def test_priority_preempts_speculative_rows_exactly(name):
    """Under the priority policy a speculative row is preempted like any other: it resumes
    with its output as n-gram haystack, the draft's row prefilled again and its token count
    restored, so a seeded request with penalties ends with the tokens it gives unpreempted,
    and the preemption compiles nothing."""
    target, draft = _target(), _drafts()[name]
    sp = SamplingParams(temperature=1.0, seed=3, repetition_penalty=1.2,
                        frequency_penalty=0.4, ignore_eos=True)
    cfg = EngineConfig(num_slots=2, max_len=256, scheduling_policy="priority")
    with Engine.from_llm(target, cfg, draft=draft, num_speculative_tokens=3) as eng:
        eng.warmup()
        compiled = eng.compile_count
        low = [eng.submit(PROMPTS[i], sampling=sp, max_tokens=120, priority=5)
               for i in (0, 3)]
        deadline = time.monotonic() + 60
        while min(len(r.token_ids) for r in low) < 5 and time.monotonic() < deadline:
            time.sleep(0.001)
        high = eng.submit(PROMPTS[1], sampling=GREEDY, max_tokens=6, priority=0)
        res = [r.result(timeout=120) for r in (*low, high)]
        assert eng.preemptions == 1 and res[1].metrics.preemptions == 1
        assert eng.compile_count == compiled
        alone = [eng.submit(PROMPTS[i], sampling=sp, max_tokens=120).result(timeout=120)
                 for i in (0, 3)]
    assert [r.token_ids for r in res[:2]] == [a.token_ids for a in alone]
    assert res[2].token_ids == target.generate(PROMPTS[1], sampling=GREEDY,
                                               max_new_tokens=6).token_ids


SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}},
          "required": ["ok"], "additionalProperties": False}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ngram", "model"])
def test_structured_output_with_drafts(name):
    """Constrained slots run each round in two halves (the host masks every drafted
    position by walking the grammar along the drafted tokens): greedy constrained requests
    give exactly what the engine without a draft gives, in the engine and in
    LLM.generate(draft=), beside a free request that is unaffected; seeded ones sample the
    same in both, with the masked target's distribution (chi-square); warm-up leaves
    nothing to compile."""
    target, draft = _target(), _drafts()[name]
    work = [("id:", Constraint(regex=r"[a-c]{3}-[0-9]{2}"), 40),
            ("pick", Constraint(choice=("red", "green", "blue sky")), 40),
            ("json", Constraint(json_schema=SCHEMA), 60), (PROMPTS[0], None, 20)]
    cfg = EngineConfig(num_slots=3, max_len=128)

    def run(eng):
        reqs = [eng.submit(p, sampling=GREEDY, max_tokens=m, constraint=c)
                for p, c, m in work]
        return [(r.token_ids, r.text, r.finish_reason)
                for r in (q.result(timeout=120) for q in reqs)]

    with Engine.from_llm(target, cfg) as eng:
        want = run(eng)
    if name == "ngram":  # the engine's split round with prompt lookup (one-hot q)
        with Engine.from_llm(target, cfg, draft=draft, num_speculative_tokens=3) as eng:
            assert run(eng) == want
        return
    # LLM.generate with the draft: a batch of the same rows, split rounds on the host too.
    lib = target.generate([p for p, _, _ in work], sampling=GREEDY, draft=draft,
                          max_new_tokens=[m for *_, m in work], num_speculative_tokens=3,
                          constraint=[c for _, c, _ in work])
    assert [(c.token_ids, c.text, c.finish_reason) for c in lib] == want
    seeded = SamplingParams(temperature=1.0, seed=7)
    lib_sampled = target.generate("id:", sampling=seeded, max_new_tokens=40, draft=draft,
                                  num_speculative_tokens=3, constraint=work[0][1])
    with Engine.from_llm(target, cfg, draft=draft, num_speculative_tokens=3) as eng:
        eng.warmup()
        compiles = eng.compile_count
        got = run(eng)
        assert eng.compile_count == compiles
        # Seeded: the engine samples what LLM.generate(draft=) samples (same keys, masks).
        r = eng.submit("id:", sampling=seeded, max_tokens=40, constraint=work[0][1]).result()
        assert r.token_ids == lib_sampled.token_ids and r.text == lib_sampled.text
        # Sampled: the kept distribution is the masked target's. After the forced 'x' the
        # choice is drafted and verified in a split round.
        n, choice = 300, Constraint(choice=("xa", "xb", "xc"))
        reqs = [eng.submit("pick", sampling=SamplingParams(temperature=1.0, seed=s),
                           max_tokens=5, constraint=choice, block=True) for s in range(n)]
        seen = collections.Counter(r.result(timeout=120).text for r in reqs)
    assert got == want
    assert re.fullmatch(r"[a-c]{3}-[0-9]{2}", got[0][1]) and got[0][2] == "stop"
    assert got[1][1] in ("red", "green", "blue sky")
    tok = target.tokenizer
    ids = tok.encode("pick") + tok.encode("x")
    logits, _ = target.forward(target.params, jnp.asarray([ids]), target.init_cache(1, 16))
    z = np.asarray(logits[0, -1], np.float64)[tok.encode("abc")]
    p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    obs = np.array([seen["xa"], seen["xb"], seen["xc"]])
    assert obs.sum() == n
    chi2 = float(((obs - n * p) ** 2 / (n * p)).sum())
    assert chi2 < 13.8, (obs, n * p)  # 2 degrees of freedom, p = 0.001


def test_stop_strings_limits_and_errors():
    target = _target()
    with Engine.from_llm(target, EngineConfig(num_slots=2, max_len=64), draft="ngram",
                         num_speculative_tokens=4) as eng:
        full = eng.submit(PROMPTS[0], sampling=GREEDY, max_tokens=20).result(timeout=60)
        stop = full.text[5:7]
        cut = eng.submit(PROMPTS[0], sampling=GREEDY, max_tokens=20,
                         stop=stop).result(timeout=60)
        assert cut.finish_reason == "stop" and cut.text == full.text[:full.text.index(stop)]
        # k + 1 = 5 positions per slot are reserved for the look-ahead.
        with pytest.raises(ContextLengthError, match="59"):
            eng.submit([5] * 40, max_tokens=20)
        assert eng.submit([5] * 40, sampling=GREEDY, max_tokens=19).result(timeout=60)
        # A finished slot is reused at once and the engine keeps serving.
        again = eng.submit(PROMPTS[0], sampling=GREEDY, max_tokens=20).result(timeout=60)
        assert again.token_ids == full.token_ids
    with pytest.raises(CheckpointError, match="medusa"):  # a string names a checkpoint
        Engine.from_llm(target, EngineConfig(max_len=64), draft="medusa")
    with pytest.raises(ConfigError, match="draft"):
        Engine(target.params, target.cfg, target.tokenizer, EngineConfig(max_len=64),
               draft="medusa")
    with pytest.raises(ConfigError, match="num_speculative_tokens"):
        Engine.from_llm(target, EngineConfig(max_len=64), draft="ngram",
                        num_speculative_tokens=0)


@pytest.mark.slow
def test_smollm2_engine_with_drafts_equals_target(smollm2_checkpoint):
    llm = LLM.load(smollm2_checkpoint, dtype=jnp.float32)
    cfg8, w8 = prune_weights(llm.params, llm.cfg, range(8))  # first 8 of 30 layers
    small = LLM(cfg8, w8, llm.tokenizer)
    prompts = [llm.encode(p, chat=True) for p in (
        "Repeat exactly: the quick brown fox jumps over the lazy dog.",
        "What is the capital of France?", "List three colours.")]
    want = [c.token_ids for c in llm.generate(prompts, sampling=GREEDY, max_new_tokens=24)]
    for draft in ("ngram", small):
        with Engine.from_llm(llm, EngineConfig(num_slots=2, max_len=256), draft=draft,
                             num_speculative_tokens=4) as eng:
            got = [r.result(timeout=300).token_ids for r in
                   [eng.submit(p, sampling=GREEDY, max_tokens=24) for p in prompts]]
            rate = eng.gauges()["speculative_acceptance_rate"][0]
        assert got == want, draft
        print(f"engine, draft {getattr(draft, 'cfg', draft)!s:.40}: acceptance {rate:.2f}")


@pytest.mark.slow
def test_int8_kv_cache_with_drafts():
    """The int8 KV cache (and its scales) survive speculative rounds: greedy output with a
    draft equals the same int8-cache model without one, in LLM.generate and the engine."""
    target = LLM(TINY, W, CharTokenizer(), kv_dtype="int8")
    small = LLM(DRAFT_CFG, jax.device_put(tiny_weights(DRAFT_CFG, 1), jax.devices()[0]),
                CharTokenizer(), kv_dtype="int8")
    want = [c.token_ids for c in target.generate(PROMPTS, sampling=GREEDY,
                                                   max_new_tokens=MAX_NEW)]
    for draft in ("ngram", small):
        got = target.generate(PROMPTS, sampling=GREEDY, max_new_tokens=MAX_NEW, draft=draft,
                              num_speculative_tokens=3)
        assert [c.token_ids for c in got] == want
        with Engine.from_llm(target, EngineConfig(num_slots=3, max_len=128), draft=draft,
                             num_speculative_tokens=3) as eng:
            assert eng._state.target_cache.k_scale is not None
            res = [r.result(timeout=120).token_ids for r in
                   [eng.submit(p, sampling=GREEDY, max_tokens=m)
                    for p, m in zip(PROMPTS, MAX_NEW, strict=True)]]
        assert res == want


@pytest.mark.slow
def test_draft_model_under_a_mesh():
    """Target and draft sharded over data:2,model:2: the same greedy tokens."""
    from jaxinfer.sharding import make_mesh
    from jaxinfer.weights import weight_shardings, weight_specs

    mesh = make_mesh("data:2,model:2")
    shard = lambda cfg, w: jax.device_put(w, weight_shardings(weight_specs(cfg), mesh))
    target = LLM(TINY, shard(TINY, tiny_weights()), CharTokenizer(), mesh=mesh)
    draft = LLM(DRAFT_CFG, shard(DRAFT_CFG, tiny_weights(DRAFT_CFG, 1)), CharTokenizer(),
                mesh=mesh)
    want = [c.token_ids for c in _target().generate(PROMPTS[:4], sampling=GREEDY,
                                                      max_new_tokens=MAX_NEW[:4])]
    with Engine.from_llm(target, EngineConfig(num_slots=2, max_len=128), draft=draft,
                         num_speculative_tokens=3) as eng:
        assert eng._state.draft_cache.k.sharding.spec[1] == "data"
        got = [r.result(timeout=120).token_ids for r in
               [eng.submit(p, sampling=GREEDY, max_tokens=m)
                for p, m in zip(PROMPTS[:4], MAX_NEW[:4], strict=True)]]
    assert got == want
