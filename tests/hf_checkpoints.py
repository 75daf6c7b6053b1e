"""Tiny random Hugging Face checkpoints written by transformers itself, read back with
jaxinfer's converter: the shared fixture body and helpers of the architecture tests
(test_gemma.py, test_moe.py)."""

import jax
import jax.numpy as jnp
import numpy as np

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
