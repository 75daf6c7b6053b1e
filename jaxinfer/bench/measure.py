"""jaxinfer's own timings: warm TTFT, streaming inter-token latency, decode and batch
throughput, compilations, memory, and model-bandwidth utilization (MBU).

MBU = (bytes a decode step must read) / (step time) / (measured copy bandwidth), where the
bytes are every weight the step touches plus the K/V of the positions actually attended
(the useful work: a kernel reading a padded cache bucket does more than this).
"""

from __future__ import annotations

import resource
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.runtime import CompileCounter
from jaxinfer.sampling import GREEDY, SamplingParams

_PROMPT_TEXT = ("The history of computing is a story of ideas that took decades to become "
                "practical, of machines that filled rooms and then fit in a pocket, and of "
                "people who kept asking what else a computer could do. ")


class CompileStats(CompileCounter):
    """CompileCounter that also sums the seconds spent in XLA backend compiles and counts
    how many of those were served from the persistent compilation cache (cache_hits)."""

    def __init__(self):
        self.seconds, self.cache_hits = 0.0, 0
        super().__init__()
        jax.monitoring.register_event_listener(self._on_event)

    def _on_event(self, event: str, **kw) -> None:
        if self._active and event == "/jax/compilation_cache/cache_hits":
            self.cache_hits += 1

    def _on_duration(self, event: str, duration: float, **kw) -> None:
        if self._active and event == "/jax/core/compile/backend_compile_duration":
            self.count += 1
            self.seconds += duration

    def __enter__(self) -> CompileStats:
        self.seconds, self.cache_hits = 0.0, 0
        super().__enter__()
        return self


def prompt_ids(llm, n: int) -> list[int]:
    """A deterministic prompt of exactly n tokens (English text for a real tokenizer)."""
    from jaxinfer.bench.presets import IdTokenizer

    if isinstance(llm.tokenizer, IdTokenizer):
        return [int(i) for i in (np.arange(n) * 7919 + 11) % llm.cfg.vocab_size]
    ids = llm.tokenizer.encode(_PROMPT_TEXT)
    return (ids * (n // len(ids) + 1))[:n]


# Greedy, decoding exactly max_new_tokens whatever EOS comes (the peers are run so too).
FIXED_LENGTH = SamplingParams(temperature=0.0, ignore_eos=True)


def summary(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def time_stream(llm, ids: list[int], n: int) -> dict[str, Any]:
    """One streamed completion: TTFT, decode rate and the gaps between yielded deltas."""
    res, times = [], []
    for _ in llm.stream(ids, sampling=FIXED_LENGTH, max_new_tokens=n, result=res):
        times.append(time.perf_counter())
    c = res[0]
    gaps = np.diff(times) * 1e3
    return {"ttft_s": c.ttft_s, "decode_tps": c.decode_tokens_per_s,
            "itl_ms": gaps.tolist(), "tokens": len(c.token_ids), "deltas": len(times)}


def time_generate(llm, ids: list[int], n: int, batch: int) -> dict[str, Any]:
    """One batch through the jitted while loop (LLM.generate): prefill + n tokens per row."""
    t0 = time.perf_counter()
    outs = llm.generate([ids] * batch, sampling=FIXED_LENGTH, max_new_tokens=n)
    total = time.perf_counter() - t0
    tokens = sum(len(o.token_ids) for o in outs)
    return {"ttft_s": outs[0].ttft_s, "total_s": total, "tokens": tokens,
            "throughput_tps": tokens / total,
            "decode_tps": batch * outs[0].decode_tokens_per_s}


def time_engine(llm, ids: list[int], n: int, batch: int, repeats: int) -> dict[str, Any]:
    """The serving engine (host-stepped continuous batching) with `batch` slots, all busy."""

    from jaxinfer.engine import Engine, EngineConfig
    from jaxinfer.generate import bucket

    S = bucket(len(ids) + n, 256, llm.cfg.max_seq_len)
    econf = EngineConfig(num_slots=batch, max_len=S, prefix_block=0,
                         min_prompt_bucket=bucket(len(ids), 1, S))
    with Engine.from_llm(llm, econf) as engine:
        rates = []
        for r in range(repeats + 1):  # the first run compiles
            t0 = time.perf_counter()
            outs = engine.generate([ids] * batch, sampling=FIXED_LENGTH, max_tokens=n)
            dt = time.perf_counter() - t0
            if r:
                rates.append(sum(len(o.token_ids) for o in outs) / dt)
    return {"batch": batch, "throughput_tps": summary(rates)}


def engine_stall(llm, chunked: bool, long_len: int, budget: int, rows: int = 2,
                 n: int = 96) -> dict[str, Any]:
    """What a long prompt arriving does to requests already decoding: `rows` greedy
    streams run while two prompts of `long_len` tokens arrive, with the engine prefilling
    `budget` prompt tokens per turn, chunked or whole. Reports the streams' inter-token
    gaps while the long prompts were being prefilled (the stall) and the long ones' TTFT."""
    import threading

    from jaxinfer.engine import Engine, EngineConfig
    from jaxinfer.generate import bucket

    cfg = llm.cfg
    S = bucket(long_len + 16, 256, cfg.max_seq_len)
    econf = EngineConfig(num_slots=rows + 2, max_len=S, prefix_block=0, max_queue=8,
                         prefill_token_budget=budget, chunked_prefill=chunked)
    rng = np.random.default_rng(0)
    longs = [rng.integers(100, cfg.vocab_size, long_len).tolist() for _ in range(2)]
    with Engine.from_llm(llm, econf) as engine:
        engine.warmup()
        stamps: list[list[float]] = [[] for _ in range(rows)]

        def read(i, req):
            for _ in req:
                stamps[i].append(time.perf_counter())

        streams = [engine.submit([1 + i] * 8, sampling=FIXED_LENGTH, max_tokens=n)
                   for i in range(rows)]
        readers = [threading.Thread(target=read, args=(i, r)) for i, r in enumerate(streams)]
        for t in readers:
            t.start()
        while min(len(s) for s in stamps) < 8:  # the streams are decoding
            time.sleep(0.01)
        t0 = time.perf_counter()
        reqs = [engine.submit(ids, sampling=FIXED_LENGTH, max_tokens=4) for ids in longs]
        res = [r.result() for r in reqs]
        t1 = time.perf_counter()
        for t in readers:
            t.join()
    gaps = [b - a for s in stamps for a, b in zip(s, s[1:], strict=False) if t0 <= b <= t1]
    return {"chunked": chunked, "long_len": long_len, "budget": budget, "rows": rows,
            "stall_max_ms": 1e3 * max(gaps), "stall_p50_ms": 1e3 * statistics.median(gaps),
            "tokens_during_prefill": len(gaps),
            "long_ttft_s": [r.metrics.ttft_s for r in res]}


def engine_structured(llm, n: int = 64, repeats: int = 3) -> dict[str, Any]:
    """Decode speed of one engine request, unconstrained vs under a JSON schema (a free
    string field, so the constrained run decodes as long): the cost of the per-step mask
    and of reading each step's token before dispatching the next."""
    from jaxinfer.engine import Engine, EngineConfig
    from jaxinfer.structured import Constraint

    schema = {"type": "object", "properties": {"story": {"type": "string"}},
              "required": ["story"], "additionalProperties": False}
    msgs = [{"role": "user", "content": "Tell me a long story about a lighthouse keeper, "
                                        "as JSON with the key story."}]
    econf = EngineConfig(num_slots=1, max_len=512, prefix_block=0)
    out: dict[str, Any] = {"max_tokens": n}
    with Engine.from_llm(llm, econf) as engine:
        engine.warmup()
        for name, c in [("free", None), ("json_schema", Constraint(json_schema=schema))] * (
                repeats + 1):
            r = engine.submit(messages=msgs, sampling=GREEDY, max_tokens=n,
                              constraint=c).result()
            out.setdefault(name, []).append({"tokens": len(r.token_ids),
                                             "decode_tps": r.metrics.decode_tokens_per_s})
    for name in ("free", "json_schema"):
        runs = out[name][1:]  # the first of each compiles
        out[name] = {"tokens": runs[0]["tokens"],
                     "decode_tps": statistics.median(x["decode_tps"] for x in runs)}
    return out


_EXTRACT = ("Extract the scientist from this text as JSON.\n\nText: Marie Sklodowska-Curie, "
            "born in Warsaw in 1867, was the first person to win Nobel Prizes in two "
            "sciences, physics and chemistry. She once said: \"Nothing in life is to be "
            "feared, it is only to be understood.\"")
_EXTRACT_SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "birthplace": {"type": "string"},
    "born": {"type": "integer"}, "quote": {"type": "string"}},
    "required": ["name", "birthplace", "born", "quote"], "additionalProperties": False}


def engine_structured_draft(llm, n: int = 96, repeats: int = 3, k: int = 4
                            ) -> dict[str, Any]:
    """Structured extraction (a JSON schema whose values copy spans of the prompt) in the
    engine, without a draft vs with prompt lookup: decode speed, the draft's acceptance,
    and whether the tokens are the same (greedy). The two engines alternate requests, so
    load drift on a shared machine hits both."""
    from jaxinfer.engine import Engine, EngineConfig
    from jaxinfer.structured import Constraint

    msgs = [{"role": "user", "content": _EXTRACT}]
    c = Constraint(json_schema=_EXTRACT_SCHEMA)
    econf = EngineConfig(num_slots=1, max_len=512, prefix_block=0)
    engines = {"no_draft": Engine.from_llm(llm, econf),
               "ngram": Engine.from_llm(llm, econf, draft="ngram", num_speculative_tokens=k)}
    runs: dict[str, list] = {name: [] for name in engines}
    try:
        for eng in engines.values():
            eng.warmup()
        for _ in range(repeats + 1):  # the first of each compiles
            for name, eng in engines.items():
                runs[name].append(eng.submit(messages=msgs, sampling=GREEDY, max_tokens=n,
                                             constraint=c).result())
        rate = engines["ngram"].gauges()["speculative_acceptance_rate"][0]
    finally:
        for eng in engines.values():
            eng.close()
    out: dict[str, Any] = {"max_tokens": n, "num_speculative_tokens": k,
                           "text": runs["no_draft"][-1].text}
    for name, rs in runs.items():
        out[name] = {"tokens": len(rs[-1].token_ids), "finish_reason": rs[-1].finish_reason,
                     "decode_tps": statistics.median(r.metrics.decode_tokens_per_s
                                                     for r in rs[1:])}
    out["ngram"]["acceptance_rate"] = rate
    out["same_tokens"] = runs["ngram"][-1].token_ids == runs["no_draft"][-1].token_ids
    return out


def _best_time(f, *args, repeats: int) -> float:
    jax.block_until_ready(f(*args))
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def copy_bandwidth(nbytes: int, repeats: int = 10) -> float:
    """The machine's achievable memory bandwidth (bytes/s), best of two jitted probes over
    `nbytes`: an elementwise pass (bytes read + written; what GPU copy figures count) and
    a matrix-vector product (bytes read; XLA:CPU runs elementwise ops on one thread but
    dots on all cores, so on CPU only the dot sees the whole memory system)."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    copy = 2 * x.nbytes / _best_time(jax.jit(lambda a: a + 1.0), x, repeats=repeats)
    del x
    a = jnp.ones((max(nbytes // 4 // 4096, 1), 4096), jnp.float32)
    v = jnp.ones((4096,), jnp.float32)
    matvec = a.nbytes / _best_time(jax.jit(jnp.dot), a, v, repeats=repeats)
    return max(copy, matvec)


def tree_bytes(tree) -> int:
    """Bytes of every array in a tree, counting int4 as half a byte (QArray-aware)."""
    return sum(a.size * jnp.iinfo(a.dtype).bits // 8 if jnp.issubdtype(a.dtype, jnp.integer)
               else a.nbytes for a in jax.tree.leaves(tree))


def step_bytes(llm, batch: int, context: float) -> dict[str, float]:
    """Bytes one decode step must read: weights (the embedding table only if it is also
    the output head; of a mixture of experts, at most the B * C chosen experts) plus K and
    V of `context` positions per row, every layer."""
    cfg = llm.cfg
    weights = tree_bytes(llm.params)
    if not cfg.tie_embeddings:
        weights -= tree_bytes(llm.params["embed"])  # only B rows of it are gathered
    if cfg.num_experts:
        experts = tree_bytes({k: v for k, v in llm.params["layers"].items()
                              if k.startswith("moe_")})
        used = min(batch * cfg.experts_per_token, cfg.num_experts) / cfg.num_experts
        weights -= experts * (1 - used)
    itemsize = jnp.dtype(getattr(llm, "kv_dtype", llm.dtype)).itemsize
    kv = 2 * cfg.num_layers * batch * cfg.num_kv_heads * context * cfg.head_dim * itemsize
    return {"weights": float(weights), "kv": float(kv)}


def mbu(llm, batch: int, decode_tps: float, context: float, bandwidth: float) -> float:
    b = step_bytes(llm, batch, context)
    step_s = batch / decode_tps
    return (b["weights"] + b["kv"]) / step_s / bandwidth


def peak_rss_bytes() -> int:
    """This process's peak resident set. VmHWM, not getrusage: Linux carries ru_maxrss
    over execve, so a child spawned by a big parent would report the parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory() -> dict[str, Any]:
    """Peak host RSS of this process and, where the backend reports it, device peak."""
    stats = jax.devices()[0].memory_stats() or {}
    return {"host_peak_rss_bytes": peak_rss_bytes(),
            "device_peak_bytes": stats.get("peak_bytes_in_use"),
            "live_array_bytes": sum(a.nbytes for a in jax.live_arrays())}
