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
# Slow as a module: the PEFT references (three models, two prompts each) take ~30 s before
# any test runs; tests/test_lora_stack.py keeps the stacked-adapter arithmetic in the
# default run on a tiny model.
pytestmark = pytest.mark.slow
MSG = [{"role": "user", "content": "What is the capital of France?"}]
N_NEW = 12
ADAPTERS = {  # two adapters of different ranks and targets (one rsLoRA, some layers only)
    "colors": dict(seed=1, r=8, lora_alpha=16, target_modules=ALL),
    "sparse": dict(seed=2, r=4, lora_alpha=8, use_rslora=True,
                   target_modules=["q_proj", "v_proj", "down_proj"],
                   layers_to_transform=[0, 7, 29]),
}


@pytest.fixture(scope="module")
def refs(smollm2_checkpoint, hf_base, tmp_path_factory):
    """Each adapter's directory, the two prompts' ids, and PEFT's logits over the first
    and greedy tokens for both, per adapter (None: the base model)."""
    tok = LLM.load(smollm2_checkpoint, dtype=jnp.float32).tokenizer
    ids = [tok.encode(PROMPT), tok.encode(tok.apply_chat_template(MSG))]  # chat: as served
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
def hf_base(smollm2_hf_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_hf_dir, dtype=torch.float32).eval()


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


def test_embeddings_with_an_adapter_equal_the_merged_model(llm, refs, smollm2_checkpoint):
    """LLM.embed(adapter=...) per row equals embedding with that adapter merged (which
    tests/test_lora.py holds to PEFT); base rows equal the plain model."""
    dirs, _, _ = refs
    texts = ["a red apple", "SELECT name FROM users", "bonjour"]
    got = llm.embed(texts, adapter=["colors", None, "sparse"], pooling="mean")
    for row, name in enumerate(["colors", None, "sparse"]):
        merged = LLM.load(smollm2_checkpoint, dtype=jnp.float32,
                          lora=None if name is None else dirs[name])
        np.testing.assert_allclose(got[row], merged.embed(texts[row], pooling="mean"),
                                   atol=2e-5)
    assert np.abs(got[0] - llm.embed(texts[0], pooling="mean")).max() > 1e-3


def test_beam_search_with_adapters_equals_the_merged_models(llm, refs, smollm2_checkpoint):
    """Each prompt's beams under its adapter equal the beams of the model with that
    adapter merged (scores too), two prompts with different adapters in one search."""
    dirs, ids, _ = refs
    got = llm.beam_search([ids[0], ids[1]], 3, 8, adapter=["sparse", "colors"])
    for out, name, p in zip(got, ["sparse", "colors"], ids, strict=True):
        want = LLM.load(smollm2_checkpoint, dtype=jnp.float32, lora=dirs[name]).beam_search(
            p, 3, 8)
        assert [b.token_ids for b in out.sequences] == [b.token_ids for b in want.sequences]
        np.testing.assert_allclose([b.score for b in out.sequences],
                                   [b.score for b in want.sequences], atol=1e-4)


def test_speculative_decoding_with_adapters(llm, engine, refs):
    """A prompt-lookup draft proposes, each row's adapter verifies: greedy tokens equal
    PEFT's in LLM.generate, stream and an engine with the draft."""
    _, ids, out = refs
    greedy = SamplingParams(temperature=0)
    names = ["colors", None, "sparse"]
    res = llm.generate([ids[0], ids[1], ids[1]], greedy, max_new_tokens=N_NEW,
                       adapter=names, draft="ngram", num_speculative_tokens=3)
    for r, name, p in zip(res, names, [0, 1, 1], strict=True):
        assert r.token_ids == out[name][1][p], (name, p)
        assert r.verify_passes > 0
    got: list = []
    "".join(llm.stream(ids[0], greedy, max_new_tokens=N_NEW, adapter="sparse",
                       draft="ngram", result=got))
    assert got[0].token_ids == out["sparse"][1][0]
    with Engine.from_llm(llm, EngineConfig(num_slots=2, max_len=256), draft="ngram",
                         num_speculative_tokens=3) as eng:
        reqs = [eng.submit(ids[p], sampling=greedy, max_tokens=N_NEW, adapter=name)
                for name, p in (("sparse", 0), ("colors", 1))]
        assert reqs[0].result(timeout=300).token_ids == out["sparse"][1][0]
        assert reqs[1].result(timeout=300).token_ids == out["colors"][1][1]


def test_bad_adapter_requests(llm, tmp_path):
    with pytest.raises(BadRequestError, match="unknown LoRA adapter 'nope'"):
        llm.generate(PROMPT, adapter="nope")
    with pytest.raises(BadRequestError, match="list of 2"):
        llm.generate([PROMPT, PROMPT], adapter=["colors"])
    with pytest.raises(ConfigError, match="already loaded"):
        llm.add_adapters({"colors": tmp_path})


@pytest.fixture(scope="module")
def engine(llm):
    with Engine.from_llm(llm, EngineConfig(num_slots=4, max_len=256, prefix_block=8)) as eng:
        eng.warmup()
        yield eng


def test_engine_serves_each_request_with_its_adapter(engine, refs):
    """The engine with requests of both adapters and none in flight at once, the same
    prompt under every adapter (the prefix cache must not hand one adapter's K/V to
    another): each result equals PEFT's tokens."""
    _, ids, out = refs
    greedy = SamplingParams(temperature=0)
    jobs = [(name, p) for p in (0, 1) for name in (None, "colors", "sparse")]
    reqs = [engine.submit(ids[p], sampling=greedy, max_tokens=N_NEW, adapter=name)
            for name, p in jobs]
    for (name, p), r in zip(jobs, reqs, strict=True):
        assert r.result(timeout=300).token_ids == out[name][1][p], (name, p)
    # again, now that every prompt's blocks are cached under each adapter
    with CompileCounter() as cc:
        reqs = [engine.submit(ids[p], sampling=greedy, max_tokens=N_NEW, adapter=name)
                for name, p in reversed(jobs)]
        for (name, p), r in zip(reversed(jobs), reqs, strict=True):
            res = r.result(timeout=300)
            assert res.token_ids == out[name][1][p], (name, p)
            assert res.metrics.cached_tokens > 0
    assert cc.count == 0
    with pytest.raises(BadRequestError, match="unknown LoRA adapter"):
        engine.submit(ids[0], adapter="nope")
    # the scored prefill (prompt_logprobs) and logprobs run the adapter too
    scored = engine.submit(ids[0], sampling=SamplingParams(
        temperature=0, logprobs=1, prompt_logprobs=1), max_tokens=2, adapter="colors").result(
        timeout=300)
    ref = torch.log_softmax(torch.tensor(out["colors"][0]), -1).numpy()
    got = [lp.logprob for lp in scored.prompt_logprobs[1:]]
    want = [ref[t - 1, ids[0][t]] for t in range(1, len(ids[0]))]
    np.testing.assert_allclose(got, want, atol=1e-3)
    assert abs(scored.logprobs[0].logprob - ref[-1, scored.token_ids[0]]) < 1e-3


def _llm_of(engine):
    from jaxinfer.openai_beam import engine_llm

    return engine_llm(engine)


def _text(tok, ids: list[int]) -> str:
    return tok.decode(ids[:-1] if ids[-1] == 2 else ids)


def test_server_routes_the_model_field_to_an_adapter(engine, refs):
    """As in vLLM: /v1/models lists each adapter with the base as its parent, and a request
    whose model is an adapter's name runs it (completions, chat, Responses); unknown
    names are 404s, base-only features 400s."""
    openai = pytest.importorskip("openai")
    requests = pytest.importorskip("requests")
    from jaxinfer.server import BackgroundServer, create_app

    _, ids, out = refs
    tok = engine.tokenizer
    with BackgroundServer(create_app(engine, "smollm2")) as srv:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0)
        models = {m.id: m for m in client.models.list().data}
        assert set(models) == {"smollm2", "colors", "sparse"}
        assert models["colors"].parent == "smollm2"
        for name in (None, "colors", "sparse"):
            c = client.completions.create(model=name or "smollm2", prompt=PROMPT,
                                          max_tokens=N_NEW, temperature=0)
            assert c.model == (name or "smollm2")
            assert c.choices[0].text == _text(tok, out[name][1][0]), name
        chat = client.chat.completions.create(model="sparse", messages=MSG,
                                              max_tokens=N_NEW, temperature=0)
        assert chat.choices[0].message.content == _text(tok, out["sparse"][1][1])
        resp = client.responses.create(model="colors", input=MSG, max_output_tokens=N_NEW,
                                       temperature=0)
        assert resp.model == "colors" and resp.output_text == _text(tok, out["colors"][1][1])
        with pytest.raises(openai.NotFoundError, match="LoRA adapters"):
            client.completions.create(model="nope", prompt="hi", max_tokens=2)
        r = requests.post(f"{srv.url}/v1/completions", timeout=120, json={
            "model": "colors", "prompt": PROMPT, "use_beam_search": True, "n": 2,
            "max_tokens": 6, "temperature": 0})
        assert r.status_code == 200, r.text
        beams = _llm_of(engine).beam_search(PROMPT, 2, 6, adapter="colors")
        assert r.json()["model"] == "colors"
        assert [c["text"] for c in r.json()["choices"]] == [b.text for b in beams.sequences]
        e = client.embeddings.create(model="colors", input=["hi", "there"])
        assert e.model == "colors"
        want = _llm_of(engine).embed(["hi", "there"], adapter="colors")
        np.testing.assert_allclose([d.embedding for d in e.data], want, atol=1e-6)


def test_batch_lines_pick_adapters(engine, refs, tmp_path):
    """Batch jobs: a plain line's "adapter", an OpenAI-format line's body.model; a job
    naming an adapter it does not have is refused before anything runs."""
    import json

    from jaxinfer.batch import run_batch

    _, ids, out = refs
    tok = engine.tokenizer
    inp, res = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [{"id": "plain", "prompt": PROMPT, "adapter": "colors", "temperature": 0,
              "max_tokens": N_NEW},
             {"id": "base", "prompt": PROMPT, "temperature": 0, "max_tokens": N_NEW},
             {"custom_id": "oa", "url": "/v1/completions", "body": {
                 "model": "sparse", "prompt": PROMPT, "temperature": 0,
                 "max_tokens": N_NEW}}]
    inp.write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert run_batch(engine, inp, res, progress=False, model_name="smollm2").written == 3
    got = {r.get("id") if "custom_id" not in r else r["custom_id"]: r
           for r in map(json.loads, res.read_text().splitlines())}
    assert got["plain"]["token_ids"] == out["colors"][1][0]
    assert got["base"]["token_ids"] == out[None][1][0]
    body = got["oa"]["response"]["body"]
    assert body["model"] == "sparse" and body["choices"][0]["text"] == _text(
        tok, out["sparse"][1][0])
    for bad in ({"id": 1, "prompt": "x", "adapter": "nope"},
                {"custom_id": "c", "url": "/v1/completions",
                 "body": {"model": "nope", "prompt": "x"}}):
        inp.write_text(json.dumps(bad) + "\n")
        with pytest.raises(BadRequestError, match="nope"):
            run_batch(engine, inp, tmp_path / "never.jsonl", progress=False)
        assert not (tmp_path / "never.jsonl").exists()


def test_adapters_under_a_mesh(smollm2_checkpoint, refs):
    """data:2,model:2: the stack is replicated beside the sharded weights; each row's
    greedy tokens still equal PEFT's."""
    dirs, ids, out = refs
    llm = LLM.load(smollm2_checkpoint, dtype=jnp.float32, mesh="data:2,model:2",
                   lora_modules=dirs)
    assert all(a.sharding.is_fully_replicated for a in llm.adapters.a.values())
    names = ["sparse", None, "colors", "sparse"]
    res = llm.generate([ids[0], ids[0], ids[1], ids[1]], SamplingParams(temperature=0),
                       max_new_tokens=N_NEW, adapter=names)
    for r, name, p in zip(res, names, [0, 0, 1, 1], strict=True):
        assert r.token_ids == out[name][1][p], (name, p)


def test_lora_modules_flag(tmp_path, refs, smollm2_checkpoint):
    """scripts/batch_generate.py --lora_modules=name=dir: a line naming the adapter gets PEFT's
    tokens; a malformed entry, and serve.py's runtime updating without room, are one-line
    errors with exit status 2."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    dirs, ids, out = refs
    script = Path(__file__).resolve().parents[1] / "scripts" / "batch_generate.py"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    inp, res = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text(json.dumps({"id": 1, "prompt": PROMPT, "adapter": "colors",
                               "temperature": 0, "max_tokens": N_NEW}) + "\n")
    common = [sys.executable, str(script), "--input", str(inp), "--output", str(res),
              "--checkpoint", str(smollm2_checkpoint), "--dtype", "float32", "--noprogress"]
    bad = subprocess.run([*common, "--lora_modules=colors"], capture_output=True, text=True,
                         timeout=300, env=env)
    assert bad.returncode == 2, bad.stderr
    assert bad.stderr.strip().splitlines()[-1] == (
        "error: --lora_modules entry 'colors' is not name=directory with a new name")
    serve = subprocess.run([sys.executable, str(script.parent / "serve.py"),
                            "--allow_runtime_lora_updating"], capture_output=True, text=True,
                           timeout=300, env=env)
    assert serve.returncode == 2 and serve.stderr.strip().splitlines()[-1] == (
        "error: --allow_runtime_lora_updating needs room for adapters: set --max_loras")
    good = subprocess.run([*common, f"--lora_modules=colors={dirs['colors']}"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert good.returncode == 0, good.stderr
    assert json.loads(res.read_text())["token_ids"] == out["colors"][1][0]


def test_adapters_loaded_and_unloaded_while_serving(llm, refs, hf_base, tmp_path):
    """vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter on a server started with
    no adapters and room for two: a loaded adapter serves PEFT's tokens with no
    recompilation; an unloaded one is a 404; its slot is reused, and the prefix cache
    does not hand the new adapter the old one's K/V; a full stack, a taken name, a bad
    directory and a rank above max_lora_rank are 400s."""
    requests = pytest.importorskip("requests")
    from jaxinfer.server import BackgroundServer, create_app

    dirs, ids, out = refs
    tok = llm.tokenizer
    big = tmp_path / "big"
    _adapter(hf_base, big, seed=3, r=16, target_modules=["q_proj"]).unload()
    cfg = EngineConfig(num_slots=2, max_len=256, prefix_block=8, max_loras=2, max_lora_rank=8)
    with Engine(llm.params, llm.cfg, llm.tokenizer, cfg, llm.impl, llm.kv_dtype) as eng:
        eng.warmup()
        with BackgroundServer(create_app(eng, "smollm2", allow_runtime_lora_updating=True)
                              ) as srv:
            def post(path, **body):
                return requests.post(f"{srv.url}/v1/{path}", json=body, timeout=120)

            def complete(model):
                r = post("completions", model=model, prompt=PROMPT, max_tokens=N_NEW,
                         temperature=0)
                return r.status_code, (r.json()["choices"][0]["text"]
                                       if r.status_code == 200 else r.json())

            assert complete("colors")[0] == 404
            r = post("load_lora_adapter", lora_name="colors", lora_path=str(dirs["colors"]))
            assert r.status_code == 200 and "added" in r.text
            with CompileCounter() as cc:
                assert complete("colors") == (200, _text(tok, out["colors"][1][0]))
                assert complete("smollm2") == (200, _text(tok, out[None][1][0]))
            assert cc.count == 0
            assert post("load_lora_adapter", lora_name="colors",
                        lora_path=str(dirs["sparse"])).status_code == 400  # taken name
            r = post("load_lora_adapter", lora_name="x", lora_path=str(tmp_path / "none"))
            assert r.status_code == 400 and "PEFT" in r.json()["error"]["message"]
            r = post("load_lora_adapter", lora_name="big", lora_path=str(big))
            assert r.status_code == 400 and "rank 16" in r.json()["error"]["message"]
            assert post("load_lora_adapter", lora_name="sparse",
                        lora_path=str(dirs["sparse"])).status_code == 200
            r = post("load_lora_adapter", lora_name="third", lora_path=str(dirs["sparse"]))
            assert r.status_code == 400 and "slots are in use" in r.json()["error"]["message"]
            models = requests.get(f"{srv.url}/v1/models", timeout=10).json()["data"]
            assert [m["id"] for m in models] == ["smollm2", "colors", "sparse"]
            metrics = requests.get(f"{srv.url}/metrics", timeout=10).text
            assert "jaxinfer_lora_adapters_loaded 2" in metrics
            assert "jaxinfer_lora_adapter_slots 2" in metrics
            # unload colors; its slot takes "sparse2" (the sparse adapter) with new prefix keys
            assert post("unload_lora_adapter", lora_name="colors").status_code == 200
            assert complete("colors")[0] == 404
            assert post("unload_lora_adapter", lora_name="colors").status_code == 404
            assert post("load_lora_adapter", lora_name="sparse2",
                        lora_path=str(dirs["sparse"])).status_code == 200
            assert eng.adapter_index("sparse2") == 1  # colors' old slot
            assert complete("sparse2") == (200, _text(tok, out["sparse"][1][0]))
    with pytest.raises(ConfigError, match="max_loras"):
        create_app(engine_without_room := Engine(llm.params, llm.cfg, llm.tokenizer,
                                                 EngineConfig(num_slots=1, max_len=64)),
                   "m", allow_runtime_lora_updating=True)
    engine_without_room.close()
