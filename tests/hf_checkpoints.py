"""Tiny random Hugging Face checkpoints written by transformers itself, read back with
jaxinfer's converter: the shared fixture body and checks of the architecture tests
(test_gemma.py, test_moe.py, test_llama_variants.py, test_layernorm_families.py,
test_llama4.py, test_gpt_oss.py)."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer import kv_cache, model
from jaxinfer.checkpoint import load_checkpoint, save_checkpoint
from jaxinfer.convert.safetensors import load_hf_dir
from jaxinfer.engine import Engine, EngineConfig
from jaxinfer.llm import LLM
from jaxinfer.sampling import SamplingParams

from .engine_helpers import CharTokenizer


def saved_and_loaded(name: str, model, tmp_path_factory) -> tuple:
    """(name, the HF model, our config, our weights) after save_pretrained + load_hf_dir."""
    path = tmp_path_factory.mktemp(name)
    model.save_pretrained(path)
    cfg, w = load_hf_dir(path)
    return name, model, cfg, jax.tree.map(jnp.asarray, w)


def tokens(n: int, batch: int = 2, seed: int = 0) -> np.ndarray:
    """Random prompt ids of the tiny vocab (97), past the special ids."""
    return np.random.default_rng(seed).integers(4, 97, (batch, n))


def hf_logits(model, toks: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor(toks)).logits.numpy()


def sharpened(m, norm: float, matrix: float, bias: float = 0.0):
    """`m` in eval mode with eager attention and random weights larger than transformers'
    init (norm weights `norm` x N(0, 1), matrices and stacked experts `matrix` x N(0, 1),
    the rest, biases, `bias` x N(0, 1)), so attention, caps and routing matter and each
    difference shows."""
    import torch

    with torch.no_grad():
        for name, p in m.named_parameters():
            scale = norm if "norm" in name else matrix if p.ndim >= 2 else bias
            p.copy_(scale * torch.randn_like(p))
    m.config._attn_implementation = "eager"
    return m.eval()


def ours(cfg, w, toks: np.ndarray, S: int = 64) -> np.ndarray:
    """Our logits [B, T, V] of the prompts, prefilled into a fresh cache of S positions."""
    out, _ = model.forward(w, jnp.asarray(toks), kv_cache.init_cache(cfg, toks.shape[0], S), cfg)
    return np.asarray(out)


def check_decode_logits(m, cfg, w, impls=(("xla", 64),)) -> None:
    """All positions of a 40-token prompt, then 30 prefilled and ten decode steps through
    the cache with each (attention impl, cache length): logits within 1e-4 of the HF
    model's throughout."""
    toks = tokens(40)
    ref = hf_logits(m, toks)
    np.testing.assert_allclose(ours(cfg, w, toks), ref, atol=1e-4, rtol=0)
    for impl, S in impls:
        cache = kv_cache.init_cache(cfg, 2, S)
        _, cache = model.forward(w, jnp.asarray(toks[:, :30]), cache, cfg)
        for t in range(30, 40):
            lg, cache = model.decode_step(w, jnp.asarray(toks[:, t]), cache, cfg, impl=impl)
            np.testing.assert_allclose(np.asarray(lg), ref[:, t], atol=1e-4, rtol=0)


def check_each_matters(m, cfg, w, offs, toks: np.ndarray) -> None:
    """Each switch of `offs` moves our logits more than 1e-2 away from the HF model's, so
    none is dead weight: a dict of config changes, or (changes, a weight transform)."""
    ref = hf_logits(m, toks)
    for off in offs:
        change, fix = off if isinstance(off, tuple) else (off, None)
        got = ours(cfg.replace(**change), fix(w) if fix else w, toks)
        assert np.abs(got - ref).max() > 1e-2, off


def without_layer_weights(*names):
    """A weight transform for check_each_matters: the layers' `names` dropped (their switch
    turned off reads none)."""
    return lambda w: dict(w, layers={k: v for k, v in w["layers"].items() if k not in names})


def check_orbax_round_trip(m, cfg, w, toks: np.ndarray, tmp_path) -> None:
    """Saved as an Orbax checkpoint and loaded back, the config is equal and the logits
    still match the HF model's within 1e-4."""
    save_checkpoint(tmp_path / "ck", cfg, w)
    ccfg, cw = load_checkpoint(tmp_path / "ck")
    assert ccfg == cfg
    np.testing.assert_allclose(ours(ccfg, cw, toks), hf_logits(m, toks), atol=1e-4, rtol=0)


def left_interleaved(w, rotated: int | None = None):
    """The weights with q/k (and their norms) in the checkpoint's interleaved RoPE order
    (Cohere, GLM), as if read without reordering: each head's first `rotated` dims
    (x0, x1, ..., y0, y1, ...) -> (x0, y0, x1, y1, ...)."""
    def back(a):
        R = rotated or a.shape[-1]
        rot = a[..., :R].reshape(*a.shape[:-1], 2, R // 2).swapaxes(-1, -2)
        return jnp.concatenate([rot.reshape(*a.shape[:-1], R), a[..., R:]], -1)
    keys = [k for k in ("wq", "wk", "q_norm", "k_norm") if k in w["layers"]]
    return dict(w, layers=dict(w["layers"], **{k: back(w["layers"][k]) for k in keys}))


def greedy_reference(m, toks: np.ndarray, n: int) -> list[list[int]]:
    """transformers' greedy continuation: n new tokens per row, EOS never chosen."""
    import torch

    with torch.no_grad():
        return m.generate(torch.tensor(toks), max_new_tokens=n, do_sample=False,
                          min_new_tokens=n)[:, toks.shape[1]:].tolist()


def check_greedy_generation(m, cfg, w, n: int = 30) -> None:
    """LLM.generate's greedy tokens from two 20-token prompts equal transformers'."""
    toks = tokens(20, batch=2, seed=1)
    got = LLM(cfg, w, CharTokenizer()).generate(
        [list(map(int, t)) for t in toks], SamplingParams(temperature=0, min_tokens=n),
        max_new_tokens=n)
    assert [c.token_ids for c in got] == greedy_reference(m, toks, n)


def check_engine_greedy(m, cfg, w, n: int = 30) -> None:
    """The same through the engine: chunked prefill of 8-token chunks, then (a second
    time) from the prefix cache."""
    toks = tokens(20, batch=2, seed=1)
    ref = greedy_reference(m, toks, n)
    eng = Engine(w, cfg, CharTokenizer(), EngineConfig(
        num_slots=2, max_len=64, prefix_block=8, prefill_token_budget=8, min_prompt_bucket=8))
    try:
        for _ in range(2):
            outs = eng.generate([list(map(int, t)) for t in toks],
                                sampling=SamplingParams(temperature=0, min_tokens=n),
                                max_tokens=n)
            assert [o.token_ids for o in outs] == ref
    finally:
        eng.close()


def check_sharded_equals_one_device(cfg, w, mesh: str = "data:2,model:2") -> dict:
    """Logits of four prompts with the weights sharded by the rules equal one device's;
    returns the sharded weights."""
    from jaxinfer.sharding import make_mesh
    from jaxinfer.weights import weight_shardings, weight_specs

    ws = jax.tree.map(jax.device_put, w, weight_shardings(weight_specs(cfg), make_mesh(mesh)))
    toks = tokens(20, batch=4)
    np.testing.assert_allclose(ours(cfg, ws, toks), ours(cfg, w, toks), atol=1e-5, rtol=0)
    return ws


def check_expert_paths_agree(cfg, w):
    """moe()'s two ways to run layer 0's experts agree: every expert on 8 tokens at once
    (dense) and each token alone through its chosen experts (gathered), within float32
    rounding of the outputs' scale. Returns (the dense output, its scale)."""
    from jaxinfer.moe import moe

    layer = jax.tree.map(lambda a: a[0], w["layers"])
    x = jax.random.normal(jax.random.key(0), (1, 8, cfg.d_model))
    dense = moe(cfg, x, layer)
    assert 8 * cfg.experts_per_token > cfg.num_experts  # (dense indeed)
    gathered = jnp.concatenate([moe(cfg, x[:, t:t + 1], layer) for t in range(8)], axis=1)
    scale = float(jnp.abs(dense).max())
    np.testing.assert_allclose(np.asarray(gathered), np.asarray(dense),
                               atol=1e-5 * max(1.0, scale), rtol=0)
    return dense, scale


def check_expert_parallel(cfg, w, mesh_spec: str = "data:2,expert:2,model:2") -> dict:
    """Experts split over `expert`, tensor-parallel over `model`: prefill and decode (one
    row: through the chosen experts; four: through all of them) equal one device within
    1e-4. Returns the sharded weights."""
    from jaxinfer.sharding import make_mesh, mesh_context
    from jaxinfer.weights import weight_shardings, weight_specs

    mesh = make_mesh(mesh_spec)
    ws = jax.tree.map(jax.device_put, w, weight_shardings(weight_specs(cfg), mesh))
    toks = jnp.asarray(tokens(16, batch=4))
    for B in (1, 4):
        got = []
        for weights, ctx in ((w, None), (ws, mesh)):
            with mesh_context(ctx):
                sh = kv_cache.cache_shardings(cfg, B, 32, mesh) if ctx else None
                cache = kv_cache.init_cache(cfg, B, 32, shardings=sh)
                pre, cache = model.forward(weights, toks[:B], cache, cfg)
                dec, _ = model.decode_step(weights, toks[:B, 0], cache, cfg)
            got.append((np.asarray(pre), np.asarray(dec)))
        for one, many in zip(*got, strict=True):
            np.testing.assert_allclose(many, one, atol=1e-4, rtol=0)
    return ws
