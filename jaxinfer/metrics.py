"""Serving metrics: per-request timings and their aggregate, in Prometheus text format.

Per request (returned beside `usage`): time in queue, time to first token (TTFT, from
arrival), mean inter-token latency (ITL), decode tokens/s, end-to-end latency, prompt
tokens served from the prefix cache. The aggregate keeps counters, histograms and a
sliding-window throughput; `render()` writes the Prometheus 0.0.4 text exposition format
by hand (a dozen lines), so the engine needs no metrics library. Thread-safe: the engine
thread records, server threads read.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import threading
import time
from typing import Any

PREFIX = "jaxinfer"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclasses.dataclass
class RequestMetrics:
    queue_s: float = 0.0  # arrival -> prefill start
    ttft_s: float = 0.0  # arrival -> first token on the host
    itl_s: float = 0.0  # mean gap between consecutive tokens
    decode_tokens_per_s: float = 0.0  # tokens after the first / their time
    e2e_s: float = 0.0  # arrival -> finished
    cached_tokens: int = 0  # prompt tokens reused from the prefix cache
    prefilled_tokens: int = 0  # prompt tokens actually computed
    preemptions: int = 0  # times a request of higher priority took its slot

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Histogram:
    def __init__(self, buckets: tuple[float, ...] = _LATENCY_BUCKETS):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, x: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, x)] += 1
        self.sum += x
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, acc = [], 0
        for le, c in zip([*map(_fmt, self.buckets), "+Inf"], self.counts, strict=True):
            acc += c
            out.append(f'{name}_bucket{{le="{le}"}} {acc}')
        return [*out, f"{name}_sum {_fmt(self.sum)}", f"{name}_count {self.count}"]


def _fmt(x: float) -> str:
    return repr(float(x)) if isinstance(x, float) else str(x)


class EngineMetrics:
    """Aggregates over finished requests plus live gauges supplied by the engine."""

    def __init__(self, window_s: float = 10.0):
        self._lock = threading.Lock()
        self.window_s = window_s
        self.requests: collections.Counter[str] = collections.Counter()  # by finish reason
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.prefill_tokens = 0  # prompt tokens computed (prefix-cache hits excluded)
        self.prefix_queries = 0
        self.prefix_hits = 0  # requests that reused at least one cached block
        self.prefix_hit_tokens = 0
        self.ttft = Histogram()
        self.itl = Histogram()
        self.e2e = Histogram()
        self.queue_time = Histogram()
        self._recent: collections.deque[tuple[float, int]] = collections.deque()

    def on_prefill(self, prompt_tokens: int, cached_tokens: int) -> None:
        with self._lock:
            self.prompt_tokens += prompt_tokens
            self.prefill_tokens += prompt_tokens - cached_tokens
            self.prefix_queries += 1
            if cached_tokens:
                self.prefix_hits += 1
                self.prefix_hit_tokens += cached_tokens

    def on_tokens(self, n: int, gaps_s: list[float], now: float | None = None) -> None:
        now = time.perf_counter() if now is None else now
        with self._lock:
            self.generation_tokens += n
            for g in gaps_s:
                self.itl.observe(g)
            self._recent.append((now, n))

    def on_finish(self, reason: str, m: RequestMetrics) -> None:
        with self._lock:
            self.requests[reason] += 1
            if reason not in ("error", "cancelled"):
                self.ttft.observe(m.ttft_s)
                self.e2e.observe(m.e2e_s)
                self.queue_time.observe(m.queue_s)

    def tokens_per_s(self, now: float | None = None) -> float:
        """Generated tokens per second over the last `window_s` seconds."""
        now = time.perf_counter() if now is None else now
        with self._lock:
            while self._recent and self._recent[0][0] < now - self.window_s:
                self._recent.popleft()
            return sum(n for _, n in self._recent) / self.window_s

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"requests": dict(self.requests), "prompt_tokens": self.prompt_tokens,
                    "generation_tokens": self.generation_tokens,
                    "prefill_tokens": self.prefill_tokens,
                    "prefix_cache_queries": self.prefix_queries,
                    "prefix_cache_hits": self.prefix_hits,
                    "prefix_cache_hit_tokens": self.prefix_hit_tokens,
                    "ttft_mean_s": self.ttft.sum / max(self.ttft.count, 1),
                    "itl_mean_s": self.itl.sum / max(self.itl.count, 1)}

    def render(self, gauges: dict[str, tuple[float, str]]) -> str:
        """Prometheus text: counters and histograms here, `gauges` {name: (value, help)}."""
        p = PREFIX
        lines: list[str] = []

        def metric(name: str, kind: str, help_: str, body: list[str]) -> None:
            lines.extend([f"# HELP {p}_{name} {help_}", f"# TYPE {p}_{name} {kind}", *body])

        def counter(name: str, help_: str, value: float) -> None:
            metric(f"{name}_total", "counter", help_, [f"{p}_{name}_total {_fmt(value)}"])

        tps = self.tokens_per_s()
        with self._lock:
            metric("requests_total", "counter", "Finished requests by finish reason.",
                   [f'{p}_requests_total{{finish_reason="{r}"}} {n}'
                    for r, n in sorted(self.requests.items())] or [f"{p}_requests_total 0"])
            counter("prompt_tokens", "Prompt tokens of admitted requests.", self.prompt_tokens)
            counter("generation_tokens", "Generated tokens.", self.generation_tokens)
            counter("prefill_tokens", "Prompt tokens computed by prefill (cache misses).",
                    self.prefill_tokens)
            counter("prefix_cache_queries", "Requests looked up in the prefix cache.",
                    self.prefix_queries)
            counter("prefix_cache_hits", "Requests that reused cached prefix blocks.",
                    self.prefix_hits)
            counter("prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache.",
                    self.prefix_hit_tokens)
            for name, h, help_ in (
                    ("time_to_first_token_seconds", self.ttft, "Arrival to first token."),
                    ("inter_token_latency_seconds", self.itl, "Gap between streamed tokens."),
                    ("request_latency_seconds", self.e2e, "Arrival to last token."),
                    ("queue_time_seconds", self.queue_time, "Arrival to prefill start.")):
                metric(name, "histogram", help_, h.lines(f"{p}_{name}"))
        metric("generation_tokens_per_second", "gauge",
               f"Generated tokens per second over the last {self.window_s:g} s.",
               [f"{p}_generation_tokens_per_second {_fmt(tps)}"])
        for name, (value, help_) in gauges.items():
            metric(name, "gauge", help_, [f"{p}_{name} {_fmt(value)}"])
        return "\n".join(lines) + "\n"
