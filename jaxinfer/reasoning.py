"""Reasoning parsers: a thinking model's `<think>...</think>` as `reasoning_content`.

    split = ReasoningParser("qwen3").split(text)   # (reasoning or None, content)

Thinking models (Qwen3, DeepSeek-R1 and their distillations) write their reasoning between
`<think>` and `</think>` before the answer. With `serve.py --reasoning_parser=...` a chat
answer carries it in `message.reasoning_content` (streamed as `delta.reasoning_content`),
as vLLM and DeepSeek's API return it, and `content` holds only the answer; a tool-call
parser then reads the answer alone. An output that opens with `<think>` and has no
`</think>` was cut short while thinking: all reasoning, no content. The parsers differ
where the output does not open with `<think>`:
- `qwen3`: no reasoning at all (thinking was off, `enable_thinking: false`);
- `deepseek_r1`: reasoning up to `</think>` all the same (its template opens `<think>`
  in the prompt, so the output never starts with it); `minimax_m2` (vLLM's name for
  MiniMax-M2's, whose template does the same) is this parser.
`openai_gptoss` reads gpt-oss's harmony channels instead (harmony.py): `analysis` is the
reasoning, `final` the content.
No JAX and no HTTP here.
"""

from __future__ import annotations

from typing import Any

from jaxinfer import harmony

PARSERS = ("qwen3", "deepseek_r1", "minimax_m2", "openai_gptoss")
_IMPLICIT = ("deepseek_r1", "minimax_m2")  # their templates open <think> in the prompt
START, END = "<think>", "</think>"


class ReasoningParser:
    def __init__(self, name: str, implicit_start: bool | None = None):
        """`implicit_start`: the template opened `<think>` in the prompt (deepseek_r1), so
        output without it may still be reasoning."""
        if name not in PARSERS:
            from jaxinfer.errors import BadRequestError

            raise BadRequestError(f"unknown reasoning parser {name!r}; known: {PARSERS}",
                                  "reasoning_parser")
        self.name = name
        self.implicit_start = name in _IMPLICIT if implicit_start is None else implicit_start

    @property
    def keeps_special_tokens(self) -> bool:
        """Whether the text must keep special tokens: harmony's markers are ones."""
        return self.name == "openai_gptoss"

    def constrained(self) -> ReasoningParser:
        """The parser for output a grammar constrains (a tool call, a JSON schema): it is
        reasoning only where it opens with `<think>` itself, since the grammar applies
        from the first token and leaves no room for an implicit one."""
        return ReasoningParser(self.name, implicit_start=False)

    def split(self, text: str) -> tuple[str | None, str]:
        """(reasoning, content) of a whole output; reasoning None when there is none."""
        if self.name == "openai_gptoss":
            return harmony.split(text)
        opened = text.startswith(START)
        if not opened and not self.implicit_start:
            return None, text
        body = text[len(START):] if opened else text
        at = body.find(END)
        if at < 0:
            return body, ""  # cut short while thinking
        return body[:at], body[at + len(END):]

    def stream(self) -> ReasoningStream | harmony.HarmonyStream:
        return harmony.HarmonyStream() if self.name == "openai_gptoss" else \
            ReasoningStream(self)


class ReasoningStream:
    """One choice's output as deltas: `{"reasoning_content": ...}` until `</think>`, then
    `{"content": ...}`. Text that may still become a marker (an opening `<think>`, a
    closing `</think>`) is held back until it is known; a qwen3 output that does not open
    with `<think>` is all content."""

    def __init__(self, parser: ReasoningParser):
        self.parser, self.text, self.sent, self.done = parser, "", 0, False

    def feed(self, delta: str) -> list[dict[str, Any]]:
        self.text += delta
        if self.done:  # past </think>: all content
            new, self.sent = self.text[self.sent:], len(self.text)
            return [{"content": new}] if new else []
        head = len(START) if self.text.startswith(START) else 0
        if not head and START.startswith(self.text):
            return []  # may still open with <think>
        if not head and not self.parser.implicit_start:
            self.done, self.sent = True, 0  # no reasoning: everything is content
            return self.feed("")
        self.sent = max(self.sent, head)
        at = self.text.find(END, head)
        if at >= 0:
            out = self._reasoning(self.text[self.sent:at])
            self.done, self.sent = True, at + len(END)
            return out + self.feed("")
        safe = _safe_end(self.text, self.sent)
        out = self._reasoning(self.text[self.sent:safe])
        self.sent = safe
        return out

    def finish(self) -> list[dict[str, Any]]:
        """What was held back, by the rules of a whole output."""
        if self.done:
            return self.feed("")
        reasoning, content = self.parser.split(self.text)
        if reasoning is None:
            self.sent = len(self.text)
            return [{"content": content}] if content else []
        rest = self.text[self.sent:]
        self.sent = len(self.text)
        return self._reasoning(rest)

    @staticmethod
    def _reasoning(text: str) -> list[dict[str, Any]]:
        return [{"reasoning_content": text}] if text else []


def _safe_end(text: str, start: int) -> int:
    """How far `text` (from `start`) is surely not part of `</think>`."""
    for k in range(min(len(END) - 1, len(text) - start), 0, -1):
        if END.startswith(text[-k:]):
            return len(text) - k
    return len(text)
