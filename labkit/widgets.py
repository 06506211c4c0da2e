"""Interactive figures that draw the same in every front end: controls, and the figure as a PNG.

The lessons' explorers were ``ipywidgets.interactive`` around functions that drew with pyplot and
called ``plt.show()``. In JupyterLab 4.6 widget messages are handled on a kernel subshell, and the
inline backend's end-of-cell hook shows and closes every open pyplot figure, one that another
message is still drawing included: moving one control while another message was in flight gave a
blank, half-drawn or stale figure, and stray copies in the log console. And a notebook opened
before its cells run (untrusted, on GitHub, on the course website) showed the widgets as a line of
text, not their figure.

:class:`FigureExplorer` avoids both:

* figures are ``matplotlib.figure.Figure`` objects pyplot never sees, drawn to PNG bytes and put into
  an ``ipywidgets.Image``: no hook can show or close them;
* every redraw reads the current value of every control, under a lock: whatever order the messages
  arrive in, the last redraw shows the controls as they are;
* controls that depend on each other are linked in Python (``ipywidgets.link``, ``observe``), so the
  kernel sees one change at a time;
* displayed, it offers the PNG next to the widget (``image/png`` in its MIME bundle): a front end that
  cannot show the widget shows the figure of the stored state.
"""

from __future__ import annotations

import base64
import io
import threading
from collections.abc import Callable

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

__all__ = ["sized_figure", "png_bytes", "FigureExplorer"]


def sized_figure(figsize: tuple[float, float], figure: Figure | None = None) -> Figure:
    """``figure`` cleared and resized to ``figsize`` (inches), or, without one, a new pyplot figure
    (which a notebook shows at the end of the cell, as usual)."""
    if figure is None:
        return plt.figure(figsize=figsize)
    figure.clear()
    figure.set_size_inches(*figsize)
    return figure


def png_bytes(figure: Figure, dpi: int = 100) -> bytes:
    """The figure as a PNG file's bytes."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return buffer.getvalue()


class FigureExplorer:
    """Controls around a figure function: ``draw(figure=Figure(), **values)`` draws into the figure
    it is given (or returns a string: a message shown instead, e.g. for a combination that has no
    figure). ``controls`` maps ``draw``'s argument names to ipywidgets; ``fixed`` adds constant
    arguments; ``layout`` is the widgets to show above the figure, in rows (default: the controls in
    one wrapping row), which may include controls that only drive others (a Play button)."""

    def __init__(self, draw: Callable[..., Figure | str], controls: dict, *, fixed: dict | None = None,
                 layout: list | None = None):
        import ipywidgets as widgets

        self.draw, self.controls, self.fixed = draw, dict(controls), dict(fixed or {})
        self.image = widgets.Image(format="png", layout=widgets.Layout(width="auto"))
        self.message = widgets.HTML()
        self.png = b""
        self.redraws = 0
        self._lock = threading.Lock()
        rows = layout if layout is not None else [list(self.controls.values())]
        boxes = [widgets.HBox(row, layout=widgets.Layout(flex_flow="row wrap")) for row in rows]
        self.widget = widgets.VBox([*boxes, self.message, self.image])
        self.redraw()
        for control in self.controls.values():
            control.observe(self.redraw, names="value")

    def values(self) -> dict:
        """The arguments of ``draw`` now."""
        return {name: control.value for name, control in self.controls.items()} | self.fixed

    def redraw(self, change: dict | None = None) -> None:
        with self._lock:
            result = self.draw(figure=Figure(), **self.values())
            if isinstance(result, str):
                self.message.value = f"<b>{result}</b>"
                self.image.layout.display = "none"
                return
            self.png = png_bytes(result)
            self.message.value = ""
            self.image.value = self.png
            self.image.layout.display = None
            self.redraws += 1

    def describe(self) -> str:
        """One line for text-only front ends (and what nbval compares)."""
        values = ", ".join(f"{name}={value!r}" for name, value in self.values().items() if name in self.controls)
        return f"{getattr(self.draw, '__name__', 'figure')} explorer ({values})"

    def _repr_mimebundle_(self, include=None, exclude=None):
        bundle = self.widget._repr_mimebundle_(include=include, exclude=exclude)
        data = bundle[0] if isinstance(bundle, tuple) else bundle
        data = dict(data, **{"text/plain": self.describe()})
        if self.png:
            data["image/png"] = base64.b64encode(self.png).decode("ascii")
        return data
