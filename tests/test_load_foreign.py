"""LLM.load straight from the formats users have: the real SmolLM2 GGUF and a Hugging Face
directory of it (written by transformers, tokenizer included), converted in memory; the
same greedy text as the converted Orbax checkpoint."""

import numpy as np
import pytest

from jaxinfer.llm import LLM
from jaxinfer.quant import is_qarray
from jaxinfer.sampling import SamplingParams

PROMPT = "The capital of France is"
GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def reference(smollm2_checkpoint):
    llm = LLM.load(smollm2_checkpoint)
    return llm.generate(PROMPT, GREEDY, max_new_tokens=12).token_ids


def test_gguf_file(smollm2_gguf, reference):
    llm = LLM.load(smollm2_gguf)
    assert llm.generate(PROMPT, GREEDY, max_new_tokens=12).token_ids == reference
    assert llm.tokenizer.encode(PROMPT) == LLM.load().tokenizer.encode(PROMPT)


@pytest.mark.slow
def test_gguf_quantized_while_read_and_on_a_mesh(smollm2_gguf, smollm2_checkpoint):
    """quantize= on a GGUF quantizes layer by layer as read: the same weights as loading
    the Orbax checkpoint with quantize=; under a mesh each array lands in its sharding."""
    a = LLM.load(smollm2_gguf, quantize="int8", mesh="data:2,model:3")
    b = LLM.load(smollm2_checkpoint, quantize="int8")
    assert is_qarray(a.params["layers"]["wq"])
    np.testing.assert_array_equal(np.asarray(a.params["layers"]["w_up"].values),
                                  np.asarray(b.params["layers"]["w_up"].values))
    assert a.params["layers"]["w_up"].values.sharding.spec[-1] == "model"
    want = b.generate(PROMPT, GREEDY, max_new_tokens=8).token_ids
    assert a.generate(PROMPT, GREEDY, max_new_tokens=8).token_ids == want


@pytest.mark.slow
def test_hugging_face_directory(smollm2_gguf, smollm2_hf_dir, reference, tmp_path):
    """A float32 Hugging Face directory (transformers' own dequantization of the GGUF) with
    the tokenizer transformers builds from the GGUF."""
    import shutil

    transformers = pytest.importorskip("transformers")
    shutil.copytree(smollm2_hf_dir, tmp_path, dirs_exist_ok=True)
    transformers.AutoTokenizer.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name).save_pretrained(tmp_path)
    llm = LLM.load(tmp_path)
    assert llm.generate(PROMPT, GREEDY, max_new_tokens=12).token_ids == reference


@pytest.mark.slow
def test_generate_script_takes_the_gguf(smollm2_gguf, reference):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "generate.py"
    r = subprocess.run([sys.executable, str(script), "--checkpoint", str(smollm2_gguf),
                        "--prompt", PROMPT, "--temperature", "0", "--max_new_tokens", "12",
                        "--output_format", "json", "--nochat"], capture_output=True,
                       text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["token_ids"] == reference


def test_missing_gguf_is_a_clear_error(tmp_path):
    from jaxinfer.errors import ConversionError

    with pytest.raises(ConversionError, match="GGUF file not found: .*nope.gguf"):
        LLM.load(tmp_path / "nope.gguf")
