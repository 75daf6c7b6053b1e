"""jaxinfer: a JAX functional LLM inference engine.

    import jaxinfer
    llm = jaxinfer.load()            # default model: SmolLM2-135M-Instruct
    print(llm.generate("The capital of France is", max_new_tokens=8).text)
    for delta in llm.stream("Tell me a story"): print(delta, end="")
    llm.chat([{"role": "user", "content": "Hi!"}])
    logits_BTV, cache = llm.forward(llm.params, tokens_BT, llm.init_cache(1, 256))

`help(jaxinfer.load)` documents the entry point. Serving: `jaxinfer.Engine`; presets:
`jaxinfer.presets`; the pure model: `jaxinfer.model`. Heavy modules load lazily, so
`import jaxinfer.tokenizer` does not pull in JAX.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "load": ("jaxinfer.llm", "load"),
    "LLM": ("jaxinfer.llm", "LLM"),
    "Completion": ("jaxinfer.llm", "Completion"),
    "SamplingParams": ("jaxinfer.sampling", "SamplingParams"),
    "GREEDY": ("jaxinfer.sampling", "GREEDY"),
    "Engine": ("jaxinfer.engine", "Engine"),
    "EngineConfig": ("jaxinfer.engine", "EngineConfig"),
    "ModelConfig": ("jaxinfer.config", "ModelConfig"),
}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'jaxinfer' has no attribute {name!r}")
