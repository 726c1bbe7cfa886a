"""The combined lab (``labs/combined.py``): dp x tp x pp with ZeRO on 8 gloo ranks.

- equal to one process (the whole GPT, the whole batch, AdamW): losses and every
  final parameter, at 2 x 2 x 2 for ZeRO 0, 1 and 2 and GPipe, and at other
  layouts of 8 ranks (pp 4, tp 4, dp 8, interleaved);
- memory per rank against the planner (``utils.planner.estimate``, fp32 AdamW, the
  course GPT's activations), category by category: parameters and gradients
  exact, optimizer states exact but for AdamW's 4-byte step counter (one per
  flat bucket the wrapped optimizer sees), activations never below the planner's
  and above it by at most ``in_flight + 3`` pipeline messages (``b/m x s x h``
  fp32): a stage keeps each in-flight micro-batch's output until its backward,
  and up to three receive or send buffers are live when the ledger is read
  (measured excess: 0.7 to 4.5 messages);
- the bytes per axis: ZeRO-2 under a pipeline reduce-scatters once per
  micro-batch (the reason DeepSpeed's pipeline engine refuses it);
- each rank's groups are those ``ParallelDims`` gives;
- bad layouts refused with the bad values named, before any process starts.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from labs import combined as lab
from tests._pipeline_parallel_workers import reference
from utils.dims import ParallelDims

TINY = replace(lab.TINY, return_params=True)
LAYOUTS = {
    "2x2x2 zero0": replace(TINY, zero_stage=0),
    "2x2x2 zero1": TINY,
    "2x2x2 zero2": replace(TINY, zero_stage=2),
    "2x2x2 gpipe": replace(TINY, schedule="gpipe"),
    "dp1 tp2 pp4": replace(TINY, dp_size=1, pp_size=4, micro_batches=4),
    "dp2 tp4 pp1": replace(TINY, tp_size=4, pp_size=1),
    "dp8": replace(TINY, dp_size=8, tp_size=1, pp_size=1, micro_batches=1),
    "dp1 tp2 pp4 interleaved": replace(
        TINY,
        dp_size=1,
        pp_size=4,
        micro_batches=4,
        schedule="interleaved",
        n_layers=8,
    ),  # fmt: skip
}
SPARE_MESSAGES = 3
"""Pipeline buffers that may be live beyond what the layers keep (see above)."""
STEP_COUNTER_BYTES = 4
"""AdamW's ``step`` (a 0-dim fp32 tensor per parameter it sees; torch/optim/
adamw.py, capturable=False): the flat ZeRO optimizers show it one bucket."""


@pytest.fixture(scope="module")
def runs():
    names = list(LAYOUTS)
    return dict(zip(names, lab.run_many([LAYOUTS[n] for n in names])))


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_equal_to_one_process(runs, name):
    cfg, reports = LAYOUTS[name], runs[name]
    losses, params = reference(cfg)
    for r in reports:
        assert r.losses == pytest.approx(losses, abs=1e-5), (name, r.rank)
    got = {}
    for r in reports:
        for key, flat in r.extra.params.items():
            got.setdefault(key, torch.tensor(flat))
    assert set(got) == set(params), name
    for key, want in params.items():
        torch.testing.assert_close(got[key], want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_memory_per_rank_matches_the_planner(runs, name):
    for r in runs[name]:
        got, plan = r.extra.states, r.extra.predicted
        assert got["params"] == plan["params"], (name, r.rank)
        assert got["grads"] == plan["grads"], (name, r.rank)
        assert 0 <= got["optimizer"] - plan["optimizer"] <= STEP_COUNTER_BYTES
        acts, planned = r.extra.peak_activation_bytes, plan["activations"]
        cfg = LAYOUTS[name]
        message = 4 * cfg.rows_per_micro * cfg.gpt().seq_len * cfg.d_model
        in_flight = cfg.plan().stages[r.coords["pp"]]["in_flight"]
        spare = (in_flight + SPARE_MESSAGES) * message
        assert planned <= acts <= planned + spare, (name, r.rank, acts - planned)


def test_the_planner_counts_the_lab_gpt():
    from utils.models import GPT, count_params

    assert TINY.spec().num_params() == count_params(GPT(TINY.gpt()))


def test_zero2_reduce_scatters_once_per_micro_batch(runs):
    one = {r.rank: r.extra.comm_by_axis["dp"] for r in runs["2x2x2 zero1"]}
    two = {r.rank: r.extra.comm_by_axis["dp"] for r in runs["2x2x2 zero2"]}
    m = TINY.micro_batches
    for rank in one:  # stage 1: one reduce-scatter + one all-gather, equal sizes
        assert two[rank] * 2 == one[rank] * (m + 1), rank
    # and the planner counts the same (m + 1) / 2 (in its 16-bit elements)
    plan = {z: replace(TINY, zero_stage=z).plan().comm["dp"] for z in (1, 2)}
    assert plan[2] * 2 == pytest.approx(plan[1] * (m + 1))


def test_each_rank_reports_its_groups(runs):
    for name, reports in runs.items():
        cfg = LAYOUTS[name]
        dims = ParallelDims(
            dp=cfg.dp_size, tp=cfg.tp_size, pp=cfg.pp_size, world_size=cfg.world_size
        )
        for r in reports:
            assert r.coords == dims.coords(r.rank)
            for axis, ranks in r.extra.groups.items():
                assert ranks == dims.group_of(axis, r.rank), (name, axis)


def test_pipeline_ranks_hold_their_stages(runs):
    for r in runs["dp1 tp2 pp4 interleaved"]:
        pp = r.coords["pp"]
        assert r.extra.stage_ids == [pp, pp + 4]
    for r in runs["2x2x2 zero1"]:
        names = [n for chunk in r.extra.layers.values() for n in chunk]
        assert ("GPTEmbedding" in names) == (r.coords["pp"] == 0)
        assert ("GPTHead" in names) == (r.coords["pp"] == 1)


def test_bytes_are_counted_on_the_wire(runs):
    for r in runs["2x2x2 zero1"]:
        assert r.extra.comm_sources["pp"] == "counted"
        assert all(b > 0 for b in r.extra.wire_bytes_per_step)


@pytest.mark.parametrize(
    "kw, words",
    [
        (dict(world_size=8, pp_size=1), ["dp_size=2", "world_size=8"]),
        (dict(tp_size=8, dp_size=1, pp_size=1), ["tp=8", "n_heads=4"]),
        (dict(tp_size=3, dp_size=1, pp_size=1, world_size=0), ["tp=3"]),
        (dict(pp_size=8, dp_size=1, tp_size=1), ["8 model chunks", "n_layers=4"]),
        (dict(zero_stage=3), ["zero_stage", "3"]),
        (dict(schedule="zb1p"), ["schedule", "zb1p"]),
        (dict(schedule="interleaved", micro_batches=3, batch_size=6),
         ["micro_batches=3", "pp_size=2"]),
        (dict(virtual_stages=2), ["virtual_stages=2", "interleaved"]),
        (dict(batch_size=6), ["batch_size=6", "micro_batches"]),
    ],
)  # fmt: skip
def test_bad_layouts_are_refused_before_launch(kw, words):
    with pytest.raises(ValueError) as err:
        replace(lab.TINY, **kw)
    for word in words:
        assert word in str(err.value), (word, str(err.value))
