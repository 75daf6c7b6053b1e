"""The one error convention every script shares: bad input -> `error: ...`, exit status 2
(Ctrl-C: `error: interrupted`, status 130, the shell's for SIGINT).

Users get a single line naming the bad value instead of a traceback; real bugs (any other
exception) still show their traceback.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from typing import Any

from absl import app, flags

from jaxinfer.errors import JaxinferError


def run_main(main: Callable[[list[str]], Any]) -> None:
    """`absl.app.run(main)`, turning a JaxinferError into one `error:` line and exit 2."""

    def guarded(argv: list[str]) -> Any:
        try:
            return main(argv)
        except JaxinferError as e:
            _exit_with_error(" ".join(str(e).split()) or type(e).__name__)
        except KeyboardInterrupt:  # Ctrl-C: what was printed or written stays; no traceback
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
