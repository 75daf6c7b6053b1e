"""Speculative decoding in the benchmark: acceptance rate and speedup over the target alone,
batch 1, greedy, on two workloads, from the same process and the same compiled target.

- `repeat`: the benchmark prompt (a repeated paragraph) and its continuation, which keeps
  repeating it: the case prompt lookup (n-gram drafts) is built for (code edits, RAG, quotes).
- `free`: an open question whose answer the prompt does not contain.

Speedup is wall time of the plain `LLM.generate` over the speculative one for the same
number of new tokens (prefill included in both); `identical` checks that greedy speculative
output equals the target's token for token.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from jaxinfer.bench.measure import FIXED_LENGTH

FREE_PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def workloads(llm, repeat_ids: list[int]) -> dict[str, list[int]]:
    from jaxinfer.bench.presets import IdTokenizer

    out = {"repeat": repeat_ids}
    if not isinstance(llm.tokenizer, IdTokenizer):
        out["free"] = llm.encode(FREE_PROMPT, chat=True)
    return out


def _timed(fn) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def run(llm, draft, repeat_ids: list[int], n: int, k: int, ngram_size: int, repeats: int,
        progress) -> dict[str, Any]:
    """`draft`: an LLM or "ngram". One entry per workload."""
    name = ("ngram" if isinstance(draft, str) else
            f"{draft.cfg.name} ({draft.cfg.num_layers} layers, mlp {draft.cfg.mlp_dim})")
    res: dict[str, Any] = {"draft": name, "num_speculative_tokens": k, "ngram_size": ngram_size,
                           "max_new_tokens": n, "workloads": {}}
    for wl, ids in workloads(llm, repeat_ids).items():
        plain = lambda ids=ids: llm.generate(ids, sampling=FIXED_LENGTH, max_new_tokens=n)
        spec = lambda ids=ids: llm.generate(ids, sampling=FIXED_LENGTH, max_new_tokens=n,
                                            draft=draft, num_speculative_tokens=k,
                                            ngram_size=ngram_size)
        progress(f"speculative ({name}, k={k}), {wl} workload: warm-up")
        ref, got = plain(), spec()  # compiles both
        tp, ts = [], []
        for r in range(repeats):
            progress(f"speculative ({name}, k={k}), {wl} workload (repeat {r + 1}/{repeats})")
            t, ref = _timed(plain)
            tp.append(t)
            t, got = _timed(spec)
            ts.append(t)
        t_plain, t_spec = statistics.median(tp), statistics.median(ts)
        res["workloads"][wl] = {
            "prompt_tokens": len(ids), "new_tokens": len(got.token_ids),
            "acceptance_rate": got.acceptance_rate, "verify_passes": got.verify_passes,
            "plain_tps": len(ref.token_ids) / t_plain, "speculative_tps":
            len(got.token_ids) / t_spec, "speedup": t_plain / t_spec,
            "identical": got.token_ids == ref.token_ids}
    return res


def markdown(s: dict[str, Any]) -> list[str]:
    lines = ["", f"Speculative decoding, draft {s['draft']}, k = {s['num_speculative_tokens']}"
             f" (batch 1, greedy, {s['max_new_tokens']} new tokens, prefill included):", "",
             "| workload | acceptance | target alone tok/s | speculative tok/s | speedup | "
             "same tokens |", "|---|---|---|---|---|---|"]
    for wl, x in s["workloads"].items():
        lines.append(f"| {wl} | {x['acceptance_rate']:.2f} | {x['plain_tps']:.1f} | "
                     f"{x['speculative_tps']:.1f} | {x['speedup']:.2f}x | "
                     f"{'yes' if x['identical'] else 'NO'} |")
    return lines
