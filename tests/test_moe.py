"""Mixture-of-experts models (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, MiniMax-M2) against Hugging
Face transformers
(PyTorch, float32, eager attention) on tiny random checkpoints transformers writes itself
(no MoE checkpoint is reachable here)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
tf = pytest.importorskip("transformers")

from jaxinfer import kv_cache, model  # noqa: E402
from jaxinfer.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from jaxinfer.config import ModelConfig  # noqa: E402
from jaxinfer.engine import Engine, EngineConfig  # noqa: E402
from jaxinfer.errors import ConfigError, ConversionError  # noqa: E402
from jaxinfer.llm import LLM  # noqa: E402
from jaxinfer.moe import moe  # noqa: E402
from jaxinfer.sampling import SamplingParams  # noqa: E402

from .engine_helpers import CharTokenizer  # noqa: E402
from .hf_checkpoints import check_expert_paths_agree, saved_and_loaded  # noqa: E402
from .hf_checkpoints import hf_logits as _hf_logits  # noqa: E402
from .hf_checkpoints import tokens as _tokens  # noqa: E402

COMMON = dict(vocab_size=97, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, head_dim=32, num_experts_per_tok=2, eos_token_id=3,
              max_position_embeddings=512)


def _hf_model(kind: str):
    torch.manual_seed(0)
    if kind == "mixtral":
        m = tf.MixtralForCausalLM(tf.MixtralConfig(intermediate_size=64, num_local_experts=6,
                                                   **COMMON))
    elif kind == "qwen2_moe":  # a gated shared expert beside the routed ones, q/k/v biases
        m = tf.Qwen2MoeForCausalLM(tf.Qwen2MoeConfig(
            intermediate_size=96, moe_intermediate_size=64, shared_expert_intermediate_size=96,
            num_experts=6, norm_topk_prob=False, **COMMON))
    elif kind == "olmoe":  # q/k RMS-normalised across all heads, unnormalised top-k
        m = tf.OlmoeForCausalLM(tf.OlmoeConfig(  # (its q/k norms are hidden_size wide)
            intermediate_size=64, num_experts=6, **{**COMMON, "num_attention_heads": 2}))
    elif kind == "minimax_m2":  # sigmoid routing with a choice bias, q/k normed across
        # all heads, RoPE on half of each head (the release's rotary_dim 64 of 128)
        m = tf.MiniMaxM2ForCausalLM(tf.MiniMaxM2Config(
            intermediate_size=64, num_local_experts=6, rotary_dim=16, bos_token_id=1,
            **COMMON))
    else:  # unnormalised top-k weights, as Qwen3-MoE configs may ask
        m = tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(
            intermediate_size=96, moe_intermediate_size=64, num_experts=6,
            norm_topk_prob=False, **COMMON))
    with torch.no_grad():  # larger than the default init: routing and experts matter
        for _, p in m.named_parameters():
            p.copy_((0.15 if p.ndim == 2 else 1.0) * torch.randn_like(p) + (p.ndim == 1))
        for layer in m.model.layers if kind == "minimax_m2" else ():  # a buffer, not a
            bias = layer.mlp.e_score_correction_bias  # parameter: it picks experts here
            bias.copy_(0.5 * torch.randn_like(bias))
    m.config._attn_implementation = "eager"
    return m.eval()


@pytest.fixture(scope="module", params=["mixtral", "qwen2_moe", "qwen3_moe", "olmoe",
                                        "minimax_m2"])
def moe_model(request, tmp_path_factory):
    return saved_and_loaded(request.param, _hf_model(request.param), tmp_path_factory)


def test_config_and_tree(moe_model):
    kind, _, cfg, w = moe_model
    assert (cfg.num_experts, cfg.experts_per_token, cfg.mlp_dim) == (6, 2, 64)
    assert cfg.norm_topk == (kind in ("mixtral", "minimax_m2"))
    assert cfg.qk_norm == (kind in ("qwen3_moe", "olmoe", "minimax_m2"))
    assert cfg.qk_norm_full == (kind in ("olmoe", "minimax_m2"))
    assert cfg.router_sigmoid == cfg.router_choice_bias == (kind == "minimax_m2")
    assert cfg.rope_dim == (16 if kind == "minimax_m2" else None)
    assert cfg.qkv_bias == (kind == "qwen2_moe")
    assert (cfg.shared_expert_dim, cfg.shared_expert_gate) == (
        (96, True) if kind == "qwen2_moe" else (0, False))
    layers = w["layers"]
    assert "w_gate" not in layers and layers["moe_down"].shape == (3, 6, 64, 64)
    if kind == "qwen2_moe":
        assert layers["shared_down"].shape == (3, 96, 64)
        assert layers["shared_router"].shape == (3, 64)
    assert layers["router"].shape == (3, 64, 6)


def test_logits_match_transformers(moe_model):
    """Prefill (every expert on every token, weighted) and decode steps (B * T * C = 4 <= 6
    experts: only the chosen experts' weights gathered) through the cache."""
    _, m, cfg, w = moe_model
    toks = _tokens(24)
    ref = _hf_logits(m, toks)
    out, _ = model.forward(w, jnp.asarray(toks), kv_cache.init_cache(cfg, 2, 64), cfg)
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-4, rtol=0)
    cache = kv_cache.init_cache(cfg, 2, 64)
    _, cache = model.forward(w, jnp.asarray(toks[:, :12]), cache, cfg)
    for t in range(12, 24):
        lg, cache = model.decode_step(w, jnp.asarray(toks[:, t]), cache, cfg)
        np.testing.assert_allclose(np.asarray(lg), ref[:, t], atol=1e-4, rtol=0)


def test_gathered_and_dense_experts_agree(moe_model):
    """The two ways moe() runs the experts give the same output for the same tokens, and
    the routing matters (uniform weights over all experts differ)."""
    _, _, cfg, w = moe_model
    dense, scale = check_expert_paths_agree(cfg, w)  # outputs ~100
    layer = jax.tree.map(lambda a: a[0], w["layers"])
    x = jax.random.normal(jax.random.key(0), (1, 8, cfg.d_model))
    everyone = moe(cfg.replace(experts_per_token=6, norm_topk=True), x, layer)
    assert np.abs(np.asarray(everyone - dense)).max() > 1e-2 * scale


@pytest.mark.slow
def test_greedy_generation_matches_transformers(moe_model):
    _, m, cfg, w = moe_model
    toks = _tokens(20, seed=1)
    with torch.no_grad():
        ref = m.generate(torch.tensor(toks), max_new_tokens=12, do_sample=False,
                         min_new_tokens=12)[:, 20:].tolist()
    sp = SamplingParams(temperature=0, ignore_eos=True)
    prompts = [list(map(int, t)) for t in toks]
    got = LLM(cfg, w, CharTokenizer()).generate(prompts, sp, max_new_tokens=12)
    assert [c.token_ids for c in got] == ref
    eng = Engine(w, cfg, CharTokenizer(), EngineConfig(num_slots=2, max_len=64, prefix_block=8,
                                                       prefill_token_budget=8))
    try:
        outs = eng.generate(prompts, sampling=sp, max_tokens=12)
        assert [o.token_ids for o in outs] == ref
    finally:
        eng.close()


def test_mesh_and_checkpoint(moe_model, tmp_path):
    """Each expert tensor-parallel over `model` under data:2,model:2 equals one device; an
    Orbax round trip keeps the config and the experts."""
    from jaxinfer.sharding import make_mesh
    from jaxinfer.weights import weight_shardings, weight_specs

    _, m, cfg, w = moe_model
    sh = weight_shardings(weight_specs(cfg), make_mesh("data:2,model:2"))
    ws = jax.tree.map(jax.device_put, w, sh)
    assert tuple(ws["layers"]["moe_gate"].sharding.spec) == (None, None, None, "model")
    assert tuple(ws["layers"]["moe_down"].sharding.spec) == (None, None, "model", None)
    toks = jnp.asarray(_tokens(16, batch=4))
    one, _ = model.forward(w, toks, kv_cache.init_cache(cfg, 4, 32), cfg)
    many, _ = model.forward(ws, toks, kv_cache.init_cache(cfg, 4, 32), cfg)
    # the row-parallel expert down projections sum in another order: float32 rounding
    np.testing.assert_allclose(np.asarray(many), np.asarray(one), atol=1e-4, rtol=0)
    save_checkpoint(tmp_path / "ck", cfg, w)
    ccfg, cw = load_checkpoint(tmp_path / "ck")
    assert ccfg == cfg
    np.testing.assert_array_equal(np.asarray(cw["layers"]["moe_up"]),
                                  np.asarray(w["layers"]["moe_up"]))


def _collectives(hlo: str) -> list[tuple[str, int]]:
    """(op, elements) of every collective in a compiled program's HLO text."""
    import re

    ops = re.findall(r"= \w+\[([\d,]*)\]\S* (all-reduce|all-gather|all-to-all|"
                     r"collective-permute|reduce-scatter)\(", hlo)
    return [(op, int(np.prod([int(d) for d in dims.split(",") if d]))) for dims, op in ops]


@pytest.mark.slow
@pytest.mark.parametrize("quant", [None, "int8"])
def test_expert_parallel(moe_model, quant):
    """Experts split over `expert` (3 of 6 per device), each tensor-parallel over `model`,
    the batch over `data` (and `expert` where it divides): prefill, decode through the
    chosen experts (B * C <= E) and through all of them equal one device; the step's only
    collectives are activation-sized (left to GSPMD, the sliced experts' weights are
    all-gathered each step); greedy tokens equal transformers through LLM.generate, two
    interleaved streams and the engine; perplexity equals one device's."""
    from jaxinfer.quant import QuantConfig
    from jaxinfer.sharding import make_mesh, mesh_context
    from jaxinfer.weights import quantize_weights, weight_shardings, weight_specs

    _, m, cfg, w = moe_model
    qc = QuantConfig.from_mode(quant) if quant else None
    w = quantize_weights(w, qc) if qc else w
    mesh = make_mesh("data:2,expert:2,model:2")
    ws = jax.tree.map(jax.device_put, w, weight_shardings(weight_specs(cfg, quant=qc), mesh))
    gate = ws["layers"]["moe_gate"]
    for a in jax.tree.leaves(gate):  # a QArray's scales split like its values
        assert tuple(a.sharding.spec)[:2] == (None, "expert")
    assert tuple(jax.tree.leaves(gate)[0].sharding.spec) == (None, "expert", None, "model")
    assert tuple(ws["layers"]["router"].sharding.spec) == (None, None, None)
    toks = jnp.asarray(_tokens(16, batch=4))
    decode = jax.jit(model.decode_step, static_argnames="cfg")
    # B=2: decode through 2 * 2 <= 6 chosen experts, the batch over `data` only;
    # B=4: through all experts, the batch over `expert` x `data` (attention too)
    for B, rows in ((2, "data"), (4, ("expert", "data"))):
        sh = kv_cache.cache_shardings(cfg, B, 32, mesh)
        assert tuple(sh.k.spec) == (None, rows, "model", None, None)
        want = []
        for weights, ctx in ((w, None), (ws, mesh)):
            with mesh_context(ctx):
                cache = kv_cache.init_cache(cfg, B, 32, shardings=sh if ctx else None)
                pre, cache = model.forward(weights, toks[:B], cache, cfg)
                step = decode.lower(weights, toks[:B, 0], cache, cfg=cfg).compile()
                dec, _ = step(weights, toks[:B, 0], cache)
            want.append((pre, dec))
        for one, many in zip(*want, strict=True):
            np.testing.assert_allclose(np.asarray(many), np.asarray(one), atol=1e-4, rtol=0)
        ops = _collectives(step.as_text())  # activations only: [B, D] at most
        assert ops and all(n <= B * cfg.d_model for _, n in ops), ops
        assert ("reduce-scatter" in {op for op, _ in ops}) == (B == 4), ops  # the split
    gspmd = decode.lower(ws, toks[:2, 0], kv_cache.abstract_cache(cfg, 2, 32),  # no context
                         cfg=cfg).compile().as_text()
    assert max(n for _, n in _collectives(gspmd)) >= 6 * cfg.d_model * cfg.mlp_dim // 2

    toks = _tokens(20, batch=4, seed=1)  # 4 rows, 4 slots: split over expert x data
    with torch.no_grad():
        ref = m.generate(torch.tensor(toks), max_new_tokens=8, do_sample=False,
                         min_new_tokens=8)[:, 20:].tolist()
    sp = SamplingParams(temperature=0, ignore_eos=True)
    prompts = [list(map(int, t)) for t in toks]
    if quant is None:
        from jaxinfer.perplexity import perplexity

        llm = LLM(cfg, ws, CharTokenizer(), mesh)
        got = llm.generate(prompts, sp, max_new_tokens=8)
        assert [c.token_ids for c in got] == ref
        # two streams stepped by hand in turn: each step in the mesh, none leaks out of it
        results = [[], []]
        streams = [llm.stream(p, sp, max_new_tokens=8, result=r) for p, r in
                   zip(prompts[:2], results, strict=True)]
        for _ in range(8):
            for s in streams:
                next(s, None)
                assert jax.sharding.get_abstract_mesh().empty
        for s in streams:
            list(s)
        assert [r[0].token_ids for r in results] == ref[:2]
        ppl = perplexity(llm, prompts[0] + ref[0], context_len=16).perplexity
        assert ppl == pytest.approx(
            perplexity(LLM(cfg, w, CharTokenizer()), prompts[0] + ref[0], 16).perplexity,
            rel=1e-4)
    eng = Engine(ws, cfg, CharTokenizer(), EngineConfig(num_slots=4, max_len=64, prefix_block=8,
                                                        prefill_token_budget=8), mesh=mesh)
    try:
        outs = eng.generate(prompts, sampling=sp, max_tokens=8)
    finally:
        eng.close()
    if quant is None:
        assert [o.token_ids for o in outs] == ref
    else:  # int8 moves logits; the engine on the mesh equals LLM on one device
        one = LLM(cfg, w, CharTokenizer()).generate(prompts, sp, max_new_tokens=8)
        assert [o.token_ids for o in outs] == [c.token_ids for c in one]


def test_experts_that_do_not_divide_the_axis_are_replicated(moe_model, caplog):
    from jaxinfer.sharding import make_mesh, mesh_context
    from jaxinfer.weights import weight_shardings, weight_specs

    _, _, cfg, w = moe_model
    mesh = make_mesh("expert:4")  # 6 experts
    with caplog.at_level("WARNING"):
        ws = jax.tree.map(jax.device_put, w, weight_shardings(weight_specs(cfg), mesh))
    assert "experts=6 does not divide mesh axis expert=4" in caplog.text
    assert tuple(ws["layers"]["moe_gate"].sharding.spec) == (None, None, None, None)
    toks = jnp.asarray(_tokens(8))
    one, _ = model.forward(w, toks, kv_cache.init_cache(cfg, 2, 16), cfg)
    with mesh_context(mesh):
        many, _ = model.forward(ws, toks, kv_cache.init_cache(cfg, 2, 16), cfg)
    np.testing.assert_allclose(np.asarray(many), np.asarray(one), atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_experts(moe_model, mode):
    """int8 / int4 experts (QArrays, gathered by expert id in decode) compute exactly what
    their dequantized float weights do, in prefill and decode; the tree matches its spec."""
    from jaxinfer.quant import QuantConfig, dequantize, is_qarray
    from jaxinfer.weights import check_weights, quantize_weights, weight_specs

    _, _, cfg, w = moe_model
    qc = QuantConfig.from_mode(mode, 16 if mode == "int4" else None)  # 16 divides H, F
    qw = quantize_weights(w, qc)
    assert is_qarray(qw["layers"]["moe_gate"]) and qw["layers"]["moe_gate"].shape == (3, 6, 64, 64)
    check_weights(weight_specs(cfg, quant=qc), qw)
    fw = jax.tree.map(lambda a: dequantize(a) if is_qarray(a) else a, qw, is_leaf=is_qarray)
    toks = jnp.asarray(_tokens(12))
    for weights in (qw, fw):
        cache = kv_cache.init_cache(cfg, 2, 32)
        pre, cache = model.forward(weights, toks, cache, cfg)
        dec, _ = model.decode_step(weights, toks[:, 0], cache, cfg)
        if weights is qw:
            want = (pre, dec)
    np.testing.assert_allclose(np.asarray(want[0]), np.asarray(pre), atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(want[1]), np.asarray(dec), atol=1e-4, rtol=0)


def test_refusals(moe_model):
    base = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
            "num_attention_heads": 4, "vocab_size": 97, "model_type": "qwen3_moe",
            "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32}
    assert ModelConfig.from_hf(base).num_experts == 8  # Qwen's own key
    with pytest.raises(ConfigError, match="mlp_only_layers"):
        ModelConfig.from_hf({**base, "mlp_only_layers": [0]})
    with pytest.raises(ConfigError, match="experts_per_token"):
        ModelConfig.from_hf({**base, "num_experts_per_tok": 9})
    with pytest.raises(ConfigError, match="clip_qkv=8.0"):  # OLMoE's clamped variants
        ModelConfig.from_hf({**base, "model_type": "olmoe", "intermediate_size": 32,
                             "clip_qkv": 8.0})


def test_gguf_shared_expert_width_falls_back_as_llama_cpp():
    """A qwen2moe file without expert_shared_feed_forward_length (older converters): the
    shared expert is feed_forward_length wide, as llama.cpp reads it."""
    from pathlib import Path

    from jaxinfer.convert.gguf import _experts

    meta = {"expert_count": 6, "expert_used_count": 2, "feed_forward_length": 96}
    tensors = dict.fromkeys(["blk.0.ffn_gate_exps.weight", "blk.0.ffn_gate_shexp.weight",
                             "blk.0.ffn_gate_inp_shexp.weight"])
    got = _experts(lambda k, d=None: meta.get(k, d), tensors, Path("x.gguf"))
    assert (got["shared_expert_dim"], got["shared_expert_gate"]) == (96, True)
    meta["expert_shared_feed_forward_length"] = 48
    assert _experts(lambda k, d=None: meta.get(k, d), tensors, Path("x.gguf"))[
        "shared_expert_dim"] == 48
    del tensors["blk.0.ffn_gate_shexp.weight"], tensors["blk.0.ffn_gate_inp_shexp.weight"]
    got = _experts(lambda k, d=None: meta.get(k, d), tensors, Path("x.gguf"))
    assert (got["shared_expert_dim"], got["shared_expert_gate"]) == (0, False)
    tensors = {f"blk.0.ffn_gate.{e}.weight": object() for e in range(6)}  # one per expert
    assert _experts(lambda k, d=None: meta.get(k, d), tensors, Path("x.gguf"))[
        "num_experts"] == 6
    del tensors["blk.0.ffn_gate.5.weight"]
    with pytest.raises(ConversionError, match="expert_count 6 but no tensor"):
        _experts(lambda k, d=None: meta.get(k, d), tensors, Path("x.gguf"))


@pytest.mark.parametrize("quantized", [False, True])
def test_gguf_matches_transformers(moe_model, tmp_path, quantized):
    """A GGUF the way llama.cpp writes a mixture of experts (Mixtral as `llama` with
    permuted Q/K, Qwen2-MoE as `qwen2moe` with its shared expert, Qwen3-MoE as `qwen3moe`;
    experts stacked [E, out, in], routers float),
    Q8_0 matrices read dequantized or kept as QArrays, against transformers on the same
    (Q8_0-exact) weights."""
    import gguf

    from jaxinfer.convert.gguf import load_gguf

    from .test_convert import _roundtrip, _write_gguf

    kind, m, cfg, _ = moe_model
    if kind == "qwen3_moe":  # llama.cpp always renormalises Qwen3-MoE's top-k weights
        pytest.skip("norm_topk_prob=False has no Qwen3-MoE GGUF form (see test_gguf_llama_cpp)")
    if kind == "minimax_m2":  # its file: llama.cpp's own converter, in test_gguf_llama_cpp
        pytest.skip("MiniMax-M2 files are written by llama.cpp's converter there")
    q8 = gguf.GGMLQuantizationType.Q8_0
    F = cfg.mlp_dim
    hf = {k: v.numpy().copy() for k, v in m.state_dict().items()}  # experts fused [E, 2F, D]
    sd = {k: v for k, v in hf.items() if ".mlp." not in k}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}.mlp."
        gate_up = hf[p + "experts.gate_up_proj"]
        sd.update({p + "gate.weight": hf[p + "gate.weight"],
                   p + "gate_exps.weight": gate_up[:, :F], p + "up_exps.weight": gate_up[:, F:],
                   p + "down_exps.weight": hf[p + "experts.down_proj"]})
        sd.update({k: v for k, v in hf.items() if k.startswith(p + "shared_expert")})
    sd = _roundtrip(sd, q8)
    for k in hf:  # the same Q8_0-exact weights back into the HF model
        if k in sd:
            hf[k] = sd[k]
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}.mlp."
        hf[p + "experts.gate_up_proj"] = np.concatenate(
            [sd[p + "gate_exps.weight"], sd[p + "up_exps.weight"]], axis=1)
        hf[p + "experts.down_proj"] = sd[p + "down_exps.weight"]
    m.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in hf.items()})

    def meta(w):
        w.add_expert_count(cfg.num_experts)
        w.add_expert_used_count(cfg.experts_per_token)
        w.add_expert_feed_forward_length(cfg.mlp_dim)
        if cfg.shared_expert_dim:
            w.add_expert_shared_feed_forward_length(cfg.shared_expert_dim)

    arch = {"mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe",
            "olmoe": "olmoe"}[kind]
    _write_gguf(tmp_path / "moe.gguf", cfg, sd, arch, q8, meta=meta)
    gcfg, gw = load_gguf(tmp_path / "moe.gguf", quantized=quantized)
    fields = ("num_experts", "experts_per_token", "mlp_dim", "norm_topk", "shared_expert_dim",
              "shared_expert_gate", "qkv_bias")
    assert [getattr(gcfg, f) for f in fields] == [getattr(cfg, f) for f in fields]
    toks = _tokens(16)
    got, _ = model.forward(jax.tree.map(jnp.asarray, gw), jnp.asarray(toks),
                           kv_cache.init_cache(gcfg, 2, 32), gcfg)
    np.testing.assert_allclose(np.asarray(got), _hf_logits(m, toks), atol=1e-4, rtol=0)
    if kind == "mixtral":  # early Mixtral files: one tensor per expert, read the same
        per_expert = {k: v for k, v in sd.items() if "_exps." not in k}
        per_expert.update({k.replace("_exps.", f"_exps.{e}."): v[e]
                           for k, v in sd.items() if "_exps." in k for e in range(len(v))})
        (tmp_path / "old").mkdir()
        _write_gguf(tmp_path / "old" / "moe.gguf", cfg, per_expert, arch, q8, meta=meta)
        ocfg, ow = load_gguf(tmp_path / "old" / "moe.gguf", quantized=quantized)
        assert ocfg == gcfg
        jax.tree.map(np.testing.assert_array_equal, ow, gw)
