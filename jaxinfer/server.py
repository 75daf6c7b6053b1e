"""OpenAI-compatible HTTP server over the engine.

    python scripts/serve.py --port 8000        # binds 127.0.0.1 unless --host says so
    POST /v1/completions, /v1/chat/completions (stream: true -> server-sent events ending
    with `data: [DONE]`), /v1/responses (OpenAI's Responses API, openai_responses.py;
    GET and DELETE /v1/responses/{id} for stored ones), /v1/messages and
    /v1/messages/count_tokens (Anthropic's Messages API, anthropic_api.py), /v1/embeddings,
    GET /v1/models, /health, /metrics (Prometheus text);
    POST /tokenize, /detokenize (vLLM's: token ids as the engine counts them)

Library choice: FastAPI on uvicorn. FastAPI gives pydantic request validation (strict
types, so `"temperature": "hot"` is a 400, not a coercion) and a plain async handler per
route; uvicorn is the standard ASGI server and runs fine in a background thread for tests.
Both are widely used and maintained, and the OpenAI wire format stays in openai_api.py.

Concurrency: handlers are async and never touch JAX; they submit to the engine (its own
device thread) and await per-request deltas, so `/health` and `/metrics` answer while the
device is busy. Bad requests get 400 with OpenAI's error body; a full queue gets 429.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import jax
import uvicorn
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from jaxinfer import anthropic_api as anth
from jaxinfer import openai_api as api
from jaxinfer import openai_responses as rs
from jaxinfer.engine import (
    ContextLengthError,
    Engine,
    EngineClosedError,
    EngineOverloadedError,
    Request,
)
from jaxinfer.errors import (
    BadRequestError,
    ConfigError,
    ConversionError,
    JaxinferError,
    TokenizerError,
)
from jaxinfer.openai_beam import beam_search_body, engine_llm
from jaxinfer.reasoning import ReasoningParser
from jaxinfer.sampling import SamplingParams
from jaxinfer.structured import Constraint
from jaxinfer.tokenizer import Tokenizer
from jaxinfer.tool_calls import ToolCalling, check_parsers

PROTECTED_PREFIX = "/v1/"  # what an API key guards; /health, /metrics, /tokenize... stay open


def create_app(engine: Engine, model_name: str, max_stored_responses: int = 1024,
               tool_call_parser: str | None = None,
               reasoning_parser: str | None = None,
               allow_runtime_lora_updating: bool = False,
               api_key: str | None = None,
               allowed_origins: Sequence[str] = ()) -> FastAPI:
    """The OpenAI-compatible app over `engine`; the Responses API keeps the latest
    `max_stored_responses` responses in memory (openai_responses.ResponseStore);
    `tool_call_parser` (tool_parsers.PARSERS) reads tool calls from free text (tool_choice
    "auto"); `reasoning_parser` (reasoning.PARSERS) moves a chat answer's reasoning to
    reasoning_content; `allow_runtime_lora_updating` adds vLLM's
    load/unload LoRA adapter endpoints (the engine needs room: EngineConfig.max_loras);
    with `api_key` every /v1/ endpoint wants `Authorization: Bearer <api_key>` or, as
    Anthropic's clients send it, `x-api-key: <api_key>` (401 otherwise), as OpenAI's,
    Anthropic's and vLLM's servers do; like vLLM's, the others (probes,
    metrics, /tokenize) stay open; `allowed_origins` are the web origins whose pages may
    call the server from a browser (CORS; "*" for any, none by default)."""
    if allow_runtime_lora_updating and not engine.config.max_loras:
        raise ConfigError("runtime LoRA updating needs room for adapters in the engine: "
                          "set --max_loras (EngineConfig.max_loras)")
    check_parsers(tool_call_parser, reasoning_parser)
    reasoning = ReasoningParser(reasoning_parser) if reasoning_parser else None
    app = FastAPI(title="jaxinfer", docs_url=None, redoc_url=None)
    created = int(time.time())
    stored = rs.ResponseStore(max_stored_responses)

    if api_key is not None:
        if not api_key:
            raise ConfigError("api_key is empty")
        want, want_x = f"Bearer {api_key}".encode(), api_key.encode()

        @app.middleware("http")
        async def _authorize(request, call_next):
            given = request.headers.get("authorization", "").encode()
            given_x = request.headers.get("x-api-key", "").encode()
            path = request.url.path
            if (request.method != "OPTIONS" and path.startswith(PROTECTED_PREFIX)
                    and not hmac.compare_digest(given, want)
                    and not hmac.compare_digest(given_x, want_x)):
                msg = ("missing or incorrect API key (send Authorization: Bearer <key> or "
                       "x-api-key: <key>)")
                body = (anth.error_body(401, msg) if path.startswith(anth.PATH)
                        else api.error_body(msg, code="invalid_api_key"))
                return JSONResponse(body, status_code=401)
            return await call_next(request)

    if allowed_origins:  # added last: outermost, so preflights get their answer first
        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins),
                           allow_methods=["*"], allow_headers=["*"])

    def error_response(request, e: api.ApiError) -> JSONResponse:
        """OpenAI's error body, or Anthropic's on its endpoints."""
        headers = {"Retry-After": "1"} if e.status in (429, 503) else None
        body = (anth.error_body(e.status, e.message)
                if request.url.path.startswith(anth.PATH) else e.body())
        return JSONResponse(body, status_code=e.status, headers=headers)

    @app.exception_handler(api.ApiError)
    async def _api_error(request, e: api.ApiError):
        return error_response(request, e)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e: RequestValidationError):
        err = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        if err.get("type") == "json_invalid":
            msg = f"the request body is not valid JSON: {err.get('ctx', {}).get('error', '')}"
            return error_response(request, api.ApiError(400, msg))
        return error_response(request, api.validation_error(err))

    @app.get("/version")
    async def version():
        from jaxinfer import __version__

        return {"version": __version__}

    @app.get("/health")
    async def health():
        if not engine.healthy:
            return JSONResponse({"status": "unhealthy"}, status_code=503)
        return {"status": "ok", "queue_length": engine.queue_length,
                "slots_in_use": engine.slots_in_use}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(engine.prometheus(),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    def model_of(body: Any) -> tuple[str | None, str]:
        """(the LoRA adapter the body's model names or None, the model id to answer
        with)."""
        adapter = api.check_model(body.model, model_name, engine.adapter_names)
        return adapter, adapter or model_name

    if allow_runtime_lora_updating:
        @app.post("/v1/load_lora_adapter")
        async def load_lora_adapter(body: api.LoadLoraRequest):
            """Reads the adapter, then installs it between two engine turns."""
            try:
                await asyncio.to_thread(engine.load_adapter, body.lora_name, body.lora_path)
            except EngineClosedError as e:
                raise api.ApiError(503, str(e), None, "engine_unavailable",
                                   "server_error") from e
            except (BadRequestError, ConversionError, ConfigError) as e:
                raise api.ApiError(400, str(e), getattr(e, "param", None) or "lora_path"
                                   ) from e
            return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added "
                                     "successfully.")

        @app.post("/v1/unload_lora_adapter")
        async def unload_lora_adapter(body: api.UnloadLoraRequest):
            try:
                engine.unload_adapter(body.lora_name)
            except JaxinferError as e:
                raise api.ApiError(404, str(e), "lora_name", "model_not_found") from e
            return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed "
                                     "successfully.")

    @app.get("/v1/models")
    async def models():
        """OpenAI's model list; each entry also has Anthropic's fields (type, display_name,
        created_at), as has the list (has_more, first_id, last_id), so either client lists
        them."""
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created))
        base = {"id": model_name, "object": "model", "created": created,
                "owned_by": "jaxinfer", "max_model_len": engine.max_len, "type": "model",
                "display_name": model_name, "created_at": since}
        data = [base] + [dict(base, id=a, display_name=a, parent=model_name)
                         for a in engine.adapter_names]
        return {"object": "list", "data": data, "has_more": False,
                "first_id": data[0]["id"], "last_id": data[-1]["id"]}

    @app.post("/v1/completions")
    async def completions(body: api.CompletionRequest):
        beams = body.beam_search()
        adapter, served = model_of(body)
        prompts = body.prompt_inputs()
        if beams is not None:
            return await asyncio.to_thread(beam_search_body, engine, body, beams, served,
                                           [dict(prompt=p) for p in prompts], False, adapter)
        reqs = await _submit(engine, body, [dict(prompt=p) for p in prompts],
                             body.token_budget(), adapter=adapter)
        echo = None
        if body.echo:
            tok = engine.tokenizer
            echo = [p if isinstance(p, str) else tok.decode(p) for p in prompts]
        return await _respond(reqs, body, served, chat=False, tokenizer=engine.tokenizer,
                              echo=echo)

    @app.post("/v1/embeddings")
    async def embeddings(body: api.EmbeddingRequest):
        """Last-token pooled, unit-length embeddings (LLM.embed), computed on the device
        thread between the engine's turns."""
        adapter, served = model_of(body)
        inputs = body.inputs()

        def encode() -> list[list[int]]:
            try:
                ids = [engine.encode(prompt=p) for p in inputs]
            except (BadRequestError, TokenizerError) as e:
                raise api.ApiError(400, str(e), "input") from e
            longest = max(len(i) for i in ids)
            if longest >= engine.max_len:
                raise api.ApiError(400, f"this engine's maximum context length is "
                                   f"{engine.max_len} tokens, but an input has {longest}",
                                   "input", "context_length_exceeded")
            return ids

        ids = await asyncio.to_thread(encode)
        llm = engine_llm(engine)
        try:
            fut = engine.run_exclusive(lambda: llm.embed(ids, dimensions=body.dimensions,
                                                         adapter=adapter))
            vectors = await asyncio.wrap_future(fut)
        except BadRequestError as e:
            raise api.ApiError(400, str(e), getattr(e, "param", None)) from e
        except EngineClosedError as e:
            raise api.ApiError(503, str(e), None, "engine_unavailable", "server_error") from e
        return api.embedding_body(vectors, served, sum(map(len, ids)),
                                  body.encoding_format)

    @app.post("/tokenize")
    async def tokenize(body: api.TokenizeRequest):
        model_of(body)  # an adapter shares the base model's tokenizer
        inputs = body.inputs()
        try:
            ids = await asyncio.to_thread(engine.encode, **inputs)
        except (BadRequestError, TokenizerError) as e:
            raise api.ApiError(400, str(e), next(iter(inputs))) from e
        return {"count": len(ids), "max_model_len": engine.max_len, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(body: api.DetokenizeRequest):
        model_of(body)
        bad = [t for t in body.tokens if not 0 <= t < engine.cfg.vocab_size]
        if bad:
            raise api.ApiError(400, f"token id {bad[0]} is outside the vocabulary of "
                               f"{engine.cfg.vocab_size}", "tokens")
        return {"prompt": engine.tokenizer.decode(body.tokens)}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: api.ChatRequest):
        beams = body.beam_search()
        adapter, served = model_of(body)
        if beams is not None:
            return await asyncio.to_thread(beam_search_body, engine, body, beams, served, [dict(
                messages=body.message_dicts(), chat_options=body.chat_options())], True,
                adapter)
        tools = body.tool_calling(tool_call_parser)
        reqs = await _submit(engine, body, [dict(messages=body.message_dicts(),
                                                 chat_options=body.chat_options())],
                             body.token_budget(), tools, adapter, reasoning)
        return await _respond(reqs, body, served, chat=True, tokenizer=engine.tokenizer,
                              tools=tools, reasoning=body.reasoning_parser(reasoning, tools))

    @app.post("/v1/responses")
    async def responses(body: rs.ResponsesRequest):
        adapter, served = model_of(body)
        history = ([] if body.previous_response_id is None
                   else stored.history(body.previous_response_id))
        tools = body.tool_calling(tool_call_parser)
        if reasoning is not None and body.num_logprobs() is not None:
            raise api.ApiError(400, "logprobs are not supported with a reasoning parser in "
                               "the Responses API (chat completions give them)", "top_logprobs")
        try:
            reqs = await _submit(engine, body, [dict(messages=body.messages(history),
                                                     chat_options=body.chat_options())],
                                 body.token_budget(), tools, adapter, reasoning)
        except api.ApiError as e:
            e.param = "input" if e.param == "messages" else e.param  # this API's name
            raise
        keep = body.store is not False and stored.max_items > 0
        build = rs.ResponseBuilder(body, served, stored=keep, tools=tools,
                                   reasoning=body.reasoning_parser(reasoning, tools))

        def remember(final: dict[str, Any]) -> None:
            if keep:
                stored.put(final, [*history, *body.input_messages(),
                                   build.conversation_turn(final)])

        if body.stream:
            return StreamingResponse(_response_events(reqs[0], build, engine.tokenizer,
                                                      remember),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        result, = await _results(reqs)
        final = build.final(result, engine.tokenizer)
        remember(final)
        return final

    @app.post("/v1/messages")
    async def messages(body: anth.MessagesRequest):
        adapter, served = model_of(body)
        tools = body.tool_calling(tool_call_parser)
        reqs = await _submit(engine, body, [dict(messages=body.message_dicts(),
                                                 chat_options=body.chat_options())],
                             body.token_budget(), tools, adapter, reasoning)
        build = anth.MessageBuilder(body, served, len(reqs[0].prompt_ids), tools,
                                    body.reasoning_parser(reasoning, tools))
        if body.stream:
            return StreamingResponse(_response_events(reqs[0], build, engine.tokenizer),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        result, = await _results(reqs)
        return build.final(result)

    @app.post("/v1/messages/count_tokens")
    async def count_tokens(body: anth.CountTokensRequest):
        """The prompt's tokens as /v1/messages would count them (its chat template)."""
        model_of(body)
        body.tool_calling(tool_call_parser)  # the same checks as a message request
        try:
            ids = await asyncio.to_thread(engine.encode, messages=body.message_dicts(),
                                          chat_options=body.chat_options())
        except (BadRequestError, TokenizerError) as e:
            raise api.ApiError(400, str(e), "messages") from e
        return {"input_tokens": len(ids)}

    @app.get("/v1/responses/{rid}")
    async def get_response(rid: str):
        return stored.body(rid)

    @app.delete("/v1/responses/{rid}")
    async def delete_response(rid: str):
        stored.delete(rid)
        return {"id": rid, "object": "response", "deleted": True}

    return app


async def _submit(engine: Engine, body: api._Request, prompts: list[dict[str, Any]],
                  max_tokens: int | None, tools: ToolCalling | None = None,
                  adapter: str | None = None, reasoning: ReasoningParser | None = None
                  ) -> list[Request]:
    """`_submit_all` on a worker thread: submitting tokenizes the prompts and compiles a
    constraint's grammar (0.3 s for the first one, longer for a large schema), which must
    not stall the event loop's other streams. A client gone meanwhile cancels them."""
    fut = asyncio.get_running_loop().run_in_executor(None, _submit_all, engine, body,
                                                     prompts, max_tokens, tools, adapter,
                                                     reasoning)
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        fut.add_done_callback(_cancel_submitted)
        raise


def _cancel_submitted(fut: asyncio.Future) -> None:
    if not fut.cancelled() and fut.exception() is None:
        for r in fut.result():
            r.cancel()


def _submit_all(engine: Engine, body: api._Request, prompts: list[dict[str, Any]],
                max_tokens: int | None, tools: ToolCalling | None = None,
                adapter: str | None = None, reasoning: ReasoningParser | None = None
                ) -> list[Request]:
    """n engine requests per prompt, in choice order; all or none: if one is refused, the
    ones already queued are cancelled. `tools`: a chat request's tool settings; `adapter`:
    the LoRA adapter its model names; `reasoning`: the parser that will read the text."""
    n = body.num_choices()
    sampling = [body.tool_sampling(body.choice_sampling(j), tools, reasoning)
                for j in range(n)]
    constraint = body.constraint()
    if tools is not None:
        constraint = body.tool_constraint(tools)
    reqs: list[Request] = []
    try:
        for prompt in prompts:
            for j in range(n):
                reqs.append(_submit_one(engine, body, prompt, sampling[j], max_tokens,
                                        constraint, adapter))
    except BaseException:
        for r in reqs:
            r.cancel()
        raise
    return reqs


def _submit_one(engine: Engine, body: api._Request, prompt: dict[str, Any],
                sampling: SamplingParams, max_tokens: int | None,
                constraint: Constraint | None, adapter: str | None = None) -> Request:
    try:
        return engine.submit(**prompt, sampling=sampling, max_tokens=max_tokens,
                             stop=body.stop_list(), constraint=constraint, adapter=adapter,
                             priority=body.priority or 0)
    except ContextLengthError as e:
        raise api.ApiError(400, str(e), "messages" if "messages" in prompt else "prompt",
                           "context_length_exceeded") from e
    except (BadRequestError, TokenizerError) as e:  # a TokenizerError: the chat template
        param = getattr(e, "param", None) or "prompt"
        # The request's own names: "prompt" or "messages", and its structured-output field.
        param = {"prompt": next(iter(prompt)),
                 "constraint": body.constraint_param()}.get(param, param)
        raise api.ApiError(400, str(e), param) from e
    except EngineOverloadedError as e:
        raise api.ApiError(429, str(e), None, "queue_full", "rate_limit_error") from e
    except EngineClosedError as e:
        raise api.ApiError(503, str(e), None, "engine_unavailable", "server_error") from e


async def _respond(reqs: list[Request], body: api._Request, model: str, chat: bool,
                   tokenizer: Tokenizer, echo: list[str] | None = None,
                   tools: ToolCalling | None = None, reasoning: ReasoningParser | None = None):
    rid = api.new_id("chatcmpl" if chat else "cmpl")
    n = body.num_choices()
    if body.stream:
        return StreamingResponse(_sse(reqs, rid, model, chat, body.include_usage(), tokenizer,
                                      n, echo, body.scoring_only(), tools, reasoning),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    results = await _results(reqs)
    if body.scoring_only():
        results = [api.scored_only(r) for r in results]
    return api.completion_body(rid, model, list(results), chat, tokenizer, n, echo,
                               [r.prompt_ids for r in reqs], tools, reasoning)


async def _results(reqs: list[Request]) -> list[Any]:
    """Every request's EngineResult; a client gone meanwhile cancels them."""
    try:
        return list(await asyncio.gather(*(r.aresult() for r in reqs)))
    except asyncio.CancelledError:
        for r in reqs:
            r.cancel()
        raise
    except EngineClosedError as e:
        raise api.ApiError(503, str(e), None, "engine_unavailable", "server_error") from e


async def _response_events(req: Request, build: rs.ResponseBuilder | anth.MessageBuilder,
                           tokenizer: Tokenizer, on_done: Any = None) -> AsyncIterator[str]:
    """A Responses API or Messages API stream: named events, each text delta with the
    logprobs of the tokens generated since the previous one (any left over, such as an
    ending EOS's, in a last empty delta). `on_done` gets the final Responses API response
    before its event goes out. A client that disconnects cancels the request."""
    want, sent = req.sampling.logprobs is not None, 0

    def fmt(ev: tuple[str, dict[str, Any]]) -> str:
        return f"event: {ev[0]}\n{_event(ev[1])}"

    def new_logprobs(entries) -> list[dict[str, Any]]:
        nonlocal sent
        new = entries[sent:] if want else []  # one snapshot: the engine thread appends
        sent += len(new)
        return rs.logprobs_list(new, tokenizer)

    try:
        for ev in build.opening(want):
            yield fmt(ev)
        try:
            async for delta in req:
                for ev in build.delta(delta, new_logprobs(req.logprobs)):
                    yield fmt(ev)
            result = await req.aresult()
        except Exception as e:  # ends the stream with an error event, never a hang
            code = "engine_unavailable" if isinstance(e, EngineClosedError) else None
            yield fmt(build.error(str(e), code))
            return
        rest = new_logprobs(result.logprobs or [])
        if rest:
            for ev in build.delta("", rest):
                yield fmt(ev)
        events = build.closing(result, tokenizer)
        if on_done is not None:
            on_done(events[-1][1]["response"])
        for ev in events:
            yield fmt(ev)
    finally:
        if not req.done:
            req.cancel()


def _event(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _sse(reqs: list[Request], rid: str, model: str, chat: bool, include_usage: bool,
               tokenizer: Tokenizer, n: int = 1, echo: list[str] | None = None,
               scoring_only: bool = False, tools: ToolCalling | None = None,
               reasoning: ReasoningParser | None = None) -> AsyncIterator[str]:
    """Chunks as the engine produces them, each naming its choice (request i is choice i);
    a client that disconnects cancels every request. With logprobs, each chunk carries
    those of the tokens generated since the choice's previous chunk (text held back for a
    stop string may come a chunk later than its logprobs). An echoed prompt is the first
    chunk; with logprobs it carries the prompt's, so it waits for the prefill that scores
    them (done when the first token is out). With `tools` or `reasoning`, a choice's deltas
    go through api.ChatDeltas (reasoning_content, content and tool-call deltas; text that
    may open a marker held back until it is known)."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, req: Request) -> None:
        want, sent, offset = req.sampling.logprobs is not None, 0, 0
        echoed = not echo

        def logprobs(entries) -> dict[str, Any] | None:
            nonlocal sent, offset
            if not want:
                return None
            new = entries[sent:]  # one snapshot: the engine thread may be appending
            sent += len(new)
            body = api.logprobs_body(new, tokenizer, chat, offset)
            offset += 0 if chat else sum(map(len, body["tokens"]))
            return body

        async def send_echo() -> None:
            nonlocal echoed, offset
            lp = None
            if req.sampling.prompt_logprobs is not None:
                lp = api.echo_logprobs_body(req.prompt_ids, req.prompt_logprobs, [], tokenizer)
                offset = sum(map(len, lp["tokens"]))
            await queue.put(api.chunk_body(rid, model, chat, echo[i // n], index=i,
                                           logprobs=lp))
            echoed = True

        split = (api.ChatDeltas(tools, reasoning)
                 if chat and (tools is not None or reasoning is not None) else None)

        async def send_fields(fields: list[dict[str, Any]], entries) -> None:
            for k, f in enumerate(fields):  # logprobs ride on the first
                await queue.put(api.chunk_body(rid, model, chat, index=i, fields=f,
                                               logprobs=None if k else logprobs(entries)))

        try:
            if chat:
                await queue.put(api.chunk_body(rid, model, chat, "", role=True, index=i))
            elif echo and req.sampling.prompt_logprobs is None:
                await send_echo()
            if not scoring_only:
                async for delta in req:
                    if not echoed:
                        await send_echo()
                    if split is not None:
                        await send_fields(split.feed(delta), req.logprobs)
                        continue
                    await queue.put(api.chunk_body(rid, model, chat, delta, index=i,
                                                   logprobs=logprobs(req.logprobs)))
            result = await req.aresult()
            if not echoed:
                await send_echo()
            if scoring_only:
                result = api.scored_only(result)
            reason = result.finish_reason
            if split is not None:
                fields, reason = split.finish(reason)
                await send_fields(fields, result.logprobs or [])
            await queue.put(api.chunk_body(rid, model, chat, None if chat else "",
                                           reason, index=i,
                                           logprobs=logprobs(result.logprobs or []),
                                           stop_reason=result.stop_reason))
            await queue.put(result)
        except Exception as e:  # ends the stream with an error event, never a hang
            await queue.put(e)

    tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(reqs)]
    results: list[Any] = []
    try:
        while len(results) < len(reqs):
            item = await queue.get()
            if isinstance(item, Exception):
                code = "engine_unavailable" if isinstance(item, EngineClosedError) else None
                yield _event(api.error_body(str(item), "server_error", None, code))
                break
            if isinstance(item, dict):
                yield _event(item)
            else:
                results.append(item)
        else:
            if include_usage:
                order = {r.id: i for i, r in enumerate(reqs)}
                results.sort(key=lambda res: order[res.request_id])
                yield _event(api.usage_chunk(rid, model, chat, results, n))
    finally:
        for t in tasks:
            t.cancel()
        for r in reqs:
            if not r.done:
                r.cancel()
    yield "data: [DONE]\n\n"


# ---- running ---------------------------------------------------------------------------------
def bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port for uvicorn to listen on. `serve` binds before it loads
    the model, so a taken port or a bad address is a ConfigError in a second, not a
    uvicorn exit after minutes of loading and warm-up."""
    if not 0 <= port <= 65535:
        raise ConfigError(f"port must be in [0, 65535], got {port}")
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


class BackgroundServer:
    """uvicorn in a daemon thread on an already-bound socket (port 0: any free port).

        with BackgroundServer(app) as srv: requests.get(srv.url + "/health")
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0,
                 log_level: str = "warning"):
        self._sock = bind(host, port)
        self.host, self.port = self._sock.getsockname()[:2]
        self.url = f"http://{self.host}:{self.port}"
        self._server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="off",
                                                     timeout_graceful_shutdown=5))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        name="jaxinfer-http", daemon=True)

    def start(self, timeout_s: float = 30.0) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"server on {self.url} did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._sock.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(checkpoint: str | None = None, host: str = "127.0.0.1", port: int = 8000,
          config=None, dtype: str | None = None, model_name: str | None = None,
          warmup: bool = True, log_level: str = "info", draft: str | None = None,
          num_speculative_tokens: int = 4, ngram_size: int = 3,
          max_stored_responses: int = 1024, tool_call_parser: str | None = None,
          reasoning_parser: str | None = None, allow_runtime_lora_updating: bool = False,
          api_key: str | None = None, allowed_origins: Sequence[str] = (),
          **load_kw) -> None:
    """Load a checkpoint, build and warm the engine, serve until interrupted. `load_kw`
    goes to LLM.load (mesh, fsdp, quantize, group_size, kv_dtype); `draft` ("ngram" or a
    checkpoint) turns on speculative decoding in the engine. In a multi-process run
    process 0 serves HTTP and the other processes follow its engine until it stops."""
    from jaxinfer.llm import LLM

    if allow_runtime_lora_updating and not (config and config.max_loras):
        raise ConfigError("--allow_runtime_lora_updating needs room for adapters: set "
                          "--max_loras")
    if api_key == "":
        raise ConfigError("--api_key is empty")
    sock = bind(host, port) if jax.process_index() == 0 else None  # process 0 serves HTTP
    with contextlib.closing(sock) if sock is not None else contextlib.nullcontext():
        llm = LLM.load(checkpoint, dtype=dtype, **load_kw)
        engine = Engine.from_llm(llm, config, draft, num_speculative_tokens, ngram_size)
        if not engine.is_leader:  # multi-process: process 0 serves HTTP, this one follows it
            print(f"process {jax.process_index()}: following process 0's engine", flush=True)
            with engine:
                engine.join()
            return
        if warmup:
            t0 = time.perf_counter()
            n = engine.warmup()
            print(f"warm-up: {n} compilations in {time.perf_counter() - t0:.1f} s "
                  f"({len(engine.prompt_buckets())} prompt buckets)", flush=True)
        name = model_name or llm.cfg.name
        try:
            app = create_app(engine, name, max_stored_responses, tool_call_parser,
                             reasoning_parser, allow_runtime_lora_updating, api_key,
                             allowed_origins)
            uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                          lifespan="off", timeout_graceful_shutdown=5)
                           ).run(sockets=[sock])
        except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it shut down for
            pass
        finally:
            engine.close()
