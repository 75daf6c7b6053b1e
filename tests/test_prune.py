"""Structured pruning: the scores find dead channels and identity layers; the result is an
ordinary smaller checkpoint that loads and runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer import model, prune
from jaxinfer.checkpoint import load_checkpoint, save_checkpoint
from jaxinfer.errors import ConfigError
from jaxinfer.kv_cache import init_cache
from jaxinfer.weights import count_params, weight_specs

from .helpers import TINY, tiny_weights

ROOT = Path(__file__).resolve().parents[1]
TOKENS = np.random.default_rng(0).integers(0, TINY.vocab_size, (2, 4, 24)).astype(np.int32)


def _logits(w, cfg, tokens):
    return np.asarray(model.forward(w, jnp.asarray(tokens), init_cache(cfg, *tokens.shape),
                                    cfg)[0])


def _constructed():
    """TINY weights with 40 dead MLP channels per layer and layer 1 an exact identity."""
    w = tiny_weights(TINY, 0)
    rng = np.random.default_rng(1)
    dead_LF = np.stack([rng.choice(TINY.mlp_dim, 40, replace=False) for _ in range(3)])
    layers = {n: np.array(a) for n, a in w["layers"].items()}
    for i, dead in enumerate(dead_LF):
        layers["w_down"][i, dead[:20]] = 0.0  # contributes nothing to the residual
        layers["w_up"][i, :, dead[20:]] = 0.0  # never activates
    layers["wo"][1] = 0.0
    layers["w_down"][1] = 0.0
    return {**w, "layers": {n: jnp.asarray(a) for n, a in layers.items()}}, dead_LF


def test_calibration_pass_matches_model_forward():
    w = tiny_weights(TINY, 0)
    logits, act, cos = prune.calibration_pass(w, jnp.asarray(TOKENS[0]), TINY)
    np.testing.assert_allclose(logits, _logits(w, TINY, TOKENS[0]), rtol=1e-4, atol=1e-4)
    assert act.shape == (TINY.num_layers, TINY.mlp_dim) and cos.shape == (TINY.num_layers,)


def test_scores_pick_dead_channels_and_identity_layer():
    w, dead_LF = _constructed()
    imp = prune.calibrate(w, list(TOKENS), TINY)
    for i in (0, 2):  # layer 1's MLP is dead as a whole
        assert set(np.flatnonzero(imp.channel_LF[i] == 0)) == set(dead_LF[i])
    assert np.isclose(imp.layer_cos_L[1], 1.0, atol=1e-6) and imp.layer_cos_L.max() == \
        imp.layer_cos_L[1]
    keep = prune.layers_to_keep(imp.layer_cos_L, 2)
    assert keep == [0, 2]
    ch = prune.channels_to_keep(imp.channel_LF, TINY.mlp_dim - 40)
    assert not set(ch[0]) & set(dead_LF[0]) and not set(ch[2]) & set(dead_LF[2])
    cfg2, w2 = prune.prune_weights(w, TINY, keep, ch)
    assert (cfg2.num_layers, cfg2.mlp_dim) == (2, TINY.mlp_dim - 40)
    # Removing only dead parts changes nothing.
    np.testing.assert_allclose(_logits(w2, cfg2, TOKENS[0]), _logits(w, TINY, TOKENS[0]),
                               rtol=1e-4, atol=1e-4)


def test_pruned_checkpoint_loads_and_shrinks(tmp_path):
    w = tiny_weights(TINY, 0)
    imp = prune.calibrate(w, list(TOKENS), TINY)
    cfg2, w2 = prune.prune_weights(w, TINY, prune.layers_to_keep(imp.layer_cos_L, 2),
                                   prune.channels_to_keep(imp.channel_LF, 32))
    save_checkpoint(tmp_path / "p", cfg2, w2)
    cfg3, w3 = load_checkpoint(tmp_path / "p")
    assert cfg3 == cfg2 and count_params(weight_specs(cfg3)) < count_params(weight_specs(TINY))
    assert np.isfinite(_logits(w3, cfg3, TOKENS[0])).all()


def test_bad_sizes_raise():
    imp = prune.Importance(np.ones((3, 8)), np.zeros(3))
    with pytest.raises(ConfigError, match="num_layers"):
        prune.layers_to_keep(imp.layer_cos_L, 0)
    with pytest.raises(ConfigError, match="mlp_dim"):
        prune.channels_to_keep(imp.channel_LF, 9)
    with pytest.raises(ConfigError, match="keep_layers"):
        prune.prune_weights(tiny_weights(), TINY, [0, 5])


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    """The shipped public-domain text if present, else generated English-like text."""
    shipped = sorted((ROOT / "data").glob("*.txt")) if (ROOT / "data").is_dir() else []
    if shipped:
        return shipped[0]
    words = ("the quick brown fox jumps over a lazy dog while seven old men sing songs of "
             "the sea and the river under a bright moon").split()
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(". ".join(" ".join(rng.choice(words, 12)) for _ in range(800)))
    return path


@pytest.mark.slow
def test_prune_script_on_smollm2(smollm2_checkpoint, text_file, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = tmp_path / "pruned"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "prune.py"), "--text_file",
                        str(text_file), "--output", str(out), "--num_layers", "26",
                        "--mlp_dim", "1280", "--calib_batches", "2", "--seq_len", "128",
                        "--eval=false"], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout.strip().splitlines()[-1])
    assert s["num_layers"] == 26 and s["mlp_dim"] == 1280 and s["params"] < s["teacher_params"]
    g = subprocess.run([sys.executable, str(ROOT / "scripts" / "generate.py"), "--checkpoint",
                        str(out), "--prompt", "The capital of France is", "--temperature", "0",
                        "--max_new_tokens", "4", "--output_format", "json"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert g.returncode == 0, g.stderr
    assert len(json.loads(g.stdout.strip().splitlines()[-1])["token_ids"]) == 4


def test_prune_script_bad_input_one_error_line(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "prune.py"), "--text_file",
                        str(tmp_path / "missing.txt"), "--output", str(tmp_path / "o"),
                        "--checkpoint", str(tmp_path / "nockpt")],
                       capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error:")
