"""The course as a student uses it: JupyterLab in a real browser (Playwright driving Chromium).

Skipped when Playwright or a Chromium is missing (``.ci/run`` installs Debian's chromium; Playwright
never downloads a browser here). The notebooks are copied to a temporary folder first: JupyterLab
saves what it opens, and the tests must not touch the tracked files. Screenshots of a failure go to
``runs/browser/``.
"""

from __future__ import annotations

import base64
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "runs" / "browser"



def _course():
    spec = importlib.util.spec_from_file_location("course", ROOT / "course.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CHROMIUM = _course().chromium()
pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("playwright") is None, reason="playwright is not installed"),
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (apt-get install chromium)"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """JupyterLab as `course.py lab` starts it, serving a copy of the notebooks; yields its base URL."""
    root = tmp_path_factory.mktemp("course")
    for folder in ("notebooks", "exercises", "solutions"):
        shutil.copytree(ROOT / folder, root / folder)
    port, token = _free_port(), "labkit-browser-test"
    env = _course().lab_environment(dict(os.environ, OMP_NUM_THREADS="1"))
    env["JUPYTERLAB_SETTINGS_DIR"] = str(root / ".jupyter" / "user-settings")     # not the repository's
    env["JUPYTERLAB_WORKSPACES_DIR"] = str(root / ".jupyter" / "workspaces")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
         *(["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else [])],
        cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
            break
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                pytest.fail("JupyterLab did not start within 90 s")
            time.sleep(0.5)
    yield {"url": url, "token": token, "root": root}
    server.terminate()
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.kill()


@pytest.fixture
def page(lab, request):
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        page = context.new_page()
        page.set_default_timeout(60_000)
        errors = []
        page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
        page.console_errors = errors
        yield page
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SHOTS / f"{request.node.name}.png"), full_page=True)
        browser.close()


def _open(page, lab, path: str):
    page.goto(f"{lab['url']}/lab/tree/{path}?reset&token={lab['token']}")      # reset: no tabs restored
    page.wait_for_selector(".jp-NotebookPanel:visible .jp-Cell", timeout=90_000)
    # the kernel is up and idle
    page.wait_for_selector(".jp-NotebookPanel:visible .jp-Notebook-ExecutionIndicator[data-status='idle']",
                           timeout=90_000)


def _dirty(page) -> bool:
    return page.locator(".lm-TabBar-tab.jp-mod-current.jp-mod-dirty").count() > 0


def _run_all(page, timeout_s: float = 240):
    """Run > Run All Cells, then wait until every code cell has its execution count (or, the kernel
    idle, one has raised)."""
    page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
    page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
    deadline = time.monotonic() + timeout_s
    while True:
        # text_content, not inner_text: cells scrolled out of view are hidden (content-visibility)
        prompts = page.locator(".jp-NotebookPanel:visible .jp-CodeCell .jp-InputPrompt").all_text_contents()
        if prompts and all(p.strip()[1:-2].strip().isdigit() for p in prompts):
            return
        idle = page.locator(".jp-NotebookPanel:visible .jp-Notebook-ExecutionIndicator[data-status='idle']").count()
        stderr = ".jp-NotebookPanel:visible .jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']"
        if idle and page.locator(stderr).count():
            return     # Run All stops at the first error (an exercise's stub)
        if time.monotonic() > deadline:
            raise AssertionError(f"the cells did not all run within {timeout_s:g} s: {prompts}")
        time.sleep(1)


def _errors(page) -> list[str]:
    """Error outputs and widget failures anywhere in the notebook."""
    texts = page.locator(".jp-NotebookPanel:visible .jp-OutputArea-output").all_text_contents()
    return [t[:300] for t in texts if "Traceback (most recent call last)" in t or "Error displaying widget" in t]


def _image_of_cell(page, text: str):
    """The last image in the output of the code cell whose source contains ``text``."""
    cell = page.locator(".jp-CodeCell", has=page.locator(".jp-InputArea", has_text=text)).first
    cell.scroll_into_view_if_needed()
    return cell, cell.locator(".jp-OutputArea-output img").last


def _png(page, image) -> bytes:
    src = image.get_attribute("src")
    data = page.evaluate("""async (src) => {
        const buffer = await (await fetch(src)).arrayBuffer();
        let s = ''; new Uint8Array(buffer).forEach(b => s += String.fromCharCode(b)); return btoa(s); }""", src)
    return base64.b64decode(data)


def test_a_lesson_opens_with_its_figures_and_unmodified(page, lab):
    _open(page, lab, "notebooks/02_collectives_ring_allreduce.ipynb")
    cell, image = _image_of_cell(page, "ring_stepper(4)")
    image.wait_for(state="visible")
    assert "HBox(children" not in cell.inner_text()
    time.sleep(5)      # what used to mark it modified (kernel info, widget state) arrives in seconds
    assert not _dirty(page), "opening the lesson marked it modified"
    assert page.get_by_text("official Jupyter news").count() == 0, "the news pop-up greets the student"
    path = "notebooks/02_collectives_ring_allreduce.ipynb"
    assert (lab["root"] / path).read_bytes() == (ROOT / path).read_bytes()


def test_ring_stepper_draws_the_step_of_the_new_ring_when_n_changes(page, lab):
    from matplotlib.figure import Figure

    from labkit.ring_figures import ring_step_figure
    from labkit.widgets import png_bytes

    _open(page, lab, "notebooks/02_collectives_ring_allreduce.ipynb")
    start = time.monotonic()
    _run_all(page)
    print(f"lesson 2 ran in {time.monotonic() - start:.0f} s")
    assert _errors(page) == []
    cell, _ = _image_of_cell(page, "ring_stepper(4)")
    slider = cell.locator(".widget-slider .noUi-handle, .widget-slider .slider-handle, .widget-hslider [role=slider]").first
    slider.click()
    for _ in range(3):
        page.keyboard.press("ArrowRight")
    page.wait_for_timeout(1500)
    image = cell.locator(".jupyter-widgets img, .widget-image").last
    assert _png(page, image) == png_bytes(ring_step_figure(4, 3, figure=Figure()))
    cell.locator("select").first.select_option("6")
    page.wait_for_timeout(2000)
    assert _png(page, image) == png_bytes(ring_step_figure(6, 3, figure=Figure()))
    assert "Error displaying widget" not in page.content()
    assert not [e for e in page.console_errors if "widget" in e.lower()], page.console_errors


def test_an_exercise_says_what_is_not_written_and_its_solution_passes(page, lab):
    _open(page, lab, "exercises/01_data_parallel_exercise.ipynb")
    _run_all(page, timeout_s=90)
    outputs = " ".join(page.locator(".jp-NotebookPanel:visible .jp-OutputArea-output").all_text_contents())
    assert "NotImplementedError" in outputs and "Exercise 1a" in outputs, outputs[:2000]
    _open(page, lab, "solutions/01_data_parallel_exercise.ipynb")
    _run_all(page, timeout_s=90)
    assert _errors(page) == []
    outputs = " ".join(page.locator(".jp-NotebookPanel:visible .jp-OutputArea-output").all_text_contents())
    assert outputs.count("✓") >= 3, outputs[:2000]
