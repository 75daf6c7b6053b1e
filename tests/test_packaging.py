"""`pip install` of a freshly built wheel gives working console entry points.

Offline and quick: the wheel is built without build isolation and installed without
dependencies into a new virtualenv that borrows this environment's site-packages (for
jax & co.) through a .pth file, so the jaxinfer it imports is the installed copy only.
"""

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ["jaxinfer-generate", "jaxinfer-convert", "jaxinfer-serve", "jaxinfer-batch",
            "jaxinfer-benchmark", "jaxinfer-quantize", "jaxinfer-eval-perplexity",
            "jaxinfer-distill", "jaxinfer-prune"]


def _sh(*args, cwd, timeout=180, env=None):
    r = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True,
                       timeout=timeout, env=env)
    assert r.returncode == 0, (args, r.stdout[-2000:], r.stderr[-2000:])
    return r


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pkg")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "jaxinfer", src / "jaxinfer",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    _sh(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
        "-w", tmp / "dist", src, cwd=tmp)
    (wheel,) = (tmp / "dist").glob("jaxinfer-*.whl")
    venv = tmp / "venv"
    _sh(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp)
    py = venv / "bin" / "python"
    site = _sh(py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
               cwd=tmp).stdout.strip()
    Path(site, "_deps_from_dev_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _sh(sys.executable, "-m", "pip", "--python", py, "install", "-q", "--no-deps",
        "--no-index", wheel, cwd=tmp)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["JAX_PLATFORMS"] = "cpu"
    return {"tmp": tmp, "venv": venv, "py": py, "wheel": wheel, "env": env}


def test_wheel_carries_presets_and_cli(installed):
    names = zipfile.ZipFile(installed["wheel"]).namelist()
    assert "jaxinfer/configs/models/smollm2-135m.json" in names
    assert "jaxinfer/configs/run/tpu-v5e-8.json" in names
    assert "jaxinfer/cli/generate.py" in names
    assert "jaxinfer/data/botchan_ch1.txt" in names  # eval_perplexity's default text
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(installed["wheel"]).read(entry_points).decode()
    for cmd in COMMANDS:
        assert cmd in text


def test_installed_copy_is_the_one_imported(installed):
    r = _sh(installed["py"], "-c", "import jaxinfer, jaxinfer.presets as p; "
            "print(jaxinfer.__file__); print(len(p.list_models()), len(p.list_runs()))",
            cwd=installed["tmp"], env=installed["env"])
    where, counts = r.stdout.split()[0], r.stdout.split()[1:]
    assert where.startswith(str(installed["venv"])), where
    assert int(counts[0]) >= 10 and int(counts[1]) >= 1


@pytest.mark.parametrize("cmd", COMMANDS)
def test_console_scripts_show_help(installed, cmd):
    r = subprocess.run([installed["venv"] / "bin" / cmd, "--help"], cwd=installed["tmp"],
                       env=installed["env"], capture_output=True, text=True, timeout=120)
    assert r.returncode in (0, 1), r.stderr  # absl exits 1 after --help
    assert "Traceback" not in r.stderr and "Try --helpfull" in r.stdout
    if cmd not in ("jaxinfer-convert", "jaxinfer-quantize"):
        assert "--config" in r.stdout and "--mesh" in r.stdout
    if cmd in ("jaxinfer-generate", "jaxinfer-serve", "jaxinfer-batch"):  # shared modules
        assert "--num_speculative_tokens" in r.stdout and "--chat_template" in r.stdout
    if cmd in ("jaxinfer-serve", "jaxinfer-batch"):
        assert "--num_slots" in r.stdout and "--memory_fraction" in r.stdout


@pytest.mark.slow
def test_installed_generate_on_the_default_model(installed, smollm2_checkpoint):
    r = _sh(installed["venv"] / "bin" / "jaxinfer-generate", "--config", "cpu", "--prompt",
            "The capital of France is", "--temperature", "0", "--max_new_tokens", "4",
            cwd=installed["tmp"], env=installed["env"], timeout=300)
    assert "Paris" in r.stdout


def test_installed_script_error_convention(installed):
    r = subprocess.run([installed["venv"] / "bin" / "jaxinfer-batch", "--input",
                        installed["tmp"] / "missing.jsonl", "--output",
                        installed["tmp"] / "out.jsonl"],
                       cwd=installed["tmp"], env=installed["env"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error:")
    assert "missing.jsonl" in r.stderr


def test_constraints_pin_every_declared_dependency_within_its_range():
    """`make setup` installs with `-c constraints.txt`: every dependency pyproject.toml
    declares (core, dev, peers) must be pinned there, to a version its range allows, and
    the environment running this test must hold exactly those pins."""
    import tomllib
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"not an exact pin: {line!r}"
            pins[canonicalize_name(name)] = version
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    declared = [Requirement(r) for r in
                project["dependencies"] + extras["dev"] + extras["peers"]]
    for req in declared:
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is declared but not pinned in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), (req, pins[name])
        installed = metadata.version(req.name).split("+")[0]
        assert installed == pins[name], (req.name, installed, pins[name])
