"""The pip install (course.py + requirements/constraints.txt) and the conda environment.yml must
install the same packages at the same versions, and pyproject.toml must name them all."""

import re
from pathlib import Path

import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _constraints(python="3.11"):
    """{package: version} that pip would apply on the given Python version."""
    pins = {}
    for line in (ROOT / "requirements" / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        spec, _, marker = line.partition(";")
        if marker:
            op, version = re.fullmatch(r'\s*python_version\s*([<>=]+)\s*"([\d.]+)"\s*', marker).groups()
            ok = {"<": python < version, ">=": python >= version}[op]
            if not ok:
                continue
        name, version = spec.strip().split("==")
        pins[_norm(name)] = version
    return pins


def _environment_pins():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    pins = {}
    for item in pip_section:
        if item.startswith("-"):
            continue
        name, version = item.split("==")
        pins[_norm(name)] = version
    return env, pip_section, pins


def _pyproject_names():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(meta["dependencies"])
    for extra in meta["optional-dependencies"].values():
        reqs += extra
    return {_norm(re.split(r"[<>=!~\[; ]", r)[0]) for r in reqs}


def test_environment_yml_pins_equal_the_constraints():
    _, _, pins = _environment_pins()
    constraints = _constraints("3.11")
    wrong = {n: (v, constraints.get(n)) for n, v in pins.items() if constraints.get(n) != v}
    assert not wrong, f"environment.yml version != constraints.txt version: {wrong}"


def test_environment_yml_names_every_direct_dependency():
    _, _, pins = _environment_pins()
    assert set(pins) == _pyproject_names()


def test_environment_yml_installs_labkit_with_the_same_constraints():
    env, pip_section, _ = _environment_pins()
    assert "-e ." in pip_section and "-c requirements/constraints.txt" in pip_section
    assert "python=3.11" in env["dependencies"]


def test_every_direct_dependency_is_pinned_for_both_python_versions():
    for python in ("3.10", "3.11"):
        pins = _constraints(python)
        missing = _pyproject_names() - set(pins)
        assert not missing, f"not pinned for Python {python}: {missing}"
    assert _constraints("3.11")["torch"] == "2.13.0"


def test_the_test_files_handed_out_first_exist():
    """conftest.py puts the longest test files first so that the suite's workers finish together; a
    file renamed without this list would silently go back to the end of the queue."""
    import ast
    tree = ast.parse((ROOT / "conftest.py").read_text())
    longest = next(ast.literal_eval(node.value) for node in tree.body
                   if isinstance(node, ast.Assign) and node.targets[0].id == "LONGEST_FILES")
    assert longest and all((ROOT / path).is_file() for path in longest), longest
