"""scripts/benchmark.py on a tiny random model: every field is there and sane; bad flags
give one error line. Peers are skipped (no GGUF of random weights), with the reason."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args, timeout=600):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark.py"), *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.slow
def test_tiny_benchmark_writes_every_field(tmp_path):
    plot = importlib.util.find_spec("matplotlib") is not None
    r = run("--random_config=tiny", "--prompt_len=8", "--max_new_tokens=4",
            "--batch_sizes=1,2", "--repeats=1", "--copy_mib=4", "--experiments=loop,lora,moe",
            "--ngram_draft", "--num_speculative_tokens=3",
            f"--output_json={tmp_path / 'b.json'}", f"--output_md={tmp_path / 'b.md'}",
            *([f"--plot={tmp_path / 'b.png'}"] if plot else []))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "b.json").read_text())
    assert {"config", "machine", "model", "jaxinfer", "copy_bandwidth_Bps", "cold_start",
            "peers", "ratios", "experiments"} <= set(res)
    assert res["machine"]["cores"] >= 1 and res["machine"]["backend"] == "cpu"
    j = res["jaxinfer"]
    assert j["stream"]["tokens"] == 4 and j["stream"]["ttft_s"]["median"] > 0
    assert 0 < j["stream"]["itl_ms_p50"] <= j["stream"]["itl_ms_p90"]
    assert set(j["batches"]) == {"1", "2"}
    for x in j["batches"].values():
        assert x["decode_tps"]["median"] > 0 and x["throughput_tps"]["median"] > 0
        assert 0 < x["mbu"] <= 1.5
    assert j["warmup_compiles"]["count"] > 0 and j["warmup_compiles"]["seconds"] > 0
    assert j["steady_compiles"]["count"] == 0  # nothing recompiles once warm
    assert j["memory"]["host_peak_rss_bytes"] > j["memory"]["live_array_bytes"] > 0
    cold, warm = res["cold_start"]["cold"], res["cold_start"]["warm_restart"]
    assert cold["total_s"] > cold["first_token_s"] > 0 and warm["total_s"] > 0
    assert cold["cache_hits"] < cold["compiles"] and warm["cache_hits"] > 0
    assert all("skipped" in p for p in res["peers"].values())
    assert res["experiments"]["loop"]["1"]["while_loop"] > 0
    assert all(v > 0 for v in res["experiments"]["lora"]["2"].values())
    moe = res["experiments"]["moe"]
    assert moe["experts"] == 8 and all(moe[m]["max_abs_diff"] < 1e-3 for m in ("1", "8", "256"))
    assert all(moe["8"][k] > 0 for k in ("chosen", "all", "gathered", "ragged_dot"))
    spec = res["speculative"]
    assert spec["draft"] == "ngram" and spec["num_speculative_tokens"] == 3
    rep = spec["workloads"]["repeat"]  # random ids: no `free` prose workload
    assert rep["identical"] and 0 <= rep["acceptance_rate"] <= 1 and rep["speedup"] > 0
    assert rep["new_tokens"] == 4 and rep["plain_tps"] > 0 and rep["speculative_tps"] > 0
    md = (tmp_path / "b.md").read_text()
    assert "batch-1 decode tok/s" in md and "skipped" in md and md in r.stdout
    assert "Speculative decoding, draft ngram" in md
    if plot:
        assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args,needle", [
    (["--batch_sizes=1,0"], "batch_sizes"),
    (["--batch_sizes=x"], "batch_sizes"),
    (["--random_config=no-such-model"], "no-such-model"),
    (["--random_config=tiny", "--peers=vllm"], "vllm"),
    (["--random_config=tiny", "--max_new_tokens=1"], "max_new_tokens"),
    (["--random_config=tiny", "--ngram_draft", "--draft_checkpoint=/x"], "draft_checkpoint"),
])
def test_bad_flags_one_error_line(args, needle):
    r = run(*args, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in r.stderr


def test_step_bytes_counts_weights_and_attended_kv():
    """Independent count from the config: tied models read the embedding as the head,
    untied ones only gather B rows of it (ignored)."""
    import jax

    from jaxinfer.bench.measure import mbu, step_bytes
    from jaxinfer.bench.presets import TINY, random_llm

    llm = random_llm("tiny", "float32")
    c = TINY
    layer = (2 * c.d_model + c.d_model * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
             + c.num_heads * c.head_dim * c.d_model + 3 * c.d_model * c.mlp_dim)
    expect = 4 * (c.num_layers * layer + c.d_model + c.vocab_size * c.d_model)  # + lm_head
    b = step_bytes(llm, batch=3, context=10.0)
    assert b["weights"] == expect
    assert b["kv"] == 2 * c.num_layers * 3 * c.num_kv_heads * 10 * c.head_dim * 4
    # One step per 1/tps seconds moving exactly the copy bandwidth's bytes is MBU 1.
    tps = 3 * 1e9 / (b["weights"] + b["kv"])
    assert mbu(llm, 3, tps, 10.0, 1e9) == pytest.approx(1.0)
    assert jax.tree.leaves(llm.params)[0].dtype == jnp.float32


@pytest.mark.parametrize("gemma", [False, True])
def test_unrolled_layers_experiment_equals_the_scanned_model(gemma):
    """The `layers` experiment times model.decode_logits with the scan unrolled; it must
    compute the same logits (it mirrors model.hidden_states by hand)."""
    import jax

    from jaxinfer import kv_cache, model
    from jaxinfer.bench.experiments import _unrolled_logits

    from .helpers import TINY, tiny_weights

    cfg = TINY.replace(activation="gelu_tanh", norm_plus_one=True, scale_embeddings=True,
                       post_norms=True, sliding_window=2, local_layers=(True, False, True),
                       rope_local_theta=100.0) if gemma else TINY
    w = tiny_weights(cfg)
    cache = kv_cache.init_cache(cfg, 2, 16)
    _, cache = model.forward(w, jnp.asarray([[5, 6, 7, 8], [9, 10, 11, 12]]), cache, cfg)
    toks = jnp.asarray([13, 14])
    want, _ = model.decode_step(w, toks, jax.tree.map(jnp.copy, cache), cfg)
    got, _ = _unrolled_logits(w, toks, cache, cfg, "xla")
    assert float(jnp.abs(got - want).max()) < 1e-5


def test_step_bytes_reads_only_the_chosen_experts():
    """A mixture of experts reads at most B * C of its E experts per decode step."""
    from types import SimpleNamespace

    import jax

    from jaxinfer.bench.measure import step_bytes, tree_bytes
    from jaxinfer.weights import init_weights, weight_specs

    from .helpers import TINY

    cfg = TINY.replace(num_experts=8, experts_per_token=2, tie_embeddings=True)
    params = init_weights(weight_specs(cfg), jax.random.key(0))
    llm = SimpleNamespace(cfg=cfg, params=params, dtype=jnp.float32)
    experts = tree_bytes({k: v for k, v in params["layers"].items() if k.startswith("moe_")})
    total = tree_bytes(params)
    assert step_bytes(llm, 1, 0.0)["weights"] == pytest.approx(total - experts * 6 / 8)
    assert step_bytes(llm, 3, 0.0)["weights"] == pytest.approx(total - experts * 2 / 8)
    assert step_bytes(llm, 4, 0.0)["weights"] == pytest.approx(total)


def test_config_takes_every_quantization_mode():
    """Every mode `--quantize` offers is a benchmark setting (fp8 was refused after the
    shared flag offered it); anything else is refused by name."""
    from jaxinfer.bench.run import BenchConfig
    from jaxinfer.errors import ConfigError
    from jaxinfer.quant import MODES

    for mode in MODES:
        assert BenchConfig(quantize=mode).quantize == mode
    with pytest.raises(ConfigError, match="int3"):
        BenchConfig(quantize="int3")
