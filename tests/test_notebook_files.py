"""What is stored in the notebooks, so that JupyterLab opens them unmodified and shows every figure
before anything runs (issue: saving rewrote the kernel's display name and the widgets' state, and
untrusted widgets showed as a line of text)."""

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p.relative_to(ROOT) for folder in ("notebooks", "solutions", "exercises")
                   for p in (ROOT / folder).glob("*.ipynb"))
WIDGET = "application/vnd.jupyter.widget-view+json"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=str)
def test_stored_as_jupyterlab_saves_it_and_every_widget_with_its_figure(path):
    nb = json.loads((ROOT / path).read_text())
    assert nb["metadata"]["kernelspec"] == {"display_name": "Python 3 (ipykernel)", "language": "python",
                                            "name": "python3"}
    assert "widgets" not in nb["metadata"], (
        "stored widget state (JupyterLab rewrites it on saving): execute with "
        "--ExecutePreprocessor.store_widget_state=False and remove metadata.widgets")
    for i, cell in enumerate(nb["cells"]):
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if WIDGET in data:
                assert "image/png" in data, (f"cell {i}: a widget without a static figure; build it with "
                                             f"labkit.widgets.FigureExplorer")


LINE = 120     # characters: a line of a cell fits a laptop's screen in JupyterLab without wrapping


@pytest.mark.parametrize("path", NOTEBOOKS, ids=str)
def test_every_code_line_fits_in_the_cell(path):
    nb = json.loads((ROOT / path).read_text())
    long = [(i, len(line), line.strip()[:60]) for i, cell in enumerate(nb["cells"]) if cell["cell_type"] == "code"
            for line in "".join(cell["source"]).split("\n") if len(line) > LINE]
    assert not long, f"code lines over {LINE} characters (cell, length, start): {long}"
