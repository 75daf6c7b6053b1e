"""gpt-oss's harmony format read out of a chat answer: reasoning, answer and function calls.

gpt-oss answers in messages, each a header and a body (the prompt ends `<|start|>assistant`):

    <|channel|>analysis<|message|>Need the weather.<|end|>
    <|start|>assistant<|channel|>final<|message|>It is sunny.<|return|>
    <|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>
        {"city": "Paris"}<|call|>

The `analysis` channel is reasoning, `final` (and a `commentary` preamble with no
recipient) the answer; a message addressed `to=functions.NAME` is a call, passed on as
content in one canonical form (`call_text`) for the `openai` tool parser to read. Every
marker is a special token: the text must keep them (`skip_special_tokens=False`). An
answer that does not open with a harmony header (a grammar fixed its format) is all
content. No JAX and no HTTP here.
"""

from __future__ import annotations

import re
from typing import Any

START, CHANNEL, MESSAGE = "<|start|>", "<|channel|>", "<|message|>"
ENDS = ("<|end|>", "<|call|>", "<|return|>")
CALL_OPEN = "<|start|>assistant to=functions."
_RECIPIENT = re.compile(r"to=functions\.([^\s<]+)")
_CHANNEL = re.compile(r"<\|channel\|>\s*(\w+)")


def call_text(name: str, body: str, done: bool = True) -> str:
    """A function call message in the one form `openai` parses (tool_parsers.py)."""
    return f"{CALL_OPEN}{name}{CHANNEL}commentary json{MESSAGE}{body}" + \
        ("<|call|>" if done else "")


class HarmonyStream:
    """One answer's text as deltas, `{"reasoning_content": ...}` and `{"content": ...}`;
    text that may still be a marker is held back until it is known."""

    def __init__(self) -> None:
        self.text, self.pos, self.state = "", 0, "open"
        self.kind: str | None = None  # "reasoning", "content" or "call:NAME"
        self.saw_reasoning = False

    def feed(self, delta: str) -> list[dict[str, Any]]:
        self.text += delta
        out: list[dict[str, Any]] = []
        while self._step(out):
            pass
        return out

    def finish(self) -> list[dict[str, Any]]:
        """What was held back, by the rules of a whole answer (a body cut short counts; a
        header cut short is dropped)."""
        out: list[dict[str, Any]] = []
        rest = self.text[self.pos:]
        if self.state == "open":
            self._emit(out, "content", rest)
        elif self.state == "body" and self.kind and self.kind.startswith("call:"):
            self._emit(out, "content", call_text(self.kind[5:], rest, done=False))
        elif self.state == "body":
            self._emit(out, self.kind, rest)
        self.pos, self.state = len(self.text), "done"
        return out

    def _step(self, out: list[dict[str, Any]]) -> bool:
        """Advance through what is known; False when it must wait for more text."""
        text, pos = self.text, self.pos
        if self.state == "open":  # harmony only where the answer opens with a header
            if text.startswith((CHANNEL, START)):
                self.state = "header"
                return True
            if CHANNEL.startswith(text) or START.startswith(text):
                return False
            self.state = "plain"
            return True
        if self.state == "plain":
            self._emit(out, "content", text[pos:])
            self.pos = len(text)
            return False
        if self.state == "header":
            at = text.find(MESSAGE, pos)
            if at < 0:
                return False
            header = text[pos:at]
            to, channel = _RECIPIENT.search(header), _CHANNEL.search(header)
            self.kind = (f"call:{to.group(1)}" if to else "reasoning"
                         if channel and channel.group(1) == "analysis" else "content")
            self.saw_reasoning |= self.kind == "reasoning"
            self.pos, self.state = at + len(MESSAGE), "body"
            return True
        if self.state == "body":
            ends = [(i, m) for m in (*ENDS, START) if (i := text.find(m, pos)) >= 0]
            if not ends:  # hold back a tail that may begin a marker
                safe = next((k for k in range(max(pos, len(text) - 9), len(text))
                             if any(m.startswith(text[k:]) for m in (*ENDS, START))),
                            len(text))
                if not self.kind.startswith("call:"):  # a call goes out whole
                    self._emit(out, self.kind, text[pos:safe])
                    self.pos = safe
                return False
            at, marker = min(ends)
            if self.kind.startswith("call:"):
                self._emit(out, "content", call_text(self.kind[5:], text[pos:at]))
            else:
                self._emit(out, self.kind, text[pos:at])
            self.pos = at if marker == START else at + len(marker)
            self.state = "between"
            return True
        if self.state == "between":  # after a message: the next one, or the end
            if text.startswith(START, pos):
                self.pos, self.state = pos + len(START), "header"
                return True
            if not text[pos:] or START.startswith(text[pos:]):
                return False
            self.state = "header"  # a header without <|start|>
            return True
        return False

    def _emit(self, out: list[dict[str, Any]], kind: str | None, text: str) -> None:
        if text:
            out.append({"reasoning_content" if kind == "reasoning" else "content": text})


def split(text: str) -> tuple[str | None, str]:
    """(reasoning, content) of a whole answer: reasoning None when it has none."""
    stream = HarmonyStream()
    parts = stream.feed(text) + stream.finish()
    reasoning = "".join(p.get("reasoning_content", "") for p in parts)
    return (reasoning if stream.saw_reasoning else None,
            "".join(p.get("content", "") for p in parts))
