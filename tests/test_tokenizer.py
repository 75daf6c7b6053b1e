"""Tokenizer tests: the real SmolLM2 GGUF against HF transformers, plus tiny SentencePiece models.

Digit handling, checked while writing these tests: the GGUF says `tokenizer.ggml.pre = smollm`,
which llama.cpp (llama-vocab.cpp) tokenizes with two regexes in sequence: first every `\\p{N}`
char alone, then the GPT-2 regex on what is left. llama.cpp picks `smollm` by hashing the output
of the original HuggingFaceTB/SmolLM tokenizer.json, whose pre-tokenizer is
Sequence[Digits(individual_digits), ByteLevel] -- so that is the model's real tokenization.
transformers 5.x's GGUF loader has no `smollm` entry and falls back to plain ByteLevel, which
differs exactly where whitespace runs or newlines precede a number: "a  1" is [a, ĠĠ, 1] for
llama.cpp (and us) but [a, Ġ, Ġ, 1] for HF (the vocab has no digit merges, so it agrees
everywhere else). Hence HF is compared directly on text without that pattern, and numeric text
is checked against HF applied to llama.cpp's digit-isolated fragments.
"""

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import regex

from jaxinfer.errors import TokenizerError
from jaxinfer.tokenizer import StreamDecoder, Tokenizer, load_tokenizer

# No whitespace run or newline directly before a number (see module docstring).
TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\n\n\nand   runs     of spaces",
    "café naïve résumé Ünïcödé",
    "emoji 😀🎉👍🏽 done",
    "日本語のテキスト",
    "It's they're we'll I'd",
    "    def f(x):\n        return x**2\n",
    "abc123def x 4567 8.9, price: $1,234.56",
    "<|im_start|>user\nhi<|im_end|>\n",
]
NUMERIC_TEXTS = ["a  1", "x\n\n1", "  42", "1 2  3   4\n\n\n5", "½ ² ٣  ٤", "year  2024:\n 7"]
SP_SENTENCES = [
    "the cat sat on the mat", "a dog ran in the park", "hello world, hello there",
    "streaming text needs spaces", "tokenizers split words into pieces",
    "sentence piece models treat spaces as symbols", "numbers like 42 and 7 appear",
] * 20


@pytest.fixture(scope="module")
def gguf_tok(smollm2_gguf) -> Tokenizer:
    return load_tokenizer(smollm2_gguf)


@pytest.fixture(scope="module")
def hf_tok(smollm2_gguf):
    transformers = pytest.importorskip("transformers")
    path = Path(smollm2_gguf)
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _train_sp(tmp_path: Path, model_type: str = "unigram") -> Path:
    spm = pytest.importorskip("sentencepiece")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SP_SENTENCES), model_writer=buf, vocab_size=400,
        model_type=model_type, normalization_rule_name="identity",
        remove_extra_whitespaces=False, hard_vocab_limit=False, byte_fallback=True,
        minloglevel=2)
    path = tmp_path / "tiny.model"
    path.write_bytes(buf.getvalue())
    return path


def _stream(tok: Tokenizer, ids: list[int], prompt: list[int] | None = None) -> list[str]:
    sd = StreamDecoder(tok, prompt or [])
    return [sd.push(i) for i in ids] + [sd.flush()]


def test_gguf_metadata(gguf_tok):
    t = gguf_tok
    im_end = t.encode("<|im_end|>")
    assert (t.vocab_size, t.bos_id, t.pad_id, t.add_bos) == (49152, 1, 2, False)
    assert len(im_end) == 1 and 2 in t.eos_ids and im_end[0] in t.eos_ids
    assert t.encode("<|im_start|>") == [1]
    assert t.encode("<|im_start|>user\nhi<|im_end|>")[0] == 1
    assert t.encode("<|im_start|>user\nhi<|im_end|>")[-1] == im_end[0]
    assert t.encode("hi")[0] != 1 and t.encode("hi", add_bos=True)[0] == 1


def test_gguf_matches_hf_reference(gguf_tok, hf_tok):
    for text in TEXTS:
        assert gguf_tok.encode(text) == hf_tok.encode(text, add_special_tokens=False), text


def test_gguf_digits_follow_llama_cpp_rule(gguf_tok, hf_tok):
    for text in NUMERIC_TEXTS:
        # llama.cpp's first pass isolates each \p{N} char; HF then tokenizes each fragment.
        fragments = [f for f in regex.split(r"(\p{N})", text) if f]
        want = [i for f in fragments for i in hf_tok.encode(f, add_special_tokens=False)]
        assert gguf_tok.encode(text) == want, text
    ids = gguf_tok.encode("a  1")
    assert [hf_tok.convert_ids_to_tokens(i) for i in ids] == ["a", "ĠĠ", "1"]


def test_gguf_round_trip(gguf_tok):
    for text in TEXTS + NUMERIC_TEXTS:
        assert gguf_tok.decode(gguf_tok.encode(text)) == text


def test_gguf_chat_template_matches_hf(gguf_tok, hf_tok):
    chats = [[{"role": "user", "content": "What is 2+2?"}],
             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
              {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "café?"}]]
    for msgs in chats:
        for gen in (True, False):
            want = hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
            assert gguf_tok.apply_chat_template(msgs, add_generation_prompt=gen) == want
    prompt = gguf_tok.apply_chat_template(chats[0])
    assert prompt.endswith("<|im_start|>assistant\n") and "What is 2+2?<|im_end|>" in prompt
    # An assistant reply begun for the model (prefill), continued rather than closed.
    for begun in ("The answer is", "  It is 4, because "):
        msgs = chats[0] + [{"role": "assistant", "content": begun}]
        want = hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False,
                                          continue_final_message=True)
        got = gguf_tok.apply_chat_template(msgs, add_generation_prompt=False,
                                           continue_final_message=True)
        assert got == want and got.rstrip().endswith(begun.strip())
    with pytest.raises(TokenizerError, match="add_generation_prompt"):
        gguf_tok.apply_chat_template(msgs, continue_final_message=True)
    with pytest.raises(TokenizerError, match="final message"):
        gguf_tok.apply_chat_template(chats[0] + [{"role": "assistant", "content": ""}],
                                     add_generation_prompt=False, continue_final_message=True)


def test_save_reload_tokenizer_json(gguf_tok, tmp_path):
    gguf_tok.save(tmp_path / "ckpt")
    assert {p.name for p in (tmp_path / "ckpt").iterdir()} == {
        "tokenizer.json", "tokenizer_config.json"}
    t = load_tokenizer(tmp_path / "ckpt")
    for text in TEXTS + NUMERIC_TEXTS:
        assert t.encode(text) == gguf_tok.encode(text), text
    assert t.chat_template == gguf_tok.chat_template
    msgs = [{"role": "user", "content": "Hi"}]
    assert t.apply_chat_template(msgs) == gguf_tok.apply_chat_template(msgs)
    got = (t.vocab_size, t.bos_id, t.eos_ids, t.pad_id, t.add_bos)
    assert got == (gguf_tok.vocab_size, 1, gguf_tok.eos_ids, 2, False)


def test_stream_decoder_bpe_multibyte(gguf_tok):
    text = "Emoji 😀🎉👍🏽 and 日本語, café — done."
    ids = gguf_tok.encode(text)
    emoji_ids = gguf_tok.encode("😀")
    assert len(emoji_ids) > 1 and all("\ufffd" in gguf_tok.decode([i]) for i in emoji_ids)
    deltas = _stream(gguf_tok, ids)
    assert "".join(deltas) == gguf_tok.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)
    # With a prompt as left context, only the generated part is emitted.
    prompt = gguf_tok.encode("<|im_start|>assistant\n")
    assert "".join(_stream(gguf_tok, ids, prompt)) == text


def test_decode_renders_special_tokens_and_rejects_bad_ids(gguf_tok):
    assert gguf_tok.decode(gguf_tok.encode("<|im_start|>hi<|im_end|>")) == \
        "<|im_start|>hi<|im_end|>"
    with pytest.raises(TokenizerError, match="49152"):
        gguf_tok.decode([5, 49152])


def test_skip_special_tokens_matches_hf(gguf_tok, hf_tok):
    """decode(skip_special_tokens=True) drops chat markers exactly as HF's decode does,
    and a stream decoding with it concatenates to that text."""
    chat = gguf_tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "café?"},
         {"role": "assistant", "content": "Oui, 2€."}], add_generation_prompt=True)
    ids = gguf_tok.encode(chat)
    assert {1, 2} <= set(ids) <= set(range(49152))
    for skip in (False, True):
        want = hf_tok.decode(ids, skip_special_tokens=skip)
        assert gguf_tok.decode(ids, skip) == want
        sd = StreamDecoder(gguf_tok, ids[:3], skip_special_tokens=skip)
        got = "".join([sd.push(i) for i in ids[3:]] + [sd.flush()])
        assert got == gguf_tok.decode(ids[3:], skip)
    assert "<|im_" not in gguf_tok.decode(ids, True) and "Oui, 2€." in gguf_tok.decode(ids, True)


def test_sentencepiece_model_round_trip_and_stream(tmp_path):
    tok = load_tokenizer(_train_sp(tmp_path))
    assert tok.bos_id == 1 and tok.eos_ids == (2,) and tok.add_bos
    texts = ["the cat sat on the mat", "hello  world,  two spaces", " leading space",
             "unseen: Zürich 😀"]
    for text in texts:
        ids = tok.encode(text)
        assert ids[0] == tok.bos_id
        assert tok.decode(ids[1:]) == text
        deltas = _stream(tok, ids[1:])
        assert "".join(deltas) == text and not any("\ufffd" in d for d in deltas)
    # Word-initial pieces carry the space: the stream must keep it between words.
    deltas = _stream(tok, tok.encode("hello world", add_bos=False))
    assert "".join(deltas) == "hello world" and any(d.startswith(" ") for d in deltas)
    # Control tokens in text (as chat templates render them) map to their ids and back.
    ids = tok.encode("<s>hello world</s>", add_bos=False)
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.decode(ids) == "<s> hello world</s>"
    assert tok.decode(ids, skip_special_tokens=True) == "hello world"
    with pytest.raises(TokenizerError, match="chat_template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_sentencepiece_save_reload_with_template(tmp_path):
    import json

    path = _train_sp(tmp_path)
    cfg = {"chat_template": "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] "
                            "{{ m['content'] }}{{ eos_token }}\n{% endfor %}",
           "add_bos_token": False, "eos_token": "</s>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = load_tokenizer(path)
    assert not tok.add_bos and tok.eos_ids == (2,)
    msgs = [{"role": "user", "content": "hello"}]
    assert tok.apply_chat_template(msgs) == "<s>[user] hello</s>\n"
    tok.save(tmp_path / "out")
    again = load_tokenizer(tmp_path / "out")
    assert again.apply_chat_template(msgs) == tok.apply_chat_template(msgs)
    assert again.encode("the cat sat") == tok.encode("the cat sat")
    assert (again.bos_id, again.eos_ids, again.add_bos) == (1, (2,), False)


def test_gguf_llama_vocab_rebuilds_sentencepiece(tmp_path):
    gguf = pytest.importorskip("gguf")
    spm = pytest.importorskip("sentencepiece")
    model = _train_sp(tmp_path, model_type="bpe")
    sp = spm.SentencePieceProcessor(model_file=str(model))
    n = sp.get_piece_size()
    w = gguf.GGUFWriter(str(tmp_path / "tiny.gguf"), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list([sp.id_to_piece(i) for i in range(n)])
    w.add_token_scores([sp.get_score(i) for i in range(n)])
    w.add_token_types([1 + sp.is_unknown(i) + 2 * sp.is_control(i) + 5 * sp.is_byte(i)
                       for i in range(n)])
    w.add_unk_token_id(sp.unk_id())
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tok = load_tokenizer(tmp_path / "tiny.gguf")
    for text in ["the cat sat on the mat", "hello  world", "Zürich 😀"]:
        assert tok.encode(text) == [sp.bos_id(), *sp.encode(text)]
        assert tok.decode(tok.encode(text, add_bos=False)) == text
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "x"


def test_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(TokenizerError, match=str(missing)):
        load_tokenizer(missing)
    garbage = tmp_path / "x.gguf"
    garbage.write_bytes(b"this is not a gguf file" * 10)
    with pytest.raises(TokenizerError, match=str(garbage)):
        load_tokenizer(garbage)
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(TokenizerError, match=str(empty)):
        load_tokenizer(empty)
    bad_json = tmp_path / "tokenizer.json"
    bad_json.write_text("{not json")
    with pytest.raises(TokenizerError, match=str(bad_json)):
        load_tokenizer(bad_json)


def test_unknown_gguf_tokenizer_model(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "bert.gguf"
    w = gguf.GGUFWriter(str(path), "bert")
    w.add_tokenizer_model("bert")
    w.add_token_list(["[PAD]", "a"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(TokenizerError, match="'bert'.*bert.gguf"):
        load_tokenizer(path)


def test_module_does_not_import_jax():
    code = "import sys, jaxinfer.tokenizer; assert 'jax' not in sys.modules, 'jax imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_token_bytes_join_to_the_text(gguf_tok, tmp_path):
    """OpenAI logprobs' `bytes`: a token's own bytes, even half a UTF-8 character."""
    for text in TEXTS:
        assert b"".join(gguf_tok.token_bytes(i) for i in gguf_tok.encode(text)) == text.encode()
    partial = [gguf_tok.token_bytes(i) for i in gguf_tok.encode("日本語")]
    assert any(not _is_utf8(b) for b in partial)  # byte-level BPE splits characters
    sp = load_tokenizer(_train_sp(tmp_path))
    for text in ["hello world", "the cat 日本語"]:  # unseen characters: byte fallback
        got = b"".join(sp.token_bytes(i) for i in sp.encode(text, add_bos=False)).decode()
        assert got.lstrip(" ") == text  # SentencePiece's dummy prefix is a leading space
    with pytest.raises(TokenizerError, match="-1"):
        gguf_tok.token_bytes(-1)


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode()
        return True
    except UnicodeDecodeError:
        return False


# ---- byte-level BPE pre-tokenizers of Llama 3, Qwen2, GPT-4o-style and Tekken vocabularies ----
SPLIT_TEXTS = TEXTS + NUMERIC_TEXTS + [
    "CamelCase HTTPServer getHTTPResponse I'M YOU'LL don't",
    "Ünïcödé ÀÉÎ straße ΑΒΓ αβγ Ωmega",
    "x/y/z\n/path/to/file\r\n\r\nend", "   \n\t  mixed   \n", "12345678901234567890",
    "مرحبا بالعالم", "한국어 텍스트", "a\u0301e\u0301",
]
# llama.cpp's spelling of two of the regexes (llama-vocab.cpp: its engine has no (?i:...)).
LLAMA_CPP_SPELLING = {
    "llama-bpe": r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?"
                 r"\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?"
             r"\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "gpt-4o", "tekken"])
def test_split_regexes_run_the_same_in_two_engines(pre):
    """Each pre-tokenizer regex splits as Python's `regex` module splits with it (and, for
    Llama 3 and Qwen2, with llama.cpp's spelling of it): the `tokenizers` engine agrees."""
    from tokenizers import Regex, pre_tokenizers

    from jaxinfer.tokenizer import _SPLIT_PRE

    pattern = _SPLIT_PRE[pre][0]
    split = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    for text in SPLIT_TEXTS:
        got = [w for w, _ in split.pre_tokenize_str(text)]
        assert got == regex.findall(pattern, text), text
        if pre in LLAMA_CPP_SPELLING:
            assert got == regex.findall(LLAMA_CPP_SPELLING[pre], text), text


def _bpe_gguf(path, arch: str, pre: str, vocab: list[str], merges: list[str]):
    """A GGUF holding only a byte-level BPE tokenizer, as llama.cpp writes one (`<|...|>`
    tokens are control tokens; BOS 0, EOS 1)."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(vocab)
    w.add_token_merges(merges)
    w.add_token_types([3 if t.startswith("<|") else 1 for t in vocab])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("pre,arch", [("llama-bpe", "llama"), ("qwen2", "qwen2"),
                                      ("gpt-4o", "llama"), ("tekken", "llama")])
def test_gguf_bpe_pre_tokenizers_match_transformers(tmp_path, pre, arch):
    """A byte-level BPE vocabulary trained with the model family's split regex, written as
    llama.cpp writes it (`tokenizer.ggml.pre`), tokenizes every text as transformers' own
    GGUF tokenizer loader does; Llama 3 and Tekken vocabularies add BOS by default."""
    pytest.importorskip("gguf")
    transformers = pytest.importorskip("transformers")
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTok

    from jaxinfer.tokenizer import _SPLIT_PRE

    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT_PRE[pre][0]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(SPLIT_TEXTS * 30 + SP_SENTENCES, trainers.BpeTrainer(
        vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|begin_of_text|>", "<|end_of_text|>"], show_progress=False))
    spec = json.loads(tok.to_str())["model"]
    vocab = sorted(spec["vocab"], key=spec["vocab"].get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["merges"]]
    path = _bpe_gguf(tmp_path / "bpe.gguf", arch, pre, vocab, merges)
    ours = load_tokenizer(path)
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for text in SPLIT_TEXTS:
        ids = ours.encode(text, add_bos=False)
        assert ids == ref.encode(text, add_special_tokens=False), text
        assert ours.decode(ids) == text
    assert ours.add_bos == (pre in ("llama-bpe", "tekken"))


def _split_in_turn(text: str, patterns) -> list[str]:
    """Each pattern splits every piece the previous one left into its matches and the text
    between them (llama.cpp's unicode_regex_split), with Python's `regex` engine."""
    pieces = [text]
    for p in patterns:
        out = []
        for piece in pieces:
            at = 0
            for m in regex.finditer(p, piece):
                out += [piece[at:m.start()]] if m.start() > at else []
                out += [m.group()] if m.end() > m.start() else []
                at = m.end()
            out += [piece[at:]] if at < len(piece) else []
        pieces = out
    return pieces


def test_gguf_deepseek_v3_pre_tokenizer_splits_in_turn(tmp_path):
    """DeepSeek V3's `tokenizer.ggml.pre` runs its three regexes in turn (digits by three,
    CJK and kana runs, then words / punctuation / whitespace), as Python's `regex` engine
    does piece by piece; a vocabulary trained with it round-trips and adds BOS."""
    pytest.importorskip("gguf")
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTok

    from jaxinfer.tokenizer import _SPLIT_PRE

    res = _SPLIT_PRE["deepseek-v3"][0]
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in res]
    texts = SPLIT_TEXTS + ["价格是12345元，日本語のテキストとカタカナ。", "a.b,c!d?e (x) [y]",
                           "token\nnext\r\n\n  12 3456 78"]
    for text in texts:
        got = [w for w, _ in pre_tokenizers.Sequence(splits).pre_tokenize_str(text)]
        assert got == _split_in_turn(text, res), text
    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts * 30, trainers.BpeTrainer(
        vocab_size=500, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|begin_of_text|>", "<|end_of_text|>"], show_progress=False))
    spec = json.loads(tok.to_str())["model"]
    vocab = sorted(spec["vocab"], key=spec["vocab"].get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["merges"]]
    ours = load_tokenizer(_bpe_gguf(tmp_path / "ds.gguf", "deepseek2", "deepseek-v3", vocab,
                                    merges))
    for text in texts:
        ids = ours.encode(text, add_bos=False)
        assert ids == tok.encode(text).ids, text
        assert ours.decode(ids) == text
    assert ours.add_bos


@pytest.mark.parametrize("alias,name", [("phi-2", "gpt2"), ("exaone4", "gpt2"),
                                        ("olmo", "gpt2"), ("command-r", "starcoder"),
                                        ("stablelm2", "qwen2"), ("glm4", "dbrx")])
def test_gguf_pre_tokenizer_aliases_split_as_their_family(tmp_path, alias, name):
    """The `tokenizer.ggml.pre` names of the newer families' files load, and split and
    encode every text as the name llama.cpp groups them with (llama-vocab.cpp)."""
    pytest.importorskip("gguf")
    vocab = ["<|s|>", "<|/s|>"] + [chr(c) for c in range(33, 127)] + ["Ġ", "Ġt", "Ġth", "12"]
    merges = ["Ġ t", "Ġt h", "1 2"]
    toks = {pre: load_tokenizer(_bpe_gguf(tmp_path / f"{pre}.gguf", "llama", pre, vocab,
                                          merges)) for pre in (alias, name)}
    for text in ["the 1234 thing", "  x=12;\n\ty", "don't stop"]:
        assert toks[alias].encode(text) == toks[name].encode(text), text
    assert toks[alias].add_bos == toks[name].add_bos


def test_set_chat_template(smollm2_gguf, tmp_path):
    """A chat template from a file or as text replaces the model's own; a missing file or
    one that does not parse is a TokenizerError naming it, and the old template stays."""
    from jaxinfer.errors import TokenizerError
    from jaxinfer.tokenizer import chat_template_text

    tok = load_tokenizer(smollm2_gguf)  # its own copy: the template changes here
    before = tok.chat_template
    with pytest.raises(TokenizerError, match="chat template file not found: /no/such"):
        tok.set_chat_template("/no/such.jinja")
    with pytest.raises(TokenizerError, match="does not parse"):
        tok.set_chat_template("{% for m in messages %}")
    assert tok.chat_template == before
    text = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    (tmp_path / "t.jinja").write_text(text)
    for given in (text, tmp_path / "t.jinja", str(tmp_path / "t.jinja")):
        tok.set_chat_template(given)
        assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "<user>hi"
    assert chat_template_text(tmp_path / "t.jinja") == text
