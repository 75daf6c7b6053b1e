"""Llama-family variants against Hugging Face transformers (PyTorch, float32, eager
attention): Phi-3, SmolLM3 (NoPE layers), Granite (multipliers), OLMo 2 (norms after each
block, q/k norms across heads), GLM and GLM-4 (interleaved RoPE pairs on half of each
head, fused gate/up; GLM-4's sandwich norms) and the long-context RoPE variants (YaRN,
LongRoPE, partial rotary dims).

transformers writes tiny random checkpoints whose original context (16) is shorter than
the prompts, so every scaled frequency and the attention factor move the logits (each is
switched off once to show it). LongRoPE: a run whose cache is longer than the original
context uses the long factors throughout, which is what transformers computes for a
sequence past it (it recomputes the cache when a sequence crosses); a cache within it
uses the short ones, as transformers does for such sequences.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
tf = pytest.importorskip("transformers")

from jaxinfer import kv_cache, model  # noqa: E402
from jaxinfer.config import ModelConfig  # noqa: E402
from jaxinfer.convert.safetensors import load_hf_dir  # noqa: E402
from jaxinfer.errors import ConfigError  # noqa: E402
from jaxinfer.llm import LLM  # noqa: E402
from jaxinfer.sampling import SamplingParams  # noqa: E402

from .engine_helpers import CharTokenizer  # noqa: E402
from .hf_checkpoints import (  # noqa: E402
    check_each_matters,
    check_engine_greedy,
    check_greedy_generation,
    check_orbax_round_trip,
    check_sharded_equals_one_device,
    hf_logits,
    left_interleaved,
    ours,
    saved_and_loaded,
    sharpened,
    tokens,
)

COMMON = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
              eos_token_id=3, bos_token_id=2, pad_token_id=0)
ORIG = 16  # the "pretraining" context the scalings extend 4x
GRANITE = dict(embedding_multiplier=6.0, residual_multiplier=0.25, attention_multiplier=2.0,
               logits_scaling=2.0, tie_word_embeddings=True)
KINDS = ("phi3", "phi3_longrope", "qwen3_yarn", "llama_yarn", "smollm3", "granite", "olmo2",
         "granitemoe", "glm", "glm4", "ministral3", "ministral", "exaone4", "ernie4_5")


def _longrope_factors(seed: int, n: int = 4) -> list[float]:
    """n divisors in [1, 4] (head_dim 16, half rotated: four frequencies)."""
    return (1.0 + 3.0 * np.random.default_rng(seed).random(n)).round(3).tolist()


SHORT, LONG = _longrope_factors(1), _longrope_factors(2)


def _hf_model(kind: str, heads: int = 4, nope_every: int = 2):
    """heads=2 (head_dim 32) for GGUF blocks, which must not straddle heads; SmolLM3
    without RoPE in every `nope_every`-th layer."""
    torch.manual_seed(0)
    common = {**COMMON, "num_attention_heads": heads, "num_key_value_heads": heads // 2}
    if kind.startswith("phi3"):
        rope = {"rope_type": "default", "rope_theta": 10_000.0, "partial_rotary_factor": 0.5}
        if kind == "phi3_longrope":
            n = 16 // heads  # rotated frequencies: head_dim / 4
            rope.update(rope_type="longrope", short_factor=_longrope_factors(1, n),
                        long_factor=_longrope_factors(2, n))
        m = tf.Phi3ForCausalLM(tf.Phi3Config(
            **common, original_max_position_embeddings=ORIG, rope_parameters=rope,
            sliding_window=10))
    elif kind == "qwen3_yarn":
        rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIG,
                "rope_theta": 10_000.0}
        m = tf.Qwen3ForCausalLM(tf.Qwen3Config(**common, head_dim=64 // heads,
                                               rope_parameters=rope))
    elif kind == "smollm3":  # the released model: every 4th layer
        m = tf.SmolLM3ForCausalLM(tf.SmolLM3Config(**{**common, "num_hidden_layers": 8},
                                                   no_rope_layer_interval=nope_every))
    elif kind == "olmo2":
        m = tf.Olmo2ForCausalLM(tf.Olmo2Config(**common))
    elif kind == "ministral3":  # YaRN and the query temperature past 16 positions
        rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIG,
                "rope_theta": 10_000.0, "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0,
                "mscale_all_dim": 1.0, "llama_4_scaling_beta": 0.5}
        m = tf.Ministral3ForCausalLM(tf.Ministral3Config(**common, head_dim=64 // heads,
                                                         rope_parameters=rope))
    elif kind == "ministral":  # Ministral 8B: windows on some layers (layer_types)
        m = tf.MinistralForCausalLM(tf.MinistralConfig(
            **common, head_dim=64 // heads, sliding_window=6,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"]))
    elif kind.startswith("exaone4"):  # windows on 3 of 4 layers, the 4th global, no RoPE
        layers = 64 if kind == "exaone4_64" else 4  # (llama.cpp's GGUF rule for the 32B)
        window = None if kind == "exaone4_dense" else 6  # 1.2B: global layers only
        m = tf.Exaone4ForCausalLM(tf.Exaone4Config(
            **{**common, "num_hidden_layers": layers}, head_dim=64 // heads,
            sliding_window=window, sliding_window_pattern=4,
            **({} if window else {"layer_types": ["full_attention"] * layers})))
    elif kind == "glm":  # GLM-4-9B-chat-hf; half of each head rotated, interleaved
        m = tf.GlmForCausalLM(tf.GlmConfig(**common, head_dim=64 // heads))
    elif kind == "glm4":  # GLM-4-0414: Gemma 2's sandwich norms too
        m = tf.Glm4ForCausalLM(tf.Glm4Config(**common, head_dim=64 // heads))
    elif kind == "ernie4_5":  # ERNIE 4.5 (0.3B): all of each head rotated, in interleaved pairs
        m = tf.Ernie4_5ForCausalLM(tf.Ernie4_5Config(**common, head_dim=64 // heads,
                                                     tie_word_embeddings=True))
    elif kind == "granite":
        m = tf.GraniteForCausalLM(tf.GraniteConfig(**common, **GRANITE))
    elif kind == "granitemoe":  # 4 experts of width 32, 2 per token
        m = tf.GraniteMoeForCausalLM(tf.GraniteMoeConfig(
            **{**common, "intermediate_size": 32}, num_local_experts=4, num_experts_per_tok=2,
            **GRANITE))
    else:  # DeepSeek-style mscale pair, betas and no truncation
        rope = {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": ORIG,
                "rope_theta": 500.0, "beta_fast": 16, "beta_slow": 2, "mscale": 1.0,
                "mscale_all_dim": 0.5, "truncate": False}
        m = tf.LlamaForCausalLM(tf.LlamaConfig(**common, head_dim=64 // heads,
                                               rope_parameters=rope))
    return sharpened(m, norm=0.3, matrix=0.15)  # positions and experts matter


@pytest.fixture(scope="module", params=KINDS)
def variant(request, tmp_path_factory):
    """(kind, HF model, our config, our weights) from a directory transformers wrote."""
    return saved_and_loaded(request.param, _hf_model(request.param), tmp_path_factory)


def test_config_read_from_checkpoint(variant):
    kind, _, cfg, w = variant
    if kind.startswith("phi3"):
        assert cfg.rope_dim == 8 and cfg.sliding_window == 10 and not cfg.tie_embeddings
    if kind == "phi3":
        assert cfg.rope_longrope is None and cfg.rope_attention_factor == 1.0
    if kind == "phi3_longrope":
        assert cfg.rope_longrope == (tuple(SHORT), tuple(LONG), ORIG)
        assert cfg.rope_attention_factor == pytest.approx(np.sqrt(1 + np.log(4) / np.log(ORIG)))
    if kind == "qwen3_yarn":
        assert cfg.rope_yarn == (4.0, ORIG, 32.0, 1.0, True)
        assert cfg.rope_attention_factor == pytest.approx(0.1 * np.log(4) + 1)
    if kind == "smollm3":
        assert cfg.nope_layers == (False, True) * 4 and cfg.tie_embeddings
    if kind == "olmo2":
        assert not cfg.pre_norms and cfg.post_norms and cfg.qk_norm and cfg.qk_norm_full
        assert "attn_norm" not in w["layers"] and w["layers"]["q_norm"].shape == (3, 4, 16)
    if kind == "granitemoe":
        assert (cfg.num_experts, cfg.experts_per_token, cfg.mlp_dim, cfg.norm_topk) == (
            4, 2, 32, True)
    if kind.startswith("granite"):
        assert (cfg.embedding_multiplier, cfg.residual_multiplier, cfg.query_scale,
                cfg.logits_scaling) == (6.0, 0.25, 2.0, 2.0)
    if kind == "exaone4":
        assert not cfg.pre_norms and cfg.post_norms and cfg.qk_norm and cfg.sliding_window == 6
        assert cfg.local_layers == (True, True, True, False)
        assert cfg.nope_layers == (False, False, False, True)
    if kind == "ministral":
        assert cfg.sliding_window == 6 and cfg.local_layers == (True, False, True)
    if kind == "ministral3":
        assert cfg.attn_temperature == (0.5, ORIG) and cfg.rope_yarn == (4.0, ORIG, 32, 1, True)
        assert cfg.rope_attention_factor == 1.0
    if kind == "ernie4_5":
        assert cfg.rope_interleaved and cfg.rope_dim is None and not cfg.qkv_bias
        assert cfg.tie_embeddings
    if kind.startswith("glm"):
        assert cfg.rope_interleaved and cfg.rope_dim == 8 and cfg.qkv_bias
        assert cfg.post_norms == (kind == "glm4") and "w_gate" in w["layers"]
    if kind == "llama_yarn":
        assert cfg.rope_yarn == (8.0, ORIG, 16.0, 2.0, False)
        assert cfg.rope_attention_factor == pytest.approx(
            (0.1 * np.log(8) + 1) / (0.05 * np.log(8) + 1))


def test_logits_match_transformers(variant):
    """All positions of a 40-token prompt (past the original context of 16), then prefill
    + one-token decode steps through the cache (reference and Pallas-kernel attention)."""
    kind, m, cfg, w = variant
    toks = tokens(40)
    ref = hf_logits(m, toks)
    np.testing.assert_allclose(ours(cfg, w, toks), ref, atol=1e-4, rtol=0)
    T = toks.shape[1]
    for impl in ("xla", "pallas_interpret"):
        cache = kv_cache.init_cache(cfg, 2, 64)
        _, cache = model.forward(w, jnp.asarray(toks[:, :T - 6]), cache, cfg)
        for t in range(T - 6, T):
            lg, cache = model.decode_step(w, jnp.asarray(toks[:, t]), cache, cfg, impl=impl)
            np.testing.assert_allclose(np.asarray(lg), ref[:, t], atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def longrope(tmp_path_factory):
    return saved_and_loaded("longrope", _hf_model("phi3_longrope"), tmp_path_factory)


def test_longrope_takes_its_factors_from_the_context(longrope):
    """A cache within the original context (16) rotates with the short factors: each
    step's logits equal transformers' incremental generation up to position 15; a longer
    cache rotates with the long ones, equal to transformers from position 16 on, where it
    has recomputed the cache with them."""
    _, m, cfg, w = longrope
    toks = tokens(12, batch=2, seed=3)
    with torch.no_grad():
        out = m.generate(torch.tensor(toks), max_new_tokens=20, do_sample=False,
                         min_new_tokens=20, output_logits=True, return_dict_in_generate=True)
    seq, ref = out.sequences.numpy(), np.stack([lg.numpy() for lg in out.logits], 1)
    for S, steps in ((ORIG, slice(0, 5)), (64, slice(5, 20))):
        cache = kv_cache.init_cache(cfg, 2, S)
        lg, cache = model.forward(w, jnp.asarray(toks), cache, cfg)
        got = [np.asarray(lg)[:, -1]]
        for t in range(12, 12 + steps.stop - 1):
            lg, cache = model.decode_step(w, jnp.asarray(seq[:, t]), cache, cfg)
            got.append(np.asarray(lg))
        np.testing.assert_allclose(np.stack(got, 1)[:, steps], ref[:, steps], atol=1e-4,
                                   rtol=0)
        assert np.abs(np.stack(got, 1)[:, :5] - ref[:, :5]).max() > 1e-2 or S == ORIG


_OFF = {"phi3": [dict(rope_dim=None), dict(sliding_window=None)],
        "phi3_longrope": [dict(rope_longrope=None), dict(rope_attention_factor=1.0),
                          dict(rope_longrope=(LONG, SHORT, ORIG))],  # swapped
        "qwen3_yarn": [dict(rope_yarn=None), dict(rope_attention_factor=1.0)],
        "llama_yarn": [dict(rope_yarn=None), dict(rope_attention_factor=1.0)],
        "smollm3": [dict(nope_layers=())],
        "olmo2": [dict(qk_norm=False, qk_norm_full=False)],
        "granite": [dict(embedding_multiplier=1.0), dict(residual_multiplier=1.0),
                    dict(query_scale=None), dict(logits_scaling=1.0)],
        "granitemoe": [dict(residual_multiplier=1.0), dict(experts_per_token=1)],
        "ministral3": [dict(attn_temperature=None), dict(rope_yarn=None)],
        "ministral": [dict(sliding_window=None), dict(local_layers=())],  # (): every layer
        "exaone4": [dict(nope_layers=()), dict(sliding_window=None), dict(qk_norm=False)],
        "glm": [dict(rope_dim=None)],
        "glm4": [dict(rope_dim=None), dict(post_norms=False)],
        "ernie4_5": []}  # its one difference, the interleaved pairs: below


def test_every_difference_matters(variant):
    kind, m, cfg, w = variant
    offs = list(_OFF[kind])
    if cfg.rope_interleaved:  # GLM's q/k rows as the checkpoint pairs them
        offs.append(({}, lambda w: left_interleaved(w, cfg.rope_dim)))
    check_each_matters(m, cfg, w, offs, tokens(40))


def test_greedy_generation_matches_transformers(variant):
    """transformers' greedy tokens from a 20-token prompt (past the original context), 30
    new ones, through LLM.generate."""
    _, m, cfg, w = variant
    check_greedy_generation(m, cfg, w)


@pytest.mark.slow
def test_engine_matches_transformers(variant):
    """The same through the engine: chunked prefill, then the prefix cache."""
    _, m, cfg, w = variant
    check_engine_greedy(m, cfg, w)


def test_checkpoint_round_trip_keeps_the_rope_config(variant, tmp_path):
    _, m, cfg, w = variant
    check_orbax_round_trip(m, cfg, w, tokens(20), tmp_path)


def test_sharded_equals_one_device(variant):
    _, _, cfg, w = variant
    check_sharded_equals_one_device(cfg, w)


@pytest.mark.parametrize("kind", ["phi3_longrope", "qwen3_yarn", "smollm3", "granite",
                                  "olmo2", "granitemoe", "glm4", "ministral3",
                                  "exaone4_dense", "exaone4_64"])
@pytest.mark.parametrize("quantized", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_gguf_matches_transformers(tmp_path, kind, quantized):
    """A GGUF as llama.cpp's converter writes it (Phi-3: fused attn_qkv and ffn_up, the
    LongRoPE factors as rope_factors_short/long tensors, the rotary dims, window and
    attention factor as metadata; YaRN as rope.scaling keys; SmolLM3: Q/K permuted, NoPE
    every fourth layer as llama.cpp fixes it; Granite: its four scales as metadata; OLMo 2:
    post_attention_norm / post_ffw_norm, [N*H] q/k norms; GLM-4: interleaved pairs kept,
    fused ffn_up, sandwich norms), Q8_0
    matrices read dequantized or as QArrays (the fused ones split by rows), against
    transformers on the same (Q8_0-exact) weights."""
    import gguf

    from jaxinfer.convert.gguf import load_gguf

    from .test_convert import _roundtrip, _write_gguf

    q8 = gguf.GGMLQuantizationType.Q8_0
    m = _hf_model(kind, heads=2, nope_every=4)
    sd = _roundtrip({k: v.numpy().copy() for k, v in m.state_dict().items()}, q8)
    m.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})
    if m.config.tie_word_embeddings:  # llama.cpp writes no output.weight then
        sd.pop("lm_head.weight", None)
    for key in [k for k in sd if k.endswith("block_sparse_moe.experts.gate_up_proj")]:
        layer = key.removesuffix("block_sparse_moe.experts.gate_up_proj")  # as llama.cpp
        gate_up, F = sd.pop(key), m.config.intermediate_size  # splits Granite's experts
        moe = layer + "block_sparse_moe."
        sd[layer + "mlp.gate_exps.weight"] = gate_up[:, :F]
        sd[layer + "mlp.up_exps.weight"] = gate_up[:, F:]
        sd[layer + "mlp.down_exps.weight"] = sd.pop(moe + "experts.down_proj")
        sd[layer + "mlp.gate.weight"] = sd.pop(moe + "router.weight")
    hf_cfg = ModelConfig.from_hf(m.config.to_dict())
    arch = kind.split("_")[0]  # exaone4_dense, exaone4_64: the 1.2B's and 32B's layouts
    extra = {}

    def meta(w):
        if arch == "phi3":
            w.add_rope_dimension_count(hf_cfg.rope_dim)
            w.add_sliding_window(10)
            w.add_rope_scaling_orig_ctx_len(ORIG)
            w.add_rope_scaling_attn_factors(hf_cfg.rope_attention_factor)
        elif arch.startswith("granite"):
            if arch == "granitemoe":
                w.add_expert_count(4)
                w.add_expert_used_count(2)
                w.add_expert_feed_forward_length(32)
            w.add_embedding_scale(6.0)
            w.add_residual_scale(0.25)
            w.add_attention_scale(2.0)
            w.add_logit_scale(2.0)
        elif arch == "glm4":
            w.add_rope_dimension_count(hf_cfg.rope_dim)
        elif arch == "exaone4" and m.config.num_hidden_layers == 64:
            w.add_sliding_window(6)
        elif arch == "ministral3":
            w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(4.0)
            w.add_rope_scaling_orig_ctx_len(ORIG)
            w.add_attn_temperature_scale(0.5)
            w.add_rope_scaling_yarn_log_mul(0.1)  # 0.1 * mscale_all_dim, as llama.cpp
        elif arch == "qwen3":
            w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(4.0)
            w.add_rope_scaling_orig_ctx_len(ORIG)

    if arch == "phi3":
        short, long, _ = hf_cfg.rope_longrope
        extra = {"rope_factors_short.weight": np.asarray(short, np.float32),
                 "rope_factors_long.weight": np.asarray(long, np.float32)}
    _write_gguf(tmp_path / "g.gguf", hf_cfg, sd, {"ministral3": "mistral3"}.get(arch, arch), q8,
                extra=extra, meta=meta)
    cfg, w = load_gguf(tmp_path / "g.gguf", quantized=quantized)
    for f in ("rope_dim", "rope_interleaved", "rope_yarn", "attn_temperature",
              "sliding_window", "nope_layers",
              "embedding_multiplier",
              "residual_multiplier", "query_scale", "logits_scaling", "tie_embeddings",
              "pre_norms", "post_norms", "qk_norm_full", "num_experts", "experts_per_token",
              "mlp_dim"):
        assert getattr(cfg, f) == getattr(hf_cfg, f), f
    assert cfg.rope_attention_factor == pytest.approx(hf_cfg.rope_attention_factor)
    if arch == "phi3":  # the factors as float32 tensors
        assert cfg.rope_longrope[2] == ORIG
        np.testing.assert_allclose(cfg.rope_longrope[:2], hf_cfg.rope_longrope[:2], rtol=1e-7)
    toks = tokens(40)
    got = ours(cfg, jax.tree.map(jnp.asarray, w), toks)
    np.testing.assert_allclose(got, hf_logits(m, toks), atol=1e-4, rtol=0)


def test_phi3_lora_on_its_fused_projections_matches_peft(tmp_path):
    """A PEFT adapter on Phi-3's fused qkv_proj and gate_up_proj (and o/down): merged, the
    logits equal PEFT's unmerged forward within 1e-4; served unmerged per row
    (`add_adapters`), the greedy tokens equal PEFT's."""
    peft = pytest.importorskip("peft")
    from jaxinfer.convert.lora import merge_lora, read_lora

    base = _hf_model("phi3")
    base.save_pretrained(tmp_path / "hf")
    cfg, w = load_hf_dir(tmp_path / "hf")
    torch.manual_seed(1)
    pm = peft.get_peft_model(base, peft.LoraConfig(
        r=4, lora_alpha=8, init_lora_weights=False,
        target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    pm.save_pretrained(tmp_path / "adapter")
    toks = tokens(20)
    with torch.no_grad():
        ref = pm(torch.tensor(toks)).logits.numpy()
        greedy = pm.generate(torch.tensor(toks), max_new_tokens=8, do_sample=False,
                             min_new_tokens=8)[:, 20:].numpy()
    adapter = read_lora(tmp_path / "adapter", cfg)
    assert set(adapter) == {"wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"}
    merged = jax.tree.map(jnp.asarray, merge_lora(w, adapter))
    np.testing.assert_allclose(ours(cfg, merged, toks), ref, atol=1e-4, rtol=0)
    assert np.abs(ours(cfg, jax.tree.map(jnp.asarray, w), toks) - ref).max() > 1e-2
    llm = LLM(cfg, jax.tree.map(jnp.asarray, w), CharTokenizer())
    llm.add_adapters({"a": tmp_path / "adapter"})
    got = llm.generate([list(map(int, t)) for t in toks],
                       SamplingParams(temperature=0, min_tokens=8), max_new_tokens=8,
                       adapter="a")
    assert [c.token_ids for c in got] == greedy.tolist()


def test_multimodal_mistral3_checkpoint_loads_its_language_model(tmp_path):
    """Mistral Small 3.1 and later ship as Mistral3ForConditionalGeneration: the text config
    nests, the decoder's tensors carry a prefix and the vision tower is left out; text-only
    logits equal the HF model's."""
    torch.manual_seed(0)
    text = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, head_dim=16,
                  num_attention_heads=2, image_size=28, patch_size=14)
    m = tf.Mistral3ForConditionalGeneration(tf.Mistral3Config(text_config=text,
                                                              vision_config=vision)).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "language_model" in name and p.ndim == 2:
                p.copy_(0.15 * torch.randn_like(p))
    m.config.text_config._attn_implementation = "eager"
    m.save_pretrained(tmp_path)
    cfg, w = load_hf_dir(tmp_path)
    assert (cfg.num_layers, cfg.name) == (2, "Mistral3ForConditionalGeneration")
    toks = tokens(16)
    with torch.no_grad():
        ref = m(input_ids=torch.tensor(toks)).logits.numpy()
    np.testing.assert_allclose(ours(cfg, jax.tree.map(jnp.asarray, w), toks), ref,
                               atol=1e-4, rtol=0)


# ---- config parsing ------------------------------------------------------------------------
def test_older_config_keys_read_the_same():
    """Hub configs written before transformers 5: `rope_scaling` with "type" (Phi-3's
    "su"), `original_max_position_embeddings` and `partial_rotary_factor` at top level."""
    base = dict(COMMON, model_type="phi3", max_position_embeddings=64)
    new = ModelConfig.from_hf({**base, "rope_parameters": {
        "rope_type": "longrope", "rope_theta": 10_000.0, "partial_rotary_factor": 0.5,
        "short_factor": [1.0] * 4, "long_factor": [2.0] * 4,
        "original_max_position_embeddings": ORIG}})
    old = ModelConfig.from_hf({**base, "rope_theta": 10_000.0, "partial_rotary_factor": 0.5,
                               "original_max_position_embeddings": ORIG, "rope_scaling": {
                                   "type": "su", "short_factor": [1.0] * 4,
                                   "long_factor": [2.0] * 4}})
    assert old == new and new.rope_longrope == ((1.0,) * 4, (2.0,) * 4, ORIG)
    yarn = ModelConfig.from_hf({**COMMON, "model_type": "qwen2", "rope_scaling": {
        "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}})
    assert yarn.rope_yarn == (4.0, 32768, 32.0, 1.0, True)
    assert yarn.rope_attention_factor == pytest.approx(1.1386294)
    with pytest.raises(ConfigError, match="'dynamic'"):
        ModelConfig.from_hf({**COMMON, "rope_scaling": {"type": "dynamic", "factor": 2.0}})
    with pytest.raises(ConfigError, match="rope_longrope needs 4 short and long factors"):
        new.replace(rope_longrope=((1.0,) * 3, (2.0,) * 4, ORIG))
    with pytest.raises(ConfigError, match="rope_dim must be an even integer"):
        new.replace(rope_dim=7)
