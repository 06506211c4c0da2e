"""labkit.widgets.FigureExplorer: the figure always shows the controls as they are, whatever the order of
the messages, never through pyplot, and a static copy travels with the widget."""

import threading

import matplotlib.pyplot as plt
import pytest

ipywidgets = pytest.importorskip("ipywidgets")

from labkit.ring_figures import ring_step_figure, ring_stepper          # noqa: E402
from labkit.widgets import FigureExplorer, png_bytes                     # noqa: E402


def _line(figure, slope, offset=0):
    figure.set_size_inches(2, 2)
    figure.subplots().plot([0, 1], [offset, offset + slope])
    return figure


def _explorer():
    return FigureExplorer(_line, {"slope": ipywidgets.IntSlider(value=1, min=0, max=50),
                                  "offset": ipywidgets.IntSlider(value=0, min=0, max=50)})


def _expected(**values):
    from matplotlib.figure import Figure
    return png_bytes(_line(Figure(), **values))


def test_the_figure_follows_the_controls_and_pyplot_never_sees_it():
    open_before = plt.get_fignums()
    explorer = _explorer()
    assert explorer.png == _expected(slope=1, offset=0)
    explorer.controls["slope"].value = 7
    assert explorer.image.value == explorer.png == _expected(slope=7, offset=0) != _expected(slope=1, offset=0)
    assert plt.get_fignums() == open_before


def test_concurrent_changes_end_on_the_figure_of_the_final_values():
    # Messages handled on several threads at once (JupyterLab's subshells): whatever the interleaving,
    # the last redraw reads every control as it is then.
    explorer = _explorer()
    barrier = threading.Barrier(4)

    def move(name, values):
        barrier.wait()
        for v in values:
            explorer.controls[name].value = v

    threads = [threading.Thread(target=move, args=(name, range(start, 40, 3)))
               for name, start in (("slope", 2), ("offset", 1), ("slope", 3), ("offset", 2))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    final = explorer.values()
    assert explorer.png == _expected(slope=final["slope"], offset=final["offset"])


def test_the_mime_bundle_carries_the_widget_the_png_and_a_line_of_text():
    explorer = _explorer()
    bundle = explorer._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert bundle["text/plain"] == "_line explorer (slope=1, offset=0)"
    import base64
    assert base64.b64decode(bundle["image/png"]) == explorer.png


def test_ring_stepper_changing_n_with_the_step_not_at_zero_shows_that_step_of_the_new_ring():
    from matplotlib.figure import Figure
    stepper = ring_stepper(4)
    ranks, step = stepper.controls["world_size"], stepper.controls["t"]
    step.value = 5
    assert stepper.png == png_bytes(ring_step_figure(4, 5, figure=Figure()))
    ranks.value = 2                          # the ring of 2 has steps 0..2: the step is clamped to 2
    assert (step.value, step.max) == (2, 2)
    assert stepper.png == png_bytes(ring_step_figure(2, 2, figure=Figure()))
    ranks.value = 6
    step.value = 9
    assert step.max == 10 and stepper.png == png_bytes(ring_step_figure(6, 9, figure=Figure()))
    play = stepper.widget.children[0].children[1]
    assert isinstance(play, ipywidgets.Play) and (play.value, play.max) == (9, 10)
