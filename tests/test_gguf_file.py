"""gguf_file.open_gguf: the same fields as gguf.GGUFReader builds, one reader per file."""

import gguf
import numpy as np
import pytest

from jaxinfer import gguf_file


def assert_same_fields(path):
    want, got = gguf.GGUFReader(str(path)), gguf_file._reader_class()(str(path))
    assert list(got.fields) == list(want.fields)
    for name, w in want.fields.items():
        g = got.fields[name]
        assert (g.offset, g.name, g.data, g.types) == (w.offset, w.name, w.data, w.types), name
        assert len(g.parts) == len(w.parts), name
        for a, b in zip(g.parts, w.parts, strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), name
        assert g.contents() == w.contents(), name
        if w.data:  # element by element, as contents(i) reads them
            assert g.contents(len(w.data) - 1) == w.contents(len(w.data) - 1), name
    assert [(t.name, t.tensor_type) for t in got.tensors] == \
        [(t.name, t.tensor_type) for t in want.tensors]
    assert all(np.array_equal(a.data, b.data) for a, b in zip(got.tensors, want.tensors,
                                                              strict=True))


def test_fields_equal_gguf_readers_on_the_real_model(smollm2_gguf):
    """Strings, string arrays (tokens, merges), int and float arrays, scalars, tensors."""
    assert_same_fields(smollm2_gguf)


@pytest.mark.parametrize("name", ["deepseek-coder", "bert-bge", "baichuan"])
def test_fields_equal_gguf_readers_on_other_vocabularies(llama_cpp_vocabs, name):
    assert_same_fields(llama_cpp_vocabs / f"ggml-vocab-{name}.gguf")


def test_one_reader_per_file_until_it_changes(smollm2_gguf, tmp_path):
    """The tokenizer and the weights share one parse of the file; a rewritten file (new
    size or modification time) is parsed again."""
    import shutil

    copy = tmp_path / "m.gguf"
    shutil.copy(smollm2_gguf, copy)
    first = gguf_file.open_gguf(copy)
    assert gguf_file.open_gguf(str(copy)) is first
    with open(copy, "ab") as f:
        f.write(b"\0" * 32)  # GGUF readers ignore bytes after the tensor data
    assert gguf_file.open_gguf(copy) is not first


def test_llm_load_parses_a_gguf_once(smollm2_gguf, monkeypatch):
    """LLM.load of a GGUF reads the tokenizer and the weights through one reader (each
    parse of SmolLM2's took 3 s with gguf's own reader)."""
    from jaxinfer.llm import LLM

    gguf_file._open.cache_clear()
    opened = []
    real = gguf_file._reader_class()

    class Counting(real):
        def __init__(self, path):
            opened.append(path)
            super().__init__(path)

    monkeypatch.setattr(gguf_file, "_reader_class", lambda: Counting)
    LLM.load(smollm2_gguf)
    assert len(opened) == 1, opened
    gguf_file._open.cache_clear()
