"""The generation core on a tiny random model: loop equivalence, EOS/length handling,
batch invariance and compile counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer import generate as gen
from jaxinfer.errors import BadRequestError
from jaxinfer.runtime import CompileCounter
from jaxinfer.sampling import SamplingArrays, SamplingParams

from .helpers import TINY, tiny_weights

W = tiny_weights()
EOS = np.array([3], np.int32)
GREEDY = SamplingParams(temperature=0.0)


def _start(prompts, max_new, params=None, eos=EOS):
    params = params or [GREEDY] * len(prompts)
    prompt_BT, lens, cache, M = gen.prepare(prompts, max_new, TINY, jnp.float32)
    return gen.start(W, prompt_BT, lens, cache, SamplingArrays.from_params(params),
                     np.asarray(max_new, np.int32), eos, cfg=TINY, max_out=M)


def _loop(prompts, max_new, params=None, eos=EOS):
    s = gen.run_loop(W, _start(prompts, max_new, params, eos), cfg=TINY)
    out, n = np.asarray(s.output_BM), np.asarray(s.num_generated_B)
    return [list(out[b, : n[b]]) for b in range(len(prompts))], s


def _stepped(prompts, max_new, params=None, eos=EOS):
    s = _start(prompts, max_new, params, eos)
    toks = [[int(t)] for t in np.asarray(s.tokens_B)]
    done = np.asarray(s.done_B).copy()
    while not done.all():
        s, out, _ = gen.step(W, s, np.bool_(False), cfg=TINY)
        out = np.asarray(out)
        for b in range(len(prompts)):
            if not done[b]:
                toks[b].append(int(out[0, b]))
        done = out[1].astype(bool)
    return toks


def _reference_greedy(prompt, n, eos=(3,)):
    """Greedy decoding by recomputing the full forward each step (no cache reuse)."""
    from jaxinfer import kv_cache, model

    seq = list(prompt)
    for _ in range(n):
        logits, _ = model.forward(W, jnp.asarray([seq]), kv_cache.init_cache(TINY, 1, 64), TINY)
        seq.append(int(jnp.argmax(logits[0, -1])))
        if seq[-1] in eos:
            break
    return seq[len(prompt):]


PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22]]


def test_loop_matches_reference_and_stepped_path():
    loop, _ = _loop(PROMPTS, [12, 12, 12], eos=np.array([-1], np.int32))
    assert loop == _stepped(PROMPTS, [12, 12, 12], eos=np.array([-1], np.int32))
    for p, toks in zip(PROMPTS, loop, strict=False):
        assert toks == _reference_greedy(p, 12, eos=())


def test_batch_invariance_greedy_and_seeded():
    params = [GREEDY, SamplingParams(temperature=0.9, top_p=0.9, seed=7),
              SamplingParams(temperature=1.2, top_k=20, seed=3)]
    batch, _ = _loop(PROMPTS, [10, 7, 9], params)
    for b in range(3):
        alone, _ = _loop([PROMPTS[b]], [[10, 7, 9][b]], [params[b]])
        assert alone[0] == batch[b]


def test_per_row_length_budget_and_eos():
    toks, s = _loop(PROMPTS, [3, 9, 1], eos=np.array([-1], np.int32))
    assert [len(t) for t in toks] == [3, 9, 1]
    assert not np.asarray(s.finish_eos_B).any()
    # Make the first greedy token of row 0 an EOS: that row stops after one token.
    first = toks[0][0]
    toks2, s2 = _loop(PROMPTS, [8, 8, 8], eos=np.array([first], np.int32))
    assert toks2[0] == [first] and bool(np.asarray(s2.finish_eos_B)[0])
    # The cache holds the prompt and every generated token but the last, which was
    # never fed back; a row that finished early stops growing.
    lengths = np.asarray(s2.cache.lengths)
    assert list(lengths) == [len(p) + len(t) - 1 for p, t in zip(PROMPTS, toks2, strict=False)]


def test_prompt_lengths_in_one_bucket_compile_once():
    _loop([[1, 2, 3]], [5])  # warm-up for this bucket
    with CompileCounter() as c:
        _loop([[4, 5, 6, 7, 8, 9, 10]], [5])
        _loop([[4] * 20], [7])
        _loop([[9, 9]], [5], [SamplingParams(temperature=0.5, top_p=0.8, seed=1)])
    assert c.count == 0, f"{c.count} recompilations for prompts inside one bucket"
    with CompileCounter() as c:
        _loop([[4] * 40], [5])  # a new prompt bucket (64) compiles prefill once
    assert c.count >= 1


def test_buckets():
    assert gen.bucket(1, 32, 8192) == 32
    assert gen.bucket(33, 32, 8192) == 64
    assert gen.bucket(64, 32, 8192) == 64
    assert gen.bucket(9000, 32, 8192) == 8192


@pytest.mark.parametrize("prompt,max_new,match", [
    ([], 4, "empty"), ([1, 2], 0, "max_new_tokens"), ([1] * 500, 20, "exceeds")])
def test_bad_lengths(prompt, max_new, match):
    with pytest.raises(BadRequestError, match=match):
        gen.prepare([prompt], [max_new], TINY, jnp.float32)


def test_step_donates_state():
    s = _start([[1, 2, 3]], [4])
    k = s.cache.k
    s2, _, _ = gen.step(W, s, np.bool_(False), cfg=TINY)
    assert k.is_deleted()
    jax.block_until_ready(s2)
