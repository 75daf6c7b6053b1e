"""Structured output: the bitmask applied on device, constraints from OpenAI/vLLM fields,
the engine's constrained decoding (tiny model), the server's response_format, and a JSON
schema on SmolLM2."""

import json
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import jax.numpy as jnp
import numpy as np
import pytest
import requests

from jaxinfer.errors import BadRequestError
from jaxinfer.llm import LLM
from jaxinfer.sampling import GREEDY, SamplingParams
from jaxinfer.server import BackgroundServer, create_app
from jaxinfer.structured import Constraint, Grammars, apply_bitmask, from_openai

from .engine_helpers import CharTokenizer, W, tiny_engine
from .helpers import TINY

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"},
                                           "n": {"type": "integer"}},
          "required": ["ok", "n"], "additionalProperties": False}


def test_apply_bitmask_matches_numpy_unpacking():
    rng = np.random.default_rng(0)
    V = 70  # not a multiple of 32: the last word is partly past the vocabulary
    mask = rng.integers(-2**31, 2**31 - 1, (3, 3), dtype=np.int64).astype(np.int32)
    mask[1] = -1
    logits = rng.normal(size=(3, V)).astype(np.float32)
    got = np.asarray(apply_bitmask(jnp.asarray(logits), jnp.asarray(mask)))
    bits = np.unpackbits(mask.view(np.uint8), axis=1, bitorder="little")[:, :V].astype(bool)
    np.testing.assert_array_equal(got, np.where(bits, logits, -np.inf))
    assert np.array_equal(got[1], logits[1])


@pytest.mark.parametrize("kw", [{}, {"regex": "a", "choice": ["b"]}, {"json_schema": "x"},
                                {"choice": "ab"}, {"choice": ["a", ""]}, {"regex": 3}])
def test_bad_constraints_raise(kw):
    with pytest.raises(BadRequestError):
        Constraint(**kw)


def test_from_openai_fields():
    assert from_openai() is None and from_openai({"type": "text"}) is None
    assert from_openai({"type": "json_object"}) == Constraint(json_object=True)
    rf = {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}
    assert from_openai(rf) == Constraint(json_schema=SCHEMA)
    assert from_openai(guided_json=json.dumps(SCHEMA)) == Constraint(json_schema=SCHEMA)
    assert from_openai(guided_choice=["a", "b"]) == Constraint(choice=("a", "b"))
    assert from_openai(guided_regex="a+") == Constraint(regex="a+")
    for bad in [dict(response_format={"type": "xml"}),
                dict(response_format={"type": "json_schema"}),
                dict(guided_regex="a", guided_choice=["b"])]:
        with pytest.raises(BadRequestError):
            from_openai(**bad)


def _llm() -> LLM:
    return LLM(TINY, W, CharTokenizer())


@pytest.fixture(scope="module")
def engine():
    with tiny_engine(num_slots=4, max_len=256) as eng:
        eng.warmup()
        yield eng


def test_constrained_requests_match_and_do_not_recompile(engine):
    """A regex, a choice and a JSON schema on the tiny random model (whose unconstrained
    text is noise): each output matches, ends as soon as its grammar is complete, and an
    unconstrained neighbour decodes exactly what it decodes alone; no compilations."""
    before = engine.compile_count
    alone = engine.submit("free text", sampling=GREEDY, max_tokens=20).result(timeout=60)
    sampled = SamplingParams(temperature=1.0, seed=3)
    reqs = [engine.submit("id:", sampling=sampled, max_tokens=40,
                          constraint=Constraint(regex=r"[a-c]{3}-[0-9]{2}")),
            engine.submit("pick", sampling=GREEDY, max_tokens=40,
                          constraint=Constraint(choice=("red", "green", "blue sky"))),
            engine.submit("json", sampling=sampled, max_tokens=120,
                          constraint=Constraint(json_schema=SCHEMA)),
            engine.submit("free text", sampling=GREEDY, max_tokens=20)]
    rx, ch, js, free = [r.result(timeout=120) for r in reqs]
    assert re.fullmatch(r"[a-c]{3}-[0-9]{2}", rx.text) and rx.finish_reason == "stop"
    assert len(rx.token_ids) == 6  # one character per token: it stopped when complete
    assert ch.text in ("red", "green", "blue sky") and ch.finish_reason == "stop"
    if js.finish_reason == "stop":  # a random model may ramble inside a string
        obj = json.loads(js.text)
        assert set(obj) == {"ok", "n"} and isinstance(obj["ok"], bool)
    assert free.token_ids == alone.token_ids
    assert engine.compile_count == before


def test_gbnf_grammar_constrains_like_its_lark_twin(engine):
    """A GBNF grammar (llama.cpp's format, what guided_grammar takes from its users too)
    constrains the tiny model as the same grammar written in Lark does."""
    sampled = SamplingParams(temperature=1.0, seed=5)
    gbnf = 'root ::= word "-" [0-9] [0-9]\nword ::= [a-c] [a-c] [a-c]'
    lark = 'start: word "-" /[0-9]/ /[0-9]/\nword: /[a-c]/ /[a-c]/ /[a-c]/'
    got, twin = [engine.submit("id:", sampling=sampled, max_tokens=40,
                               constraint=Constraint(lark=g)).result(timeout=60)
                 for g in (gbnf, lark)]
    assert re.fullmatch(r"[a-c]{3}-[0-9]{2}", got.text) and got.finish_reason == "stop"
    assert got.token_ids == twin.token_ids


@pytest.mark.slow
def test_llama_cpp_grammars_constrain_smollm2(smollm2_checkpoint, llama_cpp_grammars):
    """Every grammar llama.cpp ships (grammars/*.gbnf: arithmetic, C, chess, English,
    Japanese, JSON, a JSON array, a list) compiles against SmolLM2's vocabulary and
    constrains its sampled output: a fresh matcher accepts every token it gave, and a JSON
    answer that finished parses."""
    from llguidance import LLMatcher


    smollm2 = LLM.load(smollm2_checkpoint, dtype=jnp.float32)
    files = sorted(llama_cpp_grammars.glob("*.gbnf"))
    assert {"json.gbnf", "c.gbnf", "chess.gbnf", "list.gbnf"} <= {f.name for f in files}
    ids = smollm2.tokenizer.encode(smollm2.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Write something short."}]))
    constraints = [Constraint(lark=f.read_text()) for f in files]
    got = smollm2.generate([ids] * len(files), max_new_tokens=32, constraint=constraints,
                           sampling=[SamplingParams(temperature=0.8, seed=i)
                                     for i in range(len(files))])
    grammars = Grammars(smollm2.tokenizer, smollm2.cfg.vocab_size,
                        [int(e) for e in smollm2.eos if e >= 0])
    for f, c, g in zip(files, constraints, got, strict=True):
        m = grammars.matcher(c)
        assert isinstance(m, LLMatcher)
        assert m.consume_tokens(g.token_ids) and not m.is_error(), (f.name, g.text)
        if f.name == "json.gbnf" and g.finish_reason == "stop":
            json.loads(g.text)


@pytest.mark.slow
def test_llm_generate_and_stream_take_constraints(engine):
    """LLM.generate (a batch mixing constrained and free rows) and LLM.stream decode under
    a constraint exactly what the engine does, and free rows what they decode alone."""
    llm = _llm()
    sampled = SamplingParams(temperature=1.0, seed=3)
    rows = [("id:", sampled, Constraint(regex=r"[a-c]{3}-[0-9]{2}")),
            ("pick", GREEDY, Constraint(choice=("red", "green", "blue sky"))),
            ("free text", GREEDY, None),
            ("json", sampled, Constraint(json_schema=SCHEMA))]
    got = llm.generate([p for p, _, _ in rows], sampling=[s for _, s, _ in rows],
                       max_new_tokens=[40, 40, 20, 120], constraint=[c for *_, c in rows])
    for (p, sp, c), g, m in zip(rows, got, [40, 40, 20, 120], strict=True):
        ref = engine.submit(p, sampling=sp, max_tokens=m, constraint=c).result(timeout=120)
        assert (g.token_ids, g.text, g.finish_reason) == (
            ref.token_ids, ref.text, ref.finish_reason), p
        out: list = []
        assert "".join(llm.stream(p, sampling=sp, max_new_tokens=m, constraint=c,
                                  result=out)) == ref.text
        assert out[0].token_ids == ref.token_ids and out[0].finish_reason == ref.finish_reason
    assert re.fullmatch(r"[a-c]{3}-[0-9]{2}", got[0].text) and got[0].finish_reason == "stop"
    assert got[1].text in ("red", "green", "blue sky")
    assert got[2].token_ids == llm.generate("free text", sampling=GREEDY,
                                            max_new_tokens=20).token_ids
    with pytest.raises(BadRequestError, match="constraint") as e:
        llm.generate("x", constraint=[Constraint(regex="a")] * 2)
    assert e.value.param == "constraint"
    with pytest.raises(BadRequestError, match="bad constraint"):
        llm.generate("x", constraint=Constraint(regex="(unclosed"))


def test_bad_constraint_is_a_bad_request(engine):
    with pytest.raises(BadRequestError, match="bad constraint"):
        engine.submit("x", constraint=Constraint(regex="(unclosed"))
    with pytest.raises(BadRequestError, match="not a Lark grammar and not valid GBNF"):
        engine.submit("x", constraint=Constraint(lark='root ::= ("a"'))
    # Lark without a plain `start:` line (an inlined ?start) is still Lark
    r = engine.submit("x", sampling=GREEDY, max_tokens=8,
                      constraint=Constraint(lark='?start: "ab" | "cd"')).result(timeout=60)
    assert r.text in ("ab", "cd") and r.finish_reason == "stop"
    with pytest.raises(BadRequestError, match="bad constraint"):
        engine.submit("x", constraint=Constraint(json_schema={"type": "bogus"}))


def test_server_response_format(engine):
    with BackgroundServer(create_app(engine, "tiny")) as srv:
        url = f"{srv.url}/v1/chat/completions"
        msgs = [{"role": "user", "content": "answer"}]
        rf = {"type": "json_schema", "json_schema": {"name": "a", "schema": {
            "type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
            "additionalProperties": False}}}
        out = requests.post(url, json={"messages": msgs, "response_format": rf,
                                       "max_tokens": 60, "temperature": 0}, timeout=60).json()
        c = out["choices"][0]
        if c["finish_reason"] == "stop":
            assert set(json.loads(c["message"]["content"])) == {"ok"}
        out = requests.post(f"{srv.url}/v1/completions", timeout=60, json={
            "prompt": "x", "guided_choice": ["yes", "no"], "max_tokens": 8}).json()
        assert out["choices"][0]["text"] in ("yes", "no")
        for body, param in [({"response_format": {"type": "xml"}}, "response_format"),
                            ({"guided_regex": "(oops"}, "guided_regex"),
                            ({"response_format": {"type": "json_schema", "json_schema": {
                                "schema": {"type": "bogus"}}}}, "response_format")]:
            r = requests.post(url, json={"messages": msgs, **body}, timeout=60)
            assert r.status_code == 400, r.text
            assert r.json()["error"]["param"] == param


def test_grammar_compiles_off_the_event_loop(engine, monkeypatch):
    """A constraint's grammar compiles on a worker thread: while one is stuck compiling,
    the server still answers /health and other completions (on the event loop, this test
    would time out)."""
    compiling, release = threading.Event(), threading.Event()
    real = engine._grammars.matcher

    def slow(constraint):
        compiling.set()
        assert release.wait(60)
        return real(constraint)

    monkeypatch.setattr(engine._grammars, "matcher", slow)
    with BackgroundServer(create_app(engine, "tiny")) as srv, ThreadPoolExecutor(1) as pool:
        stuck = pool.submit(requests.post, f"{srv.url}/v1/completions", timeout=60, json={
            "prompt": "x", "guided_choice": ["yes", "no"], "max_tokens": 8})
        assert compiling.wait(30)
        assert requests.get(f"{srv.url}/health", timeout=10).status_code == 200
        other = requests.post(f"{srv.url}/v1/completions", timeout=30,
                              json={"prompt": "y", "max_tokens": 3}).json()
        assert other["choices"][0]["finish_reason"] in ("stop", "length")
        release.set()
        assert stuck.result().json()["choices"][0]["text"] in ("yes", "no")


@pytest.mark.slow
def test_json_schema_on_smollm2(smollm2_checkpoint):
    """The real model answers a question as JSON that parses and follows the schema."""
    from jaxinfer.engine import Engine, EngineConfig

    smollm2 = LLM.load(smollm2_checkpoint, dtype=jnp.float32)
    schema = {"type": "object", "properties": {"city": {"type": "string"},
                                               "country": {"type": "string"}},
              "required": ["city", "country"], "additionalProperties": False}
    msgs = [{"role": "user", "content": "What is the capital of France? Answer in JSON "
                                        "with the keys city and country."}]
    with Engine.from_llm(smollm2, EngineConfig(num_slots=2, max_len=256)) as eng:
        r = eng.submit(messages=msgs, sampling=GREEDY, max_tokens=64,
                       constraint=Constraint(json_schema=schema)).result(timeout=300)
    assert r.finish_reason == "stop", r.text
    obj = json.loads(r.text)
    assert set(obj) == {"city", "country"} and "Paris" in obj["city"], r.text
    # The library path decodes the same, and a free row beside it is unaffected.
    ids = smollm2.tokenizer.encode(smollm2.tokenizer.apply_chat_template(msgs))
    free = smollm2.generate(ids, sampling=GREEDY, max_new_tokens=24)
    got = smollm2.generate([ids, ids], sampling=GREEDY, max_new_tokens=[64, 24],
                           constraint=[Constraint(json_schema=schema), None])
    assert got[0].token_ids == r.token_ids and got[0].finish_reason == "stop"
    assert got[1].token_ids == free.token_ids
