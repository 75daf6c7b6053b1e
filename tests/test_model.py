"""The pure model against Hugging Face transformers on tiny random Llama/Qwen2 shapes,
and prefill/decode consistency on the cache."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxinfer import kv_cache, model
from jaxinfer.config import ModelConfig
from jaxinfer.convert.safetensors import load_hf_dir

from .helpers import TINY, tiny_weights


def _hf_pair(tmp_path, cfg: ModelConfig, qwen: bool = False):
    import transformers as tf

    torch.manual_seed(0)
    hf_cfg = {k: v for k, v in cfg.to_hf().items() if k not in ("architectures", "model_type")}
    if qwen:
        hf = tf.Qwen2ForCausalLM(tf.Qwen2Config(**hf_cfg)).eval()
    else:
        hf = tf.LlamaForCausalLM(tf.LlamaConfig(**hf_cfg)).eval()
    hf.save_pretrained(tmp_path)
    cfg2, w = load_hf_dir(tmp_path)
    return hf, cfg2, w


@pytest.mark.parametrize("variant", ["llama", "llama_tied", "qwen2_bias", "llama3_rope"])
def test_forward_matches_hf(tmp_path, variant):
    cfg = TINY.replace(tie_embeddings=variant == "llama_tied", qkv_bias=variant == "qwen2_bias",
                       rope_scaling=(8.0, 1.0, 4.0, 64) if variant == "llama3_rope" else None)
    hf, cfg2, w = _hf_pair(tmp_path, cfg, qwen=variant == "qwen2_bias")
    if cfg.qkv_bias:  # random init leaves biases at zero; make them matter
        for n in ("q", "k", "v"):
            for _i, layer in enumerate(hf.model.layers):
                b = getattr(layer.self_attn, f"{n}_proj").bias
                b.data = torch.randn_like(b) * 0.5
        hf.save_pretrained(tmp_path)
        cfg2, w = load_hf_dir(tmp_path)
    assert cfg2.tie_embeddings == cfg.tie_embeddings and cfg2.qkv_bias == cfg.qkv_bias
    toks = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 40))
    with torch.no_grad():
        ref = hf(torch.tensor(toks)).logits.numpy()
    cache = kv_cache.init_cache(cfg2, 2, 64)
    logits, cache = model.forward(w, jnp.asarray(toks), cache, cfg2)
    np.testing.assert_allclose(np.asarray(logits), ref, atol=2e-5, rtol=0)
    assert list(np.asarray(cache.lengths)) == [40, 40]


def test_prefill_then_decode_equals_full_forward():
    w = tiny_weights()
    toks = np.random.RandomState(1).randint(0, TINY.vocab_size, (3, 24))
    full, _ = model.forward(w, jnp.asarray(toks), kv_cache.init_cache(TINY, 3, 64), TINY)
    full = np.asarray(full)
    lens = np.array([5, 11, 1], np.int32)
    padded = np.zeros((3, 16), np.int32)
    for b, n in enumerate(lens):
        padded[b, :n] = toks[b, :n]
    cache = kv_cache.init_cache(TINY, 3, 64)
    logits, cache = model.prefill(w, jnp.asarray(padded), jnp.asarray(lens), cache, TINY)
    for b, n in enumerate(lens):
        np.testing.assert_allclose(np.asarray(logits)[b], full[b, n - 1], atol=1e-5)
    # Rows at different lengths decode together; padding garbage in the cache is hidden.
    for t in range(6):
        nxt = np.array([toks[b, lens[b] + t] for b in range(3)], np.int32)
        logits, cache = model.decode_step(w, jnp.asarray(nxt), cache, TINY)
        for b in range(3):
            np.testing.assert_allclose(np.asarray(logits)[b], full[b, lens[b] + t], atol=1e-5)
    assert list(np.asarray(cache.lengths)) == list(lens + 6)


def test_prefill_continues_a_nonempty_cache():
    """Chunked prefill: two chunks give the same logits as one."""
    w = tiny_weights()
    toks = np.random.RandomState(2).randint(0, TINY.vocab_size, (1, 20))
    full, _ = model.forward(w, jnp.asarray(toks), kv_cache.init_cache(TINY, 1, 32), TINY)
    cache = kv_cache.init_cache(TINY, 1, 32)
    _, cache = model.prefill(w, jnp.asarray(toks[:, :12]), jnp.asarray([12]), cache, TINY)
    logits, cache = model.prefill(w, jnp.asarray(toks[:, 12:]), jnp.asarray([8]), cache, TINY)
    np.testing.assert_allclose(np.asarray(logits)[0], np.asarray(full)[0, -1], atol=1e-5)


def test_cache_is_donated():
    w = tiny_weights()
    cache = kv_cache.init_cache(TINY, 1, 32)
    k_before = cache.k
    _, cache2 = model.decode_step(w, jnp.asarray([1]), cache, TINY)
    assert k_before.is_deleted(), "decode_step must donate the KV cache"
    assert not cache2.k.is_deleted()


def test_bfloat16_path_close_to_float32():
    w = tiny_weights()
    w16 = tiny_weights(dtype=jnp.bfloat16)
    toks = jnp.asarray(np.random.RandomState(3).randint(0, TINY.vocab_size, (1, 12)))
    a, _ = model.forward(w, toks, kv_cache.init_cache(TINY, 1, 16), TINY)
    b, _ = model.forward(w16, toks, kv_cache.init_cache(TINY, 1, 16, jnp.bfloat16), TINY)
    assert b.dtype == jnp.float32  # logits always come out in float32
    assert np.abs(np.asarray(a) - np.asarray(b)).max() < 0.1 * np.abs(np.asarray(a)).max()
