"""Beam search through the server (vLLM's use_beam_search; n is the beam width): the
choices are LLM.beam_search's beams (which equal Hugging Face's, tests/test_beam_search.py),
other requests keep being served, and what a beam search cannot honour is a 400."""

import threading

import pytest
import requests

from jaxinfer.engine import Engine, EngineConfig
from jaxinfer.llm import LLM
from jaxinfer.sampling import GREEDY
from jaxinfer.server import BackgroundServer, create_app

from .engine_helpers import CharTokenizer, W
from .helpers import TINY

MODEL = "tiny"


@pytest.fixture(scope="module")
def llm():
    return LLM(TINY, W, CharTokenizer())


@pytest.fixture(scope="module")
def engine(llm):
    with Engine.from_llm(llm, EngineConfig(num_slots=2, max_len=128)) as eng:
        yield eng


@pytest.fixture(scope="module")
def url(engine):
    with BackgroundServer(create_app(engine, MODEL)) as srv:
        yield srv.url


def _shape(out):
    return [(s.text, s.finish_reason) for s in out.sequences]


def test_completion_beams_equal_llm_beam_search(url, llm):
    body = {"prompt": ["Hello there", "abc"], "max_tokens": 8, "n": 3,
            "use_beam_search": True}
    out = requests.post(f"{url}/v1/completions", json=body, timeout=120).json()
    want = llm.beam_search([CharTokenizer().encode(p) for p in body["prompt"]],
                           beam_width=3, max_new_tokens=8)
    got = [(c["text"], c["finish_reason"]) for c in out["choices"]]
    assert got == _shape(want[0]) + _shape(want[1])
    assert [c["index"] for c in out["choices"]] == list(range(6))
    assert out["usage"]["prompt_tokens"] == 11 + 3
    assert out["usage"]["completion_tokens"] == sum(
        len(s.token_ids) for w in want for s in w.sequences)


def test_chat_beams_with_length_penalty(url, llm, engine):
    msgs = [{"role": "user", "content": "Hi"}]
    body = {"messages": msgs, "max_tokens": 6, "n": 2, "use_beam_search": True,
            "length_penalty": 0.5, "early_stopping": True}
    out = requests.post(f"{url}/v1/chat/completions", json=body, timeout=120).json()
    want = llm.beam_search(engine.encode(messages=msgs), beam_width=2, max_new_tokens=6,
                           length_penalty=0.5, early_stopping=True)
    assert [(c["message"]["content"], c["finish_reason"]) for c in out["choices"]] == \
        _shape(want)


def test_other_requests_are_served_alongside(url, engine):
    """A beam search runs between the engine's turns: a request submitted meanwhile still
    gets the answer it gets alone."""
    ref = engine.submit("Hello", sampling=GREEDY, max_tokens=12).result(timeout=60)
    beams = threading.Thread(target=requests.post, args=(f"{url}/v1/completions",), kwargs=dict(
        json={"prompt": "xyz", "max_tokens": 32, "n": 4, "use_beam_search": True},
        timeout=120))
    beams.start()
    out = requests.post(f"{url}/v1/completions", timeout=120, json={
        "prompt": "Hello", "max_tokens": 12, "temperature": 0}).json()
    beams.join()
    assert out["choices"][0]["text"] == ref.text


@pytest.mark.parametrize("path, body, param", [
    ("completions", {"stream": True}, "stream"),
    ("completions", {"stop": ["x"]}, "stop"),
    ("completions", {"logprobs": 2}, "logprobs"),
    ("completions", {"echo": True}, "echo"),
    ("completions", {"length_penalty": "long"}, "length_penalty"),
    ("completions", {"max_tokens": 500}, "prompt"),  # over the 128-token context
    ("completions", {"temperature": -1}, "temperature"),
    ("completions", {"min_tokens": 3}, "min_tokens"),
    ("completions", {"logit_bias": {"5": 3}}, "logit_bias"),
    ("chat/completions", {"response_format": {"type": "json_object"}}, "response_format"),
])
def test_what_beam_search_cannot_honour_is_400(url, path, body, param):
    base = ({"prompt": "x"} if path == "completions"
            else {"messages": [{"role": "user", "content": "x"}]})
    r = requests.post(f"{url}/v1/{path}", timeout=30,
                      json={**base, "use_beam_search": True, "n": 2, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_beam_fields_without_beam_search_and_elsewhere(url):
    r = requests.post(f"{url}/v1/completions", timeout=30,
                      json={"prompt": "x", "length_penalty": 0.5})
    assert r.status_code == 400 and r.json()["error"]["param"] == "length_penalty"
    r = requests.post(f"{url}/v1/responses", timeout=30,
                      json={"input": "x", "use_beam_search": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "use_beam_search"


@pytest.mark.slow
def test_smollm2_server_beams_equal_the_library(smollm2_checkpoint):
    """On the real model the server's beams are LLM.beam_search's, which equal Hugging
    Face's generate(num_beams=...) (tests/test_beam_search.py)."""
    import jax.numpy as jnp

    big = LLM.load(smollm2_checkpoint, dtype=jnp.float32)
    msgs = [{"role": "user", "content": "Name a colour."}]
    with Engine.from_llm(big, EngineConfig(num_slots=2, max_len=256)) as eng, \
            BackgroundServer(create_app(eng, "smollm2")) as srv:
        out = requests.post(f"{srv.url}/v1/chat/completions", timeout=300, json={
            "messages": msgs, "max_tokens": 16, "n": 3, "use_beam_search": True}).json()
        want = big.beam_search(eng.encode(messages=msgs), beam_width=3, max_new_tokens=16)
    assert [(c["message"]["content"], c["finish_reason"]) for c in out["choices"]] == \
        _shape(want)
    print("SmolLM2 beams:", [c["message"]["content"] for c in out["choices"]])


def test_run_exclusive(llm):
    """A job runs on the device thread and hands back its result or its exception; a
    closed engine refuses new jobs."""
    from jaxinfer.engine import EngineClosedError

    eng = Engine.from_llm(llm, EngineConfig(num_slots=1, max_len=64))
    with eng:
        assert eng.run_exclusive(lambda: threading.current_thread().name).result(30) == \
            "jaxinfer-engine"
        with pytest.raises(ZeroDivisionError):
            eng.run_exclusive(lambda: 1 / 0).result(30)
        req = eng.submit("abc", sampling=GREEDY, max_tokens=4)  # the loop goes on
        assert req.result(timeout=60).finish_reason in ("stop", "length")
    with pytest.raises(EngineClosedError):
        eng.run_exclusive(lambda: None)
