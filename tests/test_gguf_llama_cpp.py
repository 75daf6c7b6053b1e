"""GGUF files written by llama.cpp's own converter (convert_hf_to_gguf.py from the
llama-cpp-python source distribution), loaded by jaxinfer, against transformers on the
checkpoint they were converted from, as float32 and as Q8_0 files.

The other GGUF tests write files the way our tests believe llama.cpp does; these take the
layout, names, permutations and metadata from llama.cpp's code itself, for every GGUF
architecture we read. Each tiny random checkpoint is one llama.cpp can represent: where
llama.cpp fixes a hyperparameter rather than storing it (Gemma 2/3's query scale and local
RoPE base, gpt-oss's SwiGLU clamp, Qwen3-MoE's renormalised top-k, EXAONE 4's windows on
its 64-layer model only, StarCoder2 without windows, Phi-2 without grouped queries and
with an MLP 4 D wide, DeepSeek's equal YaRN mscale pair) the checkpoint takes llama.cpp's
value, as the released models do. config.json gains the keys the converter reads and
transformers 5 no longer writes (`rotary_pct`; `scoring_func` and `norm_topk_prob` of
DeepSeek V3 and GLM-4.7-Flash), as released checkpoints carry them, and GLM-4-9B's
`layernorm_epsilon` (without it the converter writes 1e-5 where the model has 1.5625e-7;
we follow the file, as llama.cpp does). Not here: Ministral
8B (`MinistralForCausalLM`), Phi-3.5-MoE and StableLM 2 with per-head q/k norms, which
this converter does not convert.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
tf = pytest.importorskip("transformers")

from jaxinfer.convert.gguf import load_gguf  # noqa: E402
from jaxinfer.errors import ConversionError  # noqa: E402

from . import test_deepseek as ds  # noqa: E402
from . import test_gemma as ge  # noqa: E402
from . import test_gpt_oss as go  # noqa: E402
from . import test_layernorm_families as ln  # noqa: E402
from . import test_llama4 as l4  # noqa: E402
from . import test_llama_variants as lv  # noqa: E402
from . import test_moe as mo  # noqa: E402
from .hf_checkpoints import hf_logits, ours, sharpened, tokens  # noqa: E402

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent


def _llama(**rope):
    torch.manual_seed(0)
    common = {**lv.COMMON, "num_attention_heads": 2, "num_key_value_heads": 1}
    return sharpened(tf.LlamaForCausalLM(tf.LlamaConfig(**common, rope_parameters={
        "rope_theta": 500.0, **rope})), norm=0.3, matrix=0.15)


def _qwen2():
    torch.manual_seed(0)
    common = {**lv.COMMON, "num_attention_heads": 2, "num_key_value_heads": 1}
    return sharpened(tf.Qwen2ForCausalLM(tf.Qwen2Config(**common)), norm=0.3, matrix=0.15,
                     bias=0.1)


def _qwen3_moe():  # llama.cpp renormalises Qwen3-MoE's top-k weights, as the releases ask
    torch.manual_seed(0)
    m = tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(
        intermediate_size=96, moe_intermediate_size=64, num_experts=6, norm_topk_prob=True,
        **mo.COMMON))
    return sharpened(m, norm=1.0, matrix=0.15, bias=1.0)


def _llama4(**changes):
    """Llama 4 as llama.cpp fixes it: chunks of 8192, NoPE every fourth layer, query
    temperature 0.1 per 8192 positions, q/k L2 norms unless 128 experts (Maverick);
    Llama 3 RoPE scaling (llama.cpp's rope_freqs tensor)."""
    torch.manual_seed(0)
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
            "rope_theta": 500_000.0}
    config = {**l4.TEXT, "num_hidden_layers": 8, "attention_chunk_size": 8192,
              "floor_scale": 8192, "attn_scale": 0.1, "rope_parameters": rope, **changes}
    return sharpened(tf.Llama4ForCausalLM(tf.Llama4TextConfig(**config)), norm=0.3,
                     matrix=0.15)


V3_ROPE = {**ds.MODELS["deepseek_v3"][2]["rope_parameters"], "mscale": 0.8}
# name -> (the checkpoint, keys config.json gains for the converter)
MODELS = {
    "llama_yarn": (lambda: _llama(rope_type="yarn", factor=4.0,
                                  original_max_position_embeddings=lv.ORIG), {}),
    "qwen2": (_qwen2, {}),
    "qwen3_yarn": (lambda: lv._hf_model("qwen3_yarn", heads=2), {}),
    "phi3": (lambda: lv._hf_model("phi3", heads=2), {}),
    "phi3_longrope": (lambda: lv._hf_model("phi3_longrope", heads=2), {}),
    "smollm3": (lambda: lv._hf_model("smollm3", heads=2, nope_every=4), {}),
    "granite": (lambda: lv._hf_model("granite", heads=2), {}),
    "granitemoe": (lambda: lv._hf_model("granitemoe", heads=2), {}),
    "olmo2": (lambda: lv._hf_model("olmo2", heads=2), {}),
    "glm": (lambda: lv._hf_model("glm", heads=2), {"layernorm_epsilon": 1.5625e-07}),
    "glm4": (lambda: lv._hf_model("glm4", heads=2), {}),
    "ernie4_5": (lambda: lv._hf_model("ernie4_5", heads=2), {}),
    "ministral3": (lambda: lv._hf_model("ministral3", heads=2), {}),
    "exaone4_dense": (lambda: lv._hf_model("exaone4_dense", heads=2), {}),
    "exaone4_64": (lambda: lv._hf_model("exaone4_64", heads=2), {}),
    "gemma": (lambda: ge._hf_model("gemma"), {}),
    "gemma2": (lambda: ge._hf_model("gemma2", qpas=16), {}),
    "gemma3": (lambda: ge._hf_model("gemma3", qpas=16, local_theta=10_000.0), {}),
    "mixtral": (lambda: mo._hf_model("mixtral"), {}),
    "qwen2_moe": (lambda: mo._hf_model("qwen2_moe"), {}),
    "qwen3_moe": (_qwen3_moe, {}),
    "olmoe": (lambda: mo._hf_model("olmoe"), {}),
    "minimax_m2": (lambda: mo._hf_model("minimax_m2"), {"scoring_func": "sigmoid"}),
    "cohere": (lambda: ln._hf_model("cohere", heads=2), {}),
    "cohere2": (lambda: ln._hf_model("cohere2", heads=2), {"rotary_pct": 1.0}),
    "stablelm": (lambda: ln._hf_model("stablelm", heads=2), {}),
    "starcoder2": (lambda: ln._hf_model("starcoder2", heads=2, sliding_window=None), {}),
    "phi": (lambda: ln._hf_model("phi", heads=2, num_key_value_heads=2, intermediate_size=256),
            {}),
    "gpt_neox": (lambda: ln._hf_model("gpt_neox", heads=2), {"rotary_pct": 0.25}),
    "gpt_neox_sequential": (lambda: ln._hf_model("gpt_neox_sequential", heads=2),
                            {"rotary_pct": 0.25}),
    "deepseek_v2": (lambda: ds._hf_model("deepseek_v2"), {}),
    "deepseek_v3": (lambda: ds._hf_model("deepseek_v3", rope_parameters=V3_ROPE),
                    {"scoring_func": "sigmoid", "topk_method": "noaux_tc"}),
    "glm4_moe": (lambda: ds._hf_model("glm4_moe"), {}),
    "glm4_moe_lite": (lambda: ds._hf_model("glm4_moe_lite", first_k_dense_replace=1,
                                           mlp_layer_types=["dense"] + ["sparse"] * 3),
                      {"scoring_func": "sigmoid", "norm_topk_prob": True}),
    "gpt_oss": (lambda: go._hf_model(swiglu_limit=7.0), {}),  # llama.cpp's fixed clamp
    "llama4_scout": (_llama4, {}),
    "llama4_maverick": (lambda: _llama4(num_local_experts=128, interleave_moe_layer_step=2,
                                        use_qk_norm=False), {}),
}
# Converted by llama.cpp, refused by us with an error naming what is not supported.
REFUSED = {"llama4_no_chunks": (lambda: _llama4(layer_types=["full_attention"] * 8),
                                "without chunked attention")}


@pytest.fixture(scope="module")
def converted(tmp_path_factory, llama_cpp_converter):
    """(name, outtype) -> (the HF model, the GGUF llama.cpp wrote, its converter's log
    line): every checkpoint converted to float32 and to Q8_0 in one run of the converter."""
    tmp = tmp_path_factory.mktemp("llama_cpp")
    models, jobs = {}, []
    for name, (build, legacy) in {**MODELS, **{k: (b, {}) for k, (b, _) in REFUSED.items()}
                                  }.items():
        for t in OUTTYPES:
            m = build() if t == "f32" else _q8_0_exact(build())
            src = tmp / f"{name}.{t}"
            m.save_pretrained(src)
            config = json.loads((src / "config.json").read_text())
            (src / "config.json").write_text(json.dumps({**config, **legacy}))
            V = m.config.vocab_size  # Gemma 3's converter trims the embedding to its tokenizer
            (src / "tokenizer.json").write_text(json.dumps(
                {"model": {"vocab": {f"<t{i}>": i for i in range(V)}}, "added_tokens": []}))
            models[name, t] = m
            jobs.append(f"{src}={src}.gguf={t}")
    r = subprocess.run([sys.executable, str(HERE / "llama_cpp_convert.py"),
                        str(llama_cpp_converter), *jobs],
                       capture_output=True, text=True, timeout=900)
    log = {line.split()[1].rstrip(":"): line for line in r.stdout.splitlines()
           if line.startswith(("converted ", "failed "))}
    return {(name, t): (m, tmp / f"{name}.{t}.gguf",
                        log.get(str(tmp / f"{name}.{t}.gguf"), r.stderr[-3000:]))
            for (name, t), m in models.items()}


OUTTYPES = ("f32", "q8_0")


def _q8_0_exact(m):
    """`m` with every matrix rounded to the values llama.cpp's Q8_0 file holds: Q8_0
    blocks of 32 along its input dimension (gpt-oss and Llama 4 store experts [E, in, out]), or
    float16 where rows are not whole blocks (the converter's fallback; DeepSeek's k_b and
    v_b here)."""
    import gguf

    q8 = gguf.GGMLQuantizationType.Q8_0
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.ndim < 2:
                continue
            x = p.detach().numpy().astype(np.float32)
            flip = m.config.model_type in ("gpt_oss", "llama4_text") and ".experts." in name
            x = np.swapaxes(x, -1, -2) if flip else x
            if x.shape[-1] % 32 == 0:
                x = gguf.quants.dequantize(gguf.quants.quantize(x, q8), q8).reshape(x.shape)
            else:
                x = x.astype(np.float16).astype(np.float32)
            p.copy_(torch.from_numpy(np.ascontiguousarray(np.swapaxes(x, -1, -2) if flip
                                                          else x)))
    return m


@pytest.mark.parametrize("name", list(MODELS))
def test_llama_cpp_gguf_matches_transformers(converted, name):
    """float32: the logits of transformers within 1e-4."""
    m, path, log = converted[name, "f32"]
    assert log.startswith("converted"), log
    cfg, w = load_gguf(path)
    toks = tokens(40)
    got = ours(cfg, jax.tree.map(jnp.asarray, w), toks)
    np.testing.assert_allclose(got, hf_logits(m, toks), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", list(MODELS))
def test_llama_cpp_q8_0_gguf(converted, name):
    """Q8_0 (llama.cpp's converter quantizes the matrices) of Q8_0-exact weights: read
    dequantized, and kept as QArrays where the loader keeps blocks (not across heads of
    16, nor DeepSeek's / GLM-4.5's, which it refuses by name), within 1e-4 of
    transformers."""
    m, path, log = converted[name, "q8_0"]
    assert log.startswith("converted"), log
    toks = tokens(40)
    ref = hf_logits(m, toks)
    for quantized in (False, True):
        try:
            cfg, w = load_gguf(path, quantized=quantized)
        except ConversionError as e:
            assert quantized and re.search("straddle heads|--quantize", str(e)), e
            continue
        got = ours(cfg, jax.tree.map(jnp.asarray, w), toks)
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0, err_msg=f"{quantized=}")


@pytest.mark.parametrize("name", list(REFUSED))
def test_unsupported_llama_cpp_architecture_is_named(converted, name):
    _, path, log = converted[name, "f32"]
    assert log.startswith("converted"), log
    with pytest.raises(ConversionError, match=REFUSED[name][1]):
        load_gguf(path)
