"""A request's handle: the thread-safe buffer between the engine thread and its reader.

The engine thread appends text deltas and finally a result (or an error); any number of
readers, in any thread, iterate the deltas synchronously (`for d in req`) or in an asyncio
event loop (`async for d in req`), where the engine thread wakes the loop with
`call_soon_threadsafe`, so no executor thread is held per streaming request.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from jaxinfer.metrics import RequestMetrics
from jaxinfer.output_text import TextOutput
from jaxinfer.sampling import SamplingParams, TokenLogprob


@dataclasses.dataclass
class EngineResult:
    request_id: int
    text: str
    token_ids: list[int]  # generated ids; an ending EOS id is included, as in Completion
    prompt_tokens: int
    finish_reason: str  # "stop" (EOS or stop string), "length" or "cancelled"
    metrics: RequestMetrics
    logprobs: list[TokenLogprob] | None = None  # one per token id, if the request asked
    # One per prompt token (None for the first), if the request asked (prompt_logprobs).
    prompt_logprobs: list[TokenLogprob | None] | None = None
    # vLLM's stop_reason: the stop string that ended the output, or the stop_token_ids id;
    # None when EOS, a grammar's end or the token budget ended it.
    stop_reason: str | int | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Request:
    """Handle of one submitted request: iterate it (sync or async) for text deltas, or
    call `result()`. Only the engine thread writes to it; any thread may read."""

    def __init__(self, request_id: int, prompt_ids: list[int], sampling: SamplingParams,
                 max_tokens: int, stop: tuple[str, ...], on_cancel: Callable[[Request], None],
                 on_finish: Callable[[Request], None] | None = None, warmup: bool = False):
        self.id, self.prompt_ids, self.sampling = request_id, prompt_ids, sampling
        self.max_tokens, self.stop, self.warmup = max_tokens, stop, warmup
        self.metrics = RequestMetrics()
        self.arrival = time.perf_counter()
        self._on_cancel, self._on_finish = on_cancel, on_finish
        self._cond = threading.Condition()
        self._deltas: list[str] = []
        self._done = False
        self._result: EngineResult | None = None
        self._error: BaseException | None = None
        self._wakers: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self.cancel_requested = False
        # Engine-thread state.
        self.cancel_seen = False  # the engine applied the cancel (at a turn boundary)
        self.adapter = 0  # LoRA adapter index in the engine's stack (0: none)
        self.priority = 0  # queue order under the priority policy (lower first)
        self.constraint: Any = None  # structured.Constraint, and its llguidance matcher
        self.matcher: Any = None
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] = []  # readers may take a prefix while it grows
        self.prompt_logprobs: list[TokenLogprob | None] = []
        self.output: TextOutput | None = None  # set when its prefill is done
        self.first_t: float | None = None
        self.last_t: float | None = None

    @property
    def text(self) -> str:
        """The output text so far (stop strings applied; a held-back tail included)."""
        return "" if self.output is None else self.output.text

    # ---- consumer side ------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self._done

    def cancel(self) -> None:
        """Stop generating (a client went away); the slot is freed at the next turn."""
        self.cancel_requested = True
        self._on_cancel(self)

    def __iter__(self) -> Iterator[str]:
        i = 0
        while True:
            with self._cond:
                while i >= len(self._deltas) and not self._done:
                    self._cond.wait()
                items, done = self._deltas[i:], self._done
            i += len(items)
            yield from items
            if done:
                break
        if self._error is not None:
            raise self._error

    async def _aiter(self) -> AsyncIterator[str]:
        waker = (asyncio.get_running_loop(), asyncio.Event())
        with self._cond:
            self._wakers.append(waker)
        try:
            i = 0
            while True:
                waker[1].clear()  # before reading, so a delta arriving now re-sets it
                with self._cond:
                    items, done = self._deltas[i:], self._done
                i += len(items)
                for d in items:
                    yield d
                if done:
                    break
                await waker[1].wait()
        finally:
            with self._cond:
                self._wakers.remove(waker)
        if self._error is not None:
            raise self._error

    def __aiter__(self) -> AsyncIterator[str]:
        return self._aiter()

    def result(self, timeout: float | None = None) -> EngineResult:
        with self._cond:
            if not self._cond.wait_for(lambda: self._done, timeout):
                raise TimeoutError(f"request {self.id} not finished after {timeout} s")
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    async def aresult(self) -> EngineResult:
        async for _ in self:
            pass
        assert self._result is not None
        return self._result

    # ---- engine side ----------------------------------------------------------------------
    def publish(self, delta: str | None = None, result: EngineResult | None = None,
                 error: BaseException | None = None) -> None:
        with self._cond:
            if self._done:
                return
            if delta:
                self._deltas.append(delta)
            if result is not None or error is not None:
                self._result, self._error, self._done = result, error, True
            self._cond.notify_all()
            wakers = list(self._wakers)
        for loop, ev in wakers:
            try:
                loop.call_soon_threadsafe(ev.set)
            except RuntimeError:  # that event loop is closed: nobody is listening
                pass
        if self._done and self._on_finish is not None:
            try:
                self._on_finish(self)
            except Exception:  # a caller's callback must not kill the device loop
                logging.exception("on_finish callback of request %d failed", self.id)
