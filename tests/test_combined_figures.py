"""Chapter 7's figures, reference and exercise checks (``utils.combined``).

- the group picture draws exactly the groups ``ParallelDims`` gives, each rank at
  its coordinates; the node placement counts groups inside and across nodes;
- the memory, bytes and bubble figures draw the values of the reports they are
  given (hand-made reports shaped like the lab's, as the dicts ``to_dict`` gives);
- the papers' per-axis formulas (``figures.axis_model``) equal the lab's dp and pp
  bytes on every rank of a real run, and the chapter's one-process reference is
  the tests' (``tests/_pipeline_parallel_workers.reference``);
- the planner rows recompute what ``utils.planner`` gives; the cost rows multiply;
- the exercise checks pass the course's answers and refuse wrong ones, naming why.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from labs import combined as lab
from tests import _pipeline_parallel_workers as pipeline_workers
from utils.combined import exercises as ex
from utils.combined import figures as f
from utils.combined.reference import differences, reference
from utils.dims import ParallelDims
from utils.hardware import CLUSTERS
from utils.planner import PRESETS, bubble_fraction, estimate, narayanan_eq2, search

LAYOUTS = [(2, 2, 2), (1, 2, 4), (2, 4, 1), (3, 1, 2), (1, 1, 1)]


def dims_of(dp, tp, pp):
    return ParallelDims(dp=dp, tp=tp, pp=pp, world_size=dp * tp * pp)


# ------------------------------------------------------------------ groups
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda t: "x".join(map(str, t)))
def test_the_group_picture_draws_exactly_the_groups_of_parallel_dims(layout):
    dims = dims_of(*layout)
    fig = f.draw_groups(dims)
    axes = fig.get_axes()
    assert [ax.name for ax in axes] == ["3d"] * 3
    for ax, axis in zip(axes, f.AXES):
        lines = {ln.get_gid(): ln for ln in ax.get_lines()}
        want = {f"{axis}:" + ",".join(map(str, g)) for g in dims.ranks(axis)}
        assert set(lines) == want, axis
        for gid, line in lines.items():
            ranks = [int(r) for r in gid.split(":")[1].split(",")]
            xs, ys, zs = line.get_data_3d()
            for rank, x, y, z in zip(ranks, xs, ys, zs, strict=True):
                c = dims.coords(rank)
                assert (x, y, z) == (c["tp"], c["dp"], c["pp"]), (gid, rank)
        labels = sorted(int(t.get_text()) for t in ax.texts)
        assert labels == list(range(dims.world_size))


def test_group_rows_partition_the_ranks_along_every_axis():
    dims = dims_of(2, 2, 2)
    rows = f.group_rows(dims)
    for axis in f.AXES:
        ranks = sorted(r for row in rows if row["axis"] == axis for r in row["ranks"])
        assert ranks == list(range(8))


def test_groups_refuse_context_parallel_layouts():
    with pytest.raises(ValueError, match="cp=2"):
        f.draw_groups(ParallelDims(dp=1, tp=2, pp=1, cp=2, world_size=4))


def test_link_rows_count_groups_inside_and_across_nodes():
    dims = dims_of(2, 2, 2)
    whole = {r["axis"]: r for r in f.link_rows(dims, 8)}
    assert all(r["across"] == 0 and r["inside"] == r["groups"] for r in whole.values())
    single = {r["axis"]: r for r in f.link_rows(dims, 1)}
    assert all(r["across"] == r["groups"] for r in single.values())
    four = {r["axis"]: r for r in f.link_rows(dims, 4)}
    for axis, row in four.items():  # every rank's node, from the rank numbers
        crossing = sum(len({r // 4 for r in g}) > 1 for g in dims.ranks(axis))
        assert row["across"] == crossing and row["inside"] == 4 - crossing
    # tp varies fastest: tp groups never leave a node that holds whole tp groups
    big = {r["axis"]: r for r in f.link_rows(dims_of(6, 8, 64), 8)}
    assert big["tp"]["across"] == 0 and big["pp"]["inside"] == 0
    with pytest.raises(ValueError, match="gpus_per_node=3"):
        f.link_rows(dims, 3)


# ------------------------------------------------------------------ fake reports
def fake_reports(dp=2, tp=2, pp=2, seed=1):
    """Reports shaped like the lab's: arbitrary but distinct numbers per rank."""
    dims = dims_of(dp, tp, pp)
    out = []
    for rank in range(dims.world_size):
        k = seed + rank
        extra = dict(
            states=dict(params=1000 * k, grads=900 * k, optimizer=2000 * k + 4,
                        other=0),
            peak_activation_bytes=3000 + 100 * k,
            predicted=dict(params=1000 * k, grads=900 * k, optimizer=2000 * k,
                           activations=2900 + 100 * k),
            comm_by_axis=dict(tp=500 + k, pp=300 * (k % 3), dp=800 - k),
            comm_sources=dict(tp="modelled", pp="counted", dp="modelled"),
            wire_bytes_per_step=[7000 + k, 7100 + k],
            bubble=[0.5, 0.2 + 0.05 * rank],
            bubble_expected=0.25,
            config=dict(dp_size=dp, tp_size=tp, pp_size=pp, schedule="1f1b",
                        micro_batches=4),
        )  # fmt: skip
        out.append(dict(rank=rank, coords=dims.coords(rank), extra=extra))
    return out[::-1]  # any order: the rows sort by rank


def _bars(ax):
    return {p.get_gid(): p for p in ax.patches if p.get_gid()}


def test_memory_bars_are_the_reports_values_stacked():
    reports = fake_reports()
    rows = f.memory_rows(reports)
    assert [r["rank"] for r in rows] == list(range(8))
    ax = f.draw_memory_vs_planner(rows).get_axes()[0]
    bars = _bars(ax)
    assert len(bars) == 8 * 2 * len(f.STATES)
    by_rank = {r["rank"]: r for r in reports}
    scale = None
    for rank, rep in by_rank.items():
        e = rep["extra"]
        values = {
            "measured": {**{k: e["states"][k] for k in f.STATES[:3]},
                         "activations": e["peak_activation_bytes"]},
            "modelled": e["predicted"],
        }  # fmt: skip
        for kind, vals in values.items():
            bottom = 0.0
            for cat in f.STATES:
                bar = bars[f"{rank}:{kind}:{cat}"]
                ratio = bar.get_height() / vals[cat]
                scale = ratio if scale is None else scale
                assert ratio == pytest.approx(scale), (rank, kind, cat)
                assert bar.get_y() == pytest.approx(bottom)
                bottom += bar.get_height()
    assert rows[0]["difference"]["optimizer"] == 4


def test_memory_rows_refuse_two_reports_of_one_rank():
    reports = fake_reports()
    with pytest.raises(ValueError, match="share a rank"):
        f.memory_rows(reports + reports[:1])


def test_comm_bars_are_the_lab_bytes_with_their_source():
    reports = fake_reports()
    rows = [
        dict(rank=r["rank"], coords=r["coords"], lab=r["extra"]["comm_by_axis"],
             sources=r["extra"]["comm_sources"],
             model={a: v + 7 for a, v in r["extra"]["comm_by_axis"].items()})
        for r in sorted(reports, key=lambda r: r["rank"])
    ]  # fmt: skip
    ax = f.draw_comm_by_axis(rows).get_axes()[0]
    bars = _bars(ax)
    ratios = [bars[f"{r['rank']}:{a}"].get_height() / r["lab"][a]
              for r in rows for a in f.AXES if r["lab"][a]]  # fmt: skip
    assert ratios == pytest.approx([ratios[0]] * len(ratios))
    for r in rows:
        assert bars[f"{r['rank']}:pp"].get_hatch() is None  # counted: solid
        assert bars[f"{r['rank']}:tp"].get_hatch() == "///"  # modelled: hatched
    labels = {t.get_text() for t in ax.get_legend().get_texts()}
    assert {"tp (modelled)", "pp (counted)", "dp (modelled)"} <= labels
    ticks = [ln for ln in ax.get_lines() if ln.get_marker() == "_"]
    heights = sorted(float(ln.get_ydata()[0]) for ln in ticks)
    want = sorted(r["model"][a] * ratios[0] for r in rows for a in f.AXES)
    assert heights == pytest.approx(want)


def test_zero_rows_compare_the_stages_rank_by_rank():
    runs = {z: fake_reports(seed=1 + z) for z in (0, 1, 2)}
    rows = f.zero_rows(runs)
    for row in rows:
        assert row["dp_extra"] == row["dp2"] - row["dp1"]
        assert row["dp_ratio"] == pytest.approx(row["dp2"] / row["dp1"])
        assert row["wire_extra"] == row["wire2"] - row["wire1"]
    with pytest.raises(ValueError, match="ranks"):
        f.zero_rows({1: fake_reports(), 2: fake_reports(dp=1)})


def test_bubble_rows_average_the_ranks_and_the_bars_draw_them():
    runs = {"a": fake_reports(), "b": fake_reports(dp=1, pp=4)}
    rows = f.bubble_rows(runs)
    for row, reports in zip(rows, runs.values()):
        last = [r["extra"]["bubble"][-1] for r in reports]
        assert row["measured"] == pytest.approx(sum(last) / len(last))
        assert (row["low"], row["high"]) == (min(last), max(last))
        assert row["modelled"] == 0.25
    bars = _bars(f.draw_bubble(rows).get_axes()[0])
    for row in rows:
        assert bars[f"bubble:{row['label']}"].get_height() == pytest.approx(
            100 * row["measured"]
        )


# ------------------------------------------------------------------ a real run
@pytest.fixture(scope="module")
def real():
    cfgs = {
        "zero1": replace(lab.TINY, return_params=True),
        "zero2": replace(lab.TINY, zero_stage=2, return_params=True),
        "pp4": replace(lab.TINY, dp_size=1, pp_size=4, micro_batches=4,
                       return_params=True),
    }  # fmt: skip
    return {
        k: (c, r) for (k, c), r in zip(cfgs.items(), lab.run_many(list(cfgs.values())))
    }


def test_the_papers_formulas_give_the_labs_dp_and_pp_bytes(real):
    for name, (cfg, reports) in real.items():
        for row in f.comm_rows(reports, cfg):
            assert row["lab"]["dp"] == row["model"]["dp"], (name, row["rank"])
            assert row["lab"]["pp"] == row["model"]["pp"], (name, row["rank"])
            # the blocks' all-reduces, plus the embedding's, head's and loss's
            assert row["model"]["tp"] <= row["lab"]["tp"], (name, row["rank"])
            assert row["sources"]["pp"] == "counted"


def test_the_chapters_reference_is_the_tests_reference(real):
    for name, (cfg, reports) in real.items():
        losses, params = reference(cfg)
        want_losses, want_params = pipeline_workers.reference(cfg)
        assert losses == pytest.approx(want_losses, abs=1e-7), name
        for key, want in want_params.items():
            torch.testing.assert_close(params[key], want, atol=1e-7, rtol=0)
        diff = differences(reports, cfg)
        assert diff["loss"] < 1e-5 and diff["param"] < 2e-5, (name, diff)


def test_the_memory_rows_of_a_real_run_are_its_ledger(real):
    cfg, reports = real["zero1"]
    rows = {r["rank"]: r for r in f.memory_rows(reports)}
    for r in reports:
        assert rows[r.rank]["measured"]["optimizer"] == r.extra.states["optimizer"]
        assert rows[r.rank]["modelled"]["params"] == r.extra.predicted["params"]


def test_check_optimizer_bytes_passes_the_answer_and_names_the_counter(real, capsys):
    runs = [real["zero1"], real["pp4"]]

    def answer(cfg, rank):
        dims = dims_of(cfg.dp_size, cfg.tp_size, cfg.pp_size)
        n = cfg.plan().stages[dims.coords(rank)["pp"]]["params"]
        return 8 * -(-n // cfg.dp_size) + 4

    ex.check_optimizer_bytes(answer, runs)
    assert "correct" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="step count"):
        ex.check_optimizer_bytes(lambda c, r: answer(c, r) - 4, runs)
    with pytest.raises(ValueError, match="ZeRO-1"):
        ex.check_optimizer_bytes(answer, [real["zero2"]])


# ------------------------------------------------------------------ the planner
def test_paper_rows_are_the_planners_estimates():
    rows = f.paper_rows(f.NARAYANAN_TABLE1, vocab=51200, seq_len=2048,
                        final_norm=False, memory_gb=80)  # fmt: skip
    for row, pub in zip(rows, f.NARAYANAN_TABLE1):
        assert row["params"] == narayanan_eq2(pub["layers"], pub["hidden"], 51200, 2048)
        assert round(row["params"] / 1e9, 1) == pub["printed"]
        assert row["d"] * row["t"] * row["p"] == pub["gpus"]
        assert row["d"] * row["m"] == pub["batch"]  # one sequence per micro-batch
        assert row["bubble"] == pytest.approx(
            bubble_fraction("1f1b", row["p"], row["m"])
        )
        e = row["estimate"]
        assert row["device"] == e.device["total"]
        assert row["fits"] == (e.device["total"] <= 80e9)
    with pytest.raises(ValueError, match="does not split"):
        f.paper_rows(f.NARAYANAN_TABLE1, vocab=51200, seq_len=2048, final_norm=False,
                     micro_batch=7)  # fmt: skip


def test_top_layouts_keeps_distinct_layouts_in_order():
    found = search(PRESETS["Llama 3 8B"], CLUSTERS["DGX A100 x 16"], global_batch=512)
    top = f.top_layouts(found, 5)
    keys = [(e.layout["dp"], e.layout["tp"], e.layout["pp"], e.layout["micro_batch"])
            for e in top]  # fmt: skip
    assert len(set(keys)) == len(keys) == 5
    times = [e.step_time["total"] for e in top]
    assert times == sorted(times)
    for e, key in zip(top, keys):
        ties = [
            o for o in found
            if (o.layout["dp"], o.layout["tp"], o.layout["pp"], o.layout["micro_batch"])
            == key and o.step_time["total"] == e.step_time["total"]
        ]  # fmt: skip
        assert e.device["total"] == min(o.device["total"] for o in ties)


def test_step_breakdown_draws_the_modelled_step_time():
    cluster = CLUSTERS["DGX A100 x 16"]
    ests = {
        "a": estimate(PRESETS["Llama 3 8B"], dp=16, tp=8, micro_batches=4,
                      cluster=cluster),
        "b": estimate(PRESETS["Llama 3 8B"], dp=32, tp=4, micro_batches=2,
                      cluster=cluster),
    }  # fmt: skip
    bars = _bars(f.draw_step_breakdown(ests).get_axes()[0])
    for label, e in ests.items():
        left = 0.0
        for part in ("compute", "tp", "pp", "dp"):
            bar = bars[f"{label}:{part}"]
            assert bar.get_width() == pytest.approx(e.step_time[part])
            assert bar.get_x() == pytest.approx(left)
            left += bar.get_width()
    with pytest.raises(ValueError, match="cluster"):
        f.draw_step_breakdown({"c": estimate(PRESETS["Llama 3 8B"])})


def test_cost_rows_multiply_time_gpus_and_price():
    rows = f.cost_rows({"x": 90.0, "y": 7.2}, {"x": 8, "y": 2}, 3.5)
    by = {r["lab"]: r for r in rows}
    assert by["x"]["gpu_hours"] == pytest.approx(90 / 3600 * 8)
    assert by["y"]["cost"] == pytest.approx(7.2 / 3600 * 2 * 3.5)
    with pytest.raises(ValueError, match="price_per_gpu_hour"):
        f.cost_rows({"x": 1.0}, {"x": 1}, -1)
    with pytest.raises(ValueError, match="same labs"):
        f.cost_rows({"x": 1.0}, {"y": 1}, 1.0)


# ------------------------------------------------------------------ exercises
def _group_of(rank, axis, dp, tp, pp):
    coords = {"tp": rank % tp, "dp": rank // tp % dp, "pp": rank // (tp * dp)}
    out = []
    for i in range({"tp": tp, "dp": dp, "pp": pp}[axis]):
        c = {**coords, axis: i}
        out.append(c["tp"] + tp * (c["dp"] + dp * c["pp"]))
    return out


def test_check_group_of_passes_the_answer_and_names_a_wrong_order(capsys):
    ex.check_group_of(_group_of)
    assert "correct" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="another order"):
        ex.check_group_of(lambda *a: _group_of(*a)[::-1])

    # the dp-fastest order (a common slip) gives other groups
    def dp_fastest(rank, axis, dp, tp, pp):
        d, t, p = rank % dp, rank // dp % tp, rank // (dp * tp)
        c = {"dp": d, "tp": t, "pp": p}
        size = {"tp": tp, "dp": dp, "pp": pp}[axis]
        return [
            {**c, axis: i}["dp"]
            + dp * ({**c, axis: i}["tp"] + tp * {**c, axis: i}["pp"])
            for i in range(size)
        ]

    with pytest.raises(AssertionError, match="ParallelDims gives"):
        ex.check_group_of(dp_fastest)


def test_check_smallest_pp_passes_the_search_and_refuses_off_by_one(capsys):
    ex.check_smallest_pp(ex.smallest_pp_for)
    assert "correct" in capsys.readouterr().out
    answers = [
        ex.smallest_pp_for(PRESETS[c["model"]], c["memory_gb"],
                           **{k: c[k] for k in ex.LAYOUT_KEYS})
        for c in ex.SMALLEST_PP_CASES
    ]  # fmt: skip
    assert any(a is None for a in answers) and any(a and a > 1 for a in answers)
    for case, pp in zip(ex.SMALLEST_PP_CASES, answers):
        if pp:  # the answer fits, one stage fewer does not (when there is one)
            kw = {k: case[k] for k in ex.LAYOUT_KEYS}
            model = PRESETS[case["model"]]
            assert ex._estimate(model, pp, **kw).fits(case["memory_gb"] * 1e9)
            if pp > 1:
                assert not ex._estimate(model, pp - 1, **kw).fits(
                    case["memory_gb"] * 1e9
                )

    def plus_one(model, memory_gb, **kw):
        pp = ex.smallest_pp_for(model, memory_gb, **kw)
        return pp + 1 if pp else pp

    with pytest.raises(AssertionError, match="want"):
        ex.check_smallest_pp(plus_one)
