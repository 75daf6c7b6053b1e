"""Console entry points and scripts/*.py start here: Ctrl-C is taken over before the
program's imports (JAX's alone take a second or two), then the program is imported and run.
"""

from __future__ import annotations

import importlib

from jaxinfer.cli_util import catch_ctrl_c


def launch(program: str) -> None:
    """Import jaxinfer.cli.<program> and run it, with Ctrl-C handled from the start."""
    catch_ctrl_c()
    importlib.import_module(f"jaxinfer.cli.{program}").run()


def generate() -> None:
    launch("generate")


def convert() -> None:
    launch("convert")


def serve() -> None:
    launch("serve")


def batch() -> None:
    launch("batch")


def benchmark() -> None:
    launch("benchmark")


def distill() -> None:
    launch("distill")


def prune() -> None:
    launch("prune")


def eval_perplexity() -> None:
    launch("eval_perplexity")


def quantize() -> None:
    launch("quantize")
