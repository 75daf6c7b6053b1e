"""OpenAI-style beam-search requests (vLLM's `use_beam_search`) over an engine's weights:
the server's and batch jobs' one path.

A beam search needs the whole device, so it runs as `LLM.beam_search` on the engine's
device thread between its turns (`Engine.run_exclusive`: the slots wait meanwhile).
"""

from __future__ import annotations

from typing import Any

from jaxinfer import openai_api as api
from jaxinfer.engine import Engine, EngineClosedError
from jaxinfer.errors import BadRequestError, TokenizerError


def engine_llm(engine: Engine):
    """The library front end over the engine's weights and adapters (whole-device jobs:
    beam search, embeddings)."""
    from jaxinfer.llm import LLM

    llm = LLM(engine.cfg, engine.params, engine.tokenizer, engine.mesh, engine.impl,
              engine.kv_dtype)
    llm.adapters, llm.adapter_names = engine.adapters, engine.adapter_slots
    return llm


def beam_search_body(engine: Engine, body: api._Request, beams: dict[str, Any], model: str,
                     prompts: list[dict[str, Any]], chat: bool, adapter: str | None = None
                     ) -> dict[str, Any]:
    """The response body of a beam-search request (`prompts`: Engine.encode arguments, one
    per prompt); api.ApiError (400, or 503 once the engine closed) for what fails. Blocks
    until the search is done. A request without max_tokens may fill the context."""
    try:
        ids = [engine.encode(**p) for p in prompts]
    except (BadRequestError, TokenizerError) as e:
        raise api.ApiError(400, str(e), next(iter(prompts[0]))) from e
    longest = max(len(i) for i in ids)
    budget = body.token_budget()
    budget = engine.max_len - longest if budget is None else budget
    if budget < 1 or longest + budget > engine.max_len:
        raise api.ApiError(400, f"this engine's maximum context length is {engine.max_len} "
                           f"tokens, but {longest + budget} were requested ({longest} in the "
                           f"prompt, {budget} for the completion)", next(iter(prompts[0])),
                           "context_length_exceeded")
    llm = engine_llm(engine)
    try:
        outs = engine.run_exclusive(lambda: llm.beam_search(
            ids, max_new_tokens=budget, adapter=adapter, **beams)).result()
    except BadRequestError as e:
        raise api.ApiError(400, str(e), getattr(e, "param", None)) from e
    except EngineClosedError as e:
        raise api.ApiError(503, str(e), None, "engine_unavailable", "server_error") from e
    return api.beam_body(api.new_id("chatcmpl" if chat else "cmpl"), model, outs, chat)
