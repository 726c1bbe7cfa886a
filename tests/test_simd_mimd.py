"""Chapter 6, SIMD and MIMD: the fits, the taxonomy, the lab's reports, the checks.

Nothing here asserts a timing threshold: timings are checked for consistency (the
speedups are the medians' ratios, a total is at least its parts), never for being
fast. The lab runs twice: every part at world size 2 (TINY), and the SPMD part at
world size 3, which has a middle pipeline stage.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import replace

import pytest
import torch
from torch.nn import functional as F

import labs.simd_mimd as lab
from utils.models import MLP, mlp_batch
from utils.report import RankReport
from utils.simd_mimd import (
    amdahl,
    exercises,
    figures,
    kernels,
    machine,
    taxonomy,
    trace,
)

# ------------------------------------------------------------- Amdahl, Gustafson


@pytest.mark.parametrize("s", [0.0, 0.02, 0.3, 0.9])
def test_the_fit_recovers_a_known_serial_fraction(s):
    times = {n: 2.5 * (s + (1 - s) / n) for n in (1, 2, 4, 8, 16)}
    assert amdahl.fit_serial_fraction(times) == pytest.approx(s, abs=1e-12)


def test_the_fit_recovers_it_through_noise():
    g = torch.Generator().manual_seed(0)
    s = 0.1
    times = {}
    for n in (1, 2, 3, 4, 6, 8):
        noise = 1 + 0.01 * torch.randn((), generator=g).item()
        times[n] = 0.04 * (s + (1 - s) / n) * noise
    assert amdahl.fit_serial_fraction(times) == pytest.approx(s, abs=0.03)


def test_the_fit_is_not_clipped_so_contention_shows():
    assert amdahl.fit_serial_fraction({1: 1.0, 2: 1.5}) == pytest.approx(2.0)
    assert amdahl.fit_serial_fraction({1: 1.0, 2: 0.4}) == pytest.approx(-0.2)


@pytest.mark.parametrize("s", [0.0, 0.1, 0.5])
def test_gustafson_fit_recovers_its_fraction(s):
    scaled = {n: amdahl.gustafson_speedup(s, n) for n in (1, 2, 4, 8)}
    assert amdahl.fit_gustafson(scaled) == pytest.approx(s, abs=1e-12)
    t1 = 0.01  # weak scaling: n workers, n jobs, time t1 / (1 - s + s / n)...
    weak = {n: n * t1 / scaled[n] for n in scaled}
    assert amdahl.scaled_speedups(t1, weak) == pytest.approx(scaled)


def test_amdahl_speedup_and_its_bound():
    assert amdahl.amdahl_speedup(0.05, 1) == 1
    assert amdahl.amdahl_speedup(0.05, math.inf) == pytest.approx(20)
    assert amdahl.amdahl_speedup(0.0, math.inf) == math.inf
    assert amdahl.amdahl_speedup(0.0, 8) == pytest.approx(8)
    assert amdahl.amdahl_speedup(1.0, 1000) == 1
    assert amdahl.speedups({1: 2.0, 2: 1.25}) == {1: 1.0, 2: 1.6}


@pytest.mark.parametrize(
    "call, words",
    [
        (lambda: amdahl.amdahl_speedup(1.5, 2), "serial_fraction must be"),
        (lambda: amdahl.amdahl_speedup(0.1, 0), "workers must be >= 1"),
        (lambda: amdahl.fit_serial_fraction({2: 1.0, 4: 0.6}), "one-worker time"),
        (lambda: amdahl.fit_serial_fraction({1: 1.0}), "more than one worker"),
        (lambda: amdahl.fit_serial_fraction({1: 1.0, 2: -1.0}), "time at 2"),
    ],
)
def test_amdahl_refuses_bad_input(call, words):
    with pytest.raises(ValueError, match=words):
        call()


# ------------------------------------------------------------------- taxonomy


def test_flynn_has_four_classes_one_per_pair():
    assert list(taxonomy.FLYNN) == list(taxonomy.CLASSES)
    pairs = {(c.instructions, c.data) for c in taxonomy.FLYNN.values()}
    assert pairs == {
        (i, d) for i in ("single", "multiple") for d in ("single", "multiple")
    }
    for c in taxonomy.FLYNN.values():
        assert c.examples and c.meaning and c.short
    assert taxonomy.FLYNN["SIMD"].data == "multiple"
    assert taxonomy.FLYNN["MISD"].instructions == "multiple"


def test_every_parallelism_is_placed_with_its_reason():
    from tests.test_layout import NUMBERS  # DESIGN.md's chapter numbers

    names = {"tensor_parallel": "model_parallel"}  # the tensor half of chapter 4
    placed = {p.key: p for p in taxonomy.PARALLELISMS}
    for key in ("data_parallel", "zero", "offload", "tensor_parallel",
                "pipeline_parallel", "combined"):  # fmt: skip
        p = placed[key]
        assert p.chapter == NUMBERS[names.get(key, key)], key
        assert p.flynn == "MIMD", f"{key}: every rank is its own processor"
        assert p.model in taxonomy.PROGRAM_MODELS
        assert len(p.why) > 40 and p.inside_rank
    spmd = {k for k, p in placed.items() if p.model == "SPMD"}
    assert spmd == {"data_parallel", "zero", "offload", "tensor_parallel"}
    assert placed["pipeline_parallel"].model == "MPMD"
    assert placed["combined"].model == "MPMD"
    with pytest.raises(KeyError, match="no parallelism"):
        taxonomy.placement("pipeline")


def test_the_tables_are_generated_from_the_data():
    flynn = taxonomy.flynn_markdown()
    for c in taxonomy.FLYNN.values():
        assert f"| {c.name} | {c.instructions} | {c.data} |" in flynn
    table = taxonomy.parallelisms_markdown()
    for p in taxonomy.PARALLELISMS:
        assert f"| {p.title} | {p.chapter} | {p.flynn} | {p.model} |" in table


# ----------------------------------------------------------------- the machine

AVX512 = "processor : 0\nmodel name : AMD EPYC\nflags : fpu sse2 avx avx2 avx512f\n"
AVX2 = "processor : 0\nflags : fpu sse2 avx avx2\ncpu MHz : 3000.000\n"
NEON = "processor : 0\nFeatures : fp asimd evtstrm\n"
SVE = "processor : 0\nFeatures : fp asimd sve\n"


@pytest.mark.parametrize(
    "text, sve, bits, where",
    [
        (AVX512, None, 512, "avx512f"),
        (AVX2, None, 256, "avx2"),
        (NEON, None, 128, "asimd"),
        (SVE, "32\n", 256, "sve_default_vector_length"),
        (SVE, None, 128, "asimd"),  # SVE whose length cannot be read: NEON's
        ("processor : 0\n", None, None, "no vector flag"),
    ],
)
def test_vector_width_from_the_flags(text, sve, bits, where):
    got, source = machine.hardware_vector_bits(machine._cpuinfo(text), sve)
    assert got == bits and where in source


def test_clock_prefers_cpufreq_then_cpu_mhz_else_unknown():
    fields = machine._cpuinfo(AVX2)
    assert machine.clock_mhz(fields, "3500000\n") == (
        3500.0,
        "cpufreq cpuinfo_max_freq",
    )
    assert machine.clock_mhz(fields)[0] == 3000.0
    assert machine.clock_mhz(machine._cpuinfo(NEON)) == (
        None,
        "unknown (no cpufreq, no cpu MHz line)",
    )


def _cpu(capability="AVX512", bits=512, mhz=2000.0, cores=4):
    return machine.CpuInfo("test", cores, capability, bits, "test", mhz, "test")


def test_modelled_peak_is_cores_lanes_fma_clock():
    cpu = _cpu()
    assert cpu.lanes(torch.float64) == 8 and cpu.lanes(torch.float32) == 16
    assert cpu.lanes(torch.bfloat16) == 16  # computed on float32 lanes
    assert cpu.peak_flops(torch.float32, cores=1) == 16 * 2 * 2000e6
    assert cpu.peak_flops(torch.float64) == 4 * 8 * 2 * 2000e6
    assert cpu.peak_flops(torch.float32, fma_pipes=2, cores=1) == 2 * 64e9
    assert _cpu(mhz=None).peak_flops(torch.float32) is None
    assert _cpu("DEFAULT", bits=None).lanes(torch.float32) is None
    assert _cpu("AVX2", bits=512).vector_bits == 256  # torch's kernels, not the CPU's


def test_this_machine_is_read():
    cpu = machine.cpu_info()
    assert cpu.capability == torch.backends.cpu.get_cpu_capability()
    assert cpu.cores >= 1 and cpu.as_dict()["vector_bits"] == cpu.vector_bits
    assert cpu.physical_cores is None or 1 <= cpu.physical_cores <= cpu.cores


@pytest.mark.parametrize(
    "capability, hardware, bits",
    [
        ("DEFAULT", 512, 128),  # x86-64 baseline (SSE2), whatever the CPU has
        ("NO AVX", 256, 128),
        ("DEFAULT", 128, 128),  # aarch64: NEON
        ("DEFAULT", None, None),  # nothing known: not guessed
        ("AVX2", 512, 256),  # torch's kernels, not the CPU's flags
        ("SOMETHING NEW", 256, 256),  # a capability we do not know: the hardware's
    ],
)
def test_vector_width_follows_torchs_dispatch(capability, hardware, bits):
    assert _cpu(capability, bits=hardware).vector_bits == bits


def test_physical_cores_count_smt_siblings_once():
    topology = {0: ("0", "0"), 1: ("0", "0"), 2: ("0", "1"), 3: ("0", "1")}

    def read(path):
        cpu = int(path.split("/cpu")[-1].split("/")[0])
        package, core = topology[cpu]
        return package if path.endswith("physical_package_id") else core

    assert machine.physical_cores([0, 1, 2, 3], read) == 2
    assert machine.physical_cores([0, 2], read) == 2
    assert machine.physical_cores([0, 1], read) == 1
    assert machine.physical_cores([0], lambda path: None) is None
    smt = machine.CpuInfo("t", 4, "AVX512", 512, "t", 1000.0, "t", physical_cores=2)
    assert smt.peak_flops(torch.float32) == 2 * 16 * 2 * 1000e6  # two cores, not 4
    assert _cpu(cores=4).peak_flops(torch.float32) == 4 * 16 * 2 * 2000e6


def test_the_sums_peak_is_one_add_per_lane():
    cpu = _cpu()
    fma = cpu.peak_flops(torch.float32, cores=1)
    assert figures.op_peak_flops(cpu, "axpy", "float32") == fma
    assert figures.op_peak_flops(cpu, "sum", "float32") == fma / 2
    # both ops: one vector instruction per lane per cycle, the same elements/s
    per_element = {
        op: figures.op_peak_flops(cpu, op, "float64") / kernels.FLOPS_PER_ELEMENT[op]
        for op in kernels.OPS
    }
    assert per_element["axpy"] == per_element["sum"] == 8 * 2000e6
    assert figures.op_peak_flops(_cpu(mhz=None), "sum", "float32") is None


# -------------------------------------------------------------------- kernels


@pytest.mark.parametrize("op", kernels.OPS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_three_implementations_compute_the_same(op, dtype):
    results = {}
    for impl in kernels.IMPLS:
        fn, result = kernels.workloads(impl, op, 64, dtype, seed=3)
        fn()
        results[impl] = result()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for impl in ("scalar", "vector"):
        torch.testing.assert_close(results[impl], results["python"], rtol=tol, atol=tol)


def test_measure_simd_rows_are_what_they_say():
    rows = kernels.measure_simd(
        ("float64", "bfloat16"), loop_numel=32, vector_numel=256, repeats=3
    )
    kinds = {(r["op"], r["impl"], r["dtype"]) for r in rows}
    assert ("axpy", "python", "float64") in kinds
    assert not any(i == "python" and d == "bfloat16" for _, i, d in kinds)
    assert len(rows) == 2 * 3 + 2 * 2
    for r in rows:
        assert r["elements_per_s"] == pytest.approx(r["numel"] / r["median_s"])
        assert r["flops_per_s"] == pytest.approx(
            r["elements_per_s"] * kernels.FLOPS_PER_ELEMENT[r["op"]]
        )
        assert r["p10_s"] <= r["median_s"] <= r["p90_s"] and r["repeats"] == 3
        assert r["numel"] == (256 if r["impl"] == "vector" else 32)


def test_percentile_and_summary():
    assert kernels.percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert kernels.percentile([0.0, 10.0], 0.1) == pytest.approx(1.0)
    assert kernels.summary([1.0, 2.0, 3.0, 4.0])["median_s"] == 2.5


def test_lane_masks_split_by_warp_or_by_lane():
    for warp in (32, 64):
        by_warp = kernels.lane_mask("by_warp", 8 * warp, warp).view(-1, warp)
        by_lane = kernels.lane_mask("by_lane", 8 * warp, warp).view(-1, warp)
        assert all(len(set(w.tolist())) == 1 for w in by_warp), "every warp agrees"
        assert all(len(set(w.tolist())) == 2 for w in by_lane), "every warp mixed"
        assert by_warp.sum() == by_lane.sum() == 4 * warp  # same work: half take A
    assert kernels.lane_mask("all_a", 10, 32).sum() == 10
    assert kernels.lane_mask("all_b", 10, 32).sum() == 0
    with pytest.raises(ValueError, match="pattern must be one of"):
        kernels.lane_mask("random", 10, 32)


def test_divergence_model():
    assert kernels.divergence_model({"all_a": 1.0, "all_b": 3.0}) == {
        "by_lane": 4.0,
        "by_warp": 2.0,
    }


def test_recorded_file_round_trip(tmp_path):
    path = tmp_path / "gpu.json"
    assert kernels.load_recorded(path) == []
    run = {"device": "X", "warp_size": 32, "median_ms": {"all_a": 1.0}}
    kernels.save_recorded(run, path)
    kernels.save_recorded({**run, "warp_size": 64}, path)  # same device: replaced
    kernels.save_recorded({**run, "device": "Y"}, path)
    runs = kernels.load_recorded(path)
    assert [(r["device"], r["warp_size"]) for r in runs] == [("X", 64), ("Y", 32)]


def test_the_repository_records_no_invented_gpu_figures():
    """The recorded file exists only if a GPU run wrote it: its runs say which
    device, and carry the measured and the modelled times."""
    for run in kernels.load_recorded():
        assert run["device"] and run["warp_size"] in (32, 64)
        assert set(run["median_ms"]) == set(kernels.PATTERNS)
        assert run["modelled_ms"] == kernels.divergence_model(run["median_ms"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_divergence_kernel_runs_on_the_gpu():
    result = kernels.measure_divergence(n=1 << 16, iters=16, repeats=3, warmup=1)
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    assert result["device"] == props.name and result["warp_size"] == props.warp_size
    assert set(result["median_ms"]) == set(kernels.PATTERNS)
    assert all(t > 0 for t in result["median_ms"].values())
    assert result["modelled_ms"] == kernels.divergence_model(result["median_ms"])


def test_measure_divergence_refuses_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("there is a GPU here")
    with pytest.raises(RuntimeError, match="needs a CUDA or ROCm GPU"):
        kernels.measure_divergence()


# ---------------------------------------------------------------------- trace


def _tiny_step():
    model = torch.nn.Linear(3, 2)
    model(torch.ones(4, 3)).sum().backward()


def test_code_path_records_calls_and_ops():
    with trace.CodePath([__file__]) as path:
        _tiny_step()
    assert trace.calls(path.events) == ["_tiny_step"]
    ops = trace.ops(path.events)
    assert "aten::addmm" in ops and "aten::ones" in ops
    assert trace.comm_ops(path.events) == []


def test_classify_and_path_summary():
    a = [("call", "step"), ("op", "aten::mm"), ("op", "c10d::allreduce_")] * 1
    b = [("call", "step"), ("op", "aten::mm"), ("op", "c10d::send")]
    assert trace.classify([a, a]) == "SPMD"
    assert trace.classify([a, b]) == "MPMD"
    with pytest.raises(ValueError, match="at least two"):
        trace.classify([a])
    events = [("call", "f"), ("call", "<listcomp>")] + [("op", "c10d::allreduce_")] * 3
    events += [("call", "send_activation"), ("op", "c10d::send")]
    assert trace.path_summary(events) == [
        "f",
        "allreduce x3",
        "send_activation",
        "send",
    ]
    assert (
        trace.kind_of("send") == "comm" and trace.kind_of("send_activation") == "call"
    )


# -------------------------------------------------------------------- the lab


@pytest.fixture(scope="module")
def reports():
    return lab.run(lab.TINY)


@pytest.fixture(scope="module")
def three():
    return lab.run(replace(lab.TINY, world_size=3, part="spmd", batch_size=6))


def test_rank0_reads_the_machine_and_measures_every_dtype(reports):
    r0 = reports[0].extra
    assert r0.machine["capability"] == torch.backends.cpu.get_cpu_capability()
    assert reports[1].extra.machine is None and reports[1].extra.simd is None
    dtypes = {r["dtype"] for r in r0.simd}
    assert dtypes == set(lab.TINY.dtypes)
    assert len(r0.load_average) == 2
    rows = figures.simd_table(reports)
    cpu = figures.cpu_of(reports)
    assert cpu.physical_cores == r0.machine["physical_cores"]
    for row in rows:
        peak = cpu.peak_flops(kernels.DTYPES[row["dtype"]], cores=1)
        if peak:
            peak *= kernels.FLOPS_PER_ELEMENT[row["op"]] / 2
        assert row["peak_flops"] == peak
        if peak:
            assert row["peak_fraction"] == pytest.approx(row["flops_per_s"] / peak)


def test_scaling_reports_are_consistent(reports):
    n = reports[0].world_size
    threads = reports[0].extra.scaling["threads"]
    assert [r["threads"] for r in threads] == list(lab.TINY.threads)
    assert reports[1].extra.scaling["threads"] is None
    for row in threads:
        assert len(row["samples_s"]) == lab.TINY.repeats
        assert row["median_s"] == statistics.median(row["samples_s"])
    for kind in ("processes", "weak"):
        for k in range(1, n + 1):
            rows = [r.extra.scaling[kind][k - 1] for r in reports]
            assert [row is not None for row in rows] == [i < k for i in range(n)]
            for row in rows[:k]:
                assert row["workers"] == k
                assert len(row["total_s"]) == lab.TINY.repeats
                for c, m, t in zip(row["compute_s"], row["combine_s"], row["total_s"]):
                    assert c > 0 and m >= 0 and t == pytest.approx(c + m)


def test_speedups_are_the_ratios_of_medians_of_the_slowest_worker(reports):
    fit = figures.scaling_fit(reports)
    n = reports[0].world_size
    per_k = {}
    for k in range(1, n + 1):
        rows = [r.extra.scaling["processes"][k - 1] for r in reports[:k]]
        slowest = [max(ts) for ts in zip(*(row["total_s"] for row in rows))]
        per_k[k] = statistics.median(slowest)
    assert fit["processes"]["times"] == per_k
    assert fit["processes"]["speedup"] == {k: per_k[1] / t for k, t in per_k.items()}
    assert fit["processes"]["serial_fraction"] == pytest.approx(
        amdahl.fit_serial_fraction(per_k)
    )
    thr = {r["threads"]: r["median_s"] for r in reports[0].extra.scaling["threads"]}
    assert fit["threads"]["speedup"] == {k: thr[1] / t for k, t in thr.items()}
    scaled, weak = fit["weak"]["scaled_speedup"], fit["weak"]["times"]
    assert scaled[1] == 1.0  # the weak series is its own baseline
    assert scaled[n] == pytest.approx(n * weak[1] / weak[n])
    assert fit["processes"]["compute"][n] <= fit["processes"]["times"][n] * (1 + 1e-9)


def test_data_parallel_is_spmd_and_the_pipeline_mpmd(reports, three):
    for reps in (reports, three):
        rows = figures.path_rows(reps)
        for key, row in rows.items():
            assert row["model"] == taxonomy.placement(key).model, key
        dp, pp = rows["data_parallel"], rows["pipeline_parallel"]
        assert all(dp["same_as_rank0"]) and len(set(map(tuple, dp["paths"]))) == 1
        layers = len(reps)  # the MLP has one linear layer per rank: 2 tensors each
        assert f"allreduce x{2 * layers}" in dp["paths"][0]
        last = len(reps) - 1
        assert "compute_loss" in pp["paths"][last]
        assert all("compute_loss" not in p for p in pp["paths"][:last])
        assert "recv_activation" not in pp["paths"][0]
        assert pp["paths"][0][:3] == [
            "pipeline_step",
            "forward_stage",
            "send_activation",
        ]
    middle = figures.path_rows(three)["pipeline_parallel"]["paths"][1]
    assert middle == [
        "pipeline_step", "recv_activation", "recv", "forward_stage",
        "send_activation", "send", "backward_stage", "recv", "send_gradient",
        "send", "update",
    ]  # fmt: skip


def test_the_pipeline_step_computes_the_whole_models_loss(three):
    cfg = replace(lab.TINY, world_size=3, batch_size=6)
    sizes = (cfg.width,) * 4
    x, y = mlp_batch(sizes, cfg.batch_size, seed=cfg.seed, step=0)
    want = F.mse_loss(MLP(sizes, seed=cfg.seed)(x), y).item()
    losses = [r.extra.spmd["pipeline_losses"] for r in three]
    assert losses[0] == losses[1] == [None]
    assert losses[2][0] == pytest.approx(want, rel=1e-6)


def test_no_gpu_figures_are_made_up_on_cpu(reports):
    if torch.cuda.is_available():
        pytest.skip("there is a GPU here")
    assert reports[0].extra.divergence is None
    assert "no CUDA" in reports[0].extra.divergence_note


def test_reports_round_trip_and_figures_draw_from_dicts(reports):
    dicts = [json.loads(json.dumps(r.to_dict())) for r in reports]
    assert [RankReport.from_dict(d).extra.simd for d in dicts] == [
        r.extra.simd for r in reports
    ]
    assert figures.scaling_fit(dicts) == figures.scaling_fit(reports)
    assert figures.path_rows(dicts) == figures.path_rows(reports)
    for fig in (
        figures.draw_throughput(figures.simd_table(dicts)),
        figures.draw_speedup(figures.scaling_fit(dicts)),
        figures.draw_taxonomy(),
        figures.draw_paths(figures.path_rows(dicts)),
    ):
        assert fig.axes
    assert "SPMD" in lab.describe(reports) and "MPMD" in lab.describe(reports)


def test_divergence_figure_draws_a_recorded_run():
    times = {"all_a": 1.0, "all_b": 2.0, "by_warp": 1.6, "by_lane": 3.1}
    run = {"device": "some GPU", "warp_size": 32, "median_ms": times}
    run["modelled_ms"] = kernels.divergence_model(run["median_ms"])
    assert figures.draw_divergence([run]).axes


@pytest.mark.parametrize(
    "s, words",
    [(0.2, "at most 5 times"), (1.4, "slower"), (-0.1, "better than linear"),
     (None, "nothing to fit"), (0.0, "no bound"), (1.0, "slower")],
)  # fmt: skip
def test_the_verdict_reads_whatever_the_fit_gave(s, words):
    for subject in ("processes", "threads"):
        text = figures.scaling_verdict(s, subject)
        assert words in text and (s is None or subject in text)
    assert "all-reduce" in figures.scaling_verdict(0.2, "processes")
    assert "waking the threads" in figures.scaling_verdict(0.2, "threads")


@pytest.mark.parametrize(
    "s, words",
    [(0.1, "1 - s' = 0.9"), (-0.2, "better than linear"), (1.2, "gained nothing"),
     (None, "nothing to fit")],
)  # fmt: skip
def test_the_gustafson_verdict_reads_whatever_the_fit_gave(s, words):
    assert words in figures.gustafson_verdict(s)


def test_verdicts_of_the_same_kind_are_said_once():
    both = figures.scaling_verdicts({"processes": 1.7, "threads": 3.5})
    assert both.startswith("For the processes and the threads, a fraction of 1")
    assert both.count("For the") == 1
    mixed = figures.scaling_verdicts({"processes": 0.2, "threads": 1.5})
    assert "processes, if this fraction held" in mixed and "at most 5 times" in mixed
    assert "For the threads, a fraction of 1 or more" in mixed
    two = figures.scaling_verdicts({"processes": 0.2, "threads": 0.5})
    assert "at most 5 times" in two and "at most 2 times" in two  # own bounds
    none = figures.scaling_verdicts({"processes": None, "threads": None})
    assert none == (
        "For the processes and the threads, with one count only, there is nothing "
        "to fit."
    )


def test_speedups_read_as_faster_or_slower():
    assert figures.as_fast(1.8) == "1.80 times as fast"
    assert figures.as_fast(0.5) == "slower: 2.00 times as long"
    assert "load average read up to 3.50 on 2" in figures.load_sentence(2, 3.5)


# --------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "change, words",
    [
        ({"dtypes": ("float16",)}, "each of dtypes must be one of"),
        ({"dtypes": ()}, "dtypes needs at least one"),
        ({"loop_numel": 0}, "loop_numel must be an integer >= 1"),
        ({"repeats": 0}, "repeats must be"),
        ({"threads": (0,)}, "each of threads"),
        ({"threads": ()}, "threads needs at least one"),
        ({"part": "mpmd"}, "part must be one of"),
        ({"world_size": 1}, "world_size must be >= 2"),
        ({"world_size": 3}, "batch_size=8 must divide by world_size=3"),
        ({"scaling_numel": 1, "part": "scaling"}, "scaling_numel=1 must be at least"),
        ({"record_gpu": "yes"}, "record_gpu must be True or False"),
        ({"record_gpu": True, "part": "simd"}, "record_gpu needs part"),
        ({"dtypes": ("float32", "float32")}, "dtypes lists a dtype twice"),
        ({"steps": 1000}, "steps must be an integer <= 100"),
        ({"threads": (1, 2, 2)}, "threads lists a count twice"),
        ({"threads": (2, 4)}, "threads must include 1"),
        # 2**16 elements x 31 runs x 3 dtypes: minutes, past the barrier's timeout
        ({"loop_numel": 1 << 16, "repeats": 30}, "would take about"),
    ],
)
def test_bad_config_is_refused_before_any_process(change, words):
    with pytest.raises(ValueError, match=words):
        replace(lab.TINY, **change)


def test_one_rank_is_fine_without_the_spmd_part():
    assert replace(lab.TINY, world_size=1, part="simd").parts == ("simd",)


def test_the_simd_budget_binds_only_the_simd_part():
    long = {"loop_numel": 1 << 16, "repeats": 30}
    assert replace(lab.TINY, part="scaling", **long).simd_budget_s() > 60
    assert lab.Config().simd_budget_s() < 5  # the chapter's run: well inside
    cfg = replace(lab.TINY, part="simd", loop_numel=1 << 16, repeats=3)
    assert cfg.simd_budget_s() < lab.TIMEOUT_S / 2  # the largest loops still run


def test_the_memory_estimate_counts_the_spmd_models():
    spmd = replace(lab.TINY, part="spmd", world_size=4, width=4096)
    mlp = 4 * (4096 + 1) * 4096 * 4  # 4 layers of weights and biases, float32
    scaling = replace(spmd, part="scaling")
    assert spmd.estimate_bytes() - scaling.estimate_bytes() == 4 * mlp


def test_worker_counts_are_every_count_then_powers_of_two():
    assert lab.worker_counts(1) == (1,)
    assert lab.worker_counts(4) == (1, 2, 3, 4)
    assert lab.worker_counts(8) == tuple(range(1, 9))
    assert lab.worker_counts(12) == (*range(1, 9), 12)
    assert lab.worker_counts(64) == (*range(1, 9), 16, 32, 64)
    # rank 0 joins every group: its connections stay far under a laptop's 1024
    assert sum(k - 1 for k in lab.worker_counts(64)) < 200


@pytest.mark.skipif(torch.cuda.is_available(), reason="there is a GPU here")
def test_the_gpu_part_is_refused_without_a_gpu():
    with pytest.raises(ValueError, match="needs a CUDA or ROCm GPU"):
        replace(lab.TINY, part="divergence")
    with pytest.raises(ValueError, match="record_gpu needs"):
        replace(lab.TINY, record_gpu=True)


def test_cli_error_comes_before_any_process(monkeypatch):
    def no_launch(*args, **kwargs):
        raise AssertionError("launch must not be called")

    monkeypatch.setattr("utils.lab.launch", no_launch)
    with pytest.raises(SystemExit) as err:
        lab.main(["--dtypes", "float16"])
    assert "each of dtypes must be one of" in str(err.value)
    with pytest.raises(SystemExit) as err:
        lab.main(["--threads", "1,0"])
    assert "each of threads" in str(err.value)
    for argv, words in (
        (["--part", "simd", "--loop-numel", "65536", "--repeats", "40"], "barrier"),
        (["--threads", "2,4"], "threads must include 1"),
        (["--world-size", "1"], "world_size must be >= 2"),
        (["--repeats", "-3"], "repeats must be"),
    ):
        with pytest.raises(SystemExit) as err:
            lab.main(argv)
        assert words in str(err.value), argv


# ---------------------------------------------------------------- exercises

RIGHT = {
    "python_sum": "SISD",
    "vector_add": "SIMD",
    "gpu_kernel": "SIMD",
    "ddp": "MIMD/SPMD",
    "zero3": "spmd",  # SPMD alone reads as MIMD/SPMD
    "pipeline": "MIMD-MPMD",
    "parameter_server": "MIMD/MPMD",
    "voting": "MISD",
}


def test_classification_check_accepts_the_answers(capsys):
    exercises.check_classification(RIGHT)
    assert "correct" in capsys.readouterr().out


@pytest.mark.parametrize(
    "change, words",
    [
        ({"ddp": "SIMD"}, "not in lockstep"),  # "same thing on different data"
        ({"pipeline": "MIMD/SPMD"}, "several programs"),  # "it is one script"
        ({"gpu_kernel": "MIMD"}, "not one of"),
        ({"gpu_kernel": "MIMD/SPMD"}, "SIMT"),
        ({"voting": "MIMD/MPMD"}, "MISD"),
        ({"vector_add": "SISD"}, "16 float32 lanes"),
    ],
)
def test_classification_check_refuses_plausible_mistakes(change, words):
    with pytest.raises(AssertionError, match=words):
        exercises.check_classification({**RIGHT, **change})


LABELS = ("SISD", "SIMD", "MISD", "MIMD/SPMD", "MIMD/MPMD")


@pytest.mark.parametrize("name", sorted(RIGHT))
def test_classification_check_refuses_every_other_class(name):
    right = exercises.normalise(RIGHT[name])
    for label in LABELS:
        if label == right:
            continue
        with pytest.raises(AssertionError, match=f"{name}: you said {label}"):
            exercises.check_classification({**RIGHT, name: label})


def test_classification_check_wants_every_program():
    partial = dict(RIGHT)
    del partial["voting"]
    with pytest.raises(AssertionError, match="no answer for"):
        exercises.check_classification(partial)


def _amdahl(s, n):
    return (1 / s if s else math.inf) if math.isinf(n) else 1 / (s + (1 - s) / n)


def test_speedup_bound_check(capsys):
    exercises.check_speedup_bound(_amdahl)
    assert "correct" in capsys.readouterr().out


@pytest.mark.parametrize(
    "wrong",
    [
        lambda s, n: n - s * (n - 1) if not math.isinf(n) else math.inf,  # Gustafson
        lambda s, n: 1 / s if s else math.inf,  # the bound, whatever n
        lambda s, n: s + (1 - s) / n,  # the time fraction, not the speedup
        lambda s, n: n * (1 - s) + s if not math.isinf(n) else math.inf,
    ],
)
def test_speedup_bound_check_refuses_plausible_mistakes(wrong):
    with pytest.raises(AssertionError, match="expected"):
        exercises.check_speedup_bound(wrong)


def test_speedup_bound_check_explains_a_division_by_zero():
    def naive(s, n):  # right for s > 0, but 1 / 0 when nothing is serial
        return 1 / s if math.isinf(n) else 1 / (s + (1 - s) / n)

    with pytest.raises(AssertionError, match="ZeroDivisionError.*math.inf"):
        exercises.check_speedup_bound(naive)


@pytest.mark.parametrize(
    "answer",
    [
        lambda x, slope, scale: torch.where(x > 0, scale * x, slope * scale * x),
        lambda x, slope, scale: F.leaky_relu(x, slope) * scale,
    ],
)
def test_vectorised_check_accepts_whole_tensor_answers(answer, capsys):
    # A low target here: the test checks the check, not this machine's speed
    # (a whole-tensor answer measures tens of times faster; the chapter's run
    # checks it against the real target).
    speedup = exercises.check_vectorised(answer, target=2)
    assert speedup >= 2
    assert "faster than the loop" in capsys.readouterr().out


def _in_place(x, slope, scale):
    x.mul_(scale)
    return torch.where(x > 0, x, slope * x)


@pytest.mark.parametrize(
    "wrong, words",
    [
        (lambda x, slope, scale: scale * torch.relu(x), "differs from the loop"),
        (lambda x, slope, scale: torch.where(x > 0, x, slope * x), "differs"),
        # scaling before the branch: wrong when scale < 0 (the mask flips)
        (lambda x, slope, scale: F.leaky_relu(scale * x, slope), "scale=-3.0"),
        (
            lambda x, slope, scale: torch.where(
                x > 0, scale * x, slope * scale * x
            ).double(),
            "dtype",
        ),  # fmt: skip
        (_in_place, "changed its input"),
        (  # right, but still a loop over the elements: misses the target
            lambda x, slope, scale: torch.tensor(
                [scale * v if v > 0 else slope * scale * v for v in x.tolist()]
            ),
            "only",
        ),
    ],
)
def test_vectorised_check_refuses_plausible_mistakes(wrong, words):
    with pytest.raises(AssertionError, match=words):
        exercises.check_vectorised(wrong)
