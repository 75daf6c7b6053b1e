"""The OpenAI-compatible server on loopback: formats, streaming, the OpenAI client, bad
requests (400), a full queue (429), and 64 concurrent streams with /health polled."""

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

from jaxinfer.engine import Engine, EngineConfig
from jaxinfer.sampling import GREEDY, SamplingParams
from jaxinfer.server import BackgroundServer, create_app

from .engine_helpers import CharTokenizer, W, tiny_engine
from .helpers import TINY

MODEL = "tiny"


@pytest.fixture(scope="module")
def engine():
    with tiny_engine(num_slots=8, max_len=256, max_queue=128) as eng:
        eng.warmup()
        yield eng


@pytest.fixture(scope="module")
def url(engine):
    with BackgroundServer(create_app(engine, MODEL)) as srv:
        yield srv.url


def _sse(resp) -> list:
    """Parsed `data:` events of a streamed response; the last must be [DONE]."""
    events = [line[len("data: "):] for line in resp.iter_lines(decode_unicode=True)
              if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    return [json.loads(e) for e in events[:-1]]


def test_health_models_metrics(url, engine):
    assert requests.get(f"{url}/health", timeout=10).json()["status"] == "ok"
    models = requests.get(f"{url}/v1/models", timeout=10).json()
    assert [m["id"] for m in models["data"]] == [MODEL]
    requests.post(f"{url}/v1/completions", json={"prompt": "abc", "max_tokens": 3}, timeout=30)
    r = requests.get(f"{url}/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    for name in ("time_to_first_token_seconds_bucket", "inter_token_latency_seconds_count",
                 "generation_tokens_per_second", "queue_length", "slots_in_use",
                 "prefix_cache_hits_total", "compilations", "requests_total"):
        assert f"jaxinfer_{name}" in r.text, name


def test_completion_and_chat_match_the_engine(url, engine):
    body = {"model": MODEL, "prompt": "Hello there", "max_tokens": 7, "temperature": 0}
    out = requests.post(f"{url}/v1/completions", json=body, timeout=30).json()
    ref = engine.submit("Hello there", sampling=GREEDY, max_tokens=7).result(timeout=30)
    assert out["object"] == "text_completion" and out["choices"][0]["text"] == ref.text
    assert out["usage"] == {"prompt_tokens": 11, "completion_tokens": len(ref.token_ids),
                            "total_tokens": 11 + len(ref.token_ids),
                            "prompt_tokens_details": {"cached_tokens": 0}}
    assert out["metrics"]["ttft_s"] > 0 and "itl_s" in out["metrics"]
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    out = requests.post(f"{url}/v1/chat/completions", timeout=30, json={
        "messages": msgs, "max_tokens": 6, "temperature": 0, "stop": "q"}).json()
    ref = engine.submit(messages=msgs, sampling=GREEDY, max_tokens=6, stop="q").result()
    assert out["object"] == "chat.completion"
    assert out["choices"][0]["message"] == {"role": "assistant", "content": ref.text}
    assert out["choices"][0]["finish_reason"] == ref.finish_reason


def test_vllm_stop_fields_reach_the_engine(url, engine):
    """stop_token_ids, min_tokens, ignore_eos, skip_special_tokens, truncate_prompt_tokens
    and bad_words (vLLM's extensions) mean what they mean in SamplingParams: the server
    answers what the engine gives for the same settings."""
    free = engine.submit("Hello there", sampling=GREEDY, max_tokens=8).result(timeout=30)
    sid = free.token_ids[2]
    word = next(chr(32 + t) for t in free.token_ids[1:] if t < 95 and chr(32 + t) not in "<> ")
    for extra in ({"stop_token_ids": [sid]}, {"stop_token_ids": [sid], "min_tokens": 6},
                  {"ignore_eos": True, "logit_bias": {"3": 100}, "skip_special_tokens": False},
                  {"truncate_prompt_tokens": 3}, {"bad_words": [word]},
                  {"ignore_eos": True, "logit_bias": {"3": 100}}):
        out = requests.post(f"{url}/v1/completions", timeout=30, json={
            "prompt": "Hello there", "max_tokens": 8, "temperature": 0, **extra}).json()
        sp = SamplingParams(temperature=0, **{k: {int(i): b for i, b in v.items()}
                                              if k == "logit_bias" else v
                                              for k, v in extra.items()})
        ref = engine.submit("Hello there", sampling=sp, max_tokens=8).result(timeout=30)
        assert out["choices"][0]["text"] == ref.text
        if "bad_words" in extra:  # it bites
            assert word in free.text and word not in ref.text
        assert out["choices"][0]["finish_reason"] == ref.finish_reason
        assert out["usage"]["completion_tokens"] == len(ref.token_ids)
        assert out["usage"]["prompt_tokens"] == ref.prompt_tokens
    assert ref.token_ids == [3] * 8 and ref.text == ""  # EOS, ignored; special: no text
    stop = free.text[2:4]
    for include in (False, True):
        out = requests.post(f"{url}/v1/completions", timeout=30, json={
            "prompt": "Hello there", "max_tokens": 8, "temperature": 0, "stop": stop,
            "include_stop_str_in_output": include}).json()
        end = free.text.find(stop) + (len(stop) if include else 0)
        assert out["choices"][0]["text"] == free.text[:end], (include, stop)


def test_streaming_events(url):
    body = {"prompt": "Stream me", "max_tokens": 9, "temperature": 0, "seed": 1}
    whole = requests.post(f"{url}/v1/completions", json=body, timeout=30).json()
    with requests.post(f"{url}/v1/completions", json={**body, "stream": True,
                       "stream_options": {"include_usage": True}}, stream=True,
                       timeout=30) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        chunks = _sse(r)
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert text == whole["choices"][0]["text"]
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 9
    with requests.post(f"{url}/v1/chat/completions", stream=True, timeout=30, json={
            "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5,
            "stream": True}) as r:
        chunks = _sse(r)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert len({c["id"] for c in chunks}) == 1


def test_n_choices_and_prompt_batches(url, engine):
    """n choices per prompt and a list of prompts: choice i of prompt p is index p * n + i;
    a seed gives choice i seed + i (choice 0 is what n=1 gives); usage counts each prompt
    once; streaming interleaves the choices, each chunk naming its index."""
    post = lambda body: requests.post(f"{url}/v1/completions", timeout=60,
                                      json={"max_tokens": 6, **body}).json()
    sampled = {"prompt": "Roll", "temperature": 1.0, "seed": 40}
    out = post({**sampled, "n": 3})
    assert [c["index"] for c in out["choices"]] == [0, 1, 2]
    texts = [c["text"] for c in out["choices"]]
    refs = [engine.submit("Roll", sampling=SamplingParams(temperature=1.0, seed=40 + i),
                          max_tokens=6).result(timeout=30).text for i in range(3)]
    assert texts == refs and len(set(texts)) == 3
    assert post(sampled)["choices"][0]["text"] == texts[0]
    assert out["usage"]["prompt_tokens"] == 4 and out["usage"]["completion_tokens"] == 18
    assert len(out["metrics"]) == 3

    batch = post({"prompt": ["Hello", "Bye now"], "n": 2, "temperature": 0, "echo": True})
    singles = [post({"prompt": p, "temperature": 0}) for p in ("Hello", "Bye now")]
    assert [c["text"] for c in batch["choices"]] == [
        p + singles[i // 2]["choices"][0]["text"]
        for i, p in enumerate(("Hello", "Hello", "Bye now", "Bye now"))]
    assert batch["usage"]["prompt_tokens"] == 5 + 7

    with requests.post(f"{url}/v1/completions", stream=True, timeout=60, json={
            **sampled, "n": 3, "max_tokens": 6, "stream": True,
            "stream_options": {"include_usage": True}}) as r:
        chunks = _sse(r)
    streamed = ["".join(c["choices"][0]["text"] for c in chunks
                        if c["choices"] and c["choices"][0]["index"] == i) for i in range(3)]
    assert streamed == texts
    assert chunks[-1]["usage"]["completion_tokens"] == 18
    with requests.post(f"{url}/v1/chat/completions", stream=True, timeout=60, json={
            "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "n": 2,
            "stream": True}) as r:
        chunks = _sse(r)
    roles = [c["choices"][0]["index"] for c in chunks
             if c["choices"][0]["delta"].get("role") == "assistant"]
    assert sorted(roles) == [0, 1]


def test_openai_client(url, engine):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == [MODEL]
    msgs = [{"role": "user", "content": "Name a colour."}]
    ref = engine.submit(messages=msgs, sampling=GREEDY, max_tokens=8).result(timeout=30)
    out = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8,
                                         temperature=0)
    assert out.choices[0].message.content == ref.text
    assert out.usage.completion_tokens == len(ref.token_ids)
    stream = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8,
                                            temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == ref.text
    comp = client.completions.create(model=MODEL, prompt="abc", max_tokens=4, temperature=0,
                                     extra_body={"top_k": 5, "repetition_penalty": 1.1})
    assert comp.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="abc", temperature=-1)


@pytest.mark.parametrize("path,body,param", [
    ("completions", {"max_tokens": 4}, "prompt"),  # missing prompt
    ("completions", {"prompt": 5}, "prompt"),  # wrong type
    ("completions", {"prompt": "x", "max_tokens": "4"}, "max_tokens"),
    ("completions", {"prompt": "x", "temperature": -1}, "temperature"),
    ("completions", {"prompt": "x", "top_p": 2}, "top_p"),
    ("completions", {"prompt": "x", "top_k": -2}, "top_k"),
    ("completions", {"prompt": "x", "presence_penalty": 3}, "presence_penalty"),
    ("completions", {"prompt": "x", "n": 0}, "n"),
    ("completions", {"prompt": "x", "n": 17}, "n"),
    ("completions", {"prompt": ["x"] * 65}, "prompt"),
    ("completions", {"prompt": ["x", ""]}, "prompt"),
    ("completions", {"prompt": "x", "suffix": "y"}, "suffix"),
    ("completions", {"prompt": "x", "max_tokens": 3, "min_tokens": 5}, "min_tokens"),
    ("completions", {"prompt": "x", "stop_token_ids": [-1]}, "stop_token_ids"),
    ("completions", {"prompt": "x", "stop_token_ids": "a"}, "stop_token_ids"),
    ("completions", {"prompt": "x", "stop_token_ids": list(range(40))}, "stop_token_ids"),
    ("completions", {"prompt": "x", "ignore_eos": "yes"}, "ignore_eos"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True,
                          "top_logprobs": 21}, "top_logprobs"),
    ("completions", {"prompt": "x", "logit_bias": {"5": 200}}, "logit_bias"),
    ("completions", {"prompt": "x", "logit_bias": {"x": 1}}, "logit_bias"),
    ("completions", {"prompt": "x", "best_of": 3}, "best_of"),
    ("completions", {"prompt": "x", "best_of": 1, "n": 2}, "best_of"),
    ("completions", {"prompt": "x", "stream": True, "stream_options": {"include_usage": "x"}},
     "stream_options"),
    ("chat/completions", {"messages": [{"role": "user"}]}, "messages.0.content"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"},
                                       {"role": "assistant"}]}, "messages.1.content"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                          "functions": [{"name": "f"}]}, "functions"),  # the legacy form
    ("completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ("completions", {"prompt": "x" * 300}, "prompt"),  # over the 256-token context
    ("completions", {"prompt": "x", "stop": [1]}, "stop"),
    ("completions", {"prompt": "x", "bad_words": [""]}, "bad_words"),
    ("completions", {"prompt": "x", "priority": 1}, "priority"),  # this engine is FCFS
    ("completions", {"prompt": "x", "priority": "high"}, "priority"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "priority": -1},
     "priority"),
    ("chat/completions", {"messages": "hi"}, "messages"),
    ("chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
    ("chat/completions", {"messages": [{"role": "user", "content": "x" * 300}]}, "messages"),
])
def test_bad_requests_get_400(url, path, body, param):
    r = requests.post(f"{url}/v1/{path}", json=body, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param
    assert err["message"] and "code" in err
    if "x" * 300 in json.dumps(body):
        assert err["code"] == "context_length_exceeded"


def test_continue_final_message(url, engine):
    """vLLM's continue_final_message: the assistant's begun reply is continued (no new
    turn is opened), as the engine does with the same chat options; /tokenize agrees."""
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Well"}]
    opts = {"add_generation_prompt": False, "continue_final_message": True}
    out = requests.post(f"{url}/v1/chat/completions", timeout=30, json={
        "messages": msgs, "max_tokens": 6, "temperature": 0,
        "continue_final_message": True}).json()
    ref = engine.submit(messages=msgs, chat_options=opts, sampling=GREEDY,
                        max_tokens=6).result(timeout=30)
    assert out["choices"][0]["message"]["content"] == ref.text
    assert out["usage"]["prompt_tokens"] == len("[user]Hi[assistant]Well")
    r = requests.post(f"{url}/tokenize", timeout=30, json={
        "messages": msgs, "continue_final_message": True}).json()
    assert r["count"] == out["usage"]["prompt_tokens"]
    bad = requests.post(f"{url}/v1/chat/completions", timeout=30, json={
        "messages": msgs, "continue_final_message": True, "add_generation_prompt": True})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "continue_final_message"


def test_tokenize_and_detokenize(url, engine):
    """vLLM's /tokenize counts what the engine would (a prompt, or chat messages through
    the template, as usage reports them); /detokenize inverts it; bad input is a 400."""
    r = requests.post(f"{url}/tokenize", json={"prompt": "Hello there"}, timeout=30).json()
    assert r["tokens"] == engine.encode("Hello there") and r["count"] == 11
    assert r["max_model_len"] == engine.max_len
    back = requests.post(f"{url}/detokenize", json={"tokens": r["tokens"]}, timeout=30).json()
    assert back == {"prompt": "Hello there"}
    msgs = [{"role": "user", "content": "Hi"}]
    r = requests.post(f"{url}/tokenize", json={"messages": msgs}, timeout=30).json()
    chat = requests.post(f"{url}/v1/chat/completions", timeout=30,
                         json={"messages": msgs, "max_tokens": 1}).json()
    assert r["count"] == chat["usage"]["prompt_tokens"]
    for path, body, param in [("tokenize", {}, "prompt"),
                              ("tokenize", {"prompt": "x", "messages": msgs}, "prompt"),
                              ("tokenize", {"prompt": ""}, "prompt"),
                              ("tokenize", {"messages": []}, "messages"),
                              ("detokenize", {"tokens": [-1]}, "tokens"),
                              ("detokenize", {"tokens": "ab"}, "tokens")]:
        r = requests.post(f"{url}/{path}", json=body, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)


def test_not_json_and_unknown_model(url):
    r = requests.post(f"{url}/v1/completions", data="{nope",
                      headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = requests.post(f"{url}/v1/completions", json={"prompt": "x", "model": "gpt-9"},
                      timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_queue_full_gets_429():
    class NoEos(CharTokenizer):
        eos_ids = ()

    cfg = EngineConfig(num_slots=1, max_len=512, max_queue=1, prefix_cache_mb=0)
    with Engine(W, TINY.replace(eos_token_ids=()), NoEos(), cfg) as eng, \
            BackgroundServer(create_app(eng, MODEL)) as srv:
        busy = eng.submit([5, 6, 7], sampling=GREEDY, max_tokens=500)
        next(iter(busy))  # decoding in the only slot
        waiting = eng.submit([5, 6], sampling=GREEDY, max_tokens=500)  # fills the queue
        r = requests.post(f"{srv.url}/v1/completions", json={"prompt": "x"}, timeout=30)
        assert r.status_code == 429, r.text
        assert r.json()["error"]["code"] == "queue_full"
        assert requests.get(f"{srv.url}/health", timeout=10).status_code == 200
        waiting.cancel()
        busy.cancel()
        r = requests.post(f"{srv.url}/v1/completions", json={"prompt": "x", "max_tokens": 2},
                          timeout=30)
        assert r.status_code == 200


def test_client_disconnect_frees_the_slot():
    class NoEos(CharTokenizer):
        eos_ids = ()

    # Long enough that the request cannot finish on its own before the server notices the
    # disconnect, even on a loaded machine (500 tokens once did, under two test workers).
    cfg = EngineConfig(num_slots=2, max_len=4096, prefix_cache_mb=0)
    with Engine(W, TINY.replace(eos_token_ids=(), max_seq_len=4096), NoEos(), cfg) as eng, \
            BackgroundServer(create_app(eng, MODEL)) as srv:
        r = requests.post(f"{srv.url}/v1/completions", stream=True, timeout=30,
                          json={"prompt": "abc", "max_tokens": 4000, "stream": True})
        next(r.iter_lines())
        assert eng.slots_in_use == 1
        r.close()
        deadline = time.monotonic() + 20
        while eng.slots_in_use and time.monotonic() < deadline:
            time.sleep(0.02)
        assert eng.slots_in_use == 0 and eng.metrics.requests["cancelled"] == 1


def test_64_concurrent_streams_with_health(url, engine):
    """64 streaming requests at once; greedy ones must equal the offline engine's text,
    seeded ones must equal a second, non-streamed run; /health answers throughout."""
    rng = np.random.default_rng(1)
    jobs = []
    for i in range(64):
        prompt = f"request {i}: " + "".join(chr(97 + c) for c in rng.integers(0, 26, i % 23))
        greedy = i % 2 == 0
        jobs.append({"prompt": prompt, "max_tokens": 4 + i % 5, "stream": True,
                     **({"temperature": 0} if greedy else {"temperature": 0.8, "seed": i})})
    health, stop = [], threading.Event()

    def poll():
        while not stop.is_set():
            t = time.perf_counter()
            code = requests.get(f"{url}/health", timeout=10).status_code
            health.append((code, time.perf_counter() - t))
            time.sleep(0.05)

    def run(body):
        with requests.post(f"{url}/v1/completions", json=body, stream=True, timeout=120) as r:
            assert r.status_code == 200, r.text
            chunks = _sse(r)
        assert len({c["id"] for c in chunks}) == 1
        return "".join(c["choices"][0]["text"] for c in chunks), chunks[-1]

    poller = threading.Thread(target=poll)
    poller.start()
    t0 = time.perf_counter()
    try:
        with ThreadPoolExecutor(64) as pool:
            outs = list(pool.map(run, jobs))
    finally:
        stop.set()
        poller.join()
    dt = time.perf_counter() - t0
    ids = {last["id"] for _, last in outs}
    assert len(ids) == 64  # none lost, none duplicated
    for job, (text, last) in zip(jobs, outs, strict=True):
        sp = (GREEDY if job["temperature"] == 0
              else SamplingParams(temperature=job["temperature"], seed=job["seed"]))
        ref = engine.submit(job["prompt"], sampling=sp, max_tokens=job["max_tokens"]).result()
        assert text == ref.text, job
        assert last["choices"][0]["finish_reason"] == ref.finish_reason
    assert health and all(code == 200 for code, _ in health)
    print(f"64 streams in {dt:.2f} s; /health polled {len(health)} times, "
          f"max {max(s for _, s in health) * 1e3:.0f} ms")


# ---- the real model ---------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_64_openai_client_streams(smollm2_checkpoint):
    """64 concurrent streamed chat requests from the OpenAI client against SmolLM2: each
    equals the offline engine's output for the same request (greedy and seeded)."""
    openai = pytest.importorskip("openai")
    import jax.numpy as jnp

    from jaxinfer.llm import LLM

    llm = LLM.load(smollm2_checkpoint, dtype=jnp.float32)
    topics = ["the moon", "Paris", "cats", "rain", "JAX", "bread", "the sea", "music"]
    jobs = [{"messages": [{"role": "user", "content": f"One word about {topics[i % 8]} ({i})"}],
             "max_tokens": 3 + i % 3, **({"temperature": 0} if i % 2 == 0 else
                                          {"temperature": 0.8, "seed": i})}
            for i in range(64)]
    cfg = EngineConfig(num_slots=16, max_len=128)
    with Engine.from_llm(llm, cfg) as eng, \
            BackgroundServer(create_app(eng, "smollm2")) as srv:
        def run(job):
            client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0)
            stream = client.chat.completions.create(model="smollm2", stream=True, **job)
            chunks = list(stream)
            return ("".join(c.choices[0].delta.content or "" for c in chunks if c.choices),
                    chunks[-1].choices[0].finish_reason, {c.id for c in chunks})

        t0 = time.perf_counter()
        with ThreadPoolExecutor(64) as pool:
            outs = list(pool.map(run, jobs))
        dt = time.perf_counter() - t0
        offline = [eng.submit(messages=j["messages"], max_tokens=j["max_tokens"],
                              sampling=SamplingParams(temperature=j["temperature"],
                                                      seed=j.get("seed")))
                   for j in jobs]
        for job, (text, reason, ids), ref in zip(jobs, outs, offline, strict=True):
            res = ref.result(timeout=300)
            assert (text, reason) == (res.text, res.finish_reason), job
            assert len(ids) == 1
        assert len({next(iter(ids)) for _, _, ids in outs}) == 64
        assert eng.metrics.prefix_hits > 0
    print(f"64 SmolLM2 streams via the OpenAI client in {dt:.1f} s")


@pytest.mark.parametrize("port", ["taken", "-1", "70000"])
def test_serve_script_refuses_a_port_before_loading(port, tmp_path):
    """serve.py binds before it loads the model: a port in use or out of range is one
    error line naming it and exit 2, with no model loaded (the checkpoint does not even
    exist) rather than a uvicorn exit after loading and warm-up."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        p = str(held.getsockname()[1]) if port == "taken" else port
        r = subprocess.run(
            [sys.executable, str(Path(__file__).parents[1] / "scripts" / "serve.py"),
             f"--port={p}", f"--checkpoint={tmp_path / 'never-read'}"],
            capture_output=True, text=True, timeout=120,
            env=dict(os.environ, JAX_PLATFORMS="cpu"))
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith("error:") and p in lines[0], lines
    assert "never-read" not in r.stderr


@pytest.mark.slow
def test_serve_script_stops_on_ctrl_c_with_status_0(smollm2_checkpoint):
    """Ctrl-C is how a server is stopped: uvicorn shuts down in order and the script exits
    0 with no `error:` line (the other scripts' `error: interrupted` / 130 is for work cut
    short)."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = subprocess.Popen([sys.executable, str(Path(__file__).parents[1] / "scripts" /
                                              "serve.py"), f"--port={port}", "--nowarmup"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and p.poll() is None:
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=5).ok:
                    break
            except requests.ConnectionError:
                time.sleep(0.5)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
    finally:
        p.kill()
    assert p.returncode == 0, err
    assert "error:" not in err and "Traceback" not in err, err
    assert "Shutting down" in err


def test_api_key(engine):
    """With an API key every /v1/ endpoint wants `Authorization: Bearer <key>`: without
    it, or with another key, a 401 in OpenAI's error shape; the OpenAI client sends it as
    api_key. As in vLLM, the paths outside /v1/ (probes, metrics, /tokenize) stay open."""
    import openai

    with BackgroundServer(create_app(engine, MODEL, api_key="s3cret")) as srv:
        # ignore_eos: the random tiny model, sampling, may draw its EOS first
        body = {"model": MODEL, "prompt": "ab", "max_tokens": 2, "ignore_eos": True}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = requests.post(f"{srv.url}/v1/completions", json=body, headers=headers,
                              timeout=30)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert requests.get(srv.url + "/v1/models", timeout=30).status_code == 401
        assert requests.post(srv.url + "/v1/embeddings", json={"model": MODEL, "input": "ab"},
                             timeout=30).status_code == 401
        tok = requests.post(srv.url + "/tokenize", json={"prompt": "ab"}, timeout=30)
        assert tok.status_code == 200 and tok.json()["count"] >= 1
        assert requests.post(srv.url + "/detokenize", json={"tokens": tok.json()["tokens"]},
                             timeout=30).json()["prompt"] == "ab"
        assert requests.get(srv.url + "/health", timeout=30).status_code == 200
        assert requests.get(srv.url + "/metrics", timeout=30).status_code == 200
        assert requests.get(srv.url + "/version", timeout=30).json()["version"]
        ok = requests.post(f"{srv.url}/v1/completions", json=body, timeout=30,
                           headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="s3cret")
        assert client.completions.create(model=MODEL, prompt="ab", max_tokens=2).choices
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url + "/v1", api_key="nope").models.list()


def test_priority_field_under_the_priority_policy():
    """vLLM's `priority` field reaches the engine of a server built with the priority
    policy (completions, chat and responses take it); 0 is always accepted."""
    with tiny_engine(num_slots=2, max_len=256, scheduling_policy="priority") as eng, \
            BackgroundServer(create_app(eng, MODEL)) as srv:
        for path, body in [("completions", {"prompt": "ab"}),
                           ("chat/completions", {"messages": [{"role": "user",
                                                               "content": "hi"}]}),
                           ("responses", {"input": "hi"})]:
            for prio in (-3, 0, 7):
                r = requests.post(f"{srv.url}/v1/{path}", timeout=60, json={
                    "model": MODEL, "max_tokens" if path != "responses"
                    else "max_output_tokens": 2, "priority": prio, **body})
                assert r.status_code == 200, r.text


def test_cors_allowed_origins(engine):
    """Browsers may call the server only from allowed origins (none by default); a
    preflight is answered before the API key is asked for, the call itself still needs it."""
    origin = "http://ui.example"
    pre = {"Origin": origin, "Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "authorization,content-type"}
    with BackgroundServer(create_app(engine, MODEL)) as srv:
        r = requests.options(f"{srv.url}/v1/completions", headers=pre, timeout=30)
        assert "access-control-allow-origin" not in r.headers
    with BackgroundServer(create_app(engine, MODEL, api_key="k",
                                     allowed_origins=[origin])) as srv:
        r = requests.options(f"{srv.url}/v1/completions", headers=pre, timeout=30)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin
        r = requests.options(f"{srv.url}/v1/completions", timeout=30,
                             headers=dict(pre, Origin="http://elsewhere.example"))
        assert r.headers.get("access-control-allow-origin") != "http://elsewhere.example"
        body = {"model": MODEL, "prompt": "ab", "max_tokens": 2}
        r = requests.post(f"{srv.url}/v1/completions", json=body, timeout=30,
                          headers={"Origin": origin, "Authorization": "Bearer k"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin
        r = requests.post(f"{srv.url}/v1/completions", json=body, timeout=30,
                          headers={"Origin": origin})
        assert r.status_code == 401
