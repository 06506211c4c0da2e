#!/usr/bin/env python3
"""The course's commands. Each one sets up what it needs first.

    python3 course.py lab     # open the course in JupyterLab
    python3 course.py test    # run every test: pytest (unit, multi-process) and nbval (notebooks)
    python3 course.py test tests/test_ring.py -x   # or pytest with these arguments
    python3 course.py site    # build the course website (offline, nothing executed) into _build/site/

Set-up (first run, and again whenever the pinned versions change): a virtual environment in
``.venv`` with the tested versions from ``requirements/constraints.txt``, labkit installed in
editable mode, and the tests' reference implementations from ``requirements/references.txt``.
`site` also installs the ``site`` extra of pyproject.toml (Sphinx, myst-nb, the theme) into
``.venv``, once for each version of the pins.
Only the Python standard library is used here, so this runs on a bare Python >= 3.10.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
CONSTRAINTS = ROOT / "requirements" / "constraints.txt"
REFERENCES = ROOT / "requirements" / "references.txt"   # test-only, installed without dependencies
STAMP = VENV / ".labkit-installed"

# The website: site/ holds its configuration (conf.py) and its own pages (index.md); the pages it
# shows and everything their links point into are linked from the repository (hard links in
# _build/site-src, made at each build), not copied.
SITE_CONF = ROOT / "site"
SITE_OUT = ROOT / "_build" / "site"
SITE_EXTRA = ("site", "the website's tools (Sphinx, myst-nb)")      # setup_extra's arguments
SITE_LINKED = ("README.md", "notebooks", "exercises", "docs", "labkit", "configs", "requirements")

# What `test` runs. .ci/run calls `python3 course.py test`, so CI runs exactly this: first everything
# but TIMED on WORKERS pytest-xdist processes (one test file or notebook per worker at a time), then
# TIMED alone. Most tests wait for processes they launch, so three workers finish the suite on two
# cores in about two thirds of the time of one; but lessons 3 and 9 time real messages and assert what
# the timings show, and beside other tests lesson 9's assertion failed once in three runs.
NBVAL_ARGS = ["--nbval", "--nbval-current-env", "--nbval-sanitize-with", ".nbval_sanitize.cfg",
              "--nbval-cell-timeout", "300"]
TIMED = ["notebooks/03_ddp_from_scratch.ipynb", "notebooks/09_communication_bottleneck.ipynb"]
WORKERS = 3
PYTEST_ARGS = ["tests", "notebooks", "solutions", *NBVAL_ARGS, "--durations", "15"]


def run_tests(python: Path, args: list[str], env: dict) -> int:
    """`course.py test`: the whole suite as above; with arguments, pytest with those (and nbval's)."""
    pytest = [str(python), "-m", "pytest"]
    if args:
        return subprocess.call([*pytest, *NBVAL_ARGS, *args], cwd=ROOT, env=env)
    deselect = [arg for path in TIMED for arg in ("--deselect", path)]
    first = subprocess.call([*pytest, *PYTEST_ARGS, "-n", str(WORKERS), "--dist", "loadfile",
                             "--no-loadscope-reorder", *deselect],   # conftest.py orders the files
                            cwd=ROOT, env=env)
    print(f"\n+ the lessons that assert timings, alone: {' '.join(TIMED)}", flush=True)
    second = subprocess.call([*pytest, *TIMED, *NBVAL_ARGS, "--durations", "5"], cwd=ROOT, env=env)
    return first or second


def venv_python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def run(cmd: list, **kwargs) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, **kwargs)


def setup() -> Path:
    """Create .venv and install the pinned versions, unless that is already done."""
    if sys.version_info < (3, 10):
        sys.exit(f"Python 3.10 or newer is needed; this is {sys.version.split()[0]}")
    wanted = hashlib.sha256(CONSTRAINTS.read_bytes() + REFERENCES.read_bytes()
                            + (ROOT / "pyproject.toml").read_bytes()).hexdigest()
    python = venv_python()
    if python.exists() and STAMP.exists() and STAMP.read_text().strip() == wanted:
        return python
    if not python.exists():
        print(f"Creating the virtual environment {VENV} ...", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    print("Installing the tested versions (first time: a few minutes) ...", flush=True)
    run([python, "-m", "pip", "install", "--disable-pip-version-check", "-c", CONSTRAINTS,
         "-e", f"{ROOT}[course,test]"], cwd=ROOT)
    run([python, "-m", "pip", "install", "--disable-pip-version-check", "--no-deps", "-r", REFERENCES], cwd=ROOT)
    STAMP.write_text(wanted + "\n")
    return python


# JupyterLab settings that belong to the course: the news pop-up off (the course machine may have no
# internet, and a student should meet the lesson first). Written into the course's own .venv.
LAB_OVERRIDES = {"@jupyterlab/apputils-extension:notification": {"fetchNews": "false", "checkForUpdates": False}}


def lab_environment(env: dict) -> dict:
    """The environment of the course's JupyterLab: its settings and workspaces in ``.jupyter/`` of the
    course (not the student's other projects'), the course's overrides in the .venv."""
    settings = VENV / "share" / "jupyter" / "lab" / "settings"
    settings.mkdir(parents=True, exist_ok=True)
    (settings / "overrides.json").write_text(json.dumps(LAB_OVERRIDES, indent=1) + "\n")
    return dict(env, JUPYTERLAB_SETTINGS_DIR=str(ROOT / ".jupyter" / "lab" / "user-settings"),
                JUPYTERLAB_WORKSPACES_DIR=str(ROOT / ".jupyter" / "lab" / "workspaces"))


def setup_extra(python: Path, extra: str, what: str) -> None:
    """Install an extra of pyproject.toml (``site``: the website's tools; ``browser``: Playwright for
    the browser tests) into .venv, once for each version of the pins."""
    stamp = VENV / f".{extra}-installed"
    wanted = hashlib.sha256(CONSTRAINTS.read_bytes() + (ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if stamp.exists() and stamp.read_text().strip() == wanted:
        return
    print(f"Installing {what} ...", flush=True)
    run([python, "-m", "pip", "install", "--disable-pip-version-check", "-c", CONSTRAINTS,
         "-e", f"{ROOT}[{extra}]"], cwd=ROOT)
    stamp.write_text(wanted + "\n")


def chromium() -> str | None:
    """A Chromium for the browser tests (Debian's package; Playwright never downloads one here)."""
    return os.environ.get("LABKIT_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def _link_tree(source: Path, dest: Path) -> None:
    """`dest` becomes `source`: folders made, files hard-linked (the same file, not a copy), or
    copied where the two are on different file systems."""
    if source.is_dir():
        dest.mkdir()
        for child in source.iterdir():
            if child.name not in ("__pycache__", ".ipynb_checkpoints"):
                _link_tree(child, dest / child.name)
    else:
        try:
            os.link(source, dest)
        except OSError:
            shutil.copy2(source, dest)


def site_sources(folder: Path) -> Path:
    """Lay out the website's sources in `folder`, made anew: site/'s pages (not conf.py) at its top,
    and SITE_LINKED from the repository. Hard links, not symbolic ones: Sphinx resolves symbolic
    links, and a page's relative links would then point out of the source folder."""
    if folder.exists():
        shutil.rmtree(folder)          # removes the links, never the files of the repository
    folder.mkdir(parents=True)
    sources = [ROOT / name for name in SITE_LINKED]
    sources += [p for p in SITE_CONF.iterdir() if p.name not in ("conf.py", "__pycache__")]
    for source in sources:
        _link_tree(source, folder / source.name)
    return folder


def build_site(out: Path = SITE_OUT, python: Path | str = sys.executable, **run_kwargs):
    """Build the website into `out` with `python`'s Sphinx; any warning fails the build (-W).

    The sources are laid out in `out`-src and Sphinx's cache in `out`-doctrees, beside `out`
    (an unchanged page is not read again). Returns the finished subprocess.CompletedProcess;
    `run_kwargs` go to subprocess.run (tests/test_site.py captures the output).
    """
    out = Path(out)
    sources = site_sources(out.with_name(out.name + "-src"))
    cmd = [python, "-m", "sphinx", "-b", "html", "-q", "-W", "-c", SITE_CONF,
           "-d", out.with_name(out.name + "-doctrees"), sources, out]
    print("+", " ".join(str(c) for c in cmd), flush=True)
    return subprocess.run([str(c) for c in cmd], cwd=ROOT, **run_kwargs)


def main(argv: list[str]) -> int:
    if len(argv) < 1 or argv[0] not in ("lab", "test", "site", "setup"):
        print(__doc__)
        return 2
    python = setup()
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    if argv[0] == "lab":
        return subprocess.call([str(python), "-m", "jupyter", "lab", *argv[1:]], cwd=ROOT, env=lab_environment(env))
    if argv[0] == "test":
        # the tests of the website, and of the course in a browser where there is one (.ci/run installs it)
        setup_extra(python, *SITE_EXTRA)
        if chromium():
            setup_extra(python, "browser", "Playwright, for the browser tests")
        return run_tests(python, argv[1:], env)
    if argv[0] == "site":
        setup_extra(python, *SITE_EXTRA)
        status = build_site(SITE_OUT, python).returncode
        if status == 0:
            index = SITE_OUT / "index.html"
            print(f"The course website: {index}  (open {index.as_uri()} in a browser)")
        return status
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
