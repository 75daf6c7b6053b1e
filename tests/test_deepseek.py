"""DeepSeek V3, DeepSeek V2 (Lite's layout) and GLM-4.5 against Hugging Face transformers
(PyTorch, float32, eager attention), on tiny random checkpoints transformers writes.

V3: latent attention (queries through a normed low-rank bottleneck, one shared latent +
RoPE key per token in the cache, RoPE pairs interleaved in the checkpoint), YaRN with
DeepSeek's mscale pair (the score scale too), sigmoid routing within the best two of four
expert groups (ranked by their best two experts) with a choice-only bias, routed weights
times 2.5, a shared expert, and a leading dense layer of its own width. V2: the same
attention without the query bottleneck, softmax routing within groups ranked by their best
expert, no renormalisation. GLM-4.7-Flash: V3's attention and routing, ungrouped, its
dense layers named by `mlp_layer_types`. GLM-4.5: V3's routing on plain grouped-query
attention with partial rotary, q/k norms and biases.
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
tf = pytest.importorskip("transformers")

from jaxinfer import kv_cache, model  # noqa: E402
from jaxinfer.config import ModelConfig  # noqa: E402
from jaxinfer.errors import ConfigError, ConversionError  # noqa: E402

from .hf_checkpoints import (  # noqa: E402
    check_decode_logits,
    check_each_matters,
    check_engine_greedy,
    check_expert_parallel,
    check_expert_paths_agree,
    check_greedy_generation,
    check_orbax_round_trip,
    check_sharded_equals_one_device,
    saved_and_loaded,
    sharpened,
    tokens,
    without_layer_weights,
)

ORIG = 16
COMMON = dict(vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
              num_hidden_layers=4, num_attention_heads=4, n_routed_experts=8,
              num_experts_per_tok=2, first_k_dense_replace=1, max_position_embeddings=64,
              eos_token_id=3, bos_token_id=2, pad_token_id=0)
LATENT = dict(num_key_value_heads=4, kv_lora_rank=16, qk_rope_head_dim=8,
              qk_nope_head_dim=12, v_head_dim=10)
MODELS = {
    "deepseek_v3": (tf.DeepseekV3ForCausalLM, tf.DeepseekV3Config, dict(
        **COMMON, **LATENT, q_lora_rank=24, n_group=4, topk_group=2, n_shared_experts=1,
        routed_scaling_factor=2.5,
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "mscale": 1.0,
                         "mscale_all_dim": 0.8, "rope_theta": 10_000.0, "beta_fast": 32.0,
                         "beta_slow": 1.0, "original_max_position_embeddings": ORIG})),
    "deepseek_v2": (tf.DeepseekV2ForCausalLM, tf.DeepseekV2Config, dict(
        **COMMON, **LATENT, q_lora_rank=None, n_group=4, topk_group=2, n_shared_experts=2,
        topk_method="group_limited_greedy", routed_scaling_factor=1.5)),
    "glm4_moe_lite": (tf.Glm4MoeLiteForCausalLM, tf.Glm4MoeLiteConfig, dict(
        **{**COMMON, "first_k_dense_replace": None}, **LATENT, q_lora_rank=24, n_group=1,
        topk_group=1, n_shared_experts=1, routed_scaling_factor=1.8,
        mlp_layer_types=["dense", "dense", "sparse", "sparse"])),
    "glm4_moe": (tf.Glm4MoeForCausalLM, tf.Glm4MoeConfig, dict(
        **COMMON, num_key_value_heads=2, head_dim=16, n_group=2, topk_group=1,
        n_shared_experts=1, routed_scaling_factor=1.8, attention_bias=True,
        use_qk_norm=True)),
}


def _hf_model(kind, **changes):
    cls, config, kw = MODELS[kind]
    torch.manual_seed(0)
    m = sharpened(cls(config(**{**kw, **changes})), norm=0.3, matrix=0.2, bias=0.3)
    with torch.no_grad():  # a choice bias large enough to change choices
        for name, b in m.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.2 * torch.randn_like(b))
    return m


@pytest.fixture(scope="module", params=list(MODELS))
def ds(request, tmp_path_factory):
    return saved_and_loaded(request.param, _hf_model(request.param), tmp_path_factory)


@pytest.fixture(scope="module")
def v3(tmp_path_factory):
    return saved_and_loaded("deepseek_v3", _hf_model("deepseek_v3"), tmp_path_factory)


def test_config_read_from_checkpoint(v3):
    _, _, cfg, w = v3
    assert (cfg.num_experts, cfg.experts_per_token, cfg.mlp_dim) == (8, 2, 32)
    assert (cfg.dense_layers, cfg.dense_mlp_dim, cfg.shared_expert_dim) == (1, 96, 32)
    assert cfg.router_sigmoid and cfg.router_groups == (4, 2) and cfg.router_group_top2
    assert cfg.router_choice_bias and cfg.routed_scale == 2.5 and cfg.norm_topk
    assert (cfg.q_lora_rank, cfg.kv_lora_rank, cfg.qk_nope_dim, cfg.rope_dim,
            cfg.v_head_dim) == (24, 16, 12, 8, 10)
    assert (cfg.num_kv_heads, cfg.head_dim, cfg.value_dim) == (1, 24, 0)
    mscale = 0.1 * 0.8 * np.log(4.0) + 1.0  # mscale_all_dim's, squared into the scale
    assert cfg.query_scale == pytest.approx(20 ** -0.5 * mscale ** 2)
    dense, moe = w["dense_layers"], w["layers"]
    assert dense["w_gate"].shape == (1, 64, 96) and "router" not in dense
    assert moe["moe_gate"].shape == (3, 8, 64, 32) and moe["router_choice_b"].shape == (3, 8)
    assert moe["wq_b"].shape == (3, 24, 4, 20) and moe["w_uk"].shape == (3, 4, 12, 16)
    assert moe["w_uv"].shape == (3, 4, 16, 10) and moe["wkv_a"].shape == (3, 64, 24)


def test_latent_cache_holds_one_row_per_token(v3):
    """The cache is [latent, RoPE key] per token and layer, no values: (16 + 8) floats
    where expanded keys and values would take 4 heads x (20 + 10)."""
    _, _, cfg, _ = v3
    cache = kv_cache.init_cache(cfg, 2, 64)
    assert cache.k.shape == (4, 2, 1, 64, 24) and cache.v.shape == (4, 2, 1, 64, 0)
    assert cache.nbytes() == 4 * 2 * 64 * 24 * 4 + 2 * 4
    q8 = kv_cache.init_cache(cfg, 2, 64, jnp.int8)
    assert q8.k.dtype == jnp.int8 and q8.v.size == 0


def test_logits_match_transformers(ds):
    """Through the reference attention and the CPU chunked decode loop over two chunks of
    a 512-slot cache."""
    _, m, cfg, w = ds
    check_decode_logits(m, cfg, w, [("xla", 64), ("xla_chunked", 512)])


@pytest.mark.slow
def test_logits_through_the_pallas_kernel(ds):
    """The Pallas decode kernel (interpret mode) reads the 24-wide latent rows as keys and
    values."""
    _, m, cfg, w = ds
    check_decode_logits(m, cfg, w, [("pallas_interpret", 64)])


def test_every_difference_matters(v3):
    _, m, cfg, w = v3

    def interleaved(w):  # the RoPE dims as the checkpoint orders them, not reordered
        def back(a, lead):  # [..., lead + R] -> each head's RoPE tail re-interleaved
            R = a.shape[-1] - lead
            tail = a[..., lead:].reshape(*a.shape[:-1], 2, R // 2).swapaxes(-1, -2)
            return jnp.concatenate([a[..., :lead], tail.reshape(*a.shape[:-1], R)], -1)
        layers = dict(w["layers"], wq_b=back(w["layers"]["wq_b"], 12),
                      wkv_a=back(w["layers"]["wkv_a"], 16))
        return dict(w, layers=layers)

    offs = [dict(router_sigmoid=False), dict(router_groups=None),
            dict(router_group_top2=False), (dict(router_choice_bias=False),
                                           without_layer_weights("router_choice_b")),
            dict(routed_scale=1.0), dict(norm_topk=False), dict(query_scale=20 ** -0.5),
            dict(rope_attention_factor=1.2), ({}, interleaved)]
    check_each_matters(m, cfg, w, offs, tokens(40))


@pytest.mark.slow
def test_gathered_and_dense_experts_agree(ds):
    """The two ways moe() runs the experts agree under grouped, biased routing."""
    _, _, cfg, w = ds
    check_expert_paths_agree(cfg, w)


def test_greedy_generation_matches_transformers(v3):
    _, m, cfg, w = v3
    check_greedy_generation(m, cfg, w, n=24)


@pytest.mark.slow
def test_greedy_generation_of_every_family(ds):
    _, m, cfg, w = ds
    check_greedy_generation(m, cfg, w, n=24)


@pytest.mark.slow
def test_engine_matches_transformers(ds):
    """Chunked prefill of 8-token chunks, then the prefix cache (whose blocks hold the
    latent rows and no values)."""
    _, m, cfg, w = ds
    check_engine_greedy(m, cfg, w, n=24)


@pytest.mark.slow
def test_checkpoint_round_trip_and_mesh(ds, tmp_path):
    """Orbax round trip; heads tensor-parallel, the one latent KV head replicated."""
    _, m, cfg, w = ds
    check_orbax_round_trip(m, cfg, w, tokens(20), tmp_path)
    ws = check_sharded_equals_one_device(cfg, w)
    if cfg.kv_lora_rank:
        assert tuple(ws["layers"]["w_uk"].sharding.spec)[:2] == (None, "model")
        assert tuple(ws["dense_layers"]["w_gate"].sharding.spec) == (None, None, "model")


@pytest.mark.slow
def test_expert_parallel(v3):
    """V3's grouped, biased routing with its experts split over `expert` (4 of 8 per
    device) and the latent attention's heads over `model` equals one device."""
    _, _, cfg, w = v3
    ws = check_expert_parallel(cfg, w)
    assert tuple(ws["layers"]["moe_gate"].sharding.spec)[:2] == (None, "expert")


def test_int8_weights_and_cache(v3):
    """int8 weights (both layer stacks, the latent projections too) compute what their
    dequantized values do; an int8 cache of latent rows keeps the greedy next tokens of 4
    prompts (the tiny random model amplifies rounding: its logits move ~15% of their
    range, where a cache read wrongly would move them by all of it)."""
    from jaxinfer.quant import QuantConfig, dequantize, is_qarray
    from jaxinfer.weights import quantize_weights

    _, _, cfg, w = v3
    wq = quantize_weights(w, QuantConfig.from_mode("int8"))
    picked = [("dense_layers", "w_gate"), ("layers", "wq_a"), ("layers", "w_uk"),
              ("layers", "w_uv"), ("layers", "moe_up")]
    assert all(is_qarray(wq[s][n]) for s, n in picked)
    deq = jax.tree.map(lambda a: dequantize(a, jnp.float32) if is_qarray(a) else a, wq,
                       is_leaf=is_qarray)
    toks = jnp.asarray(tokens(20, batch=4))
    run = lambda w, dtype=jnp.float32: model.forward(
        w, toks, kv_cache.init_cache(cfg, 4, 32, dtype), cfg)[0]
    ref = run(deq)
    span = float(ref.max() - ref.min())
    np.testing.assert_allclose(np.asarray(run(wq)), np.asarray(ref), atol=1e-4 * span, rtol=0)
    ref, q8 = run(w), run(w, jnp.int8)
    assert float(jnp.abs(q8 - ref).max()) < 0.25 * float(ref.max() - ref.min())
    assert (q8[:, -1].argmax(-1) == ref[:, -1].argmax(-1)).all()


def test_refusals(v3, tmp_path):
    """What is not supported says so: LoRA on latent attention, layer patterns and
    routing methods that are not DeepSeek's released ones, attention biases."""
    from jaxinfer.convert.lora import read_lora

    _, _, cfg, _ = v3
    with pytest.raises(ConversionError, match="latent attention"):
        read_lora(tmp_path, cfg)
    hf = dict(MODELS["deepseek_v2"][2], model_type="deepseek_v2")
    for bad, match in [(dict(moe_layer_freq=2), "moe_layer_freq"),
                       (dict(topk_method="noaux_tc"), "topk_method"),
                       (dict(attention_bias=True), "attention_bias")]:
        with pytest.raises(ConfigError, match=match):
            ModelConfig.from_hf({**hf, **bad})
    with pytest.raises(ConfigError, match="dense_layers"):
        cfg.replace(dense_layers=4)


def _write_llamacpp_gguf(path, ckpt, c, qtype, new_layout: bool = True) -> None:
    """A GGUF the way llama.cpp's converter writes one from the checkpoint directory `ckpt`
    (config `c`), tensor names from the `gguf` package's own table. DeepSeek (`deepseek2`):
    one KV head of the latent width, kv_b_proj split into k_b (transposed) and v_b with the
    *_mla lengths (`new_layout`, 2025 on) or whole with one tensor per expert (older
    files); YaRN's mscale_all_dim as a log multiplier of 0.1 times it; RoPE rows as the
    checkpoint has them. GLM-4.5 (`glm4moe`): rope.dimension_count of head_dim, one
    multi-token-prediction block appended (block_count counts it)."""
    import gguf
    from safetensors.numpy import load_file

    sd = load_file(ckpt / "model.safetensors")
    glm = c.model_type == "glm4_moe"
    arch = gguf.MODEL_ARCH.GLM4_MOE if glm else gguf.MODEL_ARCH.DEEPSEEK2
    L = c.num_hidden_layers
    w = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    w.add_block_count(L + glm)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_expert_count(c.n_routed_experts)
    w.add_expert_used_count(c.num_experts_per_tok)
    w.add_expert_group_count(c.n_group)
    w.add_expert_group_used_count(c.topk_group)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SOFTMAX
                             if c.model_type == "deepseek_v2"
                             else gguf.ExpertGatingFuncType.SIGMOID)
    w.add_leading_dense_block_count(c.first_k_dense_replace  # (GLM-4.7-Flash: its layer types)
                                    or list(getattr(c, "mlp_layer_types", None) or []).count(
                                        "dense"))
    w.add_vocab_size(c.vocab_size)
    w.add_expert_feed_forward_length(c.moe_intermediate_size)
    w.add_expert_shared_count(c.n_shared_experts)
    w.add_expert_weights_scale(c.routed_scaling_factor)
    if c.norm_topk_prob:
        w.add_expert_weights_norm(True)
    rp = c.rope_parameters
    w.add_rope_freq_base(rp["rope_theta"])
    if glm:
        w.add_head_count_kv(c.num_key_value_heads)
        w.add_key_length(c.head_dim)
        w.add_value_length(c.head_dim)
        w.add_rope_dimension_count(int(c.head_dim * rp.get("partial_rotary_factor", 0.5)))
        w.add_nextn_predict_layers(1)
    else:
        N, Hn, Hv, R, rot = (c.num_attention_heads, c.qk_nope_head_dim, c.v_head_dim,
                             c.kv_lora_rank, c.qk_rope_head_dim)
        w.add_head_count_kv(1)
        if c.q_lora_rank:
            w.add_q_lora_rank(c.q_lora_rank)
        w.add_kv_lora_rank(R)
        w.add_key_length(R + rot if new_layout else Hn + rot)
        w.add_value_length(R if new_layout else Hv)
        if new_layout:
            w.add_key_length_mla(Hn + rot)
            w.add_value_length_mla(Hv)
        w.add_rope_dimension_count(rot)
    if rp["rope_type"] == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rp["factor"])
        w.add_rope_scaling_orig_ctx_len(rp["original_max_position_embeddings"])
        w.add_rope_scaling_yarn_log_mul(0.1 * rp["mscale_all_dim"])
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(c.vocab_size)])
    w.add_bos_token_id(c.bos_token_id)
    w.add_eos_token_id(c.eos_token_id)
    w.add_pad_token_id(c.pad_token_id)
    names = gguf.get_tensor_name_map(arch, L + glm)
    experts = {}
    out = {}
    for name, a in sd.items():
        if e := re.fullmatch(r"(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(\w+)\.weight", name):
            experts.setdefault(f"{e[1]}.{e[3]}.weight", {})[int(e[2])] = a
            continue
        if name.endswith("kv_b_proj.weight") and new_layout:
            kv_b = a.reshape(N, Hn + Hv, R)
            for part, t in (("k_b_proj", kv_b[:, :Hn].swapaxes(1, 2)), ("v_b_proj", kv_b[:, Hn:])):
                out[names.get_name(name.replace("kv_b_proj", part), (".weight",))] = t
            continue
        name = name.replace("e_score_correction_bias", "e_score_correction.bias")
        out[names.get_name(name, (".weight", ".bias"))] = a
    for name, per in experts.items():
        stacked = np.stack([per[x] for x in range(len(per))])
        gname = names.get_name(name, (".weight",))
        if new_layout:
            out[gname] = stacked
        else:
            out.update({gname.replace("_exps.", f".{x}."): t for x, t in enumerate(stacked)})
    if glm:  # the multi-token-prediction block, which inference skips
        out[f"blk.{L}.nextn.eh_proj.weight"] = np.ones((c.hidden_size, 2 * c.hidden_size),
                                                       np.float32)
    for name, a in out.items():
        a = np.ascontiguousarray(a)
        if a.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32 or "norm" in name \
                or "ffn_gate_inp" in name or a.shape[-1] % 32:  # (llama.cpp's fallback too)
            w.add_tensor(name, a.astype(np.float32))
        else:
            w.add_tensor(name, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("kind,new_layout", [
    ("deepseek_v3", True), pytest.param("deepseek_v2", False, marks=pytest.mark.slow),
    pytest.param("glm4_moe_lite", True, marks=pytest.mark.slow),
    pytest.param("glm4_moe", True, marks=pytest.mark.slow)])
def test_gguf_matches_transformers(kind, new_layout, tmp_path):
    """DeepSeek GGUF files (llama.cpp's `deepseek2`: V3 in today's layout with the key
    up-projection split out, V2 in the older one with an expert per tensor; GLM-4.7-Flash,
    which llama.cpp writes as `deepseek2` too) and GLM-4.5's
    (`glm4moe`, its multi-token-prediction block skipped) load to the same config and
    weights as the checkpoint they came from, so their logits and greedy tokens are
    transformers'; Q8_0 blocks dequantize as read. YaRN's mscale pair is equal, as in
    every release (the file keeps one of them)."""
    import gguf

    from jaxinfer.convert.gguf import load_gguf

    cls, config, kw = MODELS[kind]
    if "rope_parameters" in kw:
        kw = {**kw, "rope_parameters": {**kw["rope_parameters"], "mscale": 0.8}}
    torch.manual_seed(0)
    m = sharpened(cls(config(**kw)), norm=0.3, matrix=0.2, bias=0.3)
    with torch.no_grad():
        for name, b in m.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.2 * torch.randn_like(b))
    _, _, cfg, w = saved_and_loaded(kind, m, _Factory(tmp_path))
    f32 = gguf.GGMLQuantizationType.F32
    _write_llamacpp_gguf(tmp_path / "ds.gguf", tmp_path / kind, m.config, f32, new_layout)
    gcfg, gw = load_gguf(tmp_path / "ds.gguf")
    for f in dataclasses.fields(cfg):  # the same, but floats the file holds as float32
        if f.name not in ("name", "add_bos"):
            want = getattr(cfg, f.name)
            want = pytest.approx(want, rel=1e-6) if isinstance(want, float) else want
            assert getattr(gcfg, f.name) == want, f.name
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, gw),
                 jax.tree.map(np.asarray, w))
    check_decode_logits(m, gcfg, jax.tree.map(jnp.asarray, gw))
    check_greedy_generation(m, gcfg, jax.tree.map(jnp.asarray, gw), n=12)
    q8 = gguf.GGMLQuantizationType.Q8_0  # quantized blocks read dequantized
    _write_llamacpp_gguf(tmp_path / "q8.gguf", tmp_path / kind, m.config, q8, new_layout)
    qcfg, qw = load_gguf(tmp_path / "q8.gguf")
    assert qcfg == gcfg.replace(name="q8")
    err = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
              for a, b in zip(jax.tree.leaves(qw), jax.tree.leaves(gw), strict=True))
    assert 0 < err < 0.02
    with pytest.raises(ConversionError, match="--quantize=gguf"):
        load_gguf(tmp_path / "q8.gguf", quantized=True)


class _Factory:
    """tmp_path_factory's mktemp over one test's tmp_path."""

    def __init__(self, root):
        self.root = root

    def mktemp(self, name):
        (self.root / name).mkdir()
        return self.root / name


def test_gguf_missing_metadata_is_named(tmp_path):
    """A `deepseek2` file without a key its config needs stops with the key's name."""
    import gguf

    from jaxinfer.convert.gguf import load_gguf

    w = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "deepseek2")
    w.add_block_count(1)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_expert_count(2)
    w.add_expert_used_count(1)
    w.add_expert_feed_forward_length(8)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_dimension_count(4)
    w.add_key_length(12)
    w.add_value_length(8)
    w.add_tensor("token_embd.weight", np.zeros((10, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ConversionError, match="lacks metadata deepseek2.attention.kv_lora_rank"):
        load_gguf(tmp_path / "x.gguf")
