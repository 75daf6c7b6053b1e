"""Tool calling (OpenAI's tools / tool_choice): validation, the constraints of a named and a
"required" choice, the hermes parser and its stream, the server's answers (plain and
streamed, through the OpenAI client), batch lines, and SmolLM2 calling a tool."""

import json

import pytest
import requests

from jaxinfer import openai_api as api
from jaxinfer.errors import BadRequestError, TokenizerError
from jaxinfer.sampling import GREEDY
from jaxinfer.server import BackgroundServer, create_app
from jaxinfer.tool_calls import ToolCalling, check_tools

from .engine_helpers import smollm2_server, tool_engine

MODEL = "tiny"
UNIT = {"type": "object", "properties": {"unit": {"type": "string", "enum": ["c", "f"]}},
        "required": ["unit"], "additionalProperties": False}
CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
        "required": ["city"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_unit", "parameters": UNIT}},
         {"type": "function", "function": {"name": "get_weather", "description": "Weather.",
                                            "parameters": CITY}}]
USER = [{"role": "user", "content": "Weather in Paris?"}]
NAMED = {"type": "function", "function": {"name": "get_unit"}}


@pytest.fixture(scope="module")
def engine():
    with tool_engine() as eng:
        yield eng


@pytest.fixture(scope="module")
def url(engine):
    with BackgroundServer(create_app(engine, MODEL, tool_call_parser="hermes")) as srv:
        yield srv.url


def _chat(url, **body):
    return requests.post(f"{url}/v1/chat/completions", timeout=60,
                         json={"messages": USER, "max_tokens": 60, "temperature": 0, **body})


def _sse(resp) -> list:
    events = [line[len("data: "):] for line in resp.iter_lines(decode_unicode=True)
              if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


# ---- without an engine ------------------------------------------------------------------------
@pytest.mark.parametrize("tools, param", [
    ([], "tools"),
    ([{"type": "code_interpreter"}], "tools.0"),
    ([{"type": "function", "function": {"name": "a b"}}], "tools.0.function.name"),
    ([{"type": "function", "function": {"name": "f"}}] * 2, "tools.1.function.name"),
    ([{"type": "function", "function": {"name": "f", "parameters": "x"}}],
     "tools.0.function.parameters"),
])
def test_bad_tools_name_the_field(tools, param):
    with pytest.raises(BadRequestError) as e:
        check_tools(tools)
    assert e.value.param == param


def test_tool_choice_rules():
    assert ToolCalling.from_request(None, None) is None
    with pytest.raises(BadRequestError, match="needs tools"):
        ToolCalling.from_request(None, "required")
    with pytest.raises(BadRequestError, match="tool-call parser") as e:
        ToolCalling.from_request(TOOLS, None)  # OpenAI's default is "auto"
    assert e.value.param == "tool_choice"
    with pytest.raises(BadRequestError, match="'nope'"):
        ToolCalling.from_request(TOOLS, {"type": "function", "function": {"name": "nope"}})
    with pytest.raises(BadRequestError, match="tool_choice must be"):
        ToolCalling.from_request(TOOLS, "sometimes")
    tc = ToolCalling.from_request(TOOLS, NAMED)
    assert (tc.mode, tc.name) == ("named", "get_unit")
    assert tc.constraint().json_schema == {**UNIT, "x-guidance": {"whitespace_flexible": False}}
    assert ToolCalling.from_request(TOOLS, "none").constraint() is None
    assert ToolCalling.from_request(TOOLS, "auto", parser="hermes").constraint() is None


def test_required_schema_is_an_array_of_calls():
    schema = ToolCalling.from_request(TOOLS, "required").constraint().json_schema
    assert schema["type"] == "array" and schema["minItems"] == 1 and "maxItems" not in schema
    names = [x["properties"]["name"]["enum"] for x in schema["items"]["anyOf"]]
    assert names == [["get_unit"], ["get_weather"]]
    assert schema["items"]["anyOf"][1]["properties"]["arguments"] == CITY
    assert schema["x-guidance"] == {"whitespace_flexible": False}  # compact JSON
    one = ToolCalling.from_request(TOOLS, "required", parallel_tool_calls=False)
    assert one.constraint().json_schema["maxItems"] == 1


def test_hermes_parser():
    tc = ToolCalling.from_request(TOOLS, "auto", parser="hermes")
    text = ('Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}'
            '\n</tool_call>\n<tool_call>{"name": "get_unit", "arguments": {"unit": "c"}}')
    content, calls = tc.parse(text)  # the second call is unclosed (EOS came first)
    assert content == "Let me check. "
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] \
        == [("get_weather", {"city": "Paris"}), ("get_unit", {"unit": "c"})]
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in calls)
    assert len({c["id"] for c in calls}) == 2
    assert tc.finish_reason("stop", calls) == "tool_calls"
    assert tc.parse("no call here") == ("no call here", [])
    broken = "<tool_call>{not json}</tool_call>"
    assert tc.parse(broken) == (broken, [])


@pytest.mark.parametrize("pieces", [
    ["Sure", ". <tool", '_call>{"name": "get_unit", ', '"arguments": {"unit": "f"}}',
     "</tool_call>"],
    ["<", "tool_call>", '{"name": "get_unit", "arguments": {"unit": "f"}}'],
    ["a <tool", " is not", " a call"],
])
def test_hermes_stream_equals_the_whole_parse(pieces):
    """Streamed deltas hold back text that may begin a marker and add up to the parse of
    the whole output."""
    tc = ToolCalling.from_request(TOOLS, "auto", parser="hermes")
    stream = tc.stream()
    deltas = [d for p in pieces for d in stream.feed(p)]
    last, reason = stream.finish("stop")
    deltas += last
    content, calls = tc.parse("".join(pieces))
    assert "".join(d.get("content", "") for d in deltas) == (content or "")
    got = [c for d in deltas for c in d.get("tool_calls", [])]
    assert [c["function"] for c in got] == [c["function"] for c in calls]
    assert reason == ("tool_calls" if calls else "stop")
    if calls:  # nothing of the marker leaked into the streamed content
        assert "<" not in "".join(d.get("content", "") for d in deltas)


# Each parser's format as its model family writes it (vLLM's parser of the same name):
# output -> (content, [(name, arguments)]), or None where the output is all content.
FORMATS = {
    "llama3_json": [
        ('{"name": "get_weather", "parameters": {"city": "Paris"}}',
         (None, [("get_weather", {"city": "Paris"})])),
        ('<|python_tag|>{"name": "get_unit", "arguments": {"unit": "c"}}; '
         '{"name": "get_weather", "parameters": {"city": "Oslo"}}',
         (None, [("get_unit", {"unit": "c"}), ("get_weather", {"city": "Oslo"})])),
        ('It is sunny: {"name": "get_weather"}', None),  # the call must be the answer
        ('{"name": "get_weather"}', None),  # no parameters
        ('{"name": "get_unit", "parameters": {}} and more', None),
    ],
    "mistral": [
        ('Let me look.[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, '
         '{"name": "get_unit", "arguments": {"unit": "f"}}]',
         ("Let me look.", [("get_weather", {"city": "Paris"}), ("get_unit", {"unit": "f"})])),
        ('[TOOL_CALLS]get_weather[ARGS]{"city": "Rome"}[TOOL_CALLS]get_unit[CALL_ID]a1b2c3d4e'
         '[ARGS]{"unit": "c"}',  # Mistral Small 3.2+ / Magistral: name[ARGS]{...} per call
         (None, [("get_weather", {"city": "Rome"}), ("get_unit", {"unit": "c"})])),
        ("[TOOL_CALLS]not json", None),
        ('[TOOL_CALLS][{"name": "get_unit"}]', None),
    ],
    "pythonic": [
        ('[get_weather(city="Paris"), get_unit(unit="c")]',
         (None, [("get_weather", {"city": "Paris"}), ("get_unit", {"unit": "c"})])),
        ('<|python_start|>[get_weather(city="Lyon", days=[1, 2], opts={"a": None})]'
         '<|python_end|>',  # Llama 4
         (None, [("get_weather", {"city": "Lyon", "days": [1, 2], "opts": {"a": None}})])),
        ('[get_weather("Paris")]', None),  # positional: not a call format
        ('[os.system(cmd="ls")]', None),  # only plain names
        ('[get_weather(city=__import__("os"))]', None),  # literals only, nothing evaluated
        ("[get_unit(unit={1, 2})]", None),  # a set is no JSON value
        ("[1] is a footnote", None),
    ],
    "deepseek_v3": [
        ("Checking.<\uff5ctool\u2581calls\u2581begin\uff5c><\uff5ctool\u2581call\u2581begin"
         "\uff5c>function<\uff5ctool\u2581sep\uff5c>get_weather\n```json\n"
         "{\"city\": \"Paris\"}\n```"
         "<\uff5ctool\u2581call\u2581end\uff5c><\uff5ctool\u2581call\u2581begin\uff5c>function"
         "<\uff5ctool\u2581sep\uff5c>get_unit\n```json\n{\"unit\": \"c\"}\n```<\uff5ctool\u2581call"
         "\u2581end\uff5c><\uff5ctool\u2581calls\u2581end\uff5c>",
         ("Checking.", [("get_weather", {"city": "Paris"}), ("get_unit", {"unit": "c"})])),
        ("<\uff5ctool\u2581calls\u2581begin\uff5c><\uff5ctool\u2581call\u2581begin\uff5c>get_weather"
         "<\uff5ctool\u2581sep\uff5c>{\"city\": \"Oslo\"}<\uff5ctool\u2581call\u2581end\uff5c>"
         "<\uff5ctool\u2581calls\u2581end\uff5c>",  # V3.1
         (None, [("get_weather", {"city": "Oslo"})])),
        ("<\uff5ctool\u2581calls\u2581begin\uff5c>nothing", None),
    ],
    "granite": [
        ('<|tool_call|>[{"name": "get_weather", "arguments": {"city": "Paris"}}]',
         (None, [("get_weather", {"city": "Paris"})])),
        ('<tool_call>[{"name": "get_unit", "arguments": {"unit": "f"}}]',
         (None, [("get_unit", {"unit": "f"})])),
        ('Sure <|tool_call|>[{"name": "get_unit", "arguments": {}}]', None),
    ],
    "glm45": [
        ("Let me check.\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris"
         "</arg_value>\n</tool_call><tool_call>get_unit<arg_key>unit</arg_key><arg_value>c"
         "</arg_value></tool_call>",
         ("Let me check.\n", [("get_weather", {"city": "Paris"}), ("get_unit", {"unit": "c"})])),
        ("<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>1984</arg_value>\n"
         "<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call>",  # schema types
         (None, [("get_weather", {"city": "1984", "days": 3})])),
        ("<tool_call>get_unit<arg_key>unit</arg_key><arg_value>f</arg_value></tool_call>",
         (None, [("get_unit", {"unit": "f"})])),  # GLM-4.7 writes no newlines
        ("<tool_call>\n</tool_call>", None),
    ],
    "qwen3_coder": [
        ("I will look.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nNew York\n"
         "</parameter>\n<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>",
         ("I will look.\n", [("get_weather", {"city": "New York", "days": 3})])),
        ("<tool_call>\n<function=get_unit>\n<parameter=unit>\nc\n</parameter>\n</function>\n"
         "</tool_call>\n<tool_call>\n<function=get_weather>\n<parameter=city>\n42\n</parameter>"
         "\n</function>\n</tool_call>",
         (None, [("get_unit", {"unit": "c"}), ("get_weather", {"city": "42"})])),
        ("<tool_call><function=get_unit><parameter=unit>f</parameter></function></tool_call>",
         (None, [("get_unit", {"unit": "f"})])),
        ("<tool_call>\nno function here\n</tool_call>", None),
    ],
    "minimax_m2": [
        ("Checking.\n<minimax:tool_call>\n<invoke name=\"get_weather\"><parameter name=\"city\">"
         "New York</parameter>\n<parameter name=\"days\">3</parameter>\n</invoke>\n"
         "<invoke name=\"get_unit\"><parameter name=\"unit\">c</parameter>\n</invoke>\n"
         "</minimax:tool_call>",
         ("Checking.\n", [("get_weather", {"city": "New York", "days": 3}),
                          ("get_unit", {"unit": "c"})])),
        ("<minimax:tool_call><invoke name=\"get_weather\"><parameter name=\"city\">42"
         "</parameter></invoke></minimax:tool_call>", (None, [("get_weather", {"city": "42"})])),
        ("<minimax:tool_call>\nnothing to call\n</minimax:tool_call>", None),
    ],
    "kimi_k2": [
        ("<|tool_calls_section_begin|><|tool_call_begin|>functions.get_unit:0"
         "<|tool_call_argument_begin|>{\"unit\": \"f\"}<|tool_call_end|>"
         "<|tool_calls_section_end|>", (None, [("get_unit", {"unit": "f"})])),
        ("Looking.<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
         "<|tool_call_argument_begin|>{\"city\": \"Paris\"}<|tool_call_end|><|tool_call_begin|>"
         "functions.get_unit:1<|tool_call_argument_begin|>{\"unit\": \"c\"}<|tool_call_end|>"
         "<|tool_calls_section_end|>",
         ("Looking.", [("get_weather", {"city": "Paris"}), ("get_unit", {"unit": "c"})])),
        ("<|tool_calls_section_begin|>nothing<|tool_calls_section_end|>", None),
    ],
}


@pytest.mark.parametrize("parser, text, want", [
    (p, text, want) for p, cases in FORMATS.items() for text, want in cases])
def test_parsers_read_their_model_families_format(parser, text, want):
    tc = ToolCalling.from_request(TOOLS, "auto", parser=parser)
    content, calls = tc.parse(text)
    if want is None:
        assert (content, calls) == (text, [])
        return
    assert content == want[0]
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] \
        == want[1]
    assert len({c["id"] for c in calls}) == len(calls)


@pytest.mark.parametrize("parser, text", [
    (p, text) for p, cases in FORMATS.items() for text, _ in cases] + [
    ("llama3_json", "  Plain answer, no call."), ("pythonic", "Just text [with brackets]"),
    ("mistral", "Text that mentions [TOOL_ and ends")])
def test_parser_streams_equal_the_whole_parse(parser, text):
    """Fed in 3-character pieces, each parser's stream holds back what may be (or begin) a
    call and adds up to the parse of the whole output; no marker leaks into content."""
    tc = ToolCalling.from_request(TOOLS, "auto", parser=parser)
    stream = tc.stream()
    deltas = [d for i in range(0, len(text), 3) for d in stream.feed(text[i:i + 3])]
    last, reason = stream.finish("stop")
    deltas += last
    content, calls = tc.parse(text)
    streamed = "".join(d.get("content", "") for d in deltas)
    assert streamed == (content or "")
    got = [c for d in deltas for c in d.get("tool_calls", [])]
    assert [c["function"] for c in got] == [c["function"] for c in calls]
    assert reason == ("tool_calls" if calls else "stop")


# Real chat templates (llama.cpp's models/templates) write an assistant turn's tool calls in
# their family's format: each parser must read back exactly the calls the template wrote.
TEMPLATE_PARSERS = [
    ("NousResearch-Hermes-3-Llama-3.1-8B-tool_use", "hermes"),
    ("Qwen-Qwen2.5-7B-Instruct", "hermes"),
    ("Qwen-Qwen3-0.6B", "hermes"),
    ("ibm-granite-granite-4.0", "hermes"),
    ("meta-llama-Llama-3.1-8B-Instruct", "llama3_json"),
    ("meta-llama-Llama-3.2-3B-Instruct", "llama3_json"),
    ("meta-llama-Llama-3.3-70B-Instruct", "llama3_json"),
    ("mistralai-Mistral-Nemo-Instruct-2407", "mistral"),
    ("Mistral-Small-3.2-24B-Instruct-2506", "mistral"),
    ("unsloth-mistral-Devstral-Small-2507", "mistral"),
    ("mistralai-Ministral-3-14B-Reasoning-2512", "mistral"),
    ("deepseek-ai-DeepSeek-V3.1", "deepseek_v31"),
    ("GLM-4.6", "glm45"),
    ("GLM-4.7-Flash", "glm45"),
    ("Qwen3-Coder", "qwen3_coder"),
    ("Qwen3.5-4B", "qwen3_coder"),
    ("moonshotai-Kimi-K2", "kimi_k2"),
    ("MiniMax-M2", "minimax_m2"),
]
_TURN_ENDS = ("<|eot_id|>", "<|im_end|>", "<\uff5cend\u2581of\u2581sentence\uff5c>",
              "<|end_of_text|>", "</s>")


@pytest.mark.parametrize("template, parser", TEMPLATE_PARSERS)
def test_parsers_read_the_calls_real_templates_write(llama_cpp_vocabs, smollm2_checkpoint,
                                                     template, parser):
    """Two calls where the template takes several in one turn (Llama 3.x takes one); the
    assistant turn is the rendering past the prompt, up to its end-of-turn token."""
    from jaxinfer.tokenizer import load_tokenizer

    tok = load_tokenizer(smollm2_checkpoint / "tokenizer")
    tok.set_chat_template((llama_cpp_vocabs / "templates" / f"{template}.jinja").read_text(
        encoding="utf-8"))
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather in a city", "parameters": {
            "type": "object", "properties": {"city": {"type": "string"},
                                             "days": {"type": "integer"}},
            "required": ["city"]}}}]
    args = [{"city": "Paris", "days": 3}, {"city": "Oslo", "days": 1}]
    prompt = tok.apply_chat_template(USER, tools=tools)
    for n in (2, 1):
        turn = {"role": "assistant", "content": "", "tool_calls": [
            {"id": f"abc12345{i}", "type": "function",  # Mistral's ids: 9 alphanumerics
             "function": {"name": "get_weather", "arguments": a}}
            for i, a in enumerate(args[:n])]}
        try:
            full = tok.apply_chat_template(USER + [turn], tools=tools,
                                           add_generation_prompt=False)
            break
        except TokenizerError:  # one call per turn only
            continue
    common = next(i for i, (a, b) in enumerate(zip(prompt + "\0", full, strict=False))
                  if a != b)
    answer = full[common:]
    answer = answer[:min([i for e in _TURN_ENDS if (i := answer.find(e)) >= 0] or [None])]
    tc = ToolCalling.from_request(tools, "auto", parser=parser)
    _, calls = tc.parse(answer)
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] \
        == [("get_weather", a) for a in args[:n]], answer


def test_earlier_calls_and_tool_results_reach_the_template():
    msgs = api.message_dicts([api.ChatMessage.model_validate(m) for m in [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]])
    assert msgs[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert msgs[2] == {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}
    bad = api.ChatMessage.model_validate({"role": "assistant", "tool_calls": [
        {"function": {"name": "f", "arguments": "{oops"}}]})
    with pytest.raises(api.ApiError, match="not JSON"):
        api.message_dicts([bad])


# ---- the server -------------------------------------------------------------------------------
def test_named_tool_choice(url, engine):
    """The output is the function's arguments, constrained to its schema: the same tokens
    the engine gives under that constraint."""
    out = _chat(url, tools=TOOLS, tool_choice=NAMED).json()
    msg, reason = out["choices"][0]["message"], out["choices"][0]["finish_reason"]
    assert msg["content"] is None and reason == "stop"
    (call,) = msg["tool_calls"]
    assert call["function"]["name"] == "get_unit"
    assert json.loads(call["function"]["arguments"])["unit"] in ("c", "f")
    ref = engine.submit(messages=USER, chat_options={"tools": TOOLS}, sampling=GREEDY,
                        max_tokens=60,
                        constraint=ToolCalling.from_request(TOOLS, NAMED).constraint()).result()
    assert call["function"]["arguments"] == ref.text


def test_named_call_cut_short_is_still_a_call(url):
    """max_tokens cuts the arguments: the answer is still the call (its arguments cut,
    finish_reason "length"), as OpenAI and vLLM give it and as the stream already sent it."""
    out = _chat(url, tools=TOOLS, tool_choice=NAMED, max_tokens=2).json()["choices"][0]
    assert out["finish_reason"] == "length" and out["message"]["content"] is None
    (call,) = out["message"]["tool_calls"]
    assert call["function"]["name"] == "get_unit"
    cut = call["function"]["arguments"]
    with pytest.raises(ValueError):
        json.loads(cut)
    chunks = _sse(_chat(url, tools=TOOLS, tool_choice=NAMED, max_tokens=2, stream=True))
    deltas = [t for ch in chunks for t in ch["choices"][0]["delta"].get("tool_calls", [])]
    assert deltas[0]["function"]["name"] == "get_unit"
    assert "".join(d["function"].get("arguments", "") for d in deltas) == cut
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_required_tool_choice(url):
    out = _chat(url, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
                max_tokens=120).json()
    choice = out["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    (call,) = choice["message"]["tool_calls"]
    args = json.loads(call["function"]["arguments"])
    assert call["function"]["name"] in ("get_unit", "get_weather")
    assert set(args) == {"unit" if call["function"]["name"] == "get_unit" else "city"}


def test_auto_with_the_hermes_parser(url):
    """A guided choice makes the tiny model write a hermes call; the server returns the
    text before it as content and the call as tool_calls, streamed or not."""
    call = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    body = dict(tools=TOOLS, tool_choice="auto", guided_choice=["Hi! " + call],
                max_tokens=120)
    out = _chat(url, **body).json()["choices"][0]
    assert out["finish_reason"] == "tool_calls" and out["message"]["content"] == "Hi! "
    (c,) = out["message"]["tool_calls"]
    assert (c["function"]["name"], json.loads(c["function"]["arguments"])) == (
        "get_weather", {"city": "Paris"})
    chunks = _sse(_chat(url, stream=True, **body))
    deltas = [ch["choices"][0]["delta"] for ch in chunks]
    assert "".join(d.get("content") or "" for d in deltas) == "Hi! "
    (sc,) = [t for d in deltas for t in d.get("tool_calls", [])]
    assert sc["function"] == c["function"] and sc["index"] == 0
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


@pytest.mark.parametrize("parser", ["llama3_json", "mistral", "pythonic", "granite", "glm45",
                                    "qwen3_coder", "kimi_k2", "minimax_m2"])
def test_auto_with_each_parser_on_the_server(engine, parser):
    """`create_app(tool_call_parser=...)` (serve.py --tool_call_parser): the tiny model,
    guided to write the family's format, answers with the parsed calls, streamed or not.
    (The tiny tokenizer writes printable ASCII only: no DeepSeek markers, no newlines.)"""
    text, (content, want) = next((t, w) for t, w in FORMATS[parser]
                                 if w and t.isascii() and t.isprintable())
    body = dict(tools=TOOLS, tool_choice="auto", guided_choice=[text], max_tokens=190)
    with BackgroundServer(create_app(engine, MODEL, tool_call_parser=parser)) as srv:
        out = _chat(srv.url, **body).json()["choices"][0]
        chunks = _sse(_chat(srv.url, stream=True, **body))
    assert out["finish_reason"] == "tool_calls" and out["message"]["content"] == content
    calls = out["message"]["tool_calls"]
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] \
        == want
    deltas = [ch["choices"][0]["delta"] for ch in chunks]
    assert "".join(d.get("content") or "" for d in deltas) == (content or "")
    assert [t["function"] for d in deltas for t in d.get("tool_calls", [])] == \
        [c["function"] for c in calls]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_streamed_named_call_through_the_openai_client(url):
    """The client accumulates the streamed call (header, then argument deltas) into what
    the plain answer holds."""
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    kw = dict(model=MODEL, messages=USER, max_tokens=60, temperature=0, tools=TOOLS,
              tool_choice=NAMED)
    plain = client.chat.completions.create(**kw).choices[0].message.tool_calls[0]
    args, names = "", []
    with client.chat.completions.stream(**kw) as stream:
        for ev in stream:
            if ev.type == "tool_calls.function.arguments.delta":
                args += ev.arguments_delta
        final = stream.get_final_completion().choices[0].message.tool_calls[0]
    names.append(final.function.name)
    assert args == plain.function.arguments == final.function.arguments
    assert names == ["get_unit"] and final.id.startswith("call_")


def test_tools_are_shown_to_the_template(url):
    tok = requests.post(f"{url}/tokenize", timeout=30, json={
        "messages": USER, "tools": TOOLS}).json()
    plain = requests.post(f"{url}/tokenize", timeout=30, json={"messages": USER}).json()
    assert tok["count"] == plain["count"] + len("[tools]get_unit,get_weather")


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": "x", "tools": TOOLS}, "tools"),
    ("/v1/chat/completions", {"messages": USER, "tools": [{"type": "x"}]}, "tools.0"),
    ("/v1/chat/completions", {"messages": USER, "tool_choice": "required"}, "tool_choice"),
    ("/v1/chat/completions", {"messages": USER, "tools": TOOLS, "tool_choice": NAMED,
                              "response_format": {"type": "json_object"}}, "tool_choice"),
    ("/v1/chat/completions", {"messages": USER, "tools": TOOLS, "tool_choice": {
        "type": "function", "function": {"name": "nope"}}}, "tool_choice"),
])
def test_bad_tool_requests_get_400(url, path, body, param):
    r = requests.post(url + path, json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_auto_needs_a_parser(engine):
    with BackgroundServer(create_app(engine, MODEL)) as srv:
        r = _chat(srv.url, tools=TOOLS)
    assert r.status_code == 400 and "tool_call_parser" in r.json()["error"]["message"]
    with pytest.raises(BadRequestError, match="'nope'"):
        create_app(engine, MODEL, tool_call_parser="nope")


def test_batch_lines_take_tool_choice(engine, tmp_path):
    from jaxinfer.batch import run_batch

    lines = [{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {
        "messages": USER, "max_tokens": 60, "temperature": 0, "tools": TOOLS,
        "tool_choice": NAMED}},
        {"custom_id": "b", "method": "POST", "url": "/v1/chat/completions", "body": {
            "messages": USER, "tools": TOOLS}}]  # "auto": no parser in batch jobs
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    run_batch(engine, src, tmp_path / "out.jsonl", model_name=MODEL, progress=False)
    out = {r["custom_id"]: r["response"] for r in map(
        json.loads, (tmp_path / "out.jsonl").read_text().splitlines())}
    call = out["a"]["body"]["choices"][0]["message"]["tool_calls"][0]
    assert call["function"]["name"] == "get_unit"
    assert out["b"]["status_code"] == 400


# ---- the Responses API ------------------------------------------------------------------------
RS_TOOLS = [{"type": "function", **t["function"]} for t in TOOLS]  # this API's flat form
HERMES_CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'


def _respond(url, **body):
    return requests.post(f"{url}/v1/responses", timeout=60, json={
        "input": "Weather in Paris?", "max_output_tokens": 60, "temperature": 0, **body})


def test_responses_named_call_equals_chat(url):
    out = _respond(url, tools=RS_TOOLS, tool_choice={"type": "function", "name": "get_unit"})
    assert out.status_code == 200, out.text
    body = out.json()
    (item,) = body["output"]
    chat = _chat(url, tools=TOOLS, tool_choice=NAMED).json()["choices"][0]["message"]
    assert item["type"] == "function_call" and item["name"] == "get_unit"
    assert item["arguments"] == chat["tool_calls"][0]["function"]["arguments"]
    assert item["call_id"].startswith("call_") and body["status"] == "completed"
    assert body["tools"] == RS_TOOLS and body["tool_choice"]["name"] == "get_unit"


@pytest.mark.parametrize("kw", [
    {"tool_choice": {"type": "function", "name": "get_unit"}},
    {"tool_choice": "auto", "guided_choice": ["Hi! " + HERMES_CALL], "max_output_tokens": 120},
])
def test_responses_stream_through_the_openai_client(url, kw):
    """The official client's accumulator checks each event against the response it
    builds; its final response equals the unstreamed one (text, then the call)."""
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    req = {"model": MODEL, "input": "Weather in Paris?", "temperature": 0, "tools": RS_TOOLS,
           "max_output_tokens": 60}
    extra = {k: v for k, v in kw.items() if k.startswith("guided")}
    req.update({k: v for k, v in kw.items() if k not in extra})
    plain = client.responses.create(**req, extra_body=extra)
    types = []
    with client.responses.stream(**req, extra_body=extra) as stream:
        for ev in stream:
            types.append(ev.type)
        final = stream.get_final_response()

    def shape(r):
        return [(o.type, getattr(o, "name", None), getattr(o, "arguments", None),
                 o.content[0].text if o.type == "message" else None) for o in r.output]

    assert shape(final) == shape(plain)
    assert shape(plain)[-1][:2] == ("function_call", kw.get("tool_choice", {}).get(
        "name", "get_weather") if isinstance(kw["tool_choice"], dict) else "get_weather")
    assert "response.function_call_arguments.delta" in types
    assert types[-1] == "response.completed"
    if "guided_choice" in extra:
        assert shape(plain)[0] == ("message", None, None, "Hi! ")


def test_responses_continue_after_a_function_call(url, engine):
    """The call and its output, as input items or through previous_response_id, reach the
    chat template as an assistant tool call and a tool message."""
    first = _respond(url, tools=RS_TOOLS, tool_choice={"type": "function", "name": "get_unit"})
    call = first.json()["output"][0]
    result = {"type": "function_call_output", "call_id": call["call_id"], "output": "celsius"}
    convo = [{"role": "user", "content": "Weather in Paris?"},
             {"role": "assistant", "content": "", "tool_calls": [{
                 "id": call["call_id"], "type": "function", "function": {
                     "name": "get_unit", "arguments": json.loads(call["arguments"])}}]},
             {"role": "tool", "tool_call_id": call["call_id"], "content": "celsius"}]
    want = len(engine.encode(messages=convo, chat_options={"tools": TOOLS}))
    chained = _respond(url, tools=RS_TOOLS, previous_response_id=first.json()["id"],
                       input=[result], tool_choice="none", max_output_tokens=4).json()
    explicit = _respond(url, tools=RS_TOOLS, tool_choice="none", max_output_tokens=4, input=[
        {"role": "user", "content": "Weather in Paris?"},
        {k: call[k] for k in ("type", "call_id", "name", "arguments")}, result]).json()
    assert chained["usage"]["input_tokens"] == explicit["usage"]["input_tokens"] == want
    assert chained["output"][0]["type"] == "message"


@pytest.mark.parametrize("body, param", [
    ({"tools": [{"type": "web_search"}]}, "tools.0"),
    ({"tools": RS_TOOLS, "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
    ({"tools": [{"type": "function", "name": "a b"}], "tool_choice": "required"},
     "tools.0.name"),
    ({"tools": RS_TOOLS, "tool_choice": "required", "top_logprobs": 2}, "top_logprobs"),
    ({"input": [{"type": "function_call_output", "output": "x"}]}, "input.0"),
])
def test_bad_responses_tool_requests_get_400(url, body, param):
    r = _respond(url, **body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


# ---- the real model ---------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_calls_a_tool(smollm2_checkpoint):
    """SmolLM2 asked for the weather in Paris with a named get_weather tool: the call's
    arguments are the engine's output under the function's schema, and name the city; with
    "required" and both tools it picks one and gives valid arguments."""
    msgs = [{"role": "user", "content": "What is the weather like in Paris today?"}]
    with smollm2_server(smollm2_checkpoint) as (eng, srv):
        named = {"type": "function", "function": {"name": "get_weather"}}
        out = _chat(srv.url, messages=msgs, tools=TOOLS, tool_choice=named).json()
        (call,) = out["choices"][0]["message"]["tool_calls"]
        ref = eng.submit(messages=msgs, chat_options={"tools": TOOLS}, sampling=GREEDY,
                         max_tokens=60, constraint=ToolCalling.from_request(
                             TOOLS, named).constraint()).result()
        assert call["function"]["arguments"] == ref.text
        assert "Paris" in json.loads(ref.text)["city"]
        out = _chat(srv.url, messages=msgs, tools=TOOLS, tool_choice="required").json()
        calls = out["choices"][0]["message"]["tool_calls"]
        assert calls and out["choices"][0]["finish_reason"] == "tool_calls"
        for c in calls:
            args = json.loads(c["function"]["arguments"])
            assert set(args) == {"unit" if c["function"]["name"] == "get_unit" else "city"}
        print("SmolLM2 named:", call["function"], "required:",
              [c["function"] for c in calls])


HERMES_LIKE = """{%- if tools %}<|im_start|>system
You may call these functions:
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
Call one as <tool_call>{"name": ..., "arguments": ...}</tool_call>.<|im_end|>
{% endif %}
{%- for m in messages %}<|im_start|>{{ m.role }}
{%- if m.tool_calls %}{% for c in m.tool_calls %}
<tool_call>{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}\
</tool_call>{% endfor %}
{%- else %}
{{ m.content }}{% endif %}<|im_end|>
{% endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


def test_tool_template_renders_as_in_transformers(smollm2_gguf):
    """A tool-aware template sees the tools and an earlier call (arguments as an object)
    exactly as HF transformers' apply_chat_template(tools=...) shows them."""
    from pathlib import Path

    from jaxinfer.tokenizer import load_tokenizer

    transformers = pytest.importorskip("transformers")
    path = Path(smollm2_gguf)
    hf = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    ours = load_tokenizer(smollm2_gguf)
    ours.chat_template = HERMES_LIKE
    msgs = api.message_dicts([api.ChatMessage.model_validate(m) for m in [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]])
    got = ours.apply_chat_template(msgs, tools=TOOLS)
    want = hf.apply_chat_template(msgs, tools=TOOLS, chat_template=HERMES_LIKE, tokenize=False,
                                  add_generation_prompt=True)
    assert got == want
    assert '"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>' in got
    assert json.dumps(TOOLS[1]) in got
