"""Flynn's taxonomy as data, and every parallelism of the course placed in it:
chapter 6, "SIMD and MIMD", sections "Flynn's taxonomy" and "Where the course's
parallelisms sit".

M. J. Flynn ("Some Computer Organizations and Their Effectiveness", IEEE
Transactions on Computers C-21(9), 1972) classifies a machine by how many
instruction streams and how many data streams it works on at once: single or
multiple of each, four classes. Flynn's classes describe hardware; SPMD and MPMD
(single or multiple *programs*, multiple data) describe how a program for a MIMD
machine is written and run. SPMD is F. Darema's model (Darema, George, Norton and
Pfister, "A single-program-multiple-data computational model for EPEX/FORTRAN",
Parallel Computing 7(1), 1988): every processor runs one program, at its own pace,
on its own data, branching on its own index.

The chapter's tables and its 2 x 2 figure are generated from :data:`FLYNN` and
:data:`PARALLELISMS`; ``tests/test_simd_mimd.py`` checks them.
"""

from __future__ import annotations

from dataclasses import dataclass

CLASSES = ("SISD", "SIMD", "MISD", "MIMD")
PROGRAM_MODELS = ("SPMD", "MPMD")
"""How the programs of a MIMD job are written and run: one for all, or several."""


@dataclass(frozen=True)
class FlynnClass:
    """One of Flynn's four classes."""

    name: str
    instructions: str
    """"single" or "multiple" instruction streams."""
    data: str
    """"single" or "multiple" data streams."""
    meaning: str
    examples: tuple[str, ...]
    """Real machines of the class, each with its source."""
    short: str
    """Two short lines for the 2 x 2 figure."""


FLYNN: dict[str, FlynnClass] = {
    "SISD": FlynnClass(
        "SISD", "single", "single",
        "one instruction stream, one datum at a time",
        (
            "a CPU core running scalar code, such as this chapter's Python loop: "
            "one element per trip through the interpreter (measured below)",
            "the Intel 8086 (1978), which had no vector unit",
        ),
        "one core, scalar code\n(the Python loop below)",
    ),
    "SIMD": FlynnClass(
        "SIMD", "single", "multiple",
        "one instruction applied to many data at once, in lockstep",
        (
            "ILLIAC IV: one control unit issued each instruction to 64 processing "
            "elements (Barnes et al., \"The ILLIAC IV Computer\", IEEE Trans. "
            "Computers C-17(8), 1968)",
            "the vector units of every current CPU core: SSE/AVX2/AVX-512 on x86 "
            "(Intel SDM vol. 1), NEON and SVE on Arm",
            "a GPU warp (32 threads on NVIDIA, 64 on AMD CDNA), SIMD-like: SIMT",
        ),
        "vector units (AVX-512, NEON),\nGPU warps (SIMT), ILLIAC IV",
    ),
    "MISD": FlynnClass(
        "MISD", "multiple", "single",
        "several instruction streams on the same data",
        (
            "rare: \"no commercial multiprocessor of this type has been built\" "
            "(Hennessy and Patterson, Computer Architecture: A Quantitative "
            "Approach, section 1.2)",
            "the example usually given: redundant flight computers running "
            "different programs on the same inputs, such as the Space Shuttle's "
            "Backup Flight System, software written separately from the primary "
            "system's and run beside it (Tomayko, Computers in Spaceflight: The "
            "NASA Experience, NASA CR-182505, 1988, ch. 4)",
        ),
        "redundant flight computers;\nno commercial multiprocessor",
    ),
    "MIMD": FlynnClass(
        "MIMD", "multiple", "multiple",
        "independent processors, each with its own instruction and data streams",
        (
            "a multi-core CPU: each core fetches its own instructions",
            "a node of several GPUs, and a cluster of such nodes",
            "every torch.distributed job of this course: one process per rank",
        ),
        "multi-core CPUs, multi-GPU\nnodes, clusters",
    ),
}  # fmt: skip


@dataclass(frozen=True)
class Placement:
    """Where one of the course's parallelisms sits, and why."""

    key: str
    """The chapter's name in code (``labs/<key>.py``); "tensor_parallel" is the
    tensor half of ``model_parallel``."""
    title: str
    chapter: int
    flynn: str
    """Across the ranks: the hardware class the job runs on."""
    model: str
    """Across the ranks: "SPMD" or "MPMD"."""
    why: str
    inside_rank: str
    """What runs within one rank (every kernel is SIMD or SIMT)."""


PARALLELISMS: tuple[Placement, ...] = (
    Placement(
        "data_parallel", "data parallelism", 1, "MIMD", "SPMD",
        "every rank runs the same training step on its own slice of the batch, "
        "at its own pace; the ranks meet only in the gradient all-reduce",
        "SIMD/SIMT kernels (matmuls, elementwise ops)",
    ),
    Placement(
        "zero", "ZeRO (stages 1-3)", 2, "MIMD", "SPMD",
        "the same step everywhere; what differs by rank is data (which shard it "
        "owns and updates, which slice it receives), not code",
        "SIMD/SIMT kernels",
    ),
    Placement(
        "offload", "CPU offloading", 3, "MIMD", "SPMD",
        "across the ranks the same program; within a rank two processors run two "
        "programs: the accelerator forward and backward, the host CPU the "
        "optimizer step (ZeRO-Offload, Ren et al., USENIX ATC 2021)",
        "MPMD between device and host; SIMD on both",
    ),
    Placement(
        "tensor_parallel", "tensor parallelism", 4, "MIMD", "SPMD",
        "every rank runs the same layer code on its shard of every weight, and all "
        "of them reach the same collectives in every layer",
        "SIMD/SIMT kernels on weight shards",
    ),
    Placement(
        "pipeline_parallel", "pipeline parallelism", 5, "MIMD", "MPMD",
        "rank s runs stage s: its own layers and its own sequence of sends, "
        "receives, forwards and backwards (the first stage reads the batch, the "
        "last computes the loss); one script branching on the stage, but the "
        "instruction streams differ (traced below)",
        "SIMD/SIMT kernels of that stage's layers",
    ),
    Placement(
        "combined", "DP x TP x PP", 7, "MIMD", "MPMD",
        "SPMD inside each pipeline stage (its data- and tensor-parallel ranks run "
        "the same code), MPMD across the stages",
        "SIMD/SIMT kernels",
    ),
)  # fmt: skip


def placement(key: str) -> Placement:
    for p in PARALLELISMS:
        if p.key == key:
            return p
    raise KeyError(f"no parallelism {key!r}; known: {[p.key for p in PARALLELISMS]}")


def flynn_markdown() -> str:
    """Flynn's four classes as a Markdown table (the chapter shows it)."""
    lines = [
        "| class | instruction streams | data streams | what it means | examples |",
        "|---|---|---|---|---|",
    ]
    for c in FLYNN.values():
        examples = "; ".join(c.examples)
        lines.append(
            f"| {c.name} | {c.instructions} | {c.data} | {c.meaning} | {examples} |"
        )
    return "\n".join(lines)


def parallelisms_markdown() -> str:
    """The course's parallelisms placed, as a Markdown table."""
    lines = [
        "| parallelism | chapter | across ranks | programs | why | inside a rank |",
        "|---|---|---|---|---|---|",
    ]
    for p in PARALLELISMS:
        lines.append(
            f"| {p.title} | {p.chapter} | {p.flynn} | {p.model} | {p.why} | "
            f"{p.inside_rank} |"
        )
    return "\n".join(lines)
