"""End-to-end on the real SmolLM2-135M-Instruct weights, against Hugging Face
transformers (PyTorch, CPU, float32) loading the same GGUF file independently."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxinfer import kv_cache, model
from jaxinfer.llm import LLM
from jaxinfer.sampling import SamplingParams

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea,",
    "<|im_start|>user\nName three primary colors.<|im_end|>\n<|im_start|>assistant\n",
]
GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def hf_model(smollm2_hf_dir):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(smollm2_hf_dir, dtype=torch.float32)
    return m.eval()


@pytest.fixture(scope="module")
def llm(smollm2_checkpoint):
    return LLM.load(smollm2_checkpoint, dtype=jnp.float32)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_logits_match_hf(llm, hf_model, prompt):
    ids = llm.tokenizer.encode(prompt)
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits[0].numpy()
    cache = kv_cache.init_cache(llm.cfg, 1, 256)
    logits, _ = model.forward(llm.params, jnp.asarray([ids]), cache, llm.cfg)
    logits = np.asarray(logits[0])
    assert (logits.argmax(-1) == ref.argmax(-1)).all(), "top-1 disagrees with HF"
    assert np.abs(logits - ref).max() < 1e-3


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_32_tokens_match_hf(llm, hf_model, prompt):
    ids = llm.tokenizer.encode(prompt)
    with torch.no_grad():
        ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                                eos_token_id=list(llm.eos), pad_token_id=2)[0, len(ids):]
    out = llm.generate(ids, sampling=GREEDY, max_new_tokens=32)
    assert out.token_ids == [int(t) for t in ref]
    assert len(out.token_ids) == 32 or out.finish_reason == "stop"


@pytest.mark.slow
def test_min_tokens_and_stop_token_ids_match_hf(llm, hf_model):
    """vLLM's min_tokens and stop_token_ids against HF's own rules on the same weights:
    min_new_tokens (EOS banned until then) and eos_token_id (ids that end generation)."""
    ids = llm.tokenizer.encode(llm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}]))
    free = llm.generate(ids, sampling=GREEDY, max_new_tokens=48)
    assert free.finish_reason == "stop"  # ends on <|im_end|> after a short answer
    n = len(free.token_ids)
    period = llm.tokenizer.encode(".")[0]
    cases = [(SamplingParams(temperature=0, min_tokens=n + 4),
              dict(min_new_tokens=n + 4, eos_token_id=list(llm.eos))),
             (SamplingParams(temperature=0, stop_token_ids=[period]),
              dict(eos_token_id=[*llm.eos, period]))]
    for sp, hf_kw in cases:
        with torch.no_grad():
            ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=48, do_sample=False,
                                    pad_token_id=2, **hf_kw)[0, len(ids):]
        out = llm.generate(ids, sampling=sp, max_new_tokens=48)
        assert out.token_ids == [int(t) for t in ref], sp
    assert len(out.token_ids) < n and out.token_ids[-1] == period and "." not in out.text
    eos_first = SamplingParams(temperature=0, ignore_eos=True)
    out = llm.generate(ids, sampling=eos_first, max_new_tokens=n + 8)
    assert len(out.token_ids) == n + 8 and out.token_ids[:n] == free.token_ids


def test_streaming_equals_batch_path(llm):
    ids = llm.tokenizer.encode(PROMPTS[2])
    res = []
    text = "".join(llm.stream(ids, sampling=GREEDY, max_new_tokens=24, result=res))
    batch = llm.generate(ids, sampling=GREEDY, max_new_tokens=24)
    assert res[0].token_ids == batch.token_ids and text == batch.text


@pytest.mark.slow
def test_engine_logprobs_match_hf(llm, hf_model):
    """The engine's and LLM.generate's per-token logprobs (and top-5) equal log_softmax of
    HF's logits over the prompt plus the generated tokens (teacher forcing); so do the
    engine's prompt_logprobs (the prompt prefilled in chunks) and LLM.generate's."""
    from jaxinfer.engine import Engine, EngineConfig

    ids = llm.tokenizer.encode(PROMPTS[3])
    # The prompt in 4-token chunks, scored too (prompt_logprobs).
    with Engine.from_llm(llm, EngineConfig(num_slots=2, max_len=256,
                                           prefill_token_budget=4)) as eng:
        r = eng.submit(ids, sampling=SamplingParams(temperature=0, logprobs=5,
                                                    prompt_logprobs=5),
                       max_tokens=12).result(timeout=300)
    out = llm.generate(ids, sampling=SamplingParams(temperature=0, logprobs=5),
                       max_new_tokens=12)  # the library's while-loop path
    assert out.token_ids == r.token_ids
    with torch.no_grad():
        full = torch.tensor([ids + r.token_ids])
        ref = torch.log_softmax(hf_model(full).logits[0], -1).numpy()[len(ids) - 1: -1]
    for e, o, row in zip(r.logprobs, out.logprobs, ref, strict=True):
        assert abs(o.logprob - row[o.token_id]) < 1e-3 and o.top[0][0] == o.token_id
        assert abs(e.logprob - row[e.token_id]) < 1e-3
        top_ids, top_lp = zip(*e.top, strict=True)
        assert list(top_ids[:2]) == list(np.argsort(-row)[:2])  # ties below: order may vary
        np.testing.assert_allclose(top_lp, np.sort(row)[::-1][:5], atol=1e-3)
    with torch.no_grad():
        prompt_ref = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0], -1).numpy()
    # LLM.generate scores prompts too: the same prompt beside a shorter one in a batch.
    lib = llm.generate([ids, ids[:5]], sampling=SamplingParams(temperature=0, prompt_logprobs=5),
                       max_new_tokens=4)
    assert lib[1].prompt_logprobs[0] is None and len(lib[1].prompt_logprobs) == 5
    for got in (r.prompt_logprobs, lib[0].prompt_logprobs, lib[1].prompt_logprobs):
        assert got[0] is None and len(got) in (len(ids), 5) and len(ids) > 5
        for t, e in enumerate(got[1:]):
            assert e.token_id == ids[t + 1]
            assert abs(e.logprob - prompt_ref[t, e.token_id]) < 1e-3
            np.testing.assert_allclose([x for _, x in e.top],
                                       np.sort(prompt_ref[t])[::-1][:5], atol=1e-3)


def test_france_says_paris(llm):
    out = llm.generate("The capital of France is", sampling=GREEDY, max_new_tokens=8)
    assert "Paris" in out.text


def test_chat_answers_coherently(llm):
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   sampling=GREEDY, max_new_tokens=48)
    assert "Paris" in out.text and out.finish_reason == "stop"


def test_chat_on_a_list_of_conversations(llm):
    """A list of conversations is one batch, a list of replies, each what the
    conversation alone gives (greedy)."""
    convs = [[{"role": "user", "content": "What is the capital of France?"}],
             [{"role": "user", "content": "Name a primary color."}]]
    outs = llm.chat(convs, sampling=GREEDY, max_new_tokens=12)
    assert isinstance(outs, list) and len(outs) == 2
    for conv, out in zip(convs, outs, strict=True):
        assert out.token_ids == llm.chat(conv, sampling=GREEDY, max_new_tokens=12).token_ids
    assert "Paris" in outs[0].text


def test_chat_continues_a_begun_reply(llm):
    """continue_final_message: the model continues the assistant's begun reply (no new
    turn); the prompt ends with the begun text, not with <|im_end|>."""
    msgs = [{"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "The capital of France is"}]
    out = llm.chat(msgs, continue_final_message=True, sampling=GREEDY, max_new_tokens=6)
    assert out.text.lstrip().startswith("Paris"), out.text
    text = llm.tokenizer.apply_chat_template(msgs, add_generation_prompt=False,
                                             continue_final_message=True)
    assert out.prompt_tokens == len(llm.tokenizer.encode(text))
    assert text.endswith("assistant\nThe capital of France is")


def test_stop_string(llm):
    out = llm.generate("1, 2, 3, 4,", sampling=GREEDY, max_new_tokens=24, stop=[" 7"])
    assert out.finish_reason == "stop" and " 7" not in out.text and "6" in out.text
    keep = SamplingParams(temperature=0, include_stop_str_in_output=True)
    kept = llm.generate("1, 2, 3, 4,", sampling=keep, max_new_tokens=24, stop=[" 7"])
    assert kept.text == out.text + " 7" and kept.token_ids == out.token_ids


@pytest.mark.slow
def test_text_leaves_out_special_tokens_as_hf_decode_does(llm, smollm2_gguf):
    """Decoding past the reply's <|im_end|> (ignore_eos) runs into a new chat turn: the
    text leaves the chat markers out (vLLM's skip_special_tokens, on by default) exactly
    as HF's tokenizer does, streamed or not, and shows them when asked."""
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    ids = llm.tokenizer.encode(llm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Say hi."}]))
    for skip in (True, False):
        sp = SamplingParams(temperature=0, ignore_eos=True, skip_special_tokens=skip)
        out = llm.generate(ids, sampling=sp, max_new_tokens=40)
        assert 2 in out.token_ids[:-1]  # <|im_end|>, decoded past
        assert out.text == hf_tok.decode(out.token_ids, skip_special_tokens=skip)
        assert ("<|im_end|>" in out.text) is not skip
        assert "".join(llm.stream(ids, sampling=sp, max_new_tokens=40)) == out.text


@pytest.mark.slow
def test_safetensors_path_equals_gguf_path(llm, hf_model, tmp_path):
    """HF writes the same weights as safetensors; that directory converts to a checkpoint
    whose greedy output equals the GGUF-converted one."""
    from transformers import LlamaForCausalLM

    from jaxinfer.checkpoint import save_checkpoint
    from jaxinfer.convert.safetensors import load_hf_dir

    # transformers refuses to save a GGUF-loaded model; copy into a plain one first.
    plain = LlamaForCausalLM(hf_model.config)
    plain.load_state_dict(hf_model.state_dict())
    plain.save_pretrained(tmp_path / "hf")
    cfg, w = load_hf_dir(tmp_path / "hf")
    assert cfg.num_layers == 30 and cfg.tie_embeddings
    llm.tokenizer.save(tmp_path / "tok")
    save_checkpoint(tmp_path / "ckpt", cfg, w, tmp_path / "tok")
    other = LLM.load(tmp_path / "ckpt", dtype=jnp.float32)
    for p in PROMPTS[:2]:
        a = llm.generate(p, sampling=GREEDY, max_new_tokens=16).token_ids
        assert other.generate(p, sampling=GREEDY, max_new_tokens=16).token_ids == a


def test_allowed_token_ids_pick_hf_argmax_among_them(llm, hf_model):
    """A yes/no question under allowed_token_ids that exclude the model's answer: the
    answer is the allowed token that HF transformers' logits rank highest."""
    ids = llm.tokenizer.encode(llm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Is Paris the capital of France? Answer yes or no."}]))
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits[0, -1].numpy()
    words = ("yes", "no", "Yes", "No", "Maybe", "Perhaps")
    # Every option but the model's own first choice, so the restriction decides.
    options = sorted({llm.tokenizer.encode(w)[0] for w in words} - {int(np.argmax(ref))})
    want = options[int(np.argmax(ref[options]))]
    out = llm.generate(ids, sampling=SamplingParams(temperature=0, allowed_token_ids=options),
                       max_new_tokens=1)
    assert out.token_ids == [want]


def test_bad_words_match_hf(llm, hf_model):
    """vLLM's bad_words against HF's bad_words_ids on the same weights: a one-token word
    (the model's answer, as it would start the text and after a space), and a two-token
    sequence taken from the free output, banned only right after its own first token. The
    greedy tokens equal HF's, differ from the free output, and hold no banned sequence."""
    ids = llm.tokenizer.encode(llm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}]))
    free = llm.generate(ids, sampling=GREEDY, max_new_tokens=24).token_ids
    pair = tuple(free[3:5])
    for sp in (SamplingParams(temperature=0, bad_words=["Paris"]),
               SamplingParams(temperature=0, bad_words_token_ids=[pair])):
        banned = sp.resolve_bad_words(llm.tokenizer).bad_words_token_ids
        assert len(banned) == (2 if sp.bad_words else 1)  # "Paris" and " Paris"
        with torch.no_grad():
            ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                                    eos_token_id=list(llm.eos), pad_token_id=2,
                                    bad_words_ids=[list(s) for s in banned])[0, len(ids):]
        out = llm.generate(ids, sampling=sp, max_new_tokens=24)
        assert out.token_ids == [int(t) for t in ref], sp
        assert out.token_ids != free[:len(out.token_ids)]
        for seq in banned:
            n = len(seq)
            assert all(tuple(out.token_ids[i:i + n]) != seq
                       for i in range(len(out.token_ids)))
    assert "Paris" not in llm.generate(ids, sampling=SamplingParams(
        temperature=0, bad_words=["Paris"]), max_new_tokens=24).text


@pytest.mark.slow
@pytest.mark.parametrize("length_penalty, early_stopping", [(1.0, False), (0.5, True)])
def test_beam_search_matches_hf(llm, hf_model, length_penalty, early_stopping):
    """LLM.beam_search against HF's generate(num_beams=4) on the same weights: all four
    hypotheses, token for token, and their length-penalized scores, on a plain prompt
    (cut by the budget) and a chat prompt (ended by EOS)."""
    prompts = [PROMPTS[0], PROMPTS[3]] if early_stopping is False else [PROMPTS[3]]
    outs = llm.beam_search(prompts, beam_width=4, max_new_tokens=24,
                           length_penalty=length_penalty, early_stopping=early_stopping)
    for prompt, out in zip(prompts, outs, strict=True):
        ids = llm.tokenizer.encode(prompt)
        with torch.no_grad():
            ref = hf_model.generate(
                torch.tensor([ids]), num_beams=4, num_return_sequences=4, do_sample=False,
                max_new_tokens=24, length_penalty=length_penalty,
                early_stopping=early_stopping, eos_token_id=list(llm.eos), pad_token_id=2,
                output_scores=True, return_dict_in_generate=True)
        assert len(out.sequences) == 4 and out.prompt_tokens == len(ids)
        for i, seq in enumerate(out.sequences):
            want = [int(t) for t in ref.sequences[i, len(ids):]][:len(seq.token_ids)]
            assert seq.token_ids == want, (prompt, i)
            assert seq.score == pytest.approx(float(ref.sequences_scores[i]), abs=1e-4)
            assert seq.finish_reason == ("stop" if seq.token_ids[-1] in llm.eos else "length")
        assert [s.score for s in out.sequences] == sorted((s.score for s in out.sequences),
                                                          reverse=True)
    assert outs[-1].sequences[0].finish_reason == "stop" and "Blue" in outs[-1].sequences[0].text
