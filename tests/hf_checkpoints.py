"""Tiny random Hugging Face checkpoints written by transformers itself, read back with
jaxinfer's converter: the shared fixture body and helpers of the architecture tests
(test_gemma.py, test_moe.py)."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer import kv_cache, model
from jaxinfer.checkpoint import load_checkpoint, save_checkpoint
from jaxinfer.convert.safetensors import load_hf_dir


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


def check_each_matters(m, cfg, w, offs, toks: np.ndarray) -> None:
    """Each switch of `offs` moves our logits more than 1e-2 away from the HF model's, so
    none is dead weight: a dict of config changes, or (changes, a weight transform)."""
    ref = hf_logits(m, toks)
    for off in offs:
        change, fix = off if isinstance(off, tuple) else (off, None)
        got = ours(cfg.replace(**change), fix(w) if fix else w, toks)
        assert np.abs(got - ref).max() > 1e-2, off


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
