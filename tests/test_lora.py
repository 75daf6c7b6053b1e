"""LoRA adapters (PEFT directories) merged into the weights: SmolLM2 with an adapter against
Hugging Face PEFT's own (unmerged) forward pass, scripts/convert.py --lora_adapter against
PEFT's merge_and_unload, and every adapter we refuse."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxinfer import kv_cache, model
from jaxinfer.checkpoint import load_checkpoint
from jaxinfer.convert.lora import read_lora
from jaxinfer.errors import ConversionError
from jaxinfer.llm import LLM
from jaxinfer.sampling import SamplingParams

from .helpers import TINY

peft = pytest.importorskip("peft")
ROOT = Path(__file__).resolve().parents[1]
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPT = "<|im_start|>user\nName three primary colors.<|im_end|>\n<|im_start|>assistant\n"


def _adapter(base, path: Path, seed: int = 0, scale: float = 0.05, **lora_kw) -> Path:
    """A PEFT LoRA adapter of `base` with random A and B (PEFT's default B is zero, which
    would test nothing), saved as PEFT saves it."""
    torch.manual_seed(seed)
    cfg = peft.LoraConfig(init_lora_weights=False, **lora_kw)
    m = peft.get_peft_model(base, cfg)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * scale)
    m.save_pretrained(path)
    return m


@pytest.fixture(scope="module")
def hf_base(smollm2_hf_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_hf_dir, dtype=torch.float32).eval()


def _logits(llm: LLM, ids: list[int]) -> np.ndarray:
    cache = kv_cache.init_cache(llm.cfg, 1, 128)
    logits, _ = model.forward(llm.params, jnp.asarray([ids]), cache, llm.cfg)
    return np.asarray(logits[0])


@pytest.mark.parametrize("lora_kw", [
    dict(r=8, lora_alpha=16, target_modules=ALL),
    dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"],
         layers_to_transform=[0, 7, 29]),
])
@pytest.mark.slow
def test_smollm2_with_an_adapter_matches_peft(smollm2_checkpoint, hf_base, tmp_path, lora_kw):
    """Logits within 1e-3 of PEFT's forward pass (which applies the adapter unmerged) at
    every position, and 16 greedy tokens equal, while the adapter moves the logits far
    more than that."""
    peft_model = _adapter(hf_base, tmp_path / "adapter", **lora_kw)
    try:
        llm = LLM.load(smollm2_checkpoint, dtype=jnp.float32, lora=tmp_path / "adapter")
        ids = llm.tokenizer.encode(PROMPT)
        with torch.no_grad():
            ref = peft_model(torch.tensor([ids])).logits[0].numpy()
            gen = peft_model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False,
                                      eos_token_id=list(llm.eos), pad_token_id=2)
        got = _logits(llm, ids)
        assert np.abs(got - ref).max() < 1e-3
        assert (got.argmax(-1) == ref.argmax(-1)).all()
        base = _logits(LLM.load(smollm2_checkpoint, dtype=jnp.float32), ids)
        assert np.abs(base - ref).max() > 0.1  # the adapter does change the model
        print(f"LoRA vs PEFT: max |dlogit| {np.abs(got - ref).max():.2e}; the adapter moves "
              f"logits by up to {np.abs(base - ref).max():.2f}")
        out = llm.generate(ids, sampling=SamplingParams(temperature=0), max_new_tokens=16)
        assert out.token_ids == [int(t) for t in gen[0, len(ids):]]
        if lora_kw.get("use_rslora"):  # merged under a mesh: each weight keeps its sharding
            sharded = LLM.load(smollm2_checkpoint, dtype=jnp.float32, mesh="data:2,model:2",
                               lora=tmp_path / "adapter")
            plain = LLM.load(smollm2_checkpoint, dtype=jnp.float32, mesh="data:2,model:2")
            for key in ("wq", "wv", "w_down"):
                assert sharded.params["layers"][key].sharding == \
                    plain.params["layers"][key].sharding
            # float32 tensor-parallel rounding (docs/sharding.md), far below the adapter's
            np.testing.assert_allclose(_logits(sharded, ids), got, atol=5e-4, rtol=0)
    finally:
        peft_model.unload()  # hf_base is shared: take the adapter layers out again


def _tiny_hf(tmp_path: Path):
    import transformers as tf

    torch.manual_seed(0)
    hf_cfg = {k: v for k, v in TINY.to_hf().items() if k not in ("architectures", "model_type")}
    m = tf.LlamaForCausalLM(tf.LlamaConfig(**hf_cfg)).eval()
    m.save_pretrained(tmp_path / "hf")
    return m


def _convert(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "convert.py"), *args],
                          capture_output=True, text=True, timeout=300, env=env)


def test_convert_merges_as_peft_merge_and_unload(tmp_path):
    """convert.py --lora_adapter stores W + scale * B @ A in our layout: each projection
    equals PEFT's merge_and_unload weight."""
    m = _tiny_hf(tmp_path)
    merged = _adapter(m, tmp_path / "adapter", r=4, lora_alpha=12,
                      target_modules=ALL).merge_and_unload()
    r = _convert("--input", str(tmp_path / "hf"), "--output", str(tmp_path / "ck"),
                 "--notokenizer", "--lora_adapter", str(tmp_path / "adapter"))
    assert r.returncode == 0, r.stderr
    assert "merging LoRA adapter" in r.stderr
    _, w = load_checkpoint(tmp_path / "ck")
    sd = {k: v.detach().numpy() for k, v in merged.state_dict().items()}
    c = TINY
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        want = {"wq": sd[p + "self_attn.q_proj.weight"].T.reshape(c.d_model, c.num_heads, -1),
                "wo": sd[p + "self_attn.o_proj.weight"].T.reshape(c.num_heads, -1, c.d_model),
                "w_down": sd[p + "mlp.down_proj.weight"].T}
        for key, x in want.items():
            np.testing.assert_allclose(np.asarray(w["layers"][key][i]), x, atol=1e-6)


def _bad(tmp_path: Path, conf: dict | None = None, tensors: dict | None = None) -> Path:
    from safetensors.numpy import save_file

    d = tmp_path / "bad"
    d.mkdir(exist_ok=True)
    base = {"peft_type": "LORA", "r": 2, "lora_alpha": 4}
    (d / "adapter_config.json").write_text(json.dumps({**base, **(conf or {})}))
    p = "base_model.model.model.layers.0."
    D, F = TINY.d_model, TINY.mlp_dim
    good = {p + "mlp.up_proj.lora_A.weight": np.ones((2, D), np.float32),
            p + "mlp.up_proj.lora_B.weight": np.ones((F, 2), np.float32)}
    save_file(tensors if tensors is not None else good, str(d / "adapter_model.safetensors"))
    return d


@pytest.mark.parametrize("conf, tensors, match", [
    ({"use_dora": True}, None, "use_dora"),
    ({"bias": "all"}, None, "bias"),
    ({"modules_to_save": ["lm_head"]}, None, "modules_to_save"),
    ({"alpha_pattern": {"q_proj": 3}}, None, "alpha_pattern"),
    ({"peft_type": "IA3"}, None, "IA3"),
    (None, {"base_model.model.model.embed_tokens.lora_embedding_A": np.ones((2, 4),
                                                                         np.float32)},
     "unsupported adapter tensor"),
    (None, {"base_model.model.model.layers.0.mlp.up_proj.lora_A.weight":
            np.ones((2, TINY.d_model), np.float32)}, "lacks lora_B"),
    (None, {"base_model.model.model.layers.0.mlp.up_proj.lora_A.weight":
            np.ones((2, 3), np.float32),
            "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight":
            np.ones((TINY.mlp_dim, 2), np.float32)}, "the model needs"),
    (None, {"base_model.model.model.layers.99.mlp.up_proj.lora_A.weight":
            np.ones((2, TINY.d_model), np.float32)}, "layer 99"),
])
def test_unsupported_adapters_are_refused(tmp_path, conf, tensors, match):
    with pytest.raises(ConversionError, match=match):
        read_lora(_bad(tmp_path, conf, tensors), TINY)


def test_good_adapter_and_missing_dir(tmp_path):
    f = read_lora(_bad(tmp_path), TINY)
    assert set(f) == {"w_up"} and f["w_up"].a.shape == (TINY.num_layers, 2, TINY.d_model)
    d = f["w_up"].delta()
    assert d.shape == (TINY.num_layers, TINY.d_model, TINY.mlp_dim)
    np.testing.assert_allclose(d[0], 2 * 2.0)  # (alpha / r) * (B @ A) = 2 * 2
    assert not d[1:].any()
    with pytest.raises(ConversionError, match="adapter_config.json"):
        read_lora(tmp_path / "nope", TINY)


def test_generate_script_reports_a_bad_adapter(tmp_path, smollm2_checkpoint):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "generate.py"), "--prompt", "x",
                        "--checkpoint", str(smollm2_checkpoint), "--lora_adapter",
                        str(tmp_path / "nope")], capture_output=True, text=True, timeout=300,
                       env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error:")
    assert str(tmp_path / "nope") in r.stderr
