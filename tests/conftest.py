"""Shared fixtures. Eight simulated CPU devices so sharding tests can build meshes."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

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


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
    """Drop each module's compiled programs and arrays when it ends: one pytest process
    runs ~450 tests, and XLA:CPU crashed (segfault while compiling) late in the full run
    once the process had accumulated ~8 GB of them."""
    yield
    import gc

    jax.clear_caches()
    gc.collect()
