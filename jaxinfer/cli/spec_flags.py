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


def kwargs() -> dict[str, Any]:
    """draft ("ngram", a checkpoint directory or None), num_speculative_tokens and
    ngram_size, as LLM.load_draft, Engine.from_llm, serve() and run_batch_job() take them;
    both draft flags at once is a ConfigError."""
    from jaxinfer.errors import ConfigError

    if DRAFT.value and NGRAM.value:
        raise ConfigError("give --draft_checkpoint or --ngram_draft, not both")
    return dict(draft="ngram" if NGRAM.value else DRAFT.value,
                num_speculative_tokens=NUM_SPEC.value, ngram_size=NGRAM_SIZE.value)
