"""Peers on the same GGUF and the same prompt ids: llama.cpp (llama-cpp-python) and
Hugging Face transformers `generate` (PyTorch CPU), each with the same thread count.

Each peer runs in its own subprocess (`python -m jaxinfer.bench.peers SPEC`), so its
threads, memory and imports neither disturb jaxinfer's numbers nor inflate its peak RSS.
A peer that is not installed is reported as skipped with the reason, never an error.
Greedy decoding; EOS never ends a run early, so every peer decodes exactly n tokens.
"""

from __future__ import annotations

import importlib.util
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PEERS = {"llama_cpp": "llama_cpp", "hf": "transformers"}  # peer -> module it needs


def _rates(times: list[float], t0: float, n: int) -> dict[str, Any]:
    gaps = [(b - a) * 1e3 for a, b in zip(times, times[1:], strict=False)]
    return {"ttft_s": times[0] - t0, "decode_tps": (n - 1) / (times[-1] - times[0]),
            "itl_ms": gaps}


def _llama_cpp(spec: dict[str, Any]) -> dict[str, Any]:
    from llama_cpp import Llama

    ids, n, threads = spec["prompt_ids"], spec["max_new_tokens"], spec["threads"]
    t0 = time.perf_counter()
    m = Llama(model_path=spec["gguf"], n_threads=threads, n_threads_batch=threads,
              n_ctx=len(ids) + n + 16, n_batch=512, verbose=False, seed=0)
    load_s = time.perf_counter() - t0

    def once() -> dict[str, Any]:
        m.reset()  # forget the previous run's tokens: no prefix reuse across repeats
        times, t0 = [], time.perf_counter()
        for _ in m.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
            times.append(time.perf_counter())
            if len(times) == n:
                break
        return _rates(times, t0, n)

    once()  # warm up
    runs = [once() for _ in range(spec["repeats"])]
    return {"version": __import__("llama_cpp").__version__, "load_s": load_s,
            "batch1": runs, "batches": {}}


def _hf(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    torch.set_num_threads(spec["threads"])
    ids, n = spec["prompt_ids"], spec["max_new_tokens"]
    gguf = Path(spec["gguf"])
    t0 = time.perf_counter()
    m = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                             dtype=torch.float32).eval()
    load_s = time.perf_counter() - t0

    class Clock(BaseStreamer):
        def __init__(self):
            self.times: list[float] = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    def gen(batch: int, streamer=None):
        x = torch.tensor([ids] * batch)
        with torch.no_grad():
            m.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n,
                       min_new_tokens=n, do_sample=False, streamer=streamer, pad_token_id=0)

    def once() -> dict[str, Any]:
        clock, t0 = Clock(), time.perf_counter()
        gen(1, clock)
        return _rates(clock.times[1:], t0, n)  # the first put() is the prompt itself

    once()  # warm up
    runs = [once() for _ in range(spec["repeats"])]
    batches = {}
    for b in spec["batch_sizes"]:
        if b == 1:
            continue
        t0 = time.perf_counter()
        gen(b)
        batches[str(b)] = {"throughput_tps": b * n / (time.perf_counter() - t0)}
    return {"version": transformers.__version__, "torch": torch.__version__,
            "load_s": load_s, "batch1": runs, "batches": batches}


def run_peer(name: str, spec: dict[str, Any], timeout_s: float = 1800) -> dict[str, Any]:
    """Run one peer in a subprocess; {'skipped': reason} if its package is missing."""
    if importlib.util.find_spec(PEERS[name]) is None:
        extra = "pip install 'jaxinfer[bench]'"
        return {"skipped": f"{PEERS[name]} is not installed ({extra})"}
    try:
        r = subprocess.run([sys.executable, "-m", "jaxinfer.bench.peers", name,
                            json.dumps(spec)], capture_output=True, text=True,
                           timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"skipped": f"timed out after {timeout_s:g} s"}
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or ["?"])[-1]
        return {"skipped": f"failed (exit {r.returncode}): {tail}"}
    out = json.loads(r.stdout.strip().splitlines()[-1])
    b1 = out["batch1"]
    out["summary"] = {k: statistics.median(x[k] for x in b1) for k in ("ttft_s", "decode_tps")}
    itl = sorted(g for x in b1 for g in x["itl_ms"])
    out["summary"]["itl_ms_p50"] = itl[len(itl) // 2] if itl else None
    out["summary"]["itl_ms_p90"] = itl[int(len(itl) * 0.9)] if itl else None
    for x in b1:
        x.pop("itl_ms")
    return out


if __name__ == "__main__":
    fn = {"llama_cpp": _llama_cpp, "hf": _hf}[sys.argv[1]]
    result = fn(json.loads(sys.argv[2]))
    with open("/proc/self/status") as f:  # VmHWM: ru_maxrss would include our parent's
        hwm = [ln for ln in f if ln.startswith("VmHWM:")]
    result["host_peak_rss_bytes"] = (int(hwm[0].split()[1]) * 1024 if hwm else
                                     resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    print(json.dumps(result))
