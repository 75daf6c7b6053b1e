"""Shared fixtures. Eight simulated CPU devices so sharding tests can build meshes."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_gguf():
    """Path of the real SmolLM2-135M-Instruct GGUF (fetched once into the cache dir)."""
    from jaxinfer import default_model

    return default_model.gguf_path()


@pytest.fixture(scope="session")
def smollm2_checkpoint():
    """Orbax checkpoint directory of the real SmolLM2 model (converted once, cached)."""
    from jaxinfer import default_model

    return default_model.checkpoint_path()


@pytest.fixture(scope="session")
def smollm2_hf_dir(smollm2_gguf):
    """The reference model: SmolLM2 as transformers itself dequantizes the GGUF, saved once
    into the cache dir as a float32 Hugging Face directory (transformers' GGUF loading
    takes ~18 s; each module that compares against it loads this in well under a second)."""
    import tempfile

    import torch
    import transformers

    from jaxinfer import default_model

    target = default_model.cache_dir() / (
        f"hf-{smollm2_gguf.stem}-{smollm2_gguf.stat().st_size}-f32-"
        f"transformers-{transformers.__version__}")
    with default_model._locked("hf-smollm2"):
        if not target.is_dir():
            gguf_model = transformers.AutoModelForCausalLM.from_pretrained(
                smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32)
            config = gguf_model.config
            if hasattr(config, "quantization_config"):  # dequantized already: plain float32
                del config.quantization_config
            m = type(gguf_model)(config)
            m.load_state_dict(gguf_model.state_dict())
            with tempfile.TemporaryDirectory(dir=target.parent, prefix=".hf-") as tmp:
                out = Path(tmp) / "model"
                m.save_pretrained(out)
                out.rename(target)
    return target


# llama.cpp's test data ships in this source distribution: vendor/llama.cpp/models/
# ggml-vocab-*.gguf (real models' vocabularies, with .inp texts and the .out ids their
# Hugging Face tokenizers gave) and models/templates/*.jinja (real models' chat templates):
# an independent reference the package index serves.
LLAMA_CPP_SDIST = "llama-cpp-python==0.3.36"


def _llama_cpp_sdist() -> Path:
    """The llama-cpp-python source distribution, downloaded once into the cache dir."""
    import subprocess
    import sys
    import tempfile

    from jaxinfer import default_model

    target = default_model.cache_dir() / (LLAMA_CPP_SDIST.replace("==", "-") + ".tar.gz")
    with default_model._locked("llama-cpp-sdist"):
        if not target.is_file():
            with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
                subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                                "--no-binary", ":all:", "--disable-pip-version-check",
                                "--timeout", "30", "--dest", tmp, LLAMA_CPP_SDIST],
                               check=True, timeout=900)
                (sdist,) = Path(tmp).glob("*.tar.gz")
                sdist.rename(target)
    return target


def _from_llama_cpp_sdist(name: str, wanted) -> Path:
    """A cache directory `name` holding the members of the llama-cpp-python source
    distribution for which wanted(path inside vendor/llama.cpp/) gives a relative target
    path (None: skip); extracted once."""
    import tarfile
    import tempfile

    from jaxinfer import default_model

    target = default_model.cache_dir() / (name + "-" + LLAMA_CPP_SDIST.replace("==", "-"))
    with default_model._locked(name):
        if target.is_dir():
            return target
        sdist = _llama_cpp_sdist()
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".extract-") as tmp:
            out = Path(tmp) / "data"
            out.mkdir()
            with tarfile.open(sdist) as tar:
                for m in tar.getmembers():
                    _, sep, inner = m.name.partition("/vendor/llama.cpp/")
                    rel = wanted(inner) if sep and m.isfile() else None
                    if rel is not None:
                        (out / rel).parent.mkdir(parents=True, exist_ok=True)
                        (out / rel).write_bytes(tar.extractfile(m).read())
            out.rename(target)
    return target


@pytest.fixture(scope="session")
def llama_cpp_vocabs():
    """Directory of llama.cpp's ggml-vocab-* files and templates/*.jinja, fetched once into
    the cache dir."""
    def wanted(inner: str) -> str | None:
        name = inner.rsplit("/", 1)[-1]
        if inner.startswith("models/ggml-vocab-"):
            return name
        if inner.startswith("models/templates/") and name.endswith(".jinja"):
            return "templates/" + name
        return None

    return _from_llama_cpp_sdist("test-data", wanted)


@pytest.fixture(scope="session")
def llama_cpp_grammars():
    """Directory of llama.cpp's own GBNF grammars (grammars/*.gbnf), fetched once."""
    def wanted(inner: str) -> str | None:
        return inner.split("/", 1)[1] if inner.startswith("grammars/") and \
            inner.endswith(".gbnf") else None

    return _from_llama_cpp_sdist("llama-cpp-grammars", wanted)


@pytest.fixture(scope="session")
def llama_cpp_converter():
    """Directory of llama.cpp's own Hugging Face -> GGUF converter (convert_hf_to_gguf.py,
    its conversion/ package and the gguf-py it writes with), fetched once into the cache
    dir: GGUF files written by llama.cpp itself, not by our tests' imitation of it."""
    def wanted(inner: str) -> str | None:
        keep = (inner == "convert_hf_to_gguf.py" or inner.startswith("conversion/")
                or inner.startswith("gguf-py/gguf/"))
        return inner if keep and inner.endswith(".py") else None

    return _from_llama_cpp_sdist("llama-cpp-converter", wanted)


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
    """Drop each module's compiled programs and arrays when it ends: one pytest process
    runs ~450 tests, and XLA:CPU crashed (segfault while compiling) late in the full run
    once the process had accumulated ~8 GB of them."""
    yield
    import gc

    jax.clear_caches()
    gc.collect()
