"""Fixtures shared by test files."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
from course_tool import load_course, missing_site_tools


@pytest.fixture(scope="session")
def site(tmp_path_factory) -> Path:
    """The website built as `course.py site` builds it (every warning an error), into a temporary
    folder, once for the session (tests/test_site.py reads its files, tests/test_browser.py its pages)."""
    if missing_site_tools():
        pytest.skip(f"the website's tools are not installed ({', '.join(missing_site_tools())})")
    out = tmp_path_factory.mktemp("website") / "site"
    start = time.perf_counter()
    result = load_course().build_site(out, sys.executable, capture_output=True, text=True)
    print(f"website built in {time.perf_counter() - start:.1f} s")
    assert result.returncode == 0, f"sphinx failed (warnings are errors):\n{result.stdout}\n{result.stderr}"
    assert "WARNING" not in result.stderr, result.stderr
    return out
