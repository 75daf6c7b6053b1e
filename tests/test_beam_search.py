"""Beam search on the tiny random model: one beam is greedy decoding, each prompt of a
batch gets what it gets alone, new budgets and length penalties do not recompile, bad
arguments are BadRequestErrors. (Equality with Hugging Face on SmolLM2 is in
test_e2e_smollm2.py.)"""

import numpy as np
import pytest

from jaxinfer import beam_search
from jaxinfer.errors import BadRequestError
from jaxinfer.llm import LLM
from jaxinfer.sampling import GREEDY, SamplingParams

from .engine_helpers import CharTokenizer, W
from .helpers import TINY

PROMPTS = ["hello there", "abc", "a much longer prompt than the others"]


@pytest.fixture(scope="module")
def llm():
    return LLM(TINY, W, CharTokenizer())


def test_one_beam_is_greedy(llm):
    for p in PROMPTS:
        out = llm.beam_search(p, beam_width=1, max_new_tokens=12)
        ref = llm.generate(p, sampling=GREEDY, max_new_tokens=12)
        assert [s.token_ids for s in out.sequences] == [ref.token_ids]
        assert out.sequences[0].finish_reason == ref.finish_reason


def test_batch_rows_are_independent(llm):
    together = llm.beam_search(PROMPTS, beam_width=3, max_new_tokens=10, length_penalty=0.7)
    for p, out in zip(PROMPTS, together, strict=True):
        alone = llm.beam_search(p, beam_width=3, max_new_tokens=10, length_penalty=0.7)
        assert [s.token_ids for s in out.sequences] == [s.token_ids for s in alone.sequences]
        np.testing.assert_allclose([s.score for s in out.sequences],
                                   [s.score for s in alone.sequences], atol=1e-5)
        assert len({tuple(s.token_ids) for s in out.sequences}) == 3  # distinct beams


def test_scores_are_length_penalized_log_probabilities(llm):
    """A hypothesis' score times len ** penalty is the sum of its tokens' log-probabilities
    under the model (recomputed by teacher forcing with LLM.generate's prompt scoring)."""
    out = llm.beam_search(PROMPTS[0], beam_width=2, max_new_tokens=6, length_penalty=0.5)
    prompt = CharTokenizer().encode(PROMPTS[0])
    for s in out.sequences:
        scored = llm.generate(prompt + s.token_ids, sampling=SamplingParams(
            temperature=0, prompt_logprobs=0), max_new_tokens=1)
        lps = [e.logprob for e in scored.prompt_logprobs[len(prompt):]]
        assert sum(lps) / len(s.token_ids) ** 0.5 == pytest.approx(s.score, abs=1e-4)


def test_new_budgets_and_penalties_do_not_recompile(llm):
    llm.beam_search(PROMPTS[1], beam_width=2, max_new_tokens=5)
    before = beam_search.search._cache_size()
    for n, lp in [(7, 1.0), (9, 0.3), (16, 2.0)]:  # max_out bucket 16
        out = llm.beam_search(PROMPTS[1], beam_width=2, max_new_tokens=n, length_penalty=lp)
        assert all(len(s.token_ids) <= n for s in out.sequences)
    assert beam_search.search._cache_size() == before


@pytest.mark.parametrize("kw, param", [
    (dict(beam_width=0), "beam_width"), (dict(beam_width=65), "beam_width"),
    (dict(beam_width=2.0), "beam_width"), (dict(length_penalty=float("nan")), "length_penalty"),
    (dict(max_new_tokens=0), None)])
def test_bad_arguments(llm, kw, param):
    with pytest.raises(BadRequestError) as e:
        llm.beam_search("abc", **kw)
    assert getattr(e.value, "param", None) == param


def test_under_a_mesh_equals_one_device(llm):
    """Beams are cache rows: sharded over `data` (and heads over `model`), the regather
    along the batch axis crosses shards and the hypotheses stay the same."""
    import jax

    from jaxinfer.sharding import make_mesh
    from jaxinfer.weights import weight_shardings, weight_specs

    mesh = make_mesh("data:2,model:2")
    sharded = LLM(TINY, jax.device_put(W, weight_shardings(weight_specs(TINY), mesh)),
                  CharTokenizer(), mesh=mesh)
    want = llm.beam_search(PROMPTS[:2], beam_width=2, max_new_tokens=8)
    got = sharded.beam_search(PROMPTS[:2], beam_width=2, max_new_tokens=8)
    for g, w in zip(got, want, strict=True):
        assert [s.token_ids for s in g.sequences] == [s.token_ids for s in w.sequences]
        np.testing.assert_allclose([s.score for s in g.sequences],
                                   [s.score for s in w.sequences], atol=1e-4)
