"""Gemma 1/2/3 against Hugging Face transformers (PyTorch, float32, eager attention).

No Gemma checkpoint is reachable here, so transformers itself writes tiny random ones, with
settings chosen so every Gemma difference moves the logits far beyond the tolerance (each
is switched off once to show it): sliding windows shorter than the prompts, soft caps that
bind, norm weights far from 0, a query scale that is not head_dim's, and Gemma 3's local
RoPE base and linear scaling of its global layers.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
tf = pytest.importorskip("transformers")

from jaxinfer import kv_cache, model  # noqa: E402
from jaxinfer.attention import chunked_decode_attention, ref_attention  # noqa: E402
from jaxinfer.config import ModelConfig  # noqa: E402
from jaxinfer.convert.safetensors import load_hf_dir  # noqa: E402
from jaxinfer.engine import Engine, EngineConfig  # noqa: E402
from jaxinfer.errors import ConfigError  # noqa: E402
from jaxinfer.llm import LLM  # noqa: E402
from jaxinfer.sampling import SamplingParams  # noqa: E402

from .engine_helpers import CharTokenizer  # noqa: E402
from .hf_checkpoints import (  # noqa: E402
    check_each_matters,
    check_orbax_round_trip,
    ours,
    saved_and_loaded,
    sharpened,
)
from .hf_checkpoints import hf_logits as _hf_logits  # noqa: E402
from .hf_checkpoints import tokens as _tokens  # noqa: E402

COMMON = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
              eos_token_id=3, bos_token_id=2, pad_token_id=0)
KINDS = ("gemma", "gemma2", "gemma3")


def _hf_model(kind: str, local_theta: float = 100.0, qpas: int = 24, head_dim: int = 16):
    torch.manual_seed(0)
    common = {**COMMON, "head_dim": head_dim}
    if kind == "gemma":
        m = tf.GemmaForCausalLM(tf.GemmaConfig(num_hidden_layers=3, **common))
    elif kind == "gemma2":
        m = tf.Gemma2ForCausalLM(tf.Gemma2Config(
            num_hidden_layers=4, sliding_window=6, query_pre_attn_scalar=qpas,
            attn_logit_softcapping=2.0, final_logit_softcapping=3.0, **common))
    else:
        rope = {"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": local_theta}}
        m = tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(
            num_hidden_layers=7, sliding_window=6, query_pre_attn_scalar=qpas,
            rope_parameters=rope, **common))
    return sharpened(m, norm=0.4, matrix=0.12)  # attention, caps, positions matter


@pytest.fixture(scope="module", params=KINDS)
def gemma(request, tmp_path_factory):
    """(kind, HF model, our config, our weights) from a directory transformers wrote."""
    return saved_and_loaded(request.param, _hf_model(request.param), tmp_path_factory)


def test_config_read_from_checkpoint(gemma):
    kind, _, cfg, w = gemma
    assert cfg.norm_plus_one and cfg.scale_embeddings and cfg.activation == "gelu_tanh"
    assert cfg.tie_embeddings and "lm_head" not in w
    if kind == "gemma":
        assert not cfg.post_norms and cfg.sliding_window is None and cfg.query_scale is None
    if kind == "gemma2":
        assert cfg.local_layers == (True, False, True, False)
        assert (cfg.attn_softcap, cfg.final_softcap) == (2.0, 3.0)
    if kind == "gemma3":
        assert cfg.qk_norm and cfg.local_layers == (True,) * 5 + (False, True)
        assert (cfg.rope_theta, cfg.rope_local_theta, cfg.rope_linear_factor) == (1e6, 100.0, 4.0)
    if kind != "gemma":
        assert cfg.post_norms and cfg.sliding_window == 6 and cfg.query_scale == 24 ** -0.5


def test_logits_match_transformers(gemma):
    """All positions of a 40-token prompt (windows of 6), then prefill + one-token decode
    steps through the cache (reference, chunked and Pallas-kernel decode attention)."""
    _, m, cfg, w = gemma
    toks = _tokens(40)
    ref = _hf_logits(m, toks)
    assert np.abs(ref).max() > 2.0  # logits large enough for the caps to bind
    np.testing.assert_allclose(ours(cfg, w, toks), ref, atol=1e-4, rtol=0)
    for impl, S in (("xla", 64), ("xla_chunked", 512), ("pallas_interpret", 64)):
        cache = kv_cache.init_cache(cfg, 2, S)
        _, cache = model.forward(w, jnp.asarray(toks[:, :25]), cache, cfg)
        for t in range(25, 40):
            lg, cache = model.decode_step(w, jnp.asarray(toks[:, t]), cache, cfg, impl=impl)
            np.testing.assert_allclose(np.asarray(lg), ref[:, t], atol=1e-4, rtol=0)


# Each Gemma switch, off: the logits must move far beyond the 1e-4 above.
_OFF = {"gemma": [dict(norm_plus_one=False), dict(scale_embeddings=False),
                  dict(activation="silu")],
        "gemma2": [dict(sliding_window=None), dict(attn_softcap=None), dict(final_softcap=None),
                   dict(query_scale=None)],
        "gemma3": [dict(sliding_window=None), dict(rope_local_theta=None),
                   dict(rope_linear_factor=1.0), dict(query_scale=None)]}


def test_every_gemma_difference_matters(gemma):
    kind, m, cfg, w = gemma
    check_each_matters(m, cfg, w, _OFF[kind], _tokens(40))


@pytest.mark.slow
def test_greedy_generation_matches_transformers(gemma):
    """LLM.generate and the engine (chunked prefill of 8-token chunks, so prompt chunks
    cross the window; then the same prompts again from the prefix cache) produce
    transformers' greedy tokens."""
    _, m, cfg, w = gemma
    toks = _tokens(30, batch=2, seed=1)
    with torch.no_grad():
        ref = m.generate(torch.tensor(toks), max_new_tokens=16, do_sample=False,
                         min_new_tokens=16)[:, 30:].numpy()
    llm = LLM(cfg, w, CharTokenizer())
    sp = SamplingParams(temperature=0, ignore_eos=True)
    got = llm.generate([list(map(int, t)) for t in toks], sp, max_new_tokens=16)
    assert [c.token_ids for c in got] == ref.tolist()
    eng = Engine(w, cfg, CharTokenizer(), EngineConfig(
        num_slots=2, max_len=128, prefix_block=8, prefill_token_budget=8, min_prompt_bucket=8))
    try:
        for _ in range(2):
            outs = eng.generate([list(map(int, t)) for t in toks], sampling=sp, max_tokens=16)
            assert [o.token_ids for o in outs] == ref.tolist()
    finally:
        eng.close()


@pytest.mark.slow
def test_speculative_and_int8_paths(gemma):
    """Prompt-lookup speculative decoding keeps transformers' greedy tokens (the verify pass
    runs windows over drafted positions); an int8 KV cache and int8 weights stay close."""
    _, m, cfg, w = gemma
    toks = np.tile(_tokens(10, batch=1, seed=2), (1, 3))  # repeats for the n-gram draft
    with torch.no_grad():
        ref = m.generate(torch.tensor(toks), max_new_tokens=12, do_sample=False,
                         min_new_tokens=12)[0, 30:].tolist()
    sp = SamplingParams(temperature=0, ignore_eos=True)
    ids = list(map(int, toks[0]))
    spec = LLM(cfg, w, CharTokenizer()).generate(ids, sp, max_new_tokens=12, draft="ngram")
    assert spec.token_ids == ref and spec.acceptance_rate > 0
    from jaxinfer.quant import QuantConfig
    from jaxinfer.weights import quantize_weights

    for llm in (LLM(cfg, w, CharTokenizer(), kv_dtype="int8"),
                LLM(cfg, quantize_weights(w, QuantConfig.from_mode("int8")), CharTokenizer())):
        assert llm.generate(ids, sp, max_new_tokens=1).token_ids == ref[:1]


def test_checkpoint_round_trip_keeps_gemma_config(gemma, tmp_path):
    _, m, cfg, w = gemma
    check_orbax_round_trip(m, cfg, w, _tokens(12), tmp_path)


def test_sharded_gemma3_equals_one_device(tmp_path):
    _hf_model("gemma3").save_pretrained(tmp_path)
    cfg, w = load_hf_dir(tmp_path)
    w = jax.tree.map(jnp.asarray, w)
    from jaxinfer.sharding import make_mesh
    from jaxinfer.weights import weight_shardings, weight_specs

    mesh = make_mesh("data:2,model:2")
    sh = weight_shardings(weight_specs(cfg), mesh)
    ws = jax.tree.map(jax.device_put, w, sh)
    assert ws["layers"]["post_mlp_norm"].sharding.spec == sh["layers"]["post_mlp_norm"].spec
    toks = _tokens(20, batch=4)
    np.testing.assert_allclose(ours(cfg, ws, toks), ours(cfg, w, toks), atol=1e-5, rtol=0)


def test_multimodal_gemma3_checkpoint_loads_its_language_model(tmp_path):
    """Gemma 3 4B and up ship as Gemma3ForConditionalGeneration: the text config nests and
    the decoder's tensors carry a prefix; text-only logits equal the HF model's."""
    torch.manual_seed(0)
    text = dict(num_hidden_layers=2, sliding_window=6, query_pre_attn_scalar=16, **COMMON)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, image_size=28, patch_size=14)
    m = tf.Gemma3ForConditionalGeneration(tf.Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=4)).eval()
    m.config.text_config._attn_implementation = "eager"
    m.save_pretrained(tmp_path)
    cfg, w = load_hf_dir(tmp_path)
    assert cfg.num_layers == 2 and cfg.local_layers == (True, True)
    toks = _tokens(16)
    with torch.no_grad():
        ref = m(input_ids=torch.tensor(toks)).logits.numpy()
    np.testing.assert_allclose(ours(cfg, jax.tree.map(jnp.asarray, w), toks), ref,
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("quantized", [False, True])
def test_gguf_matches_transformers(tmp_path, kind, quantized):
    """A Gemma GGUF as llama.cpp's converter writes it (norms stored + 1, Q/K unpermuted,
    Gemma 3's local RoPE base and window pattern implied, not stored), Q8_0 matrices read
    dequantized or as QArrays, against transformers on the same (Q8_0-exact) weights."""
    import gguf

    from jaxinfer.convert.gguf import load_gguf

    from .test_convert import _roundtrip, _write_gguf

    q8 = gguf.GGMLQuantizationType.Q8_0
    # head_dim 32: ggml blocks must not straddle heads; the rest is what llama.cpp assumes
    m = _hf_model(kind, local_theta=10_000.0, qpas=32, head_dim=32)
    sd = _roundtrip({k: v.numpy().copy() for k, v in m.state_dict().items()}, q8)
    sd.pop("lm_head.weight", None)
    m.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=False)
    hf_cfg = ModelConfig.from_hf(m.config.to_dict())

    def meta(w):
        if kind != "gemma":
            w.add_sliding_window(6)
        if kind == "gemma2":
            w.add_attn_logit_softcapping(2.0)
            w.add_final_logit_softcapping(3.0)
        if kind == "gemma3":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(4.0)

    _write_gguf(tmp_path / "g.gguf", hf_cfg, sd, kind, q8, meta=meta)
    cfg, w = load_gguf(tmp_path / "g.gguf", quantized=quantized)
    assert not cfg.norm_plus_one and cfg.scale_embeddings and cfg.activation == "gelu_tanh"
    assert (cfg.local_L, cfg.attn_softcap, cfg.final_softcap, cfg.rope_linear_factor) == (
        hf_cfg.local_L, hf_cfg.attn_softcap, hf_cfg.final_softcap, hf_cfg.rope_linear_factor)
    toks = _tokens(40)
    got = ours(cfg, jax.tree.map(jnp.asarray, w), toks)
    np.testing.assert_allclose(got, _hf_logits(m, toks), atol=1e-4, rtol=0)


# ---- config parsing ------------------------------------------------------------------------
def test_gemma3_older_config_keys_read_the_same():
    """Hub configs written by transformers 4 (rope_local_base_freq, rope_scaling,
    sliding_window_pattern, no layer_types) give the same config as transformers 5's."""
    new = tf.Gemma3TextConfig(num_hidden_layers=8, sliding_window=512, **COMMON, rope_parameters={
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}).to_dict()
    old = {k: v for k, v in new.items() if k not in ("rope_parameters", "layer_types")}
    old.update(rope_theta=1e6, rope_local_base_freq=1e4, sliding_window_pattern=6,
               rope_scaling={"rope_type": "linear", "factor": 8.0})
    a, b = ModelConfig.from_hf(new), ModelConfig.from_hf(old)
    assert a == b and a.local_layers == (True,) * 5 + (False, True, True)
    nested = {"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"],
              "text_config": {"hidden_size": 2560, "intermediate_size": 10240,
                              "num_hidden_layers": 34, "sliding_window": 1024,
                              "rope_scaling": {"rope_type": "linear", "factor": 8.0}}}
    c = ModelConfig.from_hf(nested)  # gemma-3-4b's text config lists only what differs
    assert (c.d_model, c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size) == (
        2560, 8, 4, 256, 262208)
    assert c.rope_linear_factor == 8.0 and c.rope_local_theta == 1e4 and sum(c.local_L) == 29


def test_other_sliding_windows():
    base = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
            "num_attention_heads": 4, "vocab_size": 97}
    assert ModelConfig.from_hf({**base, "model_type": "mistral",
                                "sliding_window": 4096}).local_L == (True, True)
    qwen = ModelConfig.from_hf({**base, "model_type": "qwen2", "sliding_window": 4096,
                                "use_sliding_window": False})
    assert qwen.sliding_window is None
    with pytest.raises(ConfigError, match="qwen2"):
        ModelConfig.from_hf({**base, "model_type": "qwen2", "use_sliding_window": True,
                             "sliding_window": 4096})
    with pytest.raises(ConfigError, match="relu2"):  # (gelu_new: Phi-2's tanh GELU)
        ModelConfig.from_hf({**base, "model_type": "llama", "hidden_act": "relu2"})
    with pytest.raises(ConfigError, match="local_layers"):
        ModelConfig.from_hf({**base, "model_type": "llama"}).replace(
            sliding_window=8, local_layers=(True,))
    cfg = ModelConfig.from_hf({**base, "model_type": "gemma2", "sliding_window": 8})
    assert json.loads(json.dumps(cfg.to_dict())) == cfg.to_dict()
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="Llama-family"):
        cfg.to_hf()


@pytest.mark.parametrize("softcap", [None, 2.0])
def test_chunked_window_attention_equals_reference(softcap):
    """The chunked decode loop skips chunks before every row's window; same result as the
    masked reference (rows at different depths, local and global windows)."""
    rng = np.random.default_rng(0)
    B, N, K, S, H = 3, 4, 2, 1024, 16
    q = jnp.asarray(rng.normal(size=(B, 1, N, H)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(B, K, S, H)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(B, K, S, H)), jnp.float32)
    pos = jnp.asarray([[900], [700], [1000]], jnp.int32)
    for window in (jnp.int32(300), jnp.int32(2**30)):
        ref = ref_attention(q, k, v, pos, window, softcap)
        got = chunked_decode_attention(q, k, v, pos, window=window, softcap=softcap)
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5, rtol=0)
    full = ref_attention(q, k, v, pos, None, softcap)
    assert np.abs(np.asarray(ref_attention(q, k, v, pos, jnp.int32(300), softcap))
                  - np.asarray(full)).max() > 1e-2
