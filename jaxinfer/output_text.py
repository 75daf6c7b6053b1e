"""A request's output text as its tokens arrive: what `LLM.stream` and the engine show.

Stop strings are found in detokenized text, not in tokens, so a stream must hold back any
tail that could still grow into one: otherwise it would show text that a later token turns
into a stop string and removes. Tokens that end a row (EOS, stop ids) are never text, and
special tokens (chat markers) are left out unless asked for, as vLLM does.
"""

from __future__ import annotations

from collections.abc import Sequence

from jaxinfer.tokenizer import StreamDecoder, Tokenizer


def find_stop(text: str, stop: Sequence[str]) -> tuple[int, int]:
    """(index, length) of the earliest stop string in `text` (the longest of those starting
    there), or (-1, 0)."""
    hits = [(i, len(s)) for s in stop if s for i in (text.find(s),) if i >= 0]
    if not hits:
        return -1, 0
    at = min(i for i, _ in hits)
    return at, max(n for i, n in hits if i == at)


def held_back(text: str, stop: Sequence[str]) -> int:
    """Length of the longest tail of `text` that could still grow into a stop string."""
    best = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if s.startswith(text[-n:]):
                best = max(best, n)
                break
    return best


class TextOutput:
    """Incremental output text of one request.

    `push` each generated token and show what it returns: the deltas concatenate to
    `text`, the final text (cut before the first stop string, or after it with
    `include_stop_str`)."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (),
                 stop: Sequence[str] = (), skip_special_tokens: bool = True,
                 include_stop_str: bool = False) -> None:
        self._decoder = StreamDecoder(tokenizer, prompt_ids, skip_special_tokens)
        self._stop = tuple(s for s in stop if s)
        self._include = include_stop_str
        self.text = ""
        self.emitted = 0  # text[:emitted] has been returned
        self.stopped = False  # a stop string matched: the request is over
        self.stop_string: str | None = None  # the stop string that matched

    def push(self, token: int, ends: bool = False, last: bool = False) -> str:
        """Add one token. `ends`: it ended the row (EOS or a stop id; not text); `last`:
        nothing follows it. Returns the text that became safe to show (maybe "")."""
        if self.stopped:
            return ""
        if not ends:
            self.text += self._decoder.push(token)
            if last:
                self.text += self._decoder.flush()
        if self._stop:
            # Text before `emitted` was not held back, so no stop string starts there.
            at, n = find_stop(self.text[self.emitted:], self._stop)
            if at >= 0:
                start = self.emitted + at
                self.stop_string = self.text[start:start + n]
                self.text = self.text[:start + (n if self._include else 0)]
                self.stopped = True
        end = len(self.text)
        if not (ends or last or self.stopped):
            end -= held_back(self.text, self._stop)
        if end <= self.emitted:
            return ""
        delta, self.emitted = self.text[self.emitted:end], end
        return delta
