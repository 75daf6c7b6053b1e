"""Reasoning parsers (<think>...</think> -> reasoning_content): whole outputs, every way of
cutting them into stream deltas, and the server's chat answers with and without tools."""

import json
import random

import pytest
import requests

from jaxinfer.engine import Engine, EngineConfig
from jaxinfer.errors import BadRequestError
from jaxinfer.reasoning import ReasoningParser
from jaxinfer.server import BackgroundServer, create_app

from .engine_helpers import W
from .helpers import TINY
from .test_tool_calls import HERMES_CALL, TOOLS, USER, ToolTemplateTokenizer

TEXTS = ["<think>\nplan: say hi\n</think>\n\nHello!", "<think>still thinking",
         "no thoughts at all", "<thing> is not a thought</think>", "",
         "</think>only an end", "<think></think>x"]


@pytest.mark.parametrize("name, text, want", [
    ("qwen3", TEXTS[0], ("\nplan: say hi\n", "\n\nHello!")),
    ("qwen3", TEXTS[2], (None, TEXTS[2])),  # thinking off: no <think>, no </think>
    ("qwen3", TEXTS[1], ("still thinking", "")),  # cut short while thinking
    ("deepseek_r1", "plan</think>Answer", ("plan", "Answer")),  # <think> was in the prompt
    ("deepseek_r1", "still thinking", ("still thinking", "")),  # cut short
    ("deepseek_r1", TEXTS[0], ("\nplan: say hi\n", "\n\nHello!")),
])
def test_split(name, text, want):
    assert ReasoningParser(name).split(text) == want


@pytest.mark.parametrize("name", ["qwen3", "deepseek_r1"])
@pytest.mark.parametrize("text", TEXTS)
def test_stream_equals_the_whole_split(name, text):
    """Character by character and in random pieces, the deltas add up to the split of
    the whole text, and no delta mixes the two fields."""
    parser = ReasoningParser(name)
    want_r, want_c = parser.split(text)
    rng = random.Random(0)
    cuts = [list(text)] + [
        _pieces(text, rng) for _ in range(20)]
    for pieces in cuts:
        stream = parser.stream()
        deltas = [d for p in pieces for d in stream.feed(p)] + stream.finish()
        assert all(len(d) == 1 and next(iter(d.values())) for d in deltas)
        got_r = "".join(d.get("reasoning_content", "") for d in deltas)
        got_c = "".join(d.get("content", "") for d in deltas)
        assert (got_r, got_c) == (want_r or "", want_c), pieces


def _pieces(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, 4))) if len(text) > 1 \
        else []
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


def test_constrained_output_is_reasoning_only_after_think():
    """deepseek_r1 reads unmarked output as reasoning (its <think> is in the prompt), but a
    grammar-constrained answer (a forced tool call) has no room for one."""
    r1 = ReasoningParser("deepseek_r1")
    assert r1.split('{"unit":"c"}') == ('{"unit":"c"}', "")
    assert r1.constrained().split('{"unit":"c"}') == (None, '{"unit":"c"}')
    assert r1.constrained().split("<think>a</think>b") == ("a", "b")


def test_unknown_parser():
    with pytest.raises(BadRequestError, match="'o1'"):
        ReasoningParser("o1")


@pytest.fixture(scope="module", params=["qwen3", "deepseek_r1"])
def url(request):
    with Engine(W, TINY, ToolTemplateTokenizer(),
                EngineConfig(num_slots=2, max_len=256, prefix_cache_mb=8.0)) as eng, \
            BackgroundServer(create_app(eng, "tiny", tool_call_parser="hermes",
                                        reasoning_parser=request.param)) as srv:
        yield srv.url


def test_forced_tool_call_is_not_reasoning(url):
    out = requests.post(f"{url}/v1/chat/completions", timeout=60, json={
        "messages": USER, "max_tokens": 60, "temperature": 0, "tools": TOOLS,
        "tool_choice": {"type": "function", "function": {"name": "get_unit"}}}).json()
    msg = out["choices"][0]["message"]
    assert msg["reasoning_content"] is None and msg["tool_calls"][0]["function"]["name"] \
        == "get_unit"


@pytest.mark.parametrize("tools", [False, True])
def test_server_splits_reasoning_from_the_answer(url, tools):
    """A guided choice makes the tiny model think, answer and (with tools) call; plain and
    streamed answers carry the same reasoning_content, content and tool call."""
    text = "<think>plan</think>Hi! " + (HERMES_CALL if tools else "there")
    body = {"messages": USER, "max_tokens": 150, "temperature": 0, "guided_choice": [text],
            **({"tools": TOOLS, "tool_choice": "auto"} if tools else {})}
    out = requests.post(f"{url}/v1/chat/completions", json=body, timeout=60).json()
    msg = out["choices"][0]["message"]
    assert msg["reasoning_content"] == "plan"
    assert msg["content"] == ("Hi! " if tools else "Hi! there")
    assert out["choices"][0]["finish_reason"] == ("tool_calls" if tools else "stop")
    r = requests.post(f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=60)
    events = [json.loads(x[6:]) for x in r.iter_lines(decode_unicode=True)
              if x.startswith("data: ") and x != "data: [DONE]"]
    deltas = [e["choices"][0]["delta"] for e in events]
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == "plan"
    assert "".join(d.get("content") or "" for d in deltas) == msg["content"]
    calls = [c for d in deltas for c in d.get("tool_calls", [])]
    assert [c["function"] for c in calls] == [c["function"] for c in msg.get("tool_calls", [])]
    assert events[-1]["choices"][0]["finish_reason"] == out["choices"][0]["finish_reason"]


def test_batch_lines_use_the_parsers(tmp_path):
    """run_batch with the server's parsers: a chat line's answer is split the same way."""
    from jaxinfer.batch import run_batch

    text = "<think>plan</think>Hi! " + HERMES_CALL
    line = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {
        "messages": USER, "max_tokens": 150, "temperature": 0, "guided_choice": [text],
        "tools": TOOLS}}
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps(line) + "\n")
    with Engine(W, TINY, ToolTemplateTokenizer(),
                EngineConfig(num_slots=2, max_len=256, prefix_cache_mb=8.0)) as eng:
        run_batch(eng, src, tmp_path / "out.jsonl", progress=False,
                  tool_call_parser="hermes", reasoning_parser="deepseek_r1")
    body = json.loads((tmp_path / "out.jsonl").read_text())["response"]["body"]
    msg = body["choices"][0]["message"]
    assert (msg["reasoning_content"], msg["content"]) == ("plan", "Hi! ")
    assert msg["tool_calls"][0]["function"]["name"] == "get_weather"
    assert body["choices"][0]["finish_reason"] == "tool_calls"


@pytest.mark.parametrize("tools", [False, True])
def test_responses_api_returns_a_reasoning_item(url, tools):
    """The Responses API gives the reasoning as a `reasoning` item (reasoning_text), then the
    message and calls; streamed, the official client's final response is the same."""
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    text = "<think>plan</think>Hi! " + (HERMES_CALL if tools else "there")
    kw = dict(model="tiny", input="Weather in Paris?", max_output_tokens=150, temperature=0,
              extra_body={"guided_choice": [text]},
              **({"tools": [{"type": "function", **t["function"]} for t in TOOLS]}
                 if tools else {}))
    plain = client.responses.create(**kw)
    with client.responses.stream(**kw) as stream:
        types = [ev.type for ev in stream]
        final = stream.get_final_response()

    def shape(r):
        return [(o.type, o.content[0].text if o.type in ("reasoning", "message") else o.name)
                for o in r.output]

    want = [("reasoning", "plan"), ("message", "Hi! " if tools else "Hi! there")]
    assert shape(plain) == shape(final) == want + ([("function_call", "get_weather")]
                                                   if tools else [])
    assert "response.reasoning_text.delta" in types and types[-1] == "response.completed"
    r = requests.post(f"{url}/v1/responses", timeout=30,
                      json={"input": "x", "top_logprobs": 2, "max_output_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"
