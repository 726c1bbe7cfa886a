"""Widgets that show lab reports, and the primitive every chapter's widgets build on.

Introduced in chapter 0 ("Why one device is not enough"); the data-parallel and ZeRO
chapters reuse :func:`interactive_figure`. The widgets here only wire controls: what
they draw comes from the pure, tested functions of :mod:`utils.plots` (import those
from there: each name has one import path).

Why figures go into the Output widget the way they do
-----------------------------------------------------
A figure is saved as PNG and assigned to the Output widget's ``outputs`` trait from
Python (:func:`show_figure`), instead of being displayed inside ``with output:``.
``outputs`` is part of the widget's synced state, so when Jupyter Book executes a
chapter (nbclient, ``store_widget_state``) the image is saved in the notebook's
widget state, and the static HTML page shows it with no kernel: the page's HTML
manager (see ``utils/html_manager``) rebuilds the widget from that state. The same
assignment works live in JupyterLab, Notebook 7, VS Code and Colab.

In the static book, Python callbacks cannot run. Controls that pick from a few
options can still work there with ``prerender=True``: every choice is drawn at build
time and the browser switches between them (``jslink`` to a ``Stack``).
"""

from __future__ import annotations

import base64
import math
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import ipywidgets as widgets
from matplotlib.figure import Figure

from utils.plots import (
    FIGURE_DPI,
    KINDS,
    figure_png,
    phases,
    plot_memory_per_rank,
    plot_memory_timeline,
    timeline_series,
)

PRERENDER_LIMIT = 64
"""The most figures ``prerender=True`` draws for one widget (each adds 30-60 KiB
to the page)."""

AUTO_PRERENDER = 24
"""The memory widgets prerender by default up to this many figures."""


def figure_output(fig: Figure, dpi: int = FIGURE_DPI) -> dict:
    """The figure as one notebook output (``display_data`` with a base64 PNG).

    Closes the figure if pyplot manages it, so drawing functions that use
    ``plt.subplots`` do not pile up open figures.
    """
    if not isinstance(fig, Figure):
        raise TypeError(f"a draw function must return a matplotlib Figure, got {fig!r}")
    png = base64.b64encode(figure_png(fig, dpi)).decode("ascii")
    width, height = fig.get_size_inches()
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None:
        pyplot.close(fig)
    return {
        "output_type": "display_data",
        "data": {"image/png": png, "text/plain": f"<Figure {width:g}x{height:g} in>"},
        "metadata": {},
    }


def show_figure(output: widgets.Output, fig: Figure) -> None:
    """Replace what ``output`` shows with ``fig`` (saved in the widget state)."""
    output.outputs = (figure_output(fig),)


def _show_error(output: widgets.Output) -> None:
    text = traceback.format_exc()
    output.outputs = ({"output_type": "stream", "name": "stderr", "text": text},)


class InteractiveFigure(widgets.VBox):
    """The controls above the figure they drive; returned by :func:`interactive_figure`.

    ``controls`` maps each keyword of ``draw`` to its widget, ``figure`` is the
    Output (or, prerendered, the Stack of Outputs) that shows the figure, ``links``
    the browser-side links from controls to Stacks (prerendered only), and
    :meth:`values` gives the current keyword arguments.
    """

    def __init__(self, draw, controls, figure, links=(), **kwargs):
        self.draw, self.controls, self.figure = draw, controls, figure
        self.links = list(links)
        box = widgets.HBox(
            list(controls.values()),
            layout=widgets.Layout(flex_flow="row wrap", width="100%"),
        )
        # The figure's box scrolls sideways rather than pushing the page wider
        # (the book's _css/course.css keeps figures legible on a phone).
        fluid(figure.layout).overflow = "auto"
        kwargs.setdefault("layout", widgets.Layout(max_width="100%"))
        super().__init__([box, figure], **kwargs)

    def values(self) -> dict[str, Any]:
        """The keyword arguments ``draw`` gets now."""
        return {name: control.value for name, control in self.controls.items()}

    def redraw(self, *_change) -> None:
        """Draw again with the current values; shows the traceback if draw raises."""
        try:
            show_figure(self.figure, self.draw(**self.values()))
        except Exception:
            _show_error(self.figure)


def fluid(layout: widgets.Layout) -> widgets.Layout:
    """Make ``layout`` fit any screen: never wider than its container (a phone is
    ~360 px of text wide), and a fixed pixel width becomes the largest width of a
    full-width widget (``width="420px"`` -> ``width="100%"``,
    ``max_width="420px"``). Returns ``layout``, changed in place."""
    width = layout.width or ""
    if width.endswith("px"):
        if layout.max_width in (None, "", "100%"):
            layout.max_width = width
        layout.width = "100%"
    elif not layout.max_width:
        layout.max_width = "100%"
    return layout


def _control(name: str, abbrev: Any) -> widgets.ValueWidget:
    """A widget from an ipywidgets ``interact`` abbreviation, labelled ``name``,
    with a :func:`fluid` layout."""
    control = widgets.interactive.widget_from_abbrev(abbrev)
    if control is None or isinstance(control, widgets.fixed):
        raise TypeError(f"control {name!r}: cannot make a widget from {abbrev!r}")
    if not control.description:
        control.description = name.replace("_", " ")
    control.style.description_width = "initial"
    fluid(control.layout)
    if hasattr(control, "continuous_update"):
        control.continuous_update = False  # redraw on release, not every pixel
    return control


def interactive_figure(
    draw: Callable[..., Figure], *, prerender: bool = False, **controls: Any
) -> InteractiveFigure:
    """Controls plus the figure ``draw(**values)`` returns, redrawn when one changes.

    Each keyword names an argument of ``draw`` and gives its control: an ipywidget
    (``ToggleButtons``, ``IntSlider``, ...) or an ``interact`` abbreviation:
    ``(0, 10)`` or ``(0, 10, 2)`` an int slider, ``(0.0, 1.0)`` a float slider,
    a list (of values or of ``(label, value)`` pairs) or a dict a dropdown, a bool a
    checkbox, a str a text box. Its label is the keyword unless the widget has one.

    ``draw`` returns a matplotlib Figure (e.g. a :mod:`utils.plots` function, or one
    made with ``Figure()`` or ``plt.subplots()``; pyplot figures are closed after).
    The first figure is drawn now (an error raises, failing the build loudly); later
    errors show their traceback in place of the figure.

    In the static book only the first figure shows, unless ``prerender=True``: then
    every control must be a selection widget (dropdown, toggle buttons, radio
    buttons, selection slider; lists and dicts make dropdowns), every combination is
    drawn now (at most :data:`PRERENDER_LIMIT`), and the page switches between them
    in the browser, with or without a kernel.

    Example (the "does it fit" calculator)::

        def draw(params_billion, dtype):
            fig = Figure(figsize=(6, 3)); ax = fig.add_subplot()
            ...
            return fig

        interactive_figure(draw, params_billion=(1, 70), dtype=["fp32", "bf16"])
    """
    if not controls:
        raise ValueError("interactive_figure needs at least one control")
    made = {name: _control(name, abbrev) for name, abbrev in controls.items()}
    if prerender:
        links: list[widgets.Link] = []
        return InteractiveFigure(draw, made, _prerendered(draw, made, links), links)
    output = widgets.Output()
    result = InteractiveFigure(draw, made, output)
    show_figure(output, draw(**result.values()))
    for control in made.values():
        control.observe(result.redraw, names="value")
    return result


def _prerendered(
    draw: Callable[..., Figure], controls: dict, links: list
) -> widgets.Widget:
    """Nested Stacks, one level per control, each jslinked to its control's index
    (the links are appended to ``links``)."""
    for name, control in controls.items():
        is_range = isinstance(control, widgets.SelectionRangeSlider)
        if not hasattr(control, "index") or is_range:
            raise TypeError(
                f"prerender needs selection widgets: {name!r} is {control!r}"
            )
    sizes = [len(c.options) for c in controls.values()]
    if math.prod(sizes) > PRERENDER_LIMIT:
        raise ValueError(
            f"prerender would draw {' x '.join(map(str, sizes))} figures, "
            f"more than {PRERENDER_LIMIT}; drop prerender or offer fewer options"
        )

    def level(items: Sequence, chosen: dict) -> widgets.Widget:
        if not items:
            output = widgets.Output()
            show_figure(output, draw(**chosen))
            return output
        (name, control), rest = items[0], items[1:]
        values = control._options_values  # the values behind the labels
        stack = widgets.Stack([level(rest, {**chosen, name: v}) for v in values])
        stack.selected_index = control.index
        links.append(widgets.jslink((control, "index"), (stack, "selected_index")))
        return stack

    return level(list(controls.items()), {})


def memory_per_rank(
    reports: Sequence[Any], predicted: Any = None, prerender: bool | None = None
) -> InteractiveFigure:
    """Per-rank memory by category at a chosen phase, current or peak, beside the
    analytic prediction (see :func:`utils.plots.predicted_per_rank`).

    ``prerender`` (default: when that is at most :data:`AUTO_PRERENDER` figures)
    draws every phase x kind now, so the controls also work in the static book.
    """
    names = phases(reports)

    def draw(phase: str, kind: str) -> Figure:
        return plot_memory_per_rank(reports, phase, kind, predicted)

    return interactive_figure(
        draw,
        prerender=_auto(prerender, len(names) * len(KINDS)),
        phase=widgets.Dropdown(options=names, value=names[-1], description="phase"),
        kind=widgets.ToggleButtons(options=list(KINDS), description="memory"),
    )


def memory_timeline(
    reports: Sequence[Any], prerender: bool | None = None
) -> InteractiveFigure:
    """Each rank's memory over the run, and one chosen rank's by category, current
    or peak; ``prerender`` as in :func:`memory_per_rank`."""
    ranks = [(f"rank {r}", r) for r in sorted(timeline_series(reports))]

    def draw(kind: str, rank: int) -> Figure:
        return plot_memory_timeline(reports, kind, rank)

    return interactive_figure(
        draw,
        prerender=_auto(prerender, len(ranks) * len(KINDS)),
        kind=widgets.ToggleButtons(options=list(KINDS), description="memory"),
        rank=widgets.Dropdown(options=ranks, description="rank"),
    )


def _auto(prerender: bool | None, figures: int) -> bool:
    return figures <= AUTO_PRERENDER if prerender is None else prerender
