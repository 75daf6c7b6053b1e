"""Batch jobs: one result line per input line, bad lines as error lines, resuming after an
interrupted run writes every id exactly once; the script end to end on SmolLM2."""

import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from jaxinfer.batch import run_batch
from jaxinfer.errors import BadRequestError
from jaxinfer.sampling import GREEDY, SamplingParams

from .engine_helpers import CharTokenizer, W, tiny_engine
from .helpers import TINY

ROOT = Path(__file__).resolve().parents[1]

GOOD = [{"id": "a", "prompt": "first prompt", "max_tokens": 5, "temperature": 0},
        {"id": 2, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4,
         "temperature": 0},
        {"id": "c", "prompt": "third", "max_tokens": 6, "temperature": 0.7, "seed": 3,
         "stop": ["zz"]}]
BAD = ['{"id": "d", "prompt": "x", "temperature": -1}',
       '{"id": "e", "prompt": "x", "messages": [{"role": "user", "content": "y"}]}',
       '{"prompt": "no id"}',
       'not json at all',
       '{"id": "f", "prompt": "' + "x" * 300 + '"}',
       '{"id": "g", "prompt": "x", "temprature": 0}',
       '{"id": "a", "prompt": "duplicate id"}']


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_openai_batch_format(tmp_path):
    """Lines in OpenAI's batch format (chat, completions, responses) get the server's response
    bodies under their custom_id (n choices, echo with logprobs included), equal to the
    engine's results for the same settings; bad lines get status 400 with OpenAI's error
    body naming the field; a rerun skips them."""
    msgs = [{"role": "user", "content": "hello"}]
    lines = [
        {"custom_id": "chat-1", "method": "POST", "url": "/v1/chat/completions",
         "body": {"messages": msgs, "max_tokens": 5, "temperature": 0, "logprobs": True}},
        {"custom_id": "cmpl-1", "method": "POST", "url": "/v1/completions",
         "body": {"model": "mine", "prompt": "first prompt", "temperature": 0,
                  "stop_token_ids": [9]}},
        {"custom_id": "bad-url", "method": "POST", "url": "/v1/embeddings", "body": {}},
        {"custom_id": "bad-top-p", "method": "POST", "url": "/v1/completions",
         "body": {"prompt": "x", "top_p": 2}},
        {"custom_id": "chat-n", "method": "POST", "url": "/v1/chat/completions",
         "body": {"messages": msgs, "n": 2, "temperature": 0.8, "seed": 4, "max_tokens": 4}},
        {"custom_id": "cmpl-echo", "method": "POST", "url": "/v1/completions",
         "body": {"prompt": "first prompt", "echo": True, "logprobs": 1, "max_tokens": 0}},
        {"custom_id": "bad-stream", "method": "POST", "url": "/v1/completions",
         "body": {"prompt": "x", "stream": True}},
        {"custom_id": "bad-type", "method": "POST", "url": "/v1/completions",
         "body": {"prompt": "x", "max_tokens": "4"}},
        {"custom_id": "resp-1", "method": "POST", "url": "/v1/responses",
         "body": {"input": "hello", "max_output_tokens": 5, "temperature": 0}},
        {"custom_id": "bad-resp", "method": "POST", "url": "/v1/responses",
         "body": {"input": "hello", "previous_response_id": "resp_1"}}]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps(x) + "\n" for x in lines))
    with tiny_engine() as eng:
        # A body naming another model stops the job before any line is answered.
        with pytest.raises(BadRequestError, match="line 2 asks for model 'mine'") as e:
            run_batch(eng, inp, out, progress=False)
        assert e.value.param == "model" and not out.exists()
        s = run_batch(eng, inp, out, progress=False, model_name="mine")
        assert (s.written, s.errors) == (10, 5)
        got = {r["custom_id"]: r for r in _lines(out)}
        chat = eng.submit(messages=msgs, sampling=SamplingParams(temperature=0, logprobs=0),
                          max_tokens=5).result()
        cmpl = eng.submit("first prompt", max_tokens=16, sampling=SamplingParams(
            temperature=0, stop_token_ids=[9])).result()
        seeded = [eng.submit(messages=msgs, max_tokens=4, sampling=SamplingParams(
            temperature=0.8, seed=seed)).result() for seed in (4, 5)]
        assert run_batch(eng, inp, out, progress=False, model_name="mine").skipped == 10
    ok = got["chat-1"]["response"]
    assert ok["status_code"] == 200 and got["chat-1"]["error"] is None
    body = ok["body"]
    assert body["object"] == "chat.completion" and body["id"] == ok["request_id"]
    assert body["choices"][0]["message"]["content"] == chat.text
    assert len(body["choices"][0]["logprobs"]["content"]) == len(chat.token_ids)
    body = got["cmpl-1"]["response"]["body"]
    assert body["model"] == "mine" and body["choices"][0]["text"] == cmpl.text
    assert body["usage"]["completion_tokens"] == len(cmpl.token_ids)
    # n choices: choice j is seeded seed + j, as the server does.
    choices = got["chat-n"]["response"]["body"]["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    assert [c["message"]["content"] for c in choices] == [r.text for r in seeded]
    # echo with logprobs and max_tokens 0: the scored prompt, nothing generated.
    body = got["cmpl-echo"]["response"]["body"]
    assert body["choices"][0]["text"] == "first prompt"
    assert len(body["choices"][0]["logprobs"]["tokens"]) == len("first prompt")
    assert body["usage"]["completion_tokens"] == 0
    # the Responses API: the same greedy answer as the chat line
    body = got["resp-1"]["response"]["body"]
    assert body["object"] == "response" and body["id"] == got["resp-1"]["response"]["request_id"]
    assert body["output"][0]["content"][0]["text"] == chat.text
    assert body["usage"]["output_tokens"] == len(chat.token_ids)
    for cid, param in [("bad-url", "url"), ("bad-top-p", "top_p"), ("bad-stream", "stream"),
                       ("bad-type", "max_tokens"), ("bad-resp", "previous_response_id")]:
        r = got[cid]["response"]
        assert r["status_code"] == 400 and r["body"]["error"]["param"] == param, r


def test_anthropic_batch_lines(tmp_path):
    """Anthropic's Message Batches lines ({"custom_id", "params"}) and url "/v1/messages"
    lines get the Messages API's message, equal to the engine's chat result; bad lines
    are errored with Anthropic's error body; a rerun skips them all."""
    msgs = [{"role": "user", "content": "hello"}]
    params = {"messages": msgs, "max_tokens": 5, "temperature": 0, "system": "S",
              "stop_sequences": ["zzz"]}
    lines = [{"custom_id": "a-1", "params": params},
             {"custom_id": "a-url", "method": "POST", "url": "/v1/messages", "body": params},
             {"custom_id": "a-bad", "params": {"messages": msgs}},
             {"custom_id": "a-url-bad", "method": "POST", "url": "/v1/messages",
              "body": {**params, "max_tokens": 0}}]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps(x) + "\n" for x in lines))
    with tiny_engine() as eng:
        s = run_batch(eng, inp, out, progress=False)
        assert (s.written, s.errors) == (4, 2)
        ref = eng.submit(messages=[{"role": "system", "content": "S"}, *msgs],
                         sampling=GREEDY, max_tokens=5).result()
        assert run_batch(eng, inp, out, progress=False).skipped == 4
    got = {r["custom_id"]: r for r in _lines(out)}
    msg = got["a-1"]["result"]["message"]
    assert got["a-1"]["result"]["type"] == "succeeded" and set(got["a-1"]) == {
        "custom_id", "result"}
    assert msg["type"] == "message" and msg["content"] == [{"type": "text", "text": ref.text}]
    assert msg["stop_reason"] == "max_tokens" and msg["usage"]["output_tokens"] == 5
    body = got["a-url"]["response"]["body"]
    assert got["a-url"]["response"]["status_code"] == 200 and body["content"] == msg["content"]
    err = got["a-bad"]["result"]
    assert err["type"] == "errored" and err["error"]["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in err["error"]["error"]["message"]
    r = got["a-url-bad"]["response"]
    assert r["status_code"] == 400 and r["body"]["type"] == "error"


def test_results_errors_and_resume(tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join([json.dumps(g) for g in GOOD] + BAD) + "\n")
    with tiny_engine() as eng:
        s = run_batch(eng, inp, out, defaults={"max_tokens": 8}, progress=False)
        assert (s.written, s.errors, s.duplicates) == (9, 6, 1)
        full = _lines(out)
        by_id = {r.get("id"): r for r in full if "error" not in r}
        ref = eng.submit("first prompt", sampling=GREEDY, max_tokens=5).result()
        assert by_id["a"]["text"] == ref.text and by_id["a"]["token_ids"] == ref.token_ids
        assert by_id["a"]["finish_reason"] == ref.finish_reason
        assert by_id["a"]["usage"]["completion_tokens"] == 5 and by_id["a"]["metrics"]["ttft_s"]
        errors = {r.get("id", None) if r.get("id") is not None else r["line"]: r["error"]
                  for r in full if "error" in r}
        assert "temperature" in errors["d"] and "exactly one" in errors["e"]
        assert "id" in errors[6] and "JSON" in errors[7] and "context" in errors["f"]
        assert "temprature" in errors["g"]

        # An interrupted run: one whole line and a torn one survive. Rerun: each id once.
        first = out.read_text().splitlines()[0]
        out.write_text(first + "\n" + '{"id": "c", "te')
        s2 = run_batch(eng, inp, out, progress=False)
        assert s2.skipped == 1 and s2.written == 8
        again = _lines(out)
        keys = Counter(r["id"] if r.get("id") is not None else r["line"] for r in again)
        assert set(keys.values()) == {1} and len(keys) == 9
        assert out.read_text().splitlines()[0] == first
        # Done: a third run writes nothing.
        assert run_batch(eng, inp, out, progress=False).written == 0


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_priority_field(policy, tmp_path):
    """Both line formats take vLLM's `priority`; an engine without the priority policy
    answers a nonzero one with an error line naming it (OpenAI lines: a 400 on `priority`)."""
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [{"id": "p", "prompt": "first prompt", "max_tokens": 3, "priority": -1},
             {"custom_id": "o", "method": "POST", "url": "/v1/completions",
              "body": {"prompt": "first prompt", "max_tokens": 3, "priority": 2}},
             {"id": "z", "prompt": "first prompt", "max_tokens": 3, "priority": 0}]
    inp.write_text("".join(json.dumps(x) + "\n" for x in lines))
    with tiny_engine(scheduling_policy=policy) as eng:
        s = run_batch(eng, inp, out, progress=False)
    got = {r.get("custom_id") or r.get("id"): r for r in _lines(out)}
    assert "error" not in got["z"] or got["z"]["error"] is None
    if policy == "priority":
        assert s.errors == 0 and got["p"]["usage"]["completion_tokens"] == 3
        assert got["o"]["response"]["status_code"] == 200
    else:
        assert s.errors == 2 and "priority=-1" in got["p"]["error"]
        r = got["o"]["response"]
        assert r["status_code"] == 400 and r["body"]["error"]["param"] == "priority"


def _script(*args, timeout=300):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.Popen([sys.executable, str(ROOT / "scripts" / "batch_generate.py"),
                             *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


@pytest.mark.parametrize("case", ["same", "dir_out", "dir_in", "missing"])
def test_script_refuses_bad_paths_before_loading(case, tmp_path):
    """The output being the input (its ids would all read as done, so nothing would run),
    a directory for either, or a missing input: one error line and exit 2, before any
    model loads (the checkpoint does not exist), with the input untouched."""
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps(GOOD[0]) + "\n")
    before = inp.read_text()
    src, dst, needle = {"same": (inp, inp, "is the input"),
                        "dir_out": (inp, tmp_path, "is a directory"),
                        "dir_in": (tmp_path, tmp_path / "o.jsonl", "is not a file"),
                        "missing": (tmp_path / "nope.jsonl", tmp_path / "o.jsonl",
                                    "does not exist")}[case]
    p = _script(f"--input={src}", f"--output={dst}", f"--checkpoint={tmp_path / 'never'}")
    _, err = p.communicate(timeout=120)
    lines = err.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), err
    assert needle in lines[0] and str(src if case != "dir_out" else dst) in lines[0]
    assert inp.read_text() == before


@pytest.mark.slow
def test_script_kill_and_resume_smollm2(smollm2_checkpoint, tmp_path):
    inp, out = tmp_path / "prompts.jsonl", tmp_path / "results.jsonl"
    rows = [{"id": f"q{i}", "prompt": f"Write number {i} in words:", "max_tokens": 3 + i}
            for i in range(3)]
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = [f"--input={inp}", f"--output={out}", f"--checkpoint={smollm2_checkpoint}",
            "--temperature=0", "--max_len=128", "--num_slots=2", "--noprogress"]
    # First run: killed as soon as a result is on disk (or when it finishes first).
    p = _script(*args)
    deadline = time.monotonic() + 300
    while p.poll() is None and time.monotonic() < deadline:
        if out.exists() and out.read_text().count("\n") >= 1:
            p.kill()
            break
        time.sleep(0.05)
    p.wait(timeout=60)
    with open(out, "a") as f:
        f.write('{"id": "q2", "text": "tor')  # a torn line, as a kill mid-write leaves
    p = _script(*args)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    got = _lines(out)
    assert Counter(r["id"] for r in got) == {"q0": 1, "q1": 1, "q2": 1}
    assert all(r["finish_reason"] == "length" and r["text"] for r in got)
    assert {r["id"]: len(r["token_ids"]) for r in got} == {"q0": 3, "q1": 4, "q2": 5}
    # Bad input file: one error line, exit status 2.
    p = _script(f"--input={tmp_path / 'missing.jsonl'}", f"--output={out}")
    _, err = p.communicate(timeout=120)
    assert p.returncode == 2 and err.strip().splitlines()[-1].startswith("error:")
    # --num_slots=0 sizes slots from device memory, which the CPU backend does not report.
    p = _script(*args[:-2], "--num_slots=0", "--noprogress")
    _, err = p.communicate(timeout=300)
    assert p.returncode == 2 and "memory statistics" in err.strip().splitlines()[-1], err


@pytest.mark.slow
def test_script_with_ngram_draft_gives_the_same_results(smollm2_checkpoint, tmp_path):
    """--ngram_draft runs the job's engine speculatively; greedy results are unchanged."""
    inp = tmp_path / "prompts.jsonl"
    rows = [{"id": f"q{i}", "prompt": p, "max_tokens": 12} for i, p in enumerate(
        ["Count: one, two, three, four, five, one, two, three,", "The capital of France is"])]
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = {}
    for name, extra in (("plain", []), ("ngram", ["--ngram_draft",
                                                  "--num_speculative_tokens=3"])):
        out = tmp_path / f"{name}.jsonl"
        p = _script(f"--input={inp}", f"--output={out}", f"--checkpoint={smollm2_checkpoint}",
                    "--temperature=0", "--max_len=128", "--num_slots=2", "--noprogress", *extra)
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        results[name] = {r["id"]: r["token_ids"] for r in _lines(out)}
    assert results["ngram"] == results["plain"] and len(results["plain"]) == 2
    p = _script(f"--input={inp}", f"--output={tmp_path / 'x.jsonl'}", "--ngram_draft",
                "--draft_checkpoint=/nonexistent")
    _, err = p.communicate(timeout=120)
    assert p.returncode == 2 and "--ngram_draft" in err.strip().splitlines()[-1]


def test_logprobs_field(tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [{"id": "lp", "prompt": "first prompt", "temperature": 0, "logprobs": 2},
             {"id": "no", "prompt": "first prompt", "temperature": 0},
             {"id": "plp", "prompt": "first prompt", "temperature": 0, "prompt_logprobs": 1},
             {"id": "rx", "prompt": "code:", "guided_regex": "[0-9]{4}"},
             {"id": "badrx", "prompt": "code:", "guided_regex": "(oops"},
             {"id": "bad", "prompt": "x", "logprobs": 99}]
    inp.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    with tiny_engine() as eng:
        run_batch(eng, inp, out, defaults={"max_tokens": 4}, progress=False)
    by_id = {r["id"]: r for r in _lines(out)}
    lp = by_id["lp"]["logprobs"]
    assert [e["token_id"] for e in lp] == by_id["lp"]["token_ids"] == by_id["no"]["token_ids"]
    assert all(len(e["top"]) == 2 and e["top"][0][0] == e["token_id"] for e in lp)
    assert "logprobs" not in by_id["no"] and "logprobs" in by_id["bad"]["error"]
    plp = by_id["plp"]["prompt_logprobs"]
    assert plp[0] is None and len(plp) == len("first prompt")  # one token per character
    assert [e["token_id"] for e in plp[1:]] == CharTokenizer().encode("first prompt")[1:]
    assert "prompt_logprobs" not in by_id["lp"]
    assert re.fullmatch("[0-9]{4}", by_id["rx"]["text"]), by_id["rx"]
    assert "bad constraint" in by_id["badrx"]["error"]


def test_openai_lines_with_beam_search(tmp_path):
    """`use_beam_search` lines (vLLM's; n is the beam width) get the server's beam bodies:
    the choices are LLM.beam_search's beams, run between the engine's turns while sampled
    lines are in flight; what a beam search cannot honour, and a Responses line, are 400."""
    msgs = [{"role": "user", "content": "hello"}]
    lines = [
        {"custom_id": "sampled", "method": "POST", "url": "/v1/completions",
         "body": {"prompt": "abc", "max_tokens": 12, "temperature": 0}},
        {"custom_id": "beam-cmpl", "method": "POST", "url": "/v1/completions",
         "body": {"prompt": "first prompt", "max_tokens": 6, "n": 3, "use_beam_search": True}},
        {"custom_id": "beam-chat", "method": "POST", "url": "/v1/chat/completions",
         "body": {"messages": msgs, "max_tokens": 5, "n": 2, "use_beam_search": True,
                  "length_penalty": 0.5}},
        {"custom_id": "beam-stop", "method": "POST", "url": "/v1/completions",
         "body": {"prompt": "x", "n": 2, "use_beam_search": True, "stop": ["y"]}},
        {"custom_id": "beam-resp", "method": "POST", "url": "/v1/responses",
         "body": {"input": "x", "use_beam_search": True}}]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps(x) + "\n" for x in lines))
    from jaxinfer.llm import LLM

    llm = LLM(TINY, W, CharTokenizer())
    with tiny_engine() as eng:
        s = run_batch(eng, inp, out, progress=False)
        chat_ids = eng.encode(messages=msgs)
    assert (s.written, s.errors) == (5, 2)
    got = {r["custom_id"]: r["response"] for r in _lines(out)}
    want = llm.beam_search(CharTokenizer().encode("first prompt"), beam_width=3,
                           max_new_tokens=6)
    body = got["beam-cmpl"]["body"]
    assert [c["text"] for c in body["choices"]] == [b.text for b in want.sequences]
    want = llm.beam_search(chat_ids, beam_width=2, max_new_tokens=5, length_penalty=0.5)
    body = got["beam-chat"]["body"]
    assert body["object"] == "chat.completion"
    assert [c["message"]["content"] for c in body["choices"]] == [b.text for b in want.sequences]
    assert got["sampled"]["status_code"] == 200
    for cid, param in [("beam-stop", "stop"), ("beam-resp", "use_beam_search")]:
        assert got[cid]["status_code"] == 400 and got[cid]["body"]["error"]["param"] == param
