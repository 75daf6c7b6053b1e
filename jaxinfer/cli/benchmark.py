"""Benchmark jaxinfer against llama.cpp and HF transformers on the same weights and prompt.

    jaxinfer-benchmark --output_json=bench.json --plot=docs/bench_cpu.png
    jaxinfer-benchmark --random_config=llama-3.2-1b --peers= --batch_sizes=1,8
    jaxinfer-benchmark --experiments=dtype,donate,loop,bucket --peers=
    jaxinfer-benchmark --ngram_draft --peers= --batch_sizes=1      # speculative decoding
    jaxinfer-benchmark --draft_checkpoint=/tmp/student --peers= --batch_sizes=1

Peers that are not installed (pip install 'jaxinfer[bench]') are skipped with a note. The
persistent compilation cache is off here by default, so compile counts and seconds are
real; the cold-start children measure the cache explicitly (cold vs warm restart).
"""

import json
import sys
import time

from absl import flags

from jaxinfer import flags as runtime_flags
from jaxinfer.cli import run_program, spec_flags

_CKPT = flags.DEFINE_string("checkpoint", None, "Orbax checkpoint dir, .gguf file or Hugging "
                            "Face model dir (default: SmolLM2).")
_RANDOM = flags.DEFINE_string("random_config", None, "Random weights of a model preset's "
                              "shapes (configs/models, e.g. llama-3.1-8b) or 'tiny'.")
_GGUF = flags.DEFINE_string("gguf", None, "GGUF of the same weights for the peers "
                            "(default: the SmolLM2 GGUF when benchmarking the default model).")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"],
                           "Compute dtype (default: float32 on CPU, bfloat16 elsewhere).")
_IMPL = flags.DEFINE_string("impl", None, "Attention impl: xla, xla_chunked, cudnn, pallas, "
                            "auto (default: the library's, attention.default_impl()).")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 64, "Prompt tokens.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Tokens generated per row.")
_BATCHES = flags.DEFINE_list("batch_sizes", ["1", "8", "32"], "Batch sizes to time.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repeats of each measurement.")
_THREADS = flags.DEFINE_integer("threads", None, "Peer threads (default: all cores).")
_PEERS = flags.DEFINE_list("peers", ["llama_cpp", "hf"], "Peers to run (empty: none).")
_COLD = flags.DEFINE_bool("cold_start", True, "Time cold start and warm restart.")
_ENGINE = flags.DEFINE_bool("engine", False, "Also time the serving engine.")
_EXPERIMENTS = flags.DEFINE_list("experiments", [], "Speed experiments: dtype, quant, "
                                 "donate, loop, bucket, layers, chunked, structured, "
                                 "structured_draft, lora.")
_COPY_MIB = flags.DEFINE_integer("copy_mib", None, "Array size for the copy-bandwidth "
                                 "probe (default: 512 on CPU, 2048 on accelerators).")
_JSON = flags.DEFINE_string("output_json", None, "Write the full result here.")
_MD = flags.DEFINE_string("output_md", None, "Write the Markdown table here (also printed).")
_PLOT = flags.DEFINE_string("plot", None, "Write a tokens/s vs batch size PNG here.")


def main(argv):
    runtime_flags.setup()
    import os

    import jax

    from jaxinfer.bench import report
    from jaxinfer.bench.run import BenchConfig, run
    from jaxinfer.errors import ConfigError

    try:
        batches = tuple(int(b) for b in _BATCHES.value)
    except ValueError:
        raise ConfigError(f"batch_sizes must be integers, got {_BATCHES.value}") from None
    accel = jax.default_backend() != "cpu"
    bc = BenchConfig(
        checkpoint=_CKPT.value, random_config=_RANDOM.value, gguf=_GGUF.value,
        dtype=_DTYPE.value, quantize=runtime_flags.QUANTIZE.value, impl=_IMPL.value,
        prompt_len=_PROMPT_LEN.value, max_new_tokens=_MAX_NEW.value, batch_sizes=batches,
        repeats=_REPEATS.value, threads=_THREADS.value or os.cpu_count() or 1,
        peers=tuple(_PEERS.value), cold_start=_COLD.value, engine=_ENGINE.value,
        experiments=tuple(_EXPERIMENTS.value),
        copy_mib=_COPY_MIB.value or (2048 if accel else 512),
        group_size=runtime_flags.GROUP_SIZE.value, kv_dtype=runtime_flags.KV_CACHE_DTYPE.value,
        draft_checkpoint=spec_flags.DRAFT.value, ngram_draft=spec_flags.NGRAM.value,
        num_speculative_tokens=spec_flags.NUM_SPEC.value, ngram_size=spec_flags.NGRAM_SIZE.value)
    t0 = time.perf_counter()
    res = run(bc, lambda msg: print(f"[{time.perf_counter() - t0:7.1f}s] {msg}",
                                    file=sys.stderr, flush=True))
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump(res, f, indent=1)
    md = report.markdown(res)
    if _MD.value:
        with open(_MD.value, "w") as f:
            f.write(md)
    if _PLOT.value:
        report.plot(res, _PLOT.value)
    print(md)


def run() -> None:
    """The `jaxinfer-benchmark` console entry point."""
    flags.FLAGS.set_default("compilation_cache", False)
    run_program(__name__, main)
