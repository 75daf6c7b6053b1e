"""Embeddings (LLM.embed, /v1/embeddings): SmolLM2's pooled final hidden states against
Hugging Face transformers' on the same weights, padding and batching that change nothing,
no recompiles within a bucket, and the OpenAI client against the server."""

import jax.numpy as jnp
import numpy as np
import pytest
import requests
import torch

from jaxinfer.engine import Engine, EngineConfig
from jaxinfer.errors import BadRequestError
from jaxinfer.llm import LLM
from jaxinfer.runtime import CompileCounter
from jaxinfer.server import BackgroundServer, create_app

TEXTS = ["The capital of France is", "def f(x):\n    return x",
         "A much longer sentence about cats, dogs and the weather in Paris in the spring."]


@pytest.fixture(scope="module")
def llm(smollm2_checkpoint):
    return LLM.load(smollm2_checkpoint, dtype=jnp.float32)


@pytest.fixture(scope="module")
def hf_states(smollm2_hf_dir, llm):
    """HF's final hidden states (after the final norm) of each text, alone."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(smollm2_hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return [m.model(torch.tensor([llm.tokenizer.encode(t)])).last_hidden_state[0].numpy()
                for t in TEXTS]


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_smollm2_embeddings_match_transformers(llm, hf_states, pooling):
    got = llm.embed(TEXTS, pooling=pooling, normalize=False)
    want = np.stack([h[-1] if pooling == "last" else h.mean(0) for h in hf_states])
    assert got.shape == (3, llm.cfg.d_model) and got.dtype == np.float32
    scale = np.abs(want).max()
    assert np.abs(got - want).max() < 1e-4 * scale, (np.abs(got - want).max(), scale)
    print(f"{pooling}: max |d| {np.abs(got - want).max():.2e} of max |x| {scale:.1f}")
    unit = llm.embed(TEXTS, pooling=pooling)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=-1), 1, rtol=1e-5)
    np.testing.assert_allclose(unit, want / np.linalg.norm(want, axis=-1, keepdims=True),
                               atol=1e-4)


def test_batching_and_padding_change_nothing(llm):
    alone = np.stack([llm.embed(t) for t in TEXTS])
    together = llm.embed(TEXTS)
    np.testing.assert_allclose(together, alone, atol=1e-5)
    llm.embed("warm the bucket up")
    with CompileCounter() as c:  # another length in the same bucket, another batch of 1
        llm.embed("a different prompt of another length")
    assert c.count == 0
    cut = llm.embed(TEXTS, dimensions=64)
    full = llm.embed(TEXTS, normalize=False)[:, :64]
    np.testing.assert_allclose(cut, full / np.linalg.norm(full, axis=-1, keepdims=True),
                               atol=1e-5)


@pytest.mark.parametrize("kw, match", [({"pooling": "cls"}, "pooling"),
                                       ({"dimensions": 0}, "dimensions"),
                                       ({"dimensions": 10_000}, "dimensions")])
def test_bad_arguments(llm, kw, match):
    with pytest.raises(BadRequestError, match=match):
        llm.embed("x", **kw)
    with pytest.raises(BadRequestError, match="empty"):
        llm.embed([])


def test_server_embeddings_through_the_openai_client(llm):
    """The official client asks for base64 by default; it decodes to the library's vectors,
    as does encoding_format=float; dimensions cut and renormalise."""
    openai = pytest.importorskip("openai")
    with Engine.from_llm(llm, EngineConfig(num_slots=2, max_len=256)) as eng, \
            BackgroundServer(create_app(eng, "smollm2")) as srv:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0)
        out = client.embeddings.create(model="smollm2", input=TEXTS)
        got = np.array([d.embedding for d in out.data], np.float32)
        np.testing.assert_allclose(got, llm.embed(TEXTS), atol=1e-6)
        assert out.usage.prompt_tokens == sum(len(llm.tokenizer.encode(t)) for t in TEXTS)
        short = client.embeddings.create(model="smollm2", input=TEXTS[0], dimensions=32,
                                         encoding_format="float")
        np.testing.assert_allclose(short.data[0].embedding, llm.embed(TEXTS[0], dimensions=32),
                                   atol=1e-6)
        for body, param in [({"input": ""}, "input"), ({"input": "x" * 2000}, "input"),
                            ({"input": "x", "dimensions": 0}, "dimensions"),
                            ({"input": "x", "encoding_format": "hex"}, "encoding_format")]:
            r = requests.post(f"{srv.url}/v1/embeddings", json=body, timeout=60)
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
