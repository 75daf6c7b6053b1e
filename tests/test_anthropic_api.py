"""Anthropic's Messages API (`/v1/messages`) through Anthropic's own client: the same answers
as the engine's chat requests, the SDK's stream accumulator builds the same message,
stop reasons (end of turn, stop sequence, max_tokens, tool use), prefill, tools (named
and parsed), a tool_use / tool_result conversation renders as its chat form does,
count_tokens, x-api-key, Anthropic's error bodies; and SmolLM2 equal to chat."""

import json

import pytest
import requests

from jaxinfer.anthropic_api import MessagesRequest
from jaxinfer.openai_api import ChatMessage, message_dicts
from jaxinfer.sampling import GREEDY, SamplingParams
from jaxinfer.server import BackgroundServer, create_app

from .engine_helpers import smollm2_server, tool_engine
from .test_tool_calls import CITY, HERMES_CALL, UNIT

anthropic = pytest.importorskip("anthropic")
MODEL = "tiny"
T0 = {"temperature": 0}  # a sampling field Anthropic's client no longer sends itself
TOOLS = [{"name": "get_unit", "input_schema": UNIT},
         {"name": "get_weather", "description": "Weather.", "input_schema": CITY}]


@pytest.fixture(scope="module")
def served():
    """The tiny engine whose template shows tools, and its server with the hermes parser."""
    with tool_engine() as eng, \
            BackgroundServer(create_app(eng, MODEL, tool_call_parser="hermes")) as srv:
        yield eng, srv.url


@pytest.fixture(scope="module")
def engine(served):
    return served[0]


@pytest.fixture(scope="module")
def url(served):
    return served[1]


@pytest.fixture(scope="module")
def client(url):
    return anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0)


def _text(msg) -> str:
    return "".join(b.text for b in msg.content if b.type == "text")


def test_text_usage_and_stop_reason_equal_the_engines_chat_request(client, engine):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    for max_tokens in (5, 200):  # cut by max_tokens, then (maybe) ended by EOS
        ref = engine.submit(messages=msgs, sampling=GREEDY,
                            max_tokens=max_tokens).result(timeout=60)
        out = client.messages.create(model=MODEL, system="Be brief.", max_tokens=max_tokens,
                                     messages=[{"role": "user", "content": "Hi"}],
                                     extra_body=T0)
        assert out.type == "message" and out.role == "assistant" and out.id.startswith("msg_")
        assert [b.type for b in out.content] == ["text"] and _text(out) == ref.text
        assert out.usage.output_tokens == len(ref.token_ids)
        assert out.usage.input_tokens + out.usage.cache_read_input_tokens == ref.prompt_tokens
        want = "end_turn" if ref.finish_reason == "stop" else "max_tokens"
        assert out.stop_reason == want and out.stop_sequence is None
    # text blocks and a system block list: the same prompt
    again = client.messages.create(
        model=MODEL, system=[{"type": "text", "text": "Be brief."}], max_tokens=5,
        messages=[{"role": "user", "content": [{"type": "text", "text": "H"},
                                               {"type": "text", "text": "i"}]}],
        extra_body=T0)
    ref = engine.submit(messages=msgs, sampling=GREEDY, max_tokens=5).result(timeout=60)
    assert _text(again) == ref.text


def test_stream_events_build_the_same_message(client, engine, url):
    msgs = [{"role": "user", "content": "Tell me"}]
    ref = engine.submit(messages=msgs, sampling=SamplingParams(temperature=0.9, seed=7),
                        max_tokens=12).result(timeout=60)
    kw = dict(model=MODEL, messages=msgs, max_tokens=12,
              extra_body={"seed": 7, "temperature": 0.9})
    with client.messages.stream(**kw) as stream:
        deltas = [ev.delta.text for ev in stream if ev.type == "content_block_delta"]
        final = stream.get_final_message()
    assert _text(final) == "".join(deltas) == ref.text and len(deltas) > 1
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 12
    raw = requests.post(f"{url}/v1/messages", timeout=60, json={
        "messages": msgs, "max_tokens": 12, "stream": True, "seed": 7, "temperature": 0.9})
    names = [line[7:] for line in raw.iter_lines(decode_unicode=True)
             if line.startswith("event: ")]
    assert names[:3] == ["message_start", "ping", "content_block_start"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[3:-3]) == {"content_block_delta"}


def test_stop_sequences_and_vllm_stop_reason(client, engine, url):
    """A stop sequence ends the text before it: stop_reason "stop_sequence" names it, as
    the chat completion's stop_reason (vLLM's field) does."""
    msgs = [{"role": "user", "content": "Go"}]
    ref = engine.submit(messages=msgs, sampling=GREEDY, max_tokens=20).result(timeout=60)
    stop = ref.text[6:8]
    cut = ref.text[:ref.text.find(stop)]
    kw = dict(model=MODEL, messages=msgs, max_tokens=20, extra_body=T0,
              stop_sequences=["never there", stop])
    out = client.messages.create(**kw)
    with client.messages.stream(**kw) as stream:
        streamed = stream.get_final_message()
    for m in (out, streamed):
        assert (_text(m), m.stop_reason, m.stop_sequence) == (cut, "stop_sequence", stop)
    chat = requests.post(f"{url}/v1/chat/completions", timeout=60, json={
        "messages": msgs, "max_tokens": 20, "temperature": 0, "stop": [stop]}).json()
    assert chat["choices"][0]["stop_reason"] == stop
    assert chat["choices"][0]["message"]["content"] == cut
    r = requests.post(f"{url}/v1/chat/completions", timeout=60, json={
        "messages": msgs, "max_tokens": 20, "temperature": 0, "stop": [stop], "stream": True})
    chunks = [json.loads(x[6:]) for x in r.iter_lines(decode_unicode=True)
              if x.startswith("data: ") and x != "data: [DONE]"]
    last = chunks[-1]["choices"][0]
    assert (last["finish_reason"], last["stop_reason"]) == ("stop", stop)
    assert all("stop_reason" not in c["choices"][0] for c in chunks[:-1])
    # a stop id ends it too (vLLM's stop_token_ids): stop_reason is that id
    tid = ref.token_ids[3]
    r = engine.submit(messages=msgs, sampling=SamplingParams(temperature=0,
                                                             stop_token_ids=(tid,)),
                      max_tokens=20).result(timeout=60)
    assert r.stop_reason == tid and r.token_ids[-1] == tid
    assert ref.stop_reason is None


def test_a_last_assistant_message_is_continued(client, engine):
    """Prefill: the answer continues the assistant's last message."""
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Sure, "}]
    ref = engine.submit(messages=msgs, sampling=GREEDY, max_tokens=8, chat_options={
        "add_generation_prompt": False, "continue_final_message": True}).result(timeout=60)
    out = client.messages.create(model=MODEL, messages=msgs, max_tokens=8, extra_body=T0)
    assert _text(out) == ref.text


def test_named_tool_is_a_tool_use_block(client):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Unit?"}], max_tokens=60,
              extra_body=T0, tools=TOOLS, tool_choice={"type": "tool", "name": "get_unit"})
    out = client.messages.create(**kw)
    with client.messages.stream(**kw) as stream:
        final = stream.get_final_message()
    for m in (out, final):
        (block,) = m.content
        assert block.type == "tool_use" and block.name == "get_unit"
        assert set(block.input) == {"unit"} and block.input["unit"] in ("c", "f")
        assert m.stop_reason == "tool_use"
    assert out.content[0].input == final.content[0].input
    cut = client.messages.create(**{**kw, "max_tokens": 3})  # the call cut short
    assert cut.stop_reason == "max_tokens" and cut.content[0].type == "tool_use"


def test_auto_tools_with_the_hermes_parser(client):
    """A guided choice makes the tiny model write text and a hermes call: a text block and
    a tool_use block, streamed or not; tool_choice any forces a call."""
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Weather in Paris?"}],
              max_tokens=120, tools=TOOLS,
              extra_body={"guided_choice": ["Hi! " + HERMES_CALL], **T0})
    out = client.messages.create(**kw)
    with client.messages.stream(**kw) as stream:
        final = stream.get_final_message()
    for m in (out, final):
        assert [b.type for b in m.content] == ["text", "tool_use"]
        assert m.content[0].text == "Hi! " and m.stop_reason == "tool_use"
        assert (m.content[1].name, m.content[1].input) == ("get_weather", {"city": "Paris"})
    assert out.content[1].id.startswith("call_")
    forced = client.messages.create(**{**kw, "extra_body": T0}, tool_choice={"type": "any"})
    assert forced.stop_reason == "tool_use" and forced.content[-1].type == "tool_use"
    assert forced.content[-1].name in ("get_unit", "get_weather")


def test_tool_conversation_is_its_chat_form():
    """tool_use blocks are the assistant's tool_calls, tool_result blocks tool messages
    (before the turn's text), thinking blocks dropped, system first."""
    body = MessagesRequest.model_validate({"max_tokens": 5, "system": "S", "messages": [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "hm", "signature": "x"},
            {"type": "text", "text": "Let me see."},
            {"type": "tool_use", "id": "t1", "name": "get_weather", "input": {"city": "Oslo"}},
            {"type": "tool_use", "id": "t2", "name": "get_unit", "input": {"unit": "c"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "t1", "content": "5 degrees"},
            {"type": "tool_result", "tool_use_id": "t2",
             "content": [{"type": "text", "text": "celsius"}]},
            {"type": "text", "text": "And tomorrow?"}]}]})
    chat = message_dicts([ChatMessage.model_validate(m) for m in [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "Let me see.", "tool_calls": [
            {"id": "t1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
            {"id": "t2", "type": "function",
             "function": {"name": "get_unit", "arguments": '{"unit": "c"}'}}]},
        {"role": "tool", "tool_call_id": "t1", "content": "5 degrees"},
        {"role": "tool", "tool_call_id": "t2", "content": "celsius"},
        {"role": "user", "content": "And tomorrow?"}]])
    assert body.message_dicts() == chat
    assert body.chat_options()["add_generation_prompt"] is True


def test_a_coding_agents_request_is_taken(url, engine):
    """What agents send beside the fields above (cache_control marks, metadata,
    context_management, thinking, is_error results) is accepted and changes nothing."""
    sys_block = {"type": "text", "text": "S", "cache_control": {"type": "ephemeral"}}
    body = {"model": MODEL, "max_tokens": 6, "temperature": 0, "system": [sys_block],
            "metadata": {"user_id": "u"}, "context_management": {"edits": []},
            "thinking": {"type": "enabled", "budget_tokens": 1024},
            "tools": [{**TOOLS[0], "cache_control": {"type": "ephemeral"}}],
            "tool_choice": {"type": "auto", "disable_parallel_tool_use": True},
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "Unit?",
                                              "cache_control": {"type": "ephemeral"}}]},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "t",
                                                   "name": "get_unit", "input": {}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t",
                                              "is_error": True, "content": "no"}]}]}
    out = requests.post(f"{url}/v1/messages", json=body, timeout=60,
                        headers={"anthropic-version": "2023-06-01",
                                 "anthropic-beta": "context-management-2025-06-27"})
    assert out.status_code == 200, out.text
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "Unit?"},
            {"role": "assistant", "content": "", "tool_calls": [{
                "id": "t", "type": "function", "function": {"name": "get_unit",
                                                            "arguments": {}}}]},
            {"role": "tool", "tool_call_id": "t", "content": "no"}]
    chat_tools = [{"type": "function", "function": {"name": "get_unit",
                                                    "parameters": TOOLS[0]["input_schema"]}}]
    ref = engine.submit(messages=msgs, sampling=GREEDY, max_tokens=6, chat_options={
        "tools": chat_tools, "chat_template_kwargs": {"enable_thinking": True}}
    ).result(timeout=60)
    assert out.json()["content"][0]["text"] == ref.text


def test_count_tokens_is_the_prompts_length(url, engine):
    msgs = [{"role": "user", "content": "Weather in Paris?"}]
    n = requests.post(f"{url}/v1/messages/count_tokens", timeout=30, json={
        "model": MODEL, "system": "S", "messages": msgs, "tools": TOOLS}).json()
    chat_tools = [{"type": "function", "function": {"name": t["name"],
                                                    "parameters": t["input_schema"]}}
                  for t in TOOLS]
    ids = engine.encode(messages=[{"role": "system", "content": "S"}, *msgs],
                        chat_options={"tools": chat_tools})
    assert n == {"input_tokens": len(ids)}


def test_models_list_in_anthropics_client(client):
    (m,) = client.models.list().data
    assert (m.id, m.type, m.display_name) == (MODEL, "model", MODEL)
    assert m.created_at.year >= 2024


def test_api_key_is_read_from_x_api_key(engine):
    with BackgroundServer(create_app(engine, MODEL, api_key="sekrit")) as srv:
        good = anthropic.Anthropic(base_url=srv.url, api_key="sekrit", max_retries=0)
        assert good.messages.create(model=MODEL, max_tokens=2, messages=[
            {"role": "user", "content": "x"}]).usage.output_tokens == 2
        bad = anthropic.Anthropic(base_url=srv.url, api_key="nope", max_retries=0)
        with pytest.raises(anthropic.AuthenticationError) as e:
            bad.messages.create(model=MODEL, max_tokens=2, messages=[
                {"role": "user", "content": "x"}])
        assert e.value.body["error"]["type"] == "authentication_error"


USER = [{"role": "user", "content": "x"}]


@pytest.mark.parametrize("body, says", [
    ({"messages": USER}, "max_tokens"),
    ({"messages": USER, "max_tokens": 0}, "max_tokens"),
    ({"messages": [], "max_tokens": 5}, "messages is empty"),
    ({"messages": [{"role": "system", "content": "x"}], "max_tokens": 5}, "role"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}],
      "max_tokens": 5}, "'image'"),
    ({"messages": [{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "nope", "content": "x"}]}], "max_tokens": 5},
     "'nope'"),
    ({"messages": [*USER, {"role": "assistant", "content": [
        {"type": "tool_use", "id": "a", "name": "get_unit", "input": {}}]}],
      "max_tokens": 5}, "tool_result"),
    ({"messages": USER, "max_tokens": 5, "tools": [{"type": "web_search_20250305",
                                                    "name": "web_search"}]}, "custom tools"),
    ({"messages": USER, "max_tokens": 5, "tools": TOOLS, "tool_choice": {"type": "maybe"}},
     "tool_choice.type"),
    ({"messages": USER, "max_tokens": 5, "stop": ["x"]}, "stop_sequences"),
    ({"messages": USER, "max_tokens": 5, "n": 2}, "n is not"),
    ({"messages": USER, "max_tokens": 5, "temperature": "hot"}, "temperature"),
    ({"messages": USER, "max_tokens": 5, "thinking": {"type": "lots"}}, "thinking.type"),
    ({"messages": USER, "max_tokens": 5, "output_config": {"format": {"type": "xml"}}},
     "json_schema"),
    ({"messages": USER, "max_tokens": 5, "mcp_servers": [{"url": "x"}]}, "mcp_servers"),
])
def test_bad_requests_get_anthropics_400(url, body, says):
    r = requests.post(f"{url}/v1/messages", json=body, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()
    assert err["type"] == "error" and err["error"]["type"] == "invalid_request_error"
    assert says in err["error"]["message"]


def test_auto_tools_need_a_parser_and_unknown_models_are_404(engine):
    with BackgroundServer(create_app(engine, MODEL)) as srv:
        client = anthropic.Anthropic(base_url=srv.url, api_key="unused", max_retries=0)
        with pytest.raises(anthropic.BadRequestError, match="tool_call_parser"):
            client.messages.create(model=MODEL, max_tokens=5, messages=USER, tools=TOOLS)
        with pytest.raises(anthropic.NotFoundError) as e:
            client.messages.create(model="claude-nope", max_tokens=5, messages=USER)
        assert e.value.body["error"]["type"] == "not_found_error"
        r = requests.post(f"{srv.url}/v1/messages", data="{oops", timeout=30,
                          headers={"content-type": "application/json"})
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]


def test_output_config_format_constrains_the_text(client):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}},
              "required": ["ok"], "additionalProperties": False}
    out = client.messages.create(model=MODEL, max_tokens=40, messages=USER, extra_body=T0,
                                 output_config={"format": {"type": "json_schema",
                                                           "schema": schema}})
    assert set(json.loads(_text(out))) == {"ok"} and out.stop_reason == "end_turn"


@pytest.mark.slow
def test_smollm2_messages_equal_chat(smollm2_checkpoint):
    """The real model: non-streamed and streamed Messages API answers equal the chat
    completion of the same conversation (greedy)."""
    with smollm2_server(smollm2_checkpoint) as (_, srv):
        chat = requests.post(f"{srv.url}/v1/chat/completions", timeout=120, json={
            "model": "smollm2", "max_tokens": 24, "temperature": 0, "messages": [
                {"role": "system", "content": "Answer in one sentence."},
                {"role": "user", "content": "What is the capital of France?"}]}).json()
        client = anthropic.Anthropic(base_url=srv.url, api_key="unused", max_retries=0)
        kw = dict(model="smollm2", system="Answer in one sentence.", max_tokens=24,
                  extra_body=T0, messages=[{"role": "user",
                                            "content": "What is the capital of France?"}])
        out = client.messages.create(**kw)
        with client.messages.stream(**kw) as stream:
            streamed = stream.get_final_message()
    assert _text(out) == _text(streamed) == chat["choices"][0]["message"]["content"]
    assert "Paris" in _text(out)
    assert out.usage.output_tokens == chat["usage"]["completion_tokens"]
