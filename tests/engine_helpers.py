"""A character tokenizer for engine tests on the tiny random model (vocab 97, EOS 3), the
engines built on it, and SmolLM2 behind a server."""

import contextlib
import json

import jax

from jaxinfer.engine import Engine, EngineConfig

from .helpers import TINY, tiny_weights


class CharTokenizer:
    """id i <-> chr(32 + i); ids past '~' decode to two characters, so deltas vary."""

    vocab_size = TINY.vocab_size
    eos_ids = (3,)
    bos_id = None

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        return [min(max(ord(c) - 32, 0), 94) for c in text]

    @property
    def special_ids(self) -> frozenset[int]:
        return frozenset(self.eos_ids)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        skip = self.special_ids if skip_special_tokens else ()
        return "".join(chr(32 + i) if i < 95 else "<>" for i in ids if i not in skip)

    def token_bytes(self, i: int) -> bytes:
        return self.decode([i]).encode()

    def apply_chat_template(self, messages, add_generation_prompt=True,
                            continue_final_message=False, chat_template_kwargs=None) -> str:
        text = "".join(f"[{m['role']}]{m['content']}" for m in messages)
        return text + ("[assistant]" if add_generation_prompt else "")


class ToolTemplateTokenizer(CharTokenizer):
    """The tiny tokenizer with a template that shows the tools' names and earlier calls."""

    def apply_chat_template(self, messages, add_generation_prompt=True,
                            continue_final_message=False, chat_template_kwargs=None,
                            tools=None) -> str:
        head = "[tools]" + ",".join(t["function"]["name"] for t in tools) if tools else ""
        messages = [{**m, "content": m["content"] + "".join(
            f"call:{c['function']['name']}{json.dumps(c['function']['arguments'])}"
            for c in m.get("tool_calls", []))} for m in messages]
        return head + super().apply_chat_template(messages, add_generation_prompt)


# Committed to a device, as checkpoint-loaded weights are (jit keys on committedness).
W = jax.device_put(tiny_weights(), jax.devices()[0])


def tiny_engine(**kw) -> Engine:
    kw = {"num_slots": 4, "max_len": 256, "prefix_cache_mb": 8.0, **kw}
    return Engine(W, TINY, CharTokenizer(), EngineConfig(**kw))


def tool_engine(**kw) -> Engine:
    """The tiny engine whose template shows tools (ToolTemplateTokenizer)."""
    kw = {"num_slots": 4, "max_len": 256, "prefix_cache_mb": 8.0, **kw}
    return Engine(W, TINY, ToolTemplateTokenizer(), EngineConfig(**kw))


@contextlib.contextmanager
def smollm2_server(checkpoint, **app_kw):
    """(engine, server) of SmolLM2 in float32, two slots of 256, served as "smollm2"."""
    import jax.numpy as jnp

    from jaxinfer.llm import LLM
    from jaxinfer.server import BackgroundServer, create_app

    llm = LLM.load(checkpoint, dtype=jnp.float32)
    with Engine.from_llm(llm, EngineConfig(num_slots=2, max_len=256)) as eng, \
            BackgroundServer(create_app(eng, "smollm2", **app_kw)) as srv:
        yield eng, srv
