"""Figures and tables of chapter 7, "DP x TP x PP, and planning a run".

Pure functions turn what the chapter has, ``ParallelDims`` layouts, the combined
lab's rank reports (``labs.combined``, measured) and the planner's estimates
(``utils.planner``, modelled), into rows, and rows into figures. Drawing functions
return a new :class:`~utils.plots.InlineFigure` (no pyplot state). Every figure
says in its title or legend which of its numbers are measured, counted or
modelled. Nothing here runs a lab. Figures are 6.4 inches wide, as chapter 5's.

* :func:`group_rows` / :func:`draw_groups`: which ranks form each group, the ranks
  at their (tp, dp, pp) coordinates, one panel per axis, exactly the groups
  ``ParallelDims.ranks`` gives; :func:`link_rows`: which groups stay inside a node
  and which cross nodes, for a number of GPUs per node.
* :func:`memory_rows` / :func:`draw_memory_vs_planner`: every rank's measured
  bytes by category next to the planner's for its pipeline stage.
* :func:`axis_model`, :func:`comm_rows` / :func:`draw_comm_by_axis`: the bytes a
  rank sends per step on each axis, as the lab reports them (tp and dp modelled
  from the collectives' sizes, pp counted), next to the papers' formulas at the
  lab's conventions; :func:`zero_rows`: the dp bytes and the socket bytes of ZeRO
  0, 1 and 2 on the same layout.
* :func:`bubble_rows` / :func:`draw_bubble`: the measured bubble against the
  planner's.
* :data:`NARAYANAN_TABLE1`, :data:`MEGATRON_TABLE1` / :func:`paper_rows`: published
  configurations recomputed by the planner; :func:`top_layouts`,
  :func:`draw_step_breakdown`: the planner's search and its step time per axis.
* :func:`cost_rows`: the cost of running each lab, wall time x GPUs x a price.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from matplotlib.patches import Patch
from mpl_toolkits.mplot3d import Axes3D  # noqa: F401 (registers "3d")

from utils.comm import bytes_sent
from utils.dims import ParallelDims
from utils.pipeline_parallel.schedules import stages_of
from utils.planner import ModelSpec, estimate
from utils.plots import CATEGORY_COLORS, HEADROOM, InlineFigure, byte_scale
from utils.report import field_of as _get

WIDTH = 6.4  # inches: every figure of the chapter
AXES = ("tp", "dp", "pp")
"""The three axes, fastest-varying first (``utils.dims``'s rank order)."""
AXIS_COLORS = {"tp": "#4c72b0", "dp": "#55a868", "pp": "#dd8452"}
AXIS_NAMES = {"tp": "tensor", "dp": "data", "pp": "pipeline"}
STATES = ("params", "grads", "optimizer", "activations")
"""The categories the planner predicts and the lab measures, in stacking order."""
LAB_ELEMENT_BYTES = 4
"""The lab trains in fp32: every activation, gradient and parameter is 4 bytes."""
SOURCE_HATCH = {"modelled": "///", "counted": None}


def _check_dims(dims: ParallelDims) -> None:
    if not isinstance(dims, ParallelDims):
        raise ValueError(f"dims must be a ParallelDims, got {dims!r}")
    if dims.cp != 1:
        raise ValueError(f"these figures draw dp x tp x pp only, got cp={dims.cp}")


# ------------------------------------------------------------------ the groups
def group_rows(dims: ParallelDims) -> list[dict]:
    """One row per group of every axis: ``axis``, ``index`` (its order among the
    axis' groups), ``ranks`` (as ``dims.ranks(axis)`` lists them, by coordinate
    along the axis) and ``points``, each rank's (tp, dp, pp) coordinates."""
    _check_dims(dims)
    rows = []
    for axis in AXES:
        for i, ranks in enumerate(dims.ranks(axis)):
            points = [tuple(dims.coords(r)[a] for a in AXES) for r in ranks]
            rows.append(dict(axis=axis, index=i, ranks=list(ranks), points=points))
    return rows


def draw_groups(dims: ParallelDims) -> InlineFigure:
    """One 3-D panel per axis: every rank at its (tp, dp, pp) coordinates, labelled
    with its number, and that axis' groups drawn as lines through their ranks (a
    group of one rank, an axis of degree 1, is a ring around it). Each group's
    line has gid ``"<axis>:<r0>,<r1>,..."``."""
    rows = group_rows(dims)
    fig = InlineFigure(figsize=(WIDTH, 3.0), layout="constrained")
    everyone = [tuple(dims.coords(r)[a] for a in AXES) for r in range(dims.world_size)]
    for k, axis in enumerate(AXES):
        ax = fig.add_subplot(1, 3, k + 1, projection="3d")
        ax.scatter(*zip(*everyone), color="#444444", s=14, depthshade=False)
        for rank, (x, y, z) in enumerate(everyone):
            ax.text(x, y, z + 0.08, str(rank), fontsize=7, ha="center")
        mine = [r for r in rows if r["axis"] == axis]
        for row in mine:
            xs, ys, zs = zip(*row["points"])
            gid = f"{axis}:" + ",".join(map(str, row["ranks"]))
            (line,) = ax.plot(
                xs,
                ys,
                zs,
                "-o" if len(row["ranks"]) > 1 else "o",
                color=AXIS_COLORS[axis],
                lw=2.2,
                ms=7 if len(row["ranks"]) > 1 else 11,
                mfc="none",
                alpha=0.85,
            )
            line.set_gid(gid)
        ax.set_title(
            f"{axis} ({AXIS_NAMES[axis]}): {len(mine)} groups of {dims.degree(axis)}",
            fontsize=8,
        )
        for setter, degree in (
            (ax.set_xticks, dims.tp),
            (ax.set_yticks, dims.dp),
            (ax.set_zticks, dims.pp),
        ):
            setter(range(degree))
        ax.set_xlabel("tp", fontsize=7, labelpad=-10)
        ax.set_ylabel("dp", fontsize=7, labelpad=-10)
        ax.set_zlabel("pp", fontsize=7, labelpad=-10)
        ax.tick_params(labelsize=6, pad=-3)
        ax.view_init(elev=18, azim=-60)
    fig.suptitle(f"{dims}: which ranks form each group", fontsize=9)
    return fig


def link_rows(dims: ParallelDims, gpus_per_node: int) -> list[dict]:
    """Per axis: its degree, how many of its groups lie inside one node and how
    many span nodes, with ranks placed on nodes in order (rank r on node
    ``r // gpus_per_node``: how torchrun numbers the ranks of ``--nnodes N
    --nproc-per-node G``, node rank times G plus the local rank)."""
    _check_dims(dims)
    if isinstance(gpus_per_node, bool) or not isinstance(gpus_per_node, int):
        raise ValueError(f"gpus_per_node must be an int, got {gpus_per_node!r}")
    if gpus_per_node < 1 or dims.world_size % gpus_per_node:
        raise ValueError(
            f"gpus_per_node={gpus_per_node} must divide world_size={dims.world_size}"
        )
    rows = []
    for axis in AXES:
        groups = dims.ranks(axis)
        nodes = [sorted({r // gpus_per_node for r in g}) for g in groups]
        crossing = sum(len(n) > 1 for n in nodes)
        rows.append(
            dict(
                axis=axis,
                degree=dims.degree(axis),
                groups=len(groups),
                inside=len(groups) - crossing,
                across=crossing,
                nodes_per_group=max(len(n) for n in nodes),
                link="inside a node" if not crossing else "across nodes",
                example=groups[0],
            )
        )
    return rows


# ------------------------------------------------------------------ memory
def _rank_label(row: Mapping) -> str:
    """ "5\ntp1dp0pp1": a rank and its coordinates, for an x tick."""
    return f"{row['rank']}\n" + "".join(f"{a}{row['coords'][a]}" for a in AXES)


def _by_rank(reports: Sequence[Any]) -> list[Any]:
    if not reports:
        raise ValueError("no reports to draw")
    ordered = sorted(reports, key=lambda r: _get(r, "rank"))
    ranks = [_get(r, "rank") for r in ordered]
    if len(set(ranks)) != len(ranks):
        raise ValueError(f"two reports share a rank: ranks {ranks}")
    return ordered


def memory_rows(reports: Sequence[Any]) -> list[dict]:
    """Per rank: its coordinates, ``measured`` bytes by category (the lab's ledger:
    params, grads and optimizer states after the last step's backward and optimizer
    step, activations at their peak) and ``modelled``, the planner's bytes for its
    pipeline stage (``Estimate.stages[pp]["device"]``), with their differences."""
    rows = []
    for r in _by_rank(reports):
        e = _get(r, "extra")
        states, plan = _get(e, "states"), _get(e, "predicted")
        measured = {k: int(states[k]) for k in STATES[:3]}
        measured["activations"] = int(_get(e, "peak_activation_bytes"))
        modelled = {k: int(plan[k]) for k in STATES}
        rows.append(
            dict(
                rank=_get(r, "rank"),
                coords=dict(_get(r, "coords")),
                measured=measured,
                modelled=modelled,
                difference={k: measured[k] - modelled[k] for k in STATES},
            )
        )
    return rows


def draw_memory_vs_planner(rows: Sequence[Mapping], title: str = "") -> InlineFigure:
    """Per rank, two stacked bars: the measured bytes by category (solid) and the
    planner's for the rank's stage (hatched, modelled). Each bar segment has gid
    ``"<rank>:<measured|modelled>:<category>"``."""
    if not rows:
        raise ValueError("no rows to draw")
    tops = [sum(r[k].values()) for r in rows for k in ("measured", "modelled")]
    div, unit = byte_scale(max(tops))
    fig = InlineFigure(figsize=(WIDTH, 3.4), layout="constrained")
    ax = fig.add_subplot()
    width = 0.38
    for i, row in enumerate(rows):
        for side, kind in ((-1, "measured"), (1, "modelled")):
            bottom = 0.0
            for cat in STATES:
                height = row[kind][cat] / div
                (bar,) = ax.bar(
                    i + side * width / 2,
                    height,
                    width * 0.95,
                    bottom=bottom,
                    color=CATEGORY_COLORS[cat] if kind == "measured" else "white",
                    edgecolor=CATEGORY_COLORS[cat],
                    hatch=None if kind == "measured" else "///",
                )
                bar.set_gid(f"{row['rank']}:{kind}:{cat}")
                bottom += height
    labels = [_rank_label(row) for row in rows]
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set_xlabel("rank and its coordinates", fontsize=8)
    ax.set_ylabel(f"bytes ({unit})", fontsize=8)
    ax.set_ylim(0, HEADROOM * max(tops) / div)
    handles = [Patch(color=CATEGORY_COLORS[c], label=c) for c in STATES]
    handles += [
        Patch(facecolor="#999999", label="measured (ledger)"),
        Patch(facecolor="white", edgecolor="black", hatch="///", label="modelled"),
    ]
    ax.legend(handles=handles, fontsize=7, ncols=3, loc="upper right", frameon=False)
    ax.set_title(title or "memory per rank: measured (left) vs planner (right)",
                 fontsize=9)  # fmt: skip
    ax.tick_params(labelsize=7)
    ax.grid(axis="y", alpha=0.3)
    return fig


# ------------------------------------------------------------------ bytes per axis
def axis_model(cfg, pp_rank: int) -> dict[str, int]:
    """Bytes one rank of pipeline stage ``pp_rank`` sends per step on each axis, by
    the papers' formulas at the lab's conventions (fp32 elements, whole activations
    between stages, one flat ZeRO bucket), for a lab ``Config`` ``cfg``:

    * tp: the blocks' all-reduces, ``8 b s h (t-1)/t`` elements per layer per
      micro-batch (Narayanan et al. 2021, section 3.2), over the stage's layers;
    * pp: one ``b s h`` message per micro-batch for every forward a chunk sends on
      (not the last stage) and every backward it sends back (not the first);
    * dp: over the dp group, the stage's gradients (padded to ``ceil(n/d) d``):
      one all-reduce at ZeRO-0, a reduce-scatter and an all-gather at ZeRO-1, and
      at ZeRO-2 a reduce-scatter after each of the m micro-batches' backward plus
      the all-gather (bandwidth-optimal bytes, ``utils.comm.bytes_sent``).

    What the planner's ``Estimate.comm`` counts differently: 16-bit elements, the
    worst stage only, both directions across each pipeline boundary, and
    Narayanan et al.'s scatter/gather (each tp rank sends ``1/t`` of a message).
    """
    plan = cfg.plan()
    p, v, m = cfg.pp_size, cfg.v, cfg.micro_batches
    t, d = cfg.tp_size, cfg.dp_size
    if not 0 <= pp_rank < p:
        raise ValueError(f"pp_rank must be in [0, {p}), got {pp_rank!r}")
    b, s, h = cfg.message_shape()
    elem = LAB_ELEMENT_BYTES
    tp = 8 * b * s * h * (t - 1) // t * plan.stage_layers[pp_rank] * m * elem
    chunks = stages_of(pp_rank, p, v)
    sends = m * sum((c < p * v - 1) + (c > 0) for c in chunks)
    pp = sends * b * s * h * elem
    n = plan.stages[pp_rank]["params"]
    buffer = -(-n // d) * d * elem
    if cfg.zero_stage == 0:
        dp = bytes_sent("all_reduce", buffer, d)
    else:
        scatters = m if cfg.zero_stage == 2 else 1
        dp = scatters * bytes_sent("reduce_scatter", buffer, d)
        dp += bytes_sent("all_gather", buffer, d)
    return {"tp": int(tp), "pp": int(pp), "dp": int(dp)}


def comm_rows(reports: Sequence[Any], cfg) -> list[dict]:
    """Per rank: the bytes it sent in the last step on each axis as the lab reports
    them (``lab``, with ``sources``: tp and dp modelled from the collectives'
    sizes, pp counted send by send), :func:`axis_model`'s ``model`` for its stage,
    the planner's ``Estimate.comm`` (``planner``, its own conventions) and the
    bytes its sockets sent (``wire``, counted by the kernel)."""
    plan = cfg.plan()
    models: dict[int, dict] = {}
    rows = []
    for r in _by_rank(reports):
        e = _get(r, "extra")
        pp = _get(r, "coords")["pp"]
        if pp not in models:
            models[pp] = axis_model(cfg, pp)
        rows.append(
            dict(
                rank=_get(r, "rank"),
                coords=dict(_get(r, "coords")),
                lab={a: int(_get(e, "comm_by_axis")[a]) for a in AXES},
                sources={a: _get(e, "comm_sources")[a] for a in AXES},
                model=dict(models[pp]),
                planner={a: int(plan.comm[a]) for a in AXES},
                wire=int(_get(e, "wire_bytes_per_step")[-1]),
            )
        )
    return rows


def draw_comm_by_axis(rows: Sequence[Mapping], title: str = "") -> InlineFigure:
    """Per rank, one bar per axis: the bytes it sent in the last step, hatched
    where the lab modelled them from the collectives' sizes and solid where it
    counted them; a black tick marks :func:`axis_model` (modelled). Each bar has
    gid ``"<rank>:<axis>"``."""
    if not rows:
        raise ValueError("no rows to draw")
    top = max(max(r["lab"][a], r["model"][a]) for r in rows for a in AXES)
    div, unit = byte_scale(top)
    fig = InlineFigure(figsize=(WIDTH, 3.2), layout="constrained")
    ax = fig.add_subplot()
    width = 0.27
    seen = set()
    for i, row in enumerate(rows):
        for k, axis in enumerate(AXES):
            x = i + (k - 1) * width
            source = row["sources"][axis]
            label = f"{axis} ({source})"
            (bar,) = ax.bar(
                x,
                row["lab"][axis] / div,
                width * 0.92,
                color=AXIS_COLORS[axis],
                hatch=SOURCE_HATCH.get(source),
                edgecolor="white",
                label=None if label in seen else label,
            )
            bar.set_gid(f"{row['rank']}:{axis}")
            seen.add(label)
            ax.plot(
                x,
                row["model"][axis] / div,
                "_",
                color="black",
                ms=10,
                mew=1.6,
                label=None if "tick" in seen else "papers' formula (modelled)",
            )
            seen.add("tick")
    labels = [_rank_label(row) for row in rows]
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set_ylabel(f"bytes sent per step ({unit})", fontsize=8)
    ax.set_ylim(0, HEADROOM * top / div)
    ax.legend(fontsize=7, ncols=4, loc="upper center", frameon=False)
    ax.set_title(title or "bytes per axis per rank, last step", fontsize=9)
    ax.tick_params(labelsize=7)
    ax.grid(axis="y", alpha=0.3)
    return fig


def zero_rows(runs: Mapping[int, Sequence[Any]]) -> list[dict]:
    """ZeRO stage -> the rank reports of one layout: per rank, the dp bytes at each
    stage (modelled from the collectives' sizes) and the bytes its sockets sent
    per step (counted), with stage 2 over stage 1 for both. The layouts must be the
    same but for the stage (same ranks, same pipeline)."""
    if not runs:
        raise ValueError("no runs")
    by_stage = {z: {_get(r, "rank"): r for r in reps} for z, reps in runs.items()}
    ranks = sorted(next(iter(by_stage.values())))
    for z, reps in by_stage.items():
        if sorted(reps) != ranks:
            raise ValueError(f"ZeRO-{z} has ranks {sorted(reps)}, others {ranks}")
    rows = []
    for rank in ranks:
        row = dict(
            rank=rank, coords=dict(_get(by_stage[min(by_stage)][rank], "coords"))
        )
        for z, reps in sorted(by_stage.items()):
            e = _get(reps[rank], "extra")
            row[f"dp{z}"] = int(_get(e, "comm_by_axis")["dp"])
            row[f"wire{z}"] = int(_get(e, "wire_bytes_per_step")[-1])
        if 1 in by_stage and 2 in by_stage:
            row["dp_ratio"] = row["dp2"] / row["dp1"] if row["dp1"] else math.nan
            row["wire_extra"] = row["wire2"] - row["wire1"]
            row["dp_extra"] = row["dp2"] - row["dp1"]
        rows.append(row)
    return rows


# ------------------------------------------------------------------ the bubble
def bubble_rows(runs: Mapping[str, Sequence[Any]], step: int = -1) -> list[dict]:
    """Per run: its layout, the measured bubble of step ``step`` (each rank's
    ``1 - busy / pipeline step``, averaged over the ranks; min and max over them)
    and the planner's (``bubble_expected``, modelled)."""
    rows = []
    for label, reports in runs.items():
        ordered = _by_rank(reports)
        per_rank = [_get(_get(r, "extra"), "bubble")[step] for r in ordered]
        e = _get(ordered[0], "extra")
        c = _get(e, "config")
        rows.append(
            dict(
                label=label,
                layout=f"{c['dp_size']}x{c['tp_size']}x{c['pp_size']}",
                schedule=c["schedule"],
                m=c["micro_batches"],
                measured=sum(per_rank) / len(per_rank),
                low=min(per_rank),
                high=max(per_rank),
                modelled=float(_get(e, "bubble_expected")),
            )
        )
    return rows


def draw_bubble(rows: Sequence[Mapping]) -> InlineFigure:
    """The measured bubble per run (bar: mean over ranks; whiskers: min and max)
    and the planner's (black tick, modelled). Bar i has gid ``"bubble:<label>"``."""
    if not rows:
        raise ValueError("no rows to draw")
    fig = InlineFigure(figsize=(WIDTH, 2.8), layout="constrained")
    ax = fig.add_subplot()
    for i, row in enumerate(rows):
        (bar,) = ax.bar(
            i,
            100 * row["measured"],
            0.6,
            color="#8c8c8c",
            label=None if i else "measured (mean over ranks; min-max)",
        )
        bar.set_gid(f"bubble:{row['label']}")
        ax.errorbar(
            i,
            100 * row["measured"],
            yerr=[[100 * (row["measured"] - row["low"])],
                  [100 * (row["high"] - row["measured"])]],
            color="black", capsize=3, lw=1,
        )  # fmt: skip
        ax.plot(
            i,
            100 * row["modelled"],
            "_",
            color="#c44e52",
            ms=24,
            mew=2.5,
            label=None if i else "planner (modelled)",
        )
    ax.set_xticks(
        range(len(rows)),
        [f"{r['label']}\n{r['schedule']}, m={r['m']}" for r in rows],
        fontsize=7,
    )
    ax.set_ylabel("bubble (% of the step)", fontsize=8)
    ax.set_ylim(0, 105)
    ax.legend(fontsize=7, loc="upper right", frameon=False)
    ax.set_title("pipeline bubble: measured vs planner", fontsize=9)
    ax.tick_params(labelsize=7)
    ax.grid(axis="y", alpha=0.3)
    return fig


# ------------------------------------------------------------------ the literature
NARAYANAN_TABLE1 = (
    dict(name="GPT 1.7B", printed=1.7, heads=24, hidden=2304, layers=24, t=1, p=1,
         gpus=32, batch=512),
    dict(name="GPT 1T", printed=1008.0, heads=160, hidden=25600, layers=128, t=8,
         p=64, gpus=3072, batch=3072),
)  # fmt: skip
"""Narayanan et al. 2021 ("Efficient Large-Scale Language Model Training on GPU
Clusters Using Megatron-LM", SC 2021, arXiv:2104.04473), Table 1, first and last
rows: parameters (billions, as printed), attention heads, hidden size, layers,
tensor- and pipeline-parallel sizes, GPUs, batch size. All models: vocabulary
51,200, sequence length 2048 (section 5.1); 80 GB A100 GPUs (section 5)."""
NARAYANAN_VOCAB, NARAYANAN_SEQ = 51200, 2048

MEGATRON_TABLE1 = (
    dict(name="GPT-2 8.3B", printed=8.3, heads=32, hidden=3072, layers=72, t=8,
         p=1, gpus=512, batch=512),
)  # fmt: skip
"""Shoeybi et al. 2019 ("Megatron-LM: Training Multi-Billion Parameter Language
Models Using Model Parallelism", arXiv:1909.08053), Table 1, its largest row, and
NVIDIA ADLR's page on it (https://nv-adlr.github.io/MegatronLM): 8-way model
parallelism, 512 GPUs (64-way data parallelism), global batch 512, vocabulary
padded to 51,200, sequence length 1024, 32 GB V100 GPUs."""
MEGATRON_VOCAB, MEGATRON_SEQ = 51200, 1024


def paper_rows(
    rows: Sequence[Mapping],
    *,
    vocab: int,
    seq_len: int,
    final_norm: bool,
    micro_batch: int = 1,
    recompute: str = "full",
    zero_stage: int = 0,
    memory_gb: float | None = None,
) -> list[dict]:
    """Each published configuration recomputed by the planner (modelled): the
    parameter count (``ModelSpec.num_params``) beside the printed one, the layout
    ``t x p x d`` with ``d = GPUs / (t p)``, the micro-batches per pipeline ``m =
    batch / (d b)``, the 1F1B bubble and the device bytes per GPU (mixed-16, ZeRO
    ``zero_stage``, ``recompute``), and whether that fits ``memory_gb``.
    ``micro_batch`` and ``recompute`` are assumptions: the tables print neither."""
    out = []
    for row in rows:
        spec = ModelSpec(
            row["layers"], row["hidden"], row["heads"], seq_len, vocab,
            final_norm=final_norm, name=row["name"],
        )  # fmt: skip
        t, p = row["t"], row["p"]
        if row["gpus"] % (t * p):
            raise ValueError(f"{row['name']}: {row['gpus']} GPUs not a multiple of t p")
        d = row["gpus"] // (t * p)
        if row["batch"] % (d * micro_batch):
            raise ValueError(
                f"{row['name']}: batch {row['batch']} does not split into d={d} x "
                f"micro_batch={micro_batch}"
            )
        m = row["batch"] // (d * micro_batch)
        e = estimate(
            spec, dp=d, tp=t, pp=p, zero_stage=zero_stage, micro_batch=micro_batch,
            micro_batches=m, recompute=recompute,
        )  # fmt: skip
        out.append(
            dict(
                name=row["name"],
                printed=row["printed"],
                params=spec.num_params(),
                t=t,
                p=p,
                d=d,
                gpus=row["gpus"],
                batch=row["batch"],
                m=m,
                bubble=e.bubble,
                device=e.device["total"],
                estimate=e,
                fits=None if memory_gb is None else e.fits(memory_gb * 1e9),
            )
        )
    return out


def top_layouts(found: Sequence[Any], n: int = 6) -> list[Any]:
    """The first ``n`` estimates of ``search``'s list (fastest first) with distinct
    (dp, tp, pp, micro_batch), each the one using the least device memory among
    those of its layout with the same modelled step time."""
    best: dict[tuple, Any] = {}
    order: list[tuple] = []
    for e in found:
        lay = e.layout
        key = (lay["dp"], lay["tp"], lay["pp"], lay["micro_batch"])
        if key not in best:
            best[key] = e
            order.append(key)
        elif (
            e.step_time["total"] == best[key].step_time["total"]
            and e.device["total"] < best[key].device["total"]
        ):
            best[key] = e
    return [best[k] for k in order[:n]]


STEP_PARTS = ("compute", "tp", "pp", "dp", "offload")
STEP_COLORS = {"compute": "#8c8c8c", **AXIS_COLORS, "offload": "#c44e52"}


def draw_step_breakdown(estimates: Mapping[str, Any], title: str = "") -> InlineFigure:
    """One horizontal bar per labelled estimate (computed with a cluster): its
    modelled step time cut into compute and each axis' communication
    (``utils.planner.step_time``). Segment gids ``"<label>:<part>"``."""
    if not estimates:
        raise ValueError("no estimates to draw")
    for label, e in estimates.items():
        if not e.step_time:
            raise ValueError(f"{label}: estimate it with cluster=... for a step time")
    fig = InlineFigure(figsize=(WIDTH, 0.8 + 0.42 * len(estimates)),
                       layout="constrained")  # fmt: skip
    ax = fig.add_subplot()
    labels = list(estimates)
    seen = set()
    for i, label in enumerate(labels):
        left = 0.0
        for part in STEP_PARTS:
            width = estimates[label].step_time[part]
            if width <= 0 and part == "offload":
                continue
            (bar,) = ax.barh(
                i, width, 0.6, left=left, color=STEP_COLORS[part],
                label=None if part in seen else part,
            )  # fmt: skip
            bar.set_gid(f"{label}:{part}")
            seen.add(part)
            left += width
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_ylabel("d x t x p", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("seconds per step (modelled)", fontsize=8)
    ax.legend(fontsize=7, ncols=5, loc="lower center", bbox_to_anchor=(0.5, 1.0),
              frameon=False)  # fmt: skip
    fig.suptitle(title or "step time per layout (modelled)", fontsize=9)
    ax.tick_params(labelsize=7)
    ax.grid(axis="x", alpha=0.3)
    return fig


# ------------------------------------------------------------------ cost
def cost_rows(
    wall_seconds: Mapping[str, float],
    gpus: Mapping[str, int],
    price_per_gpu_hour: float,
) -> list[dict]:
    """Per lab: its wall time (measured), the GPUs it would hold (one per rank)
    and the cost of that time, ``seconds / 3600 x GPUs x price_per_gpu_hour``
    (modelled: the price is the caller's assumption, and a cloud bills its own
    minimum and rounding)."""
    if not isinstance(price_per_gpu_hour, int | float) or price_per_gpu_hour < 0:
        raise ValueError(
            f"price_per_gpu_hour must be a number >= 0, got {price_per_gpu_hour!r}"
        )
    missing = sorted(set(wall_seconds) ^ set(gpus))
    if missing:
        raise ValueError(f"wall_seconds and gpus must name the same labs: {missing}")
    rows = []
    for name, seconds in wall_seconds.items():
        if seconds < 0 or gpus[name] < 1:
            raise ValueError(f"{name}: seconds {seconds} and gpus {gpus[name]}")
        gpu_hours = seconds / 3600 * gpus[name]
        rows.append(
            dict(
                lab=name,
                seconds=float(seconds),
                gpus=int(gpus[name]),
                gpu_hours=gpu_hours,
                cost=gpu_hours * price_per_gpu_hour,
            )
        )
    return rows
