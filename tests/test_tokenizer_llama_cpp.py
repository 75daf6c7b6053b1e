"""GGUF tokenizers against llama.cpp's own test data: real models' vocabularies
(models/ggml-vocab-*.gguf from the llama-cpp-python source distribution) and, for each, the
token ids the model's Hugging Face tokenizer gave for llama.cpp's tricky texts (.inp/.out:
whitespace runs, digits, contractions, CJK, emoji, code). An independent reference on real
vocabularies, where tests/test_tokenizer.py checks vocabularies trained in the tests."""

import pytest

from jaxinfer.errors import TokenizerError
from jaxinfer.tokenizer import load_tokenizer

SEPARATOR = "\n__ggml_vocab_test__\n"  # how llama.cpp's test-tokenizer-0 splits the .inp

# Vocabularies with reference ids (model family: tokenizer.ggml.model / pre).
WITH_IDS = [
    "command-r",       # gpt2 / command-r (digits alone, then GPT-2)
    "deepseek-coder",  # gpt2 / deepseek-coder (five regexes in turn)
    "deepseek-llm",    # gpt2 / deepseek-llm: DeepSeek LLM and V2 (six, literal letter ranges)
    "falcon",          # gpt2 / falcon (punctuation runs, GPT-2, groups of three digits)
    "gpt-2",           # gpt2 / gpt-2
    "llama-bpe",       # gpt2 / llama-bpe: Llama 3
    "llama-spm",       # llama (SentencePiece): Llama 2
    "mpt",             # gpt2 / mpt
    "phi-3",           # llama (SentencePiece) with padding ids typed UNKNOWN
    "qwen2",           # gpt2 / qwen2
    "qwen35",          # gpt2 / qwen35: Qwen 3.5 (marks join letters)
    "refact",          # gpt2 / refact
    "starcoder",       # gpt2 / starcoder
]


def cases(directory, name):
    texts = (directory / f"ggml-vocab-{name}.gguf.inp").read_text(encoding="utf-8")
    ids = (directory / f"ggml-vocab-{name}.gguf.out").read_text(encoding="utf-8")
    texts, ids = texts.split(SEPARATOR), ids.split("\n")
    assert len(ids) >= len(texts) > 40  # (the .out ends with a newline)
    return [(t, [int(x) for x in line.split()])
            for t, line in zip(texts, ids[:len(texts)], strict=True)]


@pytest.mark.parametrize("name", WITH_IDS)
def test_ids_equal_the_hugging_face_tokenizers(llama_cpp_vocabs, name):
    tok = load_tokenizer(llama_cpp_vocabs / f"ggml-vocab-{name}.gguf")
    wrong = [(text, got, want) for text, want in cases(llama_cpp_vocabs, name)
             if (got := tok.encode(text, add_bos=False)) != want]
    assert not wrong, f"{len(wrong)} texts differ, first: {wrong[0]}"


@pytest.mark.parametrize("name", ["aquila", "baichuan", "gpt-neox"])
def test_vocabularies_without_reference_ids_load_and_round_trip(llama_cpp_vocabs, name):
    """No .out for these: they load (Baichuan's GGUF names no unknown id: its one
    UNKNOWN-typed piece is it) and decode what they encode."""
    tok = load_tokenizer(llama_cpp_vocabs / f"ggml-vocab-{name}.gguf")
    text = "Hello world, 3.14 apples\n\tcost 1000 yen"
    assert tok.decode(tok.encode(text, add_bos=False)).strip() == text


@pytest.mark.parametrize("name, model", [("bert-bge", "bert"), ("nomic-bert-moe", "t5"),
                                         ("gemma-4", "gemma4")])
def test_other_tokenizer_models_are_named_in_the_error(llama_cpp_vocabs, name, model):
    """WordPiece (BERT), Unigram (T5) and Gemma 4's tokenizer are not read: a typed error
    naming the model, not a wrong tokenization."""
    with pytest.raises(TokenizerError, match=f"tokenizer.ggml.model '{model}'"):
        load_tokenizer(llama_cpp_vocabs / f"ggml-vocab-{name}.gguf")
