"""Anthropic's Messages API (`POST /v1/messages`, `/v1/messages/count_tokens`): request
model, its conversion to chat messages, the response body and the stream's events.

Clients written for Anthropic's API (its SDKs, coding agents) talk to the server as they
would to Anthropic, as vLLM's and llama.cpp's servers allow. A request becomes the chat
request it means: `system` a system message; text blocks the turn's text; an assistant's
`tool_use` blocks its tool_calls and a user's `tool_result` blocks tool messages (each
answering an earlier tool_use); a last assistant message is a prefill the answer
continues; `tools` (name, description, input_schema) and `tool_choice` (auto, any, tool,
none; disable_parallel_tool_use) become chat's function tools (tool_calls.py);
`output_config.format` a JSON-schema constraint; `thinking` the templates'
enable_thinking. Earlier thinking blocks are dropped (chat templates drop earlier
reasoning too); `metadata`, `cache_control` marks and `context_management` are taken and
ignored (the prefix cache needs no marks); images, documents, Anthropic's server tools and
`mcp_servers` are a 400.

The answer's content blocks are the model's reasoning (`thinking`, with the server's
reasoning parser; its signature is empty: nothing here signs it), its text and its
`tool_use` calls. stop_reason is "max_tokens" when max_tokens ended it (a call it cut
short included), "tool_use" when it called a tool, "stop_sequence" (with the sequence)
when a stop sequence ended it, else "end_turn" (a prompt and max_tokens that do not fit
the context are a 400). Usage counts prefix-cache hits as cache_read_input_tokens, the
rest as input_tokens, as Anthropic does.

Errors have Anthropic's body (`{"type": "error", "error": {"type", "message"}}`) with the
same statuses as the OpenAI endpoints.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict

from jaxinfer.engine import EngineResult
from jaxinfer.errors import BadRequestError
from jaxinfer.openai_api import ApiError, ChatDeltas, _Request, chat_message, template_call
from jaxinfer.openai_responses import flat_tool_calling, new_id  # (ids: msg_<24 hex>)
from jaxinfer.reasoning import ReasoningParser
from jaxinfer.structured import Constraint, from_openai
from jaxinfer.tool_calls import ToolCalling

PATH = "/v1/messages"
# HTTP status -> Anthropic's error type.
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
               403: "permission_error", 404: "not_found_error", 413: "request_too_large",
               429: "rate_limit_error", 503: "overloaded_error"}
# OpenAI fields with an Anthropic name of their own.
_OWN_NAME = {"stop": "stop_sequences", "n": "several requests",
             "response_format": "output_config.format", "max_completion_tokens": "max_tokens"}
# Anthropic features whose meaning a client relies on and this server does not have.
_REFUSED = ("mcp_servers", "container")


def error_body(status: int, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": ERROR_TYPES.get(status, "api_error"),
                                       "message": message}}


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    role: str
    content: str | list[dict[str, Any]]


class _Conversation(BaseModel):
    """What /v1/messages and /v1/messages/count_tokens share: the conversation and the
    tools it is rendered with."""

    model_config = ConfigDict(strict=True, extra="allow")
    model: str | None = None
    messages: list[Message]
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None

    def chat_tools(self) -> list[dict[str, Any]] | None:
        """`tools` in chat's form; a server tool (web search, bash, ...) is a 400."""
        out = []
        for i, t in enumerate(self.tools or []):
            if t.get("type") not in (None, "custom"):
                raise ApiError(400, f"tools.{i}: only custom tools (name, description, "
                               f"input_schema) are supported, got type {t.get('type')!r}",
                               f"tools.{i}")
            if not isinstance(t.get("name"), str) or not isinstance(t.get("input_schema"),
                                                                    dict):
                raise ApiError(400, f"tools.{i}: a tool needs a name and an input_schema "
                               "object", f"tools.{i}")
            fn = {"name": t["name"], "parameters": t["input_schema"]}
            if t.get("description") is not None:
                fn["description"] = t["description"]
            out.append({"type": "function", "function": fn})
        return out or None

    def chat_options(self) -> dict[str, Any]:
        """Engine.submit's chat_options: a last assistant message is continued (prefill);
        `thinking` sets the templates' enable_thinking."""
        prefill = self.messages[-1].role == "assistant" if self.messages else False
        kwargs = None
        if self.thinking is not None:
            kind = self.thinking.get("type")
            if kind not in ("enabled", "disabled", "adaptive"):
                raise ApiError(400, f"thinking.type must be 'enabled', 'disabled' or "
                               f"'adaptive', got {kind!r}", "thinking")
            kwargs = {"enable_thinking": kind != "disabled"}
        return {"add_generation_prompt": not prefill, "continue_final_message": prefill,
                "chat_template_kwargs": kwargs, "tools": self.chat_tools()}

    def system_text(self) -> str:
        if self.system is None or isinstance(self.system, str):
            return self.system or ""
        return _text(self.system, "system")

    def message_dicts(self) -> list[dict[str, Any]]:
        """The chat-template messages this conversation means (ChatRequest's name)."""
        if not self.messages:
            raise ApiError(400, "messages is empty", "messages")
        system = self.system_text()
        out: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
        calls: set[str] = set()
        for i, m in enumerate(self.messages):
            where = f"messages.{i}"
            if m.role not in ("user", "assistant"):
                raise ApiError(400, f"{where}.role must be 'user' or 'assistant', got "
                               f"{m.role!r} (the system prompt is the system field)",
                               f"{where}.role")
            blocks = ([{"type": "text", "text": m.content}] if isinstance(m.content, str)
                      else m.content)
            text, tool_calls = [], []
            for j, b in enumerate(blocks):
                kind, at = b.get("type"), f"{where}.content.{j}"
                if kind == "text" and isinstance(b.get("text"), str):
                    text.append(b["text"])
                elif kind == "tool_use" and m.role == "assistant":
                    tool_calls.append(_tool_use(b, at))
                    calls.add(b["id"])
                elif kind == "tool_result" and m.role == "user":
                    out.append(_tool_result(b, at, calls))
                elif kind in ("thinking", "redacted_thinking") and m.role == "assistant":
                    continue
                else:
                    raise ApiError(400, f"{at}: a {m.role} message's {kind!r} blocks are not "
                                   "supported (text, tool_use in assistant messages, "
                                   "tool_result in user messages)", at)
            if m.role == "assistant":
                out.append({"role": "assistant", "content": "".join(text),
                            **({"tool_calls": tool_calls} if tool_calls else {})})
            elif text or not out or out[-1]["role"] != "tool":
                out.append({"role": "user", "content": "".join(text)})
        if self.messages[-1].role == "assistant" and out[-1].get("tool_calls"):
            raise ApiError(400, "the last message is an assistant's tool_use: send the "
                           "tool_result in a user message", f"messages.{len(self.messages) - 1}")
        return out

    def tool_calling(self, parser: str | None) -> ToolCalling | None:
        """The request's tool settings (tool_calls.ToolCalling, as chat's): "auto" needs
        the server's tool-call parser."""
        choice, parallel = self.tool_choice, None
        if choice is not None:
            kind = choice.get("type")
            if kind not in ("auto", "any", "tool", "none"):
                raise ApiError(400, f"tool_choice.type must be 'auto', 'any', 'tool' or "
                               f"'none', got {kind!r}", "tool_choice")
            if choice.get("disable_parallel_tool_use"):
                parallel = False
            choice = ({"type": "function", "function": {"name": choice.get("name")}}
                      if kind == "tool" else {"any": "required"}.get(kind, kind))
        return flat_tool_calling(self.chat_tools(), choice, parallel, parser)


def _text(blocks: list[dict[str, Any]], where: str) -> str:
    """Text blocks joined; other blocks are a 400."""
    for j, b in enumerate(blocks):
        if b.get("type") != "text" or not isinstance(b.get("text"), str):
            raise ApiError(400, f"{where}.{j}: only text blocks are supported here, got "
                           f"{b.get('type')!r}", f"{where}.{j}")
    return "".join(b["text"] for b in blocks)


def _tool_use(b: dict[str, Any], at: str) -> dict[str, Any]:
    if not isinstance(b.get("id"), str) or not isinstance(b.get("input", {}), dict):
        raise ApiError(400, f"{at}: tool_use needs an id and an input object", at)
    return template_call({"id": b["id"], "type": "function", "function": {
        "name": b.get("name"), "arguments": b.get("input", {})}}, at)


def _tool_result(b: dict[str, Any], at: str, calls: set[str]) -> dict[str, Any]:
    rid = b.get("tool_use_id")
    if rid not in calls:
        raise ApiError(400, f"{at}: tool_result answers tool_use_id {rid!r}, which no earlier "
                       "tool_use has", at)
    content = b.get("content", "")
    content = content if isinstance(content, str) else _text(content, f"{at}.content")
    return {"role": "tool", "tool_call_id": rid, "content": content}


class CountTokensRequest(_Conversation):
    pass


class MessagesRequest(_Request, _Conversation):
    max_tokens: int
    stop_sequences: list[str] | None = None
    output_config: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None

    def check_supported(self) -> None:
        super().check_supported()
        extra = self.model_extra or {}
        for name in _REFUSED:
            if extra.get(name):
                raise ApiError(400, f"{name} is not supported by this server", name)
        for name, own in _OWN_NAME.items():
            if getattr(self, name, None) is not None or extra.get(name) is not None:
                raise ApiError(400, f"{name} is not a Messages API field; use {own}", name)

    def token_budget(self) -> int:
        if self.max_tokens < 1:
            raise ApiError(400, f"max_tokens must be at least 1, got {self.max_tokens}",
                           "max_tokens")
        return self.max_tokens

    def stop_list(self) -> list[str]:
        return list(self.stop_sequences or [])

    def constraint(self) -> Constraint | None:
        """`output_config.format` (a json_schema), or vLLM's guided_* fields."""
        fmt = (self.output_config or {}).get("format")
        rf = fmt
        if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
            rf = {"type": "json_schema", "json_schema": {"name": "output",
                                                         "schema": fmt.get("schema")}}
        elif fmt is not None:
            raise ApiError(400, f"output_config.format must be a json_schema format, got "
                           f"{fmt!r}", "output_config")
        try:
            return from_openai(rf, self.guided_json, self.guided_regex, self.guided_choice,
                               self.guided_grammar)
        except BadRequestError as e:
            raise ApiError(400, str(e).replace("response_format", "output_config.format"),
                           self.constraint_param()) from e

    def constraint_param(self) -> str:
        name = super().constraint_param()
        return "output_config" if name == "response_format" else name


class MessageBuilder:
    """The message of one request: the non-streamed body, and the stream's events built
    from the same fields (content blocks opened, extended and closed as the text shows
    what they are)."""

    def __init__(self, body: MessagesRequest, model: str, prompt_tokens: int,
                 tools: ToolCalling | None = None, reasoning: ReasoningParser | None = None):
        self.body, self.model, self.prompt_tokens = body, model, prompt_tokens
        self.id = new_id("msg")
        self.tools = tools if tools is not None and tools.mode != "none" else None
        self.reasoning = reasoning
        self.split = ChatDeltas(self.tools, reasoning)
        self.blocks: list[dict[str, Any]] = []  # streamed blocks, the open one last
        self.open = False

    def usage(self, result: EngineResult | None) -> dict[str, Any]:
        if result is None:
            return {"input_tokens": self.prompt_tokens, "output_tokens": 0}
        cached = min(result.metrics.cached_tokens, result.prompt_tokens)
        return {"input_tokens": result.prompt_tokens - cached,
                "cache_creation_input_tokens": 0, "cache_read_input_tokens": cached,
                "output_tokens": len(result.token_ids)}

    def stop(self, result: EngineResult, calls: bool) -> tuple[str, str | None]:
        """(stop_reason, stop_sequence); a call that max_tokens cut short is max_tokens (as
        Anthropic says it), not a tool_use to run."""
        if result.finish_reason == "length":
            return "max_tokens", None
        if calls:
            return "tool_use", None
        if isinstance(result.stop_reason, str):
            return "stop_sequence", result.stop_reason
        return "end_turn", None

    def message(self, content: list[dict[str, Any]], result: EngineResult | None,
                stop: tuple[str | None, str | None] = (None, None)) -> dict[str, Any]:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model,
                "content": content, "stop_reason": stop[0], "stop_sequence": stop[1],
                "usage": self.usage(result)}

    def final(self, result: EngineResult) -> dict[str, Any]:
        """The whole message of a finished request."""
        msg, _ = chat_message(result.text, result.finish_reason, self.tools, self.reasoning)
        thought, text = msg.get("reasoning_content"), msg.get("content") or ""
        calls = msg.get("tool_calls", [])
        blocks = [_thinking(thought)] if thought else []
        if text or not (blocks or calls):
            blocks.append({"type": "text", "text": text})
        blocks += [_tool_block(c["id"], c["function"]["name"],
                               _input(c["function"]["arguments"])) for c in calls]
        return self.message(blocks, result, self.stop(result, bool(calls)))

    # ---- stream events (server._response_events drives them) ---------------------------
    def opening(self, want_logprobs: bool = False) -> list[tuple[str, dict[str, Any]]]:
        return [_ev("message_start", message=self.message([], None)), _ev("ping")]

    def delta(self, text: str, logprobs: Any = None) -> list[tuple[str, dict[str, Any]]]:
        out = []
        for d in self.split.feed(text):
            out += self._events(d)
        return out

    def _events(self, d: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        out = []
        if d.get("reasoning_content"):
            out += self._block("thinking", _thinking(""))
            out.append(self._delta(type="thinking_delta", thinking=d["reasoning_content"]))
        if d.get("content"):
            out += self._block("text", {"type": "text", "text": ""})
            out.append(self._delta(type="text_delta", text=d["content"]))
        for c in d.get("tool_calls", []):
            if "id" in c:  # a new call
                out += self._close() + self._start(_tool_block(c["id"], c["function"]["name"],
                                                               {}))
            args = c["function"].get("arguments", "")
            if args:
                out.append(self._delta(type="input_json_delta", partial_json=args))
        return out

    def _block(self, kind: str, block: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        """Opens a block of `kind` unless one is open."""
        if self.open and self.blocks[-1]["type"] == kind:
            return []
        return self._close() + self._start(block)

    def _start(self, block: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        self.blocks.append(block)
        self.open = True
        return [_ev("content_block_start", index=len(self.blocks) - 1, content_block=block)]

    def _delta(self, **delta: Any) -> tuple[str, dict[str, Any]]:
        return _ev("content_block_delta", index=len(self.blocks) - 1, delta=delta)

    def _close(self) -> list[tuple[str, dict[str, Any]]]:
        if not self.open:
            return []
        self.open = False
        out = []
        if self.blocks[-1]["type"] == "thinking":
            out.append(self._delta(type="signature_delta", signature=""))
        return out + [_ev("content_block_stop", index=len(self.blocks) - 1)]

    def closing(self, result: EngineResult, tokenizer: Any = None
                ) -> list[tuple[str, dict[str, Any]]]:
        """The last blocks, message_delta (stop reason, usage), message_stop."""
        parts, _ = self.split.finish(result.finish_reason)
        out = [e for d in parts for e in self._events(d)]
        if not self.blocks:  # nothing said: one empty text block, as the body has
            out += self._start({"type": "text", "text": ""})
        out += self._close()
        calls = any(b["type"] == "tool_use" for b in self.blocks)
        reason, sequence = self.stop(result, calls)
        usage = self.usage(result)
        return out + [_ev("message_delta", delta={"stop_reason": reason,
                                                  "stop_sequence": sequence}, usage=usage),
                      _ev("message_stop")]

    def error(self, message: str, code: str | None) -> tuple[str, dict[str, Any]]:
        return "error", {"type": "error", "error": {
            "type": "overloaded_error" if code == "engine_unavailable" else "api_error",
            "message": message}}


def _ev(type_: str, **fields: Any) -> tuple[str, dict[str, Any]]:
    return type_, {"type": type_, **fields}


def _thinking(text: str) -> dict[str, Any]:
    return {"type": "thinking", "thinking": text, "signature": ""}


def _tool_block(cid: str, name: str, args: dict[str, Any]) -> dict[str, Any]:
    return {"type": "tool_use", "id": cid, "name": name, "input": args}


def _input(arguments: str) -> dict[str, Any]:
    """A call's arguments as tool_use input; arguments that max_tokens cut short (not
    JSON) are an empty input, and the stop_reason says max_tokens."""
    try:
        value = json.loads(arguments)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
