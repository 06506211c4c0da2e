"""A failed check in a notebook: IPython prints the student's cell and the message, no labkit frame."""

import pytest

IPython = pytest.importorskip("IPython")


def test_a_stubs_error_reraised_by_a_checker_shows_no_labkit_frame(capsys):
    from IPython.core.interactiveshell import InteractiveShell

    from labkit.checks import notebook_errors
    shell = InteractiveShell.instance()
    try:
        shell.run_cell("from labkit.checks import CheckFailed, fail")
        assert notebook_errors.install((NotImplementedError, AssertionError))
        shell.run_cell("def average(x):\n    raise NotImplementedError('Exercise 1a: write it')\n")
        # labkit's own re-raise, as run_on_ranks does it
        shell.run_cell("from labkit.checks.notebook_errors import _PACKAGE_DIR\n"
                       "exec(compile('def check(f):\\n    try:\\n        f(1)\\n    except NotImplementedError as exc:\\n"
                       "        raise exc.with_traceback(None) from None\\n', _PACKAGE_DIR + 'checks/fake.py', 'exec'))")
        capsys.readouterr()
        shell.run_cell("check(average)")
        out = capsys.readouterr().out
        assert "Exercise 1a: write it" in out and "NotImplementedError" in out
        assert "with_traceback" not in out and "fake.py" not in out, out
        shell.run_cell("fail('rank 1, round 2: expected 3, got 4')")
        out = capsys.readouterr().out
        assert "rank 1, round 2: expected 3, got 4" in out and "checks/__init__.py" not in out, out
    finally:
        shell.set_custom_exc((), None)
        InteractiveShell.clear_instance()
