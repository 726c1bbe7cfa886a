"""Chapter 5's figures (``utils.pipeline_parallel.figures``) from simulated and
hand-made recorded data: the rows they draw are right, the drawings have what they
say, bad input is refused. No processes (the lab's reports are faked as the dicts
``RankReport.to_dict`` gives)."""

from __future__ import annotations

import pytest
from matplotlib.collections import PolyCollection
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure

from utils.pipeline_parallel import figures as f
from utils.pipeline_parallel.check import expected_bubble, peak_activations, simulate
from utils.pipeline_parallel.schedules import SCHEDULES, Action


def fake_reports(schedule, p, m, v=1, seconds=0.01, dp=1, late=0.0):
    """Reports shaped like the lab's, from the simulated timeline of ``schedule``
    (one time unit = ``seconds``; ``late`` delays rank 0's every action start, a
    measured run that is slower than the model)."""
    times = f.lab_times(schedule, v)
    sim = simulate(p, m, v, SCHEDULES[schedule], times)
    rows = f.timeline_rows(sim)
    for a in rows[0]:
        a["start"] += late
        a["end"] += late
    step = max(a["end"] for row in rows for a in row) * seconds
    out = []
    for d in range(dp):
        for rank, row in enumerate(rows):
            actions = [
                {**a, "start": a["start"] * seconds, "end": a["end"] * seconds}
                for a in row
            ]
            busy = sum(a["end"] - a["start"] for a in actions)
            planned = SCHEDULES[schedule](rank, p, m, v)
            extra = dict(
                schedule=schedule,
                p=p,
                m=m,
                v=v,
                pp_rank=rank,
                dp_rank=d,
                config=dict(dp_size=dp, impl="scratch"),
                actions=[actions, actions],
                step_seconds=[step, step],
                busy_seconds=[busy, busy],
                peak_in_flight=peak_activations(planned),
                activation_bytes_per_micro=1000 * v,
                peak_activation_bytes=0,
                p2p_bytes=4096,
                comm_by_op={"send": 4096 * 3},
                comm_sources={"send": "counted"},
                wire_bytes_per_step=[13000],
            )
            extra["peak_activation_bytes"] = extra["peak_in_flight"] * 1000
            out.append(dict(rank=d * p + rank, extra=extra))
    return out


# ------------------------------------------------------------------ rows
def test_rows_from_a_simulation_keep_every_span():
    sim = simulate(4, 8, 1, SCHEDULES["1f1b"], {"F": 1, "B": 2})
    rows = f.timeline_rows(sim)
    assert len(rows) == 4
    for row, spans in zip(rows, sim.spans):
        assert [(a["action"], a["start"], a["end"]) for a in row] == [
            (str(a), s, e) for a, s, e in spans
        ]


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_stats_of_simulated_rows_are_the_simulations(name):
    v = 2 if name == "interleaved" else 1
    sim = simulate(4, 8, v, SCHEDULES[name], f.lab_times(name, v))
    stats = f.timeline_stats(f.timeline_rows(sim))
    assert stats["makespan"] == sim.makespan
    assert stats["bubble"] == pytest.approx(sim.bubble)
    assert stats["bubble_of_ideal"] == pytest.approx(sim.bubble_of_ideal)
    assert stats["idle"] == pytest.approx(sim.idle)


def test_hand_made_rows_in_either_form_and_their_idle():
    rows = f.timeline_rows(
        [
            [("0F0", 0, 1), ("0F1", 1, 2), (Action("B", 0, 0), 4, 6)],
            [
                {"kind": "F", "stage": 1, "micro": 0, "start": 1, "end": 2},
                {"kind": "B", "stage": 1, "micro": 0, "start": 2, "end": 4},
            ],
        ]
    )
    assert [a["action"] for a in rows[0]] == ["0F0", "0F1", "0B0"]
    stats = f.timeline_stats(rows)
    assert stats["makespan"] == 6
    assert stats["idle"] == [2, 3]
    assert stats["bubble"] == pytest.approx(5 / 12)
    assert f.idle_spans(rows[0], 6) == [(2, 4)]
    assert f.idle_spans(rows[1], 6) == [(0, 1), (4, 6)]


@pytest.mark.parametrize(
    "bad, words",
    [
        ([[("0X0", 0, 1)]], "not an action"),
        ([[("0F0", 2, 1)]], "start <= end"),
        ([[("0F0", -1, 1)]], "start <= end"),
        ([["0F0"]], "neither a dict"),
        ([[{"kind": "Q", "stage": 0, "micro": 0, "start": 0, "end": 1}]], "kind"),
        ([], "no ranks"),
    ],
)
def test_bad_rows_are_refused(bad, words):
    with pytest.raises(ValueError, match=words):
        f.timeline_rows(bad)


def test_rows_from_reports_are_one_pipeline_in_stage_order():
    reports = fake_reports("1f1b", 2, 4, dp=2)
    rows = f.timeline_rows(list(reversed(reports)), dp_rank=1)
    assert [row[0]["stage"] for row in rows] == [0, 1]
    with pytest.raises(ValueError, match="dp_rank=5"):
        f.timeline_rows(reports, dp_rank=5)


# ------------------------------------------------------------------ drawings
def _bars(ax):
    return [c for c in ax.collections if isinstance(c, PolyCollection)]


def test_gantt_colours_every_kind_and_hatches_idle():
    sim = simulate(4, 4, 1, SCHEDULES["zb1p"], f.lab_times("zb1p"))
    fig = f.draw_gantt({"ZB-H1": f.timeline_rows(sim)}, unit="units")
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    colours = [tuple(c.get_facecolor()[0][:3]) for c in _bars(ax)]
    for kind in "FBW":
        want = to_rgb(f.KIND_COLORS[kind])
        assert any(max(abs(a - b) for a, b in zip(c, want)) < 1e-6 for c in colours)
    assert any(c.get_hatch() for c in _bars(ax))  # idle is drawn
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["F", "B", "W", "idle"]
    assert ax.get_xlim()[1] >= sim.makespan


def test_interleaved_chunks_get_a_lighter_shade():
    sim = simulate(2, 4, 2, SCHEDULES["interleaved"], f.lab_times("interleaved", 2))
    fig = f.draw_gantt({"x": f.timeline_rows(sim)}, unit="units", p=2)
    assert "chunk 1 (F)" in [t.get_text() for t in fig.legends[0].get_texts()]
    assert f._tint("#4c72b0", 1) != f._tint("#4c72b0", 0)


def test_draw_schedule_titles_the_modelled_bubble():
    fig = f.draw_schedule("gpipe", 4, 4)
    title = fig.axes[0].get_title()
    want = expected_bubble(SCHEDULES["gpipe"], 4, 4, 1, {"F": 1, "B": 2})
    assert "modelled" in title and f"{want:.1%}" in title


def test_recorded_figure_shows_measured_above_modelled():
    fig = f.recorded_figure(fake_reports("1f1b", 4, 8, late=0.5))
    top, bottom = (ax.get_title() for ax in fig.axes[:2])
    assert "measured" in top and "modelled" in bottom
    got = float(top.split("bubble ")[1].split("%")[0])
    model = float(bottom.split("bubble ")[1].split("%")[0])
    assert got > model  # a late rank 0 widens the measured bubble


def test_recorded_figure_of_a_dp_run_says_which_pipeline():
    fig = f.recorded_figure(fake_reports("gpipe", 2, 2, dp=2))
    assert "pipeline 0 of 2" in fig.axes[0].get_title()


def test_gantt_widget_prerenders_every_combination_and_says_why_one_is_missing():
    runs = {
        (s, p, m): fake_reports(s, p, m, 2 if s == "interleaved" else 1)
        for s in ("1f1b", "interleaved")
        for p in (2, 4)
        for m in (2, 4)
        if not (s == "interleaved" and m % p)
    }
    widget = f.gantt_widget(runs)
    assert list(widget.controls) == ["schedule", "p", "m"]
    assert len(widget.links) == 1 + 2 + 4  # one Stack per level of choices
    missing = f.why_missing("interleaved", 4, 2)
    assert "multiple of p=4" in missing
    assert "not among" in f.why_missing("1f1b", 8, 8)
    with pytest.raises(ValueError, match="at least one"):
        f.gantt_widget({})


# ------------------------------------------------------------------ bubble
def test_bubble_rows_measure_what_the_reports_say():
    exact = fake_reports("zb1p", 4, 8)
    late = fake_reports("1f1b", 4, 4, late=2.0)
    rows = f.bubble_rows({"a": exact, "b": late})
    assert [r["schedule"] for r in rows] == ["1f1b", "zb1p"]
    zb = rows[1]
    assert zb["modelled"] == expected_bubble(
        SCHEDULES["zb1p"], 4, 8, 1, {"F": 1, "B": 1, "W": 1}
    )
    assert zb["measured"] == pytest.approx(zb["modelled"])
    assert abs(zb["relative"]) < 1e-9
    assert rows[0]["measured"] > rows[0]["modelled"]


def test_bubble_figure_has_formula_lines_and_measured_points():
    rows = f.bubble_rows(
        {s: fake_reports(s, 2, 4, 2 if s == "interleaved" else 1) for s in SCHEDULES}
    )
    fig = f.draw_bubble_vs_m(rows, m_max=16)
    ax = fig.axes[0]
    lines = [ln for ln in ax.get_lines() if ln.get_linestyle() not in ("None", "none")]
    assert len(lines) >= 3  # GPipe = 1F1B, interleaved, ZB-H1 (+ the 10% line)
    points = [ln for ln in ax.get_lines() if ln.get_linestyle() in ("None", "none")]
    assert len(points) == 4
    gpipe_line = lines[0]
    xs, ys = gpipe_line.get_data()
    assert ys[list(xs).index(4)] == pytest.approx(100 * 1 / 5)  # (p-1)/(m+p-1)
    with pytest.raises(ValueError, match="no rows"):
        f.draw_bubble_vs_m([])


# ------------------------------------------------------------------ memory, bytes
def test_activation_rows_and_figure():
    runs = {
        (s, m): fake_reports(s, 4, m, 2 if s == "interleaved" else 1)
        for s, ms in (("gpipe", (4, 8)), ("1f1b", (4, 8)), ("interleaved", (8,)))
        for m in ms
    }
    rows = f.activation_rows(runs)
    one = {(r["schedule"], r["m"], r["rank"]): r for r in rows}
    assert one[("gpipe", 8, 0)]["in_flight"] == 8
    assert one[("1f1b", 8, 3)]["in_flight"] == 1
    assert one[("1f1b", 8, 0)]["modelled"] == 4 * 1000
    assert (
        one[("interleaved", 8, 0)]["modelled"]
        == one[("interleaved", 8, 0)]["in_flight"] * 1000
    )  # per chunk: 2000 bytes over v = 2 chunks
    fig = f.draw_activation_peaks(rows, 8)
    top, bottom = fig.axes
    assert len(top.patches) == 3 * 4  # three schedules x four ranks
    assert [ln.get_label() for ln in bottom.get_lines()] == ["GPipe", "1F1B"]
    with pytest.raises(ValueError, match="m=3"):
        f.draw_activation_peaks(rows, 3)


def test_p2p_rows_count_one_message_per_crossing():
    rows = f.p2p_rows(
        {"x": fake_reports("1f1b", 4, 8), "y": fake_reports("interleaved", 4, 8, 2)}
    )
    by = {(r["schedule"], r["rank"]): r for r in rows}
    assert by[("1f1b", 0)]["messages"] == 8  # activations out only
    assert by[("1f1b", 1)]["messages"] == 16  # activations out, gradients back
    assert by[("1f1b", 3)]["messages"] == 8
    assert by[("interleaved", 0)]["messages"] == 3 * 8  # v = 2: one more boundary
    assert by[("1f1b", 1)]["modelled"] == 16 * 4096
    assert by[("1f1b", 1)]["counted"] == 4096 * 3  # what the fake report says
    table = f.markdown_table(rows, {"schedule": "schedule", "modelled": "bytes"})
    assert table.splitlines()[0] == "| schedule | bytes |"
    assert "65,536" in table
