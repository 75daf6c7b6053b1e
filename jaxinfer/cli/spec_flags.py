"""Speculative-decoding flags shared by generate, serve, batch and benchmark.

Importing this module defines them (once per process, like every absl flag module)."""

from __future__ import annotations

from typing import Any

from absl import flags

DRAFT = flags.DEFINE_string("draft_checkpoint", None,
                            "Speculative decoding: a smaller draft model's checkpoint.")
NGRAM = flags.DEFINE_bool("ngram_draft", False,
                          "Speculative decoding with a prompt-lookup (n-gram) draft.")
NUM_SPEC = flags.DEFINE_integer("num_speculative_tokens", 4, "Draft tokens per round.")
NGRAM_SIZE = flags.DEFINE_integer("ngram_size", 3, "Longest n-gram the lookup matches.")


def draft(load_draft) -> Any:
    """None, "ngram", or the draft LLM from `load_draft(checkpoint)`; both flags at once
    is a ConfigError."""
    spec = draft_spec()
    return spec if spec in (None, "ngram") else load_draft(spec)


def draft_spec() -> str | None:
    """None, "ngram" or the draft checkpoint path, from the flags."""
    from jaxinfer.errors import ConfigError

    if DRAFT.value and NGRAM.value:
        raise ConfigError("give --draft_checkpoint or --ngram_draft, not both")
    return "ngram" if NGRAM.value else DRAFT.value


def kwargs(load_draft) -> dict[str, Any]:
    """draft / num_speculative_tokens / ngram_size keywords, empty without a draft."""
    d = draft(load_draft)
    return {} if d is None else dict(draft=d, num_speculative_tokens=NUM_SPEC.value,
                                     ngram_size=NGRAM_SIZE.value)


def engine_kwargs() -> dict[str, Any]:
    """The same for serve() and run_batch_job(), which load a draft checkpoint themselves."""
    return dict(draft=draft_spec(), num_speculative_tokens=NUM_SPEC.value,
                ngram_size=NGRAM_SIZE.value)
