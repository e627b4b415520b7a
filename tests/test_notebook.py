"""``notebooks/quickstart.ipynb``: saved clean, and runs end to end in a fresh kernel.

The notebook is executed with ``nbclient`` in a kernel of *this* interpreter (a ``python3``
kernelspec installed into a temporary prefix and put first on ``JUPYTER_PATH``), with a temporary
working directory, so nothing is written into the repository. It takes about 35 s on 2 CPU cores
(most of it loading SmolLM2 for the generative perplexity).
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"
METHODS = ["base (N=1)", "SR-SMC (N=4)", "reward SMC (N=4)"]
PREFIX_MARK = "KERNEL_SYS_PREFIX="


def _outputs(cell, output_type=None):
    return [o for o in cell.get("outputs", []) if output_type in (None, o["output_type"])]


def _stdout(cell) -> str:
    return "".join(o["text"] for o in _outputs(cell, "stream") if o["name"] == "stdout")


def test_notebook_is_saved_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, "the notebook has no code cell"
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]


@pytest.fixture
def kernel_env(tmp_path, monkeypatch):
    """A ``python3`` kernelspec that launches this interpreter, found first; a tmp cwd."""
    from ipykernel.kernelspec import install

    prefix = tmp_path / "jupyter-prefix"
    install(kernel_name="python3", prefix=str(prefix))  # argv[0] = sys.executable
    monkeypatch.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel picks the inline backend
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "2"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    workdir = tmp_path / "run"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    return workdir


@pytest.mark.timeout(300)
def test_quickstart_notebook_runs(kernel_env):
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    # an extra last cell (in memory only) reports which Python the kernel ran on
    nb.cells.append(nbformat.v4.new_code_cell(f"import sys; print({PREFIX_MARK!r} + sys.prefix)"))
    client = NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(kernel_env)}}
    )
    client.execute()  # raises CellExecutionError on the first failing cell

    code = [c for c in nb.cells if c.cell_type == "code"]
    assert not [o for c in code for o in _outputs(c, "error")]
    assert all(c.execution_count is not None for c in code)

    # the kernel was this interpreter (the venv), not some other python3 on the machine
    prefix_lines = [ln for ln in _stdout(code[-1]).splitlines() if ln.startswith(PREFIX_MARK)]
    assert prefix_lines == [PREFIX_MARK + sys.prefix]

    # decoded samples of every method for every prompt
    samples = next(_stdout(c) for c in code if "--- prompt 0" in _stdout(c))
    assert samples.count("--- prompt ") == 4
    for method in METHODS:
        assert samples.count(method) == 4

    # the metrics table: one row per method with finite numbers in range
    table = next(_stdout(c) for c in code if "| method |" in _stdout(c))
    rows = {
        cells[0]: [float(v) for v in cells[1:]]
        for line in table.splitlines()
        if line.startswith("| ") and not line.startswith("| method")
        for cells in [[v.strip() for v in line.strip("|").split("|")]]
    }
    assert list(rows) == METHODS
    for method, (ppl, entropy, vader, mean_ess, seconds) in rows.items():
        assert all(math.isfinite(v) for v in (ppl, entropy, vader, mean_ess, seconds)), method
        assert ppl > 1 and entropy > 0 and -1 <= vader <= 1 and 1 <= mean_ess <= 4, method
    assert rows["base (N=1)"][3] == 1.0

    # figures: the ESS traces and the genealogy, as inline PNGs
    pngs = [o for c in code for o in _outputs(c, "display_data") if "image/png" in o["data"]]
    assert len(pngs) >= 2
    assert "final weights:" in _stdout(code[-2])
