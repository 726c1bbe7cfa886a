"""Figures of chapter 6, "SIMD and MIMD".

Pure functions turn the lab's reports (``labs.simd_mimd``; reports or their JSON
dicts) into rows: :func:`simd_table`, :func:`scaling_fit`, :func:`path_rows`;
drawing functions return a new :class:`utils.plots.InlineFigure` (no pyplot
state): throughput bars per implementation and dtype on a log scale, speedup
against workers with the fitted Amdahl and Gustafson curves, Flynn's 2 x 2 grid
with the course's parallelisms placed, each rank's recorded path, and the recorded
GPU divergence figures. :func:`amdahl_widget` wires a serial-fraction control to
the speedup figure. Nothing here runs a lab.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from matplotlib.patches import FancyBboxPatch, Rectangle

from utils.plots import InlineFigure
from utils.report import field_of
from utils.simd_mimd import amdahl, kernels, trace
from utils.simd_mimd.machine import CpuInfo
from utils.simd_mimd.taxonomy import FLYNN, PARALLELISMS

IMPL_LABELS = {
    "python": "Python loop (float64)",
    "scalar": "one-element torch ops",
    "vector": "one vectorised op",
}
IMPL_COLORS = {"python": "#8c8c8c", "scalar": "#dd8452", "vector": "#4c72b0"}
DTYPE_ORDER = tuple(kernels.DTYPES)


def _extra(report):
    extra = field_of(report, "extra")
    return extra if isinstance(extra, Mapping) else vars(extra)


def _rank0(reports: Sequence[Any]) -> dict:
    return _extra(min(reports, key=lambda r: field_of(r, "rank")))


def cpu_of(reports: Sequence[Any]) -> CpuInfo:
    """Rank 0's :class:`CpuInfo`, rebuilt from its report."""
    data = dict(_rank0(reports)["machine"])
    data.pop("vector_bits", None)
    return CpuInfo(**data)


# ------------------------------------------------------------------ SIMD rows
def op_peak_flops(cpu: CpuInfo, op: str, dtype: str) -> float | None:
    """The modelled 1-core peak FLOP/s of ``op`` in ``dtype``: one vector
    instruction per lane per cycle, an FMA (2 operations) for axpy, an add (1)
    for sum; so the sum's peak is half the FMA peak ``CpuInfo.peak_flops``."""
    peak = cpu.peak_flops(kernels.DTYPES[dtype], cores=1)
    return None if peak is None else peak * kernels.FLOPS_PER_ELEMENT[op] / 2


def simd_table(reports: Sequence[Any]) -> list[dict[str, Any]]:
    """Rank 0's SIMD rows, each with the modelled 1-core peak of its op and dtype
    (``peak_flops``, :func:`op_peak_flops`, None if unknown) and the measured
    fraction of it."""
    cpu = cpu_of(reports)
    rows = []
    for row in _rank0(reports)["simd"]:
        peak = op_peak_flops(cpu, row["op"], row["dtype"])
        fraction = None if peak is None else row["flops_per_s"] / peak
        rows.append(
            {
                **row,
                "peak_flops": peak,
                "peak_fraction": fraction,
                "peak_fraction_text": "unknown"
                if fraction is None
                else f"{100 * fraction:.2g}%",
            }
        )
    return rows


def simd_row(rows: Sequence[Mapping], op: str, impl: str, dtype: str) -> Mapping:
    for row in rows:
        if (row["op"], row["impl"], row["dtype"]) == (op, impl, dtype):
            return row
    raise KeyError(f"no SIMD row for {(op, impl, dtype)}")


def simd_markdown(rows: Sequence[Mapping]) -> str:
    """The SIMD measurements as a Markdown table."""
    lines = [
        "| op | implementation | dtype | elements | median time (measured) | "
        "elements/s (measured) | FLOP/s (measured) | of the op's modelled 1-core "
        "peak |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['op']} | {IMPL_LABELS[r['impl']]} | {r['dtype']} | "
            f"{r['numel']:,} | {_seconds(r['median_s'])} | "
            f"{r['elements_per_s']:.3g} | {r['flops_per_s']:.3g} | "
            f"{r['peak_fraction_text']} |"
        )
    return "\n".join(lines)


def _seconds(s: float) -> str:
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} us"


def draw_throughput(rows: Sequence[Mapping]):
    """Measured elements per second, per implementation and dtype (log scale),
    for axpy and sum, with the modelled 1-core peak of each dtype dashed."""
    fig = InlineFigure(figsize=(9, 3.8), layout="constrained")
    axes = fig.subplots(1, len(kernels.OPS), sharey=True)
    dtypes = [d for d in DTYPE_ORDER if any(r["dtype"] == d for r in rows)]
    width = 0.26
    for ax, op in zip(axes, kernels.OPS):
        for g, dtype in enumerate(dtypes):
            for i, impl in enumerate(kernels.IMPLS):
                match = [
                    r
                    for r in rows
                    if (r["op"], r["impl"], r["dtype"]) == (op, impl, dtype)
                ]
                if not match:
                    continue
                x = g + (i - 1) * width
                ax.bar(
                    x,
                    match[0]["elements_per_s"],
                    width,
                    color=IMPL_COLORS[impl],
                    label=IMPL_LABELS[impl] if g == 0 or impl != "python" else None,
                )
            peak = [
                r["peak_flops"] for r in rows if (r["op"], r["dtype"]) == (op, dtype)
            ][0]
            if peak:
                ax.hlines(
                    peak / kernels.FLOPS_PER_ELEMENT[op],
                    g - 0.45,
                    g + 0.45,
                    colors="black",
                    linestyles="--",
                    linewidth=1,
                    label="modelled peak, 1 core" if g == 0 else None,
                )
        ax.set_yscale("log")
        ax.set_xticks(range(len(dtypes)), dtypes)
        ax.set_title(f"{op}: {'out = a x + y' if op == 'axpy' else 'sum of x'}")
        ax.grid(axis="y", alpha=0.3, which="major")
    axes[0].set_ylabel("elements per second (measured)")
    handles, labels = axes[0].get_legend_handles_labels()
    seen = dict(zip(labels, handles))
    fig.legend(
        seen.values(),
        seen.keys(),
        loc="outside lower center",
        ncol=4,
        fontsize=8,
        frameon=False,
    )
    return fig


# --------------------------------------------------------------- scaling rows
def _process_times(reports: Sequence[Any], kind: str, column: str = "total_s"):
    """Per number of workers k: the median over repeats of the slowest worker's
    seconds (a step is done when its last worker is)."""
    per_k: dict[int, list[list[float]]] = {}
    for r in reports:
        for row in _extra(r)["scaling"][kind]:
            if row is not None:
                per_k.setdefault(row["workers"], []).append(row[column])
    return {
        k: statistics.median(max(vals) for vals in zip(*ranks))
        for k, ranks in sorted(per_k.items())
    }


def scaling_fit(reports: Sequence[Any]) -> dict[str, Any]:
    """Speedups and fitted serial fractions from the scaling part.

    ``threads``: rank 0's medians per thread count; ``processes``: medians over
    repeats of the slowest worker, per worker count (strong scaling), with
    ``compute`` (the slowest worker's share of the sum) and ``combine`` (the longest
    any worker spent in the all-reduce, its wait for the others included): each a
    median over the rounds of that round's maximum, so they need not add up to the
    total; ``weak``: every worker doing the whole job, and Gustafson's scaled
    speedup ``k T_weak(1) / T_weak(k)``. Serial fractions are least-squares fits
    (``utils.simd_mimd.amdahl``), None without a one-worker time and another.
    """
    data = _rank0(reports)["scaling"]
    threads = {row["threads"]: row["median_s"] for row in data["threads"]}
    procs = _process_times(reports, "processes")
    out: dict[str, Any] = {}
    for kind, times in (("threads", threads), ("processes", procs)):
        fit = (
            amdahl.fit_serial_fraction(times) if 1 in times and len(times) > 1 else None
        )
        out[kind] = {
            "times": times,
            "speedup": amdahl.speedups(times) if 1 in times else {},
            "serial_fraction": fit,
        }
    out["processes"]["compute"] = _process_times(reports, "processes", "compute_s")
    out["processes"]["combine"] = _process_times(reports, "processes", "combine_s")
    weak = _process_times(reports, "weak")
    # The weak series' own one-worker run is the baseline: the same job as the
    # strong series' one worker, timed in the same rounds, so S(1) = 1 exactly
    scaled = amdahl.scaled_speedups(weak[1], weak)
    out["weak"] = {"times": weak, "scaled_speedup": scaled}
    out["gustafson"] = amdahl.fit_gustafson(scaled) if len(scaled) > 1 else None
    return out


def draw_speedup(
    fit: Mapping[str, Any], max_workers: int = 64, serial_fraction: float | None = None
):
    """Measured speedups (threads, processes, weak scaling) against workers, the
    Amdahl curve of the fitted (or given) serial fraction and Gustafson's line."""
    fig = InlineFigure(figsize=(7.5, 4.2), layout="constrained")
    ax = fig.add_subplot()
    ns = [2**i for i in range(int(math.log2(max_workers)) + 1)]
    grid = [max_workers ** (i / 200) for i in range(201)]  # even on the log axis
    ax.plot(ns, ns, color="#bbbbbb", linewidth=1, label="linear: n")
    s = (
        fit["processes"]["serial_fraction"]
        if serial_fraction is None
        else serial_fraction
    )
    if s is not None:
        drawn = min(max(s, 0.0), 1.0)  # the law's range; a fit may fall outside
        note = "" if drawn == s else f"; fitted {s:.3g}, outside [0, 1]"
        ax.plot(
            grid,
            amdahl.amdahl_curve(drawn, grid),
            color="#4c72b0",
            label=f"Amdahl, s = {drawn:.3g} (modelled; bound 1/s = "
            f"{'inf' if drawn == 0 else f'{1 / drawn:.3g}'}{note})",
        )
    g = fit.get("gustafson")
    if g is not None and serial_fraction is None:
        gg = min(max(g, 0.0), 1.0)
        ax.plot(
            grid,
            [amdahl.gustafson_speedup(gg, n) for n in grid],
            "-.",
            color="#55a868",
            label=f"Gustafson, s' = {gg:.3g} (modelled"
            + ("" if gg == g else f"; fitted {g:.3g}, outside [0, 1]")
            + ")",
        )
    for kind, marker, color, label in (
        ("threads", "o", "#dd8452", "threads, measured"),
        ("processes", "s", "#4c72b0", "processes, measured"),
    ):
        ups = fit[kind]["speedup"]
        ax.plot(
            list(ups),
            list(ups.values()),
            marker,
            color=color,
            markersize=7,
            label=label,
        )
    scaled = fit["weak"]["scaled_speedup"]
    ax.plot(
        list(scaled),
        list(scaled.values()),
        "^",
        color="#55a868",
        markersize=7,
        label="weak scaling (scaled), measured",
    )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("workers n")
    ax.set_ylabel("speedup")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    return fig


def amdahl_widget(fit: Mapping[str, Any]):
    """The speedup figure with a choice of serial fraction: the measured one and a
    few others, prerendered so the choice also works in the static book."""
    from ipywidgets import Dropdown

    from utils.widgets import interactive_figure

    measured = fit["processes"]["serial_fraction"]
    options = (
        [(f"measured here: {measured:.3g}", measured)] if measured is not None else []
    )
    options += [(f"{v:g}", v) for v in (0.001, 0.01, 0.05, 0.1, 0.25)]
    return interactive_figure(
        lambda serial_fraction: draw_speedup(fit, 1024, serial_fraction),
        prerender=True,
        serial_fraction=Dropdown(options=options, description="serial fraction s"),
    )


# ------------------------------------------------------------------ taxonomy
def draw_taxonomy():
    """Flynn's 2 x 2 grid; the MIMD cell split into SPMD and MPMD, with the
    course's parallelisms (from ``taxonomy.PARALLELISMS``) placed."""
    fig = InlineFigure(figsize=(9, 5.6), layout="constrained")
    ax = fig.add_subplot()
    ax.set_xlim(0, 2)
    ax.set_ylim(0, 2)
    ax.axis("off")
    cells = {
        ("single", "single"): "SISD",
        ("single", "multiple"): "SIMD",
        ("multiple", "single"): "MISD",
        ("multiple", "multiple"): "MIMD",
    }
    colors = {
        "SISD": "#eeeeee",
        "SIMD": "#dbe6f3",
        "MISD": "#f5f0e1",
        "MIMD": "#e3f1e3",
    }
    for (instr, data), name in cells.items():
        x = 0 if data == "single" else 1
        y = 1 if instr == "single" else 0
        ax.add_patch(
            Rectangle(
                (x, y), 1, 1, facecolor=colors[name], edgecolor="white", linewidth=3
            )
        )
        ax.text(x + 0.04, y + 0.93, name, fontsize=13, weight="bold", va="top")
        ax.text(
            x + 0.04, y + 0.80, FLYNN[name].short, fontsize=8, va="top", color="#333333"
        )
    ax.text(
        1.04,
        1.45,
        "inside every rank: the kernels\nof all the course's parallelisms",
        fontsize=8,
        va="top",
        style="italic",
    )
    for i, model in enumerate(("SPMD", "MPMD")):
        x0 = 1.03 + i * 0.49
        ax.add_patch(
            FancyBboxPatch(
                (x0, 0.04),
                0.45,
                0.56,
                boxstyle="round,pad=0.005",
                facecolor="white",
                edgecolor="#55a868",
            )
        )
        ax.text(x0 + 0.02, 0.57, model, fontsize=10, weight="bold", va="top")
        names = [p for p in PARALLELISMS if p.model == model]
        for j, p in enumerate(names):
            ax.text(
                x0 + 0.02,
                0.47 - j * 0.085,
                f"{p.title} (ch. {p.chapter})",
                fontsize=8,
                va="top",
            )
    ax.text(0.5, 2.02, "single data stream", ha="center", va="bottom", fontsize=9)
    ax.text(1.5, 2.02, "multiple data streams", ha="center", va="bottom", fontsize=9)
    ax.text(
        -0.02, 1.5, "single\ninstruction\nstream", ha="right", va="center", fontsize=9
    )
    ax.text(
        -0.02,
        0.5,
        "multiple\ninstruction\nstreams",
        ha="right",
        va="center",
        fontsize=9,
    )
    return fig


# --------------------------------------------------------------- SPMD paths
def path_rows(reports: Sequence[Any]) -> dict[str, dict[str, Any]]:
    """Per step kind: each rank's path (step functions and communication), the
    number of ops each dispatched, and the classification of the op streams."""
    ordered = sorted(reports, key=lambda r: field_of(r, "rank"))
    out = {}
    for kind in ("data_parallel", "pipeline_parallel"):
        streams = [_extra(r)["spmd"]["events"][kind] for r in ordered]
        first = trace.ops(streams[0])
        out[kind] = {
            "paths": [trace.path_summary(s) for s in streams],
            "ops": [len(trace.ops(s)) for s in streams],
            "same_as_rank0": [trace.ops(s) == first for s in streams],
            "model": trace.classify(streams),
        }
    return out


def draw_paths(rows: Mapping[str, Mapping[str, Any]]):
    """Each rank's recorded path, one row of boxes per rank: step functions (blue)
    and communication ops (orange), for the data-parallel and the pipeline step."""
    longest = max(len(p) for r in rows.values() for p in r["paths"])
    ranks = len(next(iter(rows.values()))["paths"])
    fig = InlineFigure(
        figsize=(min(2 + 1.15 * longest, 13), 1.1 + 1.3 * ranks), layout="constrained"
    )
    axes = fig.subplots(
        1,
        2,
        sharey=True,
        width_ratios=[max(len(p) for p in r["paths"]) for r in rows.values()],
    )
    for ax, (kind, row) in zip(axes, rows.items()):
        for rank, path in enumerate(row["paths"]):
            y = ranks - 1 - rank
            for i, name in enumerate(path):
                color = "#f2c6a0" if trace.kind_of(name) == "comm" else "#c9d9ee"
                ax.add_patch(
                    FancyBboxPatch(
                        (i + 0.04, y + 0.2),
                        0.92,
                        0.6,
                        boxstyle="round,pad=0.02",
                        facecolor=color,
                        edgecolor="#666666",
                    )
                )
                label = name.replace("_", "\n")
                ax.text(i + 0.5, y + 0.5, label, ha="center", va="center", fontsize=6.5)
        ax.set_xlim(0, max(len(p) for p in row["paths"]))
        ax.set_ylim(0, ranks)
        ax.set_yticks(
            [ranks - 0.5 - r for r in range(ranks)], [f"rank {r}" for r in range(ranks)]
        )
        ax.set_xticks([])
        for side in ("top", "right", "bottom"):
            ax.spines[side].set_visible(False)
        same = "identical" if row["model"] == "SPMD" else "different"
        ax.set_title(
            f"{kind.replace('_', ' ')} step: op streams {same} -> {row['model']}",
            fontsize=9,
        )
    return fig


def paths_markdown(rows: Mapping[str, Mapping[str, Any]]) -> str:
    lines = [
        "| step | rank | path (recorded) | ops dispatched | same ops as rank 0 |",
        "|---|---|---|---|---|",
    ]
    for kind, row in rows.items():
        for rank, (path, n, same) in enumerate(
            zip(row["paths"], row["ops"], row["same_as_rank0"])
        ):
            lines.append(
                f"| {kind.replace('_', ' ')} | {rank} | {' → '.join(path)} | {n} | "
                f"{'yes' if same else 'no'} |"
            )
    return "\n".join(lines)


# ---------------------------------------------------------------- divergence
def draw_divergence(runs: Sequence[Mapping]):
    """Recorded GPU kernel times per lane pattern, one panel per device, with the
    modelled times of the two mixed patterns."""
    fig = InlineFigure(figsize=(4.5 * len(runs) + 1, 3.6), layout="constrained")
    axes = fig.subplots(1, len(runs), squeeze=False)[0]
    for ax, run in zip(axes, runs):
        xs = list(kernels.PATTERNS)
        ax.bar(
            xs,
            [run["median_ms"][p] for p in xs],
            color="#4c72b0",
            label="measured (median)",
        )
        model = run["modelled_ms"]
        ax.plot(
            list(model),
            list(model.values()),
            "k_",
            markersize=30,
            mew=2,
            label="modelled from all_a + all_b",
        )
        ax.set_ylabel("kernel time (ms)")
        ax.set_title(
            f"{run['device']} (warp of {run['warp_size']}), recorded", fontsize=9
        )
        ax.legend(fontsize=7)
    return fig


_SERIAL_PARTS = {
    "processes": "the all-reduce, starting together, waiting for the slowest",
    "threads": "waking the threads, splitting the work, waiting for the slowest",
}


def scaling_verdict(serial_fraction: float | None, subject: str = "processes") -> str:
    """One sentence reading an Amdahl serial fraction fitted for ``subject``
    ("processes" or "threads"), whatever it came out as: the chapter's prose about
    its own measurement is generated by this."""
    if serial_fraction is None:
        return f"For the {subject}, with one count only, there is nothing to fit."
    s = serial_fraction
    if s < 0:
        return (
            f"For the {subject}, a fraction below 0 means better than linear: each "
            f"share fits the caches better, or the one-worker run was slowed by "
            f"something else."
        )
    if s >= 1:
        return (
            f"For the {subject}, a fraction of 1 or more means adding workers made "
            f"the job slower: the time went to contention (for cores, for memory "
            f"bandwidth) or to costs that grow with the workers, which Amdahl's "
            f"model of one job alone on its processors does not describe; an idle "
            f"machine shows the law."
        )
    bound = "no bound" if s == 0 else f"at most {1 / s:.3g} times as fast"
    return (
        f"For the {subject}, if this fraction held for any number of workers, the "
        f"job could get {bound}: the fraction counts everything that did not "
        f"shrink with more workers ({_SERIAL_PARTS.get(subject, 'the serial part')})."
    )


def scaling_verdicts(fractions: Mapping[str, float | None]) -> str:
    """:func:`scaling_verdict` for each subject ("processes", "threads"), with
    subjects whose fractions read the same way (none, below 0, 1 or more) said
    once: "For the processes and the threads, ..."."""

    def kind(s):
        return "none" if s is None else "below" if s < 0 else "above" if s >= 1 else s

    groups: dict[Any, list[str]] = {}
    for subject, s in fractions.items():
        groups.setdefault(kind(s), []).append(subject)
    sentences = []
    for subjects in groups.values():
        text = scaling_verdict(fractions[subjects[0]], subjects[0])
        if len(subjects) > 1:
            both = " and the ".join(subjects)
            text = text.replace(f"the {subjects[0]}", f"the {both}", 1)
        sentences.append(text)
    return " ".join(sentences)


def gustafson_verdict(serial_fraction: float | None) -> str:
    """One sentence reading Gustafson's fitted ``s'``, whatever it came out as."""
    if serial_fraction is None:
        return "With one worker count only, there is nothing to fit."
    s = serial_fraction
    if s < 0:
        return (
            "A fraction below 0 means better than linear: n workers did n jobs in "
            "less time than one worker did one (caches, or a slowed one-worker run)."
        )
    if s >= 1:
        return (
            "A fraction of 1 or more means the grown job gained nothing from the "
            "added workers (below a scaled speedup of 1, it lost): they waited for "
            "cores or for each other."
        )
    return (
        f"The line's slope, 1 - s' = {1 - s:.3g}, is the share of each added "
        "worker's time that went into the work."
    )


def load_sentence(cores: int, load: float) -> str:
    """How busy the machine was while the lab ran."""
    return (
        f"The machine's 1-minute load average read up to {load:.2f} on {cores} "
        "logical CPUs during the lab (os.getloadavg at its start and end)."
    )


def as_fast(speedup: float) -> str:
    """ "1.80 times as fast", or "slower: 1.30 times as long" below 1."""
    if speedup >= 1:
        return f"{speedup:.2f} times as fast"
    return f"slower: {1 / speedup:.2f} times as long"


def _fraction(value: float | None) -> str:
    return "none (one point)" if value is None else f"{value:.3f}"


def summary_text(reports: Sequence[Any]) -> str:
    """The lab's figures as text (the CLI prints it): the CPU, throughputs,
    speedups and fitted fractions, each step kind's classification and paths."""
    r0, lines = _rank0(reports), []
    if r0["machine"]:
        m = r0["machine"]
        lines.append(
            f"CPU: {m['model']}, {m['cores']} logical CPUs on "
            f"{m.get('physical_cores') or 'unknown'} physical cores, torch capability "
            f"{m['capability']}, vectors {m['vector_bits'] or 'unknown'} bits, clock "
            f"{m['clock_mhz'] or 'unknown'} MHz ({m['clock_source']})"
        )
    if r0["simd"]:
        for row in simd_table(reports):
            lines.append(
                f"{row['op']:>4} {row['impl']:>6} {row['dtype']:>8}: "
                f"{row['elements_per_s']:10.3g} elements/s measured, "
                f"{row['peak_fraction_text']} of the modelled 1-core peak"
            )
    if r0["scaling"]:
        fit = scaling_fit(reports)
        for kind in ("threads", "processes"):
            ups = ", ".join(f"{k}: {v:.2f}x" for k, v in fit[kind]["speedup"].items())
            lines.append(
                f"{kind}: speedup {ups}; Amdahl serial fraction "
                f"{_fraction(fit[kind]['serial_fraction'])} (fitted to medians)"
            )
        lines.append(f"weak scaling: Gustafson s' = {_fraction(fit['gustafson'])}")
    if r0["spmd"]:
        for kind, row in path_rows(reports).items():
            lines.append(f"{kind}: {row['model']}")
            for rank, path in enumerate(row["paths"]):
                lines.append(f"  rank {rank}: {' > '.join(path)}")
    if r0["divergence"]:
        d = r0["divergence"]
        times = ", ".join(f"{k} {v:.3f} ms" for k, v in d["median_ms"].items())
        lines.append(f"divergence on {d['device']} (warp {d['warp_size']}): {times}")
    elif r0["config"]["part"] in ("divergence", "all"):
        lines.append(f"divergence: not measured ({r0['divergence_note']})")
    return "\n".join(lines)
