"""labkit.ecosystem: every tool sits on lessons that exist and names labkit modules or files that exist; the map
draws one row per tool."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from labkit.ecosystem import LESSONS, TOOLS  # noqa: E402
from labkit.ecosystem_figures import ecosystem_figure  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _exists(name: str) -> bool:
    return any(p.exists() for p in (ROOT / "labkit" / f"{name}.py", ROOT / "labkit" / name, ROOT / name))


def test_every_tool_points_at_lessons_and_code_that_exist():
    for tool in TOOLS:
        assert tool.lessons and set(tool.lessons) <= set(LESSONS), tool.name
        assert all(_exists(name) for name in tool.labkit.split(", ")), tool


def test_the_map_has_a_row_per_tool():
    fig = ecosystem_figure()
    assert len(fig.axes[0].collections) == len(TOOLS)
    assert sum(len(c.get_offsets()) for c in fig.axes[0].collections) == sum(len(t.lessons) for t in TOOLS)
    plt.close(fig)
