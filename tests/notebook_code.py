"""The code cells of a notebook, read with json: the checker tests' modules are imported again by every
worker a test launches (their functions travel by reference), and nbformat takes over a second to import
(its JSON-schema validator builds a grammar), paid by each worker of each launch."""

from __future__ import annotations

import json
from pathlib import Path


def code_cells(path: Path) -> list[str]:
    """The sources of the notebook's code cells, in order."""
    cells = json.loads(Path(path).read_text(encoding="utf-8"))["cells"]
    return ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]


def imports_without_pyplot(source: str) -> str:
    """A solution's import cell without ``import matplotlib.pyplot``: the functions under test draw
    nothing, and pyplot costs each worker of each launch another 0.4 s."""
    kept = [line for line in source.split("\n") if not line.startswith("import matplotlib.pyplot")]
    return "\n".join(kept)
