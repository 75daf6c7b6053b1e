"""Run as a subprocess by test_sharding.py (x64 mode is process-wide): max |logit| error
of float32 SmolLM2 against the same weights in float64, single-device and under meshes,
at the prompts' own positions. Prints one JSON object."""

import json
import sys

import jax

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxinfer import kv_cache, model  # noqa: E402
from jaxinfer.llm import LLM  # noqa: E402


def main(checkpoint: str, prompts: list[str], meshes: list[str]) -> None:
    llm = LLM.load(checkpoint, dtype=jnp.float32)
    ids = [llm.tokenizer.encode(p) for p in prompts]
    T = max(map(len, ids))
    batch = jnp.asarray([i + [2] * (T - len(i)) for i in ids], jnp.int32)
    valid = np.zeros((len(ids), T), bool)
    for b, i in enumerate(ids):
        valid[b, :len(i)] = True

    def logits(params, dtype):
        cache = kv_cache.init_cache(llm.cfg, len(ids), 32, dtype)
        return np.asarray(model.forward(params, batch, cache, llm.cfg)[0], np.float64)

    exact = logits(jax.tree.map(lambda a: a.astype(jnp.float64), llm.params), jnp.float64)
    f32 = logits(llm.params, jnp.float32)
    out = {"single": float(np.abs(f32 - exact)[valid].max()), "meshes": {}}
    for m in meshes:
        sharded = logits(LLM.load(checkpoint, dtype=jnp.float32, mesh=m).params, jnp.float32)
        out["meshes"][m] = {"vs_float64": float(np.abs(sharded - exact)[valid].max()),
                            "vs_single": float(np.abs(sharded - f32)[valid].max())}
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]), sys.argv[3:])
