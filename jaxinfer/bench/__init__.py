"""Benchmarks: jaxinfer against the peers a user would pick instead (llama.cpp, HF).

    python scripts/benchmark.py --output_json=bench.json --plot=docs/bench_cpu.png

Modules: presets (random-weight model shapes), measure (jaxinfer timings, MBU),
cold (process start to first token, in a subprocess), peers (llama.cpp and transformers,
each in its own subprocess), experiments (the speed-work comparisons), report (Markdown,
plot), run (the whole benchmark as one call). Nothing here is imported by the library.
"""
