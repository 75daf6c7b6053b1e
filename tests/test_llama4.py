"""Llama 4 (Scout's layout: experts in every layer; Maverick's: every other) against
Hugging Face transformers (PyTorch, float32, eager attention), on tiny random checkpoints
transformers writes:
chunked attention on the RoPE layers (a query sees its own chunk of the positions), no
RoPE and a query temperature on every fourth layer, q/k RMS-normalised after RoPE, RoPE on
interleaved pairs, one routed expert per token whose input (not output) is scaled by the
sigmoid of its logit, and an ungated shared expert.

Chunks of 8 and a temperature floor of 4 positions, so 24-40-token prompts cross several
chunks and temperature steps.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
tf = pytest.importorskip("transformers")

from jaxinfer.attention import attention  # noqa: E402
from jaxinfer.config import ModelConfig  # noqa: E402
from jaxinfer.errors import ConfigError  # noqa: E402

from .hf_checkpoints import (  # noqa: E402
    check_decode_logits,
    check_each_matters,
    check_engine_greedy,
    check_expert_paths_agree,
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

TEXT = dict(vocab_size=97, hidden_size=64, intermediate_size=48, intermediate_size_mlp=96,
            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=1,
            attention_chunk_size=8, floor_scale=4, attn_scale=0.5,
            max_position_embeddings=64, eos_token_id=3, bos_token_id=2, pad_token_id=0)


def _hf_model():
    torch.manual_seed(0)
    m = tf.Llama4ForCausalLM(tf.Llama4TextConfig(**TEXT))
    return sharpened(m, norm=0.3, matrix=0.15)


@pytest.fixture(scope="module")
def llama4(tmp_path_factory):
    return saved_and_loaded("llama4", _hf_model(), tmp_path_factory)


def test_config_read_from_checkpoint(llama4):
    _, _, cfg, w = llama4
    assert (cfg.num_experts, cfg.experts_per_token, cfg.mlp_dim) == (4, 1, 48)
    assert cfg.moe_scale_inputs and cfg.shared_expert_dim == 48 and not cfg.shared_expert_gate
    assert cfg.chunked_local and cfg.sliding_window == 8
    assert cfg.local_layers == (True, True, True, False)
    assert cfg.nope_layers == (False, False, False, True)
    assert cfg.qk_l2_norm and cfg.rope_interleaved
    assert cfg.attn_temperature == (0.5, 4) and cfg.attn_temperature_nope
    assert w["layers"]["moe_gate"].shape == (4, 4, 64, 48)
    assert "shared_router" not in w["layers"]


def test_logits_match_transformers(llama4):
    """All positions of a 40-token prompt (five chunks), then prefill + one-token decode
    steps through the cache with every attention impl that takes chunks."""
    _, m, cfg, w = llama4
    check_decode_logits(m, cfg, w, [("xla", 64), ("pallas_interpret", 64)])


def test_chunked_attention_impls_agree():
    """The chunked mask through the reference, the chunked XLA decode loop and the Pallas
    decode kernel (interpret mode), rows at different positions of a 512-slot cache."""
    B, N, K, H, S = 3, 4, 2, 16, 512
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (B, 1, N, H))
    k = jax.random.normal(ks[1], (B, K, S, H))
    v = jax.random.normal(ks[2], (B, K, S, H))
    pos = jnp.asarray([[5], [300], [511]], jnp.int32)
    window = jnp.int32(128)
    ref = attention(q, k, v, pos, "xla", window=window, chunked=True)
    for impl in ("xla_chunked", "pallas_interpret"):
        got = attention(q, k, v, pos, impl, window=window, chunked=True)
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5, rtol=0)
    sliding = attention(q, k, v, pos, "xla", window=window)
    assert np.abs(np.asarray(sliding - ref)).max() > 1e-2  # (300: chunk 256.., window 173..)


def test_every_difference_matters(llama4):
    _, m, cfg, w = llama4
    offs = [dict(chunked_local=False), dict(qk_l2_norm=False),
            dict(attn_temperature=None, attn_temperature_nope=False), dict(nope_layers=()),
            dict(moe_scale_inputs=False, norm_topk=False),
            ({}, lambda w: left_interleaved(w))]
    check_each_matters(m, cfg, w, offs, tokens(40))


def test_gathered_and_dense_experts_agree(llama4):
    """The two ways moe() runs the experts agree with input scaling."""
    _, _, cfg, w = llama4
    check_expert_paths_agree(cfg, w)


def test_greedy_generation_matches_transformers(llama4):
    _, m, cfg, w = llama4
    check_greedy_generation(m, cfg, w, n=24)


@pytest.mark.slow
def test_engine_matches_transformers(llama4):
    """Chunked prefill of 8-token chunks, then the prefix cache."""
    _, m, cfg, w = llama4
    check_engine_greedy(m, cfg, w, n=24)


def test_checkpoint_round_trip_and_mesh(llama4, tmp_path):
    _, m, cfg, w = llama4
    check_orbax_round_trip(m, cfg, w, tokens(20), tmp_path)
    check_sharded_equals_one_device(cfg, w)


def test_multimodal_checkpoint_and_refusals(tmp_path):
    """A Llama4ForConditionalGeneration config reads its text_config; expert layers at
    other places than every interleave_moe_layer_step-th are refused by name."""
    text = {**TEXT, "model_type": "llama4_text"}
    cfg = ModelConfig.from_hf({"model_type": "llama4", "text_config": text,
                               "architectures": ["Llama4ForConditionalGeneration"]})
    assert cfg.name == "Llama4ForConditionalGeneration" and cfg.moe_scale_inputs
    with pytest.raises(ConfigError, match="moe_layers"):
        ModelConfig.from_hf({**text, "interleave_moe_layer_step": 2, "moe_layers": [0, 2]})
    with pytest.raises(ConfigError, match="moe_every"):
        cfg.replace(moe_every=3, dense_mlp_dim=96)  # (4 layers)


@pytest.fixture(scope="module")
def maverick(tmp_path_factory):
    torch.manual_seed(1)
    m = tf.Llama4ForCausalLM(tf.Llama4TextConfig(**{**TEXT, "interleave_moe_layer_step": 2}))
    return saved_and_loaded("maverick", sharpened(m, norm=0.3, matrix=0.3), tmp_path_factory)


def test_maverick_dense_layers_between_expert_ones(maverick, tmp_path):
    """Maverick's layout: experts in layers 1 and 3, dense MLPs of their own width in 0 and
    2 (a second stack, run in one scan over (dense, experts) pairs). Logits within 1e-4
    through prefill and decode; the dense stack matters (swapping its layers breaks it)."""
    _, m, cfg, w = maverick
    assert (cfg.moe_every, cfg.num_dense_layers, cfg.dense_mlp_dim) == (2, 2, 96)
    assert [cfg.layer_slot(n) for n in range(4)] == [
        ("dense_layers", 0), ("layers", 0), ("dense_layers", 1), ("layers", 1)]
    assert w["dense_layers"]["w_gate"].shape == (2, 64, 96)
    assert w["layers"]["moe_gate"].shape == (2, 4, 64, 48)
    check_decode_logits(m, cfg, w)
    toks = tokens(40)
    swapped = dict(w, dense_layers=jax.tree.map(lambda a: a[::-1], w["dense_layers"]))
    assert np.abs(ours(cfg, swapped, toks) - hf_logits(m, toks)).max() > 1e-2


@pytest.mark.slow
def test_maverick_generation_checkpoint_and_mesh(maverick, tmp_path):
    _, m, cfg, w = maverick
    check_greedy_generation(m, cfg, w, n=24)
    check_orbax_round_trip(m, cfg, w, tokens(20), tmp_path)
    check_sharded_equals_one_device(cfg, w)
