"""Tool (function) calling for chat requests: OpenAI's `tools` and `tool_choice`.

    ToolCalling.from_request(tools, tool_choice, parallel_tool_calls, parser="hermes")

The three ways a model's output becomes tool calls, as in vLLM:
- a named function (`tool_choice={"type": "function", "function": {"name": f}}`): the
  output is constrained to f's parameters schema and is the call's arguments;
- `"required"`: the output is constrained to a JSON array of `{"name", "arguments"}`
  objects, one schema alternative per tool (one item when parallel_tool_calls is false);
- `"auto"`: the model decides; a tool-call parser reads its own format from free text
  (tool_parsers.py: `hermes`, `llama3_json`, `mistral`, `pythonic`, `glm45`, ... with
  vLLM's names).
  Without a parser "auto" is refused, as vLLM refuses it without --tool-call-parser.
The first two work with any model (the constraint guarantees a parseable call, not a good
one); the tools also go to the chat template (`tools`), which tells the model about them if
the template knows how. No JAX and no HTTP here.
"""

from __future__ import annotations

import dataclasses
import json
import re
import uuid
from typing import Any

from jaxinfer import tool_parsers
from jaxinfer.errors import BadRequestError
from jaxinfer.structured import Constraint

PARSERS = tuple(tool_parsers.PARSERS)
MAX_TOOLS = 128  # OpenAI's limit per request
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_EMPTY_PARAMS = {"type": "object", "properties": {}}


def check_tools(tools: Any) -> list[dict[str, Any]]:
    """OpenAI's `tools`, validated: a list of `{"type": "function", "function": {"name",
    "description"?, "parameters"?}}` with distinct names. Returned as the chat template
    gets them (HF's `apply_chat_template(tools=...)`)."""
    if not isinstance(tools, list) or not tools:
        raise BadRequestError(f"tools must be a non-empty list, got {tools!r}", "tools")
    if len(tools) > MAX_TOOLS:
        raise BadRequestError(f"at most {MAX_TOOLS} tools, got {len(tools)}", "tools")
    seen: set[str] = set()
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(fn, dict):
            raise BadRequestError(f"tools[{i}] must be {{\"type\": \"function\", \"function\": "
                                  f"{{...}}}}, got {t!r}", f"tools.{i}")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise BadRequestError(f"tools[{i}].function.name must be 1-64 letters, digits, _ "
                                  f"or -, got {name!r}", f"tools.{i}.function.name")
        if name in seen:
            raise BadRequestError(f"tool name {name!r} appears twice", f"tools.{i}.function.name")
        seen.add(name)
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise BadRequestError(f"tools[{i}].function.parameters must be a JSON schema "
                                  f"object, got {params!r}", f"tools.{i}.function.parameters")
        desc = fn.get("description")
        if desc is not None and not isinstance(desc, str):
            raise BadRequestError(f"tools[{i}].function.description must be a string",
                                  f"tools.{i}.function.description")
    return tools


def check_parsers(tool_call_parser: str | None, reasoning_parser: str | None) -> None:
    """The server's and batch jobs' parser settings: a known tool-call parser, and
    `openai` only with the `openai_gptoss` reasoning parser that passes its calls on."""
    if tool_call_parser is not None and tool_call_parser not in PARSERS:
        raise BadRequestError(f"unknown tool_call_parser {tool_call_parser!r}; known: "
                              f"{list(PARSERS)}", "tool_call_parser")
    if tool_call_parser == "openai" and reasoning_parser != "openai_gptoss":
        raise BadRequestError("tool_call_parser 'openai' reads the calls the 'openai_gptoss' "
                              "reasoning parser passes on; add reasoning_parser "
                              "'openai_gptoss'", "tool_call_parser")


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def call(name: str, arguments: Any, call_id: str | None = None) -> dict[str, Any]:
    """One entry of a message's `tool_calls`; `arguments` is a JSON string in OpenAI's
    format (a parsed value is serialised)."""
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False, separators=(",", ":"))
    return {"id": call_id or new_call_id(), "type": "function",
            "function": {"name": name, "arguments": arguments}}


@dataclasses.dataclass(frozen=True)
class ToolCalling:
    """A chat request's tool settings. `mode`: "none", "auto", "required" or "named"
    (then `name` is the function); `parser` reads "auto" output."""

    tools: tuple[dict[str, Any], ...]
    mode: str
    name: str | None = None
    parallel: bool = True
    parser: str | None = None

    @classmethod
    def from_request(cls, tools: Any, tool_choice: Any, parallel_tool_calls: bool | None = None,
                     parser: str | None = None) -> ToolCalling | None:
        """None without tools. tool_choice defaults to "auto" when tools are given (OpenAI's
        default); "auto" needs a parser."""
        if tools is None or tools == []:
            if tool_choice not in (None, "none"):
                raise BadRequestError("tool_choice needs tools", "tool_choice")
            return None
        tools = check_tools(tools)
        names = [t["function"]["name"] for t in tools]
        choice = "auto" if tool_choice is None else tool_choice
        name = None
        if isinstance(choice, dict):
            fn = choice.get("function")
            name = fn.get("name") if isinstance(fn, dict) else None
            if choice.get("type") != "function" or not isinstance(name, str):
                raise BadRequestError(f"tool_choice must be \"none\", \"auto\", \"required\" or "
                                      f"{{\"type\": \"function\", \"function\": {{\"name\": ...}}}}"
                                      f", got {choice!r}", "tool_choice")
            if name not in names:
                raise BadRequestError(f"tool_choice names {name!r}, which is not among the "
                                      f"tools {names}", "tool_choice")
            choice = "named"
        elif choice not in ("none", "auto", "required"):
            raise BadRequestError(f"tool_choice must be \"none\", \"auto\", \"required\" or a "
                                  f"named function, got {choice!r}", "tool_choice")
        if parser is not None and parser not in PARSERS:
            raise BadRequestError(f"unknown tool-call parser {parser!r}; known: {PARSERS}",
                                  "tool_call_parser")
        if choice == "auto" and parser is None:
            raise BadRequestError(
                "tool_choice \"auto\" (the default when tools are given) needs a tool-call "
                "parser for the model's format (serve.py --tool_call_parser=hermes); use "
                "tool_choice \"required\" or a named function, which work with any model",
                "tool_choice")
        if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
            raise BadRequestError(f"parallel_tool_calls must be a boolean, got "
                                  f"{parallel_tool_calls!r}", "parallel_tool_calls")
        return cls(tuple(tools), choice, name, parallel_tool_calls is not False, parser)

    def _params(self, name: str) -> dict[str, Any]:
        for t in self.tools:
            if t["function"]["name"] == name:
                return t["function"].get("parameters") or _EMPTY_PARAMS
        raise KeyError(name)

    def constraint(self) -> Constraint | None:
        """What the output must match: the named function's parameters, or for "required"
        an array of calls; None for "auto" and "none" (free text)."""
        if self.mode == "named":
            return Constraint(json_schema=_compact(self._params(self.name)))
        if self.mode != "required":
            return None
        items = [{"type": "object", "properties": {
            "name": {"type": "string", "enum": [t["function"]["name"]]},
            "arguments": self._params(t["function"]["name"])},
            "required": ["name", "arguments"], "additionalProperties": False}
            for t in self.tools]
        schema: dict[str, Any] = {"type": "array", "minItems": 1,
                                  "items": items[0] if len(items) == 1 else {"anyOf": items}}
        if not self.parallel:
            schema["maxItems"] = 1
        return Constraint(json_schema=_compact(schema))

    @property
    def keeps_special_tokens(self) -> bool:
        """Whether the text must keep special tokens: a parser's markers may be ones
        (Qwen's `<tool_call>`), and vLLM's hermes parser keeps them too."""
        return self.mode == "auto" and self.parser is not None

    def parse(self, text: str) -> tuple[str | None, list[dict[str, Any]]]:
        """(content, tool_calls) of a whole output. A named call is a call even when
        max_tokens cut its arguments short (as OpenAI and vLLM answer, finish_reason
        "length", and as its stream already said); other output that does not parse (a
        cut "required" array, an "auto" answer that is not a call) stays content."""
        if self.mode == "named":
            return None, [call(self.name, text)]
        if self.mode == "required":
            try:
                return None, [call(x["name"], x["arguments"]) for x in json.loads(text)]
            except (ValueError, TypeError, KeyError):
                return text, []
        if self.mode == "auto":
            params = {t["function"]["name"]: self._params(t["function"]["name"])
                      for t in self.tools}
            content, calls = tool_parsers.PARSERS[self.parser].parse(text, params)
            return content, [call(name, args) for name, args in calls]
        return text, []

    def finish_reason(self, engine_reason: str, calls: list[dict[str, Any]]) -> str:
        """OpenAI's: "tool_calls" when the model chose to call (auto, required); a named
        call ends as the engine's reason ("stop"), as OpenAI forced calls do."""
        return "tool_calls" if calls and self.mode in ("auto", "required") else engine_reason

    def stream(self) -> ToolStream:
        return ToolStream(self)


def _compact(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema with llguidance's compact JSON (no free whitespace between tokens): a
    call's arguments are read by programs, and a small model may otherwise emit spaces
    until max_tokens. A schema's own `x-guidance` options win."""
    return {**schema, "x-guidance": {"whitespace_flexible": False,
                                     **schema.get("x-guidance", {})}}


class ToolStream:
    """Streams one choice's output as chat deltas (`{"content": ...}` or
    `{"tool_calls": [...]}`): a named call's arguments stream as they come; "required"
    calls come whole at the end (a partial JSON array is not yet a call); "auto" streams
    content until a parser marker (or a text that may begin one) and sends the calls at the
    end; "none" streams content."""

    def __init__(self, tc: ToolCalling):
        self.tc, self.text, self.sent = tc, "", 0
        self._id = new_call_id()

    def feed(self, delta: str) -> list[dict[str, Any]]:
        self.text += delta
        mode = self.tc.mode
        if mode == "named":
            out = []
            if self.sent == 0:
                out.append({"tool_calls": [{"index": 0, **call(self.tc.name, "", self._id)}]})
                self.sent = 1
            if delta:
                out.append({"tool_calls": [{"index": 0, "function": {"arguments": delta}}]})
            return out
        if mode == "required":
            return []
        safe = len(self.text) if mode == "none" else \
            tool_parsers.PARSERS[self.tc.parser].safe_prefix(self.text)
        new, self.sent = self.text[self.sent:safe], max(self.sent, safe)
        return [{"content": new}] if new else []

    def finish(self, engine_reason: str) -> tuple[list[dict[str, Any]], str]:
        """The last deltas and the choice's finish_reason."""
        if self.tc.mode == "named":
            _, calls = self.tc.parse(self.text)
            return self.feed("") if not self.sent else [], self.tc.finish_reason(
                engine_reason, calls)
        _, calls = self.tc.parse(self.text)
        out: list[dict[str, Any]] = []
        if not calls:  # everything held back is content after all
            rest = self.text[self.sent:]
            self.sent = len(self.text)
            return ([{"content": rest}] if rest else []), engine_reason
        if self.tc.mode == "auto":  # content before the marker not yet sent
            start = tool_parsers.PARSERS[self.tc.parser].calls_start(self.text)
            rest = self.text[self.sent:max(start, self.sent)]
            if rest.strip():
                out.append({"content": rest})
        out.append({"tool_calls": [{"index": i, **c} for i, c in enumerate(calls)]})
        return out, self.tc.finish_reason(engine_reason, calls)
