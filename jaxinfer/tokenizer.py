"""One tokenizer interface over SentencePiece `.model`, HF `tokenizer.json` and GGUF vocabularies.

The engine only needs ids in, text out, stop ids and a chat template, so every source is
reduced to the same small `Tokenizer` surface. GGUF vocabularies are rebuilt into the
libraries' own models (`tokenizers.models.BPE`, a SentencePiece `ModelProto`) rather than
re-implementing BPE, and can be saved as `tokenizer.json` so converted checkpoints carry
them. This module must not import jax: scripts and the server tokenize before JAX starts.
"""

from __future__ import annotations

import functools
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from jaxinfer.errors import TokenizerError

# Tokens that close an assistant turn in common chat formats (ChatML, Llama-3, Gemma 2-3,
# Gemma 4, whose turn also ends where it opens a tool response for the caller to fill).
# A model that emits one has finished its answer even when metadata names another eos.
TURN_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<turn|>", "<|tool_response>")

# llama.cpp `tokenizer.ggml.pre` names whose regexes are "each digit alone, then GPT-2"
# (llama-vocab.cpp: STARCODER/REFACT/COMMAND_R/SMOLLM/CODESHELL/EXAONE/MINERVA).
_DIGIT_SPLIT_PRE = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone",
                    "minerva-7b"}
# Names whose regex is the plain GPT-2 one (llama.cpp GPT2/MPT/OLMO/JAIS, Phi-2, EXAONE 4,
# or none given).
_GPT2_PRE = {"default", "gpt2", "gpt-2", "mpt", "olmo", "jais", "phi-2", "exaone4"}
# Names whose split regex is their models' tokenizer.json one (llama-vocab.cpp rewrites
# these for its own regex engine; the `tokenizers` library runs the originals): Llama 3
# (and GLM-4's, the same regex without BOS), Qwen2/2.5/3 (and StableLM 2), GPT-4o-style
# (`gpt-4o`, Llama 4, MiniMax-M2) and Mistral's Tekken.
_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
_UPPER, _LOWER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]", r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
_TAIL = r"\s*[\r\n]+|\s+(?!\S)|\s+"
_LLAMA3_RE = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
              + _TAIL)
_QWEN2_RE = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|" + _TAIL
_GPT4O_RE = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACTIONS}?|"
             rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*{_CONTRACTIONS}?|"
             r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|" + _TAIL)
_TEKKEN_RE = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*|"
              r"\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|" + _TAIL)
# DeepSeek V3 / R1 split in turn: numbers of up to three digits, runs of CJK and kana, then
# words, punctuation runs and whitespace.
_DEEPSEEK3_RES = (r"\p{N}{1,3}", "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
                  r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?"
                  r"[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen 3.5: Qwen2's, with marks (\p{M}) joining letters
_QWEN35_RE = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}|"
              r" ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|" + _TAIL)
_GPT2_RE = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
# DeepSeek LLM (V1, V2) and DeepSeek Coder split in turn: line breaks, letter runs (DeepSeek
# LLM's tokenizer.json spells its letters as literal ranges), punctuation runs, a trailing
# space run (LLM), CJK / Hangul runs, digits; Falcon: punctuation runs (what the tokenizers
# library counts as punctuation: ASCII's and \p{P}), GPT-2, then groups of three digits.
_CJK_HANGUL = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"
_DEEPSEEK_LLM_RES = (
    "[\r\n]",
    "\\s?[A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293"
    "\u0295-\u02af\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c"
    "\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5"
    "\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77"
    "\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57"
    "\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4"
    "\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc"
    "\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d"
    "\u212f-\u2134\u2139\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b"
    "\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f"
    "\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a"
    "\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb"
    "\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df"
    "\U0001e900-\U0001e943]+",
    "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",
    "\\s+$", _CJK_HANGUL, r"\p{N}+")
_DEEPSEEK_CODER_RES = ("[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK_HANGUL, r"\p{N}")
_FALCON_RES = (r"[\p{P}\$\+<=>\^~\|`]+", _GPT2_RE, "[0-9][0-9][0-9]")
# name -> (regex, or regexes applied in turn to the pieces; ignore_merges (a whole word in
# the vocab is one token); add BOS by default)
_SPLIT_PRE = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral",
                     "midm-2.0", "lfm2"), (_LLAMA3_RE, True, True)),
    **dict.fromkeys(("dbrx", "smaug-bpe", "glm4", "chatglm-bpe"), (_LLAMA3_RE, False, False)),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez", "stablelm2"),
                    (_QWEN2_RE, False, False)),
    **dict.fromkeys(("gpt-4o", "llama4", "minimax-m2"), (_GPT4O_RE, False, False)),
    "tekken": (_TEKKEN_RE, True, True),
    "deepseek-v3": (_DEEPSEEK3_RES, False, True),
    "deepseek-llm": (_DEEPSEEK_LLM_RES, False, False),
    "deepseek-coder": (_DEEPSEEK_CODER_RES, False, False),
    "falcon": (_FALCON_RES, False, False),
    "qwen35": (_QWEN35_RE, False, False),
}

# GGUF token types (same numbering as SentencePiece's ModelProto.SentencePiece.Type).
_UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 2, 3, 4, 5, 6


class Tokenizer(ABC):
    """Text <-> ids plus the metadata generation needs (BOS, stop ids, chat template)."""

    vocab_size: int
    bos_id: int | None
    eos_ids: tuple[int, ...]
    pad_id: int
    add_bos: bool
    chat_template: str | None

    def _init_meta(self, bos_id: int | None, eos_id: int | None, pad_id: int | None,
                   add_bos: bool, chat_template: str | None,
                   extra_eos: Sequence[int] = ()) -> None:
        """Fill the shared attributes; eos_ids = declared eos + turn-end tokens in the vocab."""
        self.bos_id = bos_id
        self.add_bos = bool(add_bos) and bos_id is not None
        self.chat_template = chat_template or None
        eos = [eos_id] if eos_id is not None else []
        eos += list(extra_eos)
        eos += [i for t in TURN_END_TOKENS if (i := self._token_to_id(t)) is not None]
        self.eos_ids = tuple(dict.fromkeys(eos))
        self.pad_id = pad_id if pad_id is not None else (eos[0] if eos else 0)
        self._eos_id = eos_id
        self._compiled_template: Any = None

    @abstractmethod
    def _token_to_id(self, token: str) -> int | None: ...

    @abstractmethod
    def _id_to_token(self, token_id: int) -> str: ...

    @abstractmethod
    def _encode(self, text: str) -> list[int]: ...

    @abstractmethod
    def _decode(self, ids: list[int]) -> str: ...

    @abstractmethod
    def save(self, directory: str | Path) -> None:
        """Write files that `load_tokenizer(directory)` reads back to an identical tokenizer."""

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; special-token strings in the text map to their single ids."""
        ids = self._encode(text)
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`. Special tokens (`special_ids`: BOS, EOS, chat markers) are
        rendered as their text unless `skip_special_tokens` drops them, as HF does."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise TokenizerError(f"token id {bad[0]} outside vocabulary of {self.vocab_size}")
        if skip_special_tokens:
            special = self._special_set
            ids = [i for i in ids if i not in special]
        return self._decode(ids)

    @functools.cached_property
    def _special_set(self) -> frozenset[int]:
        """`special_ids`, built once: a stream decodes twice per token."""
        return self.special_ids

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (OpenAI's logprobs `bytes`): a byte-level BPE or
        byte-fallback token may be part of a UTF-8 character, which decode() cannot show."""
        if not 0 <= int(token_id) < self.vocab_size:
            raise TokenizerError(f"token id {token_id} outside vocabulary of {self.vocab_size}")
        return self._token_bytes(int(token_id))

    @property
    def special_ids(self) -> frozenset[int]:
        """Control tokens (BOS, EOS, chat markers): never text a grammar may match."""
        return frozenset(self.eos_ids) | ({self.bos_id} if self.bos_id is not None else set())

    def _token_bytes(self, token_id: int) -> bytes:
        """SentencePiece-style pieces: '▁' is a space, '<0xNN>' a byte-fallback byte."""
        piece = self._id_to_token(token_id)
        if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
            return bytes([int(piece[3:5], 16)])
        return piece.replace("\u2581", " ").encode()

    def set_chat_template(self, template: str | Path) -> None:
        """Use `template` (a Jinja file or the template text; see `chat_template_text`)
        instead of the model's own chat template."""
        self.chat_template, self._compiled_template = chat_template_text(template), None

    def apply_chat_template(self, messages: list[dict[str, str]],
                            add_generation_prompt: bool = True,
                            continue_final_message: bool = False,
                            chat_template_kwargs: dict[str, Any] | None = None,
                            tools: list[dict[str, Any]] | None = None) -> str:
        """Render `messages` with the model's own Jinja template, the way HF transformers does.

        `continue_final_message` ends the text right after the last message's content, so
        the model continues it (an assistant reply begun for it, "prefill"), instead of
        closing it and opening a new turn; `chat_template_kwargs` are extra template
        variables (e.g. a model's `enable_thinking`); `tools` (OpenAI's function tools) go
        to the template as its `tools` variable, which a tool-aware template shows the
        model (others ignore it)."""
        if continue_final_message and add_generation_prompt:
            raise TokenizerError("continue_final_message continues the last message; it "
                                 "cannot be combined with add_generation_prompt")
        import jinja2

        template = self._template()
        bos = self._id_to_token(self.bos_id) if self.bos_id is not None else ""
        eos = self._id_to_token(self._eos_id) if self._eos_id is not None else ""
        extra = dict(chat_template_kwargs or {})
        if tools is not None:
            extra["tools"] = tools
        try:
            text = template.render(
                **extra, messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=bos, eos_token=eos)
        except (jinja2.TemplateError, TypeError, ValueError, LookupError, ArithmeticError) as e:
            # (the template is code: `tojson` of a value JSON cannot hold, int + str, ...)
            raise TokenizerError(f"chat_template failed on these messages: "
                                 f"{type(e).__name__}: {e}") from e
        return _cut_after_final(text, messages) if continue_final_message else text

    def _template(self):
        """The chat template, compiled on first use."""
        if self.chat_template is None:
            raise TokenizerError("tokenizer has no chat_template; pass a raw prompt instead")
        if self._compiled_template is None:
            self._compiled_template = _compile_template(self.chat_template)
        return self._compiled_template

    def _config(self) -> dict[str, Any]:
        """tokenizer_config.json content: HF's token strings plus explicit ids for us."""
        cfg: dict[str, Any] = {"add_bos_token": self.add_bos, "pad_token_id": self.pad_id,
                               "pad_token": self._id_to_token(self.pad_id)}
        if self.bos_id is not None:
            cfg |= {"bos_token_id": self.bos_id, "bos_token": self._id_to_token(self.bos_id)}
        if self._eos_id is not None:
            cfg |= {"eos_token_id": self._eos_id, "eos_token": self._id_to_token(self._eos_id)}
        if self.chat_template is not None:
            cfg["chat_template"] = self.chat_template
        return cfg

    def _write_config(self, directory: Path) -> None:
        text = json.dumps(self._config(), indent=2, ensure_ascii=False)
        (directory / "tokenizer_config.json").write_text(text + "\n", encoding="utf-8")


def _cut_after_final(text: str, messages: list[dict[str, str]]) -> str:
    """The rendered chat cut right after the final message's content (HF's rule: the
    template may trim the content's surrounding whitespace)."""
    final = str(messages[-1].get("content") or "") if messages else ""
    at = text.rfind(final.strip()) if final.strip() else -1
    if at < 0:
        raise TokenizerError("continue_final_message: the final message's content does not "
                             "appear in the rendered chat (or is empty)")
    keep = final.lstrip()
    n = len(keep) if text[at:at + len(keep)] == keep else len(final.strip())
    return text[:at + n]


def chat_template_text(template: str | Path) -> str:
    """A chat template given as vLLM's --chat-template takes it, the path of a Jinja file
    or the template text itself, as checked text: a missing file or a template that does
    not parse is a TokenizerError naming it (before any model is loaded)."""
    text = str(template)
    if "{" not in text:  # not template text: it must name a file
        path = Path(template).expanduser()
        if not path.is_file():
            raise TokenizerError(f"chat template file not found: {template}")
        text = path.read_text(encoding="utf-8")
    try:
        _compile_template(text)
    except TokenizerError as e:
        raise TokenizerError(f"chat template {str(template)[:80]!r}: {e}") from None
    return text


def _compile_template(text: str):
    """HF's way: a sandboxed Jinja environment with its filters, globals and the
    `{% generation %}` tag (which marks the assistant's text for training masks; here it
    renders its body, as HF does when it is not tracking)."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True,
        extensions=["jinja2.ext.loopcontrols", _generation_extension()])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_template_error
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["dict"] = _TemplateDict()
    try:
        return env.from_string(text)
    except jinja2.TemplateError as e:
        raise TokenizerError(f"chat_template does not parse: {e}") from e


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    """HF's `tojson`: no HTML escaping and non-ASCII kept, unlike Jinja's built-in, and
    json.dumps' options (templates pass `separators`, `sort_keys`)."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                      separators=None if separators is None else tuple(separators),
                      sort_keys=sort_keys)


class _TemplateDict:
    """`dict(...)` and `dict.fromkeys(...)` in templates, without handing them the type."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any) -> dict:
        return dict.fromkeys(*args)


@functools.cache
def _generation_extension() -> type:
    import jinja2.ext

    class Generation(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    return Generation


def _raise_template_error(message: str) -> None:
    import jinja2

    raise jinja2.TemplateError(message)


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` (from tokenizer.json or rebuilt from GGUF byte-level BPE)."""

    def __init__(self, tok: Any, *, bos_id: int | None, eos_id: int | None,
                 pad_id: int | None, add_bos: bool, chat_template: str | None,
                 extra_eos: Sequence[int] = ()) -> None:
        self._tok = tok
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self._init_meta(bos_id, eos_id, pad_id, add_bos, chat_template, extra_eos)

    def _token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def _id_to_token(self, token_id: int) -> str:
        return self._tok.id_to_token(token_id) or ""

    def _encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)

    @functools.cached_property
    def _added_tokens(self) -> dict[int, Any]:
        return self._tok.get_added_tokens_decoder()  # a fresh dict per call: keep one

    @property
    def special_ids(self) -> frozenset[int]:
        return super().special_ids | {i for i, t in self._added_tokens.items() if t.special}

    def _token_bytes(self, token_id: int) -> bytes:
        added = self._added_tokens.get(token_id)
        if added is not None:  # special tokens are their own text
            return added.content.encode()
        if type(self._tok.decoder).__name__ == "ByteLevel":
            piece = self._id_to_token(token_id)
            return bytes(_byte_decoder().get(c, 0) for c in piece)
        return super()._token_bytes(token_id)

    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json + tokenizer_config.json (chat template, bos/eos/pad, add_bos)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(d / "tokenizer.json"))
        self._write_config(d)


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2 byte-level BPE's alphabet, reversed (printable stand-in character -> byte).
    `tokenizers` applies it internally but does not expose the table."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
            *range(ord("\xae"), ord("\xff") + 1)]
    shifted = [b for b in range(256) if b not in keep]
    table = {chr(b): b for b in keep}
    table.update({chr(256 + i): b for i, b in enumerate(shifted)})
    return table


class SPTokenizer(Tokenizer):
    """A SentencePiece model (a `.model` file, or rebuilt from a GGUF `llama` vocabulary)."""

    def __init__(self, model_proto: bytes, *, bos_id: int | None = None,
                 eos_id: int | None = None, pad_id: int | None = None,
                 add_bos: bool | None = None, chat_template: str | None = None,
                 extra_eos: Sequence[int] = (), source: str = "<bytes>") -> None:
        import sentencepiece as spm

        self._proto = model_proto
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(model_proto)
        except Exception as e:  # sentencepiece raises bare RuntimeError/OSError on bad protos
            raise TokenizerError(f"not a SentencePiece model: {source} ({e})") from e
        sp = self._sp
        self.vocab_size = sp.get_piece_size()
        # SentencePiece never matches control pieces (<s>, </s>) inside text, but rendered
        # chat templates contain them, so encode() splits them out first like HF and llama.cpp.
        self._control = {sp.id_to_piece(i): i for i in range(self.vocab_size)
                         if sp.is_control(i) and sp.id_to_piece(i)}
        pattern = "|".join(re.escape(p) for p in sorted(self._control, key=len, reverse=True))
        self._control_re = re.compile(f"({pattern})") if pattern else None
        bos = bos_id if bos_id is not None else (sp.bos_id() if sp.bos_id() >= 0 else None)
        eos = eos_id if eos_id is not None else (sp.eos_id() if sp.eos_id() >= 0 else None)
        pad = pad_id if pad_id is not None else (sp.pad_id() if sp.pad_id() >= 0 else None)
        self._init_meta(bos, eos, pad, bos is not None if add_bos is None else add_bos,
                        chat_template, extra_eos)

    @property
    def special_ids(self) -> frozenset[int]:
        return super().special_ids | set(self._control.values())

    def _token_to_id(self, token: str) -> int | None:
        i = self._sp.piece_to_id(token)
        return i if self._sp.id_to_piece(i) == token else None  # unknown maps to unk_id

    def _id_to_token(self, token_id: int) -> str:
        return self._sp.id_to_piece(token_id)

    def _encode(self, text: str) -> list[int]:
        if self._control_re is None:
            return list(self._sp.encode(text))
        ids: list[int] = []
        for k, part in enumerate(self._control_re.split(text)):
            if k % 2:
                ids.append(self._control[part])
            elif part:
                ids += self._sp.encode(part)
        return ids

    def _decode(self, ids: list[int]) -> str:
        # sp.decode drops control tokens, so decode runs of ordinary pieces between them.
        # It also strips the dummy-prefix space of a run's first piece; that is right only at
        # the very start of the text, so restore it for runs that follow a control token.
        out: list[str] = []
        run: list[int] = []
        for i in [*ids, -1]:
            if i >= 0 and not self._sp.is_control(i):
                run.append(i)
                continue
            if run:
                text = self._sp.decode(run)
                if out and self._sp.id_to_piece(run[0]).startswith("\u2581") \
                        and not text.startswith(" "):
                    text = " " + text
                out.append(text)
                run = []
            if i >= 0:
                out.append(self._sp.id_to_piece(i))
        return "".join(out)

    def save(self, directory: str | Path) -> None:
        """Write tokenizer.model + tokenizer_config.json (chat template, bos/eos/pad, add_bos)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / "tokenizer.model").write_bytes(self._proto)
        self._write_config(d)


# ----------------------------------------------------------------------------- loading


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a .gguf file, a .model file, a tokenizer.json file, or a directory holding one."""
    p = Path(path)
    if not p.exists():
        raise TokenizerError(f"tokenizer path does not exist: {p}")
    if p.is_dir():
        for name in ("tokenizer.json", "tokenizer.model"):
            if (p / name).is_file():
                return load_tokenizer(p / name)
        raise TokenizerError(f"no tokenizer.json or tokenizer.model in directory: {p}")
    if p.suffix == ".gguf":
        return _load_gguf(p)
    if p.suffix == ".model":
        return _load_sp_model(p)
    if p.suffix == ".json":
        return _load_tokenizer_json(p)
    raise TokenizerError(f"unknown tokenizer file type (want .gguf/.model/.json): {p}")


def _load_tokenizer_json(path: Path) -> HFTokenizer:
    from tokenizers import Tokenizer as HFTok

    try:
        tok = HFTok.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        raise TokenizerError(f"not a tokenizer.json: {path} ({e})") from e
    cfg = _read_config(path.parent)
    ids = _config_ids(cfg, tok.token_to_id)
    add_bos = cfg.get("add_bos_token")
    if add_bos is None:  # no config: trust the post-processor (e.g. Llama-3 template adds BOS)
        with_special = tok.encode("", add_special_tokens=True).ids
        if with_special and ids["bos_id"] is None:
            ids["bos_id"] = with_special[0]
        add_bos = bool(with_special) and with_special[0] == ids["bos_id"]
    return HFTokenizer(tok, add_bos=add_bos, chat_template=_config_template(cfg, path.parent),
                       extra_eos=_generation_eos(path.parent), **ids)


def _load_sp_model(path: Path) -> SPTokenizer:
    data = path.read_bytes()
    tok = SPTokenizer(data, source=str(path))  # ids from the proto itself
    cfg = _read_config(path.parent)
    if not cfg:
        return tok
    return SPTokenizer(data, add_bos=cfg.get("add_bos_token"),
                       chat_template=_config_template(cfg, path.parent),
                       extra_eos=_generation_eos(path.parent), source=str(path),
                       **_config_ids(cfg, tok._token_to_id))


def _read_config(directory: Path) -> dict[str, Any]:
    f = directory / "tokenizer_config.json"
    if not f.is_file():
        return {}
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TokenizerError(f"unreadable tokenizer config: {f} ({e})") from e


def _config_template(cfg: dict[str, Any], directory: Path) -> str | None:
    """HF keeps the template in tokenizer_config.json (str or named list) or chat_template.jinja."""
    tmpl = cfg.get("chat_template")
    if isinstance(tmpl, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in tmpl if isinstance(t, dict)}
        tmpl = named.get("default")
    jinja = directory / "chat_template.jinja"
    if tmpl is None and jinja.is_file():
        tmpl = jinja.read_text(encoding="utf-8")
    return tmpl if isinstance(tmpl, str) else None


def _config_ids(cfg: dict[str, Any], lookup: Any) -> dict[str, int | None]:
    """bos/eos/pad ids from explicit *_token_id keys, else from token strings via `lookup`."""
    out: dict[str, int | None] = {}
    for kind in ("bos", "eos", "pad"):
        value = cfg.get(f"{kind}_token_id")
        token = cfg.get(f"{kind}_token")
        if isinstance(token, dict):  # older HF configs store AddedToken dicts
            token = token.get("content")
        if not isinstance(value, int) and isinstance(token, str) and lookup is not None:
            value = lookup(token)
        out[f"{kind}_id"] = value if isinstance(value, int) else None
    return out


def _generation_eos(directory: Path) -> list[int]:
    """Extra stop ids from generation_config.json (Llama-3 lists several there)."""
    f = directory / "generation_config.json"
    try:
        eos = json.loads(f.read_text(encoding="utf-8")).get("eos_token_id") if f.is_file() else None
    except (OSError, ValueError):
        return []
    return [eos] if isinstance(eos, int) else [i for i in eos or [] if isinstance(i, int)]


def _load_gguf(path: Path) -> Tokenizer:
    from jaxinfer.gguf_file import open_gguf

    try:
        reader = open_gguf(path)
        meta = {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    except Exception as e:  # the reader fails with assorted ValueError/struct/numpy errors
        raise TokenizerError(f"not a readable GGUF file: {path} ({e})") from e
    kind = meta.get("tokenizer.ggml.model")
    if kind == "gpt2":
        return _gguf_bpe(meta, path)
    if kind == "llama":
        return _gguf_spm(meta, path)
    if kind == "gemma4":
        return _gguf_gemma4(meta, path)
    raise TokenizerError(f"unsupported tokenizer.ggml.model {kind!r} in {path}")


def _gguf_common(meta: dict[str, Any], default_add_bos: bool) -> dict[str, Any]:
    return {"bos_id": meta.get("tokenizer.ggml.bos_token_id"),
            "eos_id": meta.get("tokenizer.ggml.eos_token_id"),
            "pad_id": meta.get("tokenizer.ggml.padding_token_id"),
            "add_bos": meta.get("tokenizer.ggml.add_bos_token", default_add_bos),
            "chat_template": meta.get("tokenizer.chat_template")}


def _gguf_bpe(meta: dict[str, Any], path: Path) -> HFTokenizer:
    """Byte-level BPE from GGUF vocab+merges, pre-tokenized the way llama.cpp does it."""
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTok

    tokens: list[str] = meta.get("tokenizer.ggml.tokens") or []
    merges: list[str] = meta.get("tokenizer.ggml.merges") or []
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if not tokens or len(types) != len(tokens):
        raise TokenizerError(f"GGUF has no usable tokenizer.ggml.tokens/token_type: {path}")
    pre = meta.get("tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGIT_SPLIT_PRE:
        # llama.cpp first isolates every \p{N} char, then runs the GPT-2 regex on the pieces.
        pre_tok = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in _GPT2_PRE:
        pre_tok = byte_level
    elif pre in _SPLIT_PRE:
        res = _SPLIT_PRE[pre][0]
        pre_tok = pre_tokenizers.Sequence([
            *(pre_tokenizers.Split(Regex(r), behavior="isolated")
              for r in ((res,) if isinstance(res, str) else res)),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        known = sorted(_DIGIT_SPLIT_PRE | _GPT2_PRE | _SPLIT_PRE.keys())
        raise TokenizerError(f"unsupported tokenizer.ggml.pre {pre!r} in {path} (supported: "
                             f"{', '.join(known)})")
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    _, ignore_merges, add_bos = _SPLIT_PRE.get(pre, ("", False, False))
    tok = HFTok(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False,
                           ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre_tok
    tok.decoder = decoders.ByteLevel()
    _add_gguf_specials(tok, tokens, types)
    return HFTokenizer(tok, **_gguf_common(meta, default_add_bos=add_bos))


def _add_gguf_specials(tok: Any, tokens: list[str], types: list[int]) -> None:
    """Control and user-defined tokens must match whole in text (`<|im_start|>` -> one
    id); control ones are special (skipped by skip_special_tokens)."""
    from tokenizers import AddedToken

    tok.add_special_tokens([AddedToken(t, special=(ty == _CONTROL), normalized=False)
                            for t, ty in zip(tokens, types, strict=True)
                            if ty in (_CONTROL, _USER_DEFINED)])


def _gguf_gemma4(meta: dict[str, Any], path: Path) -> HFTokenizer:
    """Gemma 4's tokenizer: BPE over raw UTF-8 with spaces written as "▁" and SentencePiece's
    <0xXX> byte fallback, merging the whole text with no word splitting; built as
    transformers builds GemmaTokenizer."""
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, normalizers, pre_tokenizers

    tokens: list[str] = meta.get("tokenizer.ggml.tokens") or []
    merges: list[str] = meta.get("tokenizer.ggml.merges") or []
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    if not tokens or not merges or len(types) != len(tokens) or unk is None:
        raise TokenizerError(f"GGUF has no usable gemma4 tokens/merges/types/unknown id: "
                             f"{path}")
    # A merge's halves split at the first space after its first character ("▁" stands for
    # spaces, so a space only separates; llama.cpp splits the same way).
    pairs = [(m[:i], m[i + 1:]) for m in merges if (i := m.find(" ", 1)) > 0]
    tok = HFTok(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=pairs,
                           unk_token=tokens[unk], fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                     decoders.Fuse()])
    _add_gguf_specials(tok, tokens, types)
    return HFTokenizer(tok, **_gguf_common(meta, default_add_bos=True))


def _gguf_spm(meta: dict[str, Any], path: Path) -> SPTokenizer:
    """Rebuild the SentencePiece ModelProto llama.cpp's SPM vocab was converted from."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    tokens: list[str] = meta.get("tokenizer.ggml.tokens") or []
    scores: list[float] = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if not tokens or not len(tokens) == len(scores) == len(types):
        raise TokenizerError(f"GGUF has no usable tokenizer.ggml.tokens/scores/types: {path}")
    m = pb.ModelProto()
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    if unk is None:  # Baichuan's names none: its one UNKNOWN-typed piece
        unk = next((i for i, ty in enumerate(types) if ty == _UNKNOWN), None)
    for i, (t, s, ty) in enumerate(zip(tokens, scores, types, strict=True)):
        ty = ty if 1 <= ty <= 6 else 1
        if ty == _UNKNOWN and i != unk:  # SentencePiece takes one unknown piece; llama.cpp
            ty = _UNUSED  # marks padding ids so too (Phi-3's [PAD32011]..., not in its vocab)
        m.pieces.add(piece=t, score=float(s), type=_UNKNOWN if i == unk else ty)
    common = _gguf_common(meta, default_add_bos=True)
    ts = m.trainer_spec
    ts.model_type = pb.TrainerSpec.BPE
    ts.vocab_size = len(tokens)
    ts.byte_fallback = _BYTE in types
    for kind, key in (("unk", "unknown_token_id"), ("bos", "bos_token_id"),
                      ("eos", "eos_token_id"), ("pad", "padding_token_id")):
        i = unk if kind == "unk" else meta.get(f"tokenizer.ggml.{key}")
        setattr(ts, f"{kind}_id", i if i is not None else -1)
        if i is not None:
            setattr(ts, f"{kind}_piece", tokens[i])
    ns = m.normalizer_spec
    ns.name = "identity"
    ns.add_dummy_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    ns.remove_extra_whitespaces = False
    ns.escape_whitespaces = True
    return SPTokenizer(m.SerializeToString(), source=str(path), **common)


# ----------------------------------------------------------------------------- streaming


class StreamDecoder:
    """Incremental detokenizer: text deltas that concatenate to `decode(all generated ids)`.

    Decoding tokens one at a time is wrong twice over: byte-level BPE splits characters
    across tokens, and SentencePiece drops or keeps a leading space depending on context.
    So, as vLLM and HF's TextStreamer do, it decodes a short window of previous tokens with
    and without the new ones and emits the difference, holding back while the text ends in
    an incomplete UTF-8 sequence (U+FFFD).
    """

    _CONTEXT = 5  # prompt tokens kept as left context for the first decode

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (),
                 skip_special_tokens: bool = False) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids = [int(i) for i in prompt_ids]
        self._read = len(self._ids)  # ids before this are already emitted (or prompt)
        self._prefix = max(self._read - self._CONTEXT, 0)  # window start

    def push(self, token_id: int) -> str:
        """Add one generated id; return the newly completed text (maybe "")."""
        self._ids.append(int(token_id))
        prefix = self._decode(self._ids[self._prefix:self._read])
        full = self._decode(self._ids[self._prefix:])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return full[len(prefix):]

    def flush(self) -> str:
        """Return whatever is still held back (an incomplete character decodes as U+FFFD)."""
        if self._read == len(self._ids):
            return ""
        prefix = self._decode(self._ids[self._prefix:self._read])
        full = self._decode(self._ids[self._prefix:])
        self._prefix, self._read = self._read, len(self._ids)
        return full[len(prefix):]

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, self._skip)
