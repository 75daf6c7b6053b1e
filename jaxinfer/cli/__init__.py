"""Command-line programs: `jaxinfer-generate`, `jaxinfer-serve`, ... (see pyproject.toml).

Each submodule defines its absl flags on import and a `main(argv)`; `scripts/<name>.py`
and the console entry points both call `run()`. Import one submodule per process: their
flags share the global absl registry.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

from absl import flags

from jaxinfer.cli_util import run_main


def run_program(module_name: str, main: Callable[[list[str]], Any]) -> None:
    """Run `main` under the `error: ...` convention, with `--help` listing this program's
    flags and the shared ones it imported (runtime, speculative decoding, engine, LoRA,
    parsers); absl
    lists only the __main__ module's by default."""
    # JAX logs every accelerator backend it probes and does not find, at INFO.
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    fv = flags.FLAGS
    module = sys.modules[module_name]
    shared = ("jaxinfer.flags", "jaxinfer.cli.spec_flags", "jaxinfer.cli.engine_flags",
              "jaxinfer.cli.lora_flags", "jaxinfer.cli.parser_flags", "jaxinfer.cli.chat_flags")
    for name in (module_name, *(m for m in shared if m in sys.modules)):
        for flag in fv.get_key_flags_for_module(name):
            fv.register_key_flag_for_module(sys.argv[0], flag)
    main_module = sys.modules.get("__main__")
    if main_module is not None:
        main_module.__doc__ = module.__doc__  # the usage text absl prints
    run_main(main)
