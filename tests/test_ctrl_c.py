"""Ctrl-C in a jaxinfer program (cli_util): `error: interrupted` and status 130 wherever
the press lands, including the places where CPython would drop the KeyboardInterrupt.

Each case is a tiny program run as a subprocess that sends itself SIGINT at a chosen point,
so where the signal lands is deterministic (no sleeps racing a real model).
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_program(tmp_path: Path, body: str, *, modules: dict[str, str] | None = None):
    for name, text in (modules or {}).items():
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(text))
    prog = tmp_path / "prog.py"
    prog.write_text(textwrap.dedent(body))
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{tmp_path}", JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, str(prog)], capture_output=True, text=True,
                          timeout=120, env=env, cwd=tmp_path)


def assert_interrupted(r):
    assert r.returncode == 130, (r.returncode, r.stdout, r.stderr)
    assert r.stderr.strip().splitlines()[-1] == "error: interrupted", r.stderr
    assert "Traceback" not in r.stderr and "Exception ignored" not in r.stderr, r.stderr
    assert "main went on" not in r.stdout


def test_press_inside_a_gc_callback_is_not_lost(tmp_path):
    """JAX's gc callback (jax-ml/jax#18246) made Python print `Exception ignored` and drop
    the KeyboardInterrupt: generate.py then streamed to the end and exited 0. Here the press
    lands inside a gc callback, and the program still stops with 130."""
    r = run_program(tmp_path, """
        import gc, os, signal, time
        from jaxinfer.cli_util import run_main

        def callback(phase, info):
            if phase == "start":
                os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the callback runs
                sum(range(1000))  # Python checks for signals in here

        def main(argv):
            gc.callbacks.append(callback)
            gc.collect()
            gc.callbacks.remove(callback)
            time.sleep(20)
            print("main went on")

        run_main(main)
    """)
    assert_interrupted(r)


def test_press_during_an_import_lets_it_finish(tmp_path):
    """A press inside an import is acted on once the import is done: an exception there
    leaves the module half made (inside an extension's import it crashed: SIGSEGV)."""
    r = run_program(tmp_path, """
        import time
        from jaxinfer.cli_util import run_main

        def main(argv):
            import slow_module
            print("imported", slow_module.DONE, flush=True)
            time.sleep(20)
            print("main went on")

        run_main(main)
    """, modules={"slow_module": """
        import os, signal
        os.kill(os.getpid(), signal.SIGINT)
        total = sum(range(100000))  # Python checks for signals in here
        DONE = True
    """})
    assert_interrupted(r)
    assert "imported True" in r.stdout


def test_press_before_main_stops_before_it(tmp_path):
    """During the program's own imports (cli/launch.py takes Ctrl-C before them) the press
    is noted, and the program stops as main would start: no traceback, nothing run."""
    r = run_program(tmp_path, """
        import os, signal
        from jaxinfer.cli_util import catch_ctrl_c, run_main
        catch_ctrl_c()
        os.kill(os.getpid(), signal.SIGINT)
        import json  # more imports
        sum(range(100000))

        def main(argv):
            print("main went on")

        run_main(main)
    """)
    assert_interrupted(r)


def test_interrupt_turned_into_another_exception_still_exits_130(tmp_path):
    """A KeyboardInterrupt that reaches main as some other exception (JAX has raised one as
    a ValueError from C++, jax-ml/jax#9082) is still an interrupt, not a traceback."""
    r = run_program(tmp_path, """
        import os, signal
        from jaxinfer.cli_util import run_main

        def main(argv):
            try:
                os.kill(os.getpid(), signal.SIGINT)
                sum(range(100000))
            except KeyboardInterrupt as e:
                raise ValueError("while hashing: KeyboardInterrupt") from e
            print("main went on")

        run_main(main)
    """)
    assert_interrupted(r)


def test_second_press_exits_at_once(tmp_path):
    """A second press while the first one unwinds (a slow cleanup) exits at once."""
    r = run_program(tmp_path, """
        import os, signal, time
        from jaxinfer.cli_util import run_main

        def main(argv):
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(20)
            finally:
                os.kill(os.getpid(), signal.SIGINT)  # pressed again during the cleanup
                time.sleep(20)
                print("main went on")

        run_main(main)
    """)
    assert_interrupted(r)


def test_scripts_and_entry_points_take_ctrl_c_before_their_imports():
    """Every program starts through cli/launch.py, which installs the handler before JAX is
    imported: scripts/*.py and the console entry points in pyproject.toml."""
    import tomllib

    from jaxinfer.cli import launch

    entry = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert all(v.startswith("jaxinfer.cli.launch:") for v in entry.values()), entry
    for target in entry.values():
        assert callable(getattr(launch, target.split(":")[1]))
    for script in (ROOT / "scripts").glob("*.py"):
        assert "from jaxinfer.cli.launch import launch" in script.read_text(), script
