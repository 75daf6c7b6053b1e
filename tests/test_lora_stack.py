"""The stacked-adapter math on a tiny random model, against merging (convert/lora.py): each
row of a mixed batch equals the model with its adapter merged in, whatever the adapters'
ranks and targets; adapter 0 is the base model; a quantized base takes the deltas too."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer import kv_cache, model
from jaxinfer.convert.lora import LoraFactors, merge_lora, stack_adapters
from jaxinfer.convert.safetensors import hf_linears, hf_shape
from jaxinfer.quant import QuantConfig
from jaxinfer.weights import quantize_weights

from .helpers import TINY, tiny_weights


def _random_adapter(seed: int, r: int, modules: list[str], scale: float) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for module, (key, shape, n_in) in hf_linears(TINY).items():
        if module.split(".")[1] not in modules:
            continue
        n_out, n_inp = hf_shape(shape, n_in)
        out[key] = LoraFactors(rng.normal(0, 0.3, (TINY.num_layers, r, n_inp)).astype(np.float32),
                               rng.normal(0, 0.3, (TINY.num_layers, n_out, r)).astype(np.float32),
                               scale, shape)
    return out


def _logits(weights, tokens, **lora):
    cache = kv_cache.init_cache(TINY, tokens.shape[0], 32)
    return np.asarray(model.forward(weights, tokens, cache, TINY, **lora)[0])


@pytest.mark.slow
def test_each_row_equals_its_adapter_merged():
    w = tiny_weights()
    adapters = [_random_adapter(1, 4, ["q_proj", "o_proj", "down_proj"], 2.0),
                _random_adapter(2, 2, ["k_proj", "v_proj", "gate_proj", "up_proj"], 0.5)]
    stack = stack_adapters(adapters, jnp.float32)
    assert stack.num_adapters == 3 and stack.a["wq"].shape == (TINY.num_layers, 3, 64, 4)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, TINY.vocab_size, (1, 9)))
    ids = [0, 1, 2, 1]
    got = _logits(w, jnp.repeat(tokens, 4, 0), lora=stack,
                  adapter_B=jnp.asarray(ids, jnp.int32))
    # merge_lora donates the weights it merges into: a fresh copy each
    refs = [_logits(w, tokens)] + [_logits(merge_lora(tiny_weights(), a), tokens)
                                   for a in adapters]
    for row, k in enumerate(ids):
        np.testing.assert_allclose(got[row], refs[k][0], atol=2e-5, rtol=0)
    assert np.abs(refs[1] - refs[0]).max() > 0.1 and np.abs(refs[2] - refs[0]).max() > 0.1


def test_a_quantized_base_takes_the_deltas():
    """int8 weights with adapters: adapter 0 is the quantized model (to float32 rounding),
    and an
    adapter row moves as much as merging the adapter into the float model does (up to the
    int8 rounding, which is far smaller than the adapter's effect)."""
    w = tiny_weights()
    adapter = _random_adapter(3, 4, ["q_proj", "v_proj", "up_proj", "down_proj"], 2.0)
    stack = stack_adapters([adapter], jnp.float32)
    q = quantize_weights(w, QuantConfig.from_mode("int8", None))
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, TINY.vocab_size, (2, 7)))
    got = _logits(q, tokens, lora=stack, adapter_B=jnp.asarray([0, 1], jnp.int32))
    np.testing.assert_allclose(got[0], _logits(q, tokens)[0], atol=1e-5, rtol=0)
    base = _logits(w, tokens)[1]
    merged = _logits(merge_lora(w, adapter), tokens)[1]
    assert np.abs(merged - base).max() > 0.5
    assert np.abs(got[1] - merged).max() < 0.05 * np.abs(merged - base).max()
