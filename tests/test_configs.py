"""Model and run presets: parameter counts against published figures, --config flags."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from absl import flags as absl_flags

from jaxinfer import presets
from jaxinfer.config import ModelConfig
from jaxinfer.engine import EngineConfig
from jaxinfer.errors import ConfigError
from jaxinfer.sharding import parse_mesh
from jaxinfer.weights import abstract_weights, count_params, weight_specs

ROOT = Path(__file__).resolve().parents[1]

# Rounded sizes from each model card (Hugging Face's "Model size"), and where the card's
# safetensors index gives it, the exact total.
PUBLISHED = {
    "smollm2-135m": (134.5e6, 134_515_008),
    "smollm2-360m": (362e6, 361_821_120),
    "smollm2-1.7b": (1.71e9, 1_711_376_384),
    "llama-3.2-1b": (1.24e9, 1_235_814_400),
    "llama-3.2-3b": (3.21e9, 3_212_749_824),
    "llama-3.1-8b": (8.03e9, 8_030_261_248),
    "qwen2.5-0.5b": (494e6, 494_032_768),
    "qwen2.5-1.5b": (1.54e9, 1_543_714_304),
    "mistral-7b-v0.3": (7.25e9, 7_248_023_552),
    "tinyllama-1.1b": (1.1e9, 1_100_048_384),
    "gemma-3-1b": (1.0e9, 999_885_952),
    "gemma-2-2b": (2.61e9, 2_614_341_888),
    "mixtral-8x7b": (46.7e9, 46_702_792_704),
    "qwen3-30b-a3b": (30.5e9, 30_532_122_624),
    "phi-3-mini-4k": (3.82e9, 3_821_079_552),
    # DeepSeek's own totals (their papers and cards: 671B without the 14B multi-token-
    # prediction module, which is not run; V2-Lite 15.7B); no exact figure to hand
    "deepseek-v3": (671e9, None),
    "deepseek-v2-lite": (15.7e9, None),
}


def formula_count(hf: dict) -> int:
    """Parameters of a Llama-family or Gemma decoder, straight from the HF config fields."""
    D, F, L, V = (hf["hidden_size"], hf["intermediate_size"], hf["num_hidden_layers"],
                  hf["vocab_size"])
    N = hf["num_attention_heads"]
    K = hf.get("num_key_value_heads", N)
    H = hf.get("head_dim") or D // N
    attn = D * N * H + 2 * D * K * H + N * H * D
    bias = (N * H + 2 * K * H) if hf["model_type"] == "qwen2" else 0
    norms = {"gemma2": 4 * D, "gemma3_text": 4 * D + 2 * H,
             "qwen3_moe": 2 * D + 2 * H}.get(hf["model_type"], 2 * D)
    E = hf.get("num_local_experts", hf.get("num_experts", hf.get("n_routed_experts", 0)))
    mlp = 3 * D * F
    if E:  # E experts of width moe_intermediate_size (Qwen) or intermediate_size, a router
        mlp = E * 3 * D * hf.get("moe_intermediate_size", F) + D * E
    dense = 0
    if hf.get("kv_lora_rank"):  # DeepSeek: latent attention, shared experts, dense layers
        R, Rq, Hr = hf["kv_lora_rank"], hf["q_lora_rank"], hf["qk_rope_head_dim"]
        Hq, Hv = hf["qk_nope_head_dim"] + Hr, hf["v_head_dim"]
        q = D * Rq + Rq + Rq * N * Hq if Rq else D * N * Hq
        attn = q + D * (R + Hr) + R + R * N * (Hq - Hr + Hv) + N * Hv * D
        Fm = hf["moe_intermediate_size"]
        mlp += 3 * D * Fm * hf["n_shared_experts"] + (E if hf["model_type"] == "deepseek_v3"
                                                      else 0)  # the choice bias
        dense = hf["first_k_dense_replace"]
    per_layer = attn + bias + mlp + norms  # q/k/v/o, gate/up/down, norms
    tied = hf.get("tie_word_embeddings", hf["model_type"].startswith("gemma"))
    head = 0 if tied else D * V
    return (V * D + (L - dense) * per_layer + dense * (per_layer - mlp + 3 * D * F) + D
            + head)


def test_every_model_preset_is_listed():
    assert presets.list_models() == sorted(PUBLISHED)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_parameter_count(name):
    cfg = presets.model_config(name)
    specs = weight_specs(cfg, jnp.bfloat16)
    tree = abstract_weights(specs)  # builds without allocating anything
    n = sum(x.size for x in jax.tree.leaves(tree))
    assert n == count_params(specs)
    hf = presets.model_hf(name)
    assert n == formula_count(hf)
    rounded, exact = PUBLISHED[name]
    assert exact is None or n == exact
    assert abs(n - rounded) / rounded < 0.01, (name, n, rounded)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_round_trips_through_hf(name):
    cfg = presets.model_config(name)
    assert cfg.name == name
    if name.startswith(("gemma", "mixtral", "qwen3-30b", "phi-3", "deepseek")):  # only from
        # checkpoints
        with pytest.raises(ConfigError, match="Llama-family"):
            cfg.to_hf()
        return
    assert ModelConfig.from_hf(cfg.to_hf(), name=name) == cfg
    assert cfg.head_dim * cfg.num_heads >= cfg.d_model // 2


def test_preset_details_that_matter_for_correctness():
    assert presets.model_config("qwen2.5-0.5b").qkv_bias
    assert not presets.model_config("llama-3.1-8b").qkv_bias
    assert presets.model_config("llama-3.1-8b").rope_scaling == (8.0, 1.0, 4.0, 8192)
    assert presets.model_config("llama-3.2-1b").rope_scaling == (32.0, 1.0, 4.0, 8192)
    assert presets.model_config("llama-3.2-1b").tie_embeddings
    assert not presets.model_config("mistral-7b-v0.3").tie_embeddings
    g3 = presets.model_config("gemma-3-1b")
    assert g3.local_L == ((True,) * 5 + (False,)) * 4 + (True, True)
    assert (g3.sliding_window, g3.rope_local_theta, g3.eos_token_ids) == (512, 1e4, (1, 106))
    g2 = presets.model_config("gemma-2-2b")
    assert g2.local_L == (True, False) * 13 and (g2.attn_softcap, g2.final_softcap) == (50, 30)
    v3, lite = presets.model_config("deepseek-v3"), presets.model_config("deepseek-v2-lite")
    assert (v3.dense_layers, v3.router_groups, v3.routed_scale, v3.head_dim) == (3, (8, 4), 2.5,
                                                                                576)
    mscale = 0.1 * math.log(40) + 1  # YaRN's mscale_all_dim = 1, squared into the score scale
    assert v3.query_scale == pytest.approx(192 ** -0.5 * mscale ** 2)
    assert not lite.q_lora_rank and not lite.router_sigmoid and lite.router_groups is None
    # The default model's converted checkpoint must agree with its preset's shapes.
    smol = presets.model_config("smollm2-135m")
    assert (smol.num_layers, smol.d_model, smol.num_heads, smol.num_kv_heads) == (30, 576, 9, 3)


def test_model_config_from_a_path(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(presets.model_hf("tinyllama-1.1b")))
    cfg = presets.model_config(path)
    assert cfg.name == "mine" and cfg.num_layers == 22


def test_unknown_preset_names_the_choices():
    with pytest.raises(ConfigError, match="nope.*smollm2-135m"):
        presets.model_config("nope")
    with pytest.raises(ConfigError, match="nope"):
        presets.run_preset("nope")


@pytest.mark.parametrize("name", presets.list_runs())
def test_run_presets_are_valid(name):
    values = presets.run_preset(name)
    assert set(values) <= presets.RUN_KEYS
    if "mesh" in values:
        parse_mesh(values["mesh"])
    assert values.get("dtype", "float32") in ("float32", "bfloat16")
    engine_keys = {"num_slots", "max_len", "max_queue", "prefix_cache_mb",
                   "min_prompt_bucket", "prefill_token_budget"}
    EngineConfig(**{k: v for k, v in values.items() if k in engine_keys})


def test_run_preset_rejects_unknown_keys(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"num_slotz": 4}')
    with pytest.raises(ConfigError, match="num_slotz"):
        presets.run_preset(path)


def _fresh_flags():
    fv = absl_flags.FlagValues()
    absl_flags.DEFINE_string("mesh", None, "", flag_values=fv)
    absl_flags.DEFINE_integer("num_slots", 8, "", flag_values=fv)
    absl_flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "", flag_values=fv)
    absl_flags.DEFINE_float("distributed_timeout_s", 300.0, "", flag_values=fv)
    return fv


def test_config_values_are_defaults_that_explicit_flags_override():
    from jaxinfer.flags import apply_config

    fv = _fresh_flags()
    fv(["prog", "--num_slots=3"])
    applied = apply_config("tpu-v5e-32-pod", fv)
    assert fv.num_slots == 3  # given on the command line: kept
    assert fv.mesh == "data:4,model:8" and fv.dtype == "bfloat16"
    assert fv.distributed_timeout_s == 600.0
    assert "num_slots" not in applied and "fsdp" not in applied  # no such flag here


def test_config_bad_value_is_a_config_error(tmp_path):
    from jaxinfer.flags import apply_config

    path = tmp_path / "bad.json"
    path.write_text('{"dtype": "float8"}')
    fv = _fresh_flags()
    fv(["prog"])
    with pytest.raises(ConfigError, match="float8"):
        apply_config(str(path), fv)


def test_generate_script_takes_config(smollm2_checkpoint, tmp_path):
    path = tmp_path / "run.json"
    path.write_text('{"max_new_tokens": 3, "temperature": 0, "num_slots": 2}')
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "generate.py"), "--config",
                        str(path), "--prompt", "The capital of France is",
                        "--output_format", "json"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(out["token_ids"]) == 3 and "Paris" in out["text"]


def test_bad_config_name_is_one_error_line():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "generate.py"), "--config",
                        "no-such-preset", "--prompt", "hi"],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error:")
    assert "no-such-preset" in r.stderr


@pytest.mark.parametrize("program", ["serve", "batch"])
def test_every_run_preset_applies_to_the_engine_programs(program):
    argv = ["prog"] + (["--input=x", "--output=y"] if program == "batch" else [])
    code = (f"import jaxinfer.cli.{program}\n"
            "from absl import flags\n"
            "from jaxinfer import presets\n"
            "from jaxinfer.flags import apply_config\n"
            f"flags.FLAGS({argv!r})\n"
            "for name in presets.list_runs():\n"
            "    applied = apply_config(name)\n"
            "    assert applied and flags.FLAGS.num_slots == applied['num_slots'], name\n"
            "print('ok', len(presets.list_runs()))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["ok", str(len(presets.list_runs()))]
