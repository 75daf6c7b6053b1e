"""TextOutput: streamed text with stop strings, holdback and the special-token rule."""

import pytest

from jaxinfer.output_text import TextOutput, find_stop

from .engine_helpers import CharTokenizer

TOK = CharTokenizer()  # id i <-> chr(32 + i); 3 ('#') is EOS, its only special token


def _ids(text: str) -> list[int]:
    return TOK.encode(text)


def _run(text: str, **kw) -> tuple[list[str], TextOutput]:
    out = TextOutput(TOK, **kw)
    ids = _ids(text)
    deltas = []
    for i, t in enumerate(ids):
        deltas.append(out.push(t, last=i == len(ids) - 1))
        if out.stopped:
            break
    return deltas, out


def test_find_stop_earliest_then_longest():
    assert find_stop("abcdef", ["de", "bc"]) == (1, 2)
    assert find_stop("abcdef", ["cd", "cde", "x"]) == (2, 3)
    assert find_stop("abc", ["x", ""]) == (-1, 0)


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_cut_or_kept_and_never_shown_early(include):
    deltas, out = _run("hello STOP world", stop=["STOP", "wor"], include_stop_str=include)
    want = "hello STOP" if include else "hello "
    assert out.stopped and out.text == want and "".join(deltas) == want
    if not include:  # "S", "ST", "STO" were held back, not shown and then taken back
        assert all("S" not in d for d in deltas)


def test_held_back_tail_is_released_when_no_stop_follows():
    deltas, out = _run("a STO b", stop=["STOP"])
    assert not out.stopped and out.text == "a STO b" == "".join(deltas)
    assert deltas[4] == "" and deltas[5] == "STO "  # "STO" waited until " " ruled it out


def test_special_tokens_and_row_ending_tokens():
    ids = _ids("ab#cd")  # '#' (3) is EOS, decoded past as with ignore_eos
    for skip, want in ((True, "abcd"), (False, "ab#cd")):
        out = TextOutput(TOK, skip_special_tokens=skip)
        got = "".join(out.push(t, last=i == len(ids) - 1) for i, t in enumerate(ids))
        assert got == out.text == want
    out = TextOutput(TOK, skip_special_tokens=False)
    assert out.push(_ids("a")[0]) + out.push(3, ends=True) == "a" == out.text  # EOS ended it
