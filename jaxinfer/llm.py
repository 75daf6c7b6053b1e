"""`LLM`: the library's front door. Text in, text out, over the pure functional core.

    llm = jaxinfer.load()                       # default model (SmolLM2-135M-Instruct)
    llm.generate("The capital of France is", max_new_tokens=8, sampling=GREEDY).text
    for delta in llm.stream("Tell me a story"): print(delta, end="")

The pure functions stay one attribute away: `llm.params` (the weight pytree),
`llm.forward(params, tokens_BT, cache) -> (logits_BTV, cache)` and
`llm.init_cache(batch, max_len)`, for users who write their own loops, jit or grad.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer import beam_search, model, speculative
from jaxinfer import embed as embed_mod
from jaxinfer import generate as gen
from jaxinfer.attention import IMPLS, default_impl
from jaxinfer.checkpoint import load_checkpoint, load_quant_config
from jaxinfer.config import ModelConfig
from jaxinfer.errors import BadRequestError, ConfigError
from jaxinfer.kv_cache import KVCache, cache_dtype, cache_shardings, init_cache
from jaxinfer.lora import LoraStack, index_of
from jaxinfer.memory import device_bytes
from jaxinfer.output_text import TextOutput, find_stop
from jaxinfer.quant import QuantConfig, infer_config
from jaxinfer.runtime import to_host
from jaxinfer.sampling import (
    SamplingArrays,
    SamplingParams,
    TokenLogprob,
    check_vocab,
    host_logprobs,
    token_ids,
)
from jaxinfer.sharding import ShardingRules, make_mesh, mesh_context
from jaxinfer.structured import Constraint, Grammars
from jaxinfer.tokenizer import Tokenizer, chat_template_text, load_tokenizer
from jaxinfer.tool_calls import check_tools
from jaxinfer.weights import Weights, quantize_weights, weight_shardings, weight_specs

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Completion:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" (EOS token or stop string) or "length"
    ttft_s: float
    decode_tokens_per_s: float
    logprobs: list[TokenLogprob] | None = None  # one per token id, if sampling.logprobs
    # One per prompt token (None for the first), if sampling.prompt_logprobs.
    prompt_logprobs: list[TokenLogprob | None] | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class SpeculativeCompletion(Completion):
    acceptance_rate: float = 0.0  # accepted / proposed draft tokens
    num_speculative_tokens: int = 0  # k, draft tokens proposed per verification pass
    verify_passes: int = 0  # target forward passes after the prompt


def _place(host: Weights, dtype: Any, shardings: Weights | None) -> Weights:
    """Host weights (numpy arrays, QArrays) on the devices: floats cast to `dtype`, each
    array built shard by shard from the host copy (every process of a multi-process run
    reads the same file), or on the default device without shardings."""
    def cast(a):  # no copy when already `dtype`: a second host copy of the whole model
        a = np.asarray(a)
        return a.astype(dtype, copy=False) if np.issubdtype(a.dtype, np.floating) else a

    host = jax.tree.map(cast, host)
    if shardings is None:
        return jax.device_put(host, jax.devices()[0])
    return jax.tree.map(lambda a, s: jax.make_array_from_callback(a.shape, s,
                                                                   lambda i, a=a: a[i]),
                        host, shardings)


def _as_batch(prompts: Any) -> tuple[list, bool]:
    """(the prompts as a list, whether one prompt was given): a string or a list of token
    ids is one prompt, a list of those a batch; anything else is a BadRequestError."""
    if not isinstance(prompts, str | Sequence | np.ndarray):
        raise BadRequestError(f"prompts must be a string, a list of token ids or a list of "
                              f"those, got {prompts!r}", "prompt")
    single = isinstance(prompts, str) or (
        len(prompts) > 0 and isinstance(prompts[0], int | np.integer))
    return ([prompts] if single else list(prompts)), single


def _compute_dtype(dtype: Any) -> Any:
    """The compute dtype: None -> default_dtype(); anything but a 16/32-bit float is a
    ConfigError (int8 would cast the weights to integers; float64 needs jax_enable_x64)."""
    if dtype is None:
        return default_dtype()
    try:
        dt = jnp.dtype(dtype)
    except TypeError:
        dt = None
    if dt not in (jnp.float32, jnp.bfloat16, jnp.float16):
        raise ConfigError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    return dt


def default_dtype() -> Any:
    """float32 on CPU (bf16 matvecs are ~20x slower there), bfloat16 on accelerators."""
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


def _draft_parts(draft: Any) -> tuple[Weights | None, ModelConfig | None, Any]:
    """(weights, config, KV dtype) of a draft: an LLM, or "ngram" (prompt lookup: None)."""
    if isinstance(draft, str):
        if draft != "ngram":
            raise BadRequestError(f"draft must be an LLM or 'ngram', got {draft!r}")
        return None, None, None
    return draft.params, draft.cfg, draft.kv_dtype


def _same_seeds_everywhere(sampling: list[SamplingParams]) -> list[SamplingParams]:
    """Unseeded requests get a random seed; in a multi-process run process 0 draws it and
    every process uses the same one, so all hosts sample the same tokens."""
    if all(p.seed is not None for p in sampling):
        return sampling
    seeds = np.random.SeedSequence().generate_state(len(sampling), np.uint32)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        seeds = np.asarray(multihost_utils.broadcast_one_to_all(seeds))
    return [p if p.seed is not None else dataclasses.replace(p, seed=int(s))
            for p, s in zip(sampling, seeds, strict=True)]


def _check_sampling(sampling: list[SamplingParams], max_new: list[int],
                    vocab_size: int, stop: Sequence[str], rows: int = 1) -> None:
    """BadRequestError, before any work, for a bad setting or per-row list."""
    for name, xs in (("sampling", sampling), ("max_new_tokens", max_new)):
        if len(xs) != rows:
            raise BadRequestError(f"{name} has {len(xs)} entries for {rows} prompts", name)
    check_vocab(sampling, vocab_size)
    sampling[0].stops(stop)
    for p, m in zip(sampling, max_new, strict=True):
        if isinstance(m, bool) or not isinstance(m, int | np.integer) or m <= 0:
            raise BadRequestError(f"max_new_tokens must be a positive integer, got {m!r}",
                                  "max_new_tokens")
        p.check_lengths(m)


def _prompt_logprobs(scored: tuple | None, prompts: list[list[int]],
                     sampling: list[SamplingParams]) -> list[list[TokenLogprob | None] | None]:
    """Each row's prompt_logprobs (None for the first token), if it asked, from a start's
    `prompt_logprobs_out`."""
    if scored is None:
        return [None] * len(prompts)
    lp, ids, top = to_host(scored)
    out: list[list[TokenLogprob | None] | None] = []
    for b, (p, sp) in enumerate(zip(prompts, sampling, strict=True)):
        n = len(p)
        out.append(None if sp.prompt_logprobs is None else [None, *host_logprobs(
            p[1:], lp[b, :n - 1], ids[b, :n - 1], top[b, :n - 1], sp.prompt_logprobs)])
    return out


def _on_mesh(method: Callable) -> Callable:
    """Run a method in the model's mesh context, which expert parallelism traces with
    (sharding.mesh_context). A generator runs in it one step at a time, never across a
    yield, so interleaved streams (and the caller's code between steps) keep their own."""
    if inspect.isgeneratorfunction(method):
        @functools.wraps(method)
        def iterate(self, *args, **kw):
            steps = method(self, *args, **kw)
            try:
                while True:
                    with mesh_context(self.mesh):
                        try:
                            item = next(steps)
                        except StopIteration as stop:
                            return stop.value
                    yield item
            finally:
                with mesh_context(self.mesh):
                    steps.close()
        return iterate

    @functools.wraps(method)
    def call(self, *args, **kw):
        with mesh_context(self.mesh):
            return method(self, *args, **kw)
    return call


class LLM:
    """A loaded model: config, weights (on a mesh), tokenizer; text in, text out.

    Attributes:
        cfg: the `ModelConfig` (shapes, RoPE, special tokens).
        params: the weight pytree (nested dict of arrays, layout in weights.py).
        tokenizer: encode/decode and the chat template.
        mesh: the device mesh the weights are sharded over, or None (one device).
        dtype: the compute dtype of the weights.
    """

    def __init__(self, cfg: ModelConfig, params: Weights, tokenizer: Tokenizer,
                 mesh: jax.sharding.Mesh | None = None, impl: str | None = None,
                 kv_dtype: Any = None):
        self.cfg, self.params, self.tokenizer, self.mesh, self.impl = (
            cfg, params, tokenizer, mesh, impl or default_impl())
        self.dtype = params["embed"].dtype  # a QArray's dtype is its compute dtype
        self.kv_dtype = self.dtype if kv_dtype is None else cache_dtype(kv_dtype)
        self.weight_bytes = device_bytes(params)  # held on the devices, all shards
        self.kv_cache_bytes = 0
        self.eos = np.array(sorted(set(cfg.eos_token_ids) | set(tokenizer.eos_ids)) or [-1],
                            np.int32)
        self._grammars: Grammars | None = None  # structured output, built on first use
        self.adapters: LoraStack | None = None  # per-request LoRA adapters (add_adapters)
        self.adapter_names: list[str | None] = []  # adapter i + 1 of the stack (None: free)
        self._adapter_factors: list = []  # each adapter as read (convert.lora.LoraFactors)

    @classmethod
    def load(cls, checkpoint: str | Path | None = None, dtype: Any = None,
             mesh: str | jax.sharding.Mesh | None = None, fsdp: bool = False,
             impl: str | None = None, quantize: str | QuantConfig | None = None,
             group_size: int | None = None,
             kv_dtype: Any = None, lora: str | Path | None = None,
             lora_modules: dict[str, str | Path] | None = None,
             chat_template: str | Path | None = None) -> LLM:
        """Load an Orbax checkpoint directory (default: the embedded SmolLM2 model), or
        convert a GGUF file or Hugging Face model directory in memory on the way (the
        tokenizer from the same source; `quantize` then quantizes each layer as it is read,
        convert/stacks.py). `scripts/convert.py` writes an Orbax checkpoint once instead,
        which loads faster and restores straight into its shardings.

        With a mesh ('data:2,model:4' or a Mesh), every weight is restored straight into
        its sharding from the rules table; fsdp also shards the embed axis over 'data'.
        A quantized checkpoint loads quantized by itself; `quantize` ("int8" or "int4",
        `group_size` for int4, or a quant.QuantConfig) quantizes a float one on load.
        kv_dtype="int8" keeps the KV cache in int8 with per-token scales (default: the
        compute dtype). `lora`: a PEFT LoRA adapter directory merged into the float
        weights (before `quantize`; convert/lora.py). `lora_modules` ({name: PEFT
        directory}) loads adapters unmerged, for requests to pick by name (`add_adapters`).
        `chat_template` (a Jinja file or the template text) replaces the model's own.
        """
        from jaxinfer.convert import is_foreign, load_foreign
        from jaxinfer.convert.stacks import IN_MEMORY, Storage

        if checkpoint is None:
            from jaxinfer import default_model

            checkpoint = default_model.checkpoint_path()
        dtype = _compute_dtype(dtype)
        template = None if chat_template is None else chat_template_text(chat_template)
        if impl is not None and impl not in IMPLS:
            raise ConfigError(f"unknown attention impl {impl!r}; expected one of {IMPLS}")
        if not isinstance(mesh, jax.sharding.Mesh):
            mesh = make_mesh(mesh) if mesh else None
        foreign = is_foreign(checkpoint)
        stored = None if foreign else load_quant_config(checkpoint)
        qc = (quantize if isinstance(quantize, QuantConfig) or quantize is None
              else QuantConfig.from_mode(quantize, group_size))
        if qc is not None and stored is not None:
            raise ConfigError(f"checkpoint {checkpoint} is already quantized ({stored}); "
                              f"drop quantize={quantize!r}")
        rules = ShardingRules.default(fsdp=fsdp)
        if foreign:  # quantized while read, unless a LoRA adapter merges into floats first
            stored = qc if lora is None else None
            # Float weights held in the compute dtype, unless still merged or quantized.
            storage = Storage(dtype) if lora is None and qc is None else IN_MEMORY
            cfg, host = load_foreign(checkpoint, stored, storage=storage)
            if stored is not None:  # as read: an FP8 release's fp8 keeps its own groups
                stored = infer_config(host)
            specs = weight_specs(cfg, dtype, stored)
            shardings = (None if mesh is None else weight_shardings(specs, mesh, rules))
            params = _place(host, dtype, shardings)
            qc = None if stored is not None else qc
        else:
            shardings = None
            if mesh is not None:
                cfg = ModelConfig.load(Path(checkpoint) / "config.json")
                shardings = weight_shardings(weight_specs(cfg, dtype, stored), mesh, rules)
            cfg, params = load_checkpoint(checkpoint, dtype=dtype, shardings=shardings)
        qshardings = None
        if mesh is not None and qc is not None:
            qshardings = weight_shardings(weight_specs(cfg, dtype, qc), mesh, rules)
        if lora is not None:
            from jaxinfer.convert.lora import merge_lora, read_lora

            params = merge_lora(params, read_lora(lora, cfg))
        if qc is not None:
            params = quantize_weights(params, qc, qshardings)
        tokenizer = load_tokenizer(checkpoint if foreign else Path(checkpoint) / "tokenizer")
        if template is not None:
            tokenizer.set_chat_template(template)
        spec = infer_config(params)
        if spec and spec.linear and spec.linear.float8 and jax.default_backend() == "cpu":
            log.warning("float8 weights on CPU: XLA converts them in software, so decode "
                        "runs ~4.5x slower than float32 here (int8 is the fast CPU format); "
                        "accelerators convert them in the matmul")
        llm = cls(cfg, params, tokenizer, mesh, impl, kv_dtype)
        if lora_modules:
            llm.add_adapters(lora_modules)
        return llm

    def add_adapters(self, modules: dict[str, str | Path]) -> None:
        """Load PEFT LoRA adapters by name, unmerged (vLLM's --lora-modules): a generation
        names one per row (`adapter=`), rows of different adapters and of none share a
        batch, and switching adapters never recompiles (lora.py). Restacks every adapter
        (the stack's shape, so the compiled programs, change once here)."""
        from jaxinfer.convert.lora import read_lora, stack_adapters

        for name in modules:
            if not isinstance(name, str) or not name or name in self.adapter_names:
                raise ConfigError(f"LoRA adapter name {name!r} is empty or already loaded")
        read = [read_lora(p, self.cfg) for p in modules.values()]
        prior = self._adapter_factors
        stack = stack_adapters(prior + read, self.dtype)
        place = (None if self.mesh is None else jax.sharding.NamedSharding(
            self.mesh, jax.sharding.PartitionSpec()))  # small: every device holds all
        self.adapters = jax.device_put(stack, place) if place is not None else stack
        self._adapter_factors = prior + read
        self.adapter_names = self.adapter_names + list(modules)
        self.weight_bytes = device_bytes(self.params) + device_bytes(self.adapters)

    def _adapter_ids(self, adapter: str | Sequence[str | None] | None, n: int
                     ) -> np.ndarray | None:
        """Each row's adapter index (0: none) from `adapter` (one name for every row, or a
        list with one per row); None when no row has one."""
        names = list(adapter) if isinstance(adapter, (list, tuple)) else [adapter] * n
        if len(names) != n:
            raise BadRequestError(f"adapter must be a name or a list of {n} (name or None), "
                                  f"got {adapter!r}", "adapter")
        ids = [index_of(self.adapter_names, a) for a in names]
        return np.asarray(ids, np.int32) if any(ids) else None

    def _lora(self, adapter_B: jax.Array | np.ndarray | None) -> LoraStack | None:
        """The adapters for rows `adapter_B` (None when no row has one: the plain program;
        a started state's `adapter_B` is None then too)."""
        return None if adapter_B is None else self.adapters

    # ---- the pure functions ----------------------------------------------------------
    @property
    def forward(self) -> Callable[[Weights, jax.Array, KVCache], tuple[jax.Array, KVCache]]:
        """`forward(params, tokens_BT, cache) -> (logits_BTV, cache)`, jitted and pure.

        `jaxinfer.model.forward` with this model's config bound. Logits are float32 for
        every position; the new K/V are written at `cache.lengths + t` and the returned
        cache is advanced by T. The cache argument is donated: use the returned one.
        """
        forward = functools.partial(model.forward, cfg=self.cfg, impl=self.impl)

        def on_mesh(*args, **kw):
            with mesh_context(self.mesh):
                return forward(*args, **kw)
        return on_mesh

    def init_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty KV cache for `batch` rows of `max_len` positions, in the weights'
        dtype and, with a mesh, sharded like the engine's (batch over 'data', KV heads
        over 'model')."""
        shardings = (cache_shardings(self.cfg, batch, max_len, self.mesh)
                     if self.mesh is not None else None)
        return init_cache(self.cfg, batch, max_len, self.kv_dtype, shardings)

    def load_draft(self, draft: LLM | str | None) -> LLM | str | None:
        """A speculative draft for this model: None, "ngram" and LLMs pass through; any
        other string is a checkpoint directory, loaded with this model's dtype, mesh and
        attention impl (load it once and pass the LLM when generating repeatedly)."""
        if draft is None or draft == "ngram" or isinstance(draft, LLM):
            return draft
        return LLM.load(draft, dtype=self.dtype, mesh=self.mesh, impl=self.impl)

    # ---- prompts -----------------------------------------------------------------
    def encode(self, prompt: str | Sequence[int], chat: bool = False) -> list[int]:
        if not isinstance(prompt, str):
            return token_ids(prompt, self.cfg.vocab_size)
        if not prompt:
            raise BadRequestError("prompt is empty")
        if chat:
            prompt = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        return self.tokenizer.encode(prompt)

    def _start(self, prompts: list[list[int]], sampling: list[SamplingParams],
               max_new: list[int], matchers: list | None = None,
               adapter_B: np.ndarray | None = None) -> gen.DecodeState:
        prompt_BT, lens_B, cache, M = gen.prepare(prompts, max_new, self.cfg, self.kv_dtype,
                                                  self.mesh)
        self.kv_cache_bytes = device_bytes(cache)  # the last generation's cache (memory.py)
        return gen.start(self.params, prompt_BT, lens_B, cache,
                         SamplingArrays.from_params(_same_seeds_everywhere(sampling)),
                         np.asarray(max_new, np.int32), self.eos, cfg=self.cfg, max_out=M,
                         impl=self.impl,
                         logprobs=any(p.logprobs is not None for p in sampling),
                         mask_BW=self._masks(matchers or []),
                         prompt_logprobs=any(p.prompt_logprobs is not None for p in sampling),
                         lora=self._lora(adapter_B), adapter_B=adapter_B)

    # ---- structured output -------------------------------------------------------------
    def _matchers(self, constraint: Constraint | Sequence[Constraint | None] | None,
                  n: int) -> list:
        """One llguidance matcher per row (None: unconstrained); BadRequestError if a
        constraint does not compile."""
        cons = (list(constraint) if isinstance(constraint, (list, tuple))
                else [constraint] * n)
        if len(cons) != n or not all(c is None or isinstance(c, Constraint) for c in cons):
            raise BadRequestError(f"constraint must be a Constraint or a list of {n} "
                                  f"(Constraint or None), got {constraint!r}", "constraint")
        if all(c is None for c in cons):
            return [None] * n
        if self._grammars is None:
            self._grammars = Grammars(self.tokenizer, self.cfg.vocab_size,
                                      [int(e) for e in self.eos if e >= 0])
        return [None if c is None else self._grammars.matcher(c) for c in cons]

    def _masks(self, matchers: list) -> np.ndarray | None:
        """Each row's allowed next tokens (Grammars.masks; None: no row is constrained)."""
        return None if self._grammars is None else self._grammars.masks(matchers)

    def _advance_matcher(self, m, sampling: SamplingParams, tok: int) -> bool:
        """Feed a sampled token to a row's matcher; True when its grammar is complete."""
        if sampling.ends(tok, self.eos):
            return False
        if not m.consume_token(tok):
            log.warning("a constrained row left its grammar: %s", m.get_error())
        return m.is_stopped()

    def _decode_constrained(self, state: gen.DecodeState, matchers: list,
                            sampling: list[SamplingParams]
                            ) -> tuple[gen.DecodeState, list[bool]]:
        """Decode with the host in the loop while any constrained row is live: each step
        is masked by the rows' grammars, a row ends as soon as its grammar is complete,
        and once only unconstrained rows remain the rest runs in the device while loop."""
        matchers, complete = list(matchers), [False] * len(matchers)
        out = jnp.stack([state.tokens_B, state.done_B.astype(jnp.int32)])
        while True:
            tok_B, done_B = to_host(out)
            ended = []
            for b, m in enumerate(matchers):
                if m is None:
                    continue
                if self._advance_matcher(m, sampling[b], int(tok_B[b])):
                    complete[b] = True
                    if not done_B[b]:
                        ended.append(b)
                if done_B[b] or complete[b]:
                    matchers[b] = None
            if ended:  # frozen like a row that hit EOS: later steps leave it alone
                state = dataclasses.replace(state, done_B=state.done_B.at[
                    np.asarray(ended)].set(True))
            if all(bool(d) or c for d, c in zip(done_B, complete, strict=True)):
                return state, complete
            mask = self._masks(matchers)
            if mask is None:
                return gen.run_loop(self.params, state, cfg=self.cfg, impl=self.impl,
                                    lora=self._lora(state.adapter_B)), complete
            state, out, _ = gen.step(self.params, state, np.bool_(False), mask,
                                     self._lora(state.adapter_B), cfg=self.cfg, impl=self.impl)

    # ---- batch generation (jitted while loop) ------------------------------------------
    @_on_mesh
    def generate(self, prompts: str | Sequence[int] | list, sampling: SamplingParams | list
                 | None = None, max_new_tokens: int | list[int] = 64, stop: Sequence[str] = (),
                 chat: bool = False, draft: LLM | str | None = None,
                 num_speculative_tokens: int = 4, ngram_size: int = 3,
                 constraint: Constraint | Sequence[Constraint | None] | None = None,
                 adapter: str | Sequence[str | None] | None = None
                 ) -> Completion | list:
        """Generate for one prompt or a batch; all rows decode together on device.

        With `adapter` (the name of a LoRA adapter loaded by `add_adapters`, or a list
        with one per row, None for the base model) each row runs its own adapter.

        With `constraint` (a `structured.Constraint` for every row, or a list with one per
        row, None for a free row) the output matches a JSON schema, regex, choice or
        grammar; the host then masks each step while a constrained row is live.

        With `draft` (a smaller LLM sharing the tokenizer, or "ngram" for prompt lookup)
        the draft proposes `num_speculative_tokens` per round and this model verifies them
        in one pass (speculative.py): same output distribution, SpeculativeCompletions
        (constraints too: the host masks each drafted position between draft and verify).

        With `SamplingParams(n=k)` a prompt gets k completions (vLLM's n), returned as a
        list in its place.
        """
        batch, single = _as_batch(prompts)
        if not batch:
            raise BadRequestError("no prompts given")
        sp = sampling if isinstance(sampling, list) else [sampling or SamplingParams()] * len(batch)
        if any(isinstance(p, SamplingParams) and p.n > 1 for p in sp) and len(sp) == len(batch):
            out = self._fan_out(batch, sp, dict(max_new_tokens=max_new_tokens,
                                                constraint=constraint, adapter=adapter),
                                stop=stop, chat=chat, draft=draft, ngram_size=ngram_size,
                                num_speculative_tokens=num_speculative_tokens)
            return out[0] if single else out
        ids = [self.encode(p, chat) for p in batch]
        resolved = {id(p): p.resolve_bad_words(self.tokenizer) for p in sp
                    if isinstance(p, SamplingParams)}  # once per distinct params object
        sp = [resolved.get(id(p), p) for p in sp]
        mn = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(ids)
        _check_sampling(sp, mn, self.cfg.vocab_size, stop, len(ids))
        ids = [s.truncate(i) for s, i in zip(sp, ids, strict=True)]
        matchers = self._matchers(constraint, len(ids))
        adapter_B = self._adapter_ids(adapter, len(ids))
        if draft is not None:
            res = self._speculate(ids, sp, mn, stop, draft, num_speculative_tokens, ngram_size,
                                  matchers, adapter_B)
            return res[0] if single else res
        t0 = time.perf_counter()
        state = self._start(ids, sp, mn, matchers, adapter_B)
        state.tokens_B.block_until_ready()
        ttft = time.perf_counter() - t0
        prompt_lps = _prompt_logprobs(state.prompt_logprobs_out, ids, sp)
        state = dataclasses.replace(state, prompt_logprobs_out=None)  # read: decode without
        complete = [False] * len(ids)
        if any(m is not None for m in matchers):
            state, complete = self._decode_constrained(state, matchers, sp)
        else:
            state = gen.run_loop(self.params, state, cfg=self.cfg, impl=self.impl,
                                 lora=self._lora(state.adapter_B))
        out, n, eos, lp = to_host((state.output_BM, state.num_generated_B,
                                   state.finish_eos_B, state.logprobs_out))
        dt = time.perf_counter() - t0 - ttft
        results = []
        for b in range(len(ids)):
            toks = [int(t) for t in out[b, : n[b]]]
            lps = None if sp[b].logprobs is None else host_logprobs(
                toks, *(a[b] for a in lp), sp[b].logprobs)
            results.append(dataclasses.replace(
                self._finish(ids[b], toks, bool(eos[b]), stop, sp[b], ttft,
                             (n[b] - 1) / dt if dt > 0 and n[b] > 1 else 0.0, lps, complete[b]),
                prompt_logprobs=prompt_lps[b]))
        return results[0] if single else results

    def _fan_out(self, batch: list, sp: list[SamplingParams], per_row: dict[str, Any],
                 **kw: Any) -> list[Completion | list[Completion]]:
        """`generate` with SamplingParams.n > 1: each prompt's n completions run as n rows
        of one batch (choice j seeded seed + j); a prompt with n > 1 gets a list of its
        completions, in order, one with n = 1 its Completion as before."""
        rows = [(i, j) for i, p in enumerate(sp) for j in range(p.n)]
        expand = {k: [v[i] for i, _ in rows] if isinstance(v, (list, tuple)) else v
                  for k, v in per_row.items()}
        out = self.generate([batch[i] for i, _ in rows], [sp[i].choice(j) for i, j in rows],
                            **expand, **kw)
        it = iter(out)
        return [[next(it) for _ in range(p.n)] if p.n > 1 else next(it) for p in sp]

    def _speculate(self, ids: list[list[int]], sp: list[SamplingParams], mn: list[int],
                   stop: Sequence[str], draft: LLM | str, k: int, ngram_size: int,
                   matchers: list, adapter_B: np.ndarray | None = None
                   ) -> list[SpeculativeCompletion]:
        dw, dcfg, ddtype = _draft_parts(draft)
        r = speculative.generate_ids(self.params, dw, self.cfg, dcfg, ids,
                                     _same_seeds_everywhere(sp), mn, self.eos, k, ngram_size,
                                     self.kv_dtype, self.mesh, self.impl, ddtype,
                                     matchers, self._grammars, self._lora(adapter_B),
                                     adapter_B)
        out, prompt_lps = [], _prompt_logprobs(r.prompt_logprobs, ids, sp)
        for b, toks in enumerate(r.tokens):
            tps = (len(toks) - 1) / r.decode_s if r.decode_s > 0 and len(toks) > 1 else 0.0
            lps = None if sp[b].logprobs is None else host_logprobs(
                toks, *(a[b] for a in r.logprobs), sp[b].logprobs)
            c = dataclasses.replace(
                self._finish(ids[b], toks, r.finish_eos[b], stop, sp[b], r.ttft_s, tps, lps,
                             r.complete[b]), prompt_logprobs=prompt_lps[b])
            fields = {f.name: getattr(c, f.name) for f in dataclasses.fields(c)}  # shallow
            out.append(SpeculativeCompletion(**fields,
                                             acceptance_rate=r.acceptance_rate(b),
                                             num_speculative_tokens=k,
                                             verify_passes=r.rounds[b]))
        return out

    def _finish(self, prompt: list[int], toks: list[int], eos: bool, stop: Sequence[str],
                sampling: SamplingParams, ttft: float, tps: float,
                logprobs: list[TokenLogprob] | None = None, complete: bool = False
                ) -> Completion:
        """`eos`: the last token ended the row (EOS, a stop id); `complete`: its grammar
        was complete."""
        body = toks[:-1] if eos else toks
        skip, stop = sampling.skip_special_tokens, sampling.stops(stop)
        text = self.tokenizer.decode(body, skip)
        reason = "stop" if eos or complete else "length"
        at, n = find_stop(text, stop)
        if at >= 0:
            text, reason = text[:at + (n if sampling.include_stop_str_in_output else 0)], "stop"
            # Keep the tokens up to the one that completed the stop string.
            for k in range(1, len(body) + 1):
                if find_stop(self.tokenizer.decode(body[:k], skip), stop)[0] >= 0:
                    toks = body[:k]
                    break
        return Completion(text, toks, len(prompt), reason, ttft, float(tps),
                          None if logprobs is None else logprobs[:len(toks)])

    # ---- streaming (host-stepped, one dispatch ahead) --------------------------------------
    @_on_mesh
    def stream(self, prompt: str | Sequence[int], sampling: SamplingParams | None = None,
               max_new_tokens: int = 64, stop: Sequence[str] = (), chat: bool = False,
               result: list[Completion] | None = None, constraint: Constraint | None = None,
               draft: LLM | str | None = None, num_speculative_tokens: int = 4,
               ngram_size: int = 3, adapter: str | None = None) -> Iterator[str]:
        """Yield text deltas as tokens are produced. If `result` is a list, the final
        Completion is appended to it. The next step is dispatched before the host reads
        the current token, so detokenizing overlaps device work (not under a
        `constraint`, whose next mask needs the current token). With `draft` (as in
        `generate`) each speculative round yields the 1..k+1 tokens it kept."""
        sampling = (sampling or SamplingParams()).resolve_bad_words(self.tokenizer)
        if sampling.n > 1:
            raise BadRequestError(f"n={sampling.n}: a stream is one sequence (generate "
                                  "returns n completions)", "n")
        ids = sampling.truncate(self.encode(prompt, chat))
        t0 = time.perf_counter()
        _check_sampling([sampling], [max_new_tokens], self.cfg.vocab_size, stop)
        matchers = self._matchers(constraint, 1)
        adapter_B = self._adapter_ids(adapter, 1)
        if draft is not None:
            yield from self._stream_speculative(ids, sampling, max_new_tokens, stop, result,
                                                matchers, draft, num_speculative_tokens,
                                                ngram_size, t0, adapter_B)
            return
        state = self._start([ids], [sampling], [max_new_tokens], matchers, adapter_B)
        lora = self._lora(state.adapter_B)
        prompt_lps = _prompt_logprobs(state.prompt_logprobs_out, [ids], [sampling])[0]
        state = dataclasses.replace(state, prompt_logprobs_out=None)
        pending = jnp.stack([state.tokens_B, state.done_B.astype(jnp.int32)])
        out = TextOutput(self.tokenizer, ids, sampling.stops(stop), sampling.skip_special_tokens,
                         sampling.include_stop_str_in_output)
        toks: list[int] = []
        reason, ttft = "length", 0.0
        while True:
            # Dispatch step n+1 first; reading token n then overlaps its compute. After the
            # last token this costs one wasted step on a frozen (done) row.
            if matchers[0] is None:
                state, nxt, _ = gen.step(self.params, state, np.bool_(False), None, lora,
                                         cfg=self.cfg, impl=self.impl)
            tok, done = (int(x) for x in to_host(pending)[:, 0])
            if not toks:
                ttft = time.perf_counter() - t0
            toks.append(tok)
            is_eos = sampling.ends(tok, self.eos)
            complete = (matchers[0] is not None
                        and self._advance_matcher(matchers[0], sampling, tok))
            delta = out.push(tok, is_eos, bool(done) or complete)
            if delta:
                yield delta
            if is_eos or out.stopped or complete:
                reason = "stop"
            if bool(done) or reason == "stop":
                break
            if matchers[0] is not None:
                state, nxt, _ = gen.step(self.params, state, np.bool_(False),
                                         self._masks(matchers), lora, cfg=self.cfg,
                                         impl=self.impl)
            pending = nxt
        dt = time.perf_counter() - t0 - ttft
        if result is not None:
            lps = None if sampling.logprobs is None else host_logprobs(
                toks, *(a[0] for a in to_host(state.logprobs_out)), sampling.logprobs)
            result.append(Completion(out.text, toks, len(ids), reason, ttft,
                                     (len(toks) - 1) / dt if dt > 0 and len(toks) > 1 else 0.0,
                                     lps, prompt_lps))

    def _stream_speculative(self, ids: list[int], sampling: SamplingParams, max_new: int,
                            stop: Sequence[str], result: list[Completion] | None,
                            matchers: list, draft: LLM | str, k: int, ngram_size: int,
                            t0: float, adapter_B: np.ndarray | None = None) -> Iterator[str]:
        """`stream` with a draft: one speculative round per host step (split for a
        constrained row), its kept tokens detokenized as they come."""
        dw, dcfg, ddtype = _draft_parts(draft)
        speculative.check_settings(k, ngram_size, self.cfg, dcfg)
        sp = _same_seeds_everywhere([sampling])
        prompt_BT, lens_B, tc, dc, M = speculative.prepare([ids], [max_new], k, self.cfg, dcfg,
                                                           self.kv_dtype, self.mesh, ddtype)
        self.kv_cache_bytes = device_bytes(tc) + (0 if dc is None else device_bytes(dc))
        rows = (None if matchers[0] is None else speculative.RowGrammars(
            matchers, self._grammars, sp, frozenset(int(e) for e in self.eos)))
        lora = self._lora(adapter_B)
        state, scored = speculative.start(
            self.params, dw, prompt_BT, lens_B, tc, dc, SamplingArrays.from_params(sp),
            np.asarray([max_new], np.int32), self.eos, cfg=self.cfg, draft_cfg=dcfg,
            max_out=M, impl=self.impl, logprobs=sampling.logprobs is not None,
            prompt_logprobs=sampling.prompt_logprobs is not None,
            mask_BW=None if rows is None else rows.mask(), lora=lora, adapter_B=adapter_B)
        prompt_lps = _prompt_logprobs(scored, [ids], sp)[0]
        out = TextOutput(self.tokenizer, ids, sampling.stops(stop), sampling.skip_special_tokens,
                         sampling.include_stop_str_in_output)
        toks: list[int] = []
        ttft = 0.0
        while True:
            if rows is not None:
                state = rows.feed(state)
            row, n, done = (x[0] for x in to_host((state.output_BM, state.num_generated_B,
                                                   state.done_B)))
            if not ttft:
                ttft = time.perf_counter() - t0
            for j in range(len(toks), int(n)):
                tok = int(row[j])
                toks.append(tok)
                delta = out.push(tok, sampling.ends(tok, self.eos), bool(done) and j == n - 1)
                if delta:
                    yield delta
                if out.stopped:
                    break
            if done or out.stopped:
                break
            if rows is not None and rows.live:
                state = rows.round(self.params, dw, state, self.cfg, dcfg, k, ngram_size,
                                   self.impl, lora)
            else:
                state = speculative.step(self.params, dw, state, cfg=self.cfg,
                                         draft_cfg=dcfg, k=k, ngram_size=ngram_size,
                                         impl=self.impl, lora=lora)
        if result is not None:
            dt = time.perf_counter() - t0 - ttft
            ends = bool(toks) and sampling.ends(toks[-1], self.eos)
            complete = rows is not None and rows.complete[0]
            reason = "stop" if ends or out.stopped or complete else "length"
            lps = None if sampling.logprobs is None else host_logprobs(
                toks, *(a[0] for a in to_host(state.logprobs_out)), sampling.logprobs)
            rounds, accepted = (int(x[0]) for x in to_host((state.rounds_B, state.accepted_B)))
            result.append(SpeculativeCompletion(
                out.text, toks, len(ids), reason, ttft,
                (len(toks) - 1) / dt if dt > 0 and len(toks) > 1 else 0.0, lps, prompt_lps,
                acceptance_rate=accepted / (k * rounds) if rounds else 0.0,
                num_speculative_tokens=k, verify_passes=rounds))

    @_on_mesh
    def embed(self, prompts: str | Sequence[int] | list, *, pooling: str = "last",
              normalize: bool = True, dimensions: int | None = None,
              adapter: str | Sequence[str | None] | None = None) -> np.ndarray:
        """Embedding vectors of one prompt ([D]) or a batch ([B, D]), float32: the final
        hidden states pooled ("last" token, or "mean" over the prompt; embed.py), cut to
        the first `dimensions` components, then scaled to unit length if `normalize`.
        `adapter`: a loaded LoRA adapter's name (or one per prompt), as in `generate`."""
        if pooling not in embed_mod.POOLINGS:
            raise BadRequestError(f"pooling must be one of {embed_mod.POOLINGS}, got "
                                  f"{pooling!r}", "pooling")
        if dimensions is not None and (isinstance(dimensions, bool) or not isinstance(
                dimensions, int) or not 1 <= dimensions <= self.cfg.d_model):
            raise BadRequestError(f"dimensions must be an integer in [1, {self.cfg.d_model}], "
                                  f"got {dimensions!r}", "dimensions")
        batch, single = _as_batch(prompts)
        batch = [self.encode(p) for p in batch]
        if not batch or any(not p for p in batch):
            raise BadRequestError("no prompts given, or an empty one", "input")
        ids = self._adapter_ids(adapter, len(batch))
        chunks = []
        for i in range(0, len(batch), embed_mod.MAX_BATCH):  # batches padded to buckets
            part = batch[i:i + embed_mod.MAX_BATCH]
            rows = part + [[self.cfg.pad_token_id]] * (gen.bucket(len(part), 1, 1 << 30)
                                                       - len(part))
            lora = {} if ids is None else dict(  # padding rows: no adapter
                lora=self.adapters, adapter_B=np.pad(ids[i:i + len(part)],
                                                     (0, len(rows) - len(part))))
            prompt_BT, lens_B, cache, _ = gen.prepare(rows, [1] * len(rows), self.cfg,
                                                      self.kv_dtype, self.mesh)
            chunks.append(np.asarray(jax.device_get(embed_mod.pooled(
                self.params, prompt_BT, lens_B, cache, cfg=self.cfg, pooling=pooling,
                impl=self.impl, **lora)))[:len(part)])
        v = np.concatenate(chunks)[:, :dimensions]
        if normalize:
            v = v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)
        return v[0] if single else v

    @_on_mesh
    def beam_search(self, prompts: str | Sequence[int] | list, beam_width: int = 4,
                    max_new_tokens: int = 64, *, length_penalty: float = 1.0,
                    early_stopping: bool = False, chat: bool = False,
                    adapter: str | Sequence[str | None] | None = None
                    ) -> beam_search.BeamSearchOutput | list[beam_search.BeamSearchOutput]:
        """The `beam_width` best continuations of each prompt by cumulative log-probability
        (scored / length ** length_penalty), best first, as vLLM's `LLM.beam_search` and
        Hugging Face's `generate(num_beams=...)` find them (the same rules, so the same
        hypotheses on the same weights). One jitted loop on device; the budget and length
        penalty are traced, so new values never recompile. `adapter` as in `generate`."""
        batch, single = _as_batch(prompts)
        batch = [self.encode(p, chat) for p in batch]
        if not batch:
            raise BadRequestError("no prompts given")
        if not isinstance(beam_width, int) or isinstance(beam_width, bool) or not (
                1 <= beam_width <= beam_search.MAX_WIDTH):
            raise BadRequestError(f"beam_width must be an integer in [1, "
                                  f"{beam_search.MAX_WIDTH}], got {beam_width!r}", "beam_width")
        if isinstance(length_penalty, bool) or not isinstance(length_penalty, (int, float)) \
                or not np.isfinite(length_penalty):
            raise BadRequestError(f"length_penalty must be a finite number, got "
                                  f"{length_penalty!r}", "length_penalty")
        ids = self._adapter_ids(adapter, len(batch))
        W = beam_width
        prompt_BT, lens_B, cache, M = gen.prepare([p for p in batch for _ in range(W)],
                                                  [max_new_tokens] * (len(batch) * W),
                                                  self.cfg, self.kv_dtype, self.mesh)
        state = beam_search.search(
            self.params, prompt_BT[::W], lens_B[::W], cache, self.eos,
            np.int32(max_new_tokens), np.float32(length_penalty), cfg=self.cfg, max_out=M,
            early_stopping=bool(early_stopping), impl=self.impl,
            lora=None if ids is None else self.adapters, adapter_B=ids)
        out = beam_search.outputs(state, [len(p) for p in batch], self.tokenizer)
        return out[0] if single else out

    def chat(self, messages: list[dict[str, str]] | list[list[dict[str, str]]], *,
             add_generation_prompt: bool = True, continue_final_message: bool = False,
             chat_template_kwargs: dict[str, Any] | None = None,
             tools: list[dict[str, Any]] | None = None, **kw: Any) -> Completion | list:
        """Reply to a conversation, `[{"role": "user", "content": ...}, ...]`, through the
        model's chat template, or to a list of conversations at once (one batch, a list of
        replies: vLLM's `LLM.chat`); `continue_final_message` continues the last message
        (an assistant reply begun for the model) instead of starting a new turn; `tools`
        (OpenAI function tools) go to the template (`tool_calls.ToolCalling` gives the
        constraint and parser of a tool choice). Other keyword arguments as for
        `generate` (per-row lists too)."""
        batch = (isinstance(messages, Sequence) and not isinstance(messages, str)
                 and len(messages) > 0 and isinstance(messages[0], Sequence)
                 and not isinstance(messages[0], str | dict))
        convs = messages if batch else [messages]
        for conv in convs:
            if (not isinstance(conv, Sequence) or isinstance(conv, str) or not conv
                    or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                               for m in conv)):
                raise BadRequestError("messages must be a non-empty list of {'role': ..., "
                                      f"'content': ...}} dicts (or a list of those), got "
                                      f"{conv!r}", "messages")
        tools = None if tools is None else check_tools(tools)
        prompts = [self.tokenizer.encode(self.tokenizer.apply_chat_template(
            conv, add_generation_prompt=add_generation_prompt and not continue_final_message,
            continue_final_message=continue_final_message,
            chat_template_kwargs=chat_template_kwargs, tools=tools)) for conv in convs]
        return self.generate(prompts if batch else prompts[0], **kw)

def load(checkpoint: str | Path | None = None, *, dtype: Any = None,
         mesh: str | jax.sharding.Mesh | None = None, fsdp: bool = False,
         impl: str | None = None, **kw: Any) -> LLM:
    """Load a model: the library's one entry point.

    Args:
        checkpoint: a jaxinfer (Orbax) checkpoint directory, made by `jaxinfer-convert`
            from a GGUF file or a Hugging Face directory. None: the default model,
            SmolLM2-135M-Instruct, fetched and converted once into ~/.cache/jaxinfer.
        dtype: compute dtype, e.g. "bfloat16". None: float32 on CPU, bfloat16 elsewhere.
        mesh: 'data:2,model:4' or a `jax.sharding.Mesh`; weights are restored straight
            into their shardings. None: one device.
        fsdp: also shard the weights' embed axis over 'data' (large models, small chips).
        impl: attention implementation: "xla" (the reference, everywhere), "xla_chunked",
            "pallas", "cudnn" or "auto" (the fastest kernel for the backend and dtype).
            None: `attention.default_impl()` ("auto" on CPU, "xla" on accelerators).
        **kw: `quantize` ("int8", "int4": quantize float weights on load; a quantized
            checkpoint loads quantized without it), `group_size` (int4 groups) and
            `kv_dtype` ("int8": an int8 KV cache with per-token scales), `lora` (a PEFT
            adapter directory merged on load) and `lora_modules` ({name: directory}:
            adapters kept unmerged, picked per row by `generate(adapter=...)`).

    Returns:
        An `LLM` with `generate`, `stream` and `chat`, and the pure functions `params`,
        `forward` and `init_cache`.

    Raises:
        CheckpointError: the directory is missing or not a jaxinfer checkpoint.
        ConfigError: a bad mesh or dtype.

    Example:
        >>> import jaxinfer
        >>> from jaxinfer.sampling import GREEDY
        >>> llm = jaxinfer.load()
        >>> out = llm.generate("The capital of France is", max_new_tokens=4, sampling=GREEDY)
        >>> "Paris" in out.text, out.finish_reason
        (True, 'length')
        >>> "".join(llm.stream("The capital of France is", max_new_tokens=4,
        ...                    sampling=GREEDY)) == out.text
        True
        >>> reply = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
        ...                  max_new_tokens=24, sampling=GREEDY)
        >>> "Paris" in reply.text
        True

        The same model as pure functions, one step at a time:

        >>> import jax.numpy as jnp
        >>> ids = llm.tokenizer.encode("The capital of France is")
        >>> cache = llm.init_cache(batch=1, max_len=32)
        >>> logits_BTV, cache = llm.forward(llm.params, jnp.array([ids]), cache)
        >>> logits_BTV.shape == (1, len(ids), llm.cfg.vocab_size)
        True
        >>> int(cache.lengths[0]) == len(ids)
        True
        >>> llm.tokenizer.decode([int(logits_BTV[0, -1].argmax())]).strip()
        'Paris'
    """
    return LLM.load(checkpoint, dtype=dtype, mesh=mesh, fsdp=fsdp, impl=impl, **kw)
