"""Figures and widgets of chapter 1, "Data parallelism".

Pure functions turn the lab's reports (``labs.data_parallel``) or the analytic models
into rows; drawing functions return a new figure (no pyplot state); the widgets only
wire controls to them through ``utils.widgets``. Nothing here runs a lab. Figures are
drawn 6.4 inches wide or less, panels stacked, so they stay legible on a phone.

- bytes per rank: modelled (nccl-tests' factor), counted by the course's ring, and
  counted on the wire (the kernel's TCP counters), with gloo's framing predicted;
- the ring all-reduce, step by step, from ``utils.comm.ring_all_reduce``'s own index
  arithmetic (:func:`ring_schedule`);
- bus bandwidth against message size: the ring against the backend's all-reduce;
- each rank's compute and communication over one step, from measured timestamps,
  and a zoom on backward, where the buckets overlap it;
- compute- against communication-bound data parallelism (modelled);
- memory per rank as the world size grows, measured, and analytic at the scale of
  real models (with a SwiGLU activation model for LLaMA), next to a device's memory.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from matplotlib.patches import Patch, Rectangle

from utils.checks import check_int
from utils.comm import bus_factor
from utils.hardware import ACCELERATORS, GB, MODELS
from utils.memory_model import model_state_bytes, transformer_activation_bytes
from utils.plots import CATEGORY_COLORS, InlineFigure, byte_scale
from utils.report import CATEGORIES, format_bytes
from utils.report import field_of as _get
from utils.wire import GLOO_PREAMBLE

STATES = ("params", "grads", "optimizer")
WIDTH = 6.4  # inches: every figure of the chapter, so text stays legible on a phone


def _entry(report, phase: str, step: int | None = None) -> dict:
    """The memory entry of ``phase`` at ``step`` (None: the last step)."""
    entries = [e for e in _get(report, "memory") if e["phase"] == phase]
    if not entries:
        raise ValueError(f"rank {_get(report, 'rank')} recorded no phase {phase!r}")
    if step is None:
        return entries[-1]
    for e in entries:
        if e["step"] == step:
            return e
    raise ValueError(f"no phase {phase!r} at step {step}")


# ------------------------------------------------------------ bytes per rank
GLOO_SEGMENT = 1 << 20
"""``gloo/allreduce.h``, ``AllreduceOptions::kMaxSegmentSize``."""


def gloo_allreduce_transfers(nbytes: int, world_size: int) -> int:
    """Point-to-point transfers one rank sends in ``gloo::allreduce`` (its default
    ring, gloo/allreduce.cc): the buffer is cut into
    ``roundUp(max(ceil(S / 1 MiB), 2n), n)`` segments and each of the two phases
    sends every segment but the rank's own (``tests/test_wire.py``, ``gloo_sent``)."""
    n = check_int("world_size", world_size)
    check_int("nbytes", nbytes, minimum=0)
    segments = math.ceil(max(math.ceil(nbytes / GLOO_SEGMENT), 2 * n) / n) * n
    return 2 * (segments - segments // n)


def gloo_framing_bytes(calls: int, world_size: int, *, ring: bool) -> int:
    """Framing bytes one rank's sockets carry for ``calls`` all-reduces, each of a
    buffer of at most 2n MiB: 144 B (3 preambles) per transfer, as each rank sends
    and receives as many transfers; ``4(n-1)`` transfers per ``gloo::allreduce``,
    ``2(n-1)`` exchanges per ``utils.comm.ring_all_reduce``."""
    n = check_int("world_size", world_size)
    per_call = 2 * (n - 1) if ring else gloo_allreduce_transfers(0, n)
    return calls * per_call * 3 * GLOO_PREAMBLE


def comm_bytes_rows(runs: Mapping[str, Sequence[Any]], step: int = -1) -> list[dict]:
    """One row per run (rank 0's report): the bytes of step ``step`` three ways.

    ``modelled``: 2(N-1)/N x the gradient bytes (nccl-tests' factor, PERFORMANCE.md);
    ``reported`` and ``source``: what the lab's meter says (counted by our ring,
    else modelled); ``wire``: counted by the kernel's TCP counters (``utils.wire``),
    None where it cannot be; ``calls``: all-reduces in the step; ``framing``:
    :func:`gloo_framing_bytes` for them, so ``wire == modelled + framing`` when the
    payload is exactly the model's.
    """
    rows = []
    for name, reports in runs.items():
        r = min(reports, key=lambda x: _get(x, "rank"))
        extra, n = _get(r, "extra"), _get(r, "world_size")
        config = _get(extra, "config")
        calls = sum(e["kind"] == "comm" for e in _get(extra, "timeline")[step])
        grad_bytes = _get(extra, "grad_bytes")
        wire = _get(extra, "wire_bytes_per_step")
        rows.append(
            {
                "run": name,
                "world_size": n,
                "impl": config["impl"],
                "allreduce": config["allreduce"],
                "accum_steps": config["accum_steps"],
                "grad_bytes": grad_bytes,
                "modelled": round(bus_factor("all_reduce", n) * grad_bytes),
                "reported": _get(extra, "comm_bytes_per_step")[step],
                "source": "+".join(sorted(set(_get(extra, "comm_sources").values())))
                or "none",
                "wire": wire[step] if wire and wire[step] is not None else None,
                "calls": calls,
                "framing": gloo_framing_bytes(
                    calls, n, ring=config["allreduce"] == "ring"
                ),
            }
        )
    return rows


def comm_bytes_table(rows: Sequence[Mapping]) -> str:
    """:func:`comm_bytes_rows` as a Markdown table, every column saying its kind."""
    lines = [
        "| run | N | modelled: 2(N-1)/N x grads | lab's meter | counted on the wire "
        "| wire - modelled | gloo framing, predicted |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        wire = "n/a" if r["wire"] is None else f"{r['wire']:,} B"
        gap = "n/a" if r["wire"] is None else f"{r['wire'] - r['modelled']:,} B"
        per_call = r["framing"] // max(1, r["calls"]) // (3 * GLOO_PREAMBLE)
        lines.append(
            f"| {r['run']} | {r['world_size']} | {r['modelled']:,} B | "
            f"{r['reported']:,} B ({r['source']}) | {wire} | {gap} | "
            f"{r['calls']} all-reduces x {per_call} transfers x "
            f"{3 * GLOO_PREAMBLE} B = {r['framing']:,} B |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------ the ring
def ring_schedule(n: int) -> list[dict]:
    """What every rank does at each of the 2(n-1) exchanges of
    ``utils.comm.ring_all_reduce``, from its own index arithmetic.

    Reduce-scatter step s (exchange s): rank r sends chunk ``(r - s) % n`` to
    ``r + 1``, holding the contributions of ranks r, r-1, ..., r-s; it receives
    into a scratch buffer and adds it to chunk ``(r - s - 1) % n``. All-gather step
    s (exchange n-1+s): rank r sends chunk ``(r - s + 1) % n``, complete, and
    receives chunk ``(r - s) % n`` in place. One row per (exchange, rank):
    ``{"exchange", "phase", "step", "rank", "send_chunk", "send_ranks",
    "recv_into" ("temp" or a chunk), "updates_chunk", "to", "from"}``; the keys it
    shares with ``utils.data_parallel.demos.ring_trace_rank`` mean the same.
    """
    n = check_int("n", n, minimum=2)
    rows = []
    for exchange in range(2 * (n - 1)):
        for r in range(n):
            if exchange < n - 1:
                s, phase = exchange, "reduce-scatter"
                send = (r - s) % n
                holds = sorted((r - j) % n for j in range(s + 1))
                recv, updates = "temp", (r - s - 1) % n
            else:
                s, phase = exchange - (n - 1), "all-gather"
                send, holds = (r - s + 1) % n, list(range(n))
                recv = updates = (r - s) % n
            rows.append(
                {
                    "exchange": exchange,
                    "phase": phase,
                    "step": s,
                    "rank": r,
                    "send_chunk": send,
                    "send_ranks": holds,
                    "recv_into": recv,
                    "updates_chunk": updates,
                    "to": (r + 1) % n,
                    "from": (r - 1) % n,
                }
            )
    return rows


def ring_states(n: int) -> list[list[list[frozenset]]]:
    """The contributions each chunk holds on each rank before every exchange and
    after the last: ``states[e][rank][chunk]`` is a set of ranks. Built by playing
    :func:`ring_schedule`: what a rank receives is what its left neighbour sent."""
    rows = ring_schedule(n)
    state = [[frozenset({r}) for _ in range(n)] for r in range(n)]
    states = [state]
    for exchange in range(2 * (n - 1)):
        mine = {row["rank"]: row for row in rows if row["exchange"] == exchange}
        new = [list(chunks) for chunks in state]
        for r, row in mine.items():
            left = mine[row["from"]]
            if left["send_chunk"] != row["updates_chunk"]:
                raise AssertionError("the schedule sends one chunk, updates another")
            incoming = state[row["from"]][left["send_chunk"]]
            target = row["updates_chunk"]
            if row["phase"] == "reduce-scatter":
                new[r][target] = state[r][target] | incoming
            else:
                new[r][target] = incoming
        state = new
        states.append(state)
    return states


def draw_ring_schedule(n: int = 4):
    """One panel per exchange: ranks (rows) by chunks (columns), each cell showing
    whose contributions that chunk holds before the exchange; the outlined cells
    are the chunks sent to the right neighbour. A last panel shows the result."""
    rows, states = ring_schedule(n), ring_states(n)
    panels = 2 * (n - 1) + 1
    ncols = 2
    nrows = math.ceil(panels / ncols)
    fig = InlineFigure(figsize=(WIDTH, 2.1 * nrows + 0.4), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    cmap = "Blues"
    for e, ax in enumerate(axes):
        if e >= panels:
            ax.axis("off")
            continue
        state = states[e]
        counts = [[len(state[r][c]) for c in range(n)] for r in range(n)]
        ax.imshow(counts, cmap=cmap, vmin=0, vmax=n + 1, aspect="auto")
        for r in range(n):
            for c in range(n):
                text = "".join(str(k) for k in sorted(state[r][c]))
                color = "white" if counts[r][c] > n / 2 + 0.5 else "black"
                ax.text(c, r, text, ha="center", va="center", fontsize=9, color=color)
        if e < panels - 1:
            sent = [row for row in rows if row["exchange"] == e]
            for row in sent:
                ax.add_patch(
                    Rectangle(
                        (row["send_chunk"] - 0.5, row["rank"] - 0.5),
                        1,
                        1,
                        fill=False,
                        edgecolor="#c44e52",
                        linewidth=2.5,
                    )
                )
            phase, s = sent[0]["phase"], sent[0]["step"]
            formula = f"(r-{s})" if phase == "reduce-scatter" else f"(r-{s}+1)"
            title = f"{phase} {s + 1}: send chunk {formula} mod {n}"
        else:
            title = f"after {2 * (n - 1)} exchanges: all sums"
        ax.set_title(title, fontsize=9)
        ax.set_xticks(range(n), [str(c) for c in range(n)], fontsize=8)
        ax.set_yticks(range(n), [f"rank {r}" for r in range(n)], fontsize=8)
        ax.tick_params(length=0)
        if e % ncols == 0:
            ax.set_ylabel("")
        if e >= panels - ncols:
            ax.set_xlabel("chunk", fontsize=8)
    fig.suptitle(
        f"Ring all-reduce on {n} ranks: digits = ranks whose contribution a chunk "
        "holds;\nred outline = the chunk each rank sends to rank r+1 "
        "(utils.comm.ring_all_reduce)",
        fontsize=9,
    )
    return fig


# ------------------------------------------------------------- bus bandwidth
def draw_busbw(rows: Sequence[Mapping], world_size: int):
    """busbw (nccl-tests' definition) against message size, one line per impl
    (the median iteration), shaded between the 10th and 90th percentile
    iterations when the rows carry them (``utils.comm.time_all_reduce``)."""
    fig = InlineFigure(figsize=(WIDTH, 3.8), layout="constrained")
    ax = fig.add_subplot()
    for impl, marker in (("builtin", "o-"), ("ring", "s--")):
        mine = sorted((r for r in rows if r["impl"] == impl), key=lambda r: r["bytes"])
        label = "backend's all_reduce" if impl == "builtin" else "our ring (send/recv)"
        xs, ys = [r["bytes"] for r in mine], [r["busbw"] / GB for r in mine]
        (line,) = ax.semilogx(xs, ys, marker, label=label)
        if mine and all("time_p10_s" in r for r in mine):  # the iterations' spread
            factor = [r["busbw"] * r["time_s"] / GB for r in mine]  # busbw x t
            lo = [f / r["time_p90_s"] for f, r in zip(factor, mine)]
            hi = [f / r["time_p10_s"] for f, r in zip(factor, mine)]
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2)
    sizes = sorted({r["bytes"] for r in rows})
    ax.set_xticks(sizes, [format_bytes(s, 0) for s in sizes], fontsize=8, rotation=30)
    ax.set_xlabel("message size S")
    ax.set_ylabel("busbw (GB/s)")
    ax.set_title(
        f"All-reduce on {world_size} ranks: measured time t (median; band: 10th-"
        "90th percentile),\nbusbw = S/t x 2(N-1)/N (the factor is modelled: "
        "nccl-tests' accounting)",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    return fig


# ------------------------------------------------------------------ timelines
_COLORS = {
    "forward": CATEGORY_COLORS["params"],
    "backward": CATEGORY_COLORS["grads"],
    "step": CATEGORY_COLORS["optimizer"],
    "comm": CATEGORY_COLORS["activations"],
    "wait": "#bbbbbb",
}


def timeline_rows(reports: Sequence[Any], step: int = -1) -> list[dict]:
    """Every measured interval of one step, all ranks: {"rank", "lane" ("compute"
    or "comm"), "what" (forward/backward/step/comm/wait), "name", "start", "end"}
    in seconds from the rank's step start."""
    rows = []
    for report in sorted(reports, key=lambda r: _get(r, "rank")):
        for e in _get(_get(report, "extra"), "timeline")[step]:
            what = e["name"] if e["kind"] == "compute" else e["kind"]
            lane = "comm" if e["kind"] == "comm" else "compute"
            rows.append(
                {
                    "rank": _get(report, "rank"),
                    "lane": lane,
                    "what": what,
                    "name": e["name"],
                    "start": e["start"],
                    "end": e["end"],
                }
            )
    return rows


def _draw_lanes(ax, rows, labels: bool = False) -> None:
    """Per rank a compute lane above a comm lane; with ``labels`` each all-reduce
    gets its own thin sub-lane (so concurrent ones do not hide each other) and a
    label (b0, b1, ...)."""
    slot: dict[int, int] = {}
    count = {
        k: sum(r["lane"] == "comm" and r["rank"] == k for r in rows)
        for k in {r["rank"] for r in rows}
    }
    for r in rows:
        y, height = r["rank"] + (0.0 if r["lane"] == "compute" else 0.4), 0.35
        if labels and r["lane"] == "comm":
            k, m = slot.get(r["rank"], 0), max(1, count[r["rank"]])
            slot[r["rank"]] = k + 1
            y, height = y + 0.35 * k / m, 0.35 / m
        start, width = r["start"] * 1e3, (r["end"] - r["start"]) * 1e3
        ax.broken_barh(
            [(start, width)],
            (y, height),
            facecolors=_COLORS[r["what"]],
            edgecolors="white",
            linewidth=0.5,
            alpha=0.75 if r["lane"] == "comm" else 1.0,
        )
        if labels and r["lane"] == "comm":
            ax.text(
                start,
                y + height / 2,
                r["name"].replace("bucket ", "b") + " ",
                fontsize=7,
                va="center",
                ha="right",
                clip_on=True,
            )
    ranks = sorted({r["rank"] for r in rows})
    ax.set_yticks([r + 0.375 for r in ranks], [f"rank {r}" for r in ranks], fontsize=8)
    ax.invert_yaxis()
    ax.grid(axis="x", alpha=0.3)


def _legend(fig) -> None:
    fig.legend(
        handles=[Patch(color=c, label=k) for k, c in _COLORS.items()],
        loc="outside lower center",
        ncols=len(_COLORS),
        fontsize=8,
    )


def draw_timeline(runs: Mapping[str, Sequence[Any]], step: int = -1):
    """One panel per implementation; per rank, a compute lane (forward, backward,
    optimizer step, and the wait for communication) above a communication lane
    (each all-reduce from launch to completion). Same time axis in every panel."""
    fig = InlineFigure(figsize=(WIDTH, 1.3 + 1.7 * len(runs)), layout="constrained")
    axes = fig.subplots(len(runs), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (impl, reports) in zip(axes, runs.items()):
        _draw_lanes(ax, timeline_rows(reports, step))
        t = _get(reports[0], "timings")
        ax.set_title(
            f"{impl}: step {t['step'] * 1e3:.1f} ms, comm {t['comm'] * 1e3:.1f} ms,"
            f" overlapped {t['overlap'] * 1e3:.1f} ms\n(measured, rank 0, mean over "
            "steps after the first)",
            fontsize=9,
        )
    axes[-1].set_xlabel("ms since the step started (each rank's own clock)")
    _legend(fig)
    return fig


def timeline_widget(runs: Mapping[str, Sequence[Any]]):
    """:func:`draw_timeline` with a step control (prerendered)."""
    import ipywidgets as w

    from utils.widgets import interactive_figure

    steps = len(_get(_get(next(iter(runs.values()))[0], "extra"), "timeline"))
    options = [
        (f"step {s}" + (" (warm-up)" if s == 0 else ""), s) for s in range(steps)
    ]
    return interactive_figure(
        lambda step: draw_timeline(runs, step),
        prerender=True,
        step=w.Dropdown(options=options, value=steps - 1, description="show"),
    )


def _union(intervals):
    merged: list[list[float]] = []
    for s, e in sorted(intervals):
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    return merged


def overlap_rows(reports: Sequence[Any], step: int = -1) -> list[dict]:
    """Per rank, in one step: when backward ran, when its all-reduces ran, and how
    much of that communication ran while the rank computed (seconds, measured):
    ``{"rank", "backward": (start, end), "comm": (first start, last end),
    "messages", "comm_s", "hidden_s", "after_backward_s"}``."""
    out = []
    for rank in sorted({r["rank"] for r in timeline_rows(reports, step)}):
        rows = [r for r in timeline_rows(reports, step) if r["rank"] == rank]
        backward = [r for r in rows if r["what"] == "backward"]
        comm = [(r["start"], r["end"]) for r in rows if r["lane"] == "comm"]
        compute = _union(
            [
                (r["start"], r["end"])
                for r in rows
                if r["lane"] == "compute" and r["what"] != "wait"
            ]
        )
        busy = _union(comm)
        hidden = sum(
            max(0.0, min(b, d) - max(a, c)) for a, b in compute for c, d in busy
        )
        bwd_end = max(r["end"] for r in backward)
        after = sum(max(0.0, e - max(s, bwd_end)) for s, e in busy)
        out.append(
            {
                "rank": rank,
                "backward": (min(r["start"] for r in backward), bwd_end),
                "comm": (min(s for s, _ in comm), max(e for _, e in comm)),
                "messages": len(comm),
                "comm_s": sum(e - s for s, e in busy),
                "hidden_s": hidden,
                "after_backward_s": after,
            }
        )
    return out


def draw_overlap_zoom(reports: Sequence[Any], step: int = -1, title: str = ""):
    """The bucketed timeline of one step, zoomed on backward: when each bucket's
    all-reduce (b0, b1, ...) was launched while backward ran, and rank 0's measured
    split of its communication into hidden (during compute) and after backward."""
    rows = timeline_rows(reports, step)
    spans = overlap_rows(reports, step)
    lo = min(s["backward"][0] for s in spans)
    longest = max(s["backward"][1] - s["backward"][0] for s in spans)
    hi = max(s["backward"][1] for s in spans) + 0.6 * longest
    pad = 0.15 * (hi - lo)
    fig = InlineFigure(figsize=(WIDTH, 1.2 + 0.75 * len(spans)), layout="constrained")
    ax = fig.add_subplot()
    _draw_lanes(ax, rows, labels=True)
    ax.set_xlim((lo - pad) * 1e3, (hi + pad) * 1e3)
    r0 = spans[0]
    ax.set_title(
        (title + "\n" if title else "")
        + f"zoom on backward (measured): rank 0's {r0['messages']} all-reduces "
        f"took {r0['comm_s'] * 1e3:.1f} ms,\n{r0['hidden_s'] * 1e3:.1f} ms of it "
        f"while computing, {r0['after_backward_s'] * 1e3:.1f} ms after backward",
        fontsize=9,
    )
    ax.set_xlabel("ms since the step started (each rank's own clock)")
    _legend(fig)
    return fig


# -------------------------------------------- compute- or communication-bound
PEAK_BF16_FLOPS = 989.4e12
"""H100 SXM, dense BF16 tensor-core FLOP/s: NVIDIA's H100 datasheet gives 1,979
TFLOPS "with sparsity" and notes that dense figures are one half
(https://www.nvidia.com/en-us/data-center/h100/)."""
MFU = 0.40
"""Model FLOPs utilisation assumed: Llama 3's pre-training on H100s reports 38-43 %
BF16 MFU (Dubey et al., "The Llama 3 Herd of Models", 2024, Table 4)."""
LINKS = {
    "NVLink 4, 8 GPUs in a node": (450e9, 8),
    "400 Gb/s InfiniBand per GPU, 64 GPUs": (50e9, 64),
}
"""(busbw upper bound in B/s, N) per example. NVLink 4 on the H100 SXM: 900 GB/s
in total, 450 GB/s each way (NVIDIA H100 datasheet); between DGX H100 nodes one
400 Gb/s ConnectX-7 port per GPU (NVIDIA DGX H100 datasheet), 50 GB/s. Link speeds
bound busbw (nccl-tests PERFORMANCE.md: busbw "should reflect the speed of the
hardware bottleneck"); they are not measurements."""


def dp_step_times(
    params: float,
    tokens_per_device: float,
    world_size: int,
    busbw: float,
    *,
    flops: float = PEAK_BF16_FLOPS,
    mfu: float = MFU,
    grad_bytes: int = 2,
) -> dict[str, float]:
    """Modelled seconds per step on one device: ``compute`` = 6 Psi tokens /
    (flops x mfu) (forward and backward, 6 FLOPs per parameter per token; Kaplan et
    al. 2020, "Scaling Laws for Neural Language Models", section 2.1) and ``comm``
    = 2(N-1)/N x Psi x grad_bytes / busbw (one all-reduce of the gradients)."""
    compute = 6 * params * tokens_per_device / (flops * mfu)
    comm = bus_factor("all_reduce", world_size) * params * grad_bytes / busbw
    return {"compute": compute, "comm": comm}


def critical_tokens_per_device(
    world_size: int,
    busbw: float,
    *,
    flops: float = PEAK_BF16_FLOPS,
    mfu: float = MFU,
    grad_bytes: int = 2,
) -> float:
    """Tokens per device per step at which :func:`dp_step_times`' two terms are
    equal: 2(N-1)/N x grad_bytes x flops x mfu / (6 busbw). Psi cancels: the
    critical batch per device does not depend on the model's size."""
    factor = bus_factor("all_reduce", world_size)
    return factor * grad_bytes * flops * mfu / (6 * busbw)


def draw_compute_vs_comm(params: float = 6.74e9, grad_bytes: int = 2):
    """Modelled time per step against tokens per device: compute, and the
    gradient all-reduce over each of :data:`LINKS`, with the critical batch."""
    tokens = [2.0**k for k in range(7, 18)]
    fig = InlineFigure(figsize=(WIDTH, 4.2), layout="constrained")
    ax = fig.add_subplot()
    compute = [
        dp_step_times(params, b, 2, 1.0, grad_bytes=grad_bytes)["compute"]
        for b in tokens
    ]
    ax.loglog(tokens, compute, "k-", label=f"compute, 6Ψ per token at {MFU:.0%} MFU")
    for (name, (busbw, n)), style in zip(LINKS.items(), ("--", ":")):
        comm = dp_step_times(params, 1, n, busbw, grad_bytes=grad_bytes)["comm"]
        b_star = critical_tokens_per_device(n, busbw, grad_bytes=grad_bytes)
        (line,) = ax.loglog(
            tokens, [comm] * len(tokens), style, label=f"all-reduce, {name}"
        )
        ax.axvline(b_star, color=line.get_color(), linewidth=0.8, alpha=0.6)
        ax.annotate(
            f"{b_star:,.0f} tokens",
            (b_star, comm),
            xytext=(4, 6),
            textcoords="offset points",
            fontsize=8,
            color=line.get_color(),
        )
    ax.set_xlabel("tokens per device per step")
    ax.set_ylabel("seconds per step (modelled)")
    ax.set_title(
        f"Ψ = {params / 1e9:.2f} B parameters, H100 SXM, {grad_bytes}-byte gradients:"
        "\nleft of a crossing the step is communication-bound (modelled)",
        fontsize=9,
    )
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3, which="both")
    return fig


# ------------------------------------------------------------ memory, measured
def memory_scaling_rows(
    runs: Mapping[int, Sequence[Any]], phase: str = "step", kind: str = "current"
) -> list[dict]:
    """One row per (world size, rank): bytes by category at ``phase`` of the last
    step, the rows of the batch this rank computed, and the analytic model state
    (fp32 Adam, 16 B/param: the full replica, whatever the world size).

    ``runs`` maps a world size to that run's reports.
    """
    rows = []
    for world_size in sorted(runs):
        for report in sorted(runs[world_size], key=lambda r: _get(r, "rank")):
            values = _entry(report, phase)[kind]
            predicted = model_state_bytes(
                _get(report, "num_params"), mixed_precision=False
            )
            rows.append(
                {
                    "world_size": world_size,
                    "rank": _get(report, "rank"),
                    **{c: int(values[c]) for c in CATEGORIES},
                    "states": sum(int(values[c]) for c in STATES),
                    "predicted_states": predicted.total,
                    "rows_per_rank": _get(_get(report, "extra"), "rows_per_rank"),
                }
            )
    return rows


def draw_memory_scaling(
    runs: Mapping[int, Sequence[Any]], phase: str = "step", kind: str = "current"
):
    """Top: every rank's memory by category, grouped by world size, with the
    predicted full replica as a dashed line. Bottom: rows of the batch per rank."""
    rows = memory_scaling_rows(runs, phase, kind)
    totals = [sum(r[c] for c in CATEGORIES) for r in rows]
    scale, unit = byte_scale(max(totals + [r["predicted_states"] for r in rows]))
    fig = InlineFigure(figsize=(WIDTH, 5.6), layout="constrained")
    top, bottom_ax = fig.subplots(2, 1, height_ratios=[2.2, 1])
    xs, labels, x = [], [], 0.0
    for world_size in sorted(runs):
        group = [r for r in rows if r["world_size"] == world_size]
        start = x
        for r in group:
            bottom = 0.0
            for c in CATEGORIES:
                top.bar(x, r[c] / scale, 0.8, bottom=bottom, color=CATEGORY_COLORS[c])
                bottom += r[c] / scale
            xs.append(x)
            labels.append(str(r["rank"]))
            x += 1
        top.hlines(
            group[0]["predicted_states"] / scale,
            start - 0.45,
            x - 0.55,
            colors="black",
            linestyles="--",
            linewidth=1,
        )
        top.annotate(
            f"N = {world_size}",
            ((start + x - 1) / 2, 0),
            ha="center",
            xytext=(0, -28),
            textcoords="offset points",
            fontsize=9,
        )
        x += 0.8
    top.set_xticks(xs, labels, fontsize=8)
    top.set_xlabel("rank, grouped by world size N", labelpad=16)
    top.set_ylabel(f"{kind} memory ({unit})")
    top.set_title(f"Memory per rank at the end of '{phase}' (measured)", fontsize=10)
    handles = [Patch(color=CATEGORY_COLORS[c], label=c) for c in CATEGORIES]
    handles.append(
        top.plot([], [], "k--", linewidth=1, label="predicted model states")[0]
    )
    fig.legend(handles=handles, fontsize=8, loc="outside upper center", ncols=3)
    top.grid(axis="y", alpha=0.3)
    sizes = sorted(runs)
    per_rank = [
        next(r["rows_per_rank"] for r in rows if r["world_size"] == n) for n in sizes
    ]
    bottom_ax.bar([str(n) for n in sizes], per_rank, color="#8172b3")
    bottom_ax.set_xlabel("world size N")
    bottom_ax.set_ylabel("rows per rank")
    bottom_ax.set_title("The batch is split", fontsize=10)
    bottom_ax.grid(axis="y", alpha=0.3)
    return fig


def memory_scaling_widget(runs: Mapping[int, Sequence[Any]]):
    """:func:`draw_memory_scaling` with phase and current/peak controls (all drawn
    at build time, so they switch in the static book too)."""
    import ipywidgets as w

    from utils.widgets import interactive_figure

    return interactive_figure(
        lambda phase, kind: draw_memory_scaling(runs, phase, kind),
        prerender=True,
        phase=w.Dropdown(
            options=["forward", "backward", "step"], value="step", description="end of"
        ),
        kind=w.ToggleButtons(options=["current", "peak"], description="memory"),
    )


# ------------------------------------------------------------ memory, analytic
WORLD_SIZES = (1, 2, 4, 8, 16, 32, 64)

SWIGLU = {
    "LLaMA-2 7B": {"ffn": 11008, "vocab": 32000},
    "LLaMA-2 13B": {"ffn": 13824, "vocab": 32000},
}
"""LLaMA-2's SwiGLU intermediate width and vocabulary (Touvron et al. 2023, "Llama
2"; the released configs' ``intermediate_size`` and ``vocab_size``). Models not
listed are GPT-style (4h GeLU MLP, dropout): Korthikanti et al.'s formula."""


def swiglu_layer_activation_bytes(
    seq_len: int, micro_batch: int, hidden: int, heads: int, ffn: int
) -> int:
    """Activation bytes one LLaMA-style layer stores for backward (16-bit
    activations, no dropout, RMSNorm, SwiGLU MLP, attention by a fused
    flash-attention kernel), counted as Korthikanti et al. (2022, section 4.1)
    count a GPT layer: the inputs each operation keeps for its backward.

    With s = ``seq_len``, b = ``micro_batch``, h = ``hidden``, a = ``heads``,
    f = ``ffn``:

    * two RMSNorms: each keeps its input (2sbh) and an fp32 1/rms per token
      (4sb): 4sbh + 8sb;
    * attention: the input of the Q, K, V projections (2sbh, shared by the three);
      Q and K after the rotary embedding and V (6sbh), which flash attention keeps
      in place of the s x s score matrices (it recomputes those, so no 5as^2 b
      term: what Korthikanti's *selective* recomputation achieves for GPT); its
      output, which is the output projection's input (2sbh); and its fp32
      log-sum-exp per head and token (4asb): 10sbh + 4asb;
    * SwiGLU MLP, W2(silu(W1 x) * W3 x): the input x of W1 and W3 (2sbh), the
      gate W1 x (silu's backward needs it), the up projection W3 x and silu(W1 x)
      (the product's backward needs both factors), and the product, W2's input
      (4 x 2sbf): 2sbh + 8sbf;
    * no dropout masks, residual additions keep nothing.

    Total: sbh (16 + 8f/h) + 8sb + 4asb. For LLaMA-2 7B (f/h = 2.6875) that is
    about 37.5 sbh against the GPT formula's 34 sbh with selective recomputation,
    whose 19 sbh MLP assumes f = 4h with GeLU and dropout. Left out, as by the GPT
    formula: the embedding and the output layer (the logits, s b V, see
    :func:`logits_bytes`). A kernel that recomputes silu(W1 x) in backward keeps
    2sbf less; eager PyTorch keeps more (an fp32 copy inside RMSNorm, a copy of the
    attention output made by its transpose).
    """
    for name, value in (
        ("seq_len", seq_len),
        ("micro_batch", micro_batch),
        ("hidden", hidden),
        ("heads", heads),
        ("ffn", ffn),
    ):
        check_int(name, value)
    s, b, h, a, f = seq_len, micro_batch, hidden, heads, ffn
    norms = 2 * (2 * s * b * h + 4 * s * b)
    attention = 10 * s * b * h + 4 * a * s * b
    mlp = 2 * s * b * h + 8 * s * b * f
    return norms + attention + mlp


def logits_bytes(seq_len: int, micro_batch: int, vocab: int) -> int:
    """The output layer's logits, left out of both activation formulas: 16-bit
    logits (2sbV) plus the fp32 copy a cross-entropy in fp32 keeps (4sbV)."""
    return 6 * seq_len * micro_batch * vocab


def dp_activation_bytes(model: str, seq_len: int = 2048, micro_batch: int = 1) -> int:
    """All layers of ``model``: :func:`swiglu_layer_activation_bytes` for the LLaMA
    models of :data:`SWIGLU`, else Korthikanti et al. with selective recompute."""
    shape = MODELS[model]
    if model in SWIGLU:
        per_layer = swiglu_layer_activation_bytes(
            seq_len, micro_batch, shape["hidden"], shape["heads"], SWIGLU[model]["ffn"]
        )
        return per_layer * shape["layers"]
    return transformer_activation_bytes(
        seq_len,
        micro_batch,
        shape["hidden"],
        shape["heads"],
        shape["layers"],
        recompute="selective",
    )


def dp_memory_rows(
    model: str, global_batch: int = 512, seq_len: int = 2048, micro_batch: int = 1
) -> list[dict]:
    """Per-rank bytes under data parallelism at each of ``WORLD_SIZES``.

    Each rank gets global_batch / N sequences and works through them in
    micro-batches of ``micro_batch`` (gradient accumulation), so its activations are
    those of one micro-batch (:func:`dp_activation_bytes`). Model states:
    mixed-precision Adam, 16 B/param, replicated on every rank (the ZeRO paper's
    accounting).
    """
    shape = MODELS[model]
    states = model_state_bytes(int(shape["params"])).as_dict()
    acts = dp_activation_bytes(model, seq_len, micro_batch)
    return [
        {
            "world_size": n,
            "rows_per_rank": global_batch // n,
            **states,
            "activations": acts,
            "total": sum(states.values()) + acts,
        }
        for n in WORLD_SIZES
    ]


def draw_dp_memory_limit(model: str, device: str, global_batch: int = 512):
    """Top: per-rank memory by category against N, and the device's memory.
    Bottom: the sequences each rank processes per step (global_batch / N)."""
    rows = dp_memory_rows(model, global_batch)
    memory = next(a for a in ACCELERATORS if a.name == device).memory_bytes
    labels = [str(r["world_size"]) for r in rows]
    fig = InlineFigure(figsize=(WIDTH, 5.8), layout="constrained")
    top, bottom_ax = fig.subplots(2, 1, height_ratios=[2, 1])
    bottom = [0.0] * len(rows)
    for c in (*STATES, "activations"):
        heights = [r[c] / GB for r in rows]
        top.bar(labels, heights, 0.7, bottom=bottom, color=CATEGORY_COLORS[c], label=c)
        bottom = [b + h for b, h in zip(bottom, heights)]
    top.axhline(
        memory / GB,
        color="black",
        linestyle="--",
        linewidth=1.5,
        label=f"{device}: {memory / GB:.0f} GB",
    )
    top.set_xlabel("data-parallel ranks N")
    top.set_ylabel("GB per rank (modelled)")
    top.set_ylim(0, 1.15 * max(max(bottom), memory / GB))
    states = sum(rows[0][c] for c in STATES)
    if rows[0]["total"] <= memory:
        verdict = "fits at every N (and never needs N to fit)"
    elif states > memory:
        verdict = f"never fits: model states alone are {states / GB:.0f} GB per rank"
    else:
        verdict = "does not fit at any N"
    acts = "SwiGLU count" if model in SWIGLU else "Korthikanti, selective"
    top.set_title(f"{model} on {device}: {verdict}\n(activations: {acts})", fontsize=9)
    # Outside the axes, above them: never over the bars, whatever N.
    fig.legend(fontsize=8, loc="outside upper center", ncols=3)
    top.grid(axis="y", alpha=0.3)
    bottom_ax.bar(labels, [r["rows_per_rank"] for r in rows], color="#8172b3")
    bottom_ax.set_yscale("log", base=2)
    bottom_ax.set_xlabel("data-parallel ranks N")
    bottom_ax.set_ylabel("sequences per rank")
    bottom_ax.set_title(f"global batch {global_batch}, split N ways", fontsize=9)
    bottom_ax.grid(axis="y", alpha=0.3)
    return fig


def dp_memory_limit_widget():
    """:func:`draw_dp_memory_limit` with model and device controls (prerendered)."""
    import ipywidgets as w

    from utils.widgets import interactive_figure

    devices = ["A100 40GB", "H100 SXM", "MI300X"]
    return interactive_figure(
        draw_dp_memory_limit,
        prerender=True,
        model=w.Dropdown(options=list(MODELS), value="LLaMA-2 7B", description="model"),
        device=w.Dropdown(options=devices, value="H100 SXM", description="device"),
    )
