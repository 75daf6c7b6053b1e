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
    "gemma-4",         # gemma4: Gemma 4 (BPE on raw UTF-8, "▁" spaces, byte fallback)
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


def test_gemma_4_decodes_streams_and_saves_what_it_encodes(llama_cpp_vocabs, tmp_path):
    """Gemma 4 (spaces as "▁", <0xXX> byte fallback): every reference text decodes back
    whole and token by token (its bytes too), with BOS first as llama.cpp and transformers
    add it; the checkpoint's saved tokenizer.json gives the same ids."""
    from jaxinfer.tokenizer import StreamDecoder

    tok = load_tokenizer(llama_cpp_vocabs / "ggml-vocab-gemma-4.gguf")
    texts = [text for text, _ in cases(llama_cpp_vocabs, "gemma-4")]
    tok.save(tmp_path)
    saved = load_tokenizer(tmp_path)
    for text in texts:
        ids = tok.encode(text)
        assert ids[0] == tok.bos_id == 2 and saved.encode(text) == ids
        assert tok.decode(ids[1:]) == text
        stream = StreamDecoder(tok, ids[:1])
        assert "".join(stream.push(i) for i in ids[1:]) + stream.flush() == text
        assert b"".join(tok.token_bytes(i) for i in ids[1:]) == text.encode()
    turn = tok.encode("<|turn>user\nHi<turn|>", add_bos=False)
    assert turn[0] == tok._token_to_id("<|turn>") and tok._token_to_id("<turn|>") in turn
    assert set(tok.eos_ids) == {1, tok._token_to_id("<turn|>"),  # llama.cpp's end-of-turn
                                tok._token_to_id("<|tool_response>")}


@pytest.mark.parametrize("name", ["aquila", "baichuan", "gpt-neox"])
def test_vocabularies_without_reference_ids_load_and_round_trip(llama_cpp_vocabs, name):
    """No .out for these: they load (Baichuan's GGUF names no unknown id: its one
    UNKNOWN-typed piece is it) and decode what they encode."""
    tok = load_tokenizer(llama_cpp_vocabs / f"ggml-vocab-{name}.gguf")
    text = "Hello world, 3.14 apples\n\tcost 1000 yen"
    assert tok.decode(tok.encode(text, add_bos=False)).strip() == text


@pytest.mark.parametrize("name, model", [("bert-bge", "bert"), ("nomic-bert-moe", "t5")])
def test_other_tokenizer_models_are_named_in_the_error(llama_cpp_vocabs, name, model):
    """WordPiece (BERT) and Unigram (T5) are not read: a typed error naming the model, not
    a wrong tokenization."""
    with pytest.raises(TokenizerError, match=f"tokenizer.ggml.model '{model}'"):
        load_tokenizer(llama_cpp_vocabs / f"ggml-vocab-{name}.gguf")


# Chat templates: every one in llama.cpp's models/templates renders as transformers renders
# it (its own Jinja environment, `render_jinja_template`), for plain chats and with tools.
CONVERSATIONS = {
    "user": ([{"role": "user", "content": "Hello!"}], None),
    "system+turns": ([{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello."},
                      {"role": "user", "content": "What is 2+2?"}], None),
    "tools": ([{"role": "user", "content": "Weather in Paris?"}],
              [{"type": "function", "function": {
                  "name": "get_weather", "description": "Weather in a city",
                  "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                 "required": ["city"]}}}]),
}


def test_chat_templates_render_as_transformers_renders_them(llama_cpp_vocabs,
                                                           smollm2_checkpoint):
    """71 real templates (Llama 3.x, Qwen, DeepSeek, Mistral, Gemma, GLM, Kimi, gpt-oss,
    Command R, ...): the same text wherever transformers renders one. Where it raises (it
    passes tools=None, which a tool-use template iterates; a template wanting other tool
    fields), ours renders without a `tools` variable or raises the typed TokenizerError.
    (The `{% generation %}` blocks of LFM2.5 and Laguna templates
    were a parse error here; transformers renders their body.)"""
    from transformers.utils.chat_template_utils import render_jinja_template

    tok = load_tokenizer(smollm2_checkpoint / "tokenizer")
    special = {"bos_token": tok._id_to_token(tok.bos_id),  # what apply_chat_template passes
               "eos_token": tok._id_to_token(tok._eos_id)}
    templates = sorted((llama_cpp_vocabs / "templates").glob("*.jinja"))
    assert len(templates) > 60
    compared, wrong = 0, []
    for path in templates:
        text = path.read_text(encoding="utf-8")
        tok.set_chat_template(text)
        for case, (messages, tools) in CONVERSATIONS.items():
            try:
                want = render_jinja_template([messages], tools=tools, chat_template=text,
                                             add_generation_prompt=True, **special)[0][0]
            except Exception:  # noqa: BLE001 - transformers' own failure
                try:  # ours renders (no `tools` variable rather than tools=None) or is typed
                    tok.apply_chat_template(messages, tools=tools)
                except TokenizerError:
                    pass
                continue
            got = tok.apply_chat_template(messages, tools=tools)
            compared += 1
            if got != want:
                wrong.append((path.name, case, got[:200], want[:200]))
    assert not wrong, f"{len(wrong)} renderings differ, first: {wrong[0]}"
    assert compared > 180
