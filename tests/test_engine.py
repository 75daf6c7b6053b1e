"""The serving engine: continuous batching, slot reuse, per-row determinism, stop strings,
prefix caching, compile counts (tiny random model), and batch invariance on SmolLM2."""

import asyncio
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.engine import (
    ContextLengthError,
    Engine,
    EngineClosedError,
    EngineConfig,
    EngineOverloadedError,
)
from jaxinfer.errors import BadRequestError, ConfigError
from jaxinfer.llm import LLM
from jaxinfer.quant import QuantConfig
from jaxinfer.sampling import GREEDY, SamplingParams
from jaxinfer.weights import quantize_weights

from .engine_helpers import CharTokenizer, W, tiny_engine
from .helpers import TINY, tiny_weights

RNG = np.random.default_rng(0)
PROMPTS = [RNG.integers(4, TINY.vocab_size, n).tolist() for n in (3, 17, 40, 9, 70, 1, 25, 33)]
MAX_NEW = [6, 12, 9, 14, 5, 11, 8, 10]


def _llm() -> LLM:
    return LLM(TINY, W, CharTokenizer())


@pytest.mark.slow
def test_slot_reuse_matches_alone_and_llm_generate():
    with tiny_engine(num_slots=2, prefix_cache_mb=0) as eng:
        reqs = [eng.submit(p, sampling=GREEDY, max_tokens=m)
                for p, m in zip(PROMPTS, MAX_NEW, strict=True)]
        busy = [r.result(timeout=120) for r in reqs]
        alone = [eng.submit(p, sampling=GREEDY, max_tokens=m).result(timeout=60)
                 for p, m in zip(PROMPTS, MAX_NEW, strict=True)]
        assert sum(eng.metrics.requests.values()) == 2 * len(PROMPTS)  # 16 through 2 slots
        assert eng.slots_in_use == 0 and eng.queue_length == 0
    ref = _llm().generate(PROMPTS, sampling=GREEDY, max_new_tokens=MAX_NEW)
    for b, a, r in zip(busy, alone, ref, strict=True):
        assert b.token_ids == a.token_ids == r.token_ids
        assert b.text == r.text and b.finish_reason == r.finish_reason
        assert b.prompt_tokens == r.prompt_tokens


SEEDED = [SamplingParams(temperature=0.9, top_p=0.9, seed=7),
          SamplingParams(temperature=1.2, top_k=20, seed=3),
          SamplingParams(temperature=1.0, min_p=0.05, seed=11, repetition_penalty=1.3,
                         presence_penalty=0.5, frequency_penalty=0.3)]


def test_seeded_tokens_do_not_depend_on_slot_or_neighbours():
    target = PROMPTS[2]
    with tiny_engine(num_slots=4, prefix_cache_mb=0) as eng:
        for sp in SEEDED:
            alone = eng.submit(target, sampling=sp, max_tokens=12).result(timeout=60)
            # Three neighbours with other settings take slots 0-2 first: target lands in 3.
            fillers = [eng.submit(PROMPTS[i], max_tokens=14,
                                  sampling=SamplingParams(temperature=1.5, seed=100 + i))
                       for i in (0, 4, 6)]
            crowded = eng.submit(target, sampling=sp, max_tokens=12)
            assert crowded.result(timeout=60).token_ids == alone.token_ids
            for f in fillers:
                f.result(timeout=60)
            ref = _llm().generate(target, sampling=sp, max_new_tokens=12)
            assert alone.token_ids == ref.token_ids


LONG = RNG.integers(4, TINY.vocab_size, 200).tolist()


def test_chunked_prefill_matches_whole_prompts():
    """Prompts longer than the per-turn budget are prefilled 16 tokens a turn (prefix-cache
    hits included) and decode exactly what LLM.generate does, with no new compilations."""
    prompts = PROMPTS + [LONG, LONG[:150] + PROMPTS[2]]  # the last one hits the cache
    max_new = MAX_NEW + [7, 9]
    with tiny_engine(num_slots=2, prefill_token_budget=16, prefix_block=16) as eng:
        eng.warmup()
        before = eng.compile_count
        got = [r.result(timeout=120) for r in
               [eng.submit(p, sampling=GREEDY, max_tokens=m)
                for p, m in zip(prompts, max_new, strict=True)]]
        assert eng.compile_count == before
        assert got[-1].metrics.cached_tokens == 144  # 9 blocks of LONG's
    ref = _llm().generate(prompts, sampling=GREEDY, max_new_tokens=max_new)
    assert [g.token_ids for g in got] == [r.token_ids for r in ref]


@pytest.mark.parametrize("chunked", [True, False])
def test_chunked_prefill_keeps_decoding_rows_moving(chunked):
    """A 200-token prompt under a 16-token budget: with chunked prefill the request that
    is already decoding gains a token every turn while the long prompt is prefilled
    (13 turns); without it the whole prompt goes in one turn. Counted, not timed: the
    long request's on_finish runs on the engine thread."""
    cfg = TINY.replace(eos_token_ids=())

    class NoEos(CharTokenizer):
        eos_ids = ()

    seen = []
    with Engine(W, cfg, NoEos(), EngineConfig(num_slots=2, max_len=256, prefix_cache_mb=0,
                                              prefill_token_budget=16,
                                              chunked_prefill=chunked)) as eng:
        a = eng.submit(PROMPTS[0], sampling=GREEDY, max_tokens=40)
        b = eng.submit(LONG, sampling=GREEDY, max_tokens=1,
                       on_finish=lambda r: seen.append(len(a.token_ids)))
        a.result(timeout=60), b.result(timeout=60)
    assert (seen[0] >= 12) if chunked else (seen[0] <= 3), seen


def test_cancel_during_chunked_prefill():
    with tiny_engine(num_slots=1, prefill_token_budget=1, prefix_cache_mb=0) as eng:
        long = eng.submit(LONG, sampling=GREEDY, max_tokens=4)  # 200 turns of prefill
        deadline = time.monotonic() + 30
        while eng._partial is None:  # its slot is reserved once the first chunk is in
            assert time.monotonic() < deadline and not long.done
            time.sleep(0.001)
        long.cancel()
        res = long.result(timeout=30)
        assert res.finish_reason == "cancelled" and res.token_ids == []
        after = eng.submit(PROMPTS[1], sampling=GREEDY, max_tokens=3).result(timeout=30)
        assert len(after.token_ids) == 3 and eng.slots_in_use == 0


def test_no_compile_after_warmup():
    with tiny_engine(num_slots=5) as eng:  # a slot count no other test compiles
        assert eng.warmup() > 0
        before = eng.compile_count
        lengths = [1, 5, 31, 32, 33, 64, 70, 130, 200, 250]
        reqs = [eng.submit(RNG.integers(4, 97, n).tolist(), max_tokens=3 + i % 4,
                           sampling=SEEDED[i % 3] if i % 2 else GREEDY, stop=["zz"] * (i % 2))
                for i, n in enumerate(lengths)]
        reqs.append(eng.submit(messages=[{"role": "user", "content": "hello"}], max_tokens=4))
        reqs.append(eng.submit("bad words", max_tokens=4, sampling=SamplingParams(
            temperature=0, bad_words=["ab"], allowed_token_ids=[33, 34, 65, 66],
            logit_bias={33: 1.0})))  # per-request edits of the logits: traced, too
        for r in reqs:
            r.result(timeout=60)
        hit = eng.submit(reqs[-4].prompt_ids[:40] + [7, 8], max_tokens=3).result(timeout=60)
        assert hit.metrics.cached_tokens == 32  # a prefix-cache hit, 10-token suffix
        assert eng.compile_count == before, f"{eng.compile_count - before} recompilations"


@pytest.mark.parametrize("include", [False, True])
def test_stop_strings_streaming_and_holdback(include):
    """The text ends before the stop string (or after it, with include_stop_str_in_output),
    and no delta ever shows text a stop string takes back."""
    llm, prompt = _llm(), PROMPTS[3]
    full = llm.generate(prompt, sampling=GREEDY, max_new_tokens=20).text
    stop = full[6:9]
    sp = SamplingParams(temperature=0, include_stop_str_in_output=include)
    expect = llm.generate(prompt, sampling=sp, max_new_tokens=20, stop=[stop])
    assert expect.finish_reason == "stop"
    # vLLM's form: the stop strings inside SamplingParams (merged with a call's `stop`).
    in_sp = SamplingParams(temperature=0, include_stop_str_in_output=include, stop=stop)
    with tiny_engine() as eng:
        req = eng.submit(prompt, sampling=sp, max_tokens=20, stop=[stop, "\x7f"])
        deltas = list(req)
        res = req.result()
        assert eng.submit(prompt, sampling=in_sp, max_tokens=20).result().text == res.text
    assert llm.generate(prompt, sampling=in_sp, max_new_tokens=20).text == expect.text
    end = full.find(stop) + (len(stop) if include else 0)
    assert "".join(deltas) == res.text == expect.text == full[:end]
    assert "".join(llm.stream(prompt, sp, 20, stop=[stop])) == expect.text
    assert res.finish_reason == "stop" and res.token_ids == expect.token_ids
    assert all(stop not in d for d in deltas) or include


def test_async_iteration_matches_result():
    async def collect(req):
        return "".join([d async for d in req])

    async def main(eng):
        reqs = [eng.submit(p, sampling=GREEDY, max_tokens=m) for p, m in
                zip(PROMPTS[:5], MAX_NEW[:5], strict=True)]
        texts = await asyncio.gather(*(collect(r) for r in reqs))
        results = [await r.aresult() for r in reqs]
        return texts, results

    with tiny_engine() as eng:
        texts, results = asyncio.run(main(eng))
    assert texts == [r.text for r in results]
    assert all(r.metrics.ttft_s > 0 and r.metrics.e2e_s >= r.metrics.ttft_s for r in results)


def test_cancel_queue_full_and_bad_requests():
    cfg = TINY.replace(eos_token_ids=())

    class NoEos(CharTokenizer):
        eos_ids = ()

    with Engine(W, cfg, NoEos(), EngineConfig(num_slots=1, max_len=512, max_queue=2,
                                              prefix_cache_mb=0)) as eng:
        long = eng.submit(PROMPTS[0], sampling=GREEDY, max_tokens=500)
        next(iter(long))  # it is decoding in the only slot
        queued = [eng.submit(PROMPTS[1], sampling=GREEDY, max_tokens=4) for _ in range(2)]
        with pytest.raises(EngineOverloadedError, match="queue is full"):
            eng.submit(PROMPTS[2], max_tokens=4)
        queued[0].cancel()  # leaves the queue at once
        assert queued[0].result(timeout=5).finish_reason == "cancelled"
        long.cancel()  # frees the slot at the next step
        res = long.result(timeout=30)
        assert res.finish_reason == "cancelled" and len(res.token_ids) < 500
        assert queued[1].result(timeout=30).finish_reason == "length"
        with pytest.raises(ContextLengthError, match="512"):
            eng.submit([5] * 500, max_tokens=20)
        for bad, match in [(dict(prompt=""), "empty"), (dict(prompt=[5], max_tokens=0),
                           "max_tokens"), (dict(prompt=[500]), "vocabulary"),
                           (dict(prompt=[5], max_tokens=2.5), "integer"),
                           (dict(prompt=[5], stop=[1]), "stop")]:
            with pytest.raises(BadRequestError, match=match):
                eng.submit(**bad)
    with pytest.raises(ConfigError, match="prefix_block"):
        EngineConfig(max_len=100, prefix_block=16)


def test_priority_policy_orders_the_queue():
    """Under scheduling_policy "priority" a free slot goes to the lowest `priority`
    waiting (arrival order among equals), whatever order the requests came in; the
    output of each is what it gives alone. FCFS (the default) refuses a priority."""
    with tiny_engine(num_slots=1, scheduling_policy="priority", prefix_cache_mb=0) as eng:
        started = []
        hold = threading.Event()
        job = eng.run_exclusive(hold.wait)  # the device thread waits: the queue fills up
        prios = [5, 0, -2, 0, 3, -2]
        reqs = [eng.submit(PROMPTS[i], sampling=GREEDY, max_tokens=3, priority=p,
                           on_finish=started.append) for i, p in enumerate(prios)]
        hold.set()
        job.result(timeout=30)
        results = [r.result(timeout=60) for r in reqs]
        want = sorted(range(len(prios)), key=lambda i: (prios[i], i))
        assert [r.id for r in started] == [reqs[i].id for i in want]
        alone = [eng.generate([PROMPTS[i]], sampling=GREEDY, max_tokens=3)[0]
                 for i in range(len(prios))]
        assert [r.token_ids for r in results] == [a.token_ids for a in alone]
        for bad, match in [(1.5, "integer"), (True, "integer"), ("1", "integer")]:
            with pytest.raises(BadRequestError, match=match):
                eng.submit(PROMPTS[0], priority=bad)
    with tiny_engine(num_slots=1, prefix_cache_mb=0) as eng:
        with pytest.raises(BadRequestError, match="priority=3 needs the priority"):
            eng.submit(PROMPTS[0], priority=3)
        assert eng.submit(PROMPTS[0], max_tokens=2, priority=0).result(timeout=60)
    with pytest.raises(ConfigError, match="scheduling_policy"):
        EngineConfig(scheduling_policy="lifo")


@pytest.mark.parametrize("prefix_cache_mb", [0.0, 8.0])
def test_priority_preempts_and_resumes_exactly(prefix_cache_mb):
    """With every slot busy, a request of lower priority value takes the slot of the
    worst running one (the latest among equals). The preempted request comes back after
    it and ends with the tokens it gives unpreempted (seeded sampling with penalties: its
    step, counts and recent tokens are restored), and nothing compiles after warm-up."""
    sp = SamplingParams(temperature=1.0, seed=7, repetition_penalty=1.3,
                        frequency_penalty=0.5, presence_penalty=0.3, ignore_eos=True)
    with tiny_engine(num_slots=2, scheduling_policy="priority",
                     prefix_cache_mb=prefix_cache_mb) as eng:
        eng.warmup()
        compiled = eng.compile_count
        order = []
        low = [eng.submit(PROMPTS[i], sampling=sp, max_tokens=150, priority=5,
                          on_finish=order.append) for i in (0, 3)]
        deadline = time.monotonic() + 60
        while min(len(r.token_ids) for r in low) < 5 and time.monotonic() < deadline:
            time.sleep(0.001)
        high = eng.submit(PROMPTS[1], sampling=GREEDY, max_tokens=6, priority=0,
                          on_finish=order.append)
        res = [r.result(timeout=120) for r in (*low, high)]
        assert eng.preemptions == 1
        assert [r.metrics.preemptions for r in res] == [0, 1, 0]  # the later of equals
        assert order.index(high) < order.index(low[1])
        assert eng.compile_count == compiled
        alone = [eng.submit(PROMPTS[i], sampling=sp, max_tokens=150).result(timeout=120)
                 for i in (0, 3)]
        assert [r.token_ids for r in res[:2]] == [a.token_ids for a in alone]
        assert res[2].token_ids == eng.submit(PROMPTS[1], sampling=GREEDY,
                                              max_tokens=6).result().token_ids
        assert "jaxinfer_preemptions 1" in eng.prometheus()


def test_a_device_failure_while_admitting_fails_the_request():
    """An unexpected error between the queue and a slot (a prefix-cache load, say) ends the
    request with EngineClosedError naming it, and later submits are refused: no hang."""
    eng = tiny_engine()

    def broken(req, slot):
        raise RuntimeError("injected failure")

    eng._start_prefill = broken
    try:
        req = eng.submit(PROMPTS[0], sampling=GREEDY, max_tokens=4)
        with pytest.raises(EngineClosedError, match="injected failure"):
            req.result(timeout=30)
        with pytest.raises(EngineClosedError, match="injected failure"):
            eng.submit(PROMPTS[0], max_tokens=4)
    finally:
        eng.close()


def test_prefix_cache_prefills_only_the_suffix():
    shared = RNG.integers(4, 97, 200).tolist()
    a, b = shared + [5, 6, 7], shared + [8, 9, 10, 11, 12]
    with tiny_engine(prefix_block=16) as eng:
        ra = eng.submit(a, sampling=GREEDY, max_tokens=10).result(timeout=60)
        before = eng.prefilled_tokens
        rb = eng.submit(b, sampling=GREEDY, max_tokens=10).result(timeout=60)
        assert eng.prefilled_tokens - before == len(b) - 192  # 12 blocks of 16 reused
        assert rb.metrics.cached_tokens == 192 and rb.metrics.prefilled_tokens == len(b) - 192
        again = eng.submit(a, sampling=GREEDY, max_tokens=10).result(timeout=60)
        assert again.metrics.cached_tokens == 192  # at least one token is always computed
        assert eng.metrics.prefix_hits == 2 and eng.metrics.prefix_hit_tokens == 384
        assert "jaxinfer_prefix_cache_hits_total 2" in eng.prometheus()
    # A tiny pool (5 blocks) evicts constantly and must still give the same tokens.
    block_bytes = 2 * TINY.num_layers * TINY.num_kv_heads * 16 * TINY.head_dim * 4
    with tiny_engine(prefix_cache_mb=5 * block_bytes / 2**20) as small, \
            tiny_engine(prefix_cache_mb=0) as plain:
        for p in (a, b, a, shared[:50] + [9] * 30, b):
            cached = small.submit(p, sampling=GREEDY, max_tokens=10).result(timeout=60)
            fresh = plain.submit(p, sampling=GREEDY, max_tokens=10).result(timeout=60)
            assert cached.token_ids == fresh.token_ids
            assert small._prefix.blocks_used <= 5
        assert small.metrics.prefix_hits >= 1
    assert ra.token_ids == plain_tokens(a) and rb.token_ids == plain_tokens(b)


@pytest.mark.slow
@pytest.mark.parametrize("kv", ["int8", "fp8"])
def test_quantized_weights_and_int8_kv_cache(kv):
    """int8 weights and an int8 or fp8 KV cache (slots and prefix pool, scales included)
    give the engine the same tokens as LLM.generate on the same quantized model, prefix
    hits too."""
    qw = jax.device_put(quantize_weights(tiny_weights(), QuantConfig.from_mode("int8")),
                        jax.devices()[0])
    llm = LLM(TINY, qw, CharTokenizer(), kv_dtype=kv)
    one = jnp.dtype(jnp.int8 if kv == "int8" else jnp.float8_e4m3fn)
    shared = RNG.integers(4, 97, 64).tolist()
    prompts = [shared + p for p in PROMPTS[:4]] + PROMPTS[4:]
    ref = llm.generate(prompts, sampling=GREEDY, max_new_tokens=MAX_NEW)
    float_ref = _llm().generate(prompts, sampling=GREEDY, max_new_tokens=MAX_NEW)
    cfg = EngineConfig(num_slots=3, max_len=256, prefix_block=16)
    with Engine.from_llm(llm, cfg) as eng:
        assert eng.kv_dtype == one and eng._state.cache.k_scale is not None
        assert all(p.dtype == d for p, d in zip(
            eng._prefix.pools, (one, one, jnp.float32, jnp.float32), strict=True))
        got = [eng.submit(p, sampling=GREEDY, max_tokens=m).result(timeout=120)
               for p, m in zip(prompts, MAX_NEW, strict=True)]
        assert eng.metrics.prefix_hits == 3  # prompts 2-4 reuse the 64-token prefix
    for g, r in zip(got, ref, strict=True):
        assert g.token_ids == r.token_ids
    # Quantization changes the model a little, not entirely.
    same = sum(g.token_ids == f.token_ids for g, f in zip(got, float_ref, strict=True))
    print(f"int8 weights + {kv} KV: {same}/{len(got)} requests equal the float model's")


def plain_tokens(prompt):
    return _llm().generate(prompt, sampling=GREEDY, max_new_tokens=10).token_ids


# ---- the real model ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2(smollm2_checkpoint):
    return LLM.load(smollm2_checkpoint, dtype=jnp.float32)


def _questions(llm):
    topics = ["the moon", "Paris", "a cat", "rain", "JAX", "bread", "the sea", "music",
              "winter", "a robot", "chess", "trees", "a volcano", "coffee", "birds", "time"]
    out = []
    for i, t in enumerate(topics):
        text = f"Tell me one fact about {t}." + " Please be brief and clear." * (i % 4)
        out.append(llm.encode(text, chat=bool(i % 2)))
    return out


@pytest.mark.slow
def test_batch_invariance_16_requests_smollm2(smollm2):
    prompts = _questions(smollm2)
    max_new = [4 + i % 5 for i in range(16)]
    cfg = EngineConfig(num_slots=16, max_len=256, prefix_cache_mb=0)
    with Engine.from_llm(smollm2, cfg) as eng:
        t0 = time.perf_counter()
        reqs = [eng.submit(p, sampling=GREEDY, max_tokens=m)
                for p, m in zip(prompts, max_new, strict=True)]
        busy = [r.result(timeout=300) for r in reqs]
        dt = time.perf_counter() - t0
        alone = [eng.submit(p, sampling=GREEDY, max_tokens=m).result(timeout=120)
                 for p, m in zip(prompts, max_new, strict=True)]
    n = sum(len(r.token_ids) for r in busy)
    print(f"16 concurrent requests: {n} tokens in {dt:.2f} s ({n / dt:.1f} tok/s)")
    for p, m, b, a in zip(prompts, max_new, busy, alone, strict=True):
        ref = smollm2.generate(p, sampling=GREEDY, max_new_tokens=m)
        assert b.token_ids == a.token_ids == ref.token_ids, (b.text, a.text, ref.text)
        assert b.text == ref.text


@pytest.mark.slow
def test_prefix_cache_and_chunked_prefill_smollm2_200_token_prefix(smollm2):
    system = " ".join(f"Rule {i}: answer politely and briefly." for i in range(40))
    shared = smollm2.encode(system)[:200]
    assert len(shared) == 200
    a = shared + smollm2.encode(" Question: what is 2+2?")
    b = shared + smollm2.encode(" Question: name a colour.")
    cfg = EngineConfig(num_slots=2, max_len=256, prefix_block=16)
    with Engine.from_llm(smollm2, cfg) as eng:
        eng.submit(a, sampling=GREEDY, max_tokens=6).result(timeout=120)
        before = eng.prefilled_tokens
        rb = eng.submit(b, sampling=GREEDY, max_tokens=6).result(timeout=120)
        assert eng.prefilled_tokens - before == len(b) - 192
        assert rb.metrics.cached_tokens == 192
    # No prefix cache, and the prompt prefilled in four 64-token chunks over four turns.
    with Engine.from_llm(smollm2, EngineConfig(num_slots=2, max_len=256, prefix_cache_mb=0,
                                               prefill_token_budget=64)) as plain:
        fresh = plain.submit(b, sampling=GREEDY, max_tokens=6).result(timeout=120)
    whole = smollm2.generate(b, sampling=GREEDY, max_new_tokens=6)
    assert rb.token_ids == fresh.token_ids == whole.token_ids and rb.text == fresh.text


@pytest.mark.parametrize("mesh_spec,kv", [
    ("data:2,model:2", None), pytest.param("data:4,model:2", "int8", marks=pytest.mark.slow)])
@pytest.mark.slow
def test_engine_under_a_mesh_matches_single_device(mesh_spec, kv):
    """Weights sharded over a mesh of simulated CPU devices: the slots' cache is sharded
    (slots over data, KV heads over model) and the tokens equal the single-device run."""
    from jaxinfer.sharding import make_mesh
    from jaxinfer.weights import weight_shardings, weight_specs

    mesh = make_mesh(mesh_spec)
    w = jax.device_put(tiny_weights(), weight_shardings(weight_specs(TINY), mesh))
    llm = LLM(TINY, w, CharTokenizer(), mesh=mesh, kv_dtype=kv)
    ref = LLM(TINY, W, CharTokenizer(), kv_dtype=kv).generate(
        PROMPTS, sampling=GREEDY, max_new_tokens=MAX_NEW)
    with Engine.from_llm(llm, EngineConfig(num_slots=4, max_len=256, prefix_block=16)) as eng:
        k = eng._state.cache.k
        assert k.sharding.spec[1] == "data" and k.sharding.device_set == set(mesh.devices.flat)
        got = [eng.submit(p, sampling=GREEDY, max_tokens=m)
               for p, m in zip(PROMPTS + PROMPTS[:2], MAX_NEW + MAX_NEW[:2], strict=True)]
        got = [r.result(timeout=180) for r in got]
    for g, r in zip(got, ref + ref[:2], strict=True):
        assert g.token_ids == r.token_ids


def test_stop_token_ids_min_tokens_and_ignore_eos():
    """stop_token_ids end a request like EOS (in token_ids, not in the text); min_tokens
    bans EOS and those ids until that many tokens are out; ignore_eos decodes past EOS;
    allowed_token_ids restricts sampling; bad_words ban a word's last token after the rest
    of it. All are applied on device, and the engine, LLM.generate and LLM.stream agree."""
    llm = _llm()
    alone = llm.generate(PROMPTS[2], sampling=GREEDY, max_new_tokens=12)
    sid = alone.token_ids[1]
    cut = alone.token_ids.index(sid) + 1
    stop = SamplingParams(temperature=0, stop_token_ids=[sid])
    at_least = SamplingParams(temperature=0, stop_token_ids=[sid], min_tokens=10)
    sampled = SamplingParams(temperature=1.5, seed=5, stop_token_ids=[sid], min_tokens=10)
    # The tiny model's EOS is 3: a logit bias makes greedy decoding pick it at once.
    eos_first = SamplingParams(temperature=0, logit_bias={3: 100}, ignore_eos=True)
    eos_shown = SamplingParams(temperature=0, logit_bias={3: 100}, ignore_eos=True,
                               skip_special_tokens=False)
    only = SamplingParams(temperature=0.8, seed=2, allowed_token_ids=[40, 41, 42, 3])
    # bad words: a pair of the free output (banned only after its first token) and text
    pair = tuple(alone.token_ids[2:4])
    bad = SamplingParams(temperature=0, bad_words_token_ids=[pair],
                         bad_words=[CharTokenizer().decode(alone.token_ids[6:7])])
    cases = [stop, at_least, sampled, eos_first, eos_shown, only, bad]
    ref = llm.generate([PROMPTS[2]] * 7, sampling=cases, max_new_tokens=12)
    r = ref[0]
    assert r.token_ids == alone.token_ids[:cut] and r.finish_reason == "stop"
    assert r.text == CharTokenizer().decode(alone.token_ids[:cut - 1])
    for m in ref[1:3]:
        assert len(m.token_ids) >= 10 and sid not in m.token_ids[:10]
        assert 3 not in m.token_ids[:10]  # 3: EOS
    assert ref[1].token_ids[:cut - 1] == alone.token_ids[:cut - 1]
    assert ref[3].token_ids == [3] * 12 and ref[3].finish_reason == "length"
    # EOS decoded past is a special token: not text unless skip_special_tokens is off.
    assert ref[3].text == "" and ref[4].text == "#" * 12
    assert set(ref[5].token_ids) <= {40, 41, 42, 3}  # allowed_token_ids (3 is EOS)
    # bad words: the output leaves the free one where a ban first applies, and never
    # holds a banned sequence
    a, b, word = alone.token_ids, ref[6].token_ids, alone.token_ids[6]
    j = next(i for i in range(len(a)) if a[i] == word or (i and (a[i - 1], a[i]) == pair))
    assert b[:j] == a[:j] and b[j] != a[j]
    assert all(tuple(b[i:i + 2]) != pair for i in range(len(b) - 1)) and word not in b
    with tiny_engine(num_slots=2) as eng:
        got = [eng.submit(PROMPTS[2], sampling=sp, max_tokens=12) for sp in cases]
        got = [g.result(timeout=60) for g in got]
        with pytest.raises(BadRequestError, match="min_tokens") as e:
            eng.submit(PROMPTS[2], max_tokens=4, sampling=SamplingParams(min_tokens=5))
        assert e.value.param == "min_tokens"
        with pytest.raises(BadRequestError, match="stop_token_ids") as e:
            eng.submit(PROMPTS[2], max_tokens=4,
                       sampling=SamplingParams(stop_token_ids=[10**6]))
        assert e.value.param == "stop_token_ids"
    for g, r in zip(got, ref, strict=True):
        assert (g.token_ids, g.text, g.finish_reason) == (r.token_ids, r.text, r.finish_reason)
    for sp, r in zip(cases, ref, strict=True):
        out: list = []
        assert "".join(llm.stream(PROMPTS[2], sampling=sp, max_new_tokens=12,
                                  result=out)) == r.text
        assert out[0].token_ids == r.token_ids and out[0].finish_reason == r.finish_reason
    with pytest.raises(BadRequestError, match="min_tokens"):
        llm.generate(PROMPTS[2], sampling=SamplingParams(min_tokens=5), max_new_tokens=4)


def test_logit_bias_in_the_engine_and_llm_generate():
    """A -100 bias bans the token greedy decoding would start with; the engine decodes
    what LLM.generate decodes under the same bias; a token past the vocabulary is a 400."""
    first = _llm().generate(PROMPTS[2], sampling=GREEDY, max_new_tokens=1).token_ids[0]
    sp = SamplingParams(temperature=0, logit_bias={first: -100, 7: 5.0})
    ref = _llm().generate(PROMPTS[2], sampling=sp, max_new_tokens=8)
    assert first not in ref.token_ids
    with tiny_engine(num_slots=2) as eng:
        got = eng.submit(PROMPTS[2], sampling=sp, max_tokens=8).result(timeout=60)
        with pytest.raises(BadRequestError, match="outside the vocabulary"):
            eng.submit("x", sampling=SamplingParams(logit_bias={10**6: 1}))
    assert got.token_ids == ref.token_ids


def test_memory_plan(monkeypatch):
    """Given the device's free memory (faked: the CPU backend keeps no statistics), a
    cache that does not fit is a ConfigError naming how many slots do, and num_slots=None
    takes as many as fit in memory_fraction of it; on CPU num_slots=None is refused."""
    from jaxinfer import engine_core, memory

    slot = engine_core.slots_bytes(TINY, 1, 256, jnp.float32, None)
    assert slot == 2 * TINY.num_layers * TINY.num_kv_heads * 256 * TINY.head_dim * 4
    assert engine_core.slots_bytes(TINY, 1, 256, jnp.int8, None) == slot // 4 + slot // 4 // (
        TINY.head_dim) * 4  # int8 K/V and one f32 scale per token and head
    with pytest.raises(ConfigError, match="memory statistics"):
        tiny_engine(num_slots=None)
    monkeypatch.setattr(memory, "free_bytes", lambda devices: 10 * slot + 2**20)
    with pytest.raises(ConfigError, match=r"num_slots=12 x max_len=256 .* at most 10 slots"):
        tiny_engine(num_slots=12, prefix_cache_mb=1)
    with pytest.raises(ConfigError, match="memory_fraction"):
        tiny_engine(num_slots=None, memory_fraction=1.5)
    monkeypatch.setattr(memory, "free_bytes", lambda devices: 10 * slot)
    with tiny_engine(num_slots=None, prefix_cache_mb=0, memory_fraction=0.5) as eng:
        assert eng.config.num_slots == 5 and len(eng._slots) == 5
        assert len(eng.submit("hi", sampling=GREEDY, max_tokens=3).result(60).token_ids) == 3


def test_truncate_prompt_tokens():
    """vLLM's truncate_prompt_tokens keeps a prompt's last n tokens: the same output as
    that suffix sent alone, in LLM.generate/stream and the engine, where a prompt too long
    for the slots fits once truncated."""
    llm, ids = _llm(), list(range(5, 95)) * 3  # 270 tokens, more than a 256-position slot
    sp = SamplingParams(temperature=0, truncate_prompt_tokens=40)
    want = llm.generate(ids[-40:], sampling=GREEDY, max_new_tokens=8)
    got = llm.generate(ids, sampling=sp, max_new_tokens=8)
    assert got.token_ids == want.token_ids and got.prompt_tokens == 40
    out: list = []
    "".join(llm.stream(ids, sampling=sp, max_new_tokens=8, result=out))
    assert out[0].token_ids == want.token_ids
    with tiny_engine() as eng:
        with pytest.raises(ContextLengthError):
            eng.submit(ids, sampling=GREEDY, max_tokens=8)
        r = eng.submit(ids, sampling=sp, max_tokens=8).result(timeout=60)
    assert r.token_ids == want.token_ids and r.prompt_tokens == 40
    with pytest.raises(BadRequestError, match="sampling has 2 entries for 1 prompts"):
        llm.generate([ids], sampling=[GREEDY, GREEDY])
    with pytest.raises(BadRequestError, match="stop must be"):  # before any decoding
        llm.generate(ids[:5], sampling=GREEDY, stop=[1])


@pytest.mark.slow
def test_n_completions_per_prompt():
    """SamplingParams(n=k), vLLM's n: LLM.generate and Engine.generate return each prompt's
    k completions as a list in its place, completion j sampled as seed + j (so choice 0 is
    the n=1 completion and the k differ); a prompt with n=1 keeps its Completion. A single
    sequence (a stream, one engine request) refuses n > 1; n outside [1, 16] is a 400."""
    llm = _llm()
    sp = SamplingParams(temperature=1.5, seed=5, n=3)
    alone = [llm.generate(PROMPTS[0], SamplingParams(temperature=1.5, seed=5 + j),
                          max_new_tokens=12).token_ids for j in range(3)]
    assert len(set(map(tuple, alone))) == 3
    many = llm.generate(PROMPTS[0], sp, max_new_tokens=12)
    assert [c.token_ids for c in many] == alone
    mixed = llm.generate(PROMPTS[:2], [sp, SamplingParams(temperature=1.5, seed=9)],
                         max_new_tokens=[12, 7])
    assert [c.token_ids for c in mixed[0]] == alone and len(mixed[1].token_ids) <= 7
    with tiny_engine() as eng:
        outs = eng.generate(PROMPTS[:2], sampling=sp, max_tokens=12)
        assert [o.token_ids for o in outs[0]] == alone and len(outs[1]) == 3
        with pytest.raises(BadRequestError, match="n=3"):
            eng.submit(PROMPTS[0], sampling=sp)
    with pytest.raises(BadRequestError, match="n=3"):
        next(llm.stream(PROMPTS[0], sp))
    for bad in (0, 17, 1.5):
        with pytest.raises(BadRequestError, match="n must be an integer in"):
            SamplingParams(n=bad)


@pytest.mark.parametrize("call,match", [
    (lambda m: m.generate(123), "prompts must be"),
    (lambda m: m.generate(None), "prompts must be"),
    (lambda m: m.generate([1, 2, TINY.vocab_size]), f"token id {TINY.vocab_size} is outside"),
    (lambda m: m.generate([[5, -1]]), "token id -1 is outside"),
    (lambda m: m.generate([5, 2.5]), "must be integers, got 2.5"),
    (lambda m: m.generate([5], max_new_tokens=2.5), "positive integer, got 2.5"),
    (lambda m: m.generate([5], max_new_tokens=-1), "positive integer, got -1"),
    (lambda m: m.chat("hi"), "messages must be"),
    (lambda m: m.chat([]), "messages must be"),
    (lambda m: m.chat([[{"role": "user", "content": "a"}], []]), "messages must be"),
])
def test_llm_bad_input_is_a_bad_request(call, match):
    """The library's entry points raise BadRequestError naming the bad value: a token id
    outside the vocabulary would otherwise be clamped by the embedding gather (a silently
    different prompt), and a wrong type would be a TypeError from deep inside."""
    with pytest.raises(BadRequestError, match=match):
        call(_llm())


def test_engine_refuses_non_integer_token_ids():
    with tiny_engine(num_slots=1) as eng:
        for bad, match in (([5, 2.5], "integers, got 2.5"), ([5, True], "integers, got True"),
                           ([-3], "token id -3")):
            with pytest.raises(BadRequestError, match=match):
                eng.submit(bad)


@pytest.mark.parametrize("kw,match", [
    ({"dtype": "int8"}, "dtype must be float32, bfloat16 or float16, got 'int8'"),
    ({"dtype": "float64"}, "got 'float64'"),
    ({"dtype": "nonsense"}, "got 'nonsense'"),
    ({"impl": "flash"}, "unknown attention impl 'flash'"),
])
def test_load_refuses_bad_settings_before_reading(kw, match, tmp_path):
    """A compute dtype that is not a 16/32-bit float (int8 would cast the weights to
    integers) or an unknown attention impl is a ConfigError before any checkpoint is read
    (this one does not exist)."""
    with pytest.raises(ConfigError, match=match):
        LLM.load(str(tmp_path / "never-read"), **kw)


def test_load_checks_the_chat_template_before_reading(tmp_path):
    from jaxinfer.errors import TokenizerError

    with pytest.raises(TokenizerError, match="chat template file not found"):
        LLM.load(str(tmp_path / "never-read"), chat_template=str(tmp_path / "none.jinja"))
