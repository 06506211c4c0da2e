"""course.py (a script, not a package module) loaded for the tests: its set-up, site and lab functions."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SITE_TOOLS = ("sphinx", "myst_nb", "sphinx_book_theme", "sphinx-mathjax-offline")   # the `site` extra


def load_course():
    spec = importlib.util.spec_from_file_location("course", ROOT / "course.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def missing_site_tools() -> list[str]:
    return [name for name in SITE_TOOLS if importlib.util.find_spec(name) is None]
