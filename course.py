#!/usr/bin/env python3
"""The course's two commands. Each one sets up what it needs first.

    python3 course.py lab     # open the course in JupyterLab
    python3 course.py test    # run every test: pytest (unit, multi-process) and nbval (notebooks)

Set-up (first run, and again whenever the pinned versions change): a virtual environment in
``.venv`` with the tested versions from ``requirements/constraints.txt``, labkit installed in
editable mode, and the tests' reference implementations from ``requirements/references.txt``.
Only the Python standard library is used here, so this runs on a bare Python >= 3.10.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
CONSTRAINTS = ROOT / "requirements" / "constraints.txt"
REFERENCES = ROOT / "requirements" / "references.txt"   # test-only, installed without dependencies
STAMP = VENV / ".labkit-installed"

# What `test` runs. .ci/run calls `python3 course.py test`, so CI runs exactly this.
PYTEST_ARGS = [
    "tests", "notebooks", "solutions",
    "--nbval", "--nbval-current-env", "--nbval-sanitize-with", ".nbval_sanitize.cfg",
    "--nbval-cell-timeout", "300",
    "--durations", "15",
    # Three workers on two cores: most of the suite waits (process start-up, rendezvous, kernels).
    # One file per worker at a time: a notebook's cells share one kernel.
    "-n", "3", "--dist", "loadfile",
]


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


def main(argv: list[str]) -> int:
    if len(argv) < 1 or argv[0] not in ("lab", "test", "setup"):
        print(__doc__)
        return 2
    python = setup()
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    if argv[0] == "lab":
        return subprocess.call([str(python), "-m", "jupyter", "lab", *argv[1:]], cwd=ROOT, env=env)
    if argv[0] == "test":
        return subprocess.call([str(python), "-m", "pytest", *PYTEST_ARGS, *argv[1:]], cwd=ROOT, env=env)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
