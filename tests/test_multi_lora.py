"""Several LoRA adapters served unmerged, each row picking its own (vLLM's multi-LoRA):
SmolLM2 rows of two PEFT adapters and of the base model in one batch, against Hugging
Face PEFT's forward pass and greedy generation for each adapter alone; the library, the
engine (prefix cache included) and the server; switching adapters never recompiles."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxinfer import kv_cache, model
from jaxinfer.engine import Engine, EngineConfig
from jaxinfer.errors import BadRequestError, ConfigError
from jaxinfer.llm import LLM
from jaxinfer.runtime import CompileCounter
from jaxinfer.sampling import SamplingParams

from .test_lora import ALL, PROMPT, _adapter

peft = pytest.importorskip("peft")
PROMPTS = [PROMPT, "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
           "<|im_start|>assistant\n"]
N_NEW = 12
ADAPTERS = {  # two adapters of different ranks and targets (one rsLoRA, some layers only)
    "colors": dict(seed=1, r=8, lora_alpha=16, target_modules=ALL),
    "sparse": dict(seed=2, r=4, lora_alpha=8, use_rslora=True,
                   target_modules=["q_proj", "v_proj", "down_proj"],
                   layers_to_transform=[0, 7, 29]),
}


@pytest.fixture(scope="module")
def refs(smollm2_checkpoint, hf_base, tmp_path_factory):
    """Each adapter's directory, and PEFT's logits over PROMPTS[0] and greedy tokens for
    every prompt, per adapter (None: the base model)."""
    tok = LLM.load(smollm2_checkpoint, dtype=jnp.float32).tokenizer
    ids = [tok.encode(p) for p in PROMPTS]
    eos = [2]
    out, dirs = {}, {}

    def run(m):
        with torch.no_grad():
            logits = m(torch.tensor([ids[0]])).logits[0].numpy()
            gen = [m.generate(torch.tensor([i]), max_new_tokens=N_NEW, do_sample=False,
                              eos_token_id=eos, pad_token_id=2)[0, len(i):].tolist()
                   for i in ids]
        return logits, gen

    out[None] = run(hf_base)
    for name, kw in ADAPTERS.items():
        kw = dict(kw)
        seed = kw.pop("seed")
        dirs[name] = tmp_path_factory.mktemp("adapters") / name
        m = _adapter(hf_base, dirs[name], seed=seed, **kw)
        try:
            out[name] = run(m)
        finally:
            m.unload()
    return dirs, ids, out


@pytest.fixture(scope="module")
def hf_base(smollm2_gguf):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def llm(smollm2_checkpoint, refs):
    dirs = refs[0]
    return LLM.load(smollm2_checkpoint, dtype=jnp.float32, lora_modules=dirs)


def test_rows_of_different_adapters_match_peft(llm, refs):
    """One forward pass over three rows (base, colors, sparse): each row's logits within
    1e-3 of PEFT's for its adapter alone, while the adapters move logits by far more."""
    _, ids, out = refs
    x = jnp.asarray([ids[0]] * 3)
    cache = kv_cache.init_cache(llm.cfg, 3, 128)
    logits, _ = model.forward(llm.params, x, cache, llm.cfg, lora=llm.adapters,
                              adapter_B=jnp.asarray([0, 1, 2], jnp.int32))
    logits = np.asarray(logits)
    for row, name in enumerate([None, "colors", "sparse"]):
        ref = out[name][0]
        err = np.abs(logits[row] - ref).max()
        moved = np.abs(out[None][0] - ref).max()
        print(f"adapter {name}: max |dlogit| vs PEFT {err:.2e}; the adapter moves logits by "
              f"up to {moved:.2f}")
        assert err < 1e-3
        assert name is None or moved > 0.1


def test_generate_mixes_adapters_in_one_batch_without_recompiling(llm, refs):
    """Greedy tokens of each (prompt, adapter) row equal PEFT's generate; a second batch
    with the adapters reassigned compiles nothing."""
    _, ids, out = refs
    names = [None, "colors", "sparse", "colors"]
    prompts = [ids[0], ids[0], ids[1], ids[1]]
    greedy = SamplingParams(temperature=0)
    res = llm.generate(prompts, greedy, max_new_tokens=N_NEW, adapter=names)
    for r, name, p in zip(res, names, [0, 0, 1, 1], strict=True):
        assert r.token_ids == out[name][1][p], (name, p)
    with CompileCounter() as cc:
        again = llm.generate(prompts, greedy, max_new_tokens=N_NEW,
                             adapter=["sparse", None, "colors", "sparse"])
    assert cc.count == 0
    assert again[1].token_ids == out[None][1][0]
    assert again[2].token_ids == out["colors"][1][1]
    # one adapter for every row, and streaming
    one = llm.generate(ids[1], greedy, max_new_tokens=N_NEW, adapter="sparse")
    assert one.token_ids == out["sparse"][1][1]
    got: list = []
    text = "".join(llm.stream(ids[0], greedy, max_new_tokens=N_NEW, adapter="colors",
                              result=got))
    assert got[0].token_ids == out["colors"][1][0] and text == got[0].text


def test_bad_adapter_requests(llm, tmp_path):
    with pytest.raises(BadRequestError, match="unknown LoRA adapter 'nope'"):
        llm.generate(PROMPT, adapter="nope")
    with pytest.raises(BadRequestError, match="list of 2"):
        llm.generate([PROMPT, PROMPT], adapter=["colors"])
    with pytest.raises(BadRequestError, match="speculative"):
        llm.generate(PROMPT, adapter="colors", draft="ngram")
    with pytest.raises(ConfigError, match="already loaded"):
        llm.add_adapters({"colors": tmp_path})


def test_engine_serves_each_request_with_its_adapter(llm, refs):
    """The engine with requests of both adapters and none in flight at once, the same
    prompt under every adapter (the prefix cache must not hand one adapter's K/V to
    another): each result equals PEFT's tokens."""
    _, ids, out = refs
    greedy = SamplingParams(temperature=0)
    cfg = EngineConfig(num_slots=4, max_len=256, prefix_block=8)
    with Engine.from_llm(llm, cfg) as eng:
        eng.warmup()
        jobs = [(name, p) for p in (0, 1) for name in (None, "colors", "sparse")]
        reqs = [eng.submit(ids[p], sampling=greedy, max_tokens=N_NEW, adapter=name)
                for name, p in jobs]
        for (name, p), r in zip(jobs, reqs, strict=True):
            assert r.result(timeout=300).token_ids == out[name][1][p], (name, p)
        # again, now that every prompt's blocks are cached under some adapter
        with CompileCounter() as cc:
            reqs = [eng.submit(ids[p], sampling=greedy, max_tokens=N_NEW, adapter=name)
                    for name, p in reversed(jobs)]
            for (name, p), r in zip(reversed(jobs), reqs, strict=True):
                res = r.result(timeout=300)
                assert res.token_ids == out[name][1][p], (name, p)
                assert res.metrics.cached_tokens > 0
        assert cc.count == 0
        with pytest.raises(BadRequestError, match="unknown LoRA adapter"):
            eng.submit(ids[0], adapter="nope")
