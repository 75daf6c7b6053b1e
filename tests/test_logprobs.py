"""Per-token log-probabilities (`SamplingParams.logprobs`) from the serving engine and the
OpenAI server, checked against log_softmax of the pure model's own forward pass."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import requests

from jaxinfer import kv_cache, model
from jaxinfer.errors import BadRequestError
from jaxinfer.sampling import GREEDY, SamplingParams
from jaxinfer.server import BackgroundServer, create_app

from .engine_helpers import CharTokenizer, W, tiny_engine
from .helpers import TINY


@pytest.fixture(scope="module")
def engine():
    with tiny_engine(num_slots=4, max_len=256) as eng:
        eng.warmup()
        yield eng


@pytest.fixture(scope="module")
def url(engine):
    with BackgroundServer(create_app(engine, "tiny")) as srv:
        yield srv.url


def _reference(prompt_ids, token_ids):
    """log_softmax of model.forward over prompt + generated tokens, at each generated one."""
    ids = list(prompt_ids) + list(token_ids)
    logits, _ = model.forward(W, jnp.asarray([ids]), kv_cache.init_cache(TINY, 1, 64), TINY)
    logp = np.asarray(jax.nn.log_softmax(logits[0], -1))
    return logp[len(prompt_ids) - 1: len(ids) - 1]


def test_greedy_logprobs_are_the_models(engine):
    before = engine.compile_count
    tok = CharTokenizer()
    r = engine.submit("Hello there", sampling=SamplingParams(temperature=0, logprobs=5),
                      max_tokens=8).result(timeout=60)
    assert engine.compile_count == before  # asking for logprobs never recompiles
    assert len(r.logprobs) == len(r.token_ids) == 8
    ref = _reference(tok.encode("Hello there"), r.token_ids)
    for e, t, row in zip(r.logprobs, r.token_ids, ref, strict=True):
        assert e.token_id == t
        np.testing.assert_allclose(e.logprob, row[t], atol=1e-4)
        ids, lps = zip(*e.top, strict=True)
        assert list(ids) == list(np.argsort(-row)[:5]) and ids[0] == t  # greedy: the top one
        np.testing.assert_allclose(lps, np.sort(row)[::-1][:5], atol=1e-4)


def test_sampled_logprobs_are_raw_and_unrequested_are_none(engine):
    """A sampled token's logprob is under the raw model (vLLM's default), not the tempered
    distribution it was drawn from; logprobs=0 gives no alternatives."""
    p = SamplingParams(temperature=1.7, top_k=20, seed=3, logprobs=0)
    r = engine.submit("abc", sampling=p, max_tokens=6).result(timeout=60)
    ref = _reference(CharTokenizer().encode("abc"), r.token_ids)
    for e, t, row in zip(r.logprobs, r.token_ids, ref, strict=True):
        assert e.top == () and e.token_id == t
        np.testing.assert_allclose(e.logprob, row[t], atol=1e-4)
    plain = engine.submit("abc", sampling=SamplingParams(temperature=1.7, top_k=20, seed=3),
                          max_tokens=6).result(timeout=60)
    assert plain.logprobs is None and plain.token_ids == r.token_ids  # same tokens


def test_while_loop_path_records_logprobs():
    """generate.start(logprobs=True) + run_loop (LLM.generate's path) records each row's
    logprobs on device; rows that finish early stop recording."""
    from jaxinfer import generate as gen
    from jaxinfer.sampling import SamplingArrays

    tok = CharTokenizer()
    prompts = [tok.encode("Hello there"), tok.encode("abc")]
    prompt_BT, lens, cache, M = gen.prepare(prompts, [6, 3], TINY, jnp.float32)
    s = gen.start(W, prompt_BT, lens, cache, SamplingArrays.from_params(
        [SamplingParams(temperature=0)] * 2), np.array([6, 3], np.int32),
        np.array([-1], np.int32), cfg=TINY, max_out=M, logprobs=True)
    s = gen.run_loop(W, s, cfg=TINY)
    out, n = np.asarray(s.output_BM), np.asarray(s.num_generated_B)
    lp, ids, top = (np.asarray(a) for a in s.logprobs_out)
    for b, p in enumerate(prompts):
        toks = list(out[b, :n[b]])
        ref = _reference(p, toks)
        np.testing.assert_allclose(lp[b, :n[b]], ref[np.arange(n[b]), toks], atol=1e-4)
        assert (ids[b, :n[b], 0] == toks).all() and (np.diff(top[b, :n[b]], axis=-1) <= 0).all()
        assert (lp[b, n[b]:] == 0).all()


@pytest.mark.parametrize("bad", [-1, 21, True, 1.5, "3"])
def test_bad_logprobs_raise(bad):
    with pytest.raises(BadRequestError, match="logprobs"):
        SamplingParams(logprobs=bad)


def test_server_chat_and_completion_logprobs(url, engine):
    tok = CharTokenizer()
    msgs = [{"role": "user", "content": "Hi"}]
    out = requests.post(f"{url}/v1/chat/completions", timeout=60, json={
        "messages": msgs, "max_tokens": 5, "temperature": 0, "logprobs": True,
        "top_logprobs": 2}).json()
    ref = engine.submit(messages=msgs, sampling=SamplingParams(temperature=0, logprobs=2),
                        max_tokens=5).result(timeout=60)
    content = out["choices"][0]["logprobs"]["content"]
    assert [c["token"] for c in content] == [tok.decode([t]) for t in ref.token_ids]
    for c, e in zip(content, ref.logprobs, strict=True):
        assert c["bytes"] == list(tok.decode([e.token_id]).encode())
        assert c["logprob"] == pytest.approx(e.logprob, abs=1e-6)
        assert [t["logprob"] for t in c["top_logprobs"]] == pytest.approx(
            [x for _, x in e.top], abs=1e-6)
    plain = requests.post(f"{url}/v1/chat/completions", timeout=60, json={
        "messages": msgs, "max_tokens": 2}).json()
    assert plain["choices"][0]["logprobs"] is None

    out = requests.post(f"{url}/v1/completions", timeout=60, json={
        "prompt": "Hello", "max_tokens": 4, "temperature": 0, "logprobs": 3}).json()
    lp = out["choices"][0]["logprobs"]
    assert "".join(lp["tokens"]) == out["choices"][0]["text"]
    assert lp["text_offset"] == [sum(map(len, lp["tokens"][:i])) for i in range(4)]
    assert all(len(t) <= 3 for t in lp["top_logprobs"]) and len(lp["token_logprobs"]) == 4


def test_streamed_logprobs_add_up_to_the_whole(url):
    body = {"messages": [{"role": "user", "content": "Stream"}], "max_tokens": 7,
            "temperature": 0, "logprobs": True, "top_logprobs": 1}
    url_ = f"{url}/v1/chat/completions"
    whole = requests.post(url_, json=body, timeout=60).json()["choices"][0]["logprobs"]
    with requests.post(url_, json={**body, "stream": True}, stream=True, timeout=60) as r:
        import json
        chunks = [json.loads(x[6:]) for x in r.iter_lines(decode_unicode=True)
                  if x.startswith("data: {")]
    streamed = [c for ch in chunks if ch["choices"] and ch["choices"][0]["logprobs"]
                for c in ch["choices"][0]["logprobs"]["content"]]
    assert streamed == whole["content"]


@pytest.mark.parametrize("path,body,param", [
    ("chat/completions", {"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
    ("chat/completions", {"top_logprobs": 2}, "top_logprobs"),
    ("chat/completions", {"logprobs": "yes"}, "logprobs"),
    ("completions", {"logprobs": -1}, "logprobs"),
    ("completions", {"logprobs": 21}, "logprobs"),
])
def test_bad_logprobs_requests_get_400(url, path, body, param):
    base = ({"messages": [{"role": "user", "content": "x"}]} if path.startswith("chat")
            else {"prompt": "x"})
    r = requests.post(f"{url}/v1/{path}", json={**base, **body}, timeout=30)
    assert r.status_code == 400, r.text
    assert param in r.json()["error"]["message"] or r.json()["error"]["param"] == param


def _prompt_reference(prompt_ids):
    """log_softmax of model.forward over the prompt: row t scores prompt token t + 1."""
    logits, _ = model.forward(W, jnp.asarray([prompt_ids]), kv_cache.init_cache(TINY, 1, 64),
                              TINY)
    return np.asarray(jax.nn.log_softmax(logits[0], -1))


def test_prompt_logprobs_chunked_and_past_the_prefix_cache():
    """prompt_logprobs=n: every prompt token's logprob (None for the first) and its n
    likeliest alternatives, also when the prompt is prefilled in 16-token chunks and when
    its prefix is cached (the cache is bypassed: every position must be computed)."""
    prompt = np.random.default_rng(3).integers(4, TINY.vocab_size, 40).tolist()
    ref = _prompt_reference(prompt)
    with tiny_engine(num_slots=2, prefill_token_budget=16, prefix_block=16) as eng:
        eng.submit(prompt, max_tokens=2).result(timeout=60)  # fills the prefix cache
        sp = SamplingParams(temperature=0, prompt_logprobs=3, logprobs=1)
        r = eng.submit(prompt, sampling=sp, max_tokens=3).result(timeout=60)
        plain = eng.submit(prompt, sampling=SamplingParams(temperature=0),
                           max_tokens=3).result(timeout=60)
    assert r.token_ids == plain.token_ids and plain.prompt_logprobs is None
    assert r.metrics.cached_tokens == 0 and len(r.prompt_logprobs) == len(prompt)
    assert r.prompt_logprobs[0] is None
    for t, e in enumerate(r.prompt_logprobs[1:]):
        assert e.token_id == prompt[t + 1]
        assert abs(e.logprob - ref[t, e.token_id]) < 1e-4
        assert [i for i, _ in e.top] == list(np.argsort(-ref[t])[:3])
    with pytest.raises(BadRequestError, match="prompt_logprobs must be"):
        SamplingParams(prompt_logprobs=21)


@pytest.mark.slow
def test_llm_generate_and_stream_score_prompts():
    """LLM.generate (rows of different lengths, one not asking) and LLM.stream give the
    same prompt_logprobs as model.forward, with or without a draft; the decode after it is
    unchanged."""
    from jaxinfer.llm import LLM

    llm = LLM(TINY, W, CharTokenizer())
    rng = np.random.default_rng(5)
    prompts = [rng.integers(4, TINY.vocab_size, n).tolist() for n in (21, 7, 12)]
    sps = [SamplingParams(temperature=0, prompt_logprobs=3), SamplingParams(temperature=0),
           SamplingParams(temperature=0, prompt_logprobs=0)]
    got = llm.generate(prompts, sampling=sps, max_new_tokens=5)
    plain = llm.generate(prompts, sampling=GREEDY, max_new_tokens=5)
    out: list = []
    "".join(llm.stream(prompts[0], sampling=sps[0], max_new_tokens=5, result=out))
    drafted = llm.generate(prompts, sampling=sps, max_new_tokens=5, draft="ngram")
    assert got[1].prompt_logprobs is None and drafted[1].prompt_logprobs is None
    for p, lps in [(prompts[0], got[0].prompt_logprobs), (prompts[2], got[2].prompt_logprobs),
                   (prompts[0], out[0].prompt_logprobs), (prompts[0], drafted[0].prompt_logprobs),
                   (prompts[2], drafted[2].prompt_logprobs)]:
        ref = _prompt_reference(p)
        assert lps[0] is None and len(lps) == len(p)
        for t, e in enumerate(lps[1:]):
            assert e.token_id == p[t + 1] and abs(e.logprob - ref[t, e.token_id]) < 1e-4
            assert [i for i, _ in e.top] == list(np.argsort(-ref[t])[:len(e.top)])
    assert [g.token_ids for g in got] == [c.token_ids for c in plain]
    assert [g.token_ids for g in drafted] == [c.token_ids for c in plain]
    assert len(got[2].prompt_logprobs[1].top) == 0


def test_server_echo_scores_the_prompt(url, engine):
    """echo + logprobs (what evaluation harnesses send for log-likelihoods): the prompt's
    tokens and logprobs (first null), then the completion's; max_tokens 0 scores only."""
    body = {"prompt": "Hello world", "echo": True, "logprobs": 2, "temperature": 0}
    out = requests.post(f"{url}/v1/completions", json={**body, "max_tokens": 3},
                        timeout=60).json()
    ids = engine.encode("Hello world")
    ref = engine.submit(ids, sampling=SamplingParams(temperature=0, logprobs=2,
                                                     prompt_logprobs=2),
                        max_tokens=3).result(timeout=60)
    c = out["choices"][0]
    assert c["text"] == "Hello world" + ref.text
    lp = c["logprobs"]
    assert len(lp["tokens"]) == len(ids) + 3 and lp["token_logprobs"][0] is None
    assert lp["top_logprobs"][0] is None and lp["text_offset"][:2] == [0, 1]
    want = [e.logprob for e in ref.prompt_logprobs[1:]] + [e.logprob for e in ref.logprobs]
    np.testing.assert_allclose(lp["token_logprobs"][1:], want, atol=1e-6)
    only = requests.post(f"{url}/v1/completions", json={**body, "max_tokens": 0},
                         timeout=60).json()
    c = only["choices"][0]
    assert c["text"] == "Hello world" and len(c["logprobs"]["tokens"]) == len(ids)
    assert only["usage"]["completion_tokens"] == 0
    np.testing.assert_allclose(c["logprobs"]["token_logprobs"][1:], want[:len(ids) - 1],
                               atol=1e-6)
    # Streamed, the echoed prompt (with its logprobs) comes first, then the completion's
    # chunks: joined, the same text and logprobs columns as the whole response.
    for whole, max_tokens in ((out, 3), (only, 0)):
        chunks = _stream_chunks(url, {**body, "max_tokens": max_tokens, "stream": True,
                                      "stream_options": {"include_usage": True}})
        choices = [c["choices"][0] for c in chunks if c["choices"]]
        assert "".join(c["text"] for c in choices) == whole["choices"][0]["text"]
        joined = {k: [x for c in choices if c["logprobs"] for x in c["logprobs"][k]]
                  for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
        assert joined == whole["choices"][0]["logprobs"]
        assert choices[0]["text"] == "Hello world" and choices[-1]["finish_reason"]
        assert chunks[-1]["usage"]["completion_tokens"] == max_tokens


def _stream_chunks(url, body):
    with requests.post(f"{url}/v1/completions", json=body, stream=True, timeout=60) as r:
        assert r.status_code == 200, r.text
        lines = [x[6:] for x in r.iter_lines(decode_unicode=True) if x.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(x) for x in lines[:-1]]
