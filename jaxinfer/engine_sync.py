"""Multi-host serving: every process runs the same engine scheduler, fed by process 0.

A multi-controller JAX program must make the same jitted calls, in the same order, on
every process. The engine's scheduler is deterministic given its inputs (the requests
submitted, the cancellations, the shutdown) and the tokens each step returns, which are
the same on every process. So process 0, the one with the HTTP server or the batch file,
publishes each loop turn's inputs, and the other processes read turn t's inputs before
they run turn t; every process then admits, prefills, decodes and frees slots exactly as
process 0 does. The channel is the key-value store of JAX's coordination service, which
`jax.distributed.initialize` already started: no Ray, no second RPC system, no extra port.

Messages are JSON (never pickle: a message names requests, it does not run code). A turn's
key is deleted once a later step has finished on process 0, since no process can have
taken part in that step's collectives without having read the turn first.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
from collections.abc import Callable

import jax

from jaxinfer.errors import DistributedError
from jaxinfer.sampling import SamplingParams

_POLL_MS = 10_000  # a follower re-checks whether it was closed this often while idle
_KEEP = 64  # turns kept after the last one known read by every process (belt and braces)
_NAMES = itertools.count()  # engines are built in the same order on every process


@dataclasses.dataclass(frozen=True)
class Submit:
    """A request as process 0 queued it: everything the scheduler reads of it."""

    id: int
    prompt_ids: list[int]
    sampling: SamplingParams  # seed resolved on process 0: every process draws alike
    max_tokens: int
    stop: tuple[str, ...]
    warmup: bool
    constraint: dict | None = None  # structured.Constraint.to_json()
    adapter: int = 0  # LoRA adapter index (0: none)
    priority: int = 0  # queue order under the priority scheduling policy (lower first)


@dataclasses.dataclass(frozen=True)
class Cancel:
    id: int


@dataclasses.dataclass(frozen=True)
class Close:
    error: str | None = None  # process 0's engine failed: the followers fail too


Event = Submit | Cancel | Close


def encode(events: list[Event]) -> bytes:
    out = []
    for e in events:
        if isinstance(e, Submit):
            d = dataclasses.asdict(e)
            out.append({"submit": {**d, "stop": list(e.stop)}})
        elif isinstance(e, Cancel):
            out.append({"cancel": e.id})
        else:
            out.append({"close": e.error})
    return json.dumps(out, separators=(",", ":")).encode()


def decode(data: bytes) -> list[Event]:
    events: list[Event] = []
    for d in json.loads(data):
        if "submit" in d:
            s = d["submit"]
            events.append(Submit(s["id"], s["prompt_ids"], SamplingParams(**s["sampling"]),
                                 s["max_tokens"], tuple(s["stop"]), s["warmup"],
                                 s.get("constraint"), s.get("adapter", 0),
                                 s.get("priority", 0)))
        elif "cancel" in d:
            events.append(Cancel(d["cancel"]))
        else:
            events.append(Close(d["close"]))
    return events


class TurnLog:
    """Process 0 writes turn t's events under one key; the others block until it exists."""

    def __init__(self):
        from jax._src import distributed  # the client jax.distributed.initialize made

        self._client = distributed.global_state.client
        if self._client is None:
            raise DistributedError("a multi-process engine needs jax.distributed.initialize")
        self.leader = jax.process_index() == 0
        self._prefix = f"jaxinfer/engine{next(_NAMES)}/turn/"
        self._published: collections.deque[int] = collections.deque()

    def publish(self, turn: int, events: list[Event]) -> None:
        self._client.key_value_set_bytes(f"{self._prefix}{turn}", encode(events))
        self._published.append(turn)

    def publish_failure(self, error: BaseException) -> None:
        """Best effort, after process 0's loop failed: the followers waiting for the next
        turn stop with this error instead of waiting for ever."""
        turn = self._published[-1] + 1 if self._published else 0
        try:
            self.publish(turn, [Close(f"process 0's engine failed: {error!r}")])
        except Exception:  # the coordination service itself may be what failed
            pass

    def read(self, turn: int, closing: Callable[[], bool]) -> list[Event]:
        """Turn `turn`'s events; waits as long as process 0 is alive (JAX ends this
        process if process 0 dies) unless `closing()` turns true meanwhile."""
        while True:
            try:
                return decode(self._client.blocking_key_value_get_bytes(
                    f"{self._prefix}{turn}", _POLL_MS))
            except jax.errors.JaxRuntimeError as e:
                if "DEADLINE_EXCEEDED" not in str(e):
                    raise DistributedError(f"process {jax.process_index()}: lost process 0's "
                                           f"engine turns: {str(e).splitlines()[0]}") from e
                if closing():
                    return [Close()]

    def forget(self, read_by_all: int) -> None:
        """Delete the keys of turns every process has read (those <= `read_by_all`),
        keeping a margin."""
        while self._published and self._published[0] <= read_by_all - _KEEP:
            self._client.key_value_delete(f"{self._prefix}{self._published.popleft()}")


def connect() -> TurnLog | None:
    """The turn log of a new engine in a multi-process run; None in a single process."""
    return TurnLog() if jax.process_count() > 1 else None
