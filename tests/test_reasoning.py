"""Reasoning parsers (<think>...</think> -> reasoning_content): whole outputs, every way of
cutting them into stream deltas, and the server's chat answers with and without tools."""

import json
import random

import pytest
import requests

from jaxinfer.errors import BadRequestError
from jaxinfer.reasoning import ReasoningParser
from jaxinfer.server import BackgroundServer, create_app

from .engine_helpers import tool_engine
from .test_tool_calls import HERMES_CALL, TOOLS, USER

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


@pytest.mark.parametrize("name", ["qwen3", "deepseek_r1", "minimax_m2"])
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
    with tool_engine(num_slots=2) as eng, \
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
    with tool_engine(num_slots=2) as eng:
        run_batch(eng, src, tmp_path / "out.jsonl", progress=False,
                  tool_call_parser="hermes", reasoning_parser="deepseek_r1")
    body = json.loads((tmp_path / "out.jsonl").read_text())["response"]["body"]
    msg = body["choices"][0]["message"]
    assert (msg["reasoning_content"], msg["content"]) == ("plan", "Hi! ")
    assert msg["tool_calls"][0]["function"]["name"] == "get_weather"
    assert body["choices"][0]["finish_reason"] == "tool_calls"


@pytest.mark.parametrize("tools", [False, True])
def test_messages_api_returns_a_thinking_block(url, tools):
    """Anthropic's Messages API gives the reasoning as a thinking block, then the text and
    (with tools) a tool_use block; streamed, Anthropic's client builds the same message."""
    anthropic = pytest.importorskip("anthropic")
    client = anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0)
    text = "<think>plan</think>Hi! " + (HERMES_CALL if tools else "there")
    kw = dict(model="tiny", messages=USER, max_tokens=150,
              extra_body={"guided_choice": [text], "temperature": 0},
              **({"tools": [{"name": t["function"]["name"],
                             "input_schema": t["function"]["parameters"]} for t in TOOLS]}
                 if tools else {}))
    plain = client.messages.create(**kw)
    with client.messages.stream(**kw) as stream:
        final = stream.get_final_message()

    def shape(m):
        return [(b.type, b.thinking if b.type == "thinking" else b.text if b.type == "text"
                 else (b.name, b.input)) for b in m.content]

    want = [("thinking", "plan"), ("text", "Hi! " if tools else "Hi! there")]
    assert shape(plain) == shape(final) == want + (
        [("tool_use", ("get_weather", {"city": "Paris"}))] if tools else [])
    assert plain.stop_reason == final.stop_reason == ("tool_use" if tools else "end_turn")


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


# gpt-oss's harmony format (openai_gptoss + the openai tool parser): analysis is reasoning,
# final the answer, a message to=functions.NAME a call.
HARMONY = [
    "<|channel|>analysis<|message|>User asks weather.<|end|><|start|>assistant<|channel|>final"
    "<|message|>It is sunny.",
    "<|channel|>analysis<|message|>Need the tool.<|end|><|start|>assistant to=functions."
    'get_weather<|channel|>commentary json<|message|>{"city": "Paris"}<|call|>',
    "<|channel|>analysis<|message|>Need it.<|end|><|start|>assistant<|channel|>commentary "
    'to=functions.get_unit <|constrain|>json<|message|>{"unit": "c"}',  # recipient after
    "<|channel|>analysis<|message|>cut short",
    "<|channel|>analysis<|message|>a<|end|><|start|>assist",  # cut inside the next header
    '{"unit": "c"}',  # a grammar fixed the format: all content
]


@pytest.mark.parametrize("text, want", [
    (HARMONY[0], ("User asks weather.", "It is sunny.", [])),
    (HARMONY[1], ("Need the tool.", None, [("get_weather", {"city": "Paris"})])),
    (HARMONY[2], ("Need it.", None, [("get_unit", {"unit": "c"})])),
    (HARMONY[3], ("cut short", "", [])),
    (HARMONY[4], ("a", "", [])),
    (HARMONY[5], (None, '{"unit": "c"}', [])),
])
def test_harmony_split_and_calls(text, want):
    from jaxinfer.tool_calls import ToolCalling

    reasoning, content = ReasoningParser("openai_gptoss").split(text)
    content, calls = ToolCalling.from_request(TOOLS, "auto", parser="openai").parse(content)
    assert (reasoning, content,
            [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]
            ) == want


@pytest.mark.parametrize("text", HARMONY)
def test_harmony_stream_equals_the_whole_split(text):
    parser = ReasoningParser("openai_gptoss")
    want_r, want_c = parser.split(text)
    rng = random.Random(0)
    for pieces in [list(text)] + [_pieces(text, rng) for _ in range(20)]:
        stream = parser.stream()
        deltas = [d for p in pieces for d in stream.feed(p)] + stream.finish()
        assert all(len(d) == 1 and next(iter(d.values())) for d in deltas)
        assert ("".join(d.get("reasoning_content", "") for d in deltas),
                "".join(d.get("content", "") for d in deltas)) == (want_r or "", want_c)


def test_minimax_m2_reads_what_its_template_writes(llama_cpp_vocabs, smollm2_checkpoint):
    """MiniMax-M2's own chat template opens <think> in the prompt and writes an assistant
    turn's reasoning, text and calls; read back past the prompt by the minimax_m2 reasoning
    and tool-call parsers, they are the same."""
    from jaxinfer.tokenizer import load_tokenizer
    from jaxinfer.tool_calls import ToolCalling

    tok = load_tokenizer(smollm2_checkpoint / "tokenizer")
    tok.set_chat_template((llama_cpp_vocabs / "templates" / "MiniMax-M2.jinja")
                          .read_text(encoding="utf-8"))
    prompt = tok.apply_chat_template(USER, tools=TOOLS)
    assert prompt.endswith("<think>\n")
    turn = {"role": "assistant", "content": "Let me check.",
            "reasoning_content": "The user wants the weather.", "tool_calls": [
                {"id": "a", "type": "function",
                 "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}},
                {"id": "b", "type": "function",
                 "function": {"name": "get_unit", "arguments": {"unit": "c"}}}]}
    full = tok.apply_chat_template(USER + [turn], tools=TOOLS, add_generation_prompt=False)
    assert full.startswith(prompt)
    answer = full[len(prompt):].split("[e~[")[0]
    thought, rest = ReasoningParser("minimax_m2").split(answer)
    content, calls = ToolCalling.from_request(TOOLS, "auto", parser="minimax_m2").parse(rest)
    assert thought.strip() == "The user wants the weather."
    assert content.strip() == "Let me check."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] \
        == [("get_weather", {"city": "Oslo"}), ("get_unit", {"unit": "c"})]


def test_harmony_reads_what_gpt_oss_template_writes(llama_cpp_vocabs, smollm2_checkpoint):
    """gpt-oss's own chat template (llama.cpp's models/templates) writes an assistant turn
    with its reasoning and an answer, or a call: read back past the prompt, they are the
    same reasoning, answer and call."""
    from jaxinfer.tokenizer import load_tokenizer
    from jaxinfer.tool_calls import ToolCalling

    tok = load_tokenizer(smollm2_checkpoint / "tokenizer")
    tok.set_chat_template((llama_cpp_vocabs / "templates" / "openai-gpt-oss-120b.jinja")
                          .read_text(encoding="utf-8"))
    tools = [{"type": "function", "function": {**t["function"], "description": "A tool."}}
             for t in TOOLS]  # this template wants descriptions
    prompt = tok.apply_chat_template(USER, tools=tools)
    assert prompt.endswith("<|start|>assistant")
    tc = ToolCalling.from_request(tools, "auto", parser="openai")
    call = {"id": "c1", "type": "function",
            "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    for turn, want in [
            ({"role": "assistant", "thinking": "Think.", "content": "Sunny."},
             ("Think.", "Sunny.", [])),
            ({"role": "assistant", "thinking": "Use it.", "content": "", "tool_calls": [call]},
             ("Use it.", None, [("get_weather", {"city": "Paris"})]))]:
        full = tok.apply_chat_template(USER + [turn], tools=tools, add_generation_prompt=False)
        assert full.startswith(prompt)
        answer = full[len(prompt):].removesuffix("<|return|>")  # the stop token
        reasoning, content = ReasoningParser("openai_gptoss").split(answer)
        content, calls = tc.parse(content)
        assert (reasoning, content, [(c["function"]["name"],
                                      json.loads(c["function"]["arguments"]))
                                     for c in calls]) == want, answer


def test_harmony_on_the_server_and_in_batch_jobs(tmp_path):
    """The tiny model, guided to write harmony text: reasoning_content, content and the call,
    plain and streamed; the openai tool parser alone is refused."""
    from jaxinfer.batch import run_batch

    text = HARMONY[1]
    body = {"messages": USER, "max_tokens": 190, "temperature": 0, "guided_choice": [text],
            "tools": TOOLS, "tool_choice": "auto"}
    with tool_engine(num_slots=2) as eng:
        with pytest.raises(BadRequestError, match="openai_gptoss"):
            create_app(eng, "tiny", tool_call_parser="openai")
        with BackgroundServer(create_app(eng, "tiny", tool_call_parser="openai",
                                         reasoning_parser="openai_gptoss")) as srv:
            out = requests.post(f"{srv.url}/v1/chat/completions", json=body, timeout=60).json()
            r = requests.post(f"{srv.url}/v1/chat/completions", json={**body, "stream": True},
                              timeout=60)
        src = tmp_path / "in.jsonl"
        src.write_text(json.dumps({"custom_id": "a", "method": "POST",
                                   "url": "/v1/chat/completions", "body": body}) + "\n")
        run_batch(eng, src, tmp_path / "out.jsonl", progress=False,
                  tool_call_parser="openai", reasoning_parser="openai_gptoss")
    msg = out["choices"][0]["message"]
    assert (msg["reasoning_content"], msg["content"]) == ("Need the tool.", None)
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"]))
            for c in msg["tool_calls"]] == [("get_weather", {"city": "Paris"})]
    assert out["choices"][0]["finish_reason"] == "tool_calls"
    events = [json.loads(x[6:]) for x in r.iter_lines(decode_unicode=True)
              if x.startswith("data: ") and x != "data: [DONE]"]
    deltas = [e["choices"][0]["delta"] for e in events]
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == "Need the tool."
    assert "".join(d.get("content") or "" for d in deltas) == ""
    assert [c["function"] for d in deltas for c in d.get("tool_calls", [])] == \
        [c["function"] for c in msg["tool_calls"]]
    line = json.loads((tmp_path / "out.jsonl").read_text())["response"]["body"]
    assert line["choices"][0]["message"] == msg | {"tool_calls": line["choices"][0]["message"]
                                                   ["tool_calls"]}
