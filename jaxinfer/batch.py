"""Offline batch jobs over the engine: JSONL prompts in, JSONL results out, resumable.

Input, one JSON object a line:
    {"id": "q1", "prompt": "Once upon a time", "max_tokens": 64, "temperature": 0}
    {"id": 7, "messages": [{"role": "user", "content": "Hi"}], "stop": ["\\n"], "seed": 1}
    {"id": 8, "prompt": "SELECT", "adapter": "sql"}     a LoRA adapter loaded by name
Output, one line per input line, in completion order:
    {"id": "q1", "text": ..., "token_ids": [...], "finish_reason": "length",
     "usage": {...}, "metrics": {...}}
    {"id": 7, "error": "top_p must be in (0, 1], got 2"}     a bad line is reported, not fatal

OpenAI's batch format works too, line by line (what OpenAI's Batch API and vLLM's run_batch
take): {"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions", "body": {...}}
(or "/v1/completions", "/v1/responses", "/v1/messages")
gets {"id": ..., "custom_id": "r1", "response": {"status_code": 200, "request_id": ...,
"body": <the server's response body>}, "error": null}; a bad request gets status 400 and
the endpoint's error body. Anthropic's Message Batches format works as well:
{"custom_id": "r1", "params": {<a /v1/messages body>}} gets {"custom_id": "r1", "result":
{"type": "succeeded", "message": {...}}} or {"type": "errored", "error": {...}}.
Such a line's body alone sets its parameters (the API's defaults, not the job's), `n`
choices, `echo` and vLLM's `use_beam_search` (run between the engine's turns, as the
server runs it) included; `stream` is refused. A body's `model` must be the job's model
(`model_name`, default the checkpoint's name) or one of its LoRA adapters (`lora_modules`),
as the server requires: every line's model or adapter is checked before any runs, since
error lines would count as done on a rerun.

Resuming: ids (or custom_ids) already present in the output are skipped, and a torn last
line (a killed run) is cut off first, so rerunning the same command finishes the job with
each id written exactly once. Each result is appended and flushed as soon as it is
finished, with only a bounded number of requests in flight, so an interrupted run loses at
most those.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import queue
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jaxinfer import anthropic_api as anth
from jaxinfer import openai_api as api
from jaxinfer import openai_responses as rs
from jaxinfer.engine import Engine, EngineConfig, Request
from jaxinfer.errors import BadRequestError, JaxinferError
from jaxinfer.openai_beam import beam_search_body
from jaxinfer.reasoning import ReasoningParser
from jaxinfer.sampling import SamplingParams
from jaxinfer.structured import from_openai
from jaxinfer.tool_calls import check_parsers

# The server's sampling fields, plus the two it spells per endpoint (chat's top_logprobs,
# completions' echo): here a line gives SamplingParams' own names.
SAMPLING_FIELDS = (*api.SAMPLING_FIELDS, "logprobs", "prompt_logprobs")
CONSTRAINT_FIELDS = ("response_format", "guided_json", "guided_regex", "guided_choice",
                     "guided_grammar")  # structured output, as the server takes them
_KNOWN = {"id", "prompt", "messages", "max_tokens", "stop", "metadata", "adapter", "priority",
          *SAMPLING_FIELDS, *CONSTRAINT_FIELDS}


@dataclasses.dataclass
class BatchSummary:
    written: int = 0  # result lines appended by this run
    errors: int = 0  # of which error lines
    skipped: int = 0  # ids already in the output
    duplicates: int = 0  # ids seen earlier in the input


def _key(obj: Any, lineno: int) -> str:
    """The resume key of an input line: its custom_id (OpenAI's batch format) or id, or
    its line number when it has neither."""
    if isinstance(obj, dict) and isinstance(obj.get("custom_id"), str):
        return "custom_id:" + json.dumps(obj["custom_id"])
    rid = obj.get("id") if isinstance(obj, dict) else None
    if isinstance(rid, (str, int)) and not isinstance(rid, bool):
        return "id:" + json.dumps(rid)
    return f"line:{lineno}"


_OPENAI_URLS = {"/v1/chat/completions": api.ChatRequest, "/v1/completions":
                api.CompletionRequest, "/v1/responses": rs.ResponsesRequest,
                anth.PATH: anth.MessagesRequest}


def _line_body(obj: Any) -> Any:
    """The request body of a custom_id line: OpenAI's `body` or Anthropic's `params`."""
    return obj.get("body", obj.get("params")) if isinstance(obj, dict) else None


class _OpenAILine:
    """One line in OpenAI's batch format (or Anthropic's): its engine requests (one per
    choice) and its output record."""

    def __init__(self, obj: dict[str, Any], engine: Engine, model: str,
                 tool_call_parser: str | None = None,
                 reasoning: ReasoningParser | None = None):
        self.custom_id, self.engine = obj["custom_id"], engine
        self.model, self.served, self.req = model, model, None
        self.n, self.scoring_only, self.echo = 1, False, None
        self.tool_call_parser, self.reasoning = tool_call_parser, reasoning
        self.tools = None  # a chat line's tool settings
        self.beam: Callable[[], dict[str, Any]] | None = None  # a beam search's body
        # Anthropic's Message Batches line: {"custom_id", "params"}, no url.
        self.anthropic = "params" in obj and "url" not in obj
        self.url = anth.PATH if self.anthropic else obj.get("url")

    def submit_kwargs(self, obj: dict[str, Any]) -> list[dict[str, Any]]:
        """Engine.submit arguments of the line, one set per choice; api.ApiError (with its
        status and field) for a bad one."""
        from pydantic import ValidationError

        url, body = self.url, _line_body(obj)
        if obj.get("method", "POST") != "POST" or url not in _OPENAI_URLS:
            raise api.ApiError(400, f"url must be one of {sorted(_OPENAI_URLS)} with method "
                               f"POST, got {obj.get('method', 'POST')} {url!r}", "url")
        if not isinstance(body, dict):
            raise api.ApiError(400, f"body must be a JSON object, got {body!r}", "body")
        try:
            req = self.req = _OPENAI_URLS[url].model_validate(body)
        except ValidationError as e:
            raise api.validation_error(e.errors()[0]) from None
        if req.stream:
            raise api.ApiError(400, "stream is not supported in batch jobs", "stream")
        self.n = req.num_choices()
        adapter = api.check_model(req.model, self.model, self.engine.adapter_names)
        self.served = adapter or self.model
        beams = (None if isinstance(req, (rs.ResponsesRequest, anth.MessagesRequest))
                 else req.beam_search())
        if beams is not None:  # run by `beam_record` instead of engine requests
            chat = isinstance(req, api.ChatRequest)
            prompts = ([dict(messages=req.message_dicts(), chat_options=req.chat_options())]
                       if chat else [dict(prompt=p) for p in req.prompt_inputs()])
            self.beam = functools.partial(beam_search_body, self.engine, req, beams,
                                          self.served, prompts, chat, adapter)
            return []
        kw: dict[str, Any] = dict(stop=req.stop_list(), constraint=req.constraint(),
                                  max_tokens=req.token_budget(), adapter=adapter,
                                  priority=req.priority or 0)
        if isinstance(req, rs.ResponsesRequest):
            if req.previous_response_id is not None:
                raise api.ApiError(400, "previous_response_id is not supported in batch jobs "
                                   "(they store no responses); send the conversation as "
                                   "input", "previous_response_id")
        if isinstance(req, (rs.ResponsesRequest, api.ChatRequest, anth.MessagesRequest)):
            kw["messages"] = (req.messages() if isinstance(req, rs.ResponsesRequest)
                              else req.message_dicts())
            kw["chat_options"] = req.chat_options()
            self.tools = req.tool_calling(self.tool_call_parser)
            kw["constraint"] = req.tool_constraint(self.tools)
            self.reasoning = req.reasoning_parser(self.reasoning, self.tools)
            return [dict(kw, sampling=req.tool_sampling(req.choice_sampling(j), self.tools,
                                                        self.reasoning))
                    for j in range(self.n)]
        prompts = req.prompt_inputs()
        if len(prompts) != 1:
            raise api.ApiError(400, "one prompt per batch line", "prompt")
        kw["prompt"] = prompts[0]
        if req.echo:
            p = prompts[0]
            self.echo = [p if isinstance(p, str) else self.engine.tokenizer.decode(p)]
        self.scoring_only = req.scoring_only()
        return [dict(kw, sampling=req.choice_sampling(j)) for j in range(self.n)]

    def beam_record(self) -> dict[str, Any]:
        """The record of a `use_beam_search` line: LLM.beam_search over the engine's weights
        between its turns (the line's engine requests in flight meanwhile wait)."""
        body = self.beam()
        return self.record(200, body, body["id"])

    def record(self, status: int, body: dict[str, Any], request_id: str | None = None
               ) -> dict[str, Any]:
        if self.anthropic:
            result = ({"type": "succeeded", "message": body} if status == 200
                      else {"type": "errored", "error": body})
            return {"custom_id": self.custom_id, "result": result}
        return {"id": api.new_id("batch_req"), "custom_id": self.custom_id,
                "response": {"status_code": status, "request_id": request_id, "body": body},
                "error": None}

    def error_record(self, e: JaxinferError | api.ApiError) -> dict[str, Any]:
        if not isinstance(e, api.ApiError):
            e = api.ApiError(400, str(e), getattr(e, "param", None))
        if self.url == anth.PATH:
            return self.record(e.status, anth.error_body(e.status, e.message))
        return self.record(e.status, e.body())

    def result_record(self, reqs: list[Request]) -> dict[str, Any]:
        try:
            results = [r.result() for r in reqs]
        except JaxinferError as e:
            return self.error_record(e)
        if self.scoring_only:
            results = [api.scored_only(r) for r in results]
        if isinstance(self.req, anth.MessagesRequest):
            body = anth.MessageBuilder(self.req, self.served, results[0].prompt_tokens,
                                       self.tools, self.reasoning).final(results[0])
            return self.record(200, body, body["id"])
        if isinstance(self.req, rs.ResponsesRequest):
            build = rs.ResponseBuilder(self.req, self.served, tools=self.tools,
                                       reasoning=self.reasoning)
            body = build.final(results[0], self.engine.tokenizer)
            return self.record(200, body, body["id"])
        chat = isinstance(self.req, api.ChatRequest)
        rid = api.new_id("chatcmpl" if chat else "cmpl")
        return self.record(200, api.completion_body(
            rid, self.served, results, chat, self.engine.tokenizer, self.n, self.echo,
            [r.prompt_ids for r in reqs], self.tools, self.reasoning), rid)


def _count_lines(path: Path, model: str, adapters: list[str]) -> int:
    """Non-blank lines of the input. A BadRequestError, before anything is written, if an
    OpenAI-format line asks for another model or a line for an adapter not loaded: as
    error lines they would all count as done and a rerun under the right --model_name or
    --lora_modules would skip them."""
    total = 0
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            total += 1
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue  # an error line of its own, later
            body = _line_body(obj) if isinstance(obj, dict) and "custom_id" in obj else None
            asked = body.get("model") if isinstance(body, dict) else None
            if isinstance(asked, str) and asked != model and asked not in adapters:
                raise BadRequestError(f"line {lineno} asks for model {asked!r}; this job "
                                      f"serves {model!r} (--model_name names it) and LoRA "
                                      f"adapters {adapters} (--lora_modules)", "model")
            adapter = obj.get("adapter") if isinstance(obj, dict) else None
            if isinstance(adapter, str) and adapter not in adapters:
                raise BadRequestError(f"line {lineno} asks for LoRA adapter {adapter!r}; "
                                      f"this job has {adapters} (--lora_modules)", "adapter")
    return total


def _done_keys(path: Path) -> set[str]:
    """Keys already written; truncates a torn (unterminated or unparsable) last line."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    keep = data[: data.rfind(b"\n") + 1]  # drop an unterminated tail
    keys = set()
    for line in keep.decode("utf-8", errors="replace").splitlines():
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            keys.add(_key(obj, obj.get("line", -1)))
    if len(keep) != len(data):
        with open(path, "r+b") as f:
            f.truncate(len(keep))
    return keys


def parse_request(obj: Any, defaults: dict[str, Any]) -> dict[str, Any]:
    """Engine.submit keyword arguments of one input object; BadRequestError if bad."""
    if not isinstance(obj, dict):
        raise BadRequestError(f"a line must be a JSON object, got {type(obj).__name__}")
    if not isinstance(obj.get("id"), (str, int)) or isinstance(obj.get("id"), bool):
        raise BadRequestError(f"every line needs an \"id\" (string or integer), got "
                              f"{obj.get('id')!r}")
    unknown = sorted(set(obj) - _KNOWN)
    if unknown:
        raise BadRequestError(f"unknown fields {unknown}; known: {sorted(_KNOWN)}")
    if ("prompt" in obj) == ("messages" in obj):
        raise BadRequestError("a line needs exactly one of \"prompt\" and \"messages\"")
    kw: dict[str, Any] = {}
    if "prompt" in obj:
        if not isinstance(obj["prompt"], str):
            raise BadRequestError(f"prompt must be a string, got {obj['prompt']!r}")
        kw["prompt"] = obj["prompt"]
    else:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str) for m in msgs):
            raise BadRequestError("messages must be a non-empty list of "
                                  "{\"role\": str, \"content\": str}")
        kw["messages"] = msgs
    merged = {**defaults, **{k: obj[k] for k in (*SAMPLING_FIELDS, "max_tokens", "stop")
                             if k in obj}}
    kw["sampling"] = SamplingParams(**{k: merged[k] for k in SAMPLING_FIELDS if k in merged})
    kw["max_tokens"] = merged.get("max_tokens")
    stop = merged.get("stop", [])
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise BadRequestError(f"stop must be a string or a list of strings, got {stop!r}")
    kw["stop"] = stop
    constraint = from_openai(*(obj.get(k) for k in CONSTRAINT_FIELDS))
    if constraint is not None:
        kw["constraint"] = constraint
    if obj.get("adapter") is not None:
        if not isinstance(obj["adapter"], str):
            raise BadRequestError(f"adapter must be a LoRA adapter's name, got "
                                  f"{obj['adapter']!r}")
        kw["adapter"] = obj["adapter"]
    if obj.get("priority") is not None:
        kw["priority"] = obj["priority"]  # Engine.submit checks it
    return kw


@dataclasses.dataclass
class _Line:
    """An input line in flight: its requests (one per choice) and how to record them."""

    record: Callable[[list[Request]], dict[str, Any]]
    reqs: list[Request] = dataclasses.field(default_factory=list)
    left: int = 0  # requests not finished (or not submitted) yet


def _result_record(rid: Any, reqs: list[Request]) -> dict[str, Any]:
    try:
        r = reqs[0].result()
    except JaxinferError as e:
        return {"id": rid, "error": str(e)}
    n = len(r.token_ids)
    extra = {} if r.logprobs is None else {"logprobs": [dataclasses.asdict(e) for e in r.logprobs]}
    if r.prompt_logprobs is not None:
        extra["prompt_logprobs"] = [e and dataclasses.asdict(e) for e in r.prompt_logprobs]
    return {"id": rid, "text": r.text, "token_ids": r.token_ids, **extra,
            "finish_reason": r.finish_reason,
            "usage": {"prompt_tokens": r.prompt_tokens, "completion_tokens": n,
                      "total_tokens": r.prompt_tokens + n,
                      "cached_tokens": r.metrics.cached_tokens},
            "metrics": r.metrics.to_json()}


def _is_error(rec: dict[str, Any]) -> bool:
    if "result" in rec:  # Anthropic's format
        return rec["result"]["type"] != "succeeded"
    return "error" in rec and (rec["error"] is not None
                               or rec["response"]["status_code"] != 200)


def check_paths(input_path: str | Path, output_path: str | Path) -> tuple[Path, Path]:
    """BadRequestError unless the input is a file and the output can be appended to and
    is not the input (whose ids would all read as done: nothing would run)."""
    input_path, output_path = Path(input_path), Path(output_path)
    if not input_path.exists():
        raise BadRequestError(f"input file {input_path} does not exist")
    if not input_path.is_file():
        raise BadRequestError(f"input {input_path} is not a file")
    if output_path.is_dir():
        raise BadRequestError(f"output {output_path} is a directory, not a file")
    if output_path.exists() and output_path.samefile(input_path):
        raise BadRequestError(f"output {output_path} is the input file: results are "
                              "appended to the output, so it must be another file")
    return input_path, output_path


def run_batch(engine: Engine, input_path: str | Path, output_path: str | Path,
              defaults: dict[str, Any] | None = None, progress: bool = True,
              max_in_flight: int | None = None, model_name: str | None = None,
              tool_call_parser: str | None = None, reasoning_parser: str | None = None
              ) -> BatchSummary:
    """Generate for every input line not yet in the output; see the module docstring.
    `model_name` is the model OpenAI-format lines may name (default: the engine's);
    `tool_call_parser` and `reasoning_parser` read chat answers as the server does."""
    input_path, output_path = check_paths(input_path, output_path)
    check_parsers(tool_call_parser, reasoning_parser)
    reasoning = ReasoningParser(reasoning_parser) if reasoning_parser else None
    defaults = dict(defaults or {})
    done = _done_keys(output_path)
    summary = BatchSummary()
    limit = max_in_flight or 2 * engine.config.num_slots
    finished: queue.Queue[Request] = queue.Queue()
    in_flight: dict[Request, _Line] = {}  # each live request -> its line
    seen: set[str] = set()
    model = model_name or engine.cfg.name
    total = _count_lines(input_path, model, engine.adapter_names)
    from tqdm import tqdm

    bar = tqdm(total=total, file=sys.stderr, disable=not progress, unit="req",
               dynamic_ncols=True)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    with open(input_path, encoding="utf-8") as fin, open(output_path, "a",
                                                         encoding="utf-8") as fout:
        def write(rec: dict[str, Any]) -> None:
            fout.write(json.dumps(rec, ensure_ascii=False) + "\n")
            fout.flush()
            summary.written += 1
            summary.errors += _is_error(rec)
            bar.update(1)

        def drain(block: bool) -> None:
            while in_flight:
                try:
                    req = finished.get(block=block)
                except queue.Empty:
                    return
                entry = in_flight.pop(req, None)
                if entry is None:  # a choice of a line whose later choice was refused
                    continue
                entry.left -= 1
                if not entry.left:
                    write(entry.record(entry.reqs))
                block = False

        try:
            for lineno, line in enumerate(fin, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    obj, err = None, f"line {lineno} is not valid JSON: {e}"
                else:
                    err = None
                key = _key(obj, lineno)
                if key in done or key in seen:
                    summary.skipped += key in done
                    summary.duplicates += key not in done
                    bar.update(1)
                    continue
                seen.add(key)
                rid = obj.get("id") if isinstance(obj, dict) else None
                oa = (_OpenAILine(obj, engine, model, tool_call_parser, reasoning)
                      if key.startswith("custom_id:") else None)
                entry = None
                try:
                    if err is not None:
                        raise BadRequestError(err)
                    kws = oa.submit_kwargs(obj) if oa else [parse_request(obj, defaults)]
                    if oa is not None and oa.beam is not None:
                        write(oa.beam_record())
                        continue
                    entry = _Line(oa.result_record if oa else functools.partial(
                        _result_record, rid), left=len(kws))
                    for kw in kws:
                        while len(in_flight) >= limit:
                            drain(block=True)
                        req = engine.submit(**kw, block=True, on_finish=finished.put)
                        entry.reqs.append(req)  # counted in `left` from the start, so
                        in_flight[req] = entry  # a choice finishing now writes nothing
                except (JaxinferError, api.ApiError) as e:
                    for r in entry.reqs if entry else []:  # one record per line: the error
                        r.cancel()
                        in_flight.pop(r, None)
                    if oa is not None:
                        write(oa.error_record(e))
                    else:
                        write({"id": rid, "line": lineno, "error": str(e)} if rid is None
                              or key.startswith("line:") else {"id": rid, "error": str(e)})
                drain(block=False)
            while in_flight:
                drain(block=True)
        finally:
            for req in in_flight:
                req.cancel()
            bar.close()
    return summary


def run_batch_job(input_path: str, output_path: str, checkpoint: str | None = None,
                  dtype: str | None = None, config: EngineConfig | None = None,
                  defaults: dict[str, Any] | None = None, progress: bool = True,
                  draft: str | None = None, num_speculative_tokens: int = 4,
                  ngram_size: int = 3, model_name: str | None = None,
                  tool_call_parser: str | None = None, reasoning_parser: str | None = None,
                  **load_kw) -> BatchSummary:
    """Load a model, run `run_batch` on it, report a one-line summary on stderr. `load_kw`
    goes to LLM.load (mesh, fsdp, quantize, group_size, kv_dtype); `draft` ("ngram" or a
    checkpoint) turns on speculative decoding in the engine. In a multi-process run
    process 0 does the files and the other processes follow its engine."""
    from jaxinfer.llm import LLM

    check_paths(input_path, output_path)  # before the model load: fail fast
    llm = LLM.load(checkpoint, dtype=dtype, **load_kw)
    with Engine.from_llm(llm, config, draft, num_speculative_tokens, ngram_size) as engine:
        if not engine.is_leader:  # multi-process: process 0 reads and writes the files
            engine.join()
            return BatchSummary()
        s = run_batch(engine, input_path, output_path, defaults, progress,
                      model_name=model_name, tool_call_parser=tool_call_parser,
                      reasoning_parser=reasoning_parser)
    print(f"{s.written} results written to {os.fspath(output_path)} ({s.errors} errors), "
          f"{s.skipped} already done, {s.duplicates} duplicate ids skipped", file=sys.stderr)
    return s
