"""Make the exercise notebooks (``exercises/``) from the solution notebooks (``solutions/``).

    python -m labkit exercises            # regenerate exercises/ from solutions/
    python -m labkit exercises --check    # exit 1, listing the stale files, when exercises/ is out of date

An exercise notebook in ``solutions/`` is written with its solution, and the solution code is marked
in code cells with nbgrader-style lines; the line that opens a block names the exercise and its task::

    def average_gradients(model):
        \"\"\"Average every parameter's gradient over the ranks, in place.\"\"\"
        ### BEGIN SOLUTION 1a: average every p.grad over the ranks with dist.all_reduce
        world_size = dist.get_world_size()
        for p in model.parameters():
            ...
        ### END SOLUTION

In ``exercises/<same name>.ipynb`` each block, from its BEGIN line to its END line, becomes a stub at
the indentation of the BEGIN line, its message cut into lines of at most STUB_WIDTH characters::

        raise NotImplementedError(
            "Exercise 1a: average every p.grad over the ranks with dist.all_reduce; see the "
            "instructions above")

Rules:

- The text after ``### BEGIN SOLUTION`` is ``<id>: <task>`` (the id has no spaces, e.g. ``1a``); it is
  required, so that the stub tells the student which exercise it is. A long task goes on in ``###``
  comments right below the BEGIN line, at its indentation, the text two or more spaces after the
  ``###`` (with one space, a comment is the solution's own and is not shown)::

        ### BEGIN SOLUTION 6: the warm-up forwards of stage i, then one forward and one backward
        ###     while forwards remain, then the remaining backwards

  (nbgrader finds the same markers, should real grading ever be wanted; it ignores the text after
  them and takes the continued lines for part of the solution.)
- Blocks do not nest; a cell may hold several blocks. Code outside the blocks is kept as it is.
- Markers anywhere else (a markdown cell, a BEGIN without an END...) are errors, not silently kept:
  a solution must never leak into ``exercises/``.
- Cells tagged ``solution-only`` are left out of the exercise notebook (instructor notes, a cell
  that only demonstrates the solution).
- The exercise notebook has no outputs, no execution counts, no execution timings and no widget
  state, and its metadata records where it came from (``metadata.labkit.generated_from``). It keeps
  its solution's Python version (JupyterLab writes the running one into a notebook without it and
  marks the notebook modified as it opens), but a solution re-executed on another Python does not
  make its exercise stale.
- Output is deterministic: the same solution notebook always gives the same bytes.
"""

from __future__ import annotations

import copy
import json
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

import nbformat

__all__ = ["ExerciseFormatError", "make_exercise", "exercise_text", "generate", "check_up_to_date",
           "find_root", "BEGIN", "END", "SOLUTION_ONLY_TAG"]

BEGIN = "### BEGIN SOLUTION"
END = "### END SOLUTION"
SOLUTION_ONLY_TAG = "solution-only"
GENERATED_KEY = "labkit"  # notebook metadata key holding {"generated_from": ..., "note": ...}

_BEGIN_RE = re.compile(r"^(?P<indent>[ \t]*)### BEGIN SOLUTION(?P<rest>.*)$")
_END_RE = re.compile(r"^[ \t]*### END SOLUTION\s*$")
_ANY_MARKER_RE = re.compile(r"### (BEGIN|END) SOLUTION")
_TASK_RE = re.compile(r"^\s+(?P<id>[^\s:]+):\s*(?P<task>\S.*?)\s*$")
_CONTINUED_RE = re.compile(r"^(?P<indent>[ \t]*)###\s{2,}(?P<text>\S.*?)\s*$")   # the task, continued
# Cell metadata written when a notebook is executed (timestamps): never part of an exercise.
_VOLATILE_CELL_METADATA = ("execution", "collapsed", "scrolled")


class ExerciseFormatError(ValueError):
    """A solution notebook's markers are malformed; the message names the notebook and cell."""


@dataclass(frozen=True)
class _Where:
    notebook: str
    cell: int  # 0-based index in the solution notebook

    def __str__(self) -> str:
        return f"{self.notebook}, cell {self.cell}"


STUB_WIDTH = 92   # characters: a stub's line fits in a notebook cell on a laptop's screen


def _literal(text: str) -> str:
    return f'"{text}"' if '"' not in text and "\\" not in text else repr(text)


def _stub(indent: str, exercise_id: str, task: str) -> str:
    message = f"Exercise {exercise_id}: {task}; see the instructions above"
    line = f"{indent}raise NotImplementedError({_literal(message)})"
    if len(line) <= STUB_WIDTH:
        return line
    # Longer: the message as adjacent string literals (Python joins them), one per line.
    inner = indent + "    "
    pieces = textwrap.wrap(message, max(20, STUB_WIDTH - len(inner) - 4), drop_whitespace=False,
                           expand_tabs=False, replace_whitespace=False, break_long_words=False,
                           break_on_hyphens=False)
    assert "".join(pieces) == message
    literals = [f"{inner}{_literal(piece)}" for piece in pieces]
    return "\n".join([f"{indent}raise NotImplementedError(", *literals[:-1], literals[-1] + ")"])


def _strip_solutions(source: str, where: _Where) -> tuple[str, list[str]]:
    """Replace every marked block of a code cell's source by its stub. Returns (new source, ids)."""
    out: list[str] = []
    ids: list[str] = []
    open_block: tuple[int, str] | None = None  # (line number, exercise id) of the open BEGIN
    task: tuple[str, str, list[str]] | None = None   # the open block's stub, until its task is read
    for lineno, line in enumerate(source.split("\n"), start=1):
        if task is not None:
            continued = _CONTINUED_RE.match(line)
            if continued and continued.group("indent") == task[0] and not _ANY_MARKER_RE.search(line):
                task[2].append(continued.group("text"))
                continue
            out.append(_stub(task[0], task[1], " ".join(task[2])))
            task = None
        begin = _BEGIN_RE.match(line)
        if begin:
            if open_block is not None:
                raise ExerciseFormatError(
                    f"{where}, line {lineno}: a new {BEGIN!r} before the block opened on line "
                    f"{open_block[0]} was closed with {END!r} (blocks do not nest)")
            named = _TASK_RE.match(begin.group("rest"))
            if not named:
                raise ExerciseFormatError(
                    f"{where}, line {lineno}: write the exercise after the marker, as "
                    f"'{BEGIN} <id>: <task>' (e.g. '{BEGIN} 1a: average the gradients'), "
                    f"not {line.strip()!r}")
            open_block = (lineno, named.group("id"))
            ids.append(named.group("id"))
            task = (begin.group("indent"), named.group("id"), [named.group("task")])
        elif _END_RE.match(line):
            if open_block is None:
                raise ExerciseFormatError(f"{where}, line {lineno}: {END!r} without a {BEGIN!r} before it")
            open_block = None
        elif _ANY_MARKER_RE.search(line):
            raise ExerciseFormatError(f"{where}, line {lineno}: a solution marker must be alone on "
                                      f"its line (apart from the task after BEGIN): {line.strip()!r}")
        elif open_block is None:
            out.append(line)
    if open_block is not None:
        raise ExerciseFormatError(f"{where}: the block opened on line {open_block[0]} "
                                  f"(exercise {open_block[1]}) has no {END!r}")
    return "\n".join(out), ids


def make_exercise(solution: nbformat.NotebookNode, name: str = "<notebook>",
                  generated_from: str | None = None) -> nbformat.NotebookNode:
    """The exercise notebook for a solution notebook (which is left unchanged).

    ``name`` is used in error messages; ``generated_from`` (a path) is recorded in the metadata.
    """
    nb = copy.deepcopy(solution)
    cells = []
    seen_ids: dict[str, _Where] = {}
    for index, cell in enumerate(nb.cells):
        where = _Where(name, index)
        if SOLUTION_ONLY_TAG in cell.get("metadata", {}).get("tags", []):
            continue
        if cell.cell_type == "code":
            cell.source, ids = _strip_solutions(cell.source, where)
            for exercise_id in ids:
                if exercise_id in seen_ids:
                    raise ExerciseFormatError(f"{where}: exercise id {exercise_id!r} is used twice "
                                              f"(first in {seen_ids[exercise_id]})")
                seen_ids[exercise_id] = where
            cell.outputs = []
            cell.execution_count = None
        elif _ANY_MARKER_RE.search(cell.source):
            raise ExerciseFormatError(f"{where}: solution markers are only allowed in code cells "
                                      f"(this is a {cell.cell_type} cell); tag the cell "
                                      f"{SOLUTION_ONLY_TAG!r} to leave it out of the exercise")
        for key in _VOLATILE_CELL_METADATA:
            cell.get("metadata", {}).pop(key, None)
        cells.append(cell)
    nb.cells = cells
    # Notebook metadata that says how the solution was last executed, not what it is. The Python
    # version stays: JupyterLab writes the kernel's into a notebook that lacks it and marks the notebook
    # modified as it opens (_is_current ignores it instead).
    nb.metadata.pop("widgets", None)
    info = {"note": "Generated by `python -m labkit exercises`; do not edit: edit the solution notebook."}
    if generated_from is not None:
        info["generated_from"] = generated_from
    nb.metadata[GENERATED_KEY] = info
    nbformat.validate(nb)
    return nb


def exercise_text(solution_path: Path, root: Path | None = None) -> str:
    """The exact text of the exercise notebook made from ``solution_path``."""
    solution_path = Path(solution_path)
    solution = nbformat.read(solution_path, as_version=4)
    # Recorded as "<folder>/<name>" whatever the absolute path: the bytes must not depend on the machine.
    nb = make_exercise(solution, name=_relative(solution_path, root),
                       generated_from=f"{solution_path.parent.name}/{solution_path.name}")
    return _dumps(nb)


def _dumps(nb: nbformat.NotebookNode) -> str:
    # What nbformat.write writes (sorted keys, indent 1) plus the final newline that Jupyter writes.
    return nbformat.writes(nb, version=4) + "\n"


def _relative(path: Path, root: Path | None) -> str:
    if root is not None:
        try:
            return Path(path).resolve().relative_to(Path(root).resolve()).as_posix()
        except ValueError:
            pass
    return Path(path).as_posix()


def find_root(start: Path | None = None) -> Path:
    """The course's root folder: the current directory (or ``start``) if it has ``solutions/``,
    else the checkout this package was installed from."""
    here = Path.cwd() if start is None else Path(start)
    if (here / "solutions").is_dir():
        return here
    return Path(__file__).resolve().parents[1]


def _dirs(root, solutions_dir, exercises_dir) -> tuple[Path, Path, Path]:
    root = find_root() if root is None else Path(root)
    solutions_dir = root / "solutions" if solutions_dir is None else Path(solutions_dir)
    exercises_dir = root / "exercises" if exercises_dir is None else Path(exercises_dir)
    return root, solutions_dir, exercises_dir


def _solution_notebooks(solutions_dir: Path) -> list[Path]:
    return sorted(p for p in solutions_dir.glob("*.ipynb") if p.is_file())


def _was_generated(path: Path) -> bool:
    try:
        meta = json.loads(path.read_text(encoding="utf-8")).get("metadata", {})
    except (OSError, ValueError):
        return False
    return isinstance(meta.get(GENERATED_KEY), dict) and "generated_from" in meta[GENERATED_KEY]


def _is_current(exercise: Path, text: str) -> bool:
    """Whether the exercise file is ``text``, the Python version its solution last ran on aside (a
    solution re-executed on another Python leaves its exercise as it is)."""
    data = exercise.read_bytes()
    if data == text.encode("utf-8"):
        return True
    try:
        existing, wanted = json.loads(data), json.loads(text)
    except ValueError:
        return False
    for nb in (existing, wanted):
        nb.get("metadata", {}).get("language_info", {}).pop("version", None)
    return existing == wanted


def check_up_to_date(root: Path | str | None = None, solutions_dir: Path | str | None = None,
                     exercises_dir: Path | str | None = None) -> list[str]:
    """What is wrong with ``exercises/``: one line per file, ``"<path> (<problem>)"``; [] when up to date.

    Problems: ``stale`` (differs from what its solution notebook generates), ``missing`` (a solution
    notebook without its exercise), ``extra`` (an exercise notebook without a solution notebook).
    """
    root, solutions_dir, exercises_dir = _dirs(root, solutions_dir, exercises_dir)
    problems = []
    wanted = set()
    for solution in _solution_notebooks(solutions_dir):
        target = exercises_dir / solution.name
        wanted.add(solution.name)
        shown = _relative(target, root)
        if not target.exists():
            problems.append(f"{shown} (missing: {_relative(solution, root)} has no exercise notebook)")
        elif not _is_current(target, exercise_text(solution, root)):
            problems.append(f"{shown} (stale: differs from what {_relative(solution, root)} generates)")
    if exercises_dir.is_dir():
        for extra in sorted(p for p in exercises_dir.glob("*.ipynb") if p.name not in wanted):
            problems.append(f"{_relative(extra, root)} (extra: no {_relative(solutions_dir / extra.name, root)})")
    return problems


def generate(root: Path | str | None = None, solutions_dir: Path | str | None = None,
             exercises_dir: Path | str | None = None, log=print) -> list[str]:
    """Write every exercise notebook that is missing or stale; delete generated notebooks whose
    solution notebook is gone. Returns the lines it logged (one per file changed or kept)."""
    root, solutions_dir, exercises_dir = _dirs(root, solutions_dir, exercises_dir)
    if not solutions_dir.is_dir():
        raise FileNotFoundError(f"no solutions folder at {solutions_dir}")
    exercises_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    wanted = set()
    # Build every text first, so that one malformed notebook changes nothing on disk.
    texts = {s: exercise_text(s, root) for s in _solution_notebooks(solutions_dir)}
    for solution, text in texts.items():
        target = exercises_dir / solution.name
        wanted.add(solution.name)
        data = text.encode("utf-8")
        if target.exists() and _is_current(target, text):
            lines.append(f"up to date: {_relative(target, root)}")
            continue
        lines.append(f"{'updated' if target.exists() else 'created'}: {_relative(target, root)} "
                     f"(from {_relative(solution, root)})")
        target.write_bytes(data)
    for extra in sorted(p for p in exercises_dir.glob("*.ipynb") if p.name not in wanted):
        if _was_generated(extra):
            extra.unlink()
            lines.append(f"removed: {_relative(extra, root)} (its solution notebook is gone)")
        else:
            lines.append(f"left alone: {_relative(extra, root)} (not generated from a solution notebook: "
                         f"move it to {_relative(solutions_dir, root)}/ or delete it)")
    for line in lines:
        log(line)
    return lines
