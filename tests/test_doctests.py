"""The examples in the public docstrings run as written (doctest)."""

import doctest
import importlib

import pytest

# Modules whose docstrings carry `>>>` examples. The llm examples load the real default
# model (cached after the first run).
FAST = ["jaxinfer.presets"]
REAL_MODEL = ["jaxinfer.llm"]


def _run(name: str) -> doctest.TestResults:
    module = importlib.import_module(name)
    return doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
                           verbose=False)


@pytest.mark.parametrize("name", FAST)
def test_doctests(name):
    result = _run(name)
    assert result.attempted > 0, f"{name} has no doctest examples"
    assert result.failed == 0


@pytest.mark.slow  # about 15 s idle, over 30 s on a busy 2-core machine
@pytest.mark.parametrize("name", REAL_MODEL)
def test_doctests_on_the_real_model(name, smollm2_checkpoint):
    result = _run(name)
    assert result.attempted > 0, f"{name} has no doctest examples"
    assert result.failed == 0
