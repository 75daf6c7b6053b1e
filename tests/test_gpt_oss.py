"""gpt-oss against Hugging Face transformers (PyTorch, float32, eager attention), on a tiny
random checkpoint transformers writes: attention sinks (a learned logit per head in every
softmax's denominator), sliding-window layers (window 6) alternating with global ones,
YaRN without truncation, biases on q/k/v/o, the router and every expert, gate and up
interleaved in one stacked tensor, and the clamped SwiGLU of its experts.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
tf = pytest.importorskip("transformers")

from jaxinfer.attention import attention  # noqa: E402

from .hf_checkpoints import (  # noqa: E402
    check_decode_logits,
    check_each_matters,
    check_engine_greedy,
    check_expert_parallel,
    check_expert_paths_agree,
    check_greedy_generation,
    check_orbax_round_trip,
    check_sharded_equals_one_device,
    hf_logits,
    ours,
    saved_and_loaded,
    sharpened,
    tokens,
    without_layer_weights,
)

ORIG = 16
CONFIG = dict(vocab_size=97, hidden_size=64, intermediate_size=48, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
              num_experts_per_tok=2, sliding_window=6, max_position_embeddings=64,
              swiglu_limit=1.0, eos_token_id=3, bos_token_id=2, pad_token_id=0,
              rope_parameters={"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0,
                               "beta_slow": 1.0, "truncate": False, "rope_theta": 10_000.0,
                               "original_max_position_embeddings": ORIG})


def _hf_model(**changes):
    torch.manual_seed(0)
    m = tf.GptOssForCausalLM(tf.GptOssConfig(**{**CONFIG, **changes}))
    m = sharpened(m, norm=0.3, matrix=0.15, bias=0.3)
    with torch.no_grad():  # sinks large enough to soak up attention
        for layer in m.model.layers:
            layer.self_attn.sinks.copy_(2.0 * torch.randn_like(layer.self_attn.sinks))
    return m


@pytest.fixture(scope="module")
def oss(tmp_path_factory):
    return saved_and_loaded("gpt_oss", _hf_model(), tmp_path_factory)


def test_config_read_from_checkpoint(oss):
    _, _, cfg, w = oss
    assert (cfg.num_experts, cfg.experts_per_token, cfg.mlp_dim) == (4, 2, 48)
    assert cfg.attn_sinks and cfg.router_bias and cfg.linear_bias and cfg.qkv_bias
    assert cfg.swiglu_limit == 1.0 and cfg.swiglu_alpha == pytest.approx(1.702)
    assert cfg.sliding_window == 6 and cfg.local_layers == (True, False, True, False)
    assert cfg.rope_yarn == (4.0, ORIG, 32.0, 1.0, False) and cfg.norm_topk
    L = w["layers"]
    assert L["sinks"].shape == (4, 4) and L["router_b"].shape == (4, 4)
    assert L["moe_b_gate"].shape == (4, 4, 48) and L["moe_b_down"].shape == (4, 4, 64)
    assert L["bo"].shape == (4, 64) and "b_up" not in L


def test_logits_match_transformers(oss):
    """All positions of a 40-token prompt, then decode steps through the cache; the
    Pallas decode kernel (interpret mode) starts its softmax at the sinks."""
    _, m, cfg, w = oss
    check_decode_logits(m, cfg, w, [("xla", 64), ("pallas_interpret", 64)])


def test_sinks_through_the_chunked_decode_loop():
    """The CPU chunked decode loop starts its running softmax at the sink: equal to the
    reference with sinks, rows at different positions of a 512-slot cache, with and
    without a window."""
    B, N, K, H, S = 3, 4, 2, 16, 512
    ks = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(ks[0], (B, 1, N, H))
    k = jax.random.normal(ks[1], (B, K, S, H))
    v = jax.random.normal(ks[2], (B, K, S, H))
    sinks = 3.0 * jax.random.normal(ks[3], (N,))
    pos = jnp.asarray([[5], [300], [511]], jnp.int32)
    for window in (None, jnp.int32(128)):
        ref = attention(q, k, v, pos, "xla", window=window, sinks_N=sinks)
        got = attention(q, k, v, pos, "xla_chunked", window=window, sinks_N=sinks)
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5, rtol=0)
        plain = attention(q, k, v, pos, "xla", window=window)
        assert np.abs(np.asarray(plain - ref)).max() > 1e-2


def test_every_difference_matters(oss):
    _, m, cfg, w = oss

    offs = [dict(attn_sinks=False), dict(router_bias=False), dict(swiglu_limit=None),
            dict(sliding_window=None), dict(rope_yarn=None),
            (dict(linear_bias=False), without_layer_weights("bo", "moe_b_gate", "moe_b_up",
                                                            "moe_b_down"))]
    check_each_matters(m, cfg, w, offs, tokens(40))


def test_gathered_and_dense_experts_agree(oss):
    """The two ways moe() runs the experts agree with expert biases and the clamp."""
    _, _, cfg, w = oss
    check_expert_paths_agree(cfg, w)


def test_greedy_generation_matches_transformers(oss):
    _, m, cfg, w = oss
    check_greedy_generation(m, cfg, w, n=24)


@pytest.mark.slow
def test_engine_matches_transformers(oss):
    """Chunked prefill of 8-token chunks, then the prefix cache."""
    _, m, cfg, w = oss
    check_engine_greedy(m, cfg, w, n=24)


def test_checkpoint_round_trip_and_mesh(oss, tmp_path):
    _, m, cfg, w = oss
    check_orbax_round_trip(m, cfg, w, tokens(20), tmp_path)
    check_sharded_equals_one_device(cfg, w)


@pytest.mark.slow
def test_expert_parallel(oss):
    """Experts and their biases split over `expert` (2 of 4 per device), tensor-parallel
    over `model`: prefill and decode (chosen experts and all experts) equal one device."""
    _, _, cfg, w = oss
    ws = check_expert_parallel(cfg, w)
    assert tuple(ws["layers"]["moe_b_gate"].sharding.spec) == (None, "expert", "model")


def _hf_mxfp4(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float [..., out, in] as the release stores experts: (blocks u8[..., out, G, 16], the
    even value of each pair in the low nibble; scales u8[..., out, G]), quantized by gguf's
    MXFP4 quantizer and its bytes moved to that layout."""
    import gguf

    ggml = gguf.quants.quantize(rows.reshape(-1, rows.shape[-1]), gguf.GGMLQuantizationType.MXFP4)
    ggml = ggml.reshape(*rows.shape[:-1], -1, 17)
    values = np.concatenate([ggml[..., 1:] & 0x0F, ggml[..., 1:] >> 4], axis=-1)  # in order
    return values[..., 0::2] | (values[..., 1::2] << 4), np.ascontiguousarray(ggml[..., 0])


def _mxfp4_checkpoint(path):
    """A tiny gpt-oss written with MXFP4 experts as the release stores them, and
    (transformers' model holding the decoded experts, {name: decoded expert tensor})."""
    from safetensors.numpy import save_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    torch.manual_seed(0)
    m = sharpened(tf.GptOssForCausalLM(tf.GptOssConfig(**{  # whole 32-wide blocks per row
        **CONFIG, "intermediate_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1,
        "head_dim": 32})), norm=0.3, matrix=0.15, bias=0.3)
    tensors = {k: v.numpy().copy() for k, v in m.state_dict().items()}
    decoded = {}
    for i in range(4):
        for proj in ("gate_up_proj", "down_proj"):
            name = f"model.layers.{i}.mlp.experts.{proj}"
            blocks, scales = _hf_mxfp4(tensors.pop(name).swapaxes(1, 2))  # [E, out, in]
            tensors[name + "_blocks"], tensors[name + "_scales"] = blocks, scales
            decoded[name] = convert_moe_packed_tensors(
                torch.from_numpy(blocks), torch.from_numpy(scales), dtype=torch.float32)
            assert (decoded[name] != m.state_dict()[name]).any()  # rounded: blocks matter
    m.load_state_dict(decoded, strict=False)
    m.config.save_pretrained(path)
    save_file(tensors, str(path / "model.safetensors"))
    return m, {k: v.numpy() for k, v in decoded.items()}


def test_mxfp4_checkpoint_matches_transformers(tmp_path):
    """A checkpoint with MXFP4 experts as the release stores them (`*_blocks`, `*_scales`):
    read decoded, each expert weight equal to transformers' own MXFP4 decoder's
    (`convert_moe_packed_tensors`), and the logits equal transformers' model holding those
    decoded weights."""
    from jaxinfer.convert.safetensors import load_hf_dir

    m, decoded = _mxfp4_checkpoint(tmp_path)
    cfg, w = load_hf_dir(tmp_path)
    gate_up = decoded["model.layers.2.mlp.experts.gate_up_proj"]
    np.testing.assert_array_equal(w["layers"]["moe_gate"][2], gate_up[..., ::2])
    np.testing.assert_array_equal(w["layers"]["moe_up"][2], gate_up[..., 1::2])
    np.testing.assert_array_equal(w["layers"]["moe_down"][2],
                                  decoded["model.layers.2.mlp.experts.down_proj"])
    toks = tokens(40)
    np.testing.assert_allclose(ours(cfg, jax.tree.map(jnp.asarray, w), toks), hf_logits(m, toks),
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("group_size", [32, None])
def test_mxfp4_experts_kept_exactly_as_int8(tmp_path, group_size):
    """Read as int8 (`--quantize=int8`: with no group size an MXFP4 release takes groups
    of 32, the MXFP4 block), MXFP4 experts are kept as they are (2 x E2M1 as int8,
    2 ** (e - 128) as scale): every expert weight dequantizes to transformers' decoded
    value bit for bit, where requantizing the decoded floats does not; the other linear
    weights are quantized as from float, and the model computes what its dequantized
    weights do."""
    from jaxinfer.convert.safetensors import load_hf_dir
    from jaxinfer.quant import QuantConfig, dequantize, infer_config, is_qarray
    from jaxinfer.weights import quantize_weights

    _, decoded = _mxfp4_checkpoint(tmp_path)
    cfg, w = load_hf_dir(tmp_path, quant=QuantConfig.from_mode("int8", group_size=group_size))
    qc = QuantConfig.from_mode("int8", group_size=32)
    assert infer_config(w) == qc
    want = quantize_weights(load_hf_dir(tmp_path)[1], qc)
    for i in range(4):
        gate_up = decoded[f"model.layers.{i}.mlp.experts.gate_up_proj"]
        for key, ref in (("moe_gate", gate_up[..., ::2]), ("moe_up", gate_up[..., 1::2]),
                         ("moe_down", decoded[f"model.layers.{i}.mlp.experts.down_proj"])):
            q = jax.tree.map(lambda a, i=i: a[i], w["layers"][key])
            assert is_qarray(q) and q.values.dtype == np.int8
            assert np.abs(np.asarray(q.values)).max() <= 12
            np.testing.assert_array_equal(np.asarray(dequantize(q)), ref)
            requantized = jax.tree.map(lambda a, i=i: a[i], want["layers"][key])
            assert not np.array_equal(np.asarray(dequantize(requantized)), ref)
    for key in ("wq", "wo"):
        for a, b in zip(jax.tree.leaves(w["layers"][key]), jax.tree.leaves(want["layers"][key]),
                        strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    toks = tokens(40)  # the int8 model computes what its dequantized float weights do
    w = jax.tree.map(jnp.asarray, w)
    floats = jax.tree.map(lambda a: dequantize(a) if is_qarray(a) else a, w, is_leaf=is_qarray)
    np.testing.assert_allclose(ours(cfg, w, toks), ours(cfg, floats, toks), atol=1e-4, rtol=0)


def test_mxfp4_blocks_and_scales_must_pair(tmp_path):
    """Blocks and scales of different shapes stop with the tensor named."""
    from jaxinfer.convert.hf_quant import mxfp4_dequantize

    with pytest.raises(ValueError, match="do not pair"):
        mxfp4_dequantize(np.zeros((4, 8, 2, 16), np.uint8), np.zeros((4, 8, 3), np.uint8))


@pytest.mark.parametrize("experts", ["MXFP4", pytest.param("Q8_0", marks=pytest.mark.slow)])
def test_gguf_matches_transformers(tmp_path, experts):
    """A `gpt-oss` GGUF as llama.cpp writes it (experts split into gate/up/down [E, out,
    in] with their biases, attn_sinks, post_attention_norm before the MLP, float biases):
    MXFP4 experts (the published files) read dequantized, and a Q8_0 file read with its
    blocks kept as QArrays, against transformers on the same block-exact weights."""
    import gguf

    from jaxinfer.config import ModelConfig
    from jaxinfer.convert.gguf import load_gguf

    from .test_convert import _write_gguf

    Q = gguf.GGMLQuantizationType
    torch.manual_seed(0)
    m = tf.GptOssForCausalLM(tf.GptOssConfig(**{  # whole 32-wide blocks per head and row
        **CONFIG, "intermediate_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1,
        "head_dim": 32}))
    m = sharpened(m, norm=0.3, matrix=0.15, bias=0.3)
    q8, qe = Q.Q8_0, getattr(Q, experts)
    exact = lambda a, t: gguf.quants.dequantize(gguf.quants.quantize(a, t), t).reshape(a.shape)
    hf = {k: v.numpy().copy() for k, v in m.state_dict().items()}
    sd, F = {}, 64
    for k, v in hf.items():
        if ".mlp." in k or k.endswith(".sinks"):
            continue
        sd[k] = hf[k] = exact(v, q8) if v.ndim >= 2 else v
    for i in range(4):
        p = f"model.layers.{i}."
        e = p + "mlp.experts."
        gate_up = hf[e + "gate_up_proj"].swapaxes(1, 2)  # [E, 2F, D], gate and up interleaved
        gate, up = exact(gate_up[:, ::2], qe), exact(gate_up[:, 1::2], qe)
        down = exact(hf[e + "down_proj"].swapaxes(1, 2), qe)  # [E, D, F]
        both = np.empty_like(gate_up)
        both[:, ::2], both[:, 1::2] = gate, up
        hf[e + "gate_up_proj"], hf[e + "down_proj"] = both.swapaxes(1, 2), down.swapaxes(1, 2)
        b = hf[e + "gate_up_proj_bias"]
        sd.update({p + "mlp.gate_exps.weight": gate, p + "mlp.up_exps.weight": up,
                   p + "mlp.down_exps.weight": down, p + "mlp.gate_exps.bias": b[:, ::2],
                   p + "mlp.up_exps.bias": b[:, 1::2],
                   p + "mlp.down_exps.bias": hf[e + "down_proj_bias"],
                   p + "mlp.gate.weight": hf[p + "mlp.router.weight"],
                   p + "mlp.gate.bias": hf[p + "mlp.router.bias"],
                   p + "attn_sinks.weight": hf[p + "self_attn.sinks"]})
    m.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in hf.items()})
    hf_cfg = ModelConfig.from_hf(m.config.to_dict())

    def meta(w):
        w.add_expert_count(4)
        w.add_expert_used_count(2)
        w.add_expert_feed_forward_length(F)
        w.add_sliding_window(6)
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(4.0)
        w.add_rope_scaling_orig_ctx_len(ORIG)

    _write_gguf(tmp_path / "oss.gguf", hf_cfg, sd, "gpt-oss", q8, meta=meta, expert_qtype=qe)
    cfg, w = load_gguf(tmp_path / "oss.gguf", quantized=experts == "Q8_0")
    for f in ("attn_sinks", "router_bias", "linear_bias", "sliding_window", "local_layers",
              "rope_yarn", "rope_attention_factor", "num_experts", "experts_per_token",
              "qkv_bias"):
        assert getattr(cfg, f) == getattr(hf_cfg, f), f
    assert cfg.swiglu_limit == 7.0  # llama.cpp's fixed clamp (the released models')
    cfg = cfg.replace(swiglu_limit=1.0)  # the test model's
    toks = tokens(40)
    got = ours(cfg, jax.tree.map(jnp.asarray, w), toks)
    np.testing.assert_allclose(got, hf_logits(m, toks), atol=1e-4, rtol=0)
    if experts == "MXFP4":  # read as int8: groups of 32, the experts kept exactly
        from jaxinfer.quant import QuantConfig, dequantize, is_qarray

        _, qw = load_gguf(tmp_path / "oss.gguf", quant=QuantConfig.from_mode("int8"))
        for key in ("moe_gate", "moe_up", "moe_down"):
            assert is_qarray(qw["layers"][key])
            assert np.abs(np.asarray(qw["layers"][key].values)).max() <= 12
            np.testing.assert_array_equal(np.asarray(dequantize(qw["layers"][key])),
                                          w["layers"][key])
