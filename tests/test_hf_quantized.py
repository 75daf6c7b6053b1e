"""Quantized Hugging Face checkpoints: block-FP8 weights (`quant_method: fp8`, as DeepSeek
V3 / R1 and Qwen3's FP8 releases store them) decoded as read, against transformers' own
FP8 dequantization, and per-channel FP8 (compressed-tensors' float-quantized format of the
FP8-dynamic releases, fbgemm_fp8) on tiny random checkpoints, decoded or kept as float8
(`quantize="fp8"`); other quantization methods refused by name. (gpt-oss's MXFP4 experts:
tests/test_gpt_oss.py.)
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
tf = pytest.importorskip("transformers")

from jaxinfer.convert.safetensors import load_hf_dir  # noqa: E402
from jaxinfer.errors import ConversionError  # noqa: E402
from jaxinfer.quant import QuantConfig, dequantize, infer_config, is_qarray  # noqa: E402

from .hf_checkpoints import hf_logits, ours, sharpened, tokens  # noqa: E402

BLOCK = [32, 32]  # (the releases use 128 x 128; widths here are 64-96, some not multiples)


def _llama():
    torch.manual_seed(0)
    return sharpened(tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        eos_token_id=3)), norm=0.3, matrix=0.15)


def _deepseek_v3():
    from .test_deepseek import _hf_model

    return _hf_model("deepseek_v3")


def _minimax_m2():
    from .test_moe import _hf_model

    return _hf_model("minimax_m2")


MODELS = {"llama": _llama, "deepseek_v3": _deepseek_v3, "minimax_m2": _minimax_m2}


def _fp8(w: torch.Tensor, block: list[int] | str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn weight, float32 scale per block, per row ("channel") or per tensor):
    each block's largest magnitude at float8's 448."""
    if block in ("channel", "fbgemm"):
        s = w.abs().amax(dim=1, keepdim=True) / 448.0
        return (w / s).to(torch.float8_e4m3fn), s
    if block is None:
        s = w.abs().max() / 448.0
        return (w / s).to(torch.float8_e4m3fn), s.reshape(1)
    (out, inp), (bo, bi) = w.shape, block
    padded = torch.nn.functional.pad(w, (0, -inp % bi, 0, -out % bo))
    s = padded.reshape(padded.shape[0] // bo, bo, -1, bi).abs().amax(dim=(1, 3)) / 448.0
    full = s.repeat_interleave(bo, 0)[:out].repeat_interleave(bi, 1)[:, :inp]
    return (w / full).to(torch.float8_e4m3fn), s


def _fp8_checkpoint(m, path, block):
    """m saved as an FP8 release is (every linear weight of the layers in float8 with its
    scale_inv; embeddings, norms, router and lm_head as they were), and transformers' model
    on the weights its own FP8 dequantization decodes."""
    from safetensors.torch import load_file, save_file
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    m.save_pretrained(path / "float")
    tensors = load_file(str(path / "float" / "model.safetensors"))
    decoded = dict(tensors)
    for name, w in list(tensors.items()):
        if (".layers." in name and name.endswith(".weight") and w.ndim == 2
                and "norm" not in name
                and not name.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight"))):
            q, s = _fp8(w.float(), block)
            tensors[name] = q
            if block in ("channel", "fbgemm"):  # compressed-tensors' and fbgemm's name
                tensors[name + "_scale"], decoded[name] = s, q.float() * s
            else:
                tensors[name + "_scale_inv"] = s
                decoded[name] = _dequantize_fp8_weight(q, s, block, torch.float32)
    (path / "fp8").mkdir()
    save_file(tensors, str(path / "fp8" / "model.safetensors"))
    config = json.loads((path / "float" / "config.json").read_text())
    config["quantization_config"] = (
        {"quant_method": "compressed-tensors", "format": "float-quantized",
         "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
             "num_bits": 8, "type": "float", "strategy": "channel"}}}}
        if block == "channel" else
        {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0}
        if block == "fbgemm" else
        {"quant_method": "fp8", "activation_scheme": "dynamic",
         **({"weight_block_size": block} if block else {})})
    (path / "fp8" / "config.json").write_text(json.dumps(config))
    save_file(decoded, str(path / "float" / "model.safetensors"))
    ref = type(m).from_pretrained(path / "float", dtype=torch.float32)
    ref.config._attn_implementation = "eager"
    return ref.eval(), decoded


@pytest.mark.parametrize("kind,block", [("llama", BLOCK), ("llama", None), ("llama", "channel"),
                                        ("llama", "fbgemm"), ("deepseek_v3", BLOCK),
                                        ("minimax_m2", BLOCK)])
def test_fp8_checkpoint_matches_transformers(tmp_path, kind, block):
    """Block FP8 (ragged blocks at the edges of 80- and 96-wide matrices), per-tensor and
    per-channel (compressed-tensors, fbgemm) FP8: each weight equal to its dequantization
    (transformers' own for blocks), logits within 1e-4 of transformers' model on those
    weights; DeepSeek V3's experts, latent projections and dense layers included, and
    MiniMax-M2's experts (its release's format)."""
    ref, decoded = _fp8_checkpoint(MODELS[kind](), tmp_path, block)
    cfg, w = load_hf_dir(tmp_path / "fp8")
    if kind == "llama":
        down = decoded["model.layers.1.mlp.down_proj.weight"].numpy()
        np.testing.assert_array_equal(w["layers"]["w_down"][1], down.T)
        assert not np.array_equal(down, _llama().state_dict()["model.layers.1.mlp.down_proj."
                                                              "weight"].numpy())  # rounded
    toks = tokens(24)
    np.testing.assert_allclose(ours(cfg, jax.tree.map(jnp.asarray, w), toks),
                               hf_logits(ref, toks), atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind,block", [("llama", BLOCK), ("llama", None), ("llama", "channel"),
                                        ("llama", "fbgemm"), ("deepseek_v3", BLOCK)])
def test_fp8_release_kept_as_fp8(tmp_path, kind, block, caplog):
    """`quantize="fp8"` keeps an FP8 release's weights as they are: each linear weight a
    float8 QArray with the release's own scales (block releases: groups that split the
    blocks: 16 for 32-wide blocks of 80-wide matrices, 2 where DeepSeek's tiny heads are 10
    wide), which dequantizes bit for bit
    to the float conversion's weight (DeepSeek's kv_b_proj too, split into w_uk and w_uv);
    so the logits equal the float conversion's, and transformers'."""
    ref, _ = _fp8_checkpoint(MODELS[kind](), tmp_path, block)
    cfg, floats = load_hf_dir(tmp_path / "fp8")
    cfg8, w8 = load_hf_dir(tmp_path / "fp8", quant=QuantConfig.from_mode("fp8"))
    groups = None if block != BLOCK else 16 if kind == "llama" else 2
    exact = 0
    for stack in ("layers", "dense_layers"):
        for name, q in w8.get(stack, {}).items():
            if not is_qarray(q):
                continue
            assert q.values.dtype == jnp.float8_e4m3fn
            got = np.asarray(dequantize(jax.tree.map(jnp.asarray, q), jnp.float32))
            np.testing.assert_array_equal(got, floats[stack][name], err_msg=name)
            exact += 1
    assert exact >= 7 and infer_config(w8).linear.group_size == groups
    assert "requantized" not in caplog.text
    toks = tokens(24)
    got = ours(cfg8, jax.tree.map(jnp.asarray, w8), toks)
    np.testing.assert_allclose(got, ours(cfg, jax.tree.map(jnp.asarray, floats), toks),
                               atol=2e-5, rtol=0)
    np.testing.assert_allclose(got, hf_logits(ref, toks), atol=1e-4, rtol=0)


@pytest.mark.slow
def test_fp8_release_through_the_script_and_llm_load(tmp_path):
    """`convert.py --quantize fp8` and `LLM.load(quantize="fp8")` of a block-FP8 release
    give the same float8 weights, in the release's groups, and the float model's greedy
    tokens."""
    import subprocess
    import sys
    from pathlib import Path

    from jaxinfer.checkpoint import load_quant_config
    from jaxinfer.llm import LLM
    from jaxinfer.sampling import GREEDY

    _fp8_checkpoint(_llama(), tmp_path, BLOCK)
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(97)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "fp8" / "tokenizer.json"))  # (the tiny vocabulary's words)
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(root / "scripts" / "convert.py"), "--input",
                        str(tmp_path / "fp8"), "--output", str(tmp_path / "ckpt"),
                        "--quantize", "fp8"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert load_quant_config(tmp_path / "ckpt").linear.group_size == 16
    saved = LLM.load(tmp_path / "ckpt")
    direct = LLM.load(tmp_path / "fp8", quantize="fp8")
    floats = LLM.load(tmp_path / "fp8")
    for a, b in zip(jax.tree.leaves(saved.params), jax.tree.leaves(direct.params), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    assert saved.params["layers"]["wq"].values.dtype == jnp.float8_e4m3fn
    prompt = tokens(6, batch=1)[0].tolist()
    want = floats.generate(prompt, GREEDY, max_new_tokens=12).token_ids
    assert saved.generate(prompt, GREEDY, max_new_tokens=12).token_ids == want


def test_fp8_scales_that_do_not_fit_are_refused(tmp_path):
    ref, _ = _fp8_checkpoint(_llama(), tmp_path, BLOCK)
    config = json.loads((tmp_path / "fp8" / "config.json").read_text())
    config["quantization_config"]["weight_block_size"] = [16, 16]
    (tmp_path / "fp8" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="weight_block_size"):
        load_hf_dir(tmp_path / "fp8")


def test_a_model_transformers_dequantized_from_gguf_loads(tmp_path):
    """transformers keeps `quant_method: gguf` in the config of a model it read from a GGUF
    file, whose saved weights are float: read as such."""
    m = _llama()
    m.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gguf"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    cfg, w = load_hf_dir(tmp_path)
    toks = tokens(12)
    np.testing.assert_allclose(ours(cfg, jax.tree.map(jnp.asarray, w), toks), hf_logits(m, toks),
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", ["gptq", "awq", "bitsandbytes", "compressed-tensors"])
def test_other_quantization_methods_are_refused_by_name(tmp_path, method):
    """Integer formats stop with the method (compressed-tensors: its format) named, rather
    than loading packed integers as weights."""
    _llama().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": method, "bits": 4,
                                     "format": "pack-quantized"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    match = ("format 'pack-quantized' is not supported" if method == "compressed-tensors"
             else f"quant_method '{method}' is not supported")
    with pytest.raises(ConversionError, match=match):
        load_hf_dir(tmp_path)
