"""The model-parallel lab (chapter 4): both modes and both implementations against
one process, collective counts against torch's, memory and bytes against the
analytic model, bad layouts refused before any process starts.

Every lab configuration of one world size runs in a single launch (a module
fixture), so the file costs two launches: world size 2 and 4. The equality runs
use plain SGD: AdamW's per-element step ``m / (sqrt(v) + eps)`` turns a gradient
that is zero up to rounding (the attention's k biases: softmax ignores a shift
shared by all keys) into a step of +-lr whose sign is the rounding's, so fp32 runs
that sum in another order end up lr apart there; SGD keeps every difference at
rounding size, and fp32's default ``assert_close`` tolerances hold. The memory
runs use AdamW (its two states are what the formulas count).
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from torch.testing import assert_close

import labs.model_parallel as lab
from labs.model_parallel import TINY, Config
from tests import _model_parallel_lab_workers as workers
from tests.test_wire import gloo_sent
from utils import wire
from utils.launch import launch
from utils.memory_model import transformer_activation_bytes
from utils.models import GPT, GPTConfig, count_params
from utils.report import RankReport

L = 4
BASE = replace(TINY, n_layers=L, batch_size=8, return_params=True, optimizer="sgd")
"""Four blocks (four layer groups at world size 4), h = 32, s = 16, v = 64, a = 4."""


def _tensor(n: int) -> list[Config]:
    """Tensor mode at tp = n (both impls, with and without SP), and at 4 ranks
    dp 2 x tp 2 and tp 1 (dp 4)."""
    out = [
        replace(BASE, world_size=n, impl=i, sequence_parallel=sp)
        for sp in (False, True)
        for i in ("scratch", "torch")
    ]
    if n == 4:
        out += [
            replace(BASE, world_size=4, dp_size=2, impl=i, sequence_parallel=sp)
            for sp in (False, True)
            for i in ("scratch", "torch")
        ]
        out += [
            replace(BASE, world_size=4, dp_size=4, sequence_parallel=sp)
            for sp in (False, True)
        ]
    return out


def _layers(n: int) -> list[Config]:
    out = [replace(BASE, world_size=n, mode="layers", impl=i) for i in lab.IMPLS]
    if n == 4:
        out += [
            replace(BASE, world_size=4, mode="layers", dp_size=2, impl=i)
            for i in lab.IMPLS
        ]
    return out


def _memory(n: int) -> list[Config]:
    """AdamW runs, for the model-state bytes."""
    adamw = replace(BASE, world_size=n, optimizer="adamw", return_params=False)
    return [
        replace(adamw, impl="scratch"),
        replace(adamw, impl="torch"),
        replace(adamw, impl="scratch", tie_weights=True),
        replace(adamw, mode="layers"),
    ]


def _name(cfg: Config) -> str:
    parts = [cfg.mode, cfg.impl, f"tp{cfg.tp}", f"dp{cfg.dp_size}"]
    if cfg.mode == "layers":
        parts[2] = f"groups{cfg.layer_groups}"
    parts += ["sp"] * cfg.sequence_parallel + ["tied"] * cfg.tie_weights
    return "-".join(parts + [cfg.optimizer])


@pytest.fixture(scope="module", params=[2, 4], ids=["N=2", "N=4"])
def runs(request):
    n = request.param
    cfgs = _tensor(n) + _layers(n) + _memory(n)
    checked = [c for c in _tensor(n) if c.dp_size == 1]
    per_rank = launch(
        workers.suite, cfgs, checked, world_size=n, backend="gloo", timeout=300
    )
    reports = {
        _name(c): (c, [r["reports"][k] for r in per_rank]) for k, c in enumerate(cfgs)
    }
    counted = [(c, [r["counted"][k] for r in per_rank]) for k, c in enumerate(checked)]
    _MLP_CHAINS[n] = [r["mlp_chain"] for r in per_rank]
    return n, reports, counted


def _select(reports, **want):
    return [
        (cfg, reps)
        for cfg, reps in reports.values()
        if all(getattr(cfg, k) == v for k, v in want.items())
    ]


# ------------------------------------------------------------ before any process
@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        (dict(world_size=3, n_heads=4, d_model=32), ["tp=3", "n_heads=4", "d_model"]),
        (dict(world_size=2, vocab_size=63), ["tp=2", "vocab_size=63"]),
        (dict(world_size=4, dp_size=2, tp_size=4), ["dp_size=2 x tp_size=4", "!= "]),
        (dict(world_size=4, dp_size=3), ["dp_size=3", "world_size=4"]),
        (dict(world_size=4, sequence_parallel=True, seq_len=18), ["seq_len", "18"]),
        (dict(world_size=4, batch_size=6, dp_size=4), ["batch_size=6", "dp_size=4"]),
        (
            dict(world_size=4, mode="layers", n_layers=3),
            ["4 layer groups", "n_layers=3"],
        ),
        (dict(world_size=2, mode="layers", tp_size=2), ["tp_size=2", "mode='tensor'"]),
        (dict(world_size=2, mode="layers", sequence_parallel=True), ["sequence_par"]),
        (dict(world_size=2, impl="torch", tie_weights=True), ["tie_weights=False"]),
        (dict(world_size=2, mode="pipeline"), ["mode", "pipeline"]),
    ],
)
def test_bad_layouts_are_refused_by_the_config(kwargs, named):
    with pytest.raises(ValueError) as err:
        Config(**kwargs)
    for text in named:
        assert text in str(err.value), (text, str(err.value))


def test_the_cli_refuses_a_bad_layout_before_starting_a_rank(monkeypatch, capsys):
    def no_launch(*args, **kwargs):  # pragma: no cover - reached only on a bug
        raise AssertionError("a rank was started for a refused layout")

    monkeypatch.setattr(lab.lab, "launch", no_launch)  # what every lab's run calls
    with pytest.raises(SystemExit) as exit_:
        lab.main(["--world-size", "4", "--tp-size", "3"])
    assert exit_.value.code == 2
    assert "dp_size=1 x tp_size=3 = 3 != world_size=4" in capsys.readouterr().err


def test_layouts_that_fit_pass_and_derive_their_degrees():
    assert Config(world_size=4).tp == 4
    assert Config(world_size=4, dp_size=2).tp == 2
    cfg = Config(world_size=4, mode="layers", dp_size=2)
    assert (cfg.tp, cfg.layer_groups, cfg.rows_per_rank) == (1, 2, 4)
    assert lab.layout(cfg).ranks("pp") == [[0, 2], [1, 3]]


@pytest.mark.parametrize("tie", [False, True])
def test_the_parameter_split_counts_every_parameter_of_the_gpt(tie):
    g = GPTConfig(vocab_size=96, seq_len=24, d_model=48, n_layers=3, tie_weights=tie)
    sharded, replicated = lab.param_split(g)
    assert sharded + replicated == count_params(GPT(g))
    names = [n for n, _ in GPT(g).named_parameters()]
    cfg = Config(world_size=1, vocab_size=96, seq_len=24, d_model=48, n_layers=3)
    assert lab.held_numel(replace(cfg, tie_weights=tie), {"pp": 0})[1] == len(names)


@pytest.mark.parametrize("t", [1, 2, 4])
@pytest.mark.parametrize("sp", [False, True])
def test_the_adapted_activation_formula_is_korthikantis_minus_the_stated_terms(t, sp):
    """In 16-bit (e = 2), putting back what the course GPT does not have (two
    1-byte dropout masks, split with SP; the 5 a s^2 b / t of softmax, its mask
    and dropout output) and taking out what it has beyond (the norms' statistics,
    the log-sum-exp; with SP the gathered inputs kept whole, 2 x 2 s b h (1 - 1/t))
    gives exactly Table 2's figure (``utils.memory_model``)."""
    cfg = replace(
        Config(world_size=t, precision="bf16", sequence_parallel=sp),
        seq_len=32,
        d_model=64,
        n_heads=4,
        batch_size=8,
    )
    s, b, h, a = cfg.seq_len, cfg.rows_per_rank, cfg.d_model, cfg.n_heads
    ours = lab.activation_bytes_per_layer(cfg)
    masks = 2 * s * b * h // (t if sp else 1)
    softmax = 5 * a * s * s * b // t
    stats, lse = 2 * 4 * s * b // (t if sp else 1), 4 * a * s * b // t
    gathered = 4 * s * b * h - 4 * s * b * h // t if sp else 0
    paper = transformer_activation_bytes(s, b, h, a, tp_size=t, sequence_parallel=sp)
    assert ours + masks + softmax - stats - lse - gathered == paper


# ------------------------------------------------------------ equal to one process
_REFERENCES: dict = {}
_MLP_CHAINS: dict[int, list] = {}


def reference(cfg: Config) -> dict:
    """``lab.reference``, once per model, batch and optimizer (it does not depend
    on the layout)."""
    key = (cfg.gpt(), cfg.batch_size, cfg.steps, cfg.seed, cfg.optimizer, cfg.lr)
    if key not in _REFERENCES:
        _REFERENCES[key] = lab.reference(cfg)
    return _REFERENCES[key]


def _gathered(reps: list[RankReport], cfg: Config) -> dict[str, torch.Tensor]:
    """The final parameters: every rank's whole set (tensor mode), checked equal
    across ranks, or the union of the layer groups' (layers mode)."""
    out: dict[str, torch.Tensor] = {}
    for r in reps:
        for name, value in r.extra.params.items():
            t = torch.tensor(value)
            if name in out and cfg.mode == "tensor":
                assert_close(t, out[name], rtol=0, atol=0)
            out[name] = t
    return out


def test_every_run_equals_one_process(runs):
    """Losses and final parameters (fp32 ``assert_close`` defaults) of every SGD
    run, tensor and layers mode, scratch and torch, with and without sequence
    parallelism, at tp 2 and 4, dp 2 x tp 2 and dp 2 x 2 layer groups."""
    n, reports, _ = runs
    checked = 0
    for cfg, reps in reports.values():
        if cfg.optimizer != "sgd":
            continue
        ref = reference(cfg)
        for r in reps:
            assert_close(torch.tensor(r.losses), torch.tensor(ref["losses"]))
        got = _gathered(reps, cfg)
        assert got.keys() == ref["params"].keys(), _name(cfg)
        for name, want in ref["params"].items():
            where = f"{_name(cfg)} {name}"
            assert_close(got[name], want, msg=lambda m, w=where: f"{w}: {m}")
        checked += 1
    assert checked == (14 if n == 4 else 6)


def test_adamw_runs_train_like_one_process(runs):
    """AdamW: the losses equal one process's (the parameters differ by up to lr
    where a gradient is rounding noise; see the module docstring)."""
    n, reports, _ = runs
    for cfg, reps in reports.values():
        if cfg.optimizer == "adamw":
            ref = reference(cfg)
            assert_close(torch.tensor(reps[0].losses), torch.tensor(ref["losses"]))


def test_coordinates_follow_the_layout(runs):
    n, reports, _ = runs
    for cfg, reps in reports.values():
        dims = lab.layout(cfg)
        for r in reps:
            assert r.coords == dims.coords(r.rank)
            assert r.extra.blocks == (
                list(range(L))
                if cfg.mode == "tensor"
                else list(lab.split_layers(L, cfg.layer_groups)[r.coords["pp"]])
            )


# ------------------------------------------------------------ collective counts
def _calls(rep: RankReport, phase: str) -> dict[str, int]:
    return rep.extra.calls_by_phase.get(phase, {})


@pytest.mark.parametrize("sp", [False, True], ids=["tp", "tp+sp"])
def test_collective_counts_equal_torchs(runs, sp):
    """Per step, L blocks: without SP one all-reduce per region in forward (g) and
    in backward (f), plus the embedding's g and the head's f; with SP each becomes
    a reduce-scatter / all-gather pair. Ours and torch's parallelize_module agree
    on the model's forward and backward. They differ, by design, in two places:
    the loss (ours: the max, then the sum of exps stacked with the target logit,
    2 all-reduces; loss_parallel: 3) and, with SP, the sum of the replicated
    parameters' partial gradients (ours: one flat all-reduce after the backward;
    torch: one per Partial gradient when the optimizer reads it, 4 L + 3 with
    SGD: the layer norms and the positions)."""
    n, reports, _ = runs
    if sp:
        model = {"reduce_scatter": 1 + 2 * L, "all_gather": 2 * L + 1}
    else:
        model = {"all_reduce": 1 + 2 * L}
    for cfg, reps in _select(reports, mode="tensor", sequence_parallel=sp):
        if cfg.tp == 1:
            continue
        for r in reps:
            assert _calls(r, "forward") == model, _name(cfg)
            assert _calls(r, "backward") == model, _name(cfg)
            ours = cfg.impl == "scratch"
            assert _calls(r, "loss") == {"all_reduce": 2 if ours else 3}
            sync, step = _calls(r, "sync"), _calls(r, "step")
            if sp:
                assert (sync, step) == (
                    ({"all_reduce": 1}, {}) if ours else ({}, {"all_reduce": 4 * L + 3})
                )
            else:
                assert (sync, step) == ({}, {})
            assert _calls(r, "dp") == ({"all_reduce": 1} if cfg.dp_size > 1 else {})


def test_our_counters_agree_with_comm_debug_mode(runs):
    """Each checked step's collectives by kind, as the lab counts them, equal what
    torch's own CommDebugMode saw (both implementations)."""
    n, _, counted = runs
    assert len(counted) == 4
    for cfg, per_rank in counted:
        for got in per_rank:
            assert got["ours"] == got["comm_debug_mode"], _name(cfg)


def test_layer_groups_send_one_activation_forward_and_one_gradient_back(runs):
    n, reports, _ = runs
    for cfg, reps in _select(reports, mode="layers"):
        shape_bytes = cfg.rows_per_rank * cfg.seq_len * cfg.d_model * 4
        for r in reps:
            k, last = r.coords["pp"], cfg.layer_groups - 1
            fwd = {"send": 1} if k < last else {}
            bwd = {"send": 1} if k > 0 else {}
            assert _calls(r, "forward") == fwd, _name(cfg)
            assert _calls(r, "backward") == bwd, _name(cfg)
            sent = r.extra.comm_by_phase
            assert sent.get("forward", {}).get("send", 0) == shape_bytes * (k < last)
            assert sent.get("backward", {}).get("send", 0) == shape_bytes * (k > 0)
            assert r.extra.comm_sources["send"] == "counted"


# ------------------------------------------------------------ memory
def test_model_state_bytes_are_one_tth_of_the_sharded_plus_the_replicated(runs):
    """Measured after the last step (the ledger) against the analytic model:
    params and grads e x (sharded / t + replicated), AdamW 2 e per parameter plus
    its 4-byte step counter per tensor; layers mode, the rank's own layers. The
    shard shapes the rank reports add up to the same count. One stated exception,
    measured: torch's RowwiseParallel embedding gives its weight a Replicate
    gradient (the whole v x h matrix on every rank), so torch's grads are
    (t - 1)/t v h e above the model."""
    n, reports, _ = runs
    for cfg, reps in _select(reports, optimizer="adamw"):
        sharded, replicated = lab.param_split(cfg.gpt())
        for r in reps:
            want = r.extra.predicted
            held = sum(torch.Size(s["shape"]).numel() for s in r.extra.shards.values())
            assert held == lab.held_numel(cfg, r.coords)[0]
            if cfg.mode == "tensor":
                assert held == sharded // cfg.tp + replicated
            got = r.extra.state_bytes
            assert got["params"] == want["params"] == 4 * held, _name(cfg)
            assert got["optimizer"] == want["optimizer"], _name(cfg)
            extra = 0
            if cfg.impl == "torch":
                extra = (cfg.tp - 1) * cfg.vocab_size * cfg.d_model * 4 // cfg.tp
            assert got["grads"] == want["grads"] + extra, _name(cfg)


def test_memory_is_recorded_by_phase(runs):
    n, reports, _ = runs
    cfg, reps = reports[_name(replace(BASE, world_size=n))]
    phases = [(e["phase"], e["step"]) for e in reps[0].memory]
    assert phases[0] == ("init", None)
    assert phases[1:6] == [(p, 0) for p in ("forward", "loss", "backward", "step")] + [
        ("forward", 1)
    ]


def test_activations_per_layer_match_the_adapted_korthikanti_formula(runs):
    """Each block's activations (what autograd saved in its forward, parameters
    and its input left out, plus its output, which stands for the next block's
    input) against ``activation_bytes_per_layer``, exactly, for tp 1, 2 and 4
    with and without SP and in layers mode, scratch and torch.

    The whole forward, measured by the ledger after the loss: the layers' bytes
    plus what lives outside them (``predicted["activations"]``: the first
    layer's input, the final norm's output, the loss's fp32 softmax), and at
    most 64 bytes per token, 8 per position and 64 more (int64 ids and targets,
    masks, the norms' statistics, the loss's sums, the positions, the loss; the
    last collective's small buffer may still be held by gloo's worker thread).
    torch's pipelining stage keeps one more copy of the activation it sends,
    e s b h, on every group but the last."""
    n, reports, _ = runs
    seen = set()
    for cfg, reps in reports.values():
        if cfg.optimizer != "sgd":
            continue
        for r in reps:
            want = r.extra.predicted
            blocks = r.extra.block_activation_bytes
            assert len(blocks) == len(r.extra.blocks)
            assert blocks == [want["activations_per_layer"]] * len(blocks), (
                _name(cfg),
                blocks,
            )
            tokens = cfg.rows_per_rank * cfg.seq_len
            slack = 64 * tokens + 8 * cfg.seq_len + 64
            if cfg.mode == "layers" and cfg.impl == "torch":
                last = r.coords["pp"] == cfg.layer_groups - 1
                slack += 0 if last else 4 * tokens * cfg.d_model
            over = r.extra.activation_bytes - want["activations"]
            assert 0 <= over <= slack, (_name(cfg), over, slack)
        seen.add((cfg.mode, cfg.tp, cfg.sequence_parallel))
    tps = {(t, sp) for mode, t, sp in seen if mode == "tensor"}
    degrees = (1, 4) if n == 4 else (2,)  # tp 1 runs as dp 4 in the 4-rank launch
    assert {(t, sp) for t in degrees for sp in (False, True)} <= tps


def test_sequence_parallelism_cuts_activations(runs):
    n, reports, _ = runs
    for impl in lab.IMPLS:
        plain = reports[_name(replace(BASE, world_size=n, impl=impl))][1]
        sp = reports[
            _name(replace(BASE, world_size=n, impl=impl, sequence_parallel=True))
        ][1]
        for a, b in zip(plain, sp):
            assert b.extra.activation_bytes < a.extra.activation_bytes


# ------------------------------------------------------------ bytes on the wire
@pytest.mark.skipif(not wire.supported(), reason="needs Linux >= 4.19")
def test_bytes_per_layer_counted_on_the_sockets(runs):
    """Counted (the kernel's TCP counters) while each block ran, against the
    model. Without SP a block all-reduces S = b s h e bytes twice in forward and
    twice in backward, and gloo's ring sends 2 (t-1)/t S each time plus a 144-byte
    preamble pair per transfer (``tests.test_wire.gloo_sent``): so the block's
    counted bytes are 8 b s h (t-1)/t e (Narayanan et al. 2021, sec. 3.2) plus
    that framing, exactly. With SP the all-gathers send (t-1)/t S, but gloo's
    reduce-scatter all-reduces the whole input (2 (t-1)/t S), so a block counts
    12 b s h (t-1)/t e: half again the model's 8, which NCCL's ring reduce-scatter
    does meet."""
    n, reports, _ = runs
    checked = 0
    for cfg, reps in _select(reports, mode="tensor", optimizer="sgd"):
        t = cfg.tp
        if t == 1:
            continue
        size = cfg.rows_per_rank * cfg.seq_len * cfg.d_model * 4  # S, fp32
        model = 8 * size * (t - 1) // t
        for r in reps:
            rank = r.coords["tp"]
            if cfg.sequence_parallel:
                one = gloo_sent("all_gather", size, t, rank) + gloo_sent(
                    "reduce_scatter", size, t, rank
                )
                payload = 12 * size * (t - 1) // t
            else:
                one = gloo_sent("all_reduce", size, t, rank)
                payload = model
            for row in r.extra.block_wire_bytes:
                assert row["forward"] == row["backward"] == 2 * one, (_name(cfg), row)
                framing = 4 * one - payload
                assert 0 < framing < 0.1 * payload
            assert r.extra.predicted["comm_per_layer"] == model
            checked += 1
    assert checked


def test_modelled_bytes_per_step_are_the_meters(runs):
    """The modelled bytes of the scratch layers' collectives (what the meter
    recorded) per step: without SP, forward (1 + 2L) and backward (2L + 1)
    all-reduces of S, each 2 (t-1)/t S."""
    n, reports, _ = runs
    for cfg, reps in _select(reports, mode="tensor", impl="scratch", optimizer="sgd"):
        if cfg.sequence_parallel or cfg.tp == 1:
            continue
        size, t = cfg.rows_per_rank * cfg.seq_len * cfg.d_model * 4, cfg.tp
        per = 2 * size * (t - 1) // t
        for r in reps:
            assert r.extra.comm_by_phase["forward"] == {"all_reduce": (1 + 2 * L) * per}
            assert r.extra.comm_by_phase["backward"] == {
                "all_reduce": (2 * L + 1) * per
            }
            assert r.comm_bytes == r.extra.comm_bytes_per_step[-1]


def test_a_layer_group_splits_any_list_of_modules(runs):
    """``LayerGroup`` on the course MLP's Linear/ReLU layers cut over all ranks:
    the last rank's loss and every rank's weight gradients equal the whole MLP's."""
    n, _, _ = runs
    chain = _MLP_CHAINS[n]
    assert chain[-1]["loss"] is not None and all(c["loss"] is None for c in chain[:-1])
    assert_close(*chain[-1]["loss"])
    assert sum(len(c["grads"]) for c in chain) == 4
    for c in chain:
        for got, want in c["grads"]:
            assert_close(got, want)


def test_split_layers_cuts_near_equal_contiguous_groups():
    assert lab.split_layers(5, 2) == [range(0, 3), range(3, 5)]
    assert lab.split_layers(4, 4) == [range(i, i + 1) for i in range(4)]
    with pytest.raises(ValueError, match="cannot cut 2 layers into 3 groups"):
        lab.split_layers(2, 3)


def test_the_gpt_is_assigned_embedding_first_and_head_last():
    from utils.model_parallel.layer_split import gpt_groups, gpt_pieces

    gpt = GPT(GPTConfig(n_layers=3, tie_weights=False))
    groups = gpt_groups(gpt, 2)
    names = [[type(m).__name__ for _, m in g] for g in groups]
    assert names == [["GPTEmbedding", "Block", "Block"], ["Block", "GPTHead"]]
    with pytest.raises(ValueError, match="untied"):
        gpt_pieces(GPT(GPTConfig(n_layers=3)))


# ------------------------------------------------------------ the layers timeline
def test_across_layers_one_rank_computes_at_a_time(runs):
    """Layers mode, one batch in flight: the groups' forwards and backwards run one
    after the other, so in every step their sum over the chain fits in the step's
    span (each rank's clock starts after the same barrier; 2 ms for the skew of
    the ranks' barrier exits); the optimizer steps may overlap, and are left out.
    Every rank but the first waits for its activation, and with 4 groups every
    rank is idle (waiting, or done) for most of the step."""
    n, reports, _ = runs
    for cfg, reps in _select(reports, mode="layers", optimizer="sgd"):
        chains: dict[int, list] = {}
        for r in reps:
            chains.setdefault(r.coords["dp"], []).append(r)
        for chain in chains.values():
            for step in range(1, cfg.steps):
                events = [r.extra.timeline[step] for r in chain]
                busy = sum(
                    e["end"] - e["start"]
                    for ev in events
                    for e in ev
                    if e["name"] in ("forward", "backward")
                )
                span = max(e["end"] for ev in events for e in ev)
                assert busy <= span + 0.002, (_name(cfg), step, busy, span)
            for r in chain:
                assert r.timings["idle"] > 0
                names = {e["name"] for e in r.extra.timeline[-1]}
                if cfg.impl == "scratch" and r.coords["pp"] > 0:
                    assert "recv activation" in names
                if cfg.layer_groups == 4:
                    assert r.timings["idle"] > 0.4 * r.timings["step"], _name(cfg)


def test_reports_round_trip_through_json(runs):
    n, reports, _ = runs
    cfg, reps = reports[_name(replace(BASE, world_size=n, mode="layers"))]
    back = RankReport.from_dict(json.loads(json.dumps(reps[-1].to_dict())))
    assert back.extra == reps[-1].extra
    assert isinstance(back.extra, lab.ModelParallelData)
