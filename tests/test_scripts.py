"""scripts/generate.py end to end on the real model, and its handling of bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args, timeout=300):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "generate.py"), *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


def test_text_mode_says_paris(smollm2_checkpoint):
    r = run("--prompt", "The capital of France is", "--temperature", "0",
            "--max_new_tokens", "8")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout


def test_json_mode_fields(smollm2_checkpoint):
    r = run("--prompt", "The capital of France is", "--temperature", "0",
            "--max_new_tokens", "6", "--output_format", "json", "--stop", "zzz",
            "--logprobs", "2", "--prompt_logprobs", "1")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(out) == {"text", "token_ids", "prompt_tokens", "finish_reason", "ttft_s",
                        "decode_tokens_per_s", "weight_bytes", "kv_cache_bytes", "logprobs",
                        "prompt_logprobs"}
    assert out["prompt_logprobs"][0] is None and len(out["prompt_logprobs"]) == 5
    assert all(len(e["top"]) == 1 and e["logprob"] <= e["top"][0][1] + 1e-6
               for e in out["prompt_logprobs"][1:])
    assert [e["token_id"] for e in out["logprobs"]] == out["token_ids"]
    assert all(len(e["top"]) == 2 and e["top"][0][0] == e["token_id"] and e["logprob"] < 0
               for e in out["logprobs"])  # greedy: each token is its step's most likely
    assert out["finish_reason"] == "length" and len(out["token_ids"]) == 6
    assert out["prompt_tokens"] == 5 and out["ttft_s"] > 0 and "Paris" in out["text"]
    # f32 SmolLM2-135M: 134.5M parameters x 4 bytes held on the device.
    assert 500e6 < out["weight_bytes"] < 560e6 and out["kv_cache_bytes"] > 0


@pytest.mark.slow
def test_structured_output_and_stop_flags(smollm2_checkpoint):
    """--guided_choice constrains the answer (streamed, the default text mode), and
    --ignore_eos decodes max_new_tokens past the chat reply's end (its chat markers shown
    with --noskip_special_tokens)."""
    r = run("--chat", "--prompt", "Is Paris in France? Answer yes or no.", "--temperature",
            "0", "--guided_choice", "yes,no", "--max_new_tokens", "8")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() in ("yes", "no") and "finish=stop" in r.stderr
    r = run("--chat", "--prompt", "Say hi.", "--temperature", "0", "--ignore_eos",
            "--max_new_tokens", "40", "--output_format", "json", "--noskip_special_tokens")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(out["token_ids"]) == 40 and out["finish_reason"] == "length"
    assert 2 in out["token_ids"][:-1]  # <|im_end|>, decoded past and shown
    assert "<|im_end|>" in out["text"]


@pytest.mark.parametrize("args,needle", [
    (["--prompt", ""], "prompt"),
    (["--prompt", "hi", "--max_new_tokens", "0"], "max_new_tokens"),
    (["--prompt", "hi", "--max_new_tokens", "-3"], "positive integer, got -3"),
    (["--prompt", "hi", "--temperature", "abc"], "--temperature=abc"),
    (["--prompt", "hi", "--no_such_flag", "1"], "no_such_flag"),
    (["--prompt", "hi", "--chat", "--chat_template", "/nonexistent.jinja"],
     "chat template file not found: /nonexistent.jinja"),
    (["--prompt", "hi", "--chat", "--chat_template", "{% for m in messages %}"],
     "does not parse"),
    (["--prompt", "hi", "--temperature", "-1"], "temperature"),
    (["--prompt", "hi", "--top_p", "0"], "top_p"),
    (["--prompt", "hi", "--top_p", "1.5"], "top_p"),
    (["--prompt", "hi", "--top_k", "-3"], "top_k"),
    (["--prompt", "hi", "--max_new_tokens", "9000"], "9000"),
    (["--prompt", "hi", "--checkpoint", "/nonexistent/ckpt"], "/nonexistent/ckpt"),
    (["--prompt", "hi", "--logprobs", "2"], "--logprobs=2"),
    (["--prompt", "hi", "--prompt_logprobs", "2"], "--prompt_logprobs=2"),
    (["--prompt", "hi", "--logprobs", "21", "--output_format", "json"], "logprobs"),
    (["--prompt", "hi", "--guided_regex", "(oops"], "unclosed group"),
    (["--prompt", "hi", "--guided_json", "{nope"], "--guided_json"),
    (["--prompt", "hi", "--guided_regex", "a", "--guided_choice", "b"], "one structured"),
    (["--prompt", "hi", "--stop_token_ids", "x"], "--stop_token_ids"),
    (["--prompt", "hi", "--min_tokens", "99", "--max_new_tokens", "8"], "min_tokens=99"),
])
def test_bad_input_gives_one_error_line(smollm2_checkpoint, args, needle):
    r = run(*args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert "Traceback" not in r.stderr
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error:") and needle in lines[0], r.stderr


def test_non_orbax_checkpoint_dir(tmp_path):
    (tmp_path / "junk.txt").write_text("not a checkpoint")
    r = run("--prompt", "hi", "--checkpoint", str(tmp_path))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and str(tmp_path) in lines[0]
    assert str(tmp_path) in r.stderr


@pytest.mark.slow
def test_ctrl_c_keeps_the_text_and_exits_130(smollm2_checkpoint):
    """Ctrl-C while streaming: the text printed so far stays, then one `error:
    interrupted` line and the shell's status for SIGINT (130), no traceback."""
    import signal
    import threading
    import time

    env = dict(os.environ, JAX_PLATFORMS="cpu")
    p = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "generate.py"), "--prompt",
                          "Tell me a long story.", "--max_new_tokens", "2000", "--ignore_eos"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    got = []
    reader = threading.Thread(target=lambda: got.extend(iter(lambda: p.stdout.read(1), b"")))
    reader.start()
    deadline = time.monotonic() + 120
    while len(got) < 20 and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    err = p.stderr.read().decode()
    p.wait(timeout=60)
    reader.join(timeout=10)
    assert p.returncode == 130, err
    assert len(got) >= 20 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == "error: interrupted", err


@pytest.mark.slow
def test_chat_template_flag_replaces_the_models(smollm2_checkpoint, tmp_path):
    """--chat --chat_template FILE renders the prompt with that template instead of the
    model's own: the same tokens and text as the rendered prompt given raw."""
    template = tmp_path / "qa.jinja"
    template.write_text("{% for m in messages %}Question: {{ m['content'] }}\n{% endfor %}"
                        "{% if add_generation_prompt %}Answer:{% endif %}")
    common = ["--temperature", "0", "--max_new_tokens", "8", "--output_format", "json"]
    r = run("--chat", "--chat_template", str(template), "--prompt",
            "What is the capital of France?", *common)
    assert r.returncode == 0, r.stderr
    raw = run("--prompt", "Question: What is the capital of France?\nAnswer:", *common)
    assert raw.returncode == 0, raw.stderr
    got, want = (json.loads(x.stdout.strip().splitlines()[-1]) for x in (r, raw))
    assert got["prompt_tokens"] == want["prompt_tokens"]
    assert got["token_ids"] == want["token_ids"] and got["text"] == want["text"]
    default = json.loads(run("--chat", "--prompt", "What is the capital of France?",
                             *common).stdout.strip().splitlines()[-1])
    assert default["prompt_tokens"] != got["prompt_tokens"]  # the model's own differs


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "scripts").glob("*.py")))
def test_help_exits_zero(script):
    """`--help` is a success (absl's own convention is status 1): it prints the script's
    usage and flags on stdout, loads no model and leaves stderr empty."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / script), "--help"],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    assert "--helpfull" in r.stdout and "error" not in r.stderr.lower(), r.stderr
