"""The one error convention every script shares: bad input -> `error: ...`, exit status 2.

Users get a single line naming the bad value instead of a traceback; real bugs (any other
exception) still show their traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

from absl import app

from jaxinfer.errors import JaxinferError


def run_main(main: Callable[[list[str]], Any]) -> None:
    """`absl.app.run(main)`, turning a JaxinferError into one `error:` line and exit 2."""

    def guarded(argv: list[str]) -> Any:
        try:
            return main(argv)
        except JaxinferError as e:
            msg = " ".join(str(e).split()) or type(e).__name__
            print(f"error: {msg}", file=sys.stderr, flush=True)
            sys.stdout.flush()
            # Not sys.exit: after a failed Orbax write its writer threads still call back
            # into a closed event loop, and their tracebacks, printed at interpreter
            # shutdown, would bury the one line. Cleanup already ran in `finally` blocks.
            os._exit(2)

    app.run(guarded)
