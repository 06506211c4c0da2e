"""exercises/ is generated from solutions/: up to date, made correctly, and failing cleanly on its stubs."""

import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from labkit.__main__ import main
from labkit.exercises import (STUB_WIDTH, ExerciseFormatError, check_up_to_date, exercise_text, generate,
                              make_exercise)

ROOT = Path(__file__).resolve().parents[1]
EXERCISES = sorted((ROOT / "exercises").glob("*.ipynb"))


# --------------------------------------------------------------------------------------------
# The repository's exercises
# --------------------------------------------------------------------------------------------

def test_exercises_are_up_to_date_with_solutions():
    problems = check_up_to_date(ROOT)
    assert not problems, ("exercises/ is out of date with solutions/:\n  " + "\n  ".join(problems) +
                          "\nRegenerate it with:  python -m labkit exercises")


def test_every_solution_has_its_exercise():
    solutions = sorted(p.name for p in (ROOT / "solutions").glob("*.ipynb"))
    assert solutions, "no solution notebooks found"
    assert solutions == [p.name for p in EXERCISES]


def test_cli_check_in_a_fresh_process():
    proc = subprocess.run([sys.executable, "-m", "labkit", "exercises", "--check"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "up to date" in proc.stdout


@pytest.mark.parametrize("path", EXERCISES, ids=[p.name for p in EXERCISES])
def test_exercise_notebook_fails_cleanly_on_its_stubs(path, kernel_manager_class):
    """Run as handed out: the first error is the first exercise's NotImplementedError, and every error
    in the notebook comes from a stub (directly, or inside a worker process), never from anything else."""
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    exercise_ids = [m.group(1) for cell in nb.cells if cell.cell_type == "code"
                    for m in re.finditer(r"raise NotImplementedError\(\s*[\"']Exercise ([^\s:]+):", cell.source)]
    assert exercise_ids, f"{path.name} has no exercise stubs"

    NotebookClient(nb, timeout=300, kernel_name="python3", allow_errors=True, kernel_manager_class=kernel_manager_class,
                   resources={"metadata": {"path": str(ROOT)}}).execute()
    errors = [(i, out) for i, cell in enumerate(nb.cells) if cell.cell_type == "code"
              for out in cell.outputs if out.output_type == "error"]
    assert errors, "the exercise notebook ran without any error: are the stubs really there?"

    first_cell, first = errors[0]
    assert first.ename == "NotImplementedError", (
        f"cell {first_cell} failed with {first.ename}: {first.evalue}, not with an exercise's NotImplementedError")
    assert first.evalue.startswith(f"Exercise {exercise_ids[0]}:"), first.evalue
    for i, out in errors:
        text = out.evalue + "\n".join(out.traceback)
        assert out.ename in ("NotImplementedError", "WorkerError") and "NotImplementedError" in text \
            and "Exercise " in text, f"cell {i} failed with {out.ename}: {out.evalue}"
    named = " ".join(out.evalue + "\n".join(out.traceback) for _, out in errors)
    for exercise_id in exercise_ids:
        assert f"Exercise {exercise_id}:" in named, f"no cell reports exercise {exercise_id} as not done"


# --------------------------------------------------------------------------------------------
# The generator, on small notebooks made here
# --------------------------------------------------------------------------------------------

def _tiny_solution():
    executed = new_code_cell("x = 1\nprint(x)", execution_count=3,
                             outputs=[new_output("stream", name="stdout", text="1\n")])
    executed.metadata["execution"] = {"iopub.execute_input": "2025-01-01T00:00:00Z"}
    notes = new_markdown_cell("Instructor notes: the answer is 42.")
    notes.metadata["tags"] = ["solution-only"]
    demo = new_code_cell("print(answer)")
    demo.metadata["tags"] = ["solution-only", "other"]
    kept_tags = new_code_cell("1 + 1")
    kept_tags.metadata["tags"] = ["nbval-ignore-output"]
    return new_notebook(cells=[
        new_markdown_cell("# Title\n\nWrite `f`."),
        new_code_cell(
            "def f(x):\n"
            "    \"\"\"Docstring stays.\"\"\"\n"
            "    ### BEGIN SOLUTION 2a: double x\n"
            "    y = x * 2\n"
            "    return y\n"
            "    ### END SOLUTION\n"
            "\n"
            "class A:\n"
            "    def g(self):\n"
            "        ### BEGIN SOLUTION 2b: say \"hi\" with a \\ backslash\n"
            "        return 'hi'\n"
            "        ### END SOLUTION\n"
            "\n"
            "### BEGIN SOLUTION 2c: set the answer\n"
            "answer = 42\n"
            "### END SOLUTION\n"
            "print('after')",
            execution_count=7, outputs=[new_output("stream", name="stdout", text="after\n")]),
        notes, demo, executed, kept_tags,
    ], metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                 "language_info": {"name": "python", "version": "3.11.7"}})


def test_a_long_task_becomes_a_stub_that_fits_in_a_cell():
    task = ("the column layer's forward: split the weight by output features, compute your shard, and say "
            "which collective the backward needs and why; write it \"as\" the lecture does")
    solution = new_notebook(cells=[new_code_cell(
        f"class Layer:\n    def forward(self, x):\n        ### BEGIN SOLUTION 5f: {task}\n        return x\n"
        "        ### END SOLUTION\n")])
    source = make_exercise(solution).cells[0].source
    assert max(len(line) for line in source.split("\n")) <= STUB_WIDTH, source
    assert source.count("\n") > 4, source           # cut into several lines
    namespace = {}
    exec(source, namespace)
    with pytest.raises(NotImplementedError) as info:
        namespace["Layer"]().forward(1)
    assert str(info.value) == f"Exercise 5f: {task}; see the instructions above"


def test_a_task_continued_on_comment_lines_is_one_message_and_the_block_is_gone():
    solution = new_notebook(cells=[new_code_cell(
        "def f(x):\n"
        "    ### BEGIN SOLUTION 6: the warm-up forwards, then one forward\n"
        "    ###     and one backward while forwards remain\n"
        "    ###  (then the rest)\n"
        "    ### the solution's own comment (one space after ###), hidden from the student\n"
        "    #   a comment of the solution\n"
        "    ###     after the solution's first line: the solution's\n"
        "    return x\n"
        "    ### END SOLUTION\n"
        "\n"
        "def g(x):\n"
        "    ### BEGIN SOLUTION 7: only one line\n"
        "        ### indented further: the solution's\n"
        "    return x\n"
        "    ### END SOLUTION\n")])
    source = make_exercise(solution).cells[0].source
    assert "###" not in source and "return" not in source, source      # the whole block is gone
    namespace = {}
    exec(source, namespace)
    for name, message in [("f", "Exercise 6: the warm-up forwards, then one forward and one backward while "
                                "forwards remain (then the rest); see the instructions above"),
                          ("g", "Exercise 7: only one line; see the instructions above")]:
        with pytest.raises(NotImplementedError) as info:
            namespace[name](1)
        assert str(info.value) == message


def test_blocks_become_stubs_with_their_indentation():
    solution = _tiny_solution()
    before = nbformat.writes(solution)
    exercise = make_exercise(solution, generated_from="solutions/tiny.ipynb")
    assert nbformat.writes(solution) == before  # the solution notebook is not modified
    assert exercise.cells[1].source == (
        "def f(x):\n"
        "    \"\"\"Docstring stays.\"\"\"\n"
        "    raise NotImplementedError(\"Exercise 2a: double x; see the instructions above\")\n"
        "\n"
        "class A:\n"
        "    def g(self):\n"
        "        raise NotImplementedError(\n"        # longer than STUB_WIDTH on one line
        "            'Exercise 2b: say \"hi\" with a \\\\ backslash; see the instructions above')\n"
        "\n"
        "raise NotImplementedError(\"Exercise 2c: set the answer; see the instructions above\")\n"
        "print('after')")
    # the stubs are valid Python that raises the named exercise
    namespace = {"__name__": "__main__"}   # as in a notebook: its functions and classes travel by value
    exec(exercise.cells[1].source.split("\nraise NotImplementedError(\"Exercise 2c")[0], namespace)
    with pytest.raises(NotImplementedError, match=r"^Exercise 2a: double x; see the instructions above$"):
        namespace["f"](1)
    with pytest.raises(NotImplementedError, match=r'Exercise 2b: say "hi" with a \\ backslash'):
        namespace["A"]().g()


def test_tags_outputs_and_metadata():
    exercise = make_exercise(_tiny_solution(), generated_from="solutions/tiny.ipynb")
    sources = [c.source for c in exercise.cells]
    assert "Instructor notes: the answer is 42." not in sources  # solution-only cells are gone
    assert "print(answer)" not in sources
    assert sources == ["# Title\n\nWrite `f`.", sources[1], "x = 1\nprint(x)", "1 + 1"]
    for cell in exercise.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None
            assert "execution" not in cell.metadata
    assert exercise.cells[3].metadata["tags"] == ["nbval-ignore-output"]  # other tags are kept
    assert exercise.metadata["labkit"]["generated_from"] == "solutions/tiny.ipynb"
    # kept: JupyterLab would write the kernel's version into a notebook without one, marking it modified
    assert exercise.metadata["language_info"]["version"] == "3.11.7"
    assert exercise.metadata["kernelspec"]["name"] == "python3"
    nbformat.validate(exercise)


@pytest.mark.parametrize("source,error", [
    ("### BEGIN SOLUTION 1a: x\nx = 1", "has no '### END SOLUTION'"),
    ("x = 1\n### END SOLUTION", "without a '### BEGIN SOLUTION'"),
    ("### BEGIN SOLUTION 1a: x\n### BEGIN SOLUTION 1b: y\n### END SOLUTION", "do not nest"),
    ("### BEGIN SOLUTION\nx = 1\n### END SOLUTION", "write the exercise after the marker"),
    ("### BEGIN SOLUTION 1a\nx = 1\n### END SOLUTION", "write the exercise after the marker"),
    ("x = 1  ### BEGIN SOLUTION 1a: x\n### END SOLUTION", "alone on its line"),
])
def test_malformed_markers_are_errors_naming_the_cell_and_line(source, error):
    nb = new_notebook(cells=[new_markdown_cell("intro"), new_code_cell(source)])
    with pytest.raises(ExerciseFormatError, match="tiny.ipynb, cell 1") as info:
        make_exercise(nb, name="tiny.ipynb")
    assert error in str(info.value)


def test_markers_in_markdown_or_twice_the_same_id_are_errors():
    nb = new_notebook(cells=[new_markdown_cell("### BEGIN SOLUTION 1a: x\nanswer\n### END SOLUTION")])
    with pytest.raises(ExerciseFormatError, match="only allowed in code cells"):
        make_exercise(nb)
    nb = new_notebook(cells=[new_code_cell("### BEGIN SOLUTION 1a: x\n### END SOLUTION"),
                             new_code_cell("### BEGIN SOLUTION 1a: y\n### END SOLUTION")])
    with pytest.raises(ExerciseFormatError, match="'1a' is used twice"):
        make_exercise(nb)


def _course(tmp_path):
    (tmp_path / "solutions").mkdir()
    nbformat.write(_tiny_solution(), tmp_path / "solutions" / "02_tiny.ipynb")
    return tmp_path


def test_generate_check_and_cli_on_a_course_folder(tmp_path, capsys):
    root = _course(tmp_path)
    target = root / "exercises" / "02_tiny.ipynb"
    assert check_up_to_date(root) == ["exercises/02_tiny.ipynb (missing: solutions/02_tiny.ipynb has no exercise notebook)"]
    assert main(["exercises", "--check", "--root", str(root)]) == 1
    err = capsys.readouterr().err
    assert "exercises/02_tiny.ipynb (missing" in err and "python -m labkit exercises" in err

    assert main(["exercises", "--root", str(root)]) == 0
    assert "created: exercises/02_tiny.ipynb" in capsys.readouterr().out
    first = target.read_bytes()
    assert first == exercise_text(root / "solutions" / "02_tiny.ipynb", root).encode()
    assert check_up_to_date(root) == []
    assert main(["exercises", "--check", "--root", str(root)]) == 0

    # deterministic: regenerating writes nothing new, byte for byte
    assert generate(root, log=lambda line: None) == ["up to date: exercises/02_tiny.ipynb"]
    assert target.read_bytes() == first

    # an edit to the solution makes the exercise stale until regenerated
    nb = nbformat.read(root / "solutions" / "02_tiny.ipynb", as_version=4)
    nb.cells[0].source += "\nMore instructions."
    nbformat.write(nb, root / "solutions" / "02_tiny.ipynb")
    assert check_up_to_date(root) == [
        "exercises/02_tiny.ipynb (stale: differs from what solutions/02_tiny.ipynb generates)"]
    assert main(["exercises", "--root", str(root)]) == 0
    assert check_up_to_date(root) == []

    # re-executing the solution (outputs, counts, timings, another Python) changes nothing
    nb = nbformat.read(root / "solutions" / "02_tiny.ipynb", as_version=4)
    nb.cells[4].outputs = [new_output("stream", name="stdout", text="different\n")]
    nb.cells[4].execution_count = 99
    nb.metadata["language_info"]["version"] = "3.10.1"
    nbformat.write(nb, root / "solutions" / "02_tiny.ipynb")
    assert check_up_to_date(root) == []
    before = target.read_bytes()
    assert main(["exercises", "--root", str(root)]) == 0
    assert target.read_bytes() == before

    # an exercise whose solution is gone is extra; a generated one is removed, a hand-made one is not
    nbformat.write(new_notebook(cells=[]), root / "exercises" / "99_by_hand.ipynb")
    (root / "exercises" / "03_old.ipynb").write_bytes(target.read_bytes())
    assert check_up_to_date(root) == ["exercises/03_old.ipynb (extra: no solutions/03_old.ipynb)",
                                      "exercises/99_by_hand.ipynb (extra: no solutions/99_by_hand.ipynb)"]
    assert main(["exercises", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "removed: exercises/03_old.ipynb" in out and "left alone: exercises/99_by_hand.ipynb" in out
    assert not (root / "exercises" / "03_old.ipynb").exists()
    assert (root / "exercises" / "99_by_hand.ipynb").exists()


def test_a_malformed_solution_changes_nothing_and_exits_2(tmp_path, capsys):
    root = _course(tmp_path)
    bad = new_notebook(cells=[new_code_cell("### BEGIN SOLUTION 1a: x\nx = 1")])
    nbformat.write(bad, root / "solutions" / "01_bad.ipynb")
    assert main(["exercises", "--root", str(root)]) == 2
    assert "01_bad.ipynb, cell 0" in capsys.readouterr().err
    assert not (root / "exercises" / "02_tiny.ipynb").exists()
