"""Every Colab notebook runs end to end on CPU (nbclient), and is stored without outputs.

Notebooks run with colab/ as their working directory (as in a clone of the repository) and
write only to temporary directories.
"""

import json
import os
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

COLAB = Path(__file__).resolve().parents[1] / "colab"
NOTEBOOKS = sorted(p.name for p in COLAB.glob("*.ipynb"))
CELL_TIMEOUT_S = 300
BUDGET_S = 600  # whole notebook, on a loaded 2-core CI machine (about 1 min when idle)


def test_all_four_notebooks_exist():
    assert set(NOTEBOOKS) >= {"quickstart.ipynb", "sharding_and_tpu.ipynb", "serving.ipynb",
                              "distill_and_quantize.ipynb"}


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_outputs_are_cleared(name):
    nb = json.loads((COLAB / name).read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, name


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_on_cpu(name, smollm2_checkpoint, monkeypatch, tmp_path):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # what a failing notebook leaves goes too
    monkeypatch.delenv("XLA_FLAGS", raising=False)  # the notebook picks its own devices
    nb = nbformat.read(COLAB / name, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(COLAB)}})
    t0 = time.monotonic()
    client.execute(env=dict(os.environ))  # raises CellExecutionError on a failing cell
    assert time.monotonic() - t0 < BUDGET_S
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "error"]
    assert not errors
    assert list(tmp_path.iterdir()) == []  # each notebook deletes its own scratch space
