"""The serving engine: continuous batching over a fixed number of decode slots.

    engine = Engine.from_llm(llm, EngineConfig(num_slots=8, max_len=1024))
    engine.warmup()                                   # compile every prompt bucket now
    req = engine.submit("Hello", sampling=GREEDY, max_tokens=32, stop=["\\n\\n"])
    for delta in req: print(delta, end="")            # or: async for delta in req
    print(req.result().metrics)

Design. The device work is the pure functions of engine_core (prefill -> insert ->
generate_step, the decode state donated). This module is the host scheduler around them: a
background thread owns the device loop, callers hand it requests through a bounded queue
and read text deltas back through per-request buffers (thread-safe, with asyncio wake-ups).
Each loop turn the thread (1) prefills queued requests into free slots, one request at a
time, under a prompt-token budget so decoding rows are not stalled for long (a longer
prompt is prefilled in chunks over several turns, its slot reserved); (2) dispatches
one decode step over every slot; (3) only then reads the previous step's tokens, so
detokenizing, stop-string checks and streaming overlap the device computing the next
token. A slot that finishes (EOS, length, stop string, cancel) is free for the next queued
request at the following turn. Under the priority policy the queue is ordered by
(priority, arrival) and a waiting request may preempt a running one of higher priority
value: the step in flight is settled first, so the preempted request holds all its tokens,
and on its return its prompt and output are prefilled again and its row state restored.

Shapes never depend on traffic: the decode batch is always `num_slots` rows of `max_len`
positions, and prompts are padded to power-of-two buckets, so after `warmup()` new prompt
lengths, sampling settings and slot assignments never recompile (`compile_count` says).
Each slot's sampling key is folded with that request's own token count, so a seeded
request gives the same tokens in any slot next to any neighbours. Prompt prefixes shared
between requests are served from the prefix cache (prefix_cache.py).

Multi-process runs: submits and cancels reach the device thread as events, taken at the
start of a loop turn. Process 0 publishes each turn's events and every other process
replays them (engine_sync.py), so all processes make the same device calls in the same
order; only process 0 takes requests.
"""

from __future__ import annotations

import atexit
import collections
import concurrent.futures
import dataclasses
import hashlib
import itertools
import logging
import secrets
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from jaxinfer import engine_core as core
from jaxinfer import engine_spec, memory
from jaxinfer import engine_sync as sync
from jaxinfer import generate as gen
from jaxinfer import speculative as spec
from jaxinfer.attention import default_impl
from jaxinfer.config import ModelConfig
from jaxinfer.errors import (
    BadRequestError,
    ConfigError,
    ConversionError,
    DistributedError,
    JaxinferError,
)
from jaxinfer.kv_cache import KVCache, cache_dtype, cache_shardings, init_cache
from jaxinfer.lora import LoraStack, index_of
from jaxinfer.metrics import EngineMetrics
from jaxinfer.output_text import TextOutput
from jaxinfer.prefix_cache import PrefixCache, block_digests
from jaxinfer.request import EngineResult, Request
from jaxinfer.runtime import CompileCounter, to_host
from jaxinfer.sampling import (
    GREEDY,
    Logprobs,
    SamplingArrays,
    SamplingParams,
    TokenLogprob,
    check_vocab,
    host_logprobs,
    recent_tokens,
    token_ids,
)
from jaxinfer.sharding import mesh_context
from jaxinfer.structured import Constraint, Grammars
from jaxinfer.tokenizer import Tokenizer

_LIVE: weakref.WeakSet[Engine] = weakref.WeakSet()
MAX_AUTO_SLOTS = 256  # num_slots=None takes at most this many
log = logging.getLogger(__name__)


@atexit.register
def _close_all() -> None:
    """Stop device threads before the interpreter tears JAX down under them."""
    for engine in list(_LIVE):
        engine.close()


class EngineOverloadedError(JaxinferError, RuntimeError):
    """The request queue is full; retry later (HTTP 429)."""


class EngineClosedError(JaxinferError, RuntimeError):
    """The engine was shut down, or its device loop failed, before the request finished."""


class NotLeaderError(JaxinferError, RuntimeError):
    """In a multi-process run only process 0 takes requests; the others follow it."""


class ContextLengthError(BadRequestError):
    """Prompt plus max_tokens does not fit in a slot (or the model's context)."""


SCHEDULING_POLICIES = ("fcfs", "priority")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    # B: rows decoded together. None: as many as fit in `memory_fraction` of the device
    # memory left after the weights (needs the backend's memory statistics: GPU, TPU).
    num_slots: int | None = 8
    max_len: int = 1024  # S: cache positions per slot; prompt + max_tokens must fit
    max_queue: int = 256  # waiting requests beyond this are refused (429)
    prefix_block: int = 16  # tokens per prefix-cache block; 0 disables prefix caching
    prefix_cache_mb: float = 256.0  # device memory for cached prefix blocks
    prefill_token_budget: int = 512  # prompt tokens prefilled per loop turn
    chunked_prefill: bool = True  # split longer prompts over turns (else >= 1 whole prompt)
    min_prompt_bucket: int = gen.MIN_PROMPT_BUCKET
    memory_fraction: float = 0.9  # with num_slots=None: share of free memory for slots
    # LoRA adapters loadable while serving (Engine.load_adapter): adapter slots in all (the
    # adapters given included) and the largest rank they may have. 0: no runtime loading.
    max_loras: int = 0
    max_lora_rank: int = 16
    # Which queued request gets the next free slot: "fcfs" (arrival order) or "priority"
    # (the lowest `priority` first, arrival order among equals; vLLM's policy of the same
    # name). With every slot taken, a request of lower priority than the worst running one
    # preempts it: that one goes back to the queue and later resumes where it was (its
    # prompt and output prefilled again), drawing the tokens it would have drawn anyway.
    scheduling_policy: str = "fcfs"

    def __post_init__(self) -> None:
        for name in ("num_slots", "max_len", "max_queue", "prefill_token_budget",
                     "min_prompt_bucket"):
            v = getattr(self, name)
            if name == "num_slots" and v is None:
                continue
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"engine {name} must be a positive integer, got {v!r}")
        f = self.memory_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1:
            raise ConfigError(f"engine memory_fraction must be in (0, 1], got {f!r}")
        for name, least in (("max_loras", 0), ("max_lora_rank", 1)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < least:
                raise ConfigError(f"engine {name} must be an integer >= {least}, got {v!r}")
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise ConfigError(f"engine scheduling_policy must be one of "
                              f"{list(SCHEDULING_POLICIES)}, got {self.scheduling_policy!r}")
        if self.prefix_block < 0 or self.prefix_cache_mb < 0:
            raise ConfigError("engine prefix_block and prefix_cache_mb must be >= 0, got "
                              f"{self.prefix_block} and {self.prefix_cache_mb}")
        if self.prefix_block and self.max_len % self.prefix_block:
            raise ConfigError(f"engine max_len={self.max_len} must be a multiple of "
                              f"prefix_block={self.prefix_block}")


def _logprob(lp: Logprobs, row: int, req: Request, tok: int) -> TokenLogprob:
    """Token `tok` of row `row` of a step's (host) log-probabilities, with the top
    alternatives cut to what `req` asked for."""
    return host_logprobs([tok], lp.token_B[row:row + 1], lp.top_ids_BN[row:row + 1],
                         lp.top_BN[row:row + 1], req.sampling.logprobs or 0)[0]


def _row_shardings(slots: KVCache) -> KVCache:
    """The slots' cache shardings with the batch axis replicated (a row is one request)."""
    P, N = jax.sharding.PartitionSpec, jax.sharding.NamedSharding
    kv = slots.k.spec
    row = N(slots.k.mesh, P(kv[0] if len(kv) else None, None, *kv[2:]))
    return KVCache(k=row, v=row, lengths=N(slots.k.mesh, P()))


class _Job(NamedTuple):
    """A callable to run on the device thread between turns (Engine.run_exclusive)."""

    fn: Callable[[], Any]
    future: concurrent.futures.Future


@dataclasses.dataclass
class _Prefilling:
    """A request whose prompt is being prefilled over several turns (chunked prefill)."""

    req: Request
    slot: int  # reserved for it: no other request takes it meanwhile
    row: KVCache  # [L, 1, K, S, H]: the prompt's K/V so far
    done: int  # prompt tokens in `row` (cached prefix included)
    cached: int  # of which came from the prefix cache
    hit: int  # prefix-cache blocks matched
    digests: list
    sampling: SamplingArrays  # the request's one row, built once for all its chunks
    prompt_mask_1V: np.ndarray  # bool[1, V] its prompt's tokens (repetition penalty)
    ids: list[int]  # the tokens to prefill: the prompt, and a preempted request's output


class _Speculation(NamedTuple):
    """The engine's draft: weights and config of a draft model (None, None for n-gram)."""

    weights: Any
    cfg: ModelConfig | None
    k: int  # num_speculative_tokens
    ngram_size: int


class Engine:
    """Fixed decode slots fed from a bounded queue by one background device thread."""

    def __init__(self, params, cfg: ModelConfig, tokenizer: Tokenizer,
                 config: EngineConfig | None = None, impl: str | None = None, kv_dtype=None,
                 mesh: jax.sharding.Mesh | None = None, draft: Any = None,
                 num_speculative_tokens: int = 4, ngram_size: int = 3,
                 lora: LoraStack | None = None, adapter_names: Sequence[str] = ()):
        """`params` may hold quantized weights (QArray); kv_dtype "int8" keeps the slots'
        and the prefix pool's K/V in int8 with per-token scales (default: compute dtype).
        With `mesh` (the one `params` are sharded over) the slots' cache is sharded like
        LLM.generate's, slots over `data` and KV heads over `model`.

        With `draft` (an LLM sharing the tokenizer, or "ngram" for prompt lookup) every
        step is a speculative round (engine_spec.py): the draft proposes
        `num_speculative_tokens` per slot, the target verifies them in one pass, and each
        slot emits 1..k+1 tokens; greedy output is the target's, sampling keeps its
        distribution. A slot then needs k + 1 spare cache positions.

        With `lora` (a lora.LoraStack; `adapter_names` names its adapters 1..A) each
        request may name an adapter (`submit(adapter=)`); every decode step serves all
        slots' adapters at once (with a draft too: it proposes, each slot's adapter
        verifies). `config.max_loras` > 0 leaves room in the stack for adapters loaded
        while serving (`load_adapter`, `unload_adapter`)."""
        self.cfg, self.params, self.tokenizer = cfg, params, tokenizer
        self.impl = impl or default_impl()
        self.config = config = config or EngineConfig()
        self.max_len = min(config.max_len, cfg.max_seq_len)  # S
        if config.prefix_block and self.max_len % config.prefix_block:
            raise ConfigError(f"slot length {self.max_len} (the model's context) must be a "
                              f"multiple of prefix_block={config.prefix_block}")
        self.dtype = params["embed"].dtype  # a QArray's dtype is its compute dtype
        self.kv_dtype = self.dtype if kv_dtype is None else cache_dtype(kv_dtype)
        eos = sorted(set(cfg.eos_token_ids) | set(getattr(tokenizer, "eos_ids", ())))
        self.eos_ids = frozenset(eos)
        device = next(iter(jax.tree.leaves(params["embed"])[0].devices()))  # QArray too
        self.mesh = mesh
        self._spec = self._speculative_settings(draft, num_speculative_tokens, ngram_size)
        self.adapters = lora
        # Adapter i + 1's name (None: a free slot) and prefix-cache salt (unique per load).
        self._names: list[str | None] = list(adapter_names)
        if lora is not None and lora.num_adapters != len(self._names) + 1:
            raise ConfigError(f"{len(self._names)} adapter names for a stack of "
                              f"{lora.num_adapters - 1} adapters")
        if config.max_loras:
            from jaxinfer.convert.lora import with_room

            self.adapters = with_room(lora, cfg, config.max_loras, config.max_lora_rank,
                                      self.dtype, core.placement(device, mesh))
            self._names += [None] * (self.adapters.num_adapters - 1 - len(self._names))
        self._salts = list(range(1, len(self._names) + 1))
        self._reserve = 0 if self._spec is None else num_speculative_tokens + 1
        self.spec_proposed = self.spec_accepted = 0  # draft tokens, all requests
        self._eos_E = eos_E = np.asarray(eos or [-1], np.int32)
        self.config = config = self._plan_memory(config, device, mesh)
        # Counts from here to close(); after the checks above, which may refuse the config.
        self._compiles = CompileCounter().__enter__()
        if self._spec is None:
            self._state = core.init_decode_state(cfg, config.num_slots, self.max_len,
                                                 self.kv_dtype, eos_E, device, mesh,
                                                 lora=self.adapters is not None)
        else:
            dw = self._spec.weights
            self._state = engine_spec.init_state(
                cfg, self._spec.cfg, config.num_slots, self.max_len, self.kv_dtype,
                None if dw is None else dw["embed"].dtype, eos_E, device, mesh,
                lora=self.adapters is not None)
        # A request's one-row cache: placed like the slots' (a batch of 1 is replicated).
        self._row_shardings = self._draft_row_shardings = None
        if mesh is not None:
            self._row_shardings = _row_shardings(
                cache_shardings(cfg, config.num_slots, self.max_len, mesh))
            if self._spec is not None and self._spec.cfg is not None:
                self._draft_row_shardings = _row_shardings(
                    cache_shardings(self._spec.cfg, config.num_slots, self.max_len, mesh))
        self._state = core.release(self._state, np.int32(0))  # compile it now, not mid-run
        self._fresh = core.Resume.of([], [], self.max_len)  # what `insert` gets for new rows
        # Structured output: bitmasks of the tokens each row may sample (all ones: any).
        self._grammars = Grammars(tokenizer, cfg.vocab_size, eos)
        self._ones_1W = self._grammars.all_allowed(1)
        self._mask_place = core.placement(device, mesh)
        self._ones_BW = core.put(self._grammars.all_allowed(config.num_slots),
                                 self._mask_place)
        self._prefix = None
        if config.prefix_block and config.prefix_cache_mb > 0:
            self._prefix = PrefixCache(cfg, self.max_len, config.prefix_block,
                                       int(config.prefix_cache_mb * 2**20), self.kv_dtype,
                                       core.placement(device, mesh))
        self.metrics = EngineMetrics()
        self._slots: list[Request | None] = [None] * config.num_slots
        self._queue: collections.deque[Request] = collections.deque()
        self._partial: _Prefilling | None = None  # a prompt part-way through its prefill
        self._admitting: Request | None = None  # out of the queue, not yet in a slot
        # Multi-process: process 0 publishes each turn's events, the others replay them.
        self._turns = sync.connect()
        self.is_leader = self._turns is None or self._turns.leader
        self._inbox: list[sync.Event] = []  # submits and cancels for the next turn
        self._submitted: dict[int, Request] = {}  # in the inbox, not yet queued
        self._live: dict[int, Request] = {}  # queued or in a slot
        self._digest = hashlib.sha256()  # over finished requests' tokens, in order
        self.requests_finished = 0
        self.preemptions = 0  # running requests sent back to the queue (priority policy)
        self._cv = threading.Condition()
        self._next_id = 0
        self._closing = False
        self._fatal: BaseException | None = None
        self._thread = threading.Thread(target=self._serve, name="jaxinfer-engine", daemon=True)
        self._thread.start()
        _LIVE.add(self)

    @classmethod
    def from_llm(cls, llm, config: EngineConfig | None = None, draft: Any = None,
                 num_speculative_tokens: int = 4, ngram_size: int = 3) -> Engine:
        """An engine over a loaded LLM (its weights, mesh, KV dtype); `draft` as in
        __init__ (an LLM or "ngram"), or a draft checkpoint directory to load."""
        return cls(llm.params, llm.cfg, llm.tokenizer, config, llm.impl, llm.kv_dtype,
                   llm.mesh, llm.load_draft(draft), num_speculative_tokens, ngram_size,
                   llm.adapters, llm.adapter_names)

    def _plan_memory(self, config: EngineConfig, device: jax.Device, mesh) -> EngineConfig:
        """Check that the slots' cache and the prefix pool fit the memory the devices have
        left after the weights (a clear ConfigError, not an allocator failure mid-start),
        or with num_slots=None take as many slots as fit in memory_fraction of it. A
        backend without memory statistics (CPU) skips the check."""
        devices = ([d for d in mesh.devices.flat if d.process_index == jax.process_index()]
                   if mesh is not None else [device])  # this process's: it can query them
        free = memory.free_bytes(devices)
        S, dcfg = self.max_len, None if self._spec is None else self._spec.cfg
        ddtype = None if dcfg is None else self._spec.weights["embed"].dtype

        def need(B: int) -> int:  # per device
            n = core.slots_bytes(self.cfg, B, S, self.kv_dtype, mesh)
            return n + (0 if dcfg is None else core.slots_bytes(dcfg, B, S, ddtype, mesh))

        pool = int(config.prefix_cache_mb * 2**20) if config.prefix_block else 0

        def most(budget: float) -> int:  # the most slots whose cache fits in `budget`
            lo, hi = 0, MAX_AUTO_SLOTS
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if need(mid) <= budget else (lo, mid - 1)
            return lo

        where, fmt = f"{devices[0].platform}:{devices[0].id}", memory.format_bytes
        if config.num_slots is None:
            if jax.process_count() > 1:  # each host would size its own: they must agree
                raise ConfigError("num_slots=None (as many slots as fit) is for one "
                                  "process; a multi-process run needs the same num_slots "
                                  "on every process")
            if free is None:
                raise ConfigError(f"num_slots=None (as many slots as fit) needs the device's "
                                  f"memory statistics, which the {devices[0].platform} "
                                  "backend does not keep; give num_slots")
            B = most(config.memory_fraction * free - pool)
            if B < 1:
                raise ConfigError(
                    f"not one slot of max_len={S} fits in memory_fraction="
                    f"{config.memory_fraction} of the {fmt(free)} free on {where} (a slot "
                    f"needs {fmt(need(1))}, the prefix pool {fmt(pool)}); lower max_len or "
                    "prefix_cache_mb")
            log.info("num_slots=%d: %s of KV cache per device, %s free on %s", B,
                     fmt(need(B)), fmt(free), where)
            return dataclasses.replace(config, num_slots=B)
        if free is not None and need(config.num_slots) + pool > free:
            raise ConfigError(
                f"num_slots={config.num_slots} x max_len={S} needs "
                f"{fmt(need(config.num_slots))} of KV cache per device plus a {fmt(pool)} "
                f"prefix pool, but {fmt(free)} is free on {where}: at most "
                f"{most(free - pool)} slots fit (or lower max_len or prefix_cache_mb, or use "
                "an int8 or fp8 KV cache)")
        return config

    def _speculative_settings(self, draft: Any, k: int, ngram_size: int) -> _Speculation | None:
        """The checked draft settings, or None without a draft."""
        if draft is None:
            return None
        if isinstance(draft, str) and draft != "ngram":
            raise ConfigError(f"draft must be an LLM or 'ngram', got {draft!r}")
        dw, dcfg = (None, None) if isinstance(draft, str) else (draft.params, draft.cfg)
        try:
            spec.check_settings(k, ngram_size, self.cfg, dcfg)
        except BadRequestError as e:
            raise ConfigError(str(e)) from None
        if k + 2 >= self.max_len:
            raise ConfigError(f"num_speculative_tokens={k} leaves no room in slots of "
                              f"{self.max_len} positions")
        return _Speculation(dw, dcfg, k, ngram_size)

    # ---- public API ---------------------------------------------------------------------
    @property
    def compile_count(self) -> int:
        """XLA compilations in this process since the engine was built."""
        return self._compiles.count

    @property
    def healthy(self) -> bool:
        return self._fatal is None and not self._closing and self._thread.is_alive()

    @property
    def queue_length(self) -> int:
        return len(self._queue) + len(self._submitted)

    @property
    def token_digest(self) -> str:
        """SHA-256 over every finished request's id and token ids, in finishing order:
        equal on every process of a multi-process run (they decode the same tokens)."""
        return self._digest.hexdigest()

    @property
    def slots_in_use(self) -> int:
        """Slots decoding a request or reserved for one whose prompt is being prefilled."""
        return self._decoding + (self._partial is not None)

    @property
    def _decoding(self) -> int:
        return sum(r is not None for r in self._slots)

    @property
    def prefilled_tokens(self) -> int:
        return self.metrics.prefill_tokens

    def prompt_buckets(self) -> list[int]:
        """Every padded prompt length the prefill can be called with."""
        out, t = [], self.config.min_prompt_bucket
        while True:
            out.append(min(t, self.max_len))
            if t >= self.max_len:
                return out
            t *= 2

    def encode(self, prompt: str | Sequence[int] | None = None,
               messages: list[dict[str, Any]] | None = None,
               chat_options: dict[str, Any] | None = None) -> list[int]:
        """Token ids of a text prompt, of token ids, or of chat messages (chat template;
        `chat_options`: Tokenizer.apply_chat_template's add_generation_prompt,
        continue_final_message, chat_template_kwargs and tools)."""
        if messages is not None:
            defaults = {"add_generation_prompt": True, "continue_final_message": False,
                        "chat_template_kwargs": None, "tools": None}
            opts = dict(chat_options or {})
            unknown = sorted(set(opts) - set(defaults))
            if unknown:
                raise BadRequestError(f"unknown chat options {unknown}", "messages")
            # Only what differs from the defaults: a minimal tokenizer takes just messages.
            opts = {k: v for k, v in opts.items() if v != defaults[k]}
            return self.tokenizer.encode(self.tokenizer.apply_chat_template(messages, **opts))
        if isinstance(prompt, str):
            if not prompt:
                raise BadRequestError("prompt is empty", "prompt")
            return self.tokenizer.encode(prompt)
        if prompt is None:
            raise BadRequestError("need a prompt or messages", "prompt")
        return token_ids(prompt, self.cfg.vocab_size)

    def submit(self, prompt: str | Sequence[int] | None = None, *,
               messages: list[dict[str, Any]] | None = None,
               chat_options: dict[str, Any] | None = None,
               sampling: SamplingParams | None = None, max_tokens: int | None = None,
               stop: str | Sequence[str] = (), on_finish: Callable[[Request], None] | None
               = None, block: bool = False, constraint: Constraint | None = None,
               adapter: str | None = None, priority: int = 0,
               _warmup: bool = False) -> Request:
        """Queue a request. `max_tokens` None fills the slot. Raises BadRequestError
        (ContextLengthError) for bad input and EngineOverloadedError when the queue is
        full, unless `block` waits for room. `on_finish` runs on the engine thread. With
        `constraint` (structured.py) the output matches a JSON schema, regex, choice or
        grammar. `adapter` names a LoRA adapter the engine was built with (None: the base
        model). `priority` (lower first; EngineConfig.scheduling_policy "priority" only)
        orders the queue. In a multi-process run only process 0 submits (NotLeaderError
        elsewhere)."""
        if not self.is_leader:
            raise NotLeaderError(f"process {jax.process_index()} follows process 0's engine; "
                                 "submit requests on process 0")
        self._check_priority(priority)
        ids = self.encode(prompt, messages, chat_options)
        if sampling is not None:
            ids = sampling.truncate(ids)
        n = len(ids)
        if n == 0:
            raise BadRequestError("prompt is empty (0 tokens)",
                                  "messages" if messages is not None else "prompt")
        if max_tokens is None:
            max_tokens = max(self.max_len - self._reserve - n, 1)
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, (int, np.integer)):
            raise BadRequestError(f"max_tokens must be an integer, got {max_tokens!r}",
                                  "max_tokens")
        if max_tokens < 1:
            raise BadRequestError(f"max_tokens must be >= 1, got {max_tokens}", "max_tokens")
        if n + max_tokens > self.max_len - self._reserve:
            raise ContextLengthError(
                f"this engine's maximum context length is {self.max_len - self._reserve} "
                "tokens, but "
                f"{n + max_tokens} were requested ({n} in the prompt, {max_tokens} for the "
                "completion)")
        sampling = (sampling or SamplingParams()).resolve_bad_words(self.tokenizer)
        if sampling.n > 1:
            raise BadRequestError(f"n={sampling.n}: a request is one sequence; submit n "
                                  "requests with SamplingParams.choice(j), or call "
                                  "Engine.generate", "n")
        stop = sampling.stops(stop)
        check_vocab([sampling], self.cfg.vocab_size)
        sampling.check_lengths(max_tokens)
        matcher = None
        if constraint is not None:
            if not isinstance(constraint, Constraint):
                raise BadRequestError(f"constraint must be a Constraint, got {constraint!r}",
                                      "constraint")
            matcher = self._grammars.matcher(constraint)
        if self._turns is not None and sampling.seed is None:  # every process draws alike
            sampling = dataclasses.replace(sampling, seed=secrets.randbits(64))
        with self._cv:
            self._check_open()
            while self.queue_length >= self.config.max_queue:
                if not block:
                    raise EngineOverloadedError(
                        f"the request queue is full ({self.config.max_queue} waiting)")
                self._cv.wait()
                self._check_open()
            adapter_id = self.adapter_index(adapter)  # under the lock: no load or unload
            req = Request(self._next_id, ids, sampling, int(max_tokens),  # before the inbox
                          tuple(s for s in stop if s), self._cancel, on_finish, _warmup)
            req.constraint, req.matcher, req.adapter = constraint, matcher, adapter_id
            req.priority = int(priority)
            self._next_id += 1
            self._submitted[req.id] = req
            self._inbox.append(sync.Submit(req.id, ids, sampling, req.max_tokens, req.stop,
                                           _warmup, None if constraint is None
                                           else constraint.to_json(), adapter_id,
                                           req.priority))
            self._cv.notify_all()
        return req

    def _check_priority(self, priority: Any) -> None:
        if isinstance(priority, bool) or not isinstance(priority, (int, np.integer)):
            raise BadRequestError(f"priority must be an integer, got {priority!r}", "priority")
        if priority and self.config.scheduling_policy != "priority":
            raise BadRequestError(f"priority={priority} needs the priority scheduling policy "
                                  "(--scheduling_policy=priority)", "priority")

    def _enqueue(self, req: Request) -> None:
        """Queue order: arrival (ids grow), or (priority, arrival) under that policy."""
        if self.config.scheduling_policy == "fcfs" or not self._queue:
            self._queue.append(req)
            return
        key = (req.priority, req.id)
        at = next((i for i, q in enumerate(self._queue) if (q.priority, q.id) > key),
                  len(self._queue))
        self._queue.insert(at, req)

    @property
    def adapter_names(self) -> list[str]:
        """The LoRA adapters requests may name now."""
        return [n for n in self._names if n is not None]

    @property
    def adapter_slots(self) -> list[str | None]:
        """The name of stack adapter i + 1 (None: a free slot), as LLM.adapter_names."""
        return list(self._names)

    def adapter_index(self, adapter: str | None) -> int:
        """The stack index of LoRA adapter `adapter` (0 for None); BadRequestError if the
        engine has no such adapter."""
        return index_of(self._names, adapter)

    def load_adapter(self, name: str, path: str | Path) -> None:
        """Load a PEFT LoRA adapter while serving (vLLM's /v1/load_lora_adapter) into a
        free slot of the stack `config.max_loras` made room for: the stack keeps its
        shape, so nothing recompiles. Read on the calling thread, installed between two
        turns. BadRequestError for a taken name, a full stack or an adapter that does not
        fit it (ConversionError for a bad directory); ConfigError without room."""
        from jaxinfer.convert.lora import put_adapter, read_lora

        if not self.config.max_loras:
            raise ConfigError("this engine has no room for adapters loaded while serving "
                              "(EngineConfig.max_loras, serve.py --max_loras)")
        if self._turns is not None:
            raise ConfigError("adapters are loaded while serving in single-process runs only "
                              "(every process would have to load it at the same turn)")
        if not isinstance(name, str) or not name:
            raise BadRequestError(f"lora_name must be a non-empty string, got {name!r}",
                                  "lora_name")
        factors = read_lora(path, self.cfg)

        def install() -> None:
            with self._cv:
                if name in self._names:
                    raise BadRequestError(f"LoRA adapter {name!r} is already loaded",
                                          "lora_name")
                busy = {r.adapter for r in [*self._live.values(),
                                            *self._submitted.values()]}
                free = [i for i, n in enumerate(self._names, 1) if n is None and i not in busy]
                if not free:
                    raise BadRequestError(f"all {len(self._names)} LoRA adapter slots are in "
                                          "use (max_loras; unload one first)", "lora_name")
                try:
                    self.adapters = put_adapter(self.adapters, free[0], factors, str(path))
                except ConversionError as e:
                    raise BadRequestError(str(e), "lora_path") from e
                self._names[free[0] - 1] = name
                self._salts[free[0] - 1] = max(self._salts) + 1  # a new prefix-cache key

        self.run_exclusive(install).result()

    def unload_adapter(self, name: str) -> None:
        """Unload an adapter (vLLM's /v1/unload_lora_adapter): new requests may not name it;
        those already queued or decoding finish with it, and only then is its slot reused.
        BadRequestError if no such adapter is loaded."""
        with self._cv:
            if not isinstance(name, str) or name not in self._names:
                raise BadRequestError(f"no LoRA adapter {name!r} is loaded (loaded: "
                                      f"{self.adapter_names or 'none'})", "lora_name")
            self._names[self._names.index(name)] = None

    def generate(self, prompts: Sequence[str | Sequence[int]], **kw: Any
                 ) -> list[EngineResult | list[EngineResult]]:
        """Submit a batch (waiting for queue room) and return results in order; with
        `sampling=SamplingParams(n=k)` each prompt's k results (choice j seeded seed + j)
        as a list in its place."""
        sp = kw.pop("sampling", None) or SamplingParams()
        reqs = [[self.submit(p, block=True, sampling=sp.choice(j), **kw) for j in range(sp.n)]
                for p in prompts]
        return [[r.result() for r in rs] if sp.n > 1 else rs[0].result() for rs in reqs]

    def warmup(self) -> int:
        """Compile every prompt bucket (and the decode step) now, and build structured
        output's view of the vocabulary (0.3 s for 49k tokens, else paid by the first
        constrained request); returns compilations. In a multi-process run process 0's
        warm-up drives every process (0 elsewhere)."""
        try:
            self._grammars.prepare()
            structured = True
        except BadRequestError:  # no EOS token: a constrained request will say so
            structured = False
        if not self.is_leader:
            return 0
        before = self.compile_count
        rng = np.random.default_rng(0)
        longest = self.max_len - 2 - self._reserve
        reqs = [self.submit(rng.integers(0, self.cfg.vocab_size, min(t, longest))
                            .tolist(), sampling=GREEDY, max_tokens=2, block=True, _warmup=True)
                for t in self.prompt_buckets()]
        if structured and self._spec is not None:  # the split round constrained slots use
            reqs.append(self.submit([self.cfg.pad_token_id] * 4, sampling=GREEDY, max_tokens=2,
                                    constraint=Constraint(regex="[0-9]{16}"), block=True,
                                    _warmup=True))
        for r in reqs:
            r.result()
        return self.compile_count - before

    def close(self) -> None:
        """Stop the device thread; unfinished requests end with EngineClosedError."""
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join()
        self._compiles.__exit__(None, None, None)

    def join(self) -> None:
        """Wait until the device loop ends: on a follower process of a multi-process run,
        until process 0 closes its engine. Raises EngineClosedError if the loop failed."""
        self._thread.join()
        if self._fatal is not None:
            raise EngineClosedError(f"the engine's device loop failed: {self._fatal}")

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def gauges(self) -> dict[str, tuple[float, str]]:
        g = {"queue_length": (self.queue_length, "Requests waiting for a slot."),
             "slots_in_use": (self.slots_in_use, "Decode slots holding a request."),
             "slots": (self.config.num_slots, "Decode slots."),
             "compilations": (self.compile_count, "XLA compilations since engine start."),
             "healthy": (int(self.healthy), "1 while the device loop runs."),
             "preemptions": (self.preemptions, "Running requests sent back to the queue "
                             "for one of higher priority.")}
        if self._spec is not None:
            g["speculative_acceptance_rate"] = (
                self.spec_accepted / max(self.spec_proposed, 1),
                "Draft tokens accepted / proposed, all requests so far.")
        if self._prefix is not None:
            g["prefix_cache_blocks_used"] = (self._prefix.blocks_used, "Cached prefix blocks.")
            g["prefix_cache_blocks"] = (self._prefix.capacity, "Prefix-cache capacity.")
        if self.adapters is not None:
            g["lora_adapters_loaded"] = (len(self.adapter_names), "LoRA adapters requests "
                                         "may name.")
            g["lora_adapter_slots"] = (len(self._names), "LoRA adapter slots in the stack.")
        return g

    def prometheus(self) -> str:
        return self.metrics.render(self.gauges())

    # ---- engine thread --------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closing or self._fatal is not None:
            raise EngineClosedError("the engine is shut down" if self._fatal is None else
                                    f"the engine's device loop failed: {self._fatal!r}")

    def _cancel(self, req: Request) -> None:
        """A request no turn has seen yet, or (one process) a queued one, leaves at once;
        otherwise the cancel is an event for the next turn, like a submit, so every
        process of a multi-process run applies it at the same turn."""
        with self._cv:
            now = False
            if self._submitted.pop(req.id, None) is not None:
                self._inbox = [e for e in self._inbox
                               if not (isinstance(e, sync.Submit) and e.id == req.id)]
                now = True
            elif self._turns is None and req in self._queue:
                self._queue.remove(req)
                now = True
            else:
                self._inbox.append(sync.Cancel(req.id))
            self._cv.notify_all()
        if now:
            self._complete(req, "cancelled")

    def run_exclusive(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run `fn()` on the device thread between two turns (the slots wait meanwhile) and
        return its Future: a whole-device job, such as a beam search, that must not race the
        engine's own steps. A single-process engine only (followers replay turn events,
        which cannot carry a callable)."""
        if self._turns is not None:
            raise BadRequestError("whole-device jobs (beam search, embeddings) are not "
                                  "available in multi-process runs")
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cv:
            self._check_open()
            self._inbox.append(_Job(fn, fut))
            self._cv.notify_all()
        return fut

    def _turn_events(self, turn: int, busy: bool) -> list[sync.Event]:
        """This turn's submits, cancels and shutdown: process 0 (or a single process)
        takes them from its inbox, waiting for work while idle, and publishes them; the
        other processes read what process 0 published."""
        if not self.is_leader:
            return self._turns.read(turn, lambda: self._closing)
        with self._cv:
            while not self._closing and not self._inbox and not busy:
                self._cv.wait()
            events, self._inbox = self._inbox, []
            if self._closing:
                events.append(sync.Close())
        if self._turns is not None:
            self._turns.publish(turn, events)
        return events

    def _apply(self, events: list[sync.Event]) -> bool:
        """Queue the turn's submits, apply its cancels; False at shutdown."""
        for e in events:
            if isinstance(e, _Job):
                if e.future.set_running_or_notify_cancel():
                    try:
                        e.future.set_result(e.fn())
                    except Exception as err:  # the job's failure is its caller's
                        e.future.set_exception(err)
                continue
            if isinstance(e, sync.Close):
                if e.error is not None:
                    raise DistributedError(e.error)
                return False
            if isinstance(e, sync.Submit):
                with self._cv:
                    req = self._submitted.pop(e.id, None)
                if req is None:  # a follower: its own copy of process 0's request
                    req = Request(e.id, e.prompt_ids, e.sampling, e.max_tokens, e.stop,
                                  self._cancel, None, e.warmup)
                    req.adapter, req.priority = e.adapter, e.priority
                    if e.constraint is not None:
                        req.constraint = Constraint.from_json(e.constraint)
                        req.matcher = self._grammars.matcher(req.constraint)
                self._live[e.id] = req
                with self._cv:
                    self._enqueue(req)
                continue
            req = self._live.get(e.id)
            if req is None or req.done:
                continue
            with self._cv:
                queued = req in self._queue
                if queued:
                    self._queue.remove(req)
                    self._cv.notify_all()
            if queued:
                self._complete(req, "cancelled")
            else:  # in a slot: _consume frees it after the step in flight
                req.cancel_seen = True
        return True

    def _serve(self) -> None:
        """The device thread: the engine loop in the mesh's context (expert parallelism
        traces with it)."""
        with mesh_context(self.mesh):
            self._run()

    def _run(self) -> None:
        pending = None  # (out of the step in flight, its logprobs, slots, turn)
        try:
            for turn in itertools.count():
                busy = pending is not None or self.slots_in_use > 0 or bool(self._queue)
                if not self._apply(self._turn_events(turn, busy)):
                    break
                if pending is not None and self._victim() is not None:
                    self._settle(pending)  # a preempted row's last token must be in hand
                    pending = None
                self._admit(preempt=pending is None)
                out = lp = None
                if pending is not None and self._masked_rows():
                    # A masked row's next mask needs the token in flight: no overlap.
                    self._settle(pending)
                    pending = None
                want = any(r is not None and r.sampling.logprobs is not None
                           for r in self._slots)
                if self._decoding and self._spec is None:
                    self._state, out, lp = core.generate_step(
                        self.params, self._state, np.bool_(want), self._masks(), self.adapters,
                        cfg=self.cfg, impl=self.impl)
                elif self._decoding and not self._masked_rows():
                    sp = self._spec
                    self._state, out, lp = engine_spec.step(
                        self.params, sp.weights, self._state, np.bool_(want), self.adapters,
                        cfg=self.cfg, draft_cfg=sp.cfg, k=sp.k, ngram_size=sp.ngram_size,
                        impl=self.impl)
                elif self._decoding:
                    self._state, out, lp = self._constrained_round(want)
                lp = lp if want else None
                if pending is not None:
                    self._settle(pending)
                pending = (out, lp, list(self._slots), turn) if out is not None else None
        except BaseException as e:  # a device failure: refuse new work, fail the rest
            self._fatal = e
            log.error("process %d: the engine's device loop failed: %r", jax.process_index(),
                      e)
            if self._turns is not None and self.is_leader:
                self._turns.publish_failure(e)
        err = EngineClosedError("the engine shut down" if self._fatal is None
                                else f"the engine's device loop failed: {self._fatal!r}")
        with self._cv:
            self._closing = True  # submit() refuses from now on
            left = ([r for r in self._slots if r is not None] + list(self._queue)
                    + list(self._submitted.values())
                    + ([self._partial.req] if self._partial is not None else [])
                    + ([self._admitting] if self._admitting is not None else []))
            jobs = [e for e in self._inbox if isinstance(e, _Job)]
            self._partial = None
            self._queue.clear()
            self._submitted.clear()
            self._slots = [None] * len(self._slots)
            self._cv.notify_all()
        for r in left:
            r.publish(error=err)
        for job in jobs:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(err)
        if self._turns is not None:
            log.info("process %d: engine stopped: %d requests finished, token digest %s",
                     jax.process_index(), self.requests_finished, self.token_digest)

    def _settle(self, pending: tuple) -> None:
        """Hand out a finished step's tokens; process 0 then forgets its turn's events
        (every process has run that step)."""
        out, lp, slots, turn = pending
        self._consume(out, lp, slots)
        if self._turns is not None and self.is_leader:
            self._turns.forget(turn)

    def _masked_rows(self) -> list[int]:
        """Slots whose next token is restricted by a constraint (min_tokens and stop ids
        are applied on device and need no host mask)."""
        return [i for i, r in enumerate(self._slots) if r is not None and r.matcher is not None]

    def _masks(self) -> jax.Array:
        """Each slot's allowed next tokens: all for unconstrained rows (a resident buffer,
        no transfer), its grammar's for the others."""
        mask = self._grammars.masks([None if r is None else r.matcher for r in self._slots])
        return self._ones_BW if mask is None else core.put(mask, self._mask_place)

    def _constrained_round(self, want: bool) -> tuple[Any, jax.Array, Logprobs]:
        """A speculative round while some slot is constrained, in two halves: the draft
        proposes (its first token under the grammar's mask), the host reads the drafted
        tokens and computes each position's mask by walking the grammar along them (then
        rolls it back), and the target verifies under those masks. The target's
        distribution at every position is the masked one, so the rule stays exact."""
        sp, k = self._spec, self._spec.k
        state, d_BK, q = spec.propose_step(sp.weights, self._state, self._masks(),
                                           draft_cfg=sp.cfg, k=k, ngram_size=sp.ngram_size,
                                           impl=self.impl)
        reqs = {i: self._slots[i] for i in self._masked_rows()}
        masks = core.put(self._grammars.drafted_masks(to_host(d_BK), {
            i: (r.matcher, lambda t, r=r: r.sampling.ends(t, self.eos_ids))
            for i, r in reqs.items()}), self._mask_place)
        return engine_spec.verify(self.params, state, d_BK, q, masks, np.bool_(want),
                                  self.adapters, cfg=self.cfg, k=k, impl=self.impl)

    def _victim(self) -> int | None:
        """The slot to preempt for the queue's first request: under the priority policy,
        with no slot free, the running request of the highest priority value (the latest
        among equals) if it is above the waiting one's."""
        if (self.config.scheduling_policy != "priority" or self._partial is not None
                or any(r is None for r in self._slots)):
            return None
        slot = max(range(len(self._slots)),
                   key=lambda i: (self._slots[i].priority, self._slots[i].id))
        with self._cv:  # a caller's cancel may empty the queue meanwhile
            waiting = self._queue[0].priority if self._queue else None
        return slot if waiting is not None and self._slots[slot].priority > waiting else None

    def _preempt(self, slot: int) -> None:
        """Free `slot` and queue its request again; it keeps its id, so its place among
        equals is its arrival."""
        req = self._slots[slot]
        if req.cancel_seen:  # cancelled meanwhile: it ends rather than waits
            self._finish(slot, req, "cancelled", device_done=False)
            return
        self._slots[slot] = None
        self._state = core.release(self._state, np.int32(slot))
        req.metrics.preemptions += 1
        if not req.warmup:
            self.preemptions += 1
        with self._cv:
            self._enqueue(req)

    def _admit(self, preempt: bool = True) -> None:
        """Prefill under this turn's prompt-token budget: first the next chunk of a prompt
        part-way through (chunked prefill), then queued requests into free slots. With
        chunking a prompt longer than what is left of the budget starts now and goes on
        at the next turns, between decode steps, so a long prompt never stalls the
        decoding rows for longer than one budget's prefill."""
        budget = self.config.prefill_token_budget
        chunked = self.config.chunked_prefill
        if self._partial is not None:
            budget -= self._guarded(self._partial, budget)
            if self._partial is not None:
                return
        first = True
        while budget > 0:
            victim = self._victim() if preempt else None
            if victim is not None:
                self._preempt(victim)
            with self._cv:
                free = [i for i, r in enumerate(self._slots) if r is None]
                if not free or not self._queue:
                    return
                if not chunked and not first and len(self._queue[0].prompt_ids) > budget:
                    return
                req = self._admitting = self._queue.popleft()
                self._cv.notify_all()  # room in the queue for blocked submitters
            first = False
            try:
                p = self._start_prefill(req, free[0])
            except JaxinferError as e:
                self._admitting = None
                self._fail(req, e)
                continue
            budget -= self._guarded(p, budget if chunked else len(req.prompt_ids))
            self._admitting = None  # (a device failure before this fails it too: _run)
            if self._partial is not None:
                return

    def _guarded(self, p: _Prefilling, budget: int) -> int:
        """`_prefill_chunk`, with a cancel or a bad request ending the request instead."""
        if p.req.cancel_seen:
            self._partial = None
            self._complete(p.req, "cancelled")
            return 0
        try:
            return self._prefill_chunk(p, budget)
        except JaxinferError as e:
            self._partial = None
            self._fail(p.req, e)
            return 0

    def _fail(self, req: Request, error: JaxinferError) -> None:
        self._live.pop(req.id, None)
        req.publish(error=error)

    def _start_prefill(self, req: Request, slot: int) -> _Prefilling:
        """A row for `req` holding its longest cached prompt prefix."""
        resumed = bool(req.token_ids)  # preempted: its output so far is prefilled too
        if not resumed:
            req.metrics.queue_s = time.perf_counter() - req.arrival
        ids = req.prompt_ids + req.token_ids[:-1]
        n = len(ids)
        hit, digests = 0, []
        if self._prefix is not None:
            salt = 0 if req.adapter == 0 else self._salts[req.adapter - 1]
            digests = block_digests(ids, self._prefix.block, salt)
            # A prompt scored (prompt_logprobs) needs every position's logits, once.
            scored = req.sampling.prompt_logprobs is not None and not resumed
            hit = 0 if req.warmup or scored else self._prefix.match(digests, n)
            row = self._prefix.load(digests, hit)
        else:
            row = init_cache(self.cfg, 1, self.max_len, self.kv_dtype, self._row_shardings)
        cached = hit * self.config.prefix_block
        mask_1V = np.zeros((1, self.cfg.vocab_size), bool)
        mask_1V[0, req.prompt_ids] = True
        return _Prefilling(req, slot, row, cached, cached, hit, digests,
                           SamplingArrays.from_params([req.sampling]), mask_1V, ids)

    def _prefill_chunk(self, p: _Prefilling, budget: int) -> int:
        """Prefill up to `budget` more prompt tokens of `p`; after its last chunk insert it
        in its slot and emit its first token. Returns the prompt tokens computed."""
        req, ids = p.req, p.ids
        n, S = len(ids), self.max_len
        resumed = bool(req.token_ids)
        take = min(budget, n - p.done)
        last = p.done + take == n
        T = gen.bucket(take, self.config.min_prompt_bucket, S)
        tokens_1T = np.full((1, T), self.cfg.pad_token_id, np.int32)
        tokens_1T[0, :take] = ids[p.done:p.done + take]
        want = last and req.sampling.logprobs is not None
        allowed = self._ones_1W
        if last and req.matcher is not None:
            allowed = self._grammars.all_allowed(1)
            self._grammars.fill(req.matcher, allowed, 0)
        args = (p.sampling, p.prompt_mask_1V, recent_tokens(ids)[None],
                np.array([req.max_tokens], np.int32), np.bool_(want), allowed, self._eos_E)
        lora = {} if self.adapters is None else dict(
            lora=self.adapters, adapter_1=np.array([req.adapter], np.int32))
        if req.sampling.prompt_logprobs is None or resumed:
            prefix = core.prefill(self.params, tokens_1T, np.array([take], np.int32), p.row,
                                  *args, cfg=self.cfg, impl=self.impl, **lora)
        else:  # score the chunk: position t predicts prompt token p.done + t + 1
            targets = ids[p.done + 1:p.done + take + 1]
            targets_1T = np.zeros((1, T), np.int32)
            targets_1T[0, :len(targets)] = targets
            prefix, lp = core.prefill_scored(self.params, tokens_1T,
                                             np.array([take], np.int32), p.row, targets_1T,
                                             *args, cfg=self.cfg, impl=self.impl, **lora)
            lp = to_host(lp)
            if p.done == 0:
                req.prompt_logprobs.append(None)  # the first token has no context
            req.prompt_logprobs += host_logprobs(targets, lp.token_B, lp.top_ids_BN,
                                                 lp.top_BN, req.sampling.prompt_logprobs)
        p.row, p.done = prefix.cache, p.done + take
        if not last:  # the rest at the next turns; its slot stays reserved
            self._partial = p
            return take
        self._partial = None
        if self._prefix is not None:
            self._prefix.store(p.digests, p.hit, prefix.cache, dry_run=req.warmup)
        if resumed:
            self._resume(prefix, req, ids, p.slot)
            return take
        if self._spec is None:
            self._state = core.insert(prefix, self._state, np.int32(p.slot), self._fresh)
        else:
            self._insert_speculative(prefix, ids, p.slot)
        self._slots[p.slot] = req
        req.metrics.cached_tokens, req.metrics.prefilled_tokens = p.cached, n - p.cached
        req.output = TextOutput(self.tokenizer, ids, req.stop, req.sampling.skip_special_tokens,
                                req.sampling.include_stop_str_in_output)
        tok = int(to_host(prefix.token_1)[0])
        if not req.warmup:
            self.metrics.on_prefill(n, p.cached)
        lp = _logprob(to_host(prefix.logprobs), 0, req, tok) if want else None
        gap = self._on_token(p.slot, req, tok,
                             req.sampling.ends(tok, self.eos_ids) or req.max_tokens <= 1, lp)
        if not req.warmup:
            self.metrics.on_tokens(1, [] if gap is None else [gap])
        return take

    def _resume(self, prefix: core.Prefix, req: Request, ids: list[int], slot: int) -> None:
        """A preempted request back in a slot, decoding on from its last token."""
        resume = core.Resume.of(req.token_ids, req.prompt_ids, self.max_len)
        if self._spec is None:
            self._state = core.insert(prefix, self._state, np.int32(slot), resume)
        else:
            self._insert_speculative(prefix, ids, slot, resume)
        self._slots[slot] = req

    def _insert_speculative(self, prefix: core.Prefix, ids: list[int], slot: int,
                            resume: core.Resume | None = None) -> None:
        """Prefill the draft model's row (the whole prompt, and a preempted request's output
        but its last token: the prefix cache holds only the target's K/V) and insert both
        rows and the token sequence into the slot."""
        dw, dcfg = self._spec.weights, self._spec.cfg
        n, S = len(ids), self.max_len
        draft_row = None
        if dw is not None:
            T = gen.bucket(n, self.config.min_prompt_bucket, S)
            tokens_1T = np.full((1, T), self.cfg.pad_token_id, np.int32)
            tokens_1T[0, :n] = ids
            row = init_cache(dcfg, 1, S, dw["embed"].dtype, self._draft_row_shardings)
            draft_row = engine_spec.prefill_draft(dw, tokens_1T, np.array([n], np.int32), row,
                                                  cfg=dcfg, impl=self.impl)
        seq_1S = np.zeros((1, S), np.int32)
        seq_1S[0, :n] = ids
        self._state = engine_spec.insert(prefix, draft_row, seq_1S, np.int32(n), self._state,
                                         np.int32(slot), resume or self._fresh)

    def _consume(self, out: jax.Array, lp: Logprobs | None, slots: list[Request | None]
                 ) -> None:
        """Hand each live request the tokens one finished device step emitted: one per
        slot from a decode step, 0..k+1 per slot from a speculative round (and their
        log-probabilities if some request asked: row slot, or slot * (k + 1) + i)."""
        out, lp = to_host((out, lp))
        gaps, count = [], 0
        for slot, req in enumerate(slots):
            if req is None or req.done:
                continue
            if req.cancel_seen:
                self._finish(slot, req, "cancelled", device_done=False)
                continue
            toks, done = self._emitted(out, slot, req)
            for i, tok in enumerate(toks):
                row = slot if self._spec is None else slot * (self._spec.k + 1) + i
                entry = (_logprob(lp, row, req, tok)
                         if lp is not None and req.sampling.logprobs is not None else None)
                gap = self._on_token(slot, req, tok, done and i == len(toks) - 1, entry)
                if not req.warmup:
                    count += 1
                    gaps += [] if gap is None else [gap]
                if req.done:
                    break
        if count:
            self.metrics.on_tokens(count, gaps)

    def _emitted(self, out: np.ndarray, slot: int, req: Request) -> tuple[list[int], bool]:
        """(tokens, device done) of one slot; counts a round's accepted draft tokens."""
        if self._spec is None:  # out_2B: (token, done) per slot
            return [int(out[0, slot])], bool(out[1, slot])
        n_emit, done, accepted = (int(x) for x in out[slot, :3])  # engine_spec.step's out_BR
        if n_emit and not req.warmup:
            self.spec_proposed += self._spec.k
            self.spec_accepted += accepted
        return [int(t) for t in out[slot, 3:3 + n_emit]], bool(done)

    def _on_token(self, slot: int, req: Request, tok: int, device_done: bool,
                  logprob: TokenLogprob | None = None) -> float | None:
        """Detokenize, apply stop strings with holdback, stream the delta, maybe finish.
        Returns the gap since the request's previous token (None for its first)."""
        now = time.perf_counter()
        gap = None if req.last_t is None else now - req.last_t
        if req.first_t is None:
            req.first_t = now
            req.metrics.ttft_s = now - req.arrival
        req.last_t = now
        req.token_ids.append(tok)
        if logprob is not None:
            req.logprobs.append(logprob)
        is_eos = req.sampling.ends(tok, self.eos_ids)
        complete = False  # the request's grammar is complete: nothing but EOS could follow
        if req.matcher is not None and not is_eos:
            if not req.matcher.consume_token(tok):
                log.warning("request %d left its grammar: %s", req.id, req.matcher.get_error())
            complete = req.matcher.is_stopped()
        req.publish(req.output.push(tok, is_eos, device_done or complete))
        if device_done or is_eos or complete or req.output.stopped:
            self._finish(slot, req, "stop" if is_eos or complete or req.output.stopped
                         else "length", device_done)
        return gap

    def _finish(self, slot: int, req: Request, reason: str, device_done: bool) -> None:
        self._slots[slot] = None
        if not device_done:  # the device row would keep decoding: freeze it
            self._state = core.release(self._state, np.int32(slot))
        self._complete(req, reason)

    def _complete(self, req: Request, reason: str) -> None:
        with self._cv:  # a caller's thread may cancel a queued request meanwhile
            self._live.pop(req.id, None)
            if not req.warmup:
                self.requests_finished += 1
                self._digest.update(f"{req.id}:{req.token_ids};".encode())
        m, now = req.metrics, time.perf_counter()
        m.e2e_s = now - req.arrival
        n = len(req.token_ids)
        if n > 1 and req.last_t is not None and req.first_t is not None:
            span = req.last_t - req.first_t
            m.itl_s = span / (n - 1)
            m.decode_tokens_per_s = (n - 1) / span if span > 0 else 0.0
        result = EngineResult(req.id, req.text, list(req.token_ids), len(req.prompt_ids),
                              reason, m, None if req.sampling.logprobs is None
                              else list(req.logprobs),
                              None if req.sampling.prompt_logprobs is None
                              else list(req.prompt_logprobs),
                              _stop_reason(req, reason))
        if not req.warmup:
            self.metrics.on_finish(reason, m)
        req.publish(result=result)


def _stop_reason(req: Request, reason: str) -> str | int | None:
    """EngineResult.stop_reason: the matched stop string, or the stop id that ended it."""
    if reason != "stop":
        return None
    if req.output is not None and req.output.stop_string is not None:
        return req.output.stop_string
    last = req.token_ids[-1] if req.token_ids else None
    return last if last in req.sampling.stop_token_ids else None
