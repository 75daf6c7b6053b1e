"""OpenAI's Responses API (`POST /v1/responses`): request model, response body, stream events,
and the in-memory store that lets a request continue a stored conversation.

A request's `instructions` and `input` (a string, or message items with text parts) become
the same chat messages a chat completion renders; `text.format` becomes a structured-output
Constraint; `max_output_tokens` bounds the answer. The answer is one `message` output item
holding one `output_text` part, as OpenAI's models without tools give.

Responses are stored unless `store: false` (OpenAI's default), in process memory, the
latest `ResponseStore.max_items` of them: `previous_response_id` continues one (its
input and output, not its instructions, as OpenAI does), `GET /v1/responses/{id}` returns
one, `DELETE` forgets it. An id that is unknown or was evicted is a 404, never an answer
without its history. Tools and background runs are refused (400).

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
from jaxinfer.openai_api import MAX_LOGPROBS, ApiError, _Request, logprobs_body
from jaxinfer.structured import Constraint, from_openai

LOGPROBS_INCLUDE = "message.output_text.logprobs"
_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}


class InputPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    type: str
    text: str | None = None


class InputItem(BaseModel):
    """A message item (`{"role", "content"}`, `"type": "message"` optional); other item
    types (tool calls and outputs, reasoning, references) are refused."""

    model_config = ConfigDict(strict=True, extra="allow")
    type: str = "message"
    role: str | None = None
    content: str | list[InputPart] | None = None


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

    def check_supported(self) -> None:
        super().check_supported()
        if self.background:
            raise ApiError(400, "background responses are not supported", "background")
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
        return [*system, *history, *self.input_messages()]

    def input_messages(self) -> list[dict[str, str]]:
        """`input` as chat-template messages."""
        if isinstance(self.input, str):
            return [{"role": "user", "content": self.input}]
        if not self.input:
            raise ApiError(400, "input is empty", "input")
        out: list[dict[str, str]] = []
        for i, item in enumerate(self.input):
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


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def logprobs_list(entries, tokenizer) -> list[dict[str, Any]]:
    """output_text.logprobs: chat's per-token entries (token, bytes, logprob, top)."""
    return logprobs_body(entries, tokenizer, chat=True)["content"]


class ResponseBuilder:
    """The response object of one request, as it stands at each stage of its life; the
    stream's events and the non-streamed body come from the same fields."""

    def __init__(self, body: ResponsesRequest, model: str, stored: bool = False):
        self.body, self.model, self.sampling = body, model, body.sampling()
        self.stored = stored
        self.id, self.msg_id = new_id("resp"), new_id("msg")
        self.created = time.time()
        self.seq = 0

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
            "model": self.model, "output": output, "parallel_tool_calls": False,
            "previous_response_id": b.previous_response_id, "reasoning": None,
            "store": self.stored,
            "temperature": sp.temperature, "top_p": sp.top_p, "text": {"format": fmt},
            "tool_choice": "none", "tools": [], "top_logprobs": b.top_logprobs,
            "truncation": "disabled", "user": b.user, "metadata": b.metadata or {},
            "usage": self.usage(result) if result is not None else None}

    def final(self, result: EngineResult, tokenizer) -> dict[str, Any]:
        """The whole response of a finished request."""
        status = "incomplete" if result.finish_reason == "length" else "completed"
        lp = (logprobs_list(result.logprobs, tokenizer) if result.logprobs is not None
              else None)
        return self.response(status, [self.item(status, [self.part(result.text, lp)])],
                             result)

    # ---- stream events -------------------------------------------------------------------
    def event(self, type_: str, **fields: Any) -> tuple[str, dict[str, Any]]:
        ev = {"type": type_, "sequence_number": self.seq, **fields}
        self.seq += 1
        return type_, ev

    def opening(self, want_logprobs: bool) -> list[tuple[str, dict[str, Any]]]:
        """created, in_progress, the message item and its text part added."""
        where = {"item_id": self.msg_id, "output_index": 0, "content_index": 0}
        return [self.event("response.created", response=self.response("in_progress", [])),
                self.event("response.in_progress", response=self.response("in_progress", [])),
                self.event("response.output_item.added", output_index=0,
                           item=self.item("in_progress", [])),
                self.event("response.content_part.added", **where,
                           part=self.part("", [] if want_logprobs else None))]

    def delta(self, text: str, logprobs: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
        return self.event("response.output_text.delta", item_id=self.msg_id, output_index=0,
                          content_index=0, delta=text, logprobs=logprobs)

    def closing(self, result: EngineResult, tokenizer) -> list[tuple[str, dict[str, Any]]]:
        """The text, part and item done, then response.completed (or .incomplete)."""
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
