"""Cold start: wall time from launching a fresh Python process to its first streamed token.

The parent clocks from just before spawning; the child (`python -m jaxinfer.bench.cold
SPEC`) imports JAX, loads the model, streams one token and prints when. Run twice over one
fresh persistent-compilation-cache directory, the first run compiles everything (cold) and
the second finds every program on disk (warm restart).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

from jaxinfer.errors import JaxinferError


def _child(spec: dict[str, Any]) -> dict[str, Any]:
    t_main = time.time()
    from jaxinfer import runtime

    if spec["cache_dir"]:
        runtime.enable_compilation_cache(spec["cache_dir"])
    from jaxinfer.bench.measure import FIXED_LENGTH, CompileStats, prompt_ids

    stats = CompileStats().__enter__()
    t_import = time.time()
    if spec["random_config"]:
        from jaxinfer.bench.presets import random_llm

        llm = random_llm(spec["random_config"], spec["dtype"], spec["impl"],
                         quantize=spec["quantize"], group_size=spec.get("group_size"),
                         kv_dtype=spec.get("kv_dtype"))
    else:
        from jaxinfer.llm import LLM

        llm = LLM.load(spec["checkpoint"], dtype=spec["dtype"], impl=spec["impl"],
                       quantize=spec["quantize"], group_size=spec.get("group_size"),
                       kv_dtype=spec.get("kv_dtype"))
    import jax

    jax.block_until_ready(llm.params)
    t_load = time.time()
    ids = prompt_ids(llm, spec["prompt_len"])
    for _ in llm.stream(ids, sampling=FIXED_LENGTH, max_new_tokens=1):
        break
    t_first = time.time()
    return {"t_first": t_first, "import_s": t_import - t_main,
            "load_s": t_load - t_import, "first_token_s": t_first - t_load,
            "compiles": stats.count, "compile_s": stats.seconds,
            "cache_hits": stats.cache_hits}


def run_child(spec: dict[str, Any], timeout_s: float = 900) -> dict[str, Any]:
    """Spawn one child; returns its timings plus `total_s` (spawn to first token)."""
    t0 = time.time()
    try:
        r = subprocess.run([sys.executable, "-m", "jaxinfer.bench.cold", json.dumps(spec)],
                           capture_output=True, text=True, timeout=timeout_s,
                           env=dict(os.environ))
    except subprocess.TimeoutExpired as e:
        raise JaxinferError(f"cold-start child timed out after {timeout_s:g} s") from e
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or ["?"])[-1]
        raise JaxinferError(f"cold-start child failed (exit {r.returncode}): {tail}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["total_s"] = out.pop("t_first") - t0
    return out


def cold_and_warm(spec: dict[str, Any]) -> dict[str, Any] | None:
    """Cold start with an empty persistent cache, then a warm restart over the same one;
    {'error': why} if a child fails (the rest of the benchmark still runs)."""
    with tempfile.TemporaryDirectory(prefix="jaxinfer-bench-xla-") as d:
        try:
            cold = run_child({**spec, "cache_dir": d})
            warm = run_child({**spec, "cache_dir": d})
        except JaxinferError as e:
            return {"error": str(e)}
    return {"cold": cold, "warm_restart": warm}


if __name__ == "__main__":
    print(json.dumps(_child(json.loads(sys.argv[1]))))
