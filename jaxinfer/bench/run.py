"""The whole benchmark as one call: jaxinfer's timings, cold start, speed experiments and
peers, from one process on one machine, into one JSON-able dict."""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxinfer.bench import measure as m
from jaxinfer.bench.presets import preset
from jaxinfer.errors import ConfigError
from jaxinfer.quant import MODES


@dataclasses.dataclass
class BenchConfig:
    checkpoint: str | None = None  # None (and no random_config): the default SmolLM2
    random_config: str | None = None  # a preset name (presets.PRESETS): random weights
    gguf: str | None = None  # peers' weights; default: the SmolLM2 GGUF for the default model
    dtype: str | None = None  # None: float32 on CPU, bfloat16 on accelerators
    quantize: str | None = None  # "int8" / "int4" weights (LLM.load(quantize=...))
    impl: str | None = None  # attention impl (attention.IMPLS); None: the library default
    prompt_len: int = 64
    max_new_tokens: int = 64
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    repeats: int = 3
    threads: int = os.cpu_count() or 1
    peers: tuple[str, ...] = ("llama_cpp", "hf")
    cold_start: bool = True
    engine: bool = False
    experiments: tuple[str, ...] = ()
    copy_mib: int = 512
    group_size: int | None = None  # int4 group size (LLM.load(group_size=...))
    kv_dtype: str | None = None  # "int8": int8 KV cache (LLM.load(kv_dtype=...))
    draft_checkpoint: str | None = None  # speculative decoding with this draft model
    ngram_draft: bool = False  # speculative decoding with prompt lookup
    num_speculative_tokens: int = 4
    ngram_size: int = 3

    def __post_init__(self) -> None:
        from jaxinfer.attention import IMPLS
        from jaxinfer.bench.experiments import EXPERIMENTS
        from jaxinfer.bench.peers import PEERS

        for name in ("prompt_len", "max_new_tokens", "repeats", "threads", "copy_mib"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        if self.max_new_tokens < 2:
            raise ConfigError(f"max_new_tokens must be >= 2 to time decoding, "
                              f"got {self.max_new_tokens}")
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise ConfigError(f"batch_sizes must be positive, got {list(self.batch_sizes)}")
        if self.checkpoint and self.random_config:
            raise ConfigError("give --checkpoint or --random_config, not both")
        if self.random_config:
            preset(self.random_config)
        for name, allowed, what in ((self.peers, PEERS, "peer"),
                                    (self.experiments, EXPERIMENTS, "experiment")):
            bad = [x for x in name if x not in allowed]
            if bad:
                raise ConfigError(f"unknown {what} {bad[0]!r}; expected one of {list(allowed)}")
        if self.quantize not in (None, *MODES):
            raise ConfigError(f"quantize must be one of {list(MODES)}, got {self.quantize!r}")
        if self.draft_checkpoint and self.ngram_draft:
            raise ConfigError("give draft_checkpoint or ngram_draft, not both")
        if self.num_speculative_tokens < 1 or self.ngram_size < 1:
            raise ConfigError("num_speculative_tokens and ngram_size must be >= 1, got "
                              f"{self.num_speculative_tokens} and {self.ngram_size}")
        if self.impl is not None and self.impl not in IMPLS:
            raise ConfigError(f"unknown attention impl {self.impl!r}; expected one of {IMPLS}")


def machine() -> dict[str, Any]:
    """What the figures were measured on (and how busy the machine was)."""
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    commit = os.environ.get("JAXINFER_COMMIT", "")  # for copies of the tree without .git
    try:
        git = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True,
                                        cwd=Path(__file__).parent, timeout=10).stdout.strip()
        if not commit and (commit := git("rev-parse", "--short", "HEAD")):
            commit += "-dirty" if git("status", "--porcelain", "--untracked-files=no") else ""
    except (OSError, subprocess.TimeoutExpired):
        pass
    dev = jax.devices()[0]
    return {"cpu": cpu, "cores": os.cpu_count(), "backend": jax.default_backend(),
            "device": getattr(dev, "device_kind", str(dev)), "jax": jax.__version__,
            "python": platform.python_version(), "commit": commit or None,
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "loadavg_start": os.getloadavg()[0]}


def _load(bc: BenchConfig, dtype: str | None = None, quantize: str | None = None):
    """quantize: None keeps bc.quantize; "" loads float weights."""
    dtype = dtype or bc.dtype
    quantize = bc.quantize if quantize is None else (quantize or None)
    if bc.random_config:
        from jaxinfer.bench.presets import random_llm

        return random_llm(bc.random_config, dtype, bc.impl, quantize=quantize,
                          group_size=bc.group_size, kv_dtype=bc.kv_dtype)
    from jaxinfer.llm import LLM

    return LLM.load(bc.checkpoint, dtype=dtype, impl=bc.impl, quantize=quantize,
                    group_size=bc.group_size, kv_dtype=bc.kv_dtype)


def _percentile(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def jaxinfer_figures(llm, bc: BenchConfig, ids: list[int], progress) -> dict[str, Any]:
    n, out = bc.max_new_tokens, {}
    stats = m.CompileStats()
    with stats:
        progress("warm-up: compiling the streaming and batch paths")
        m.time_stream(llm, ids, n)
        for b in bc.batch_sizes:
            m.time_generate(llm, ids, n, b)
    out["warmup_compiles"] = {"count": stats.count, "seconds": stats.seconds}
    with stats:
        streams = []
        for r in range(bc.repeats):
            progress(f"streaming, batch 1 (repeat {r + 1}/{bc.repeats})")
            streams.append(m.time_stream(llm, ids, n))
        itl = [g for s in streams for g in s["itl_ms"]]
        out["stream"] = {"ttft_s": m.summary([s["ttft_s"] for s in streams]),
                         "decode_tps": m.summary([s["decode_tps"] for s in streams]),
                         "itl_ms_p50": _percentile(itl, 50), "itl_ms_p90": _percentile(itl, 90),
                         "tokens": streams[0]["tokens"], "deltas": streams[0]["deltas"]}
        out["batches"] = {}
        for b in bc.batch_sizes:
            runs = []
            for r in range(bc.repeats):
                progress(f"while-loop generate, batch {b} (repeat {r + 1}/{bc.repeats})")
                runs.append(m.time_generate(llm, ids, n, b))
            out["batches"][str(b)] = {k: m.summary([x[k] for x in runs])
                                      for k in ("ttft_s", "throughput_tps", "decode_tps")}
    out["steady_compiles"] = {"count": stats.count, "seconds": stats.seconds}
    out["memory"] = m.memory()
    return out


def run(bc: BenchConfig, progress: Callable[[str], None]) -> dict[str, Any]:
    res: dict[str, Any] = {"config": dataclasses.asdict(bc)}
    if bc.cold_start:  # first: on a GPU this process would otherwise hold its memory
        from jaxinfer.bench.cold import cold_and_warm

        progress("cold start and warm restart (two fresh processes)")
        res["cold_start"] = cold_and_warm({
            "checkpoint": bc.checkpoint, "random_config": bc.random_config, "dtype": bc.dtype,
            "impl": bc.impl, "quantize": bc.quantize, "prompt_len": bc.prompt_len,
            "group_size": bc.group_size, "kv_dtype": bc.kv_dtype, "cache_dir": None})
    res["machine"] = machine()
    progress(f"loading {bc.random_config or bc.checkpoint or 'SmolLM2-135M-Instruct'}")
    t0 = time.perf_counter()
    llm = _load(bc)
    jax.block_until_ready(llm.params)
    ids = m.prompt_ids(llm, bc.prompt_len)
    res["model"] = {"name": llm.cfg.name, "dtype": str(np.dtype(llm.dtype)),
                    "quantize": bc.quantize, "weight_bytes": m.tree_bytes(llm.params),
                    "params": int(sum(a.size for a in jax.tree.leaves(llm.params))),
                    "load_s": time.perf_counter() - t0, "impl": llm.impl}
    res["jaxinfer"] = j = jaxinfer_figures(llm, bc, ids, progress)
    progress(f"copy bandwidth ({bc.copy_mib} MiB array)")
    bw = m.copy_bandwidth(bc.copy_mib * 2**20)
    res["copy_bandwidth_Bps"] = bw
    ctx = bc.prompt_len + bc.max_new_tokens / 2  # mean attended length during decode
    for b, x in j["batches"].items():
        x["step_bytes"] = m.step_bytes(llm, int(b), ctx)
        x["mbu"] = m.mbu(llm, int(b), x["decode_tps"]["median"], ctx, bw)
    if bc.engine:
        progress(f"engine, {max(bc.batch_sizes)} slots")
        try:
            j["engine"] = m.time_engine(llm, ids, bc.max_new_tokens, max(bc.batch_sizes),
                                        bc.repeats)
        except Exception as e:  # noqa: BLE001  (report it; the other figures stand)
            j["engine"] = {"batch": max(bc.batch_sizes), "error": f"{type(e).__name__}: {e}"}
    if bc.draft_checkpoint or bc.ngram_draft:
        from jaxinfer.bench import speculative

        draft = llm.load_draft("ngram" if bc.ngram_draft else bc.draft_checkpoint)
        res["speculative"] = speculative.run(llm, draft, ids, bc.max_new_tokens,
                                             bc.num_speculative_tokens, bc.ngram_size,
                                             bc.repeats, progress)
        del draft
    if bc.experiments:
        from jaxinfer.bench import experiments

        res["experiments"] = experiments.run(
            llm, list(bc.experiments), ids, min(bc.max_new_tokens, 32),
            min(max(bc.batch_sizes), 8), bc.repeats,
            lambda dtype=None, quantize=None: _load(bc, dtype, quantize), progress)
    del llm
    res["peers"] = run_peers(bc, ids, progress)
    res["ratios"] = ratios(res)
    res["machine"]["loadavg_end"] = os.getloadavg()[0]
    return res


def run_peers(bc: BenchConfig, ids: list[int], progress) -> dict[str, Any]:
    from jaxinfer.bench.peers import run_peer

    gguf = bc.gguf
    if gguf is None and not bc.peers:
        return {}
    if gguf is None and (bc.checkpoint or bc.random_config):
        return {p: {"skipped": "peers need a GGUF of the same weights (--gguf)"}
                for p in bc.peers}
    if gguf is None:
        from jaxinfer import default_model

        gguf = str(default_model.gguf_path())
    spec = {"gguf": gguf, "prompt_ids": ids, "max_new_tokens": bc.max_new_tokens,
            "threads": bc.threads, "batch_sizes": list(bc.batch_sizes), "repeats": bc.repeats}
    out = {}
    for p in bc.peers:
        progress(f"peer {p} ({bc.threads} threads)")
        out[p] = run_peer(p, spec)
    return out


def ratios(res: dict[str, Any]) -> dict[str, Any]:
    """The headline: jaxinfer over each peer, and the goals, met or not."""
    j, peers = res["jaxinfer"], res.get("peers", {})
    b1 = j["batches"].get("1", {}).get("decode_tps", {}).get("median")
    big = max(j["batches"], key=int)
    big_tps = j["batches"][big]["throughput_tps"]["median"]
    out: dict[str, Any] = {"largest_batch": int(big)}

    def peer_b1(name):
        p = peers.get(name, {})
        return p.get("summary", {}).get("decode_tps") if "skipped" not in p else None

    lc, hf = peer_b1("llama_cpp"), peer_b1("hf")
    if b1 and lc:
        out["b1_decode_vs_llama_cpp"] = b1 / lc
    if b1 and hf:
        out["b1_decode_vs_hf"] = b1 / hf
    if lc:
        out["largest_batch_throughput_vs_llama_cpp_b1"] = big_tps / lc
    warm = (res.get("cold_start") or {}).get("warm_restart", {}).get("total_s")
    goals = {}
    if "b1_decode_vs_llama_cpp" in out:
        goals["b1_decode_ge_llama_cpp"] = out["b1_decode_vs_llama_cpp"] >= 1.0
    if "b1_decode_vs_hf" in out:
        goals["b1_decode_ge_3x_hf"] = out["b1_decode_vs_hf"] >= 3.0
    if "largest_batch_throughput_vs_llama_cpp_b1" in out and int(big) >= 32:
        goals["b32_throughput_ge_8x_llama_cpp"] = (
            out["largest_batch_throughput_vs_llama_cpp_b1"] >= 8.0)
    if warm is not None:
        goals["warm_restart_ttft_lt_2s"] = warm < 2.0
    mbu1 = j["batches"].get("1", {}).get("mbu")
    if mbu1 is not None and res["machine"]["backend"] == "gpu":
        goals["gpu_b1_mbu_ge_70pct"] = mbu1 >= 0.7
    out["goals"] = goals
    out["stream_vs_loop_b1"] = (j["stream"]["decode_tps"]["median"] / b1) if b1 else None
    return out
