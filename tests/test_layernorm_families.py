"""The LayerNorm families against Hugging Face transformers (PyTorch, float32, eager
attention): Cohere (Command R, Aya: LayerNorm without bias, attention and MLP side by
side, interleaved RoPE pairs, per-head q/k LayerNorm, a logit scale), Cohere2 (Command
R7B, Command A: three sliding-window layers with RoPE, then a global one without),
StableLM 2 (LayerNorm with bias, a quarter of each head rotated, q/k/v biases; the 12B's
parallel block and per-head q/k LayerNorms), StarCoder2 (a plain GELU MLP, biases on
every projection, a sliding window), Phi-2 (the same MLP side by side with attention,
partial rotary, an lm_head bias) and GPT-NeoX (Pythia: q/k/v fused per head, exact GELU,
a quarter of each head rotated, attention and the MLP side by side with a norm each, or
one after the other).

The checkpoints are tiny random ones transformers writes itself; no real one is reachable
here.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
tf = pytest.importorskip("transformers")

from jaxinfer import kv_cache, model  # noqa: E402
from jaxinfer.convert.safetensors import load_hf_dir  # noqa: E402
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
    without_layer_weights,
)

COMMON = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
              eos_token_id=3, bos_token_id=2, pad_token_id=0)
KINDS = ("cohere", "cohere2", "stablelm", "stablelm_parallel", "starcoder2", "phi", "gpt_neox",
         "gpt_neox_sequential")


def _hf_model(kind: str, heads: int = 4, **changes):
    """heads=2 (head_dim 32) for GGUF blocks, which must not straddle heads; `changes`
    override the config."""
    torch.manual_seed(0)
    common = {**COMMON, "num_attention_heads": heads, "num_key_value_heads": heads // 2,
              **changes}
    if kind == "cohere":
        m = tf.CohereForCausalLM(tf.CohereConfig(**common, use_qk_norm=True, logit_scale=0.25))
    elif kind == "cohere2":
        m = tf.Cohere2ForCausalLM(tf.Cohere2Config(**common, sliding_window=6,
                                                   logit_scale=0.5))
    elif kind == "starcoder2":
        m = tf.Starcoder2ForCausalLM(tf.Starcoder2Config(**{
            "sliding_window": 10, "tie_word_embeddings": False, **common}))
    elif kind == "phi":
        m = tf.PhiForCausalLM(tf.PhiConfig(**{"partial_rotary_factor": 0.5, **common}))
    elif kind.startswith("gpt_neox"):  # (no grouped-query attention)
        del common["num_key_value_heads"]
        m = tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(
            **common, use_parallel_residual=kind == "gpt_neox"))
    else:
        m = tf.StableLmForCausalLM(tf.StableLmConfig(
            **common, use_qkv_bias=True, use_parallel_residual=kind == "stablelm_parallel",
            qk_layernorm=kind == "stablelm_parallel"))
    return sharpened(m, norm=0.3, matrix=0.15, bias=0.1)


@pytest.fixture(scope="module", params=KINDS)
def family(request, tmp_path_factory):
    """(kind, HF model, our config, our weights) from a directory transformers wrote."""
    return saved_and_loaded(request.param, _hf_model(request.param), tmp_path_factory)


def test_config_read_from_checkpoint(family):
    kind, _, cfg, w = family
    L = w["layers"]
    assert cfg.layer_norm and not cfg.llama_layers
    assert cfg.qk_norm_heads == (kind not in ("starcoder2", "phi", "gpt_neox",
                                              "gpt_neox_sequential"))
    if kind.startswith("cohere"):
        assert cfg.parallel_block and cfg.tie_embeddings and cfg.rope_interleaved
        assert "mlp_norm" not in L and not cfg.norm_bias
    if kind == "cohere":
        assert cfg.logits_scaling == 4.0 and cfg.qk_norm and L["q_norm"].shape == (4, 4, 16)
    if kind == "cohere2":
        assert cfg.sliding_window == 6 and cfg.logits_scaling == 2.0
        assert cfg.local_layers == (True, True, True, False)
        assert cfg.nope_layers == (False, False, False, True)
    if kind.startswith("stablelm"):
        assert cfg.norm_bias and cfg.qkv_bias and cfg.rope_dim == 4 and not cfg.tie_embeddings
        assert L["attn_norm_bias"].shape == (4, 64) and w["final_norm_bias"].shape == (64,)
    if kind == "stablelm":
        assert not cfg.parallel_block and not cfg.qk_norm and "mlp_norm_bias" in L
    if kind == "stablelm_parallel":
        assert cfg.parallel_block and cfg.qk_norm and L["k_norm"].shape == (4, 2, 16)
    if kind in ("starcoder2", "phi"):
        assert cfg.norm_bias and cfg.qkv_bias and cfg.linear_bias and not cfg.mlp_gated
        assert "w_gate" not in L and L["b_up"].shape == (4, 96) and L["bo"].shape == (4, 64)
        assert cfg.activation == "gelu_tanh" and not cfg.tie_embeddings
    if kind == "starcoder2":
        assert cfg.sliding_window == 10 and not cfg.parallel_block and not cfg.lm_head_bias
    if kind == "phi":
        assert cfg.parallel_block and cfg.lm_head_bias and cfg.rope_dim == 8
        assert w["lm_head_bias"].shape == (97,)
    if kind.startswith("gpt_neox"):
        assert cfg.norm_bias and cfg.qkv_bias and cfg.linear_bias and not cfg.mlp_gated
        assert cfg.activation == "gelu" and cfg.rope_dim == 4 and cfg.num_kv_heads == 4
        assert not cfg.tie_embeddings and not cfg.lm_head_bias and "mlp_norm_bias" in L
        assert cfg.parallel_block == cfg.parallel_mlp_norm == (kind == "gpt_neox")


def test_logits_match_transformers(family):
    """All positions of a 40-token prompt, then prefill + one-token decode steps through
    the cache (reference and Pallas-kernel attention)."""
    _, m, cfg, w = family
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


def _sequential(w):
    """The same weights run as a sequential block (the MLP norm a copy of attention's)."""
    layers = dict(w["layers"], mlp_norm=w["layers"]["attn_norm"])
    if "attn_norm_bias" in layers:
        layers["mlp_norm_bias"] = layers["attn_norm_bias"]
    return dict(w, layers=layers)


def _without_final_norm_bias(w):
    return dict(w, final_norm_bias=jnp.zeros_like(w["final_norm_bias"]))


# GPT-NeoX's parallel MLP reading attention's norm instead of its own; no linear biases
_attention_norm_for_mlp = without_layer_weights("mlp_norm", "mlp_norm_bias")
_without_biases = without_layer_weights("bo", "b_up", "b_down")


_OFF = {"cohere": [(dict(layer_norm=False), None), (dict(logits_scaling=1.0), None),
                   (dict(qk_norm=False), None), (dict(parallel_block=False), _sequential),
                   ({}, left_interleaved)],
        "cohere2": [(dict(layer_norm=False), None), (dict(nope_layers=()), None),
                    (dict(sliding_window=None), None), (dict(parallel_block=False),
                                                        _sequential), ({}, left_interleaved)],
        "stablelm": [(dict(layer_norm=False), None), (dict(rope_dim=None), None),
                     ({}, _without_final_norm_bias)],
        "stablelm_parallel": [(dict(qk_norm=False), None),
                              (dict(parallel_block=False), _sequential)],
        "starcoder2": [(dict(sliding_window=None), None), (dict(layer_norm=False), None),
                       (dict(linear_bias=False), _without_biases)],
        "phi": [(dict(rope_dim=None), None), (dict(lm_head_bias=False), None),
                (dict(linear_bias=False), _without_biases),
                (dict(parallel_block=False), _sequential)],
        "gpt_neox": [(dict(rope_dim=None), None), (dict(activation="silu"), None),
                     (dict(linear_bias=False), _without_biases),
                     (dict(parallel_mlp_norm=False), _attention_norm_for_mlp),
                     (dict(parallel_block=False, parallel_mlp_norm=False), None)],
        "gpt_neox_sequential": [(dict(rope_dim=None), None),
                                (dict(parallel_block=True, parallel_mlp_norm=True), None)]}


def test_every_difference_matters(family):
    """Each switch turned off (or Cohere's q/k left in the checkpoint's order) moves the
    logits by more than 1e-2."""
    kind, m, cfg, w = family
    check_each_matters(m, cfg, w, _OFF[kind], tokens(40))


def test_greedy_generation_matches_transformers(family):
    """transformers' greedy tokens from a 20-token prompt, 30 new ones, through
    LLM.generate."""
    _, m, cfg, w = family
    check_greedy_generation(m, cfg, w)


@pytest.mark.slow
def test_engine_matches_transformers(family):
    """The same through the engine: chunked prefill, then the prefix cache."""
    _, m, cfg, w = family
    check_engine_greedy(m, cfg, w)


def test_checkpoint_round_trip(family, tmp_path):
    _, m, cfg, w = family
    check_orbax_round_trip(m, cfg, w, tokens(20), tmp_path)


def test_sharded_equals_one_device(family):
    """Under data:2,model:2 (heads, KV heads and the MLP split; norm biases replicated)."""
    _, _, cfg, w = family
    ws = check_sharded_equals_one_device(cfg, w)
    assert ws["layers"]["wq"].sharding.spec[2] == "model"


_LORA_TARGETS = {"cohere": ["q_proj", "k_proj", "v_proj", "o_proj"],
                 "phi": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
                 "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]}


@pytest.mark.parametrize("kind", list(_LORA_TARGETS))
def test_lora_matches_peft(tmp_path, kind):
    """A PEFT adapter on Cohere's q/k/v/o (whose q/k rows pair RoPE dims interleaved, so
    its B factors are reordered as the weights are), on Phi-2's attention and plain MLP
    (its own module names) or on GPT-NeoX's (its q/k/v fused per head): merged, the logits
    equal PEFT's unmerged forward within 1e-4; served unmerged per row, the greedy tokens
    equal PEFT's."""
    peft = pytest.importorskip("peft")
    from jaxinfer.convert.lora import merge_lora, read_lora

    base = _hf_model(kind)
    base.save_pretrained(tmp_path / "hf")
    cfg, w = load_hf_dir(tmp_path / "hf")
    torch.manual_seed(1)
    pm = peft.get_peft_model(base, peft.LoraConfig(
        r=4, lora_alpha=8, init_lora_weights=False, target_modules=_LORA_TARGETS[kind]))
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
    merged = jax.tree.map(jnp.asarray, merge_lora(w, read_lora(tmp_path / "adapter", cfg)))
    np.testing.assert_allclose(ours(cfg, merged, toks), ref, atol=1e-4, rtol=0)
    assert np.abs(ours(cfg, jax.tree.map(jnp.asarray, w), toks) - ref).max() > 1e-2
    llm = LLM(cfg, jax.tree.map(jnp.asarray, w), CharTokenizer())
    llm.add_adapters({"a": tmp_path / "adapter"})
    got = llm.generate([list(map(int, t)) for t in toks],
                       SamplingParams(temperature=0, min_tokens=8), max_new_tokens=8,
                       adapter="a")
    assert [c.token_ids for c in got] == greedy.tolist()


# GPT-NeoX's tensor names as the other families' (whose GGUF names the writer knows)
_NEOX_NAMES = {"gpt_neox.embed_in.weight": "model.embed_tokens.weight",
               "gpt_neox.final_layer_norm.weight": "model.final_layernorm.weight",
               "gpt_neox.final_layer_norm.bias": "model.final_layernorm.bias",
               "embed_out.weight": "lm_head.weight"}
_NEOX_MODULES = {"attention.query_key_value": "self_attn.qkv_proj",
                 "attention.dense": "self_attn.dense", "mlp.dense_h_to_4h": "mlp.fc1",
                 "mlp.dense_4h_to_h": "mlp.fc2"}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("quantized", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_gguf_matches_transformers(tmp_path, kind, quantized):
    """A GGUF as llama.cpp's converter writes it (`command-r`, `cohere2`, `stablelm`,
    `starcoder2`, `phi2`, `gptneox`: q/k rows as the checkpoint has them, interleaved for
    Cohere; per-head q/k norms stacked [N, H]; LayerNorm and projection biases; the logit
    scale, window, rotary dims and GPT-NeoX's parallel residual as metadata; no ffn_norm in
    a parallel block but GPT-NeoX's; Phi-2's q/k/v fused as older files have them, GPT-NeoX's
    regrouped into q, k, v), Q8_0 matrices read dequantized or as QArrays, against
    transformers on the same (Q8_0-exact) weights."""
    import gguf

    from jaxinfer.config import ModelConfig
    from jaxinfer.convert.gguf import load_gguf

    from .test_convert import _roundtrip, _write_gguf

    q8 = gguf.GGMLQuantizationType.Q8_0
    m = _hf_model(kind, heads=2)
    sd = _roundtrip({k: v.numpy().copy() for k, v in m.state_dict().items()}, q8)
    m.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})
    if m.config.tie_word_embeddings:  # llama.cpp writes no output.weight then
        sd.pop("lm_head.weight", None)
    for layer in range(m.config.num_hidden_layers):  # llama.cpp stacks StableLM's norms
        p = f"model.layers.{layer}.self_attn."
        for q in "qk":
            heads = [sd.pop(f"{p}{q}_layernorm.norms.{h}.weight")
                     for h in range(4) if f"{p}{q}_layernorm.norms.{h}.weight" in sd]
            if heads:
                sd[f"{p}{q}_norm.weight"] = np.stack(heads)
    hf_cfg = ModelConfig.from_hf(m.config.to_dict())
    arch = {"cohere": "command-r", "cohere2": "cohere2", "starcoder2": "starcoder2",
            "phi": "phi2", "gpt_neox": "gptneox", "gpt_neox_sequential": "gptneox"
            }.get(kind, "stablelm")
    if arch == "gptneox":  # llama.cpp's names; q/k/v regrouped from [N, 3, H] to [3, N, H]
        sd = {_NEOX_NAMES.get(k, k).replace("gpt_neox.layers.", "model.layers."): v
              for k, v in sd.items()}
        for k in [k for k in sd if ".attention." in k or ".mlp.dense" in k]:
            a = sd.pop(k)
            if "query_key_value" in k:
                heads = m.config.num_attention_heads
                a = a.reshape(heads, 3, -1, *a.shape[1:]).swapaxes(0, 1).reshape(a.shape)
            for old, new in _NEOX_MODULES.items():
                k = k.replace(old, new)
            sd[k] = a
    if kind == "phi":  # as older Phi-2 files: q/k/v fused into attn_qkv, biases too
        for layer in range(m.config.num_hidden_layers):
            p = f"model.layers.{layer}.self_attn."
            for kind_ in ("weight", "bias"):
                sd[f"{p}qkv_proj.{kind_}"] = np.concatenate(
                    [sd.pop(f"{p}{q}_proj.{kind_}") for q in "qkv"])

    def meta(w):
        w.add_layer_norm_eps(hf_cfg.rms_norm_eps)
        if arch in ("stablelm", "phi2", "gptneox"):
            w.add_rope_dimension_count(hf_cfg.rope_dim)
        if arch == "gptneox":
            w.add_parallel_residual(hf_cfg.parallel_block)
        elif arch == "starcoder2":
            w.add_sliding_window(10)
        else:
            w.add_logit_scale(1.0 / hf_cfg.logits_scaling)
        if arch == "cohere2":
            w.add_sliding_window(6)

    _write_gguf(tmp_path / "g.gguf", hf_cfg, sd, arch, q8, meta=meta)
    cfg, w = load_gguf(tmp_path / "g.gguf", quantized=quantized)
    for f in ("layer_norm", "norm_bias", "parallel_block", "qk_norm", "qk_norm_heads",
              "qkv_bias", "rope_dim", "rope_interleaved", "logits_scaling", "sliding_window",
              "local_layers", "nope_layers", "tie_embeddings", "mlp_gated", "linear_bias",
              "lm_head_bias", "activation", "parallel_mlp_norm"):
        assert getattr(cfg, f) == getattr(hf_cfg, f), f
    toks = tokens(40)
    got = ours(cfg, jax.tree.map(jnp.asarray, w), toks)
    np.testing.assert_allclose(got, hf_logits(m, toks), atol=1e-4, rtol=0)
