"""The one error convention every script shares: bad input -> `error: ...`, exit status 2
(Ctrl-C: `error: interrupted`, status 130, the shell's for SIGINT).

Users get a single line naming the bad value instead of a traceback; real bugs (any other
exception) still show their traceback.

Ctrl-C needs its own handler: Python raises KeyboardInterrupt in whatever Python code runs
next, and when that is a garbage-collector callback (JAX registers one, jax-ml/jax#18246)
or a finalizer, CPython prints "Exception ignored" and drops it, so the program ran on to
the end. The handler delivers the signal again once such code has returned; during the
imports it only notes the press (an exception inside an extension module's import can
crash it), which run_main then acts on; a second press exits at once.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

from absl import app, flags

from jaxinfer.errors import JaxinferError

_ctrl_c = {"phase": "start"}  # start -> (pressed) -> main -> interrupted


def catch_ctrl_c() -> None:
    """Handle SIGINT the jaxinfer way from now on (see the module docstring); programs call
    it before their heavy imports (cli/launch.py), run_main again in case they did not."""
    if signal.getsignal(signal.SIGINT) is not _on_sigint:
        signal.signal(signal.SIGINT, _on_sigint)


def ctrl_c_was_the_stop() -> None:
    """For a program that Ctrl-C ends in order (the server): exit as if it ended itself."""
    if _ctrl_c["phase"] == "interrupted":
        _ctrl_c["phase"] = "main"


def _on_sigint(signum: int, frame: Any) -> None:
    phase = _ctrl_c["phase"]
    if phase in ("start", "pressed"):  # the program's imports: acted on when main starts
        _ctrl_c["phase"] = "pressed"
    elif phase == "interrupted":  # a second press while the first unwinds: stop now
        _exit_with_error("interrupted", status=130)
    elif _not_now(frame):  # deliver it again shortly, once this code has returned
        threading.Timer(0.02, os.kill, (os.getpid(), signal.SIGINT)).start()
    else:
        _ctrl_c["phase"] = "interrupted"
        raise KeyboardInterrupt


def _not_now(frame: Any) -> bool:
    """Whether `frame` runs inside a gc callback or a __del__, whose exceptions CPython
    prints and drops, or inside an import, which an exception would leave half done (and
    an extension module's, crashed: seen here as SIGSEGV)."""
    callbacks = {getattr(cb, "__code__", None) for cb in gc.callbacks}
    while frame is not None:
        code = frame.f_code
        if (code in callbacks or code.co_name == "__del__"
                or code.co_filename.startswith("<frozen importlib")):
            return True
        frame = frame.f_back
    return False


def run_main(main: Callable[[list[str]], Any]) -> None:
    """`absl.app.run(main)`, turning a JaxinferError into one `error:` line and exit 2, and
    Ctrl-C into `error: interrupted` and exit 130 (whatever exception it became on its
    way: JAX has turned one into a ValueError raised from C++, jax-ml/jax#9082)."""
    catch_ctrl_c()

    def guarded(argv: list[str]) -> Any:
        if _ctrl_c["phase"] == "pressed":
            _exit_with_error("interrupted", status=130)
        _ctrl_c["phase"] = "main"
        try:
            result = main(argv)
        except JaxinferError as e:
            if _ctrl_c["phase"] != "interrupted":
                _exit_with_error(" ".join(str(e).split()) or type(e).__name__)
        except KeyboardInterrupt:  # Ctrl-C: what was printed or written stays; no traceback
            pass
        except BaseException:
            if _ctrl_c["phase"] != "interrupted":
                raise
        else:
            if _ctrl_c["phase"] != "interrupted":
                return result
        _exit_with_error("interrupted", status=130)

    app.run(guarded, flags_parser=_parse_flags)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's parse, but a bad flag (unknown, or a value of the wrong type) is the same
    one `error:` line and exit 2 as any other bad input, not absl's FATAL and exit 1; and
    `--help` (absl exits 1 after printing it, the only exit its parse makes) succeeds."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        _exit_with_error(" ".join(str(e).split()))
    except SystemExit as e:
        raise SystemExit(0 if e.code == 1 else e.code) from None


def _exit_with_error(msg: str, status: int = 2) -> None:
    """Write `error: msg` as stderr's last line and exit 2 at once, whatever other threads
    are still printing (checkpoint.py drops Orbax writer threads' own reports of a failed
    write; this guards the line against any other thread): stderr's descriptor goes to
    /dev/null before the line is written to a copy of it, a live thread's half line is
    ended first, and os._exit skips the shutdown. Cleanup already ran in `finally` blocks."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    line = f"error: {msg}\n"
    if threading.active_count() > 1:  # another thread may have left its line unfinished
        line = "\n" + line
    err = os.dup(2)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
    os.write(err, line.encode())
    os._exit(status)
