"""Phi-3.5-MoE against Hugging Face transformers (PyTorch, float32, eager attention), on a
tiny random checkpoint transformers writes: the sparsemixer router (two experts, each
weighed by its softmax over the experts near it), LayerNorm with biases, biases on q/k/v/o
and the lm_head, LongRoPE with its mscale, a sliding window (6) and Mixtral's expert
layout.
"""

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
tf = pytest.importorskip("transformers")

from jaxinfer.config import ModelConfig  # noqa: E402
from jaxinfer.errors import ConfigError  # noqa: E402
from jaxinfer.moe import route  # noqa: E402

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

# transformers' PhiMoE (5.x) rotates by the short factors at any length, where the model's own
# code and vLLM take the long ones past the original context (as jaxinfer does, by the
# cache length: Phi-3's rule); every context here is within it, so the two agree.
ORIG = 256
SHORT, LONG = [1.0, 1.5, 2.0, 3.0, 1.2, 2.5, 1.1, 4.0], [2.0, 1.0, 3.5, 1.5, 2.2, 1.3, 3.0, 1.7]
CONFIG = dict(vocab_size=97, hidden_size=64, intermediate_size=48, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
              num_experts_per_tok=2, sliding_window=6, max_position_embeddings=512,
              attention_bias=True, lm_head_bias=True, router_jitter_noise=0.3,
              eos_token_id=3, bos_token_id=2, pad_token_id=0,
              rope_parameters={"rope_type": "longrope", "rope_theta": 10_000.0,
                               "short_factor": SHORT, "long_factor": LONG,
                               "short_mscale": 1.25, "long_mscale": 1.25,
                               "original_max_position_embeddings": ORIG})


def _hf_model():
    torch.manual_seed(0)
    return sharpened(tf.PhimoeForCausalLM(tf.PhimoeConfig(**CONFIG)), norm=0.3, matrix=0.15,
                     bias=0.3)


@pytest.fixture(scope="module")
def phimoe(tmp_path_factory):
    return saved_and_loaded("phimoe", _hf_model(), tmp_path_factory)


def test_config_read_from_checkpoint(phimoe):
    _, _, cfg, w = phimoe
    assert (cfg.num_experts, cfg.experts_per_token, cfg.mlp_dim) == (4, 2, 48)
    assert cfg.router_sparsemixer == 0.3 and cfg.layer_norm and cfg.norm_bias
    assert cfg.qkv_bias and cfg.o_bias and cfg.lm_head_bias and not cfg.linear_bias
    assert cfg.sliding_window == 6 and cfg.local_layers == ()
    assert cfg.rope_longrope == (tuple(SHORT), tuple(LONG), ORIG)
    assert cfg.rope_attention_factor == 1.25 and cfg.max_seq_len == 512
    L = w["layers"]
    assert L["bo"].shape == (4, 64) and "moe_b_gate" not in L and "b_up" not in L
    assert L["mlp_norm_bias"].shape == (4, 64) and w["lm_head_bias"].shape == (97,)


def test_logits_match_transformers(phimoe):
    """All positions of a 40-token prompt, then decode steps through the cache (the
    chosen-experts path), with the reference and the Pallas kernel (interpret mode)."""
    _, m, cfg, w = phimoe
    check_decode_logits(m, cfg, w, [("xla", 64), ("pallas_interpret", 64)])


def test_sparsemixer_routing_matches_transformers():
    """Our router's weights and experts equal transformers' sparsemixer on random logits,
    ties of near experts included (several within the threshold of the best, or none)."""
    from transformers.models.phimoe.modeling_phimoe import sparsemixer

    cfg = ModelConfig(vocab_size=8, d_model=16, mlp_dim=8, num_layers=1, num_heads=2,
                      num_kv_heads=2, head_dim=8, num_experts=16, experts_per_token=2,
                      router_sparsemixer=0.05)
    logits = np.random.default_rng(0).normal(size=(1, 64, 16)).astype(np.float32)
    logits[0, :8] = np.abs(logits[0, :8]) * 0.01 + 3.0  # many experts close to the best
    weights, ids = route(cfg, jnp.asarray(logits), jnp.eye(16))
    ref_w, ref_ids = sparsemixer(torch.tensor(logits[0]), jitter_eps=0.05, training=False)
    np.testing.assert_array_equal(np.asarray(ids[0]), ref_ids.numpy())
    np.testing.assert_allclose(np.asarray(weights[0]), ref_w.numpy(), atol=1e-6, rtol=0)
    assert (ref_w.numpy() < 0.99).any() and (ref_w.numpy() > 0.999).any()


def test_sparsemixer_needs_two_experts():
    with pytest.raises(ConfigError, match="experts_per_token=2"):
        ModelConfig(vocab_size=8, d_model=16, mlp_dim=8, num_layers=1, num_heads=2,
                    num_kv_heads=2, head_dim=8, num_experts=4, experts_per_token=1,
                    router_sparsemixer=0.01)


def test_every_difference_matters(phimoe):
    """Each switch off moves the logits by more than 1e-2; so does plain softmax top-2
    routing in the sparsemixer's place."""
    _, m, cfg, w = phimoe

    offs = [dict(router_sparsemixer=None), dict(rope_attention_factor=1.0),
            dict(sliding_window=None), dict(layer_norm=False),
            (dict(o_bias=False), without_layer_weights("bo")),
            (dict(lm_head_bias=False), lambda w: {k: v for k, v in w.items()
                                                  if k != "lm_head_bias"})]
    check_each_matters(m, cfg, w, offs, tokens(40))


def test_gathered_and_dense_experts_agree(phimoe):
    _, _, cfg, w = phimoe
    check_expert_paths_agree(cfg, w)


def test_greedy_generation_matches_transformers(phimoe):
    _, m, cfg, w = phimoe
    check_greedy_generation(m, cfg, w, n=24)


def test_checkpoint_round_trip_and_mesh(phimoe, tmp_path):
    _, m, cfg, w = phimoe
    check_orbax_round_trip(m, cfg, w, tokens(20), tmp_path)
    check_sharded_equals_one_device(cfg, w)


def test_unequal_mscales_are_refused():
    rope = dict(CONFIG["rope_parameters"], long_mscale=1.5)
    with pytest.raises(ConfigError, match="short_mscale == long_mscale"):
        ModelConfig.from_hf(tf.PhimoeConfig(**{**CONFIG, "rope_parameters": rope}).to_dict())


@pytest.mark.slow
def test_engine_matches_transformers(phimoe):
    """Chunked prefill of 8-token chunks, then the prefix cache."""
    _, m, cfg, w = phimoe
    check_engine_greedy(m, cfg, w, n=24)


@pytest.mark.slow
def test_expert_parallel(phimoe):
    """Experts split over `expert`, tensor-parallel over `model`: equal to one device."""
    _, _, cfg, w = phimoe
    check_expert_parallel(cfg, w)

