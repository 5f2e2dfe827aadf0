"""Every Colab tutorial runs top to bottom in quick mode, offline."""

import glob
import json
import os

import pytest

from helpers import SHARED

COLAB = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "colab")
NOTEBOOKS = sorted(glob.glob(os.path.join(COLAB, "*.ipynb")))
DATASETS = os.path.join(SHARED, "datasets")


@pytest.mark.backend_independent
def test_all_four_tutorials_are_there():
    assert [os.path.basename(p) for p in NOTEBOOKS] == [
        "01_quickstart.ipynb", "02_simulation.ipynb", "03_convnets.ipynb", "04_tuning.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
@pytest.mark.backend_independent
def test_notebook_is_stripped_and_documents_quick_mode(path):
    with open(path) as f:
        nb = json.load(f)
    first = "".join(nb["cells"][0]["source"])
    assert "colab.research.google.com/github" in first and "TF_LAYERSPARSE_QUICK" in first
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None


@pytest.mark.tf_only  # the tutorials are written for TensorFlow (TFDS, LiteRT)
@pytest.mark.skipif(not os.path.isdir(DATASETS),
                    reason=f"offline datasets not found at {DATASETS}")
@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs_in_quick_mode_offline(path, monkeypatch, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    # the kernel inherits this environment
    monkeypatch.setenv("TF_LAYERSPARSE_QUICK", "1")
    monkeypatch.setenv("TF_LAYERSPARSE_DATA_DIR", DATASETS)
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the inline backend shows figures
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3",
        resources={"metadata": {"path": COLAB}})
    client.execute()  # raises CellExecutionError on any failing cell
    images = [
        output for cell in nb.cells if cell.cell_type == "code"
        for output in cell.outputs if "image/png" in output.get("data", {})
    ]
    assert images, "every tutorial draws at least one figure"
