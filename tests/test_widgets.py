"""What the memory widgets draw, checked without a display or a kernel.

utils.plots computes bytes per rank and category from reports and draws figures;
utils.widgets wires controls to them. Widgets work without a kernel (ipywidgets
opens a dummy comm), so their saved state can be inspected here: that is what the
static book renders.
"""

import base64
from dataclasses import dataclass

import ipywidgets as widgets
import pytest
from matplotlib.figure import Figure

from utils import plots
from utils.report import CATEGORIES, RankReport, format_bytes
from utils.widgets import (
    InteractiveFigure,
    figure_output,
    fluid,
    interactive_figure,
    memory_per_rank,
    memory_timeline,
)

MiB = 1 << 20
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def entry(phase, step, **current):
    peak = {k: 2 * v for k, v in current.items()}
    return {"phase": phase, "step": step, "current": current, "peak": peak}


def reports(world_size=2):
    """Rank r holds r+1 MiB of activations in forward; everything else is equal."""
    out = []
    for rank in range(world_size):
        memory = [
            entry("init", None, params=4 * MiB),
            entry("forward", 0, params=4 * MiB, activations=(rank + 1) * MiB),
            entry("step", 0, params=4 * MiB, grads=4 * MiB, optimizer=8 * MiB),
        ]
        out.append(RankReport(rank, world_size, "gloo", "cpu", MiB, memory=memory))
    return out[::-1]  # out of order on purpose: everything sorts by rank


@dataclass
class StateBytes:  # the shape of utils.memory.ModelStateBytes
    params: int
    grads: int
    optimizer: int
    total: int


def test_format_bytes_uses_binary_units():
    assert format_bytes(0) == "0 B"
    assert format_bytes(1023) == "1023 B"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(3 * 1024**3) == "3.0 GiB"
    assert format_bytes(-2 * MiB) == "-2.0 MiB"
    assert format_bytes(5 * 1024**6) == "5120.0 PiB"
    assert plots.byte_scale(500) == (1, "B")
    assert plots.byte_scale(3 * MiB) == (MiB, "MiB")


def test_phases_are_labelled_by_step_and_kept_in_order():
    assert plots.phases(reports()) == ["init", "forward (step 0)", "step (step 0)"]
    twice = [entry("fwd", 1, params=1), entry("fwd", 1, params=2)]
    report = RankReport(0, 1, "gloo", "cpu", 1, memory=twice)
    assert plots.phases([report]) == ["fwd (step 1)", "fwd (step 1) #2"]


def test_phases_merge_ranks_that_recorded_different_phases():
    a, b = reports()[::-1]
    b.memory.append(entry("extra", None, other=1))
    assert plots.phases([a, b])[-1] == "extra"


def test_memory_bars_per_rank_and_category():
    bars = plots.memory_bars(reports(), "forward (step 0)")
    assert list(bars) == list(CATEGORIES)
    assert bars["activations"] == [MiB, 2 * MiB]
    assert bars["params"] == [4 * MiB, 4 * MiB]
    assert bars["grads"] == [0, 0]
    peak = plots.memory_bars(reports(), -1, "peak")
    assert peak["optimizer"] == [16 * MiB, 16 * MiB]


def test_memory_bars_accept_dict_reports_and_count_missing_phases_as_zero():
    dicts = [r.to_dict() for r in reports()]
    dicts[0]["memory"].append(entry("only rank 1", None, other=5))
    bars = plots.memory_bars(dicts, "only rank 1")
    assert bars["other"] == [0, 5]


def test_memory_bars_fail_loudly_on_bad_input():
    with pytest.raises(ValueError, match="no rank recorded phase"):
        plots.memory_bars(reports(), "nope")
    with pytest.raises(ValueError, match="kind must be one of"):
        plots.memory_bars(reports(), 0, "average")
    with pytest.raises(ValueError, match="no reports"):
        plots.memory_bars([], 0)
    dup = reports() + reports()[:1]
    with pytest.raises(ValueError, match="share a rank"):
        plots.phases(dup)
    bad = reports()
    bad[0].memory[0]["current"]["weights"] = 1
    with pytest.raises(ValueError, match="unknown memory categories"):
        plots.memory_bars(bad, 0)


def test_timeline_series_totals_and_gaps():
    rs = reports()
    rs[0].memory.append(entry("late", None, other=7))  # rank 1 only
    series = plots.timeline_series(rs)
    assert sorted(series) == [0, 1]
    assert series[1]["total"] == [4 * MiB, 6 * MiB, 16 * MiB, 7]
    assert series[0]["total"][-1] is None  # a gap, not zero
    assert series[0]["activations"][:3] == [0, MiB, 0]
    assert plots.timeline_series(rs, "peak")[1]["total"][0] == 8 * MiB


def test_predicted_per_rank_accepts_objects_dicts_and_lists():
    state = StateBytes(params=10, grads=20, optimizer=30, total=60)
    want = {"params": 10, "grads": 20, "optimizer": 30}
    assert plots.predicted_per_rank(state, 2) == [want, want]
    assert plots.predicted_per_rank({**want, "total": 60}, 1) == [want]
    sharded = [{"optimizer": 1}, {"optimizer": 2}]
    assert plots.predicted_per_rank(sharded, 2) == sharded
    assert plots.predicted_per_rank(None, 4) is None
    with pytest.raises(ValueError, match="3 predictions for 2 ranks"):
        plots.predicted_per_rank([want] * 3, 2)
    with pytest.raises(TypeError, match="params/grads/optimizer"):
        plots.predicted_per_rank(object(), 2)


def bar_heights(fig):
    return [round(p.get_height(), 6) for p in fig.axes[0].patches]


def test_plot_memory_per_rank_stacks_measured_and_predicted():
    fig = plots.plot_memory_per_rank(reports(), "forward (step 0)", "current")
    assert isinstance(fig, Figure)
    # 5 categories x 2 ranks, in MiB: params, grads, optimizer, activations, other
    assert bar_heights(fig) == [4, 4, 0, 0, 0, 0, 1, 2, 0, 0]
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["rank 0", "rank 1"]
    assert "MiB" in ax.get_ylabel()
    pred = StateBytes(params=4 * MiB, grads=4 * MiB, optimizer=8 * MiB, total=0)
    fig = plots.plot_memory_per_rank(reports(), -1, "current", pred)
    hatched = [p for p in fig.axes[0].patches if p.get_hatch()]
    assert [round(p.get_height(), 6) for p in hatched] == [4, 4, 4, 4, 8, 8, 0, 0, 0, 0]
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == [*CATEGORIES, "predicted (analytic)"]


def test_stack_bars_stacks_by_category_in_each_style():
    from matplotlib.colors import to_rgba

    fig = Figure()
    ax = fig.add_subplot()
    values = {"grads": 2.0, "params": 1.0, "other": 3.0}  # order given: ignored
    assert plots.stack_bars(ax, 0, values, 0.5) == 6.0
    solid = ax.patches[: len(CATEGORIES)]
    assert [p.get_y() for p in solid] == [0, 1, 3, 3, 3]  # CATEGORIES order
    assert [p.get_height() for p in solid] == [1, 2, 0, 0, 3]
    assert [p.get_facecolor() for p in solid] == [
        to_rgba(plots.CATEGORY_COLORS[c]) for c in CATEGORIES
    ]
    plots.stack_bars(ax, 1, values, 0.5, style="outline")
    outline = ax.patches[len(CATEGORIES) : 2 * len(CATEGORIES)]
    assert all(p.get_facecolor() == to_rgba("white") for p in outline)
    assert outline[1].get_edgecolor() == to_rgba(plots.CATEGORY_COLORS["grads"])
    assert all(p.get_hatch() == "///" for p in outline)
    plots.stack_bars(ax, 2, values, 0.5, style="hatched", alpha=0.5)
    hatched = ax.patches[2 * len(CATEGORIES) :]
    params = to_rgba(plots.CATEGORY_COLORS["params"])
    assert hatched[0].get_facecolor()[:3] == params[:3]
    assert hatched[0].get_edgecolor()[:3] == (1.0, 1.0, 1.0)  # white hatching
    assert all(p.get_alpha() == 0.5 and p.get_hatch() == "///" for p in hatched)
    # several positions at once: one height per position, a list of tops back
    tops = plots.stack_bars(ax, [0, 1], {"params": [1, 2], "grads": [3, 4]}, 0.4)
    assert tops == [4, 6]
    with pytest.raises(ValueError, match="style must be one of"):
        plots.stack_bars(ax, 0, values, 0.5, style="dotted")


def test_plot_memory_timeline_one_line_per_rank():
    fig = plots.plot_memory_timeline(reports(), "current", rank=1)
    top, bottom = fig.axes[:2]
    assert [line.get_label() for line in top.get_lines()] == ["rank 0", "rank 1"]
    assert list(top.get_lines()[1].get_ydata()) == [4, 6, 16]
    assert len(bottom.patches) == len(CATEGORIES) * 3
    with pytest.raises(ValueError, match="no report from rank 5"):
        plots.plot_memory_timeline(reports(), rank=5)


def rendered(fig):
    """The figure drawn with Agg (as for its PNG), and the renderer, for text boxes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return canvas.get_renderer()


def equal_reports(world_size=4):
    """Every rank records the same bytes: what data parallelism gives."""
    out = []
    for rank in range(world_size):
        memory = [
            entry("init", None, params=4 * MiB),
            entry("forward", 0, params=4 * MiB, activations=2 * MiB),
            entry("step", 0, params=4 * MiB, grads=4 * MiB, optimizer=8 * MiB),
        ]
        out.append(RankReport(rank, world_size, "gloo", "cpu", MiB, memory=memory))
    return out


@pytest.mark.parametrize(
    "make, phase, kind, predicted",
    [
        # the tallest category (optimizer) is not the top one: zero-height bars of
        # activations and other sit on top of every column
        (reports, -1, "current", None),
        (reports, -1, "peak", None),
        (reports, "forward (step 0)", "current", None),
        (equal_reports, -1, "current", {"params": 4 * MiB, "optimizer": 2 * MiB}),
        (equal_reports, 0, "peak", StateBytes(4 * MiB, 4 * MiB, 8 * MiB, 0)),
    ],
)
def test_memory_per_rank_totals_clear_the_title(make, phase, kind, predicted):
    fig = plots.plot_memory_per_rank(make(), phase, kind, predicted)
    renderer = rendered(fig)
    ax = fig.axes[0]
    title = ax.title.get_window_extent(renderer)
    frame = ax.get_window_extent(renderer)
    labels = [t for t in ax.texts if t.get_text()]
    assert len(labels) == len(ax.get_xticks())  # one total per rank
    for text in labels:
        box = text.get_window_extent(renderer)
        assert not box.overlaps(title), (
            f"total {text.get_text()!r} at {box} overlaps the title at {title}"
        )
        assert box.y1 <= frame.y1, f"total {text.get_text()!r} pokes out of the axes"


def test_memory_per_rank_leaves_head_room_when_nothing_is_recorded():
    empty = [
        RankReport(r, 2, "gloo", "cpu", 1, memory=[entry("init", None)])
        for r in range(2)
    ]
    fig = plots.plot_memory_per_rank(empty)
    assert fig.axes[0].get_ylim() == (0, 1)
    rendered(fig)


@pytest.mark.parametrize("world_size", [2, 4, 8])
def test_timeline_shows_every_rank_when_ranks_are_equal(world_size):
    fig = plots.plot_memory_timeline(equal_reports(world_size), "current")
    rendered(fig)  # lay the figure out as its PNG is, so pixel positions are final
    top = fig.axes[0]
    lines = top.get_lines()
    assert [line.get_label() for line in lines] == [
        f"rank {r}" for r in range(world_size)
    ]
    for line in lines:  # the values themselves are not shifted
        assert list(line.get_ydata()) == [4, 6, 16]
    styles = [(line.get_marker(), line.get_linestyle()) for line in lines]
    assert len(set(styles)) == world_size, f"ranks share a style: {styles}"
    # on screen, equal points of two ranks lie side by side, markers apart
    points = [top.transData.transform(line.get_xydata()) for line in lines]
    for i in range(world_size):
        for j in range(i):
            apart = abs(points[i][:, 0] - points[j][:, 0]).min()
            assert apart >= 4, f"ranks {j} and {i} are {apart:.1f} px apart"
    # and every nudge stays well inside its phase
    for line in lines:
        shift = [x - round(x) for x in line.get_xdata()]
        assert max(map(abs, shift)) <= plots.RANK_DODGE / 2 + 1e-9
    assert top.get_legend().get_title().get_text()  # says why they are apart


def test_timeline_of_one_rank_is_not_nudged():
    (report,) = equal_reports(1)
    fig = plots.plot_memory_timeline([report])
    assert list(fig.axes[0].get_lines()[0].get_xdata()) == [0, 1, 2]
    assert plots.rank_offsets(0) == []
    assert plots.rank_offsets(3) == pytest.approx([-0.15, 0, 0.15])


def test_figures_display_as_png_without_pyplot():
    fig = plots.plot_memory_per_rank(reports())
    assert fig._repr_png_().startswith(PNG_MAGIC)
    out = figure_output(fig)
    assert out["output_type"] == "display_data"
    assert base64.b64decode(out["data"]["image/png"]).startswith(PNG_MAGIC)


def test_figure_output_closes_pyplot_figures():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, _ = plt.subplots()
    figure_output(fig)
    assert not plt.fignum_exists(fig.number)
    with pytest.raises(TypeError, match="must return a matplotlib Figure"):
        figure_output("not a figure")


def shown_png(output: widgets.Output) -> bytes:
    (item,) = output.outputs
    return base64.b64decode(item["data"]["image/png"])


def test_interactive_figure_draws_now_and_on_change():
    calls = []

    def draw(n, label):
        calls.append((n, label))
        fig = Figure(figsize=(2, 2))
        fig.add_subplot().plot(range(n))
        return fig

    w = interactive_figure(draw, n=(1, 9), label=["a", "b"])
    assert isinstance(w, InteractiveFigure) and isinstance(w, widgets.VBox)
    assert calls == [(5, "a")]  # drawn at creation: this is what the book saves
    first = shown_png(w.figure)
    assert first.startswith(PNG_MAGIC)
    slider = w.controls["n"]
    assert isinstance(slider, widgets.IntSlider) and slider.description == "n"
    assert slider.continuous_update is False
    slider.value = 2
    assert calls[-1] == (2, "a") and shown_png(w.figure) != first
    w.controls["label"].value = "b"
    assert calls[-1] == (2, "b")
    # the figure is in the widget state, which nbclient saves into the notebook
    state = w.figure.get_state()
    assert state["outputs"][0]["data"]["image/png"]


def test_interactive_figure_shows_a_traceback_when_redraw_fails():
    def draw(n):
        if n > 3:
            raise RuntimeError("too big")
        return Figure()

    w = interactive_figure(draw, n=widgets.IntSlider(value=1, max=5))
    w.controls["n"].value = 4
    (item,) = w.figure.outputs
    assert item["output_type"] == "stream" and "too big" in item["text"]
    with pytest.raises(RuntimeError, match="too big"):  # the first draw is loud
        interactive_figure(draw, n=widgets.IntSlider(value=5, max=5))
    with pytest.raises(ValueError, match="at least one control"):
        interactive_figure(draw)


def test_prerender_draws_every_choice_into_linked_stacks():
    drawn = []

    def draw(a, b):
        drawn.append((a, b))
        return Figure(figsize=(1, 1))

    w = interactive_figure(
        draw, prerender=True, a=["x", "y", "z"], b=widgets.ToggleButtons(options=[1, 2])
    )
    assert sorted(drawn) == [(a, b) for a in "xyz" for b in (1, 2)]
    outer = w.figure
    assert isinstance(outer, widgets.Stack) and len(outer.children) == 3
    inner = outer.children[2]
    assert isinstance(inner, widgets.Stack) and len(inner.children) == 2
    assert all(isinstance(c, widgets.Output) and c.outputs for c in inner.children)
    # one browser-side link per Stack: the outer one follows a, each inner one b
    assert len(w.links) == 1 + 3
    for link in w.links:
        control = w.controls["a" if link.target[0] is outer else "b"]
        assert link.source == (control, "index")
        assert link.target[1] == "selected_index"
        assert link.target[0] in (outer, *outer.children)
    with pytest.raises(TypeError, match="selection widgets"):
        interactive_figure(draw, prerender=True, a=(1, 5), b=[1])
    with pytest.raises(ValueError, match="more than"):
        interactive_figure(draw, prerender=True, a=list(range(20)), b=list(range(4)))


def test_memory_widgets_wire_phase_kind_and_rank():
    w = memory_per_rank(reports(), StateBytes(4 * MiB, 0, 0, 0))
    assert w.controls["phase"].options == tuple(plots.phases(reports()))
    assert w.controls["phase"].value == "step (step 0)"
    assert w.controls["kind"].options == ("current", "peak")
    assert isinstance(w.figure, widgets.Stack)  # 3 phases x 2 kinds: prerendered
    t = memory_timeline(reports())
    assert t.controls["rank"].value == 0
    assert t.controls["kind"].value == "current"


def test_memory_widgets_prerender_only_when_asked_or_few():
    many = reports()
    for r in many:
        r.memory += [entry("fwd", s, params=1) for s in range(12)]  # 15 phases
    assert isinstance(memory_per_rank(many).figure, widgets.Output)
    assert isinstance(memory_per_rank(many, prerender=True).figure, widgets.Stack)
    assert isinstance(
        memory_timeline(reports(), prerender=False).figure, widgets.Output
    )


def fits_a_phone(layout: widgets.Layout) -> bool:
    """No fixed pixel width that a phone's ~360 px column could not hold."""
    width, cap = layout.width or "", layout.max_width or ""
    return not width.endswith("px") and bool(cap)


def test_controls_and_figures_are_fluid_on_a_phone():
    def draw(n, label, wide):
        return Figure(figsize=(1, 1))

    w = interactive_figure(
        draw,
        n=(1, 9),
        label=widgets.ToggleButtons(options=["a", "b", "c", "d"]),
        wide=widgets.Dropdown(options=[1, 2], layout=widgets.Layout(width="460px")),
    )
    for name, control in w.controls.items():
        assert fits_a_phone(control.layout), (name, control.layout)
    # a width the caller chose stays the most the control takes
    assert w.controls["wide"].layout.width == "100%"
    assert w.controls["wide"].layout.max_width == "460px"
    assert w.controls["n"].layout.max_width == "100%"
    assert w.layout.max_width == "100%"
    assert w.children[0].layout.flex_flow == "row wrap"
    assert w.figure.layout.max_width == "100%" and w.figure.layout.overflow == "auto"
    stacked = memory_per_rank(reports())
    assert isinstance(stacked.figure, widgets.Stack)
    assert stacked.figure.layout.overflow == "auto"
    for control in [
        *stacked.controls.values(),
        *memory_timeline(reports()).controls.values(),
    ]:
        assert fits_a_phone(control.layout)


def test_fluid_keeps_a_width_in_percent_and_a_max_width_given():
    assert fluid(widgets.Layout(width="50%")).max_width == "100%"
    kept = fluid(widgets.Layout(width="600px", max_width="80%"))
    assert (kept.width, kept.max_width) == ("100%", "80%")
