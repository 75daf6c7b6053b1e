"""OpenAI's Responses API (`/v1/responses`) through the OpenAI client: the same answers as
the engine's chat requests, the SDK's stream accumulator accepts the events, logprobs,
text.format, stored conversations (previous_response_id, GET, DELETE), 400s for what the
server cannot honour; and SmolLM2 equal to chat."""

import json

import pytest
import requests

from jaxinfer.sampling import GREEDY, SamplingParams
from jaxinfer.server import BackgroundServer, create_app
from jaxinfer.structured import Constraint

from .engine_helpers import smollm2_server, tiny_engine

openai = pytest.importorskip("openai")
MODEL = "tiny"


@pytest.fixture(scope="module")
def engine():
    with tiny_engine(num_slots=4, max_len=256) as eng:
        yield eng


@pytest.fixture(scope="module")
def url(engine):
    with BackgroundServer(create_app(engine, MODEL)) as srv:
        yield srv.url


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def test_text_and_usage_equal_the_engines_chat_request(client, engine):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    for max_tokens in (5, 200):  # cut by max_output_tokens, then ended by EOS or the slot
        ref = engine.submit(messages=msgs, sampling=GREEDY,
                            max_tokens=max_tokens).result(timeout=60)
        out = client.responses.create(model=MODEL, instructions="Be brief.", input="Hi",
                                      max_output_tokens=max_tokens, temperature=0)
        assert out.output_text == ref.text
        assert out.usage.output_tokens == len(ref.token_ids)
        assert out.usage.input_tokens == ref.prompt_tokens
        assert out.status == ("incomplete" if ref.finish_reason == "length" else "completed")
        if out.status == "incomplete":
            assert out.incomplete_details.reason == "max_output_tokens"
        assert out.id.startswith("resp_") and out.output[0].role == "assistant"
    # message items, developer as system, text parts: the same prompt
    items = [{"role": "developer", "content": "Be brief."},
             {"type": "message", "role": "user", "content": [{"type": "input_text",
                                                              "text": "Hi"}]}]
    again = client.responses.create(model=MODEL, input=items, max_output_tokens=5,
                                    temperature=0)
    ref = engine.submit(messages=msgs, sampling=GREEDY, max_tokens=5).result(timeout=60)
    assert again.output_text == ref.text


def test_stream_events_build_the_same_response(client, engine):
    msgs = [{"role": "user", "content": "Tell me"}]
    sp = SamplingParams(temperature=0.9, seed=7)
    ref = engine.submit(messages=msgs, sampling=sp, max_tokens=12).result(timeout=60)
    with client.responses.stream(model=MODEL, input="Tell me", max_output_tokens=12,
                                 temperature=0.9, extra_body={"seed": 7}) as stream:
        events = list(stream)  # the SDK's accumulator checks the events' consistency
    final = events[-1].response  # get_final_response() takes only response.completed
    assert final.output_text == ref.text
    types = [e.type for e in events]
    assert types[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert types[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done",
                          "response.incomplete" if ref.finish_reason == "length"
                          else "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert "".join(deltas) == ref.text and len(deltas) > 1
    assert final.usage.output_tokens == len(ref.token_ids)


def test_logprobs_equal_chat_completions(url, client):
    msgs = [{"role": "user", "content": "abc"}]
    chat = requests.post(f"{url}/v1/chat/completions", json={
        "messages": msgs, "max_tokens": 6, "temperature": 0, "logprobs": True,
        "top_logprobs": 3}, timeout=60).json()["choices"][0]["logprobs"]["content"]
    out = client.responses.create(model=MODEL, input="abc", max_output_tokens=6,
                                  temperature=0, top_logprobs=3,
                                  include=["message.output_text.logprobs"])
    got = [lp.model_dump() for lp in out.output[0].content[0].logprobs]
    assert [(g["token"], g["logprob"]) for g in got] == [(c["token"], c["logprob"])
                                                         for c in chat]
    assert [len(g["top_logprobs"]) for g in got] == [3] * len(chat)
    with client.responses.stream(model=MODEL, input="abc", max_output_tokens=6,
                                 temperature=0, top_logprobs=3) as stream:
        streamed = [lp for e in stream if e.type == "response.output_text.delta"
                    for lp in e.logprobs]
    assert [(s.token, s.logprob) for s in streamed] == [(c["token"], c["logprob"])
                                                        for c in chat]


def test_text_format_json_schema(client, engine):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
              "additionalProperties": False}
    out = client.responses.create(model=MODEL, input="json please", max_output_tokens=40,
                                  temperature=0, text={"format": {
                                      "type": "json_schema", "name": "x", "schema": schema,
                                      "strict": True}})
    ref = engine.submit(messages=[{"role": "user", "content": "json please"}],
                        sampling=GREEDY, max_tokens=40,
                        constraint=Constraint(json_schema=schema)).result(timeout=60)
    assert out.output_text == ref.text
    if out.status == "completed":
        assert set(json.loads(out.output_text)) == {"a"}
    assert out.text.format.type == "json_schema"


@pytest.mark.parametrize("body,param", [
    # tool_choice "auto" (the default) needs a tool-call parser, which this server lacks
    ({"input": "x", "tools": [{"type": "function", "name": "f"}]}, "tool_choice"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": "1"}]}, "input"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "u"}]}]},
     "input.0.content"),
    ({"input": []}, "input"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "x", "top_logprobs": 21}, "top_logprobs"),
    ({"input": "x", "max_tokens": 5}, "max_tokens"),
    ({"input": "x", "background": True}, "background"),
    ({"input": "x", "truncation": "auto"}, "truncation"),
    ({"input": "x", "text": {"format": {"type": "yaml"}}}, "text"),
    ({"input": "x", "temperature": -1}, "temperature"),
    ({"input": "x" * 300}, "input"),  # over the 256-token context
    ({"max_output_tokens": 3}, "input"),
])
def test_bad_requests_get_400(url, body, param):
    r = requests.post(f"{url}/v1/responses", json=body, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"], err


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="gpt-5", input="x")


def test_previous_response_id_continues_a_stored_conversation(client, engine, url):
    """A stored response's input and answer (not its instructions, as OpenAI does) come
    before the new input; streamed responses are stored too; GET returns a stored
    response, DELETE forgets it; store=false stores nothing; unknown ids are 404."""
    first = client.responses.create(model=MODEL, instructions="Be brief.", input="Hi",
                                    max_output_tokens=6, temperature=0)
    with client.responses.stream(model=MODEL, previous_response_id=first.id, input="More",
                                 max_output_tokens=6, temperature=0) as stream:
        second = [e for e in stream][-1].response
    msgs = [{"role": "user", "content": "Hi"},
            {"role": "assistant", "content": first.output_text},
            {"role": "user", "content": "More"}]
    ref = engine.submit(messages=msgs, sampling=GREEDY, max_tokens=6).result(timeout=60)
    assert second.output_text == ref.text and second.previous_response_id == first.id
    third = client.responses.create(model=MODEL, previous_response_id=second.id,
                                    input="Again", instructions="New rules.",
                                    max_output_tokens=6, temperature=0, store=False)
    ref = engine.submit(messages=[{"role": "system", "content": "New rules."}, *msgs,
                                  {"role": "assistant", "content": second.output_text},
                                  {"role": "user", "content": "Again"}],
                        sampling=GREEDY, max_tokens=6).result(timeout=60)
    assert third.output_text == ref.text and first.store and not third.store
    assert client.responses.retrieve(second.id).output_text == second.output_text
    for rid in (third.id, "resp_nope"):  # not stored, never made
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(rid)
        r = requests.post(f"{url}/v1/responses", json={"input": "x",
                                                       "previous_response_id": rid},
                          timeout=30)
        assert r.status_code == 404 and r.json()["error"]["param"] == "previous_response_id"
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    assert client.responses.retrieve(second.id).id == second.id  # its own copy of history


def test_the_store_keeps_the_latest(engine):
    with BackgroundServer(create_app(engine, MODEL, max_stored_responses=2)) as srv:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0)
        ids = [client.responses.create(model=MODEL, input=f"q{i}", max_output_tokens=2).id
               for i in range(3)]
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(ids[0])
        assert [client.responses.retrieve(i).id for i in ids[1:]] == ids[1:]


@pytest.mark.slow
def test_smollm2_responses_equal_chat(smollm2_checkpoint):
    """The real model: non-streamed and streamed Responses API answers equal the chat
    completion of the same messages (greedy)."""
    with smollm2_server(smollm2_checkpoint) as (_, srv):
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0)
        chat = client.chat.completions.create(
            model="smollm2", max_tokens=24, temperature=0,
            messages=[{"role": "system", "content": "Answer in one sentence."},
                      {"role": "user", "content": "What is the capital of France?"}])
        kw = dict(model="smollm2", instructions="Answer in one sentence.",
                  input="What is the capital of France?", max_output_tokens=24,
                  temperature=0)
        out = client.responses.create(**kw)
        with client.responses.stream(**kw) as stream:
            streamed = stream.get_final_response()
    assert out.output_text == streamed.output_text == chat.choices[0].message.content
    assert "Paris" in out.output_text
    assert out.usage.output_tokens == chat.usage.completion_tokens
