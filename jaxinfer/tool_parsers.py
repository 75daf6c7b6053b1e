"""Tool-call parsers for tool_choice "auto": each reads one model family's own call format
out of free text, as vLLM's `--tool-call-parser` of the same name does.

    hermes       <tool_call>{"name": ..., "arguments": {...}}</tool_call> ...
                 (Hermes 2 Pro+, Qwen2.5+, and other templates that write it)
    llama3_json  {"name": ..., "parameters": {...}}; {...}   optionally after <|python_tag|>
                 (Llama 3.1-3.3's JSON tool calling; the answer is the call)
    mistral      [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]   (Mistral 7B v0.3,
                 Nemo, Small 3) or [TOOL_CALLS]name[ARGS]{...} per call (Mistral Small 3.2+,
                 Magistral, Devstral); text before the marker is content
    pythonic     [get_weather(city="Paris"), ...]   optionally inside <|python_start|> ...
                 <|python_end|> (Llama 3.2 and Llama 4's pythonic calls; the answer is the list)
    deepseek_v3  <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>name
    deepseek_v31 ```json {...} ```<｜tool▁call▁end｜>... (V3, R1) or name<｜tool▁sep｜>{...}
                 (V3.1); either name reads both
    granite      <|tool_call|>[{"name": ..., "arguments": {...}}] (Granite 3; <tool_call>)
    glm45        <tool_call>name<arg_key>k</arg_key><arg_value>v</arg_value></tool_call>
                 (GLM-4.5 to 4.7)
    qwen3_coder  <tool_call><function=name><parameter=k>v</parameter></function></tool_call>
                 (Qwen3-Coder, Qwen3.5)
    kimi_k2      <|tool_calls_section_begin|><|tool_call_begin|>functions.name:0
                 <|tool_call_argument_begin|>{...}<|tool_call_end|>... (Kimi K2)
    minimax_m2   <minimax:tool_call><invoke name="f"><parameter name="k">v</parameter>
                 </invoke>...</minimax:tool_call> (MiniMax-M2)
    openai       gpt-oss's function calls, as the openai_gptoss reasoning parser passes
                 them on from its harmony messages (harmony.py); it needs that parser
(llama4_json and llama4_pythonic are vLLM's names for the Llama 3 and pythonic parsers.)

glm45, qwen3_coder and minimax_m2 write values as text: a parameter the tool's schema types
other than string is read as JSON.

A parser gives (content, calls) for the whole output: calls are (name, arguments) pairs,
and an output that does not parse as that format is all content (vLLM's rule). `markers`
are where calls begin; with `at_start` they count only at the start of the answer, so
streaming knows which text is surely content. No JAX and no HTTP here.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import json
import re
from collections.abc import Callable
from typing import Any

from jaxinfer import harmony

Calls = list[tuple[str, Any]]
Params = dict[str, dict[str, Any]]  # each tool's name -> its parameters' JSON schema


@dataclasses.dataclass(frozen=True)
class Parser:
    parse: Callable[[str, Params], tuple[str | None, Calls]]
    markers: tuple[str, ...]
    at_start: bool  # calls only where the answer begins with a marker (after whitespace)

    def calls_start(self, text: str) -> int:
        """Where the calls part of `text` begins, -1 where none may begin."""
        if self.at_start:
            i = len(text) - len(text.lstrip())
            return i if text.startswith(self.markers, i) else -1
        found = [i for m in self.markers if (i := text.find(m)) >= 0]
        return min(found, default=-1)

    def safe_prefix(self, text: str) -> int:
        """How much of `text` is surely content: up to where calls begin, or up to a tail
        that could still grow into a marker. An answer that may still begin with calls is
        held whole (its leading whitespace too: a call's answer has no content)."""
        if self.at_start:
            rest = text.lstrip()
            maybe = rest.startswith(self.markers) or any(m.startswith(rest)
                                                         for m in self.markers)
            return 0 if maybe else len(text)
        at = self.calls_start(text)
        if at >= 0:
            return at
        for k in range(min(max(map(len, self.markers)) - 1, len(text)), 0, -1):
            if any(m.startswith(text[-k:]) for m in self.markers):
                return len(text) - k
        return len(text)


def _content(text: str) -> str | None:
    return text if text.strip() else None


def _after(marker: str) -> Callable[[Callable[[str, Params], Calls | None]],
                                    Callable[[str, Params], tuple[str | None, Calls]]]:
    """For a format whose calls follow `marker`, the text before it being content: the
    decorated reader gets the output from the marker on and gives its calls, None where
    they are not that format (then the whole output is content, vLLM's rule)."""
    def wrap(read: Callable[[str, Params], Calls | None]
             ) -> Callable[[str, Params], tuple[str | None, Calls]]:
        @functools.wraps(read)
        def parse(text: str, params: Params) -> tuple[str | None, Calls]:
            at = text.find(marker)
            calls = read(text[at:], params) if at >= 0 else None
            return (_content(text[:at]), calls) if calls else (text, [])
        return parse
    return wrap


def _whole(read: Callable[[str, Params], Calls | None]
           ) -> Callable[[str, Params], tuple[str | None, Calls]]:
    """For a format whose calls are the whole answer: the decorated reader gives them,
    None where the answer is not that format (then it is all content)."""
    @functools.wraps(read)
    def parse(text: str, params: Params) -> tuple[str | None, Calls]:
        calls = read(text, params)
        return (None, calls) if calls else (text, [])
    return parse


_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


@_after("<tool_call>")
def _hermes(text: str, params: Params) -> Calls | None:
    """`<tool_call>` blocks of JSON objects with "name" and "arguments" (the last one may
    be unclosed at EOS); the text before the first is content."""
    calls = []
    for body in _HERMES.findall(text):
        obj = _json(body)
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) \
                or "arguments" not in obj:
            return None
        calls.append((obj["name"], obj["arguments"]))
    return calls


@_whole
def _llama3_json(text: str, params: Params) -> Calls | None:
    """The whole answer is one or more `{"name": ..., "parameters": {...}}` objects
    ("arguments" is taken too) separated by ";", optionally after <|python_tag|>."""
    body = text.strip().removeprefix("<|python_tag|>").strip()
    if not body.startswith("{"):
        return None
    calls, dec, i = [], json.JSONDecoder(), 0
    while i < len(body):
        try:
            obj, i = dec.raw_decode(body, i)
        except ValueError:
            return None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return None
        args = obj.get("parameters", obj.get("arguments"))
        if args is None:
            return None
        calls.append((obj["name"], args))
        rest = body[i:].lstrip()
        if rest.startswith(";"):
            rest = rest[1:].lstrip()
        elif rest:
            return None
        i = len(body) - len(rest)
    return calls


_MISTRAL = "[TOOL_CALLS]"


@_after(_MISTRAL)
def _mistral(text: str, params: Params) -> Calls | None:
    """Content, then `[TOOL_CALLS]` and a JSON array of {"name", "arguments"}, or one
    `[TOOL_CALLS]name[ARGS]{...}` per call (a `[CALL_ID]id` after the name is dropped)."""
    calls: Calls = []
    for part in text[len(_MISTRAL):].split(_MISTRAL):
        if "[ARGS]" in part:
            name, _, args = part.partition("[ARGS]")
            name = name.split("[CALL_ID]")[0].strip()
            obj = _json(args)
            if not name or obj is None:
                return None
            calls.append((name, obj))
            continue
        items = _json(part)
        if not isinstance(items, list) or not items or not all(
                isinstance(x, dict) and isinstance(x.get("name"), str) and "arguments" in x
                for x in items):
            return None
        calls += [(x["name"], x["arguments"]) for x in items]
    return calls


@_whole
def _pythonic(text: str, params: Params) -> Calls | None:
    """The whole answer is a Python list of calls with keyword arguments whose values are
    literals, `[f(a=1, b="x"), g()]`, optionally inside <|python_start|> <|python_end|>.
    Read with `ast` (literals only: nothing is evaluated)."""
    body = text.strip().removeprefix("<|python_start|>").removesuffix("<|python_end|>")
    try:
        tree = ast.parse(body.strip(), mode="eval").body
        if not isinstance(tree, ast.List) or not tree.elts:
            return None
        calls = []
        for node in tree.elts:
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) \
                    or node.args or any(k.arg is None for k in node.keywords):
                return None
            args = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
            json.dumps(args, allow_nan=False)  # a set, bytes or complex is no JSON value
            calls.append((node.func.id, args))
    except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError):
        return None
    return calls


_DS_BEGIN = "<\uff5ctool\u2581calls\u2581begin\uff5c>"
_DS_CALL = re.compile(  # V3 / R1: type<sep>name, fenced JSON; V3.1: name<sep>JSON
    "<\uff5ctool\u2581call\u2581begin\uff5c>(?:(?:function)?<\uff5ctool\u2581sep\uff5c>"
    "(?P<name>[^\n<]+)\n```json\n(?P<args>.*?)\n```|(?P<name31>[^<]+)"
    "<\uff5ctool\u2581sep\uff5c>(?P<args31>.*?))<\uff5ctool\u2581call\u2581end\uff5c>",
    re.DOTALL)


@_after(_DS_BEGIN)
def _deepseek(text: str, params: Params) -> Calls | None:
    """Content, then `<｜tool▁calls▁begin｜>` and one `<｜tool▁call▁begin｜>...
    <｜tool▁call▁end｜>` per call: `function<｜tool▁sep｜>name` and a ```json fenced body
    (V3, R1) or `name<｜tool▁sep｜>{...}` (V3.1)."""
    calls = []
    for m in _DS_CALL.finditer(text):
        name = (m["name"] or m["name31"]).strip()
        args = _json(m["args"] if m["name"] else m["args31"])
        if not name or not isinstance(args, dict):
            return None
        calls.append((name, args))
    return calls


@_whole
def _granite(text: str, params: Params) -> Calls | None:
    """The answer is `<|tool_call|>` (Granite 3.0) or `<tool_call>` (3.1+) and a JSON
    array of {"name", "arguments"}."""
    body = text.strip()
    for marker in ("<|tool_call|>", "<tool_call>"):
        if body.startswith(marker):
            items = _json(body[len(marker):])
            if isinstance(items, list) and items and all(
                    isinstance(x, dict) and isinstance(x.get("name"), str)
                    and isinstance(x.get("arguments"), dict) for x in items):
                return [(x["name"], x["arguments"]) for x in items]
    return None


_KIMI_BEGIN = "<|tool_calls_section_begin|>"
_KIMI_CALL = re.compile(r"<\|tool_call_begin\|>\s*([^<]+?)\s*<\|tool_call_argument_begin\|>"
                        r"(.*?)<\|tool_call_end\|>", re.DOTALL)


@_after(_KIMI_BEGIN)
def _kimi_k2(text: str, params: Params) -> Calls | None:
    """Content, then `<|tool_calls_section_begin|>` and per call `<|tool_call_begin|>
    functions.name:index<|tool_call_argument_begin|>{...}<|tool_call_end|>`."""
    calls = []
    for call_id, body in _KIMI_CALL.findall(text):
        name, args = call_id.split(":")[0].split(".")[-1], _json(body)
        if not name or not isinstance(args, dict):
            return None
        calls.append((name, args))
    return calls


_HARMONY_CALL = re.compile(re.escape(harmony.CALL_OPEN) + r"([^\s<]+)<\|channel\|>commentary "
                           r"json<\|message\|>(.*?)(?:<\|call\|>|$)", re.DOTALL)


@_after(harmony.CALL_OPEN)
def _openai(text: str, params: Params) -> Calls | None:
    """gpt-oss's calls, as the `openai_gptoss` reasoning parser passes them on (harmony.py
    `call_text`): the answer's text, then one message per call."""
    calls = []
    for name, body in _HARMONY_CALL.findall(text):
        args = _json(body)
        if not isinstance(args, dict):
            return None
        calls.append((name, args))
    return calls


_GLM_CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)
_GLM_ARG = re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.DOTALL)


@_after("<tool_call>")
def _glm45(text: str, params: Params) -> Calls | None:
    """Content, then `<tool_call>name` with `<arg_key>k</arg_key><arg_value>v</arg_value>`
    pairs per call (GLM-4.5 to 4.7); values typed by the tool's schema."""
    calls = []
    for body in _GLM_CALL.findall(text):
        name, _, rest = body.partition("<arg_key>")
        name = name.strip()
        if not name or "<" in name or "\n" in name:
            return None
        pairs = _GLM_ARG.findall("<arg_key>" + rest) if rest else []
        calls.append((name, {k.strip(): _typed(v, name, k.strip(), params)
                             for k, v in pairs}))
    return calls


_QC_FUNC = re.compile(r"<function=([^>\n]+)>(.*?)(?:</function>|$)", re.DOTALL)
_QC_PARAM = re.compile(r"<parameter=([^>\n]+)>(.*?)(?:</parameter>|(?=<parameter=)|$)",
                       re.DOTALL)


@_after("<tool_call>")
def _qwen3_coder(text: str, params: Params) -> Calls | None:
    """Content, then `<tool_call><function=name><parameter=k>v</parameter>...</function>
    </tool_call>` per call (Qwen3-Coder, Qwen3.5); values typed by the tool's schema."""
    return [_text_call(name, body, _QC_PARAM, params) for name, body in _QC_FUNC.findall(text)]


_MM_BLOCK = re.compile(r"<minimax:tool_call>(.*?)(?:</minimax:tool_call>|$)", re.DOTALL)
_MM_INVOKE = re.compile(r'<invoke name="([^"\n]+)">(.*?)(?:</invoke>|$)', re.DOTALL)
_MM_PARAM = re.compile(r'<parameter name="([^"\n]+)">(.*?)'
                       r'(?:</parameter>|(?=<parameter name=)|$)', re.DOTALL)


@_after("<minimax:tool_call>")
def _minimax_m2(text: str, params: Params) -> Calls | None:
    """Content, then `<minimax:tool_call>` blocks of `<invoke name="f">` calls with
    `<parameter name="k">v</parameter>` values (MiniMax-M2); values typed by the tool's
    schema."""
    return [_text_call(name, body, _MM_PARAM, params)
            for block in _MM_BLOCK.findall(text) for name, body in _MM_INVOKE.findall(block)]


def _text_call(name: str, body: str, param: re.Pattern, params: Params) -> tuple[str, Any]:
    """A call whose `body` writes each value as text (`param` finds (key, value) pairs; a
    newline just inside the tags is layout): values typed by the tool's schema."""
    name = name.strip()
    return name, {k.strip(): _typed(v.removeprefix("\n").removesuffix("\n"), name, k.strip(),
                                    params) for k, v in param.findall(body)}


def _typed(value: str, name: str, key: str, params: Params) -> Any:
    """A parameter written as text, as the tool's schema types it: a string stays the
    text; other types are read as JSON (the text again where it is none)."""
    prop = (params.get(name) or {}).get("properties", {}).get(key, {})
    kind = prop.get("type") if isinstance(prop, dict) else None
    if kind == "string" or kind is None and _json(value) is None:
        return value
    got = _json(value)
    return value if got is None and value.strip() != "null" else got


def _json(text: str) -> Any:
    """The JSON value `text` is (surrounding whitespace allowed), None if it is not one."""
    try:
        return json.loads(text)
    except ValueError:
        return None


PARSERS: dict[str, Parser] = {
    "hermes": Parser(_hermes, ("<tool_call>",), at_start=False),
    "llama3_json": Parser(_llama3_json, ("<|python_tag|>", "{"), at_start=True),
    "mistral": Parser(_mistral, (_MISTRAL,), at_start=False),
    "pythonic": Parser(_pythonic, ("<|python_start|>", "["), at_start=True),
    "deepseek_v3": Parser(_deepseek, (_DS_BEGIN,), at_start=False),
    "deepseek_v31": Parser(_deepseek, (_DS_BEGIN,), at_start=False),
    "granite": Parser(_granite, ("<|tool_call|>", "<tool_call>"), at_start=True),
    "glm45": Parser(_glm45, ("<tool_call>",), at_start=False),
    "qwen3_coder": Parser(_qwen3_coder, ("<tool_call>",), at_start=False),
    "kimi_k2": Parser(_kimi_k2, (_KIMI_BEGIN,), at_start=False),
    "minimax_m2": Parser(_minimax_m2, ("<minimax:tool_call>",), at_start=False),
    "openai": Parser(_openai, (harmony.CALL_OPEN,), at_start=False),
}
PARSERS["llama4_json"] = PARSERS["llama3_json"]  # vLLM's names for Llama 4's formats
PARSERS["llama4_pythonic"] = PARSERS["pythonic"]
