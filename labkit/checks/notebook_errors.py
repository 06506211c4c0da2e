"""How a check's failure reads in a notebook: the student's cell and the message, not labkit's frames.

A checker re-raises the stub's NotImplementedError, or raises CheckFailed, from inside labkit;
IPython hides frames marked ``__tracebackhide__`` but always prints the last one, so the student saw
labkit's ``raise ... from None`` line above their message. Installed when a checker is imported in
IPython, this handler prints the same traceback without the frames inside labkit."""

from __future__ import annotations

import os
import types

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def in_labkit(filename: str) -> bool:
    """Whether a frame's file is part of labkit (the student did not write it)."""
    return os.path.abspath(filename).startswith(_PACKAGE_DIR)


def without_labkit_frames(tb: types.TracebackType | None) -> types.TracebackType | None:
    """The traceback ``tb`` with every frame of a file inside labkit left out."""
    kept = []
    while tb is not None:
        if not in_labkit(tb.tb_frame.f_code.co_filename):
            kept.append(tb)
        tb = tb.tb_next
    rebuilt = None
    for t in reversed(kept):
        rebuilt = types.TracebackType(rebuilt, t.tb_frame, t.tb_lasti, t.tb_lineno)
    return rebuilt


def install(exception_types: tuple) -> bool:
    """Show ``exception_types`` without labkit's frames in this IPython kernel (nothing elsewhere).
    Returns whether a handler is installed."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    if shell is None:
        return False

    def handler(shell, etype, value, tb, tb_offset=None):
        shell.showtraceback((etype, value, without_labkit_frames(tb)), tb_offset=tb_offset)

    shell.set_custom_exc(exception_types, handler)
    return True
