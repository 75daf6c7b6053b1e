"""OpenAI wire format: request models, their validation, and response/chunk bodies.

Pydantic models in strict mode mirror the fields of `/v1/completions` and
`/v1/chat/completions` that jaxinfer honours (plus the extensions top_k, min_p and
repetition_penalty; logprobs in each endpoint's own format); unknown fields are accepted
and ignored, as OpenAI-compatible servers usually do. Everything here is pure data
handling with no engine and no HTTP, so the server module stays a thin routing layer.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from jaxinfer.engine import EngineResult
from jaxinfer.errors import BadRequestError
from jaxinfer.reasoning import ReasoningParser
from jaxinfer.sampling import MAX_LOGPROBS, MAX_N, SamplingParams, TokenLogprob
from jaxinfer.structured import Constraint, from_openai
from jaxinfer.tokenizer import Tokenizer
from jaxinfer.tool_calls import ToolCalling, check_tools

UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "best_of", "audio",
               "modalities", "prediction", "web_search_options")
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_PROMPTS = 64  # prompts in one /v1/completions request
MAX_EMBEDDING_INPUTS = 2048  # OpenAI's limit per /v1/embeddings request
# Fields that change which tokens are allowed or how they score: a beam search (scored by
# the raw model's log-probabilities) would silently ignore them, so they are a 400 there.
# Temperature, top_p/top_k/min_p and seed only shape sampling, which beams do not do.
_BEAM_REFUSED = ("presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias",
                 "stop_token_ids", "min_tokens", "ignore_eos", "allowed_token_ids",
                 "bad_words", "truncate_prompt_tokens", "include_stop_str_in_output")
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty",
                   "frequency_penalty", "repetition_penalty", "logit_bias", "stop_token_ids",
                   "min_tokens", "ignore_eos", "skip_special_tokens",
                   "include_stop_str_in_output", "truncate_prompt_tokens", "allowed_token_ids",
                   "bad_words")


class ApiError(Exception):
    """An error to send as OpenAI's `{"error": {...}}` body with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = (
            status, message, param, code, type_)

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def validation_error(err: dict[str, Any]) -> ApiError:
    """A 400 from one of pydantic's validation errors, naming the field (OpenAI's param)."""
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    return ApiError(400, f"{'.'.join(loc) or 'body'}: {err.get('msg', 'invalid')}",
                    loc[0] if loc else None)


def check_model(requested: str | None, served: str, adapters: Sequence[str] = ()
                ) -> str | None:
    """The LoRA adapter a request names as its model (vLLM's convention), None for the
    base model; a 404 (OpenAI's model_not_found) unless it names the served model, one of
    its adapters, or none."""
    if requested is None or requested == served:
        return None
    if requested in adapters:
        return requested
    also = f" and LoRA adapters {list(adapters)}" if adapters else ""
    raise ApiError(404, f"model {requested!r} does not exist; this server serves "
                   f"{served!r}{also}", "model", "model_not_found")


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    include_usage: bool = False


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
    logit_bias: dict[str, int | float] | None = None
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop_token_ids: list[int] | None = None  # extension (vLLM): end like EOS
    min_tokens: int | None = None  # extension (vLLM): no EOS/stop ids before this many
    ignore_eos: bool | None = None  # extension (vLLM): decode past EOS
    skip_special_tokens: bool | None = None  # extension (vLLM): chat markers not in text
    include_stop_str_in_output: bool | None = None  # extension (vLLM)
    truncate_prompt_tokens: int | None = None  # extension (vLLM): keep the prompt's last n
    allowed_token_ids: list[int] | None = None  # extension (vLLM): sample only these
    bad_words: list[str] | None = None  # extension (vLLM): never complete these words
    priority: int | None = None  # extension (vLLM): queue order, lower first
    # Structured output: OpenAI's response_format, or vLLM's guided_* extensions.
    response_format: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None  # a Lark or GBNF grammar
    # Beam search (vLLM's extension): n is the beam width, every beam a choice.
    use_beam_search: bool = False
    length_penalty: float | None = None
    early_stopping: bool | None = None

    def constraint(self) -> Constraint | None:
        try:
            return from_openai(self.response_format, self.guided_json, self.guided_regex,
                               self.guided_choice, self.guided_grammar)
        except BadRequestError as e:
            raise ApiError(400, str(e), self.constraint_param()) from e

    def constraint_param(self) -> str:
        """The structured-output field this request used (for error bodies)."""
        for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar"):
            if getattr(self, name) is not None:
                return name
        return "response_format"

    def sampling(self) -> SamplingParams:
        """Validated sampling settings; OpenAI's ranges for the penalties on top."""
        self.check_supported()
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if v is not None and not -2.0 <= v <= 2.0:
                raise ApiError(400, f"{name} must be in [-2, 2], got {v}", name)
        kw = {f: getattr(self, f) for f in SAMPLING_FIELDS if getattr(self, f) is not None}
        try:
            return SamplingParams(**kw, logprobs=self.num_logprobs())
        except BadRequestError as e:
            raise ApiError(400, str(e), e.param) from e

    def check_supported(self) -> None:
        """Unknown fields are ignored, as OpenAI-compatible servers do, except those whose
        meaning a client relies on (tools, best_of > 1, audio): those are a 400, never a
        silently different answer."""
        extra = self.model_extra or {}
        for name in UNSUPPORTED:
            v = extra.get(name)
            if v is not None and not (name == "best_of" and v == 1) and v != []:
                raise ApiError(400, f"{name} is not supported by this server", name)
        if extra.get("best_of") == 1 and (self.n or 1) > 1:
            raise ApiError(400, f"best_of=1 must be at least n={self.n}", "best_of")

    def num_logprobs(self) -> int | None:
        """How many alternatives each token's logprobs carry; None: no logprobs."""
        return None

    def num_prompt_logprobs(self) -> int | None:
        """How many alternatives each prompt token's logprobs carry; None: none."""
        return None

    def scoring_only(self) -> bool:
        return False

    def num_choices(self) -> int:
        n = 1 if self.n is None else self.n
        if not 1 <= n <= MAX_N:
            raise ApiError(400, f"n must be in [1, {MAX_N}], got {n}", "n")
        return n

    def choice_sampling(self, j: int) -> SamplingParams:
        """Choice j's settings: a given seed becomes seed + j, so the n choices differ and
        choice 0 is what n=1 gives."""
        sp = self.sampling().choice(j)
        if self.num_prompt_logprobs() is not None:
            sp = dataclasses.replace(sp, prompt_logprobs=self.num_prompt_logprobs())
        return sp

    def tool_constraint(self, tools: ToolCalling | None) -> Constraint | None:
        """The output constraint: the tool choice's, or the request's own structured
        output; not both (a tool call is the output's format)."""
        own = self.constraint()
        forced = tools.constraint() if tools is not None else None
        if forced is not None and own is not None:
            raise ApiError(400, f"tool_choice {tools.mode!r} fixes the output's format; it "
                           f"cannot be combined with {self.constraint_param()}", "tool_choice")
        return forced or own

    def reasoning_parser(self, parser: ReasoningParser | None, tools: ToolCalling | None
                         ) -> ReasoningParser | None:
        """The server's reasoning parser as this request's output needs it: output that a
        grammar constrains is reasoning only where it opens with <think> itself."""
        if parser is None or self.tool_constraint(tools) is None:
            return parser
        return parser.constrained()

    def tool_sampling(self, sp: SamplingParams, tools: ToolCalling | None,
                      reasoning: ReasoningParser | None = None) -> SamplingParams:
        """A parser's markers may be special tokens (all of gpt-oss's harmony markers are):
        such requests keep them in the text."""
        if (tools is not None and tools.keeps_special_tokens
                or reasoning is not None and reasoning.keeps_special_tokens):
            return dataclasses.replace(sp, skip_special_tokens=False)
        return sp

    def beam_search(self) -> dict[str, Any] | None:
        """LLM.beam_search's settings when `use_beam_search` (beam width = n, as in vLLM),
        else None. What a beam search cannot honour is a 400: streaming, logprobs, stop
        strings, structured output, tools, echo; sampling settings do not apply (beams
        are scored, not sampled)."""
        if not self.use_beam_search:
            for name in ("length_penalty", "early_stopping"):
                if getattr(self, name) is not None:
                    raise ApiError(400, f"{name} needs use_beam_search", name)
            return None
        self.sampling()  # every field valid (and none unsupported), used or not
        extra = self.model_extra or {}
        refused = {"stream": self.stream, "stop": self.stop_list(),
                   "logprobs": self.num_logprobs() is not None,
                   "echo": getattr(self, "echo", False),
                   "tools": getattr(self, "tools", None) or extra.get("tools"),
                   "response_format": self.constraint() is not None}
        refused |= {name: getattr(self, name) is not None for name in _BEAM_REFUSED}
        for name, used in refused.items():
            if used:
                param = self.constraint_param() if name == "response_format" else name
                raise ApiError(400, f"{param} cannot be combined with use_beam_search", param)
        lp = 1.0 if self.length_penalty is None else self.length_penalty
        if isinstance(lp, bool) or not isinstance(lp, (int, float)) or lp != lp \
                or abs(lp) == float("inf"):
            raise ApiError(400, f"length_penalty must be a finite number, got {lp!r}",
                           "length_penalty")
        return {"beam_width": self.num_choices(), "length_penalty": float(lp),
                "early_stopping": bool(self.early_stopping)}

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


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

    def num_prompt_logprobs(self) -> int | None:
        """echo with logprobs also scores the prompt (how evaluation harnesses compute
        log-likelihoods)."""
        return self.num_logprobs() if self.echo else None

    def scoring_only(self) -> bool:
        """echo with max_tokens 0: the prompt (and its logprobs), nothing generated."""
        return self.echo and self.max_tokens == 0

    def token_budget(self) -> int:
        """max_tokens for the engine: OpenAI's default when unset; 1 when only scoring (the
        engine always samples a token, dropped from the answer)."""
        if self.max_tokens is None:
            return DEFAULT_COMPLETION_MAX_TOKENS
        return 1 if self.scoring_only() else self.max_tokens

    def prompt_inputs(self) -> list[str | list[int]]:
        """The prompts, as text or token ids: one, or a batch (a list of strings or of
        token-id lists), answered as choices in order."""
        p = self.prompt
        prompts = p if isinstance(p, list) and p and isinstance(p[0], (str, list)) else [p]
        if len(prompts) > MAX_PROMPTS:
            raise ApiError(400, f"at most {MAX_PROMPTS} prompts per request, got "
                           f"{len(prompts)}", "prompt")
        if any(not q for q in prompts) or any(isinstance(q, list) and not all(
                isinstance(t, int) for t in q) for q in prompts):
            raise ApiError(400, "prompt is empty or mixes text and token ids", "prompt")
        if self.suffix:
            raise ApiError(400, "suffix is not supported", "suffix")
        return prompts


class ContentPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message: the call it answers
    name: str | None = None


class _ChatTemplateOptions(BaseModel):
    """vLLM's chat-template extensions of a chat request."""

    model_config = ConfigDict(strict=True, extra="allow")
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[Any] | None = None  # OpenAI function tools, shown to the chat template

    def chat_options(self) -> dict[str, Any]:
        """Engine.submit's chat_options; continuing the last message opens no new turn."""
        if self.continue_final_message and "add_generation_prompt" in self.model_fields_set \
                and self.add_generation_prompt:
            raise ApiError(400, "continue_final_message cannot be combined with "
                           "add_generation_prompt=true", "continue_final_message")
        try:
            tools = check_tools(self.tools) if self.tools else None
        except BadRequestError as e:
            raise ApiError(400, str(e), e.param) from e
        return {"add_generation_prompt": self.add_generation_prompt
                and not self.continue_final_message,
                "continue_final_message": self.continue_final_message,
                "chat_template_kwargs": self.chat_template_kwargs, "tools": tools}


class ChatRequest(_Request, _ChatTemplateOptions):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    def tool_calling(self, parser: str | None = None) -> ToolCalling | None:
        """The request's tool settings (None without tools); `parser` is the server's
        tool-call parser, which tool_choice "auto" needs."""
        try:
            return ToolCalling.from_request(self.tools, self.tool_choice,
                                            self.parallel_tool_calls, parser)
        except BadRequestError as e:
            raise ApiError(400, str(e), e.param) from e

    def token_budget(self) -> int | None:
        """max_tokens for the engine (OpenAI's old or new name); None fills the slot."""
        return self.max_completion_tokens if self.max_tokens is None else self.max_tokens

    def num_logprobs(self) -> int | None:
        n = self.top_logprobs
        if n is not None and not 0 <= n <= MAX_LOGPROBS:
            raise ApiError(400, f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {n}",
                           "top_logprobs")
        if n is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs=true", "top_logprobs")
        return (n or 0) if self.logprobs else None

    def message_dicts(self) -> list[dict[str, str]]:
        return message_dicts(self.messages)


def message_dicts(messages: list[ChatMessage] | None) -> list[dict[str, Any]]:
    """Chat messages as the chat template takes them (text parts joined; an assistant's
    tool_calls, with arguments parsed as HF templates expect, and a tool message's
    tool_call_id and name kept)."""
    if not messages:
        raise ApiError(400, "messages is empty", "messages")
    out = []
    for i, m in enumerate(messages):
        content = m.content
        if content is None and not (m.role == "assistant" and m.tool_calls):
            raise ApiError(400, f"a {m.role!r} message needs content"
                           + (" or tool_calls" if m.role == "assistant" else ""),
                           f"messages.{i}.content")
        if isinstance(content, list):
            if any(p.type != "text" or p.text is None for p in content):
                raise ApiError(400, "only text content parts are supported",
                               f"messages.{i}.content")
            content = "".join(p.text or "" for p in content)
        d: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role,
                             "content": content or ""}
        if m.tool_calls:
            d["tool_calls"] = [template_call(c, f"messages.{i}.tool_calls")
                               for c in m.tool_calls]
        for key in ("tool_call_id", "name"):
            if getattr(m, key) is not None:
                d[key] = getattr(m, key)
        out.append(d)
    return out


def template_call(c: dict[str, Any], param: str) -> dict[str, Any]:
    """An earlier tool call as chat templates take it: HF's convention has `arguments` as
    an object, OpenAI's wire format as a JSON string."""
    fn = c.get("function")
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ApiError(400, f"a tool call needs function.name, got {c!r}", param)
    args = fn.get("arguments", "{}")
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError as e:
            raise ApiError(400, f"tool call arguments are not JSON: {args!r}", param) from e
    return {**c, "function": {**fn, "arguments": args}}


class TokenizeRequest(_ChatTemplateOptions):
    """vLLM's /tokenize: a prompt, or chat messages through the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None

    def inputs(self) -> dict[str, Any]:
        """Engine.encode's keyword arguments."""
        if (self.prompt is None) == (self.messages is None):
            raise ApiError(400, "give exactly one of prompt and messages", "prompt")
        if self.prompt is not None:
            return {"prompt": self.prompt}
        return {"messages": message_dicts(self.messages), "chat_options": self.chat_options()}


class EmbeddingRequest(BaseModel):
    """OpenAI's /v1/embeddings: text or token ids, one or a list."""

    model_config = ConfigDict(strict=True, extra="allow")
    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None

    def inputs(self) -> list[str | list[int]]:
        p = self.input
        items = p if isinstance(p, list) and p and isinstance(p[0], (str, list)) else [p]
        if len(items) > MAX_EMBEDDING_INPUTS:
            raise ApiError(400, f"at most {MAX_EMBEDDING_INPUTS} inputs per request, got "
                           f"{len(items)}", "input")
        if any(not q for q in items):
            raise ApiError(400, "input is empty, or holds an empty item", "input")
        return items


def embedding_body(vectors, model: str, prompt_tokens: int, encoding_format: str
                   ) -> dict[str, Any]:
    """OpenAI's embeddings list; base64 is the float32 little-endian bytes, as the
    official client (whose default it is) decodes them."""
    import base64

    import numpy as np

    def enc(v):
        if encoding_format == "base64":
            return base64.b64encode(np.asarray(v, "<f4").tobytes()).decode()
        return [float(x) for x in v]

    return {"object": "list", "model": model,
            "data": [{"object": "embedding", "index": i, "embedding": enc(v)}
                     for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}


class DetokenizeRequest(BaseModel):
    """vLLM's /detokenize."""

    model_config = ConfigDict(strict=True, extra="allow")
    model: str | None = None
    tokens: list[int]


class LoadLoraRequest(BaseModel):
    """vLLM's /v1/load_lora_adapter."""

    model_config = ConfigDict(strict=True, extra="forbid")
    lora_name: str
    lora_path: str


class UnloadLoraRequest(BaseModel):
    """vLLM's /v1/unload_lora_adapter (its lora_int_id is accepted and unused)."""

    model_config = ConfigDict(strict=True, extra="forbid")
    lora_name: str
    lora_int_id: int | None = None


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


def usage_all(results: list[EngineResult], n: int) -> dict[str, Any]:
    """Usage of a request's choices: n per prompt, each prompt counted once."""
    if len(results) == 1:
        return usage(results[0])
    firsts = results[::n]
    done = sum(len(r.token_ids) for r in results)
    prompt = sum(r.prompt_tokens for r in firsts)
    return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done,
            "prompt_tokens_details": {"cached_tokens": sum(r.metrics.cached_tokens
                                                           for r in firsts)}}


def _metrics(results: list[EngineResult]) -> dict[str, Any] | list[dict[str, Any]]:
    ms = [r.metrics.to_json() for r in results]
    return ms[0] if len(ms) == 1 else ms


def echo_logprobs_body(prompt_ids: list[int], prompt: list[TokenLogprob | None],
                       generated: list[TokenLogprob], tokenizer: Tokenizer) -> dict[str, Any]:
    """Legacy completions logprobs of an echoed prompt and then the completion: the first
    prompt token has no logprob (null), as in OpenAI's echo responses."""
    head = logprobs_body([e for e in prompt if e is not None], tokenizer, False)
    first = tokenizer.token_bytes(prompt_ids[0]).decode("utf-8", "replace")
    tail = logprobs_body(generated, tokenizer, False)
    tokens = [first] + head["tokens"] + tail["tokens"]
    offsets = [0]
    for t in tokens[:-1]:
        offsets.append(offsets[-1] + len(t))
    return {"tokens": tokens, "token_logprobs": [None] + head["token_logprobs"]
            + tail["token_logprobs"],
            "top_logprobs": [None] + head["top_logprobs"] + tail["top_logprobs"],
            "text_offset": offsets}


def scored_only(result: EngineResult) -> EngineResult:
    """A scoring-only request's result (echo, max_tokens 0): the token the engine had to
    sample is dropped."""
    return dataclasses.replace(result, text="", token_ids=[], finish_reason="length",
                               logprobs=None if result.logprobs is None else [])


def completion_body(rid: str, model: str, results: list[EngineResult], chat: bool,
                    tokenizer: Tokenizer | None = None, n: int = 1,
                    echo: list[str] | None = None,
                    prompt_ids: list[list[int]] | None = None,
                    tools: ToolCalling | None = None,
                    reasoning: ReasoningParser | None = None) -> dict[str, Any]:
    """The whole response, choice i from results[i] (n per prompt, prompts in order);
    `tokenizer` renders logprobs where asked; `echo` holds each prompt's text, and
    `prompt_ids` each choice's prompt ids where its prompt was scored; `tools` and
    `reasoning` split a chat output into reasoning, content and tool calls."""
    choices = []
    for i, result in enumerate(results):
        lp = (logprobs_body(result.logprobs, tokenizer, chat)
              if result.logprobs is not None and tokenizer is not None else None)
        if result.prompt_logprobs is not None and prompt_ids and tokenizer is not None:
            lp = echo_logprobs_body(prompt_ids[i], result.prompt_logprobs,
                                    result.logprobs or [], tokenizer)
        choice: dict[str, Any] = {"index": i, "finish_reason": result.finish_reason,
                                  "stop_reason": result.stop_reason, "logprobs": lp}
        if chat:
            choice["message"], choice["finish_reason"] = chat_message(
                result.text, result.finish_reason, tools, reasoning)
        else:
            choice["text"] = (echo[i // n] if echo else "") + result.text
        choices.append(choice)
    return {"id": rid, "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": choices,
            "usage": usage_all(results, n), "metrics": _metrics(results)}


def beam_body(rid: str, model: str, outs: list[Any], chat: bool) -> dict[str, Any]:
    """A beam search's response: each prompt's beams, best first, as its n choices."""
    choices = []
    for out in outs:
        for seq in out.sequences:
            c: dict[str, Any] = {"index": len(choices), "finish_reason": seq.finish_reason,
                                 "logprobs": None}
            if chat:
                c["message"] = {"role": "assistant", "content": seq.text}
            else:
                c["text"] = seq.text
            choices.append(c)
    prompt = sum(o.prompt_tokens for o in outs)
    done = sum(len(s.token_ids) for o in outs for s in o.sequences)
    return {"id": rid, "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": choices,
            "usage": {"prompt_tokens": prompt, "completion_tokens": done,
                      "total_tokens": prompt + done}}


def chat_message(text: str, finish_reason: str, tools: ToolCalling | None = None,
                 reasoning: ReasoningParser | None = None) -> tuple[dict[str, Any], str]:
    """A chat choice's message and finish_reason: the reasoning split off (its own
    field), then the rest read for tool calls."""
    thought, text = reasoning.split(text) if reasoning is not None else (None, text)
    msg: dict[str, Any] = {"role": "assistant", "content": text}
    if tools is not None:
        content, calls = tools.parse(text)
        msg["content"] = content
        if calls:
            msg["tool_calls"] = calls
        finish_reason = tools.finish_reason(finish_reason, calls)
    if reasoning is not None:
        msg["reasoning_content"] = thought
    return msg, finish_reason


class ChatDeltas:
    """A streamed chat choice's deltas through the reasoning parser (reasoning_content,
    then content) and the tool stream (content -> tool calls), as `chat_message` splits
    the whole output."""

    def __init__(self, tools: ToolCalling | None, reasoning: ReasoningParser | None):
        self.reasoning = reasoning.stream() if reasoning is not None else None
        self.tools = tools.stream() if tools is not None else None

    def _content(self, parts: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for p in parts:
            out += self.tools.feed(p["content"]) if "content" in p and self.tools else [p]
        return out

    def feed(self, delta: str) -> list[dict[str, Any]]:
        parts = self.reasoning.feed(delta) if self.reasoning else [{"content": delta}]
        return self._content(parts)

    def finish(self, finish_reason: str) -> tuple[list[dict[str, Any]], str]:
        out = self._content(self.reasoning.finish()) if self.reasoning else []
        if self.tools is None:
            return out, finish_reason
        last, finish_reason = self.tools.finish(finish_reason)
        return out + last, finish_reason


def chunk_body(rid: str, model: str, chat: bool, delta: str | None = None,
               finish_reason: str | None = None, role: bool = False,
               logprobs: dict[str, Any] | None = None, index: int = 0,
               fields: dict[str, Any] | None = None,
               stop_reason: str | int | None = None) -> dict[str, Any]:
    """One streamed chunk; a chat delta is `delta` as content, or `fields` as they are
    (tool calls); the last one of a choice carries its finish_reason and stop_reason."""
    choice: dict[str, Any] = {"index": index, "finish_reason": finish_reason,
                              "logprobs": logprobs}
    if finish_reason is not None:
        choice["stop_reason"] = stop_reason
    if chat:
        d: dict[str, Any] = {"role": "assistant"} if role else {}
        if delta is not None:
            d["content"] = delta
        d.update(fields or {})
        choice["delta"] = d
    else:
        choice["text"] = delta or ""
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [choice]}


def usage_chunk(rid: str, model: str, chat: bool, results: list[EngineResult], n: int = 1
                ) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [],
            "usage": usage_all(results, n), "metrics": _metrics(results)}
