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


# llama.cpp's test data ships in this source distribution: vendor/llama.cpp/models/
# ggml-vocab-*.gguf (real models' vocabularies, with .inp texts and the .out ids their
# Hugging Face tokenizers gave) and models/templates/*.jinja (real models' chat templates):
# an independent reference the package index serves.
LLAMA_CPP_SDIST = "llama-cpp-python==0.3.36"


@pytest.fixture(scope="session")
def llama_cpp_vocabs():
    """Directory of llama.cpp's ggml-vocab-* files and templates/*.jinja, fetched once into
    the cache dir."""
    import subprocess
    import sys
    import tarfile
    import tempfile

    from jaxinfer import default_model

    target = default_model.cache_dir() / ("test-data-" + LLAMA_CPP_SDIST.replace("==", "-"))
    with default_model._locked("llama-cpp-vocabs"):
        if target.is_dir():
            return target
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                            "--no-binary", ":all:", "--disable-pip-version-check",
                            "--timeout", "30", "--dest", tmp, LLAMA_CPP_SDIST],
                           check=True, timeout=900)
            (sdist,) = Path(tmp).glob("*.tar.gz")
            out = Path(tmp) / "data"
            (out / "templates").mkdir(parents=True)
            with tarfile.open(sdist) as tar:
                for m in tar.getmembers():
                    name = m.name.rsplit("/", 1)[-1]
                    if not m.isfile():
                        continue
                    if "/vendor/llama.cpp/models/ggml-vocab-" in m.name:
                        (out / name).write_bytes(tar.extractfile(m).read())
                    elif "/vendor/llama.cpp/models/templates/" in m.name and \
                            name.endswith(".jinja"):
                        (out / "templates" / name).write_bytes(tar.extractfile(m).read())
            out.rename(target)
    return target


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
    """Drop each module's compiled programs and arrays when it ends: one pytest process
    runs ~450 tests, and XLA:CPU crashed (segfault while compiling) late in the full run
    once the process had accumulated ~8 GB of them."""
    yield
    import gc

    jax.clear_caches()
    gc.collect()
