"""Structured output: constrain a request's tokens to a JSON schema, a regex, a choice of
strings or a grammar (Lark, or llama.cpp's GBNF, which llguidance converts to Lark).

    engine.submit(prompt, constraint=Constraint(json_schema={"type": "object", ...}))

Library choice: llguidance (guidance-ai; one of vLLM's structured-output backends and the
one llama.cpp embeds). It compiles the constraint against our tokenizer's own token bytes
and computes each step's bitmask of allowed tokens in well under a millisecond for a
50k vocabulary, with no torch dependency. The engine applies the mask to the logits on
device (`apply_bitmask`, traced: a constraint never recompiles) and advances the request's
matcher with each token it samples; a request ends when its grammar is complete.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.errors import BadRequestError


@dataclasses.dataclass(frozen=True)
class Constraint:
    """What a request's output must match: exactly one of the fields."""

    json_schema: dict | None = None  # a JSON Schema (OpenAI's response_format json_schema)
    json_object: bool = False  # any JSON object (OpenAI's json_object mode)
    regex: str | None = None
    choice: tuple[str, ...] | None = None  # one of these strings, exactly
    lark: str | None = None  # a grammar: Lark (llguidance's dialect) or GBNF (llama.cpp's)

    def __post_init__(self) -> None:
        set_ = [f.name for f in dataclasses.fields(self) if getattr(self, f.name)
                not in (None, False)]
        if len(set_) != 1:
            raise BadRequestError(f"a constraint needs exactly one of json_schema, json_object, "
                                  f"regex, choice, lark; got {set_ or 'none'}", "constraint")
        if self.json_schema is not None and not isinstance(self.json_schema, dict):
            raise BadRequestError(f"json_schema must be an object, got {self.json_schema!r}",
                                  "constraint")
        for name in ("regex", "lark"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, str):
                raise BadRequestError(f"{name} must be a string, got {v!r}", "constraint")
        if self.choice is not None:
            if isinstance(self.choice, str) or not all(
                    isinstance(c, str) and c for c in self.choice):
                raise BadRequestError(f"choice must be a list of non-empty strings, got "
                                      f"{self.choice!r}", "constraint")
            object.__setattr__(self, "choice", tuple(self.choice))

    def grammar(self) -> str:
        """The llguidance grammar (a JSON string) of this constraint."""
        from llguidance import LLMatcher

        if self.json_schema is not None:
            return LLMatcher.grammar_from_json_schema(self.json_schema)
        if self.json_object:
            return LLMatcher.grammar_from_json_schema({"type": "object"})
        if self.regex is not None:
            return LLMatcher.grammar_from_regex(self.regex)
        if self.choice is not None:  # Lark string literals take JSON's escapes
            return LLMatcher.grammar_from_lark(
                "start: " + " | ".join(json.dumps(c) for c in self.choice))
        return LLMatcher.grammar_from_lark(_as_lark(self.lark))

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items() if v not in (None, False)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Constraint:
        return cls(**d)


def from_openai(response_format: Any = None, guided_json: Any = None,
                guided_regex: Any = None, guided_choice: Any = None,
                guided_grammar: Any = None) -> Constraint | None:
    """A constraint from OpenAI's `response_format` or vLLM's `guided_*` extensions
    (None: unconstrained). BadRequestError names the bad field."""
    given = {k: v for k, v in [("guided_json", guided_json), ("guided_regex", guided_regex),
                                ("guided_choice", guided_choice),
                                ("guided_grammar", guided_grammar)] if v is not None}
    rf = response_format
    if rf is not None:
        if not isinstance(rf, dict) or rf.get("type") not in ("text", "json_object",
                                                               "json_schema"):
            raise BadRequestError("response_format must be {\"type\": \"text\" | "
                                  f"\"json_object\" | \"json_schema\", ...}}, got {rf!r}")
        if rf["type"] != "text":
            given["response_format"] = rf
    if len(given) > 1:
        raise BadRequestError(f"give one structured-output field, got {sorted(given)}")
    if not given:
        return None
    (name, v), = given.items()
    if name == "response_format":
        if v["type"] == "json_object":
            return Constraint(json_object=True)
        spec = v.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise BadRequestError("response_format json_schema needs "
                                  f"{{\"json_schema\": {{\"schema\": {{...}}}}}}, got {v!r}")
        return Constraint(json_schema=schema)
    if name == "guided_json":
        return Constraint(json_schema=json.loads(v) if isinstance(v, str) else v)
    if name == "guided_regex":
        return Constraint(regex=v)
    if name == "guided_choice":
        return Constraint(choice=v)
    return Constraint(lark=v)


class _TokenizerView:
    """A tokenizer as llguidance's TokenizerWrapper reads it: every token's bytes."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: list[int]):
        n = min(tokenizer.vocab_size, vocab_size)
        self.tokens = [tokenizer.token_bytes(i) for i in range(n)]
        self.eos_token_id = eos_ids[0]
        self.bos_token_id = getattr(tokenizer, "bos_id", None)
        self.special_token_ids = sorted(getattr(tokenizer, "special_ids", ()))
        self._tokenizer = tokenizer

    def __call__(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_bos=False)


class Grammars:
    """Builds matchers for one model's tokenizer; the llguidance view of the vocabulary is
    made on first use (about 0.3 s for 49k tokens) and kept."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: list[int]):
        self._args = (tokenizer, vocab_size, eos_ids)
        self.vocab_size = vocab_size
        self.words = (vocab_size + 31) // 32  # W: int32 words of a row's bitmask
        self._lock = threading.Lock()
        self._ll = None

    def _tokenizer(self):
        with self._lock:
            if self._ll is None:
                try:
                    import llguidance
                except ImportError as e:  # a dependency, but say so clearly if missing
                    raise BadRequestError("structured output needs the llguidance package "
                                          "(pip install llguidance)", "constraint") from e
                tok, v, eos = self._args
                if not eos:
                    raise BadRequestError("structured output needs an EOS token", "constraint")
                view = llguidance.TokenizerWrapper(_TokenizerView(tok, v, eos))
                self._ll = llguidance.LLTokenizer(view, n_vocab=v, eos_token=list(eos))
            return self._ll

    def prepare(self) -> None:
        """Build the vocabulary view now rather than at the first constraint."""
        self._tokenizer()

    def matcher(self, constraint: Constraint):
        """A fresh matcher; BadRequestError if the constraint does not compile."""
        from llguidance import LLMatcher

        tok = self._tokenizer()
        try:
            grammar = constraint.grammar()
        except (ValueError, TypeError) as e:
            raise BadRequestError(f"bad constraint {constraint.to_json()}: {e}",
                                  "constraint") from None
        err = LLMatcher.validate_grammar(grammar, tok)
        if err:
            raise BadRequestError(f"bad constraint {constraint.to_json()}: "
                                  f"{_grammar_error(err)}", "constraint")
        m = LLMatcher(tok, grammar, log_level=0)
        if m.is_error():
            raise BadRequestError(f"bad constraint {constraint.to_json()}: {m.get_error()}",
                                  "constraint")
        return m

    def fill(self, matcher, mask_BW: np.ndarray, row: int) -> None:
        """Write the tokens `matcher` allows next into row `row` of an int32 bitmask."""
        from llguidance.numpy import fill_next_token_bitmask

        fill_next_token_bitmask(matcher, mask_BW, row)

    def masks(self, matchers: list) -> np.ndarray | None:
        """Each row's allowed next tokens as an int32 bitmask [B, W] (a None matcher: any
        token); None when no row has a matcher, so the step needs no mask."""
        if all(m is None for m in matchers):
            return None
        mask = self.all_allowed(len(matchers))
        for b, m in enumerate(matchers):
            if m is not None:
                self.fill(m, mask, b)
        return mask

    def drafted_masks(self, drafted_BK: np.ndarray, rows: dict[int, tuple[Any, Any]]
                      ) -> np.ndarray:
        """Speculative decoding: the tokens each row may take at the k + 1 positions of a
        round, int32 [B, k + 1, W]. For `rows` ({row: (matcher, ends)}) what the matcher
        allows walking along the row's k drafted tokens (then rolled back); all-allowed
        elsewhere. Past a drafted token that ends the row (`ends(token)`) or leaves the
        grammar the target rejects it, so later positions stay all-allowed."""
        B, k = drafted_BK.shape
        mask = self.all_allowed(B * (k + 1))
        for b, (matcher, ends) in rows.items():
            walked = 0
            for t in range(k + 1):
                self.fill(matcher, mask, b * (k + 1) + t)
                if t == k:
                    break
                tok = int(drafted_BK[b, t])
                if ends(tok) or matcher.validate_tokens([tok]) != 1:
                    break
                matcher.consume_token(tok)
                walked += 1
            matcher.rollback(walked)
        return mask.reshape(B, k + 1, -1)

    def all_allowed(self, rows: int) -> np.ndarray:
        return np.full((rows, self.words), -1, np.int32)


def apply_bitmask(logits_BV: jax.Array, mask_BW: jax.Array) -> jax.Array:
    """Logits with the tokens whose bit is 0 in `mask_BW` (int32 words, bit j of word w is
    token 32 w + j, llguidance's layout) set to -inf; an all-ones row changes nothing."""
    V = logits_BV.shape[-1]
    bits = (mask_BW[:, :, None] >> jnp.arange(32, dtype=jnp.int32)) & 1
    allowed_BV = bits.reshape(mask_BW.shape[0], -1)[:, :V].astype(bool)
    return jnp.where(allowed_BV, logits_BV, -jnp.inf)


def _as_lark(text: str) -> str:
    """A grammar in Lark: itself if it has Lark's `start:` rule or is Lark (`?start:` ...),
    else converted from llama.cpp's GBNF by llguidance; ValueError if it is neither."""
    from llguidance import LLMatcher
    from llguidance.gbnf_to_lark import GbnfToLarkError, gbnf_to_lark, is_lark_syntax

    if is_lark_syntax(text):
        return text
    try:
        return gbnf_to_lark(text)
    except GbnfToLarkError as e:
        if not LLMatcher.validate_grammar(LLMatcher.grammar_from_lark(text), None):
            return text
        raise ValueError(f"not a Lark grammar and not valid GBNF: {e}") from None


def _grammar_error(report: str) -> str:
    """llguidance's multi-line report in one line: its first line and its `error:` lines
    (the rest are source excerpts and caret markers)."""
    lines = [ln.strip() for ln in report.strip().splitlines() if ln.strip()]
    keep = [ln.rstrip(":") for ln in lines[:1]] + [
        ln.removeprefix("error: ") for ln in lines[1:] if ln.startswith("error:")]
    return "; ".join(keep) or report.strip()
