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


def test_two_processes_agree_with_single_process(smollm2_checkpoint):
    ckpt = ["--checkpoint", str(smollm2_checkpoint)]
    single = subprocess.run(GENERATE + ARGS + ckpt + ["--num_cpu_devices", "1"],
                            capture_output=True, text=True, timeout=300, env=_env())
    assert single.returncode == 0, single.stderr[-2000:]
    ref = _json_line(single.stdout)

    addr = f"127.0.0.1:{_free_port()}"
    procs = [subprocess.Popen(
        GENERATE + ARGS + ckpt + ["--num_cpu_devices", "2", "--mesh", "data:2,model:2",
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
    got = _json_line(outs[0][0])
    assert got["token_ids"] == ref["token_ids"] and got["text"] == ref["text"]
    assert "Paris" in got["text"]
    # Only process 0 prints a result; process 1 logs the tokens it computed.
    assert not [ln for ln in outs[1][0].splitlines() if ln.startswith("{")]
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
