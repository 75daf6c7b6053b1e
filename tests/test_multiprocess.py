"""Multi-process runs on localhost: several CPU processes form one global mesh.

Each process is a subprocess with a hard timeout: a missing peer aborts JAX processes, and
the test must end either way.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GENERATE = [sys.executable, str(ROOT / "scripts" / "generate.py")]
ARGS = ["--prompt", "The capital of France is", "--temperature", "0", "--max_new_tokens", "8",
        "--output_format", "json", "--nocompilation_cache"]
pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]


def _env():
    return {**os.environ, "JAX_PLATFORMS": "cpu"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _json_line(stdout: str) -> dict:
    """The result object; gloo may print its own connection lines on stdout."""
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1, stdout
    return json.loads(lines[0])


def _single_and_two_processes(args: list[str], mesh: str) -> tuple[dict, list]:
    """(the one-device result, (stdout, stderr) of each of two processes of two CPU
    devices on `mesh`) of scripts/generate.py with `args`; every run must succeed."""
    single = subprocess.run(GENERATE + ARGS + args + ["--num_cpu_devices", "1"],
                            capture_output=True, text=True, timeout=300, env=_env())
    assert single.returncode == 0, single.stderr[-2000:]
    addr = f"127.0.0.1:{_free_port()}"
    procs = [subprocess.Popen(
        GENERATE + ARGS + args + ["--num_cpu_devices", "2", "--mesh", mesh,
                                  "--coordinator_address", addr, "--num_processes", "2",
                                  "--process_id", str(i), "--distributed_timeout_s", "120"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
        for i in range(2)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=400))
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    return _json_line(single.stdout), outs


def test_two_processes_agree_with_single_process(smollm2_checkpoint):
    ref, outs = _single_and_two_processes(["--checkpoint", str(smollm2_checkpoint)],
                                          "data:2,model:2")
    got = _json_line(outs[0][0])
    assert got["token_ids"] == ref["token_ids"] and got["text"] == ref["text"]
    assert "Paris" in got["text"]
    # Only process 0 prints a result; process 1 logs the tokens it computed.
    assert not [ln for ln in outs[1][0].splitlines() if ln.startswith("{")]
    assert f"process 1 token_ids: {ref['token_ids']}" in outs[1][1]


def test_two_processes_expert_parallel(smollm2_checkpoint, tmp_path):
    """A mixture of experts (random weights, SmolLM2's tokenizer) with its experts split
    over two processes (`expert:2,model:2`, the shard_map of moe.py in every process)
    gives the single-device tokens."""
    import jax

    from jaxinfer.checkpoint import save_checkpoint
    from jaxinfer.config import ModelConfig
    from jaxinfer.weights import init_weights, weight_specs

    cfg = ModelConfig(vocab_size=49152, d_model=64, mlp_dim=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=16, max_seq_len=256, num_experts=4,
                      experts_per_token=2, shared_expert_dim=32, shared_expert_gate=True,
                      eos_token_ids=(2,), name="tiny-moe")
    w = init_weights(weight_specs(cfg), jax.random.key(0))
    save_checkpoint(tmp_path / "moe", cfg, w, tokenizer_dir=smollm2_checkpoint / "tokenizer")
    ref, outs = _single_and_two_processes(
        ["--checkpoint", str(tmp_path / "moe"), "--ignore_eos"], "expert:2,model:2")
    got = _json_line(outs[0][0])
    assert len(ref["token_ids"]) == 8 and got["token_ids"] == ref["token_ids"]
    assert f"process 1 token_ids: {ref['token_ids']}" in outs[1][1]


def test_missing_peer_fails_clearly_within_the_timeout(smollm2_checkpoint):
    addr = f"127.0.0.1:{_free_port()}"
    t0 = time.monotonic()
    r = subprocess.run(
        GENERATE + ARGS + ["--checkpoint", str(smollm2_checkpoint), "--num_cpu_devices", "2",
                           "--coordinator_address", addr, "--num_processes", "2",
                           "--process_id", "0", "--distributed_timeout_s", "5"],
        capture_output=True, text=True, timeout=120, env=_env())
    elapsed = time.monotonic() - t0
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: process 0: not all 2 processes joined"), r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert elapsed < 60, elapsed


def test_bad_process_id_is_a_clear_error():
    r = subprocess.run(GENERATE + ARGS + ["--coordinator_address", "127.0.0.1:1",
                                          "--num_processes", "2", "--process_id", "5"],
                       capture_output=True, text=True, timeout=120, env=_env())
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: process_id=5")


SERVE = [sys.executable, str(ROOT / "scripts" / "serve.py")]
BATCH = [sys.executable, str(ROOT / "scripts" / "batch_generate.py")]
ENGINE_ARGS = ["--num_slots", "4", "--max_len", "128", "--nocompilation_cache"]
PROMPTS = ["The capital of France is", "List three colors:", "1, 2, 3, 4,",
           "Water boils at"]


def _launch(cmd: list[str], n: int = 2, timeout_s: int = 120
            ) -> tuple[list[subprocess.Popen], str]:
    """`cmd` on `n` processes of two CPU devices each, one global data:2,model:2 mesh."""
    addr = f"127.0.0.1:{_free_port()}"
    procs = [subprocess.Popen(
        cmd + ["--num_cpu_devices", "2", "--mesh", "data:2,model:2",
               "--coordinator_address", addr, "--num_processes", str(n),
               "--process_id", str(i), "--distributed_timeout_s", str(timeout_s)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
        for i in range(n)]
    return procs, addr


def _finish(procs: list[subprocess.Popen], timeout: float) -> list[tuple[str, str]]:
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout))
    finally:
        for p in procs:
            p.kill()
    return outs


def _digests(outs: list[tuple[str, str]]) -> list[str]:
    """Each process's closing line: requests finished and the digest of their tokens."""
    got = []
    for _, err in outs:
        lines = [ln for ln in err.splitlines() if "engine stopped:" in ln]
        assert len(lines) == 1, err[-3000:]
        got.append(lines[0].split("engine stopped:")[1].strip())
    return got


def _reference(checkpoint, max_tokens: int) -> list[dict]:
    """Greedy token ids and text of PROMPTS from a single-process, single-device engine."""
    code = (
        "import json, sys\n"
        "from jaxinfer.llm import LLM\n"
        "from jaxinfer.engine import Engine, EngineConfig\n"
        "from jaxinfer.sampling import GREEDY\n"
        f"llm = LLM.load({str(checkpoint)!r})\n"
        "with Engine.from_llm(llm, EngineConfig(num_slots=4, max_len=128)) as e:\n"
        f"    rs = e.generate({PROMPTS!r}, sampling=GREEDY, max_tokens={max_tokens})\n"
        "print(json.dumps([{'token_ids': r.token_ids, 'text': r.text} for r in rs]))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=300, env=_env())
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.splitlines()[-1])


def _wait_healthy(procs: list[subprocess.Popen], port: int) -> None:
    import requests

    deadline = time.monotonic() + 300
    while True:
        assert all(p.poll() is None for p in procs), "a process exited early"
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=5).ok:
                return
        except requests.ConnectionError:
            pass
        assert time.monotonic() < deadline, "the server did not come up"
        time.sleep(1)


def test_two_process_server_follows_process_0(smollm2_checkpoint):
    """serve.py on two processes: process 0 answers HTTP, process 1 follows its engine
    turn by turn; greedy completions equal a single-process engine's, and both processes
    decode the same tokens (equal digests over every request, sampled ones included)."""
    import requests

    port = _free_port()
    procs, _ = _launch(SERVE + ENGINE_ARGS + ["--checkpoint", str(smollm2_checkpoint),
                                              "--port", str(port), "--nowarmup"])
    url = f"http://127.0.0.1:{port}/v1/completions"
    try:
        _wait_healthy(procs, port)
        from concurrent.futures import ThreadPoolExecutor

        def complete(body):
            r = requests.post(url, json={"max_tokens": 8, **body}, timeout=300)
            assert r.status_code == 200, r.text
            return r.json()

        bodies = ([{"prompt": p, "temperature": 0} for p in PROMPTS]
                  + [{"prompt": "Once upon a time", "temperature": 1.0},  # unseeded
                     {"prompt": "Once upon a time", "temperature": 0.8, "seed": 7},
                     {"prompt": "The capital of France is", "temperature": 0,
                      "stop": [" Paris"]},
                     {"prompt": "Is water wet? Answer:", "temperature": 1.0,
                      "guided_choice": [" yes", " no"]}])
        with ThreadPoolExecutor(len(bodies)) as pool:
            got = list(pool.map(complete, bodies))
        # A client that goes away mid-stream: its cancel reaches every process at the same
        # turn, and the engines stay in step for the next request.
        with requests.post(url, json={"prompt": "Tell me a long story.", "max_tokens": 100,
                                      "stream": True}, stream=True, timeout=300) as r:
            next(r.iter_lines())
        got.append(complete({"prompt": PROMPTS[1], "temperature": 0}))
        procs[0].send_signal(2)  # Ctrl-C: process 0 shuts down, process 1 follows
        outs = _finish(procs, 120)
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    ref = _reference(smollm2_checkpoint, 8)
    texts = [g["choices"][0]["text"] for g in got]
    assert texts[:4] == [r["text"] for r in ref]
    assert "Paris" in texts[0] and got[6]["choices"][0]["finish_reason"] == "stop"
    assert "Paris" not in texts[6] and texts[7] in (" yes", " no")
    assert texts[-1] == ref[1]["text"]
    d0, d1 = _digests(outs)
    assert d0 == d1 and d0.startswith(f"{len(bodies) + 2} requests finished"), (d0, d1)
    assert "following process 0's engine" in outs[1][0]


def test_two_process_batch_job(smollm2_checkpoint, tmp_path):
    """batch_generate.py on two processes: process 0 reads the input and writes the only
    output; the greedy results equal a single-process engine's."""
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [json.dumps({"id": i, "prompt": p, "max_tokens": 8, "temperature": 0})
             for i, p in enumerate(PROMPTS)] + ['{"id": "bad", "prompt": ""}']
    inp.write_text("\n".join(lines) + "\n")
    procs, _ = _launch(BATCH + ENGINE_ARGS + ["--checkpoint", str(smollm2_checkpoint),
                                              "--input", str(inp), "--output", str(out),
                                              "--noprogress"])
    outs = _finish(procs, 400)
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    recs = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert len(recs) == len(lines) and "error" in recs["bad"]
    ref = _reference(smollm2_checkpoint, 8)
    assert [recs[i]["text"] for i in range(len(PROMPTS))] == [r["text"] for r in ref]
    assert [recs[i]["token_ids"] for i in range(len(PROMPTS))] == [r["token_ids"] for r in ref]
    d0, d1 = _digests(outs)
    assert d0 == d1 and d0.startswith(f"{len(PROMPTS)} requests finished"), (d0, d1)
    assert "results written" in outs[0][1] and "results written" not in outs[1][1]


def test_a_dead_follower_ends_process_0(smollm2_checkpoint):
    """A follower killed mid-service: process 0's engine fails its requests (HTTP 503, not
    a hang) and JAX's coordination service ends process 0 within the heartbeat bound
    (--distributed_timeout_s)."""
    import requests

    port = _free_port()
    procs, _ = _launch(SERVE + ENGINE_ARGS + ["--checkpoint", str(smollm2_checkpoint),
                                              "--port", str(port), "--nowarmup"],
                       timeout_s=20)
    try:
        _wait_healthy(procs, port)
        procs[1].kill()
        procs[1].wait(timeout=30)
        t0 = time.monotonic()
        try:
            r = requests.post(f"http://127.0.0.1:{port}/v1/completions",
                              json={"prompt": "Hi", "max_tokens": 4}, timeout=120)
            assert r.status_code == 503, r.text
        except requests.ConnectionError:
            pass  # process 0 was already gone
        procs[0].wait(timeout=120)
        assert procs[0].returncode != 0
        assert time.monotonic() - t0 < 120
    finally:
        for p in procs:
            p.kill()
