"""A character tokenizer for engine tests on the tiny random model (vocab 97, EOS 3)."""

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


# Committed to a device, as checkpoint-loaded weights are (jit keys on committedness).
W = jax.device_put(tiny_weights(), jax.devices()[0])


def tiny_engine(**kw) -> Engine:
    kw = {"num_slots": 4, "max_len": 256, "prefix_cache_mb": 8.0, **kw}
    return Engine(W, TINY, CharTokenizer(), EngineConfig(**kw))
