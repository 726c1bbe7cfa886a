"""Chapter 0's lab, figures and exercise checks (labs/foundations.py).

The lab runs once at world size 2 and once at 4 (every part in one launch each);
the collectives are checked against torch's semantics computed here from the
ranks' inputs, the anatomy against the analytic model and a single-process run.
"""

import dataclasses
import re
import statistics
import subprocess
import textwrap

import pytest
import torch
from torch.nn import functional as F

from labs import foundations as lab
from utils.comm import alpha_beta_time, bus_factor, bytes_sent, fit_alpha_beta
from utils.foundations import exercises as ex
from utils.foundations import figures as fig
from utils.hardware import ACCELERATORS, GB
from utils.memory_model import mlp_activation_bytes, model_state_bytes
from utils.models import MLP, mlp_batch
from utils.wire import GLOO_PREAMBLE

# --------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("world_size", 0, "world_size"),
        ("backend", "mpi", "backend"),
        ("part", "zero", "part"),
        ("steps", 0, "steps"),
        ("sizes", (8,), "sizes"),
        ("sizes", (8, 0), "sizes"),
        ("batch_size", 7, "divide"),
        ("chunk", 0, "chunk"),
        ("min_bytes", 6, "multiple of 4"),
        ("max_bytes", 1024, "max_bytes"),
        ("iters", 0, "iters"),
        ("warmup", -1, "warmup"),
        ("world_size", True, "world_size"),
    ],
)
def test_config_rejects_bad_values(field, value, words):
    with pytest.raises(ValueError, match=words):
        dataclasses.replace(lab.TINY, **{field: value})


def test_batch_divisibility_only_matters_for_the_anatomy():
    cfg = dataclasses.replace(lab.TINY, world_size=3, part="busbw")
    assert cfg.parts == ("busbw",)


def test_message_sizes_grow_by_four_up_to_max():
    cfg = dataclasses.replace(lab.TINY, min_bytes=1024, max_bytes=20_000)
    assert cfg.message_sizes() == [1024, 4096, 16384]


def test_cli_rejects_bad_values_before_starting_ranks():
    with pytest.raises(SystemExit, match="world_size"):
        lab.main(["--world-size", "0"])
    with pytest.raises(SystemExit, match="min_bytes"):
        lab.main(["--part", "busbw", "--min-bytes", "3"])


def test_slurm_template_is_valid_bash():
    result = subprocess.run(
        ["bash", "-n", "labs/slurm/lab.sbatch"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    text = open("labs/slurm/lab.sbatch").read()
    for needed in ("#SBATCH --nodes", "srun", "torchrun", "--rdzv-endpoint"):
        assert needed in text


# ------------------------------------------------------------------- the lab


@pytest.fixture(scope="module", params=[2, 4], ids=["ws2", "ws4"])
def reports(request):
    cfg = dataclasses.replace(lab.TINY, world_size=request.param, backend="gloo")
    return cfg, lab.run(cfg)


def _expected(op, before, world_size, chunk):
    """torch's semantics of ``op`` from every rank's input (root: rank 0)."""
    stacked = torch.tensor(before)
    total = stacked.sum(0)
    if op == "broadcast":
        return [stacked[0].tolist()] * world_size
    if op == "reduce":
        return [total.tolist()] + [None] * (world_size - 1)  # only the root is defined
    if op == "all_reduce":
        return [total.tolist()] * world_size
    if op == "reduce_scatter":
        return [total[r * chunk : (r + 1) * chunk].tolist() for r in range(world_size)]
    if op == "all_gather":
        return [stacked.flatten().tolist()] * world_size
    raise AssertionError(op)


def test_collectives_match_torch_semantics(reports):
    cfg, rs = reports
    assert [r.rank for r in rs] == list(range(cfg.world_size))
    grids = fig.collective_grids(rs)
    assert list(grids) == list(lab.COLLECTIVES)
    for op, grid in grids.items():
        expected = _expected(op, grid["before"], cfg.world_size, cfg.chunk)
        for rank, (got, want) in enumerate(zip(grid["after"], expected)):
            if want is not None:
                assert got == want, (op, rank)
    # all-gather's inputs are each rank's own chunk, reduce-scatter's the whole tensor
    assert all(len(b) == cfg.chunk for b in grids["all_gather"]["before"])
    assert all(len(a) == cfg.chunk for a in grids["reduce_scatter"]["after"])
    origins = fig.value_origins(grids["all_gather"])
    assert origins[0] == [r for r in range(cfg.world_size) for _ in range(cfg.chunk)]
    assert all(o is None for o in fig.value_origins(grids["all_reduce"])[0])


def test_busbw_is_positive_and_uses_the_all_reduce_factor(reports):
    cfg, rs = reports
    rows = fig.busbw_rows(rs)
    assert [row["bytes"] for row in rows] == cfg.message_sizes()
    for row in rows:
        assert row["time_s"] > 0 and row["algbw"] > 0
        assert row["algbw"] == pytest.approx(row["bytes"] / row["time_s"])
        factor = 2 * (cfg.world_size - 1) / cfg.world_size
        assert row["busbw"] == pytest.approx(row["algbw"] * factor)
    # every rank reports the same (slowest-rank) times
    assert all(r.extra.busbw == rs[0].extra.busbw for r in rs)


def test_busbw_rows_report_the_spread_of_the_slowest_rank(reports):
    cfg, rs = reports
    for row in fig.busbw_rows(rs):
        assert row["warmup"] == cfg.warmup and row["iters"] == cfg.iters
        assert len(row["times_s"]) == cfg.iters
        assert row["time_min_s"] == min(row["times_s"])
        assert row["time_max_s"] == max(row["times_s"])
        assert row["time_s"] == pytest.approx(statistics.median(row["times_s"]))
        assert (
            row["time_min_s"]
            <= row["time_p10_s"]
            <= row["time_s"]
            <= row["time_p90_s"]
            <= row["time_max_s"]
        )
    analysis = fig.busbw_analysis(fig.busbw_rows(rs), cfg.world_size)
    assert analysis["points"] == len(cfg.message_sizes())
    assert set(fig.busbw_sentences(analysis)) == {"growth", "dips", "fit"}


def test_wire_rows_put_counted_beside_modelled(reports):
    cfg, rs = reports
    rows = fig.wire_rows(rs)
    assert [w["rank"] for w in rows] == list(range(cfg.world_size))
    for w, r in zip(rows, rs):
        assert w["modelled"] == r.comm_bytes and w["source"] == "modelled"
        if w["counted"] is None:  # no TCP counters here (not Linux)
            continue
        # gloo's ring sends the modelled bytes plus 48-byte preambles, nothing less
        assert w["difference"] == w["counted"] - w["modelled"] >= 0
        assert w["difference"] % GLOO_PREAMBLE == 0
        assert w["preambles"] == w["difference"] // GLOO_PREAMBLE
        assert w["difference"] < 0.01 * w["modelled"] + 10_000


def test_anatomy_totals_are_exact_and_split_only_the_activations(reports):
    cfg, rs = reports
    totals = fig.anatomy_totals(rs)
    want = model_state_bytes(rs[0].num_params, mixed_precision=False).total
    assert totals["states_per_rank"] == pytest.approx(want, rel=0.01)
    assert totals["same_states"]
    assert totals["states_all"] == cfg.world_size * totals["states_per_rank"]
    # 16 B per parameter, plus Adam's fp32 "step" scalar per parameter tensor
    assert totals["states_formula"] == want
    extra = totals["states_per_rank"] - want
    assert extra in (0, 4 * totals["param_tensors"])
    assert totals["global_batch"] == cfg.batch_size
    per_rank = fig.anatomy_prediction(rs[0])["activations"]
    assert totals["acts_one_device"] == cfg.world_size * per_rank
    assert totals["acts_one_device"] > mlp_activation_bytes(cfg.batch_size, cfg.sizes)


def test_anatomy_model_states_match_the_analytic_model(reports):
    cfg, rs = reports
    expected = model_state_bytes(rs[0].num_params, mixed_precision=False)
    for r in rs:
        assert r.num_params == sum(p.numel() for p in MLP(cfg.sizes).parameters())
        phases = [(e["phase"], e["step"]) for e in r.memory]
        for step in range(cfg.steps):
            for phase in ("forward", "backward", "step"):
                assert (phase, step) in phases
        last = r.memory[-1]
        assert last["phase"] == "step"
        for cat in ("params", "grads", "optimizer"):
            want = getattr(expected, cat)
            assert last["current"][cat] == pytest.approx(want, rel=0.01), (r.rank, cat)
        assert r.comm_bytes == bytes_sent("all_reduce", 4 * r.num_params, r.world_size)


def test_anatomy_activations_match_the_prediction(reports):
    _, rs = reports
    for row in fig.anatomy_rows(rs):
        assert row["measured"] == pytest.approx(row["predicted"], rel=0.01), row


def test_anatomy_losses_equal_a_single_process(reports):
    cfg, rs = reports
    model = MLP(cfg.sizes, seed=cfg.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for step in range(cfg.steps):
        optimizer.zero_grad()
        x, y = mlp_batch(cfg.sizes, cfg.batch_size, seed=cfg.seed, step=step)
        loss = F.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    for r in rs:
        torch.testing.assert_close(torch.tensor(r.losses), torch.tensor(losses))


def test_figures_draw_from_the_reports(reports):
    _, rs = reports
    for figure in (fig.draw_collectives(rs), fig.draw_busbw(rs)):
        assert figure.axes


# ----------------------------------------------------------- pure figure logic


def test_state_bytes_per_device_follows_model_state_bytes():
    n = 1_234_567
    for key, mixed in (("mixed-16", True), ("fp32-16", False)):
        got = fig.state_bytes_per_device(n, key)
        assert got == model_state_bytes(n, mixed_precision=mixed).as_dict()
        sharded = fig.state_bytes_per_device(n, key, devices=8)
        want = model_state_bytes(n, world_size=8, zero_stage=3, mixed_precision=mixed)
        assert sharded == want.as_dict()
    assert sum(fig.state_bytes_per_device(n, "bf16-inference").values()) == 2 * n
    with pytest.raises(ValueError, match="convention"):
        fig.state_bytes_per_device(n, "fp8")


def test_fits_table_compares_need_with_vendor_memory():
    rows = fig.fits_table(7_000_000_000, "mixed-16")
    assert {r["name"] for r in rows} == {a.name for a in ACCELERATORS}
    for row in rows:
        assert row["need_bytes"] == 16 * 7_000_000_000
        assert row["fits"] == (row["need_bytes"] <= row["memory_bytes"])
        assert row["fits"] == (row["devices_needed"] == 1)
    assert {r["name"] for r in rows if r["fits"]} == {"H200", "MI300X"}  # 112 GB
    assert all(a.source.startswith("https://") for a in ACCELERATORS)


def test_min_devices_is_the_smallest_that_fits():
    n, memory = 70_000_000_000, 80 * GB
    k = fig.min_devices(n, memory)
    assert sum(fig.state_bytes_per_device(n, "mixed-16", k).values()) <= memory
    assert sum(fig.state_bytes_per_device(n, "mixed-16", k - 1).values()) > memory


def test_fit_alpha_beta_recovers_a_synthetic_link():
    alpha, beta, n = 20e-6, 1 / 5e9, 4
    sizes = [2**k for k in range(10, 26, 2)]
    times = [alpha_beta_time(s, n, alpha, beta) for s in sizes]
    a, b = fit_alpha_beta(sizes, times, n)
    assert a == pytest.approx(alpha, rel=1e-6)
    assert b == pytest.approx(beta, rel=1e-6)
    # a ring all-reduce moves 2(n-1)/n of the data per rank: the busbw factor
    assert alpha_beta_time(1e9, n, 0, beta) == pytest.approx(
        bus_factor("all_reduce", n) * 1e9 * beta
    )
    with pytest.raises(ValueError):
        fit_alpha_beta(sizes, times, 1)


def _sweep(times, spread=0.1):
    """Synthetic time_all_reduce rows: sizes 4 KiB x 4^k, given median times."""
    rows = []
    for k, t in enumerate(times):
        size = 4096 * 4**k
        rows.append(
            {
                "bytes": size,
                "time_s": t,
                "time_p10_s": t * (1 - spread),
                "time_p90_s": t * (1 + spread),
                "algbw": size / t,
                "busbw": size / t * 1.5,
                "iters": 20,
                "warmup": 5,
            }
        )
    return rows


def test_busbw_analysis_follows_a_clean_alpha_beta_sweep():
    n, alpha, beta = 4, 20e-6, 1 / 2e9  # crossover near 160 KB
    times = [alpha_beta_time(4096 * 4**k, n, alpha, beta) for k in range(7)]
    analysis = fig.busbw_analysis(_sweep(times), n)
    assert analysis["alpha"] == pytest.approx(alpha, rel=1e-6)
    assert analysis["beta"] == pytest.approx(beta, rel=1e-6)
    assert analysis["fit_in_band"] == 7 and analysis["dips"] == []
    assert (analysis["small"]["from"], analysis["small"]["to"]) == (4096, 65536)
    assert (analysis["large"]["from"], analysis["large"]["to"]) == (2**20, 2**24)
    assert analysis["small"]["phrase"].startswith("hardly changed")
    assert "close to the 16x" in analysis["large"]["phrase"]
    text = fig.busbw_sentences(analysis)
    assert text["dips"] == "The medians rose with every step in size."
    assert text["growth"].startswith("From 4.0 KiB to 64.0 KiB (16x the bytes)")
    assert "inside the p10-p90 bar at 7 of the 7 sizes" in text["fit"]


def test_busbw_analysis_reports_a_noisy_sweep_as_it_is():
    # the review's run: 4 KiB 5405 us, 256 KiB 7438 us, 1 MiB 2134 us, ...
    times = [5405e-6, 5000e-6, 6000e-6, 7438e-6, 2134e-6, 4000e-6, 20000e-6]
    analysis = fig.busbw_analysis(_sweep(times, spread=0.5), 4)
    assert analysis["dips"] == [(4096, 16384), (262144, 1048576)]
    assert analysis["dips_in_spread"] == [True, False]
    assert not analysis["small"]["phrase"].startswith("grew")
    text = fig.busbw_sentences(analysis)
    assert "did not rise at every step" in text["dips"]
    assert "1 of these 2 dips" in text["dips"]


def test_growth_phrase_says_what_the_ratio_is():
    assert fig.growth_phrase(0.5, 16).startswith("fell")
    assert fig.growth_phrase(1.2, 16).startswith("hardly changed")
    assert fig.growth_phrase(3.0, 16).startswith("grew 3.0x, far less")
    assert fig.growth_phrase(8.7, 16).startswith("grew 8.7x, less than the 16x")
    assert fig.growth_phrase(14.0, 16).startswith("grew 14.0x, close to")


def test_fits_widget_prerenders_every_choice_for_the_static_book():
    widget = fig.fits_widget()
    assert widget.values() == {"billions": 7, "convention": "mixed-16"}
    sizes, conventions = len(fig.FIT_BILLIONS), len(fig.FIT_CONVENTIONS)
    assert len(widget.figure.children) == sizes  # a Stack per size ...
    for stack in widget.figure.children:
        assert len(stack.children) == conventions  # ... of one figure per convention
        assert all(
            o.outputs[0]["output_type"] == "display_data" for o in stack.children
        )
    assert len(widget.links) == 1 + sizes  # every control drives its Stacks
    with pytest.raises(ValueError, match="live=True"):
        fig.fits_widget(billions=8)


def test_value_origins_names_single_sources_and_sums():
    grid = {"before": [[10, 11], [20, 21]], "after": [[10, 21], [30, 32]]}
    assert fig.value_origins(grid) == [[0, 1], [None, None]]


def test_draw_fits_and_its_widget():
    assert fig.draw_fits(70, "mixed-16", 8).axes
    widget = fig.fits_widget(billions=13, live=True)  # free controls, live kernel
    assert widget.values() == {"billions": 13, "convention": "mixed-16", "devices": 1}
    widget.controls["devices"].value = 4  # redraws without raising
    assert widget.figure.outputs[0]["output_type"] == "display_data"


# -------------------------------------------------------------- exercises

REFERENCE_ALL_REDUCE = """
import torch
import torch.distributed as dist


def all_reduce(tensor):
    n = dist.get_world_size()
    flat = tensor.reshape(-1)
    padded = torch.zeros(-(-flat.numel() // n) * n, dtype=tensor.dtype)
    padded[: flat.numel()] = flat
    shard = torch.empty(padded.numel() // n, dtype=tensor.dtype)
    dist.reduce_scatter_single(shard, padded)
    dist.all_gather_single(padded, shard)
    tensor.copy_(padded[: flat.numel()].view_as(tensor))
    return tensor
"""

NO_ALL_GATHER = """
import torch
import torch.distributed as dist


def all_reduce(tensor):
    n = dist.get_world_size()
    flat = tensor.reshape(-1)
    padded = torch.zeros(-(-flat.numel() // n) * n)
    padded[: flat.numel()] = flat
    shard = torch.empty(padded.numel() // n)
    dist.reduce_scatter_single(shard, padded)
    padded[dist.get_rank() * shard.numel() :][: shard.numel()] = shard
    tensor.copy_(padded[: flat.numel()].view_as(tensor))
"""

CHEATS = """
import torch.distributed as dist


def all_reduce(tensor):
    dist.all_reduce(tensor)
"""


def test_check_state_bytes_accepts_the_answer_and_rejects_fp32_split():
    def right(n, mixed_precision=True):
        return (2 * n, 2 * n, 12 * n) if mixed_precision else (4 * n, 4 * n, 8 * n)

    def wrong(n, mixed_precision=True):
        return (4 * n, 4 * n, 8 * n)  # the right total (16), the wrong split

    ex.check_state_bytes(right)
    with pytest.raises(AssertionError, match="mixed_precision=True"):
        ex.check_state_bytes(wrong)

    def mixed_always(n, mixed_precision=True):
        return (2 * n, 2 * n, 12 * n)  # ignores the flag

    with pytest.raises(AssertionError, match="mixed_precision=False"):
        ex.check_state_bytes(mixed_always)


def test_check_optimizer_sharded_accepts_the_answer_only():
    ex.check_optimizer_sharded(38_500_000_000, 63_000_000_000)  # 5.5 and 9 B/param
    with pytest.raises(AssertionError, match="every state split"):
        ex.check_optimizer_sharded(14_000_000_000, 14_000_000_000)  # 16 B / 8
    with pytest.raises(AssertionError, match="mixed_bytes"):
        ex.check_optimizer_sharded(63_000_000_000, 38_500_000_000)  # swapped
    with pytest.raises(AssertionError, match="fp32_bytes"):
        ex.check_optimizer_sharded(38_500_000_000, 38_500_000_000)  # mixed split twice
    with pytest.raises(AssertionError, match="number of bytes"):
        ex.check_optimizer_sharded("38.5 GB", 63e9)


def test_check_crossover_bytes_accepts_n_alpha_over_beta_only():
    ex.check_crossover_bytes(lambda alpha, beta, n: n * alpha / beta)
    for wrong in (
        lambda alpha, beta, n: alpha / beta,  # forgot the chunk size S / N
        lambda alpha, beta, n: 2 * (n - 1) * alpha / beta,  # kept 2(N-1), lost 1/N
        lambda alpha, beta, n: (n - 1) * alpha / beta,
    ):
        with pytest.raises(AssertionError, match="must be equal"):
            ex.check_crossover_bytes(wrong)
    with pytest.raises(AssertionError, match="not a number"):
        ex.check_crossover_bytes(lambda alpha, beta, n: None)


def test_chapter_numbers_its_exercises_in_order():
    text = open("chapters/00-foundations.md").read()
    titles = re.findall(r"````\{exercise-start\} (\S+): ", text)
    assert titles == [f"0.{k}" for k in range(1, len(titles) + 1)] and titles
    assert text.count(":nonumber:") == len(titles)  # the subtitle carries the number
    for label in re.findall(r"\{exercise-start\}[^\n]*\n:label: (\S+)", text):
        assert f"{{solution-start}} {label}" in text


def test_check_all_reduce_accepts_the_reference(tmp_path):
    path = tmp_path / "good.py"
    path.write_text(textwrap.dedent(REFERENCE_ALL_REDUCE))
    ex.check_all_reduce(path)


@pytest.mark.parametrize(
    "source, words",
    [(NO_ALL_GATHER, "dist.all_reduce gives"), (CHEATS, "not dist.all_reduce")],
    ids=["no-all-gather", "calls-all-reduce"],
)
def test_check_all_reduce_rejects_wrong_answers(tmp_path, source, words):
    path = tmp_path / "bad.py"
    path.write_text(textwrap.dedent(source))
    with pytest.raises(AssertionError, match=words):
        ex.check_all_reduce(path)


def test_check_all_reduce_needs_the_file(tmp_path):
    with pytest.raises(AssertionError, match="writefile"):
        ex.check_all_reduce(tmp_path / "missing.py")
