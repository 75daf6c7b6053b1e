"""OpenAI's Responses API (`POST /v1/responses`): request model, response body, stream events,
and the in-memory store that lets a request continue a stored conversation.

A request's `instructions` and `input` (a string, or message items with text parts, and
earlier `function_call` / `function_call_output` items) become the same chat messages a
chat completion renders; `text.format` becomes a structured-output Constraint;
`max_output_tokens` bounds the answer. The answer is one `message` output item holding one
`output_text` part, or with function `tools` (tool_calls.py, as in chat) `function_call`
items, after a message where the model wrote text first; with the server's reasoning
parser a `reasoning` item (reasoning_text) comes first.

Responses are stored unless `store: false` (OpenAI's default), in process memory, the
latest `ResponseStore.max_items` of them: `previous_response_id` continues one (its
input and output, not its instructions, as OpenAI does), `GET /v1/responses/{id}` returns
one, `DELETE` forgets it. An id that is unknown or was evicted is a 404, never an answer
without its history. Built-in tools (web search, files, ...) and background runs are
refused (400).

Streaming sends OpenAI's semantic events (`event: <type>` + `data: {...}` with a
`sequence_number`), from `response.created` to `response.completed` (or
`response.incomplete` when max_output_tokens cut it), with no `[DONE]` sentinel.
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from typing import Any

from pydantic import BaseModel, ConfigDict

from jaxinfer.engine import EngineResult
from jaxinfer.errors import BadRequestError
from jaxinfer.openai_api import (
    MAX_LOGPROBS,
    ApiError,
    ChatDeltas,
    _Request,
    logprobs_body,
    template_call,
)
from jaxinfer.reasoning import ReasoningParser
from jaxinfer.structured import Constraint, from_openai
from jaxinfer.tool_calls import ToolCalling

LOGPROBS_INCLUDE = "message.output_text.logprobs"
_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}


class InputPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    type: str
    text: str | None = None


class InputItem(BaseModel):
    """A message item (`{"role", "content"}`, `"type": "message"` optional), or an earlier
    function call (`function_call`: call_id, name, arguments) or its result
    (`function_call_output`: call_id, output); other item types (reasoning, references)
    are refused."""

    model_config = ConfigDict(strict=True, extra="allow")
    type: str = "message"
    role: str | None = None
    content: str | list[InputPart] | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | None = None


class ResponsesRequest(_Request):
    input: str | list[InputItem]
    instructions: str | None = None
    max_output_tokens: int | None = None
    text: dict[str, Any] | None = None
    top_logprobs: int | None = None
    include: list[str] | None = None
    previous_response_id: str | None = None
    store: bool | None = None
    background: bool | None = None
    truncation: str | None = None
    metadata: dict[str, str] | None = None
    parallel_tool_calls: bool | None = None
    user: str | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None

    def chat_tools(self) -> list[dict[str, Any]] | None:
        """The function tools in chat's form (this API flattens `function`); built-in
        tools are a 400."""
        out = []
        for i, t in enumerate(self.tools or []):
            kind = t.get("type") if isinstance(t, dict) else t
            if kind != "function":
                raise ApiError(400, f"tools[{i}]: only function tools are supported, got "
                               f"{kind!r}", f"tools.{i}")
            out.append({"type": "function", "function": {
                k: t[k] for k in ("name", "description", "parameters") if k in t}})
        return out or None

    def tool_calling(self, parser: str | None = None) -> ToolCalling | None:
        """As ChatRequest.tool_calling; a named choice is `{"type": "function", "name"}`."""
        choice = self.tool_choice
        if isinstance(choice, dict) and choice.get("type") == "function":
            choice = {"type": "function", "function": {"name": choice.get("name")}}
        tools = flat_tool_calling(self.chat_tools(), choice, self.parallel_tool_calls,
                                  parser)
        if tools is not None and tools.mode != "none" and self.num_logprobs() is not None:
            raise ApiError(400, "logprobs are not supported with tools", "top_logprobs")
        return tools

    def chat_options(self) -> dict[str, Any]:
        return {"tools": self.chat_tools()}

    def check_supported(self) -> None:
        super().check_supported()
        if self.background:
            raise ApiError(400, "background responses are not supported", "background")
        if self.use_beam_search:
            raise ApiError(400, "use_beam_search is not supported by the Responses API; use "
                           "/v1/chat/completions", "use_beam_search")
        if self.truncation not in (None, "disabled"):
            raise ApiError(400, f"truncation must be 'disabled', got {self.truncation!r}",
                           "truncation")
        for name in ("max_tokens", "n", "response_format"):  # chat's names for the fields
            if getattr(self, name) is not None:
                raise ApiError(400, f"{name} is not a Responses API field; use "
                               f"{_OWN_NAME[name]}", name)

    def token_budget(self) -> int | None:
        """max_tokens for the engine; None fills the slot."""
        n = self.max_output_tokens
        if n is not None and n < 1:
            raise ApiError(400, f"max_output_tokens must be at least 1, got {n}",
                           "max_output_tokens")
        return n

    def num_logprobs(self) -> int | None:
        """Logprobs when `include` asks for them or top_logprobs is set."""
        n = self.top_logprobs
        if n is not None and not 0 <= n <= MAX_LOGPROBS:
            raise ApiError(400, f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {n}",
                           "top_logprobs")
        wanted = LOGPROBS_INCLUDE in (self.include or []) or n is not None
        return (n or 0) if wanted else None

    def constraint(self) -> Constraint | None:
        """`text.format` (OpenAI's json_schema / json_object) as response_format says it,
        or vLLM's guided_* fields."""
        fmt = (self.text or {}).get("format")
        rf = fmt
        if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
            rf = {"type": "json_schema", "json_schema": {"name": fmt.get("name"),
                                                         "schema": fmt.get("schema")}}
        try:
            return from_openai(rf, self.guided_json, self.guided_regex, self.guided_choice,
                               self.guided_grammar)
        except BadRequestError as e:
            msg = str(e).replace("response_format", "text.format")
            raise ApiError(400, msg, self.constraint_param()) from e

    def constraint_param(self) -> str:
        name = super().constraint_param()
        return "text" if name == "response_format" else name

    def messages(self, history: list[dict[str, str]] = ()) -> list[dict[str, str]]:
        """The chat-template messages: `instructions` (a system message), the stored
        conversation this request continues, and `input`."""
        system = [{"role": "system", "content": self.instructions}] if self.instructions else []
        msgs = [*system, *history, *self.input_messages()]
        calls: set[str] = set()
        for m in msgs:  # a function_call_output answers an earlier call (OpenAI's rule)
            calls.update(c.get("id") for c in m.get("tool_calls", ()))
            if m["role"] == "tool" and m["tool_call_id"] not in calls:
                raise ApiError(400, f"no function call with call_id {m['tool_call_id']!r} "
                               "comes before its function_call_output", "input")
        return msgs

    def input_messages(self) -> list[dict[str, Any]]:
        """`input` as chat-template messages: function calls join an assistant message's
        tool_calls, their outputs are `tool` messages."""
        if isinstance(self.input, str):
            return [{"role": "user", "content": self.input}]
        if not self.input:
            raise ApiError(400, "input is empty", "input")
        out: list[dict[str, Any]] = []
        for i, item in enumerate(self.input):
            if item.type in ("function_call", "function_call_output"):
                out.append(_tool_message(item, i, out))
                if out[-1] is None:
                    out.pop()
                continue
            if item.type != "message" or item.role not in _ROLES:
                what = item.type if item.type != "message" else f"role {item.role!r}"
                raise ApiError(400, f"input item {i}: only messages with role user, "
                               f"assistant, system or developer are supported, got {what}",
                               f"input.{i}")
            content = item.content
            if isinstance(content, list):
                bad = [p.type for p in content
                       if p.type not in ("input_text", "output_text", "text") or p.text is None]
                if bad:
                    raise ApiError(400, f"input item {i}: only text content parts are "
                                   f"supported, got {bad[0]!r}", f"input.{i}.content")
                content = "".join(p.text or "" for p in content)
            out.append({"role": _ROLES[item.role], "content": content or ""})
        return out


_OWN_NAME = {"max_tokens": "max_output_tokens", "n": "several requests",
             "response_format": "text.format"}


def _tool_message(item: InputItem, i: int, out: list[dict[str, Any]]) -> dict[str, Any] | None:
    """A function_call item as a tool call of an assistant message (the one just before,
    if it holds calls already: None then), or a function_call_output as a tool message."""
    if item.call_id is None:
        raise ApiError(400, f"input item {i}: {item.type} needs call_id", f"input.{i}")
    if item.type == "function_call_output":
        return {"role": "tool", "tool_call_id": item.call_id, "content": item.output or ""}
    call = template_call({"id": item.call_id, "type": "function", "function": {
        "name": item.name, "arguments": item.arguments or "{}"}}, f"input.{i}")
    if out and out[-1]["role"] == "assistant":
        out[-1].setdefault("tool_calls", []).append(call)
        return None
    return {"role": "assistant", "content": "", "tool_calls": [call]}


def flat_tool_calling(tools: list[dict[str, Any]] | None, choice: Any,
                      parallel: bool | None, parser: str | None) -> ToolCalling | None:
    """ToolCalling.from_request for an API whose tools are not wrapped in `function` (this
    one, Anthropic's): a 400 naming the field as that API spells it."""
    try:
        return ToolCalling.from_request(tools, choice, parallel, parser)
    except BadRequestError as e:
        raise ApiError(400, str(e).replace("function.", ""),
                       (e.param or "").replace(".function", "")) from e


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def logprobs_list(entries, tokenizer) -> list[dict[str, Any]]:
    """output_text.logprobs: chat's per-token entries (token, bytes, logprob, top)."""
    return logprobs_body(entries, tokenizer, chat=True)["content"]


class ResponseBuilder:
    """The response object of one request, as it stands at each stage of its life; the
    stream's events and the non-streamed body come from the same fields."""

    def __init__(self, body: ResponsesRequest, model: str, stored: bool = False,
                 tools: ToolCalling | None = None, reasoning: ReasoningParser | None = None):
        self.body, self.model, self.sampling = body, model, body.sampling()
        self.stored = stored
        self.id, self.msg_id = new_id("resp"), new_id("msg")
        self.created = time.time()
        self.seq = 0
        # With tools or a reasoning parser the output's items (reasoning, message, calls)
        # are known only as the text comes: chat's deltas split it (openai_api.ChatDeltas).
        self.tools = tools if tools is not None and tools.mode != "none" else None
        self.reasoning = reasoning
        self.split = (ChatDeltas(self.tools, reasoning)
                      if self.tools is not None or reasoning is not None else None)
        self.items: list[dict[str, Any]] = []  # streamed output items, the open one last

    def usage(self, result: EngineResult) -> dict[str, Any]:
        n = len(result.token_ids)
        return {"input_tokens": result.prompt_tokens,
                "input_tokens_details": {"cached_tokens": result.metrics.cached_tokens},
                "output_tokens": n, "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": result.prompt_tokens + n}

    def part(self, text: str, logprobs: list[dict[str, Any]] | None) -> dict[str, Any]:
        p: dict[str, Any] = {"type": "output_text", "text": text, "annotations": []}
        if logprobs is not None:
            p["logprobs"] = logprobs
        return p

    def item(self, status: str, parts: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.msg_id, "type": "message", "role": "assistant", "status": status,
                "content": parts}

    def response(self, status: str, output: list[dict[str, Any]],
                 result: EngineResult | None = None) -> dict[str, Any]:
        b, sp = self.body, self.sampling
        fmt = (b.text or {}).get("format") or {"type": "text"}
        done = status in ("completed", "incomplete")
        return {
            "id": self.id, "object": "response", "created_at": int(self.created),
            "status": status, "completed_at": int(time.time()) if done else None,
            "error": None,
            "incomplete_details": ({"reason": "max_output_tokens"} if status == "incomplete"
                                   else None),
            "instructions": b.instructions, "max_output_tokens": b.max_output_tokens,
            "model": self.model, "output": output,
            "parallel_tool_calls": self.tools.parallel if self.tools is not None else False,
            "previous_response_id": b.previous_response_id, "reasoning": None,
            "store": self.stored,
            "temperature": sp.temperature, "top_p": sp.top_p, "text": {"format": fmt},
            "tool_choice": b.tool_choice or ("auto" if b.tools else "none"),
            "tools": b.tools or [], "top_logprobs": b.top_logprobs,
            "truncation": "disabled", "user": b.user, "metadata": b.metadata or {},
            "usage": self.usage(result) if result is not None else None}

    def call_item(self, call: dict[str, Any], status: str) -> dict[str, Any]:
        """A function_call output item of a chat tool call."""
        fn = call["function"]
        return {"id": new_id("fc"), "type": "function_call", "status": status,
                "call_id": call["id"], "name": fn["name"], "arguments": fn["arguments"]}

    def final(self, result: EngineResult, tokenizer) -> dict[str, Any]:
        """The whole response of a finished request."""
        status = "incomplete" if result.finish_reason == "length" else "completed"
        lp = (logprobs_list(result.logprobs, tokenizer) if result.logprobs is not None
              else None)
        if self.split is None:
            return self.response(status, [self.item(status, [self.part(result.text, lp)])],
                                 result)
        thought, text = (self.reasoning.split(result.text) if self.reasoning is not None
                         else (None, result.text))
        content, calls = self.tools.parse(text) if self.tools is not None else (text, [])
        items = [self.reasoning_item(status, thought)] if thought is not None else []
        if content or not calls:
            items.append(self.item(status, [self.part(content or "", None)]))
        return self.response(status, items + [self.call_item(c, status) for c in calls],
                             result)

    def reasoning_item(self, status: str, text: str) -> dict[str, Any]:
        """A reasoning output item with the model's own reasoning text (as open-weight
        reasoning models return it through this API; no summary)."""
        return {"id": new_id("rs"), "type": "reasoning", "status": status, "summary": [],
                "content": [{"type": "reasoning_text", "text": text}]}

    def conversation_turn(self, final: dict[str, Any]) -> dict[str, Any]:
        """The answer as the chat message a continuing request's template gets."""
        text = "".join(p["text"] for it in final["output"] if it["type"] == "message"
                       for p in it["content"])
        calls = [template_call({"id": it["call_id"], "type": "function", "function": {
            "name": it["name"], "arguments": it["arguments"]}}, "output")
            for it in final["output"] if it["type"] == "function_call"]
        return {"role": "assistant", "content": text, **({"tool_calls": calls} if calls
                                                        else {})}

    # ---- stream events -------------------------------------------------------------------
    def event(self, type_: str, **fields: Any) -> tuple[str, dict[str, Any]]:
        ev = {"type": type_, "sequence_number": self.seq, **fields}
        self.seq += 1
        return type_, ev

    def opening(self, want_logprobs: bool) -> list[tuple[str, dict[str, Any]]]:
        """created, in_progress, the message item and its text part added (with tools the
        items open as the text shows what they are)."""
        where = {"item_id": self.msg_id, "output_index": 0, "content_index": 0}
        head = [self.event("response.created", response=self.response("in_progress", [])),
                self.event("response.in_progress", response=self.response("in_progress", []))]
        if self.split is not None:
            return head
        return head + [self.event("response.output_item.added", output_index=0,
                                  item=self.item("in_progress", [])),
                       self.event("response.content_part.added", **where,
                                  part=self.part("", [] if want_logprobs else None))]

    def delta(self, text: str, logprobs: list[dict[str, Any]]
              ) -> list[tuple[str, dict[str, Any]]]:
        if self.split is not None:
            return self._split_events(self.split.feed(text))
        return [self.event("response.output_text.delta", item_id=self.msg_id, output_index=0,
                           content_index=0, delta=text, logprobs=logprobs)]

    # -- with tools or reasoning: chat deltas -> items opened, extended and closed --------
    def _split_events(self, deltas: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
        out = []
        for d in deltas:
            if "reasoning_content" in d:
                if not self.items or self.items[-1]["type"] != "reasoning":
                    out += self._close_open() + self._open(
                        {**self.reasoning_item("in_progress", ""), "content": []})
                    self.items[-1]["content"] = [{"type": "reasoning_text", "text": ""}]
                self.items[-1]["content"][0]["text"] += d["reasoning_content"]
                out.append(self.event("response.reasoning_text.delta",
                                      **self._where(content_index=0),
                                      delta=d["reasoning_content"]))
            if "content" in d:
                if not self.items or self.items[-1]["type"] != "message":
                    out += self._close_open() + self._open(self.item("in_progress", []))
                    out.append(self.event("response.content_part.added",
                                          **self._where(content_index=0),
                                          part=self.part("", None)))
                    self.items[-1]["content"] = [self.part("", None)]
                self.items[-1]["content"][0]["text"] += d["content"]
                out.append(self.event("response.output_text.delta",
                                      **self._where(content_index=0), delta=d["content"],
                                      logprobs=[]))
            for c in d.get("tool_calls", []):
                if "id" in c:  # a new call: its header (and arguments, if whole)
                    args = c["function"]["arguments"]
                    out += self._close_open() + self._open(
                        self.call_item({**c, "function": {**c["function"], "arguments": ""}},
                                       "in_progress"))
                    c = {"function": {"arguments": args}}
                delta = c["function"]["arguments"]
                if delta:
                    self.items[-1]["arguments"] += delta
                    out.append(self.event("response.function_call_arguments.delta",
                                          **self._where(), delta=delta))
        return out

    def _where(self, **kw: Any) -> dict[str, Any]:
        return {"item_id": self.items[-1]["id"], "output_index": len(self.items) - 1, **kw}

    def _open(self, item: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        self.items.append(item)
        return [self.event("response.output_item.added", output_index=len(self.items) - 1,
                           item=dict(item))]

    def _close_open(self, status: str = "completed") -> list[tuple[str, dict[str, Any]]]:
        if not self.items or self.items[-1]["status"] != "in_progress":
            return []
        it = self.items[-1]
        it["status"] = status
        if it["type"] == "reasoning":
            out = [self.event("response.reasoning_text.done", **self._where(content_index=0),
                              text=it["content"][0]["text"])]
        elif it["type"] == "message":
            part = it["content"][0]
            out = [self.event("response.output_text.done", **self._where(content_index=0),
                              text=part["text"], logprobs=[]),
                   self.event("response.content_part.done", **self._where(content_index=0),
                              part=part)]
        else:
            out = [self.event("response.function_call_arguments.done", **self._where(),
                              arguments=it["arguments"])]
        return out + [self.event("response.output_item.done",
                                 output_index=len(self.items) - 1, item=it)]

    def _split_closing(self, result: EngineResult) -> list[tuple[str, dict[str, Any]]]:
        status = "incomplete" if result.finish_reason == "length" else "completed"
        out = self._split_events(self.split.finish(result.finish_reason)[0])
        if not any(it["type"] != "reasoning" for it in self.items):  # no answer: an empty one
            out += self._split_events([{"content": ""}])
        out += self._close_open(status)
        final = self.response(status, self.items, result)
        return out + [self.event(f"response.{status}", response=final)]

    def closing(self, result: EngineResult, tokenizer) -> list[tuple[str, dict[str, Any]]]:
        """The text, part and item done, then response.completed (or .incomplete)."""
        if self.split is not None:
            return self._split_closing(result)
        final = self.final(result, tokenizer)
        item = final["output"][0]
        part = item["content"][0]
        where = {"item_id": self.msg_id, "output_index": 0, "content_index": 0}
        return [self.event("response.output_text.done", **where, text=part["text"],
                           logprobs=part.get("logprobs", [])),
                self.event("response.content_part.done", **where, part=part),
                self.event("response.output_item.done", output_index=0, item=item),
                self.event(f"response.{final['status']}", response=final)]

    def error(self, message: str, code: str | None) -> tuple[str, dict[str, Any]]:
        return self.event("error", code=code, message=message, param=None)


class ResponseStore:
    """The latest `max_items` stored responses, each with the conversation it ends (its
    messages without instructions, its answer last). Used from the server's event loop
    only, so it needs no lock."""

    def __init__(self, max_items: int = 1024):
        self.max_items = max_items
        self._items: OrderedDict[str, tuple[dict[str, Any], list[dict[str, str]]]] = (
            OrderedDict())

    def _get(self, rid: str, param: str | None) -> tuple[dict[str, Any], list[dict[str, str]]]:
        if rid not in self._items:
            raise ApiError(404, f"response {rid!r} not found: it was not stored, or was "
                           f"deleted or evicted (this server keeps the latest "
                           f"{self.max_items})", param, "response_not_found")
        return self._items[rid]

    def history(self, rid: str) -> list[dict[str, str]]:
        """The conversation response `rid` ends, for a request that continues it."""
        return list(self._get(rid, "previous_response_id")[1])

    def body(self, rid: str) -> dict[str, Any]:
        return self._get(rid, None)[0]

    def put(self, body: dict[str, Any], conversation: list[dict[str, str]]) -> None:
        self._items[body["id"]] = (body, conversation)
        while len(self._items) > self.max_items:
            self._items.popitem(last=False)

    def delete(self, rid: str) -> None:
        self._get(rid, None)
        del self._items[rid]
