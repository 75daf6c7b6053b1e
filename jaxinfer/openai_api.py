"""OpenAI wire format: request models, their validation, and response/chunk bodies.

Pydantic models in strict mode mirror the fields of `/v1/completions` and
`/v1/chat/completions` that jaxinfer honours (plus the extensions top_k, min_p and
repetition_penalty; logprobs in each endpoint's own format); unknown fields are accepted
and ignored, as OpenAI-compatible servers usually do. Everything here is pure data
handling with no engine and no HTTP, so the server module stays a thin routing layer.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from jaxinfer.engine import EngineResult
from jaxinfer.errors import BadRequestError
from jaxinfer.sampling import MAX_LOGPROBS, SamplingParams, TokenLogprob
from jaxinfer.tokenizer import Tokenizer

SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty",
                   "frequency_penalty", "repetition_penalty")


class ApiError(Exception):
    """An error to send as OpenAI's `{"error": {...}}` body with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = (
            status, message, param, code, type_)

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # extension
    min_p: float | None = None  # extension
    seed: int | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None  # extension
    n: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None

    def sampling(self) -> SamplingParams:
        """Validated sampling settings; OpenAI's ranges for the penalties on top."""
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if v is not None and not -2.0 <= v <= 2.0:
                raise ApiError(400, f"{name} must be in [-2, 2], got {v}", name)
        if self.n is not None and self.n != 1:
            raise ApiError(400, f"only n=1 is supported, got n={self.n}", "n")
        kw = {f: getattr(self, f) for f in SAMPLING_FIELDS if getattr(self, f) is not None}
        try:
            return SamplingParams(**kw, logprobs=self.num_logprobs())
        except BadRequestError as e:  # messages start with the field's name
            name = str(e).split()[0]
            raise ApiError(400, str(e), name if name in SAMPLING_FIELDS else None) from e

    def num_logprobs(self) -> int | None:
        """How many alternatives each token's logprobs carry; None: no logprobs."""
        return None

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    suffix: str | None = None
    logprobs: int | None = None  # legacy format: this many alternatives per token

    def num_logprobs(self) -> int | None:
        n = self.logprobs
        if n is not None and not 0 <= n <= MAX_LOGPROBS:
            raise ApiError(400, f"logprobs must be in [0, {MAX_LOGPROBS}], got {n}", "logprobs")
        return n

    def prompt_input(self) -> str | list[int]:
        """One prompt, as text or token ids (OpenAI also takes batches; we take one)."""
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise ApiError(400, f"one prompt per request is supported, got {len(p)}",
                               "prompt")
            p = p[0]
        if not p:
            raise ApiError(400, "prompt is empty", "prompt")
        if self.echo or self.suffix:
            raise ApiError(400, "echo and suffix are not supported", "echo" if self.echo
                           else "suffix")
        return p


class ContentPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[ContentPart] | None = None


class ChatRequest(_Request):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None

    def num_logprobs(self) -> int | None:
        n = self.top_logprobs
        if n is not None and not 0 <= n <= MAX_LOGPROBS:
            raise ApiError(400, f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {n}",
                           "top_logprobs")
        if n is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs=true", "top_logprobs")
        return (n or 0) if self.logprobs else None

    def message_dicts(self) -> list[dict[str, str]]:
        if not self.messages:
            raise ApiError(400, "messages is empty", "messages")
        out = []
        for i, m in enumerate(self.messages):
            content = m.content
            if isinstance(content, list):
                if any(p.type != "text" or p.text is None for p in content):
                    raise ApiError(400, "only text content parts are supported",
                                   f"messages.{i}.content")
                content = "".join(p.text or "" for p in content)
            out.append({"role": "system" if m.role == "developer" else m.role,
                        "content": content or ""})
        return out


# ---- responses ----------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(result: EngineResult) -> dict[str, Any]:
    n = len(result.token_ids)
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": n,
            "total_tokens": result.prompt_tokens + n,
            "prompt_tokens_details": {"cached_tokens": result.metrics.cached_tokens}}


def logprobs_body(entries: list[TokenLogprob], tokenizer: Tokenizer, chat: bool,
                  text_offset: int = 0) -> dict[str, Any]:
    """`choice.logprobs` for these tokens: chat's `content` list (token, logprob, bytes,
    top_logprobs) or the legacy completions columns (text_offset counts from the start of
    the completion: pass the characters already sent when streaming)."""
    def text(i: int) -> str:
        return tokenizer.token_bytes(i).decode("utf-8", "replace")

    if chat:
        def one(i: int, x: float) -> dict[str, Any]:
            b = tokenizer.token_bytes(i)
            return {"token": b.decode("utf-8", "replace"), "logprob": x, "bytes": list(b)}

        return {"content": [{**one(e.token_id, e.logprob),
                             "top_logprobs": [one(i, x) for i, x in e.top]} for e in entries],
                "refusal": None}
    tokens = [text(e.token_id) for e in entries]
    offsets = []
    for t in tokens:
        offsets.append(text_offset)
        text_offset += len(t)
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{text(i): x for i, x in e.top} for e in entries],
            "text_offset": offsets}


def completion_body(rid: str, model: str, result: EngineResult, chat: bool,
                    tokenizer: Tokenizer | None = None) -> dict[str, Any]:
    """The whole response; `tokenizer` renders logprobs when the request asked for them."""
    lp = (logprobs_body(result.logprobs, tokenizer, chat)
          if result.logprobs is not None and tokenizer is not None else None)
    choice: dict[str, Any] = {"index": 0, "finish_reason": result.finish_reason,
                              "logprobs": lp}
    if chat:
        choice["message"] = {"role": "assistant", "content": result.text}
    else:
        choice["text"] = result.text
    return {"id": rid, "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [choice],
            "usage": usage(result), "metrics": result.metrics.to_json()}


def chunk_body(rid: str, model: str, chat: bool, delta: str | None = None,
               finish_reason: str | None = None, role: bool = False,
               logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason,
                              "logprobs": logprobs}
    if chat:
        d: dict[str, Any] = {"role": "assistant"} if role else {}
        if delta is not None:
            d["content"] = delta
        choice["delta"] = d
    else:
        choice["text"] = delta or ""
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [choice]}


def usage_chunk(rid: str, model: str, chat: bool, result: EngineResult) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [],
            "usage": usage(result), "metrics": result.metrics.to_json()}
